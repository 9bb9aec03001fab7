#!/usr/bin/env bash
# A herd of agents reconnecting at once (issue 14; docs/benchmarks.md, "Herds"): HOSTS agents
# (default 100,000) each post one report on a connection of their own, all starting within
# WINDOW_MS (default 1,000 ms), against `keepup serve --state` on loopback (release build,
# SQLite). tests/src/bin/herdload.rs plays the agents: it honours `Retry-After` as
# keepup-agent does. In the same run, on a fresh server and database, the same herd comes back
# after a fixed 1 s whatever the server asks (what every client did when the server always
# answered `Retry-After: 1`), and the script prints both and their ratios: time until every
# report is stored, requests turned away, timeouts.
#
#   bash tests/bench/herd.sh
#   HOSTS=20000 bash tests/bench/herd.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

HOSTS=${HOSTS:-100000}
WINDOW_MS=${WINDOW_MS:-1000}

. tests/bench/fleetload.sh
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p keepup-tests --bin herdload
HERD=${CARGO_TARGET_DIR:-$PWD/target}/release/herdload
ulimit -n "$(ulimit -Hn)"

"$K" repo init "$tmp/repo" >/dev/null 2>&1
seq -f "host-%06g" 1 "$HOSTS" | "$K" host add --bulk --state "$tmp/state.db" >"$tmp/tokens" 2>/dev/null
cp "$tmp/state.db" "$tmp/fresh.db"

run() { # $1: label, then herdload's extra arguments
    local label=$1
    shift
    cp "$tmp/fresh.db" "$tmp/run.db"
    rm -f "$tmp/run.db-wal" "$tmp/run.db-shm"
    "$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$port" --state "$tmp/run.db" 2>"$tmp/serve.log" &
    pid=$!
    wait_listening
    echo "--- $label"
    "$HERD" --server "127.0.0.1:$port" --tokens "$tmp/tokens" --window-ms "$WINDOW_MS" "$@" | tee "$tmp/$label.out"
    grep -E 'VmHWM' "/proc/$pid/status" | sed 's/^/server /'
    stop_server
}
run honour
run fixed --fixed-retry-secs 1

field() { sed -n "$2" "$tmp/$1.out"; }
secs() { field "$1" 's/.*every report stored after \([0-9.]*\) s.*/\1/p'; }
busy() { field "$1" 's/^answers: 503 + Retry-After \([0-9]*\),.*/\1/p'; }
timeouts() { field "$1" 's/.*timed out (> 20 s) \([0-9]*\),.*/\1/p'; }
echo
echo "honouring Retry-After / coming back after 1 s:"
echo "  time until every report is stored: $(secs honour) / $(secs fixed) s = $(echo "scale=2; $(secs honour) / $(secs fixed)" | bc)x"
echo "  requests turned away (503): $(busy honour) / $(busy fixed)$( [ "$(busy fixed)" -gt 0 ] && echo " = $(echo "scale=2; $(busy honour) / $(busy fixed)" | bc)x")"
echo "  posts timed out: $(timeouts honour) / $(timeouts fixed)"
