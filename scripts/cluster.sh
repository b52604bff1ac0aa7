#!/usr/bin/env bash
# A native sinkserve cluster on one host: redis-server (the shared session index), N `sinkserve serve`
# replicas on loopback ports sharing one data directory, and HAProxy (docker/haproxy.cfg) in front.
#
#   scripts/cluster.sh [--replicas N] [--port P] [OPTIONS] [-- SERVE_ARGS...]
#   ./sinkserve.sh cluster ...        the same, after setting up .venv
#
#   --replicas N        replicas (default 2)
#   --port P            HAProxy listens on 127.0.0.1:P (default 8000); replicas on P+1..P+N
#   --replica-base B    first replica port (default P+1)
#   --redis-port R      redis-server port (default P+100)
#   --data-dir DIR      shared session directory (default: sessions/ in the state directory)
#   --state-dir DIR     logs, generated haproxy.cfg, redis files, pid files (default: a new temp dir,
#                       removed on a clean exit, kept after an error)
#   --serve-cmd CMD     command that runs one replica (default: "$SINKSERVE_VENV/bin/sinkserve serve");
#                       it gets --host 127.0.0.1 --port PORT --data-dir DIR SERVE_ARGS...
#   --no-restart        do not restart a replica that exits (default: restarted after 1 s, like compose's
#                       restart policy, unless STATE_DIR/<replica>.down exists)
#
# Each replica's environment carries SINKSERVE_SESSION_STORE=redis://127.0.0.1:R/0 and
# SINKSERVE_REPLICA=<name> (replica1..replicaN, also its HAProxy server name), the settings the server
# reads for the shared store. Prints "cluster: ready: ..." once every replica is healthy and HAProxy
# listens; Ctrl-C or SIGTERM stops everything. haproxy and redis-server are installed with apt-get when
# missing (as root, or with password-less sudo), else the script stops with a message saying so.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SINKSERVE_VENV:-$root/.venv}"

replicas=2
port=8000
replica_base=""
redis_port=""
data_dir=""
state_dir=""
serve_cmd="$venv/bin/sinkserve serve"
restart=1
serve_args=()

failed=0
die() { echo "cluster: error: $*" >&2; failed=1; exit 1; }
say() { echo "cluster: $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --replicas) replicas="${2:?}"; shift 2 ;;
        --port) port="${2:?}"; shift 2 ;;
        --replica-base) replica_base="${2:?}"; shift 2 ;;
        --redis-port) redis_port="${2:?}"; shift 2 ;;
        --data-dir) data_dir="${2:?}"; shift 2 ;;
        --state-dir) state_dir="${2:?}"; shift 2 ;;
        --serve-cmd) serve_cmd="${2:?}"; shift 2 ;;
        --no-restart) restart=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; serve_args=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ "$replicas" =~ ^[1-9][0-9]*$ ]] || die "--replicas must be a positive integer"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number"
replica_base="${replica_base:-$((port + 1))}"
redis_port="${redis_port:-$((port + 100))}"

# ----- system packages ---------------------------------------------------------------------------------
install_missing() {
    local missing=()
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v redis-server >/dev/null || missing+=(redis-server)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            die "${missing[*]} not installed and not root: run 'sudo apt-get install -y ${missing[*]}'"
        fi
    fi
    command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get: install them with your package manager"
    say "installing ${missing[*]} with apt-get"
    "${sudo[@]}" apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}
install_missing

# ----- state ---------------------------------------------------------------------------------------------
own_state=0
if [[ -z "$state_dir" ]]; then
    state_dir="$(mktemp -d "${TMPDIR:-/tmp}/sinkserve-cluster.XXXXXX")"
    own_state=1
fi
mkdir -p "$state_dir"
data_dir="${data_dir:-$state_dir/sessions}"
mkdir -p "$data_dir"
read -r -a serve_words <<<"$serve_cmd"

declare -A pids=()  # process name -> pid
stopping=0

