#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU in bfloat16, short sizes, within 5 minutes; results in docs/results/gpu/.
# concurrency runs 1, 8 and 64 sessions in one batch (the GPU target: 10,000 tokens/s at 64 sessions).
#
# Usage: scripts/bench_gpu.sh [extra `sinkserve bench` flags, e.g. --threads 8]
# Env: SINKSERVE_BENCH_OUT (default docs/results/gpu), SINKSERVE_BENCH_SUITES (default
#      "decode concurrency followup memory"),
#      SINKSERVE_BENCH_TIMEOUT (seconds, default 300), PYTHON (default <repo>/.venv/bin/python, else python3).
# Writes OUT/<suite>.json, OUT/<suite>.png, OUT/<suite>.md and OUT/gpu.txt (the GPU's name).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${SINKSERVE_BENCH_OUT:-docs/results/gpu}"
suites="${SINKSERVE_BENCH_SUITES:-decode concurrency followup memory}"
limit="${SINKSERVE_BENCH_TIMEOUT:-300}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[bench_gpu] error: nvidia-smi not found: this script needs a CUDA GPU" >&2
    exit 2
fi
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
echo "[bench_gpu] GPU: $gpu"
mkdir -p "$out"
printf '%s\n' "$gpu" > "$out/gpu.txt"

started=$SECONDS
for suite in $suites; do
    left=$((limit - (SECONDS - started)))
    if ((left <= 15)); then
        echo "[bench_gpu] out of time before $suite" >&2
        break
    fi
    sizes=(--quick)
    if [[ "$suite" == concurrency ]]; then sizes=(--lengths "1,8,64" --max-batch 64); fi
    timeout --signal=INT --kill-after=15 "$left" \
        "$python" -m server.cli bench "$suite" --device cuda --dtype bfloat16 "${sizes[@]}" --out "$out" "$@" \
        || echo "[bench_gpu] $suite failed or ran out of time" >&2
done
echo "[bench_gpu] done in $((SECONDS - started)) s; results in $out/"
