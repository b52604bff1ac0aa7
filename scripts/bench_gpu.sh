#!/usr/bin/env bash
# The benchmarks on one CUDA GPU in bfloat16, short sizes, within 5 minutes; results in docs/results/gpu/.
# scripts/bench_gpu.py loads the model once and runs decode, concurrency (1, 8 and 64 sessions in one batch,
# max_batch 64: the GPU target), followup, memory, sampled decoding and offloading (64 sessions over 16 cache
# rows) on it, then `bench api` (streamed chat completions through a real `sinkserve serve`).
#
# Usage: scripts/bench_gpu.sh [scripts/bench_gpu.py flags, e.g. --model DIR --suites decode,api --compile]
# Env: SINKSERVE_BENCH_OUT (default docs/results/gpu), SINKSERVE_BENCH_TIMEOUT (seconds, default 300),
#      PYTHON (default <repo>/.venv/bin/python, else python3).
# Writes OUT/<suite>.json|.png|.md, OUT/gpu_extra.json (sampling, offload) and OUT/gpu.txt (the card and
# torch's CUDA). Exits non-zero when a suite fails or the time runs out.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${SINKSERVE_BENCH_OUT:-docs/results/gpu}"
limit="${SINKSERVE_BENCH_TIMEOUT:-300}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[bench_gpu] error: nvidia-smi not found: this script needs a CUDA GPU" >&2
    exit 2
fi
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
cuda="$("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
echo "[bench_gpu] GPU: $gpu; torch $cuda"
mkdir -p "$out"
printf '%s\ntorch %s\n' "$gpu" "$cuda" > "$out/gpu.txt"

started=$SECONDS
status=0
# the Python side stops starting suites 20 s before the limit; the timeout is the backstop
timeout --signal=INT --kill-after=15 "$limit" \
    "$python" scripts/bench_gpu.py --out "$out" --budget-s "$((limit > 40 ? limit - 20 : limit))" "$@" || status=$?
if ((status == 124)); then
    echo "[bench_gpu] error: ran past ${limit}s" >&2
elif ((status != 0)); then
    echo "[bench_gpu] error: a suite failed (exit $status)" >&2
fi
echo "[bench_gpu] done in $((SECONDS - started)) s; results in $out/"
exit "$status"
