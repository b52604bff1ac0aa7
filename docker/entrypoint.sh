#!/usr/bin/env bash
# Container entry point: runs the sinkserve CLI. `serve` listens on all interfaces of the container
# (SINKSERVE_HOST, default 0.0.0.0) and on SINKSERVE_PORT (default 8000); later --host/--port win.
#   docker run IMAGE                     -> sinkserve serve --host 0.0.0.0 --port 8000
#   docker run IMAGE serve --window 2044 -> the same plus the given options
#   docker run IMAGE eval ...            -> sinkserve eval ...
#   docker run IMAGE --window 2044       -> options alone mean serve
set -euo pipefail

export SINKSERVE_HOST="${SINKSERVE_HOST:-0.0.0.0}"
export SINKSERVE_PORT="${SINKSERVE_PORT:-8000}"

if [[ $# -eq 0 || "$1" == -* ]]; then
    set -- serve "$@"
fi
if [[ "$1" == serve ]]; then
    shift
    exec sinkserve serve --host "$SINKSERVE_HOST" --port "$SINKSERVE_PORT" "$@"
fi
exec sinkserve "$@"
