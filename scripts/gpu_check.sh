#!/usr/bin/env bash
# The CUDA check in one run, within 10 minutes: the tests/gpu suite (CUDA graphs of the decode buckets against
# eager decoding included), a 20k-token streaming perplexity in bfloat16 against float32 (within 1%), then
# scripts/bench_gpu.sh (bench api through a real `serve` at 1, 8 and 64 streaming clients among them); prints
# one summary and exits non-zero on any failure. Prints nvidia-smi and torch.version.cuda first.
#
#   scripts/gpu_check.sh --download-wheels [DIR]   here, with a package index: the packages the GPU machine
#                                                  lacks, as CPython 3.12 x86-64 wheels, plus SmolLM2's
#                                                  tokenizer and config (no weights) into DIR
#   scripts/gpu_check.sh [--wheels DIR]            on the GPU machine: install DIR's wheels into a private
#                                                  folder (pip --no-index), run the suite and the benchmarks
#   scripts/gpu_check.sh --dry-run [--wheels DIR]  on a CPU: check the wheel list (requirements and imports
#                                                  covered; DIR's wheels, when DIR exists), run tests/gpu
#                                                  (every test skips, with its reason), check bench_gpu.sh
#
# DIR defaults to .gpu-wheels (ignored by git through .git/info/exclude; about 25 MB). Carry it to a GPU
# machine with the device tool's `carry: [".gpu-wheels"]`. The benchmarks run on a SmolLM2-135M of random
# weights (same shapes, so the same speed) built there from the carried config, not the 538 MB model.
# Env: PYTHON (default <repo>/.venv/bin/python if present, else python3), SINKSERVE_GPU_CHECK_BUDGET
# (seconds for everything, default 570), SINKSERVE_BENCH_OUT (default docs/results/gpu).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode=run
wheels=.gpu-wheels
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) mode=dry ;;
        --download-wheels) mode=download; if [[ $# -gt 1 && "$2" != -* ]]; then wheels="$2"; shift; fi ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "[gpu_check] error: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
budget="${SINKSERVE_GPU_CHECK_BUDGET:-570}"
started=$SECONDS
say() { echo "[gpu_check] $*"; }

if [[ "$mode" == download ]]; then
    mkdir -p "$wheels"
    if [[ -d .git/info ]] && ! grep -qxF "/$wheels/" .git/info/exclude 2>/dev/null; then
        echo "/$wheels/" >> .git/info/exclude
    fi
    mapfile -t pins < <("$python" -m tests.gpu.wheels list)
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$wheels" "${pins[@]}"
    "$python" - "$wheels" <<'EOF'
import json, sys
from pathlib import Path

from engine.config import EngineConfig
from engine.model.loader import model_directory, model_source

folder = Path(sys.argv[1]) / "smollm2"
source = model_directory(model_source(None), EngineConfig().cache_dir)  # the converted embedded model
folder.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (source / name).exists():
        (folder / name).write_bytes((source / name).read_bytes())
print(f"[gpu_check] SmolLM2 config and tokenizer (no weights) in {folder}: "
      f"{json.loads((folder / 'config.json').read_text())['num_hidden_layers']} layers")
EOF
    "$python" -m tests.gpu.wheels check "$wheels"
    say "$(du -sh "$wheels" | cut -f1) in $wheels; carry it: run(..., carry=[\"$wheels\"])"
    exit 0
fi

failed=()
summary=()
if [[ "$mode" == dry ]]; then
    say "dry run on $(uname -m), $("$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())')"
    if [[ -d "$wheels" ]]; then
        "$python" -m tests.gpu.wheels check "$wheels" || failed+=(wheels)
    else
        say "no $wheels folder (scripts/gpu_check.sh --download-wheels makes it): checking the list only"
        "$python" -m tests.gpu.wheels check || failed+=(wheels)
    fi
    bash -n scripts/bench_gpu.sh || failed+=(bench_gpu.sh-syntax)
    "$python" scripts/bench_gpu.py --help >/dev/null || failed+=(bench_gpu.py)
    "$python" -m engine.evaluate.cli ppl --help >/dev/null || failed+=(eval-ppl)
    # every test is collected and skipped with its reason (-rs); a failure to import fails the dry run
    timeout 300 "$python" -m pytest -q -rs -p no:cacheprovider tests/gpu || failed+=(tests/gpu)
else
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        say "error: nvidia-smi not found: this runs on a CUDA GPU host (--dry-run elsewhere)"
        exit 2
    fi
    nvidia-smi
    if compgen -G "$wheels/*.whl" >/dev/null; then
        site="${TMPDIR:-/tmp}/sinkserve-gpu-site"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$wheels"/*.whl
        export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
        say "installed $(find "$wheels" -maxdepth 1 -name '*.whl' | wc -l) wheels into $site"
    fi
    if [[ -d "$wheels/smollm2" ]]; then
        export SINKSERVE_GPU_TOKENIZER="$root/$wheels/smollm2"
    fi
    "$python" - <<'EOF'
import torch, transformers
from engine.model.device import cuda_build, describe, resolve_device

print(f"[gpu_check] torch.version.cuda={torch.version.cuda}; {cuda_build()}; transformers {transformers.__version__}")
print(f"[gpu_check] {describe(resolve_device('cuda'))}")
EOF
    export PYTHONUNBUFFERED=1
    left=$((budget - (SECONDS - started)))
    timeout --signal=INT --kill-after=15 "$((left > 400 ? left - 370 : 30))" \
        "$python" -m pytest -v -rs -p no:cacheprovider --durations=10 tests/gpu || failed+=(tests/gpu)
    bench_flags=()
    if [[ -d "$wheels/smollm2" ]]; then
        model="${TMPDIR:-/tmp}/sinkserve-smollm2-random"
        "$python" scripts/bench_gpu.py --make-random-model "$wheels/smollm2" "$model"
        bench_flags=(--model "$model")
    fi
    # bf16 against float32 over the same stream, the sink cache rolling (on a model of random weights where
    # the 538 MB one cannot be carried: the bf16 path's arithmetic, not the model's quality)
    ppl_out="${SINKSERVE_BENCH_OUT:-docs/results/gpu}/ppl"
    for dtype in bfloat16 float32; do
        timeout --signal=INT --kill-after=10 60 "$python" -m engine.evaluate.cli ppl --tokens 20000 --mode sink \
            --dtype "$dtype" --quantize none --out "$ppl_out/$dtype" "${bench_flags[@]}" || failed+=("ppl-$dtype")
    done
    if [[ -f "$ppl_out/bfloat16/ppl.json" && -f "$ppl_out/float32/ppl.json" ]]; then
        if line="$("$python" scripts/gpu_check_ppl.py "$ppl_out/bfloat16/ppl.json" "$ppl_out/float32/ppl.json")"; then
            summary+=("$line")
        else
            summary+=("$line")
            failed+=(ppl-bf16-vs-float32)
        fi
    fi
    left=$((budget - (SECONDS - started)))
    if ((left < 60)); then
        say "error: only ${left}s left for the benchmarks"
        failed+=(bench_gpu-no-time)
    else
        SINKSERVE_BENCH_TIMEOUT=$((left - 10 < 300 ? left - 10 : 300)) PYTHON="$python" \
            scripts/bench_gpu.sh "${bench_flags[@]}" || failed+=(bench_gpu.sh)
    fi
fi

for line in "${summary[@]}"; do
    say "$line"
done
if [[ "$mode" == run ]]; then
    say "benchmark results (bench api: 1, 8 and 64 streaming clients): ${SINKSERVE_BENCH_OUT:-docs/results/gpu}/"
fi
if ((${#failed[@]})); then
    say "FAILED: ${failed[*]} ($((SECONDS - started)) s)"
    exit 1
fi
say "all passed ($((SECONDS - started)) s)"
