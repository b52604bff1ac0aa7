#!/usr/bin/env bash
# Container entry point: runs the sinkserve CLI. `serve` listens on all interfaces of the container
# (SINKSERVE_HOST, default 0.0.0.0) and on SINKSERVE_PORT (default 8000); later --host/--port win.
#   docker run IMAGE                     -> sinkserve serve --host 0.0.0.0 --port 8000
#   docker run IMAGE serve --window 2044 -> the same plus the given options
#   docker run IMAGE eval ...            -> sinkserve eval ...
#   docker run IMAGE --window 2044       -> options alone mean serve
#
# Before `serve`, `python -m engine.model.device` logs torch's build (torch.version.cuda) and the GPU. In the CUDA
# image (SINKSERVE_TORCH=cuda) SINKSERVE_REQUIRE_CUDA defaults to 1: without a usable GPU (no --gpus, a
# driver too old for the build's CUDA) the container exits 1 with the reason instead of serving on the CPU.
# SINKSERVE_REQUIRE_CUDA=0 allows the CPU; the CPU image (SINKSERVE_TORCH=cpu) defaults to 0.
set -euo pipefail

export SINKSERVE_HOST="${SINKSERVE_HOST:-0.0.0.0}"
export SINKSERVE_PORT="${SINKSERVE_PORT:-8000}"
if [[ "${SINKSERVE_TORCH:-}" == cuda ]]; then
    export SINKSERVE_REQUIRE_CUDA="${SINKSERVE_REQUIRE_CUDA:-1}"
else
    export SINKSERVE_REQUIRE_CUDA="${SINKSERVE_REQUIRE_CUDA:-0}"
fi

if [[ $# -eq 0 || "$1" == -* ]]; then
    set -- serve "$@"
fi
if [[ "$1" == serve ]]; then
    shift
    # exits 1, with the reason in the log, when CUDA is required and not usable
    python -m engine.model.device
    exec sinkserve serve --host "$SINKSERVE_HOST" --port "$SINKSERVE_PORT" "$@"
fi
exec sinkserve "$@"