stop_all() {
    stopping=1
    trap - INT TERM EXIT
    # The router first (no new requests), then the replicas (they save their sessions), Redis last.
    local group name
    for group in haproxy replica redis; do
        for name in "${!pids[@]}"; do
            [[ "$name" == "$group"* ]] && kill -TERM "${pids[$name]}" 2>/dev/null || true
        done
        for name in "${!pids[@]}"; do
            [[ "$name" == "$group"* ]] && { wait "${pids[$name]}" 2>/dev/null || true; }
        done
    done
    if [[ $own_state -eq 1 && $failed -eq 0 ]]; then
        rm -rf "$state_dir"
    fi
    say "stopped"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

http_ok() {  # http_ok PORT: GET /health answers 200
    local line=""
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    IFS= read -r -t 5 line <&3 || true
    exec 3<&- 3>&-
    [[ "$line" == *" 200"* ]]
}

wait_healthy() {  # wait_healthy NAME PORT SECONDS
    local deadline=$((SECONDS + $3))
    until http_ok "$2"; do
        kill -0 "${pids[$1]}" 2>/dev/null || die "$1 exited while starting (log: $state_dir/$1.log)"
        ((SECONDS < deadline)) || die "$1 not healthy after $3 s (log: $state_dir/$1.log)"
        sleep 0.2
    done
}

start_replica() {  # start_replica INDEX
    local name="replica$1" rport=$((replica_base + $1 - 1))
    SINKSERVE_SESSION_STORE="redis://127.0.0.1:$redis_port/0" SINKSERVE_REPLICA="$name" \
        "${serve_words[@]}" --host 127.0.0.1 --port "$rport" --data-dir "$data_dir" "${serve_args[@]}" \
        >>"$state_dir/$name.log" 2>&1 &
    pids[$name]=$!
    echo "${pids[$name]}" >"$state_dir/$name.pid"
}

# ----- redis ---------------------------------------------------------------------------------------------
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$state_dir" --save "" --appendonly no \
    --loglevel warning >"$state_dir/redis.log" 2>&1 &
pids[redis]=$!
redis_ok() {
    local line=""
    { exec 4<>"/dev/tcp/127.0.0.1/$redis_port"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&4
    IFS= read -r -t 2 line <&4 || true
    exec 4<&- 4>&-
    [[ "$line" == "+PONG"* ]]
}
deadline=$((SECONDS + 30))
until redis_ok; do
    kill -0 "${pids[redis]}" 2>/dev/null || die "redis-server exited (port $redis_port in use? log: $state_dir/redis.log)"
    ((SECONDS < deadline)) || die "redis-server not answering on port $redis_port"
    sleep 0.1
done

# ----- replicas ------------------------------------------------------------------------------------------
for ((i = 1; i <= replicas; i++)); do
    start_replica "$i"
done
for ((i = 1; i <= replicas; i++)); do
    wait_healthy "replica$i" $((replica_base + i - 1)) 900
done

# ----- haproxy -------------------------------------------------------------------------------------------
servers=""
for ((i = 1; i <= replicas; i++)); do
    servers+="    server replica$i 127.0.0.1:$((replica_base + i - 1)) check"$'\n'
done
awk -v servers="$servers" '/# SERVERS/ { printf "%s", servers; getline; next } { print }' \
    "$root/docker/haproxy.cfg" >"$state_dir/haproxy.cfg"
export SINKSERVE_ROUTER_BIND="127.0.0.1:$port"
haproxy -c -q -f "$state_dir/haproxy.cfg" || die "generated $state_dir/haproxy.cfg is invalid"
haproxy -W -db -f "$state_dir/haproxy.cfg" >"$state_dir/haproxy.log" 2>&1 &
pids[haproxy]=$!
deadline=$((SECONDS + 30))
until http_ok "$port"; do
    kill -0 "${pids[haproxy]}" 2>/dev/null || die "haproxy exited (log: $state_dir/haproxy.log)"
    ((SECONDS < deadline)) || die "haproxy not answering on port $port"
    sleep 0.2
done

say "ready: http://127.0.0.1:$port ($replicas replicas on ports $replica_base..$((replica_base + replicas - 1)), redis 127.0.0.1:$redis_port, data $data_dir, logs $state_dir)"

# ----- supervise -----------------------------------------------------------------------------------------
redis_down=0
while [[ $stopping -eq 0 ]]; do
    kill -0 "${pids[haproxy]}" 2>/dev/null || die "haproxy exited (log: $state_dir/haproxy.log)"
    if [[ $redis_down -eq 0 ]] && ! kill -0 "${pids[redis]}" 2>/dev/null; then
        redis_down=1
        say "redis-server is down: replicas serve their local sessions"
    fi
    for ((i = 1; i <= replicas; i++)); do
        name="replica$i"
        if ! kill -0 "${pids[$name]}" 2>/dev/null && [[ $restart -eq 1 && ! -e "$state_dir/$name.down" ]]; then
            wait "${pids[$name]}" 2>/dev/null || true
            say "$name exited; restarting it"
            start_replica "$i"
        fi
    done
    sleep 1 &
    wait $! || true
done
