# Shared by report.sh and rollout.sh (sourced): release builds of `keepup` and `reportload`
# (K, LOAD), a temporary directory removed on exit (tmp), one `keepup serve` at a time (pid,
# stop_server), a free loopback port (port, url) and waiting until something listens on it.
# A script may define on_exit, which runs on exit before the temporary directory goes.
# NO_BUILD=1: use the release binaries already built.
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p keepup-deploy --bin keepup -p keepup-tests --bin reportload
K=${CARGO_TARGET_DIR:-$PWD/target}/release/keepup
LOAD=${CARGO_TARGET_DIR:-$PWD/target}/release/reportload

tmp=$(mktemp -d)
pid=""
stop_server() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=""
    fi
}
cleanup() {
    stop_server
    if declare -F on_exit >/dev/null; then on_exit; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
wait_listening() {
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $port" >&2
    exit 1
}
