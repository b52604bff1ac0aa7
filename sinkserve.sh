#!/usr/bin/env bash
# sinkserve's front door: sets up the virtual environment (scripts/install.sh, a no-op when nothing
# changed) and runs the server, the tests or the evaluation/benchmark tools from it.
#
#   ./sinkserve.sh serve [ARGS...]   install, then: sinkserve serve --host 127.0.0.1 --port 8000 ARGS...
#   ./sinkserve.sh test [ARGS...]    install with the test extras, then: python -m pytest -q ARGS...
#   ./sinkserve.sh eval [ARGS...]    install, then: sinkserve eval ARGS...
#   ./sinkserve.sh bench [ARGS...]   install with the bench extras, then: sinkserve bench ARGS...
#   ./sinkserve.sh cluster [ARGS...] install, then: scripts/cluster.sh ARGS... (redis-server, N replicas
#                                    and HAProxy on 127.0.0.1:8000; see scripts/cluster.sh --help)
#   ./sinkserve.sh install [OPTS...] only run scripts/install.sh OPTS... (see scripts/install.sh --help)
#
# Later --host/--port given to serve win over the defaults. The environment variables of
# scripts/install.sh apply (SINKSERVE_VENV, SINKSERVE_TORCH, SINKSERVE_EXTRAS, ...).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
venv="${SINKSERVE_VENV:-$root/.venv}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
export SINKSERVE_VENV="$venv"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    serve)
        scripts/install.sh
        exec "$venv/bin/sinkserve" serve "$@"  # 127.0.0.1:8000 unless SINKSERVE_HOST/PORT or flags say otherwise
        ;;
    test)
        scripts/install.sh --extras test
        exec "$venv/bin/python" -m pytest -q "$@"
        ;;
    eval)
        scripts/install.sh
        exec "$venv/bin/sinkserve" eval "$@"
        ;;
    bench)
        scripts/install.sh --extras bench
        exec "$venv/bin/sinkserve" bench "$@"
        ;;
    cluster)
        scripts/install.sh
        exec scripts/cluster.sh "$@"
        ;;
    install)
        exec scripts/install.sh "$@"
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
