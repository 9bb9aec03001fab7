#!/usr/bin/env bash
# The rollout gate at fleet scale (docs/benchmarks.md, "Rollout gate (issue 12)"): HOSTS
# registered hosts post realistic reports (tests/src/bin/reportload.rs) to `keepup serve
# --state`, side by side in one run:
#   1. with no rollout in the track's index (the gate has nothing to do);
#   2. with a rollout of foo in waves (`host-000001,5%,50%,100%`): the gate judges every host
#      after each batch of reports and every second.
# Prints both ingestion rates and their ratio (target: the gate adds under 10%), the gate
# thread's CPU time per tick and per report, and how long after a canary's failing report the
# signed progress says `halted` (what an agent's next pass then reads).
#
#   bash tests/bench/rollout.sh                   # 100,000 hosts, 2 rounds
#   HOSTS=10000 ROUNDS=1 bash tests/bench/rollout.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

HOSTS=${HOSTS:-100000}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-32}

. tests/bench/fleetload.sh

R=$tmp/repo
"$K" repo init "$R" --key-dir "$tmp/keys" >/dev/null 2>&1
"$K" assign --repo "$R" '*' --track stable >/dev/null 2>&1
# Makes the rollout key (.keepup/rollout-key.asc), which the gate signs progress with.
"$K" rollout defaults --repo "$R" --track stable --waves 100% >/dev/null
pubkey=$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' "$R/.keepup/rollout-key.pub.asc")
entry() { # name version
    printf '{"name":"%s","version":"%s","arch":"amd64","format":"deb","path":"pool/%s_%s.deb","size":1,"sha256":"00"}' "$1" "$2" "$1" "$2"
}
packages="[$(entry foo 2.0-1),$(entry bar 2.1-1),$(entry baz 1.0-1)]"
# The track's index as the server reads it: without, then with a rollout of foo.
printf '{"track":"stable","serial":42,"generated":0,"packages":%s}\n' "$packages" >"$tmp/plain.json"
now=$(date +%s)
printf '{"track":"stable","serial":43,"generated":0,"packages":%s,"rollouts":[{"id":"stable/foo/2.0-1","name":"foo","to":"2.0-1","from":[%s],"rollback":[],"rules":{"waves":["host-000001","5%%","50%%","100%%"],"soak":3600,"max_failed":"0","on_failure":"halt"},"started":%s}],"rollout_key":%s}\n' \
    "$packages" "$(entry foo 1.2-1)" "$now" "$pubkey" >"$tmp/rollout.json"

# One fresh database per mode: a database that already holds the first run's reports and
# events ingests more slowly, which would be charged to the gate.
for mode in plain rollout; do
    seq -f "host-%06g" 1 "$HOSTS" | "$K" host add --bulk --state "$tmp/$mode.db" >"$tmp/$mode.tokens" 2>/dev/null
done

start_server() { # mode
    "$K" serve --repo "$R" --listen "127.0.0.1:$port" --state "$tmp/$1.db" 2>>"$tmp/serve.log" &
    pid=$!
    wait_listening
}
gate_ticks() { # the gate thread's CPU time in clock ticks
    local t
    for t in /proc/"$pid"/task/*; do
        if [ "$(cat "$t/comm")" = rollout-gate ]; then
            awk '{print $14 + $15}' "$t/stat"
        fi
    done
}
rate() { sed -n 's/^total: .*: \([0-9]*\) reports\/s$/\1/p' "$1"; }

for mode in plain rollout; do
    mkdir -p "$R/tracks/stable"
    cp "$tmp/$mode.json" "$R/tracks/stable/index.json"
    start_server "$mode"
    echo "== $mode: $HOSTS hosts x $ROUNDS rounds"
    g0=$(gate_ticks)
    s0=$(date +%s.%N)
    "$LOAD" --server "$url" --tokens "$tmp/$mode.tokens" --connections "$CONNECTIONS" --rounds "$ROUNDS" | tee "$tmp/$mode.out"
    s1=$(date +%s.%N)
    g1=$(gate_ticks)
    secs=$(echo "$s1 - $s0" | bc)
    ms=$(((g1 - g0) * 10))
    reports=$((HOSTS * ROUNDS))
    echo "gate thread: $ms ms CPU over $(printf '%.1f' "$secs") s of load ($(echo "scale=1; $ms / $secs" | bc) ms CPU per second of load, $(echo "scale=2; $ms * 1000 / $reports" | bc) us per report)"
    [ "$mode" = plain ] && stop_server
done

# Halt latency: the canary reports a failed start of the new version.
canary_token=$(head -1 "$tmp/rollout.tokens" | awk '{print $NF}')
progress() { sed -n 's/.*"phase": "\([a-z-]*\)".*/\1/p' "$R/tracks/stable/rollout.json.asc" 2>/dev/null | head -1; }
t0=$(date +%s.%N)
curl -sf -o /dev/null -H "Authorization: Bearer $canary_token" -H 'Content-Type: application/json' \
    --data "{\"host\":\"host-000001\",\"sent_at\":$(date +%s),\"track\":\"stable\",\"format\":\"deb\",\"arch\":\"amd64\",\"installed\":{\"foo\":\"2.0-1\"},\"services\":[{\"name\":\"foo\",\"version\":\"2.0-1\",\"state\":\"backoff\",\"start\":{\"version\":\"2.0-1\",\"started\":false,\"detail\":\"bench\"}}]}" \
    "$url/api/v1/report"
until [ "$(progress)" = halted ]; do
    sleep 0.01
    if [ "$(echo "$(date +%s.%N) - $t0 > 10" | bc)" = 1 ]; then
        echo "no halt within 10 s" >&2
        tail "$tmp/serve.log" >&2
        exit 1
    fi
done
echo "halt signed $(echo "($(date +%s.%N) - $t0) * 1000 / 1" | bc) ms after the failing report was accepted"
plain=$(rate "$tmp/plain.out")
with=$(rate "$tmp/rollout.out")
echo "ingestion: without a rollout $plain reports/s, with one $with reports/s: with/without = $(echo "scale=2; $with / $plain" | bc) (target: >= 0.90)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
