#!/usr/bin/env bash
# Side-by-side readiness and watchdog benchmark (issue 13): keepup-agent against systemd, each
# supervising one `food` with sd_notify readiness (keepup `ready: notify`, systemd
# `Type=notify`) and a watchdog (keepup `watchdog: 1s`, systemd `WatchdogSec=1`), in one run.
#
#   bash tests/bench/readiness.sh               # 30 cycles each (~3 minutes)
#   CYCLES=10 bash tests/bench/readiness.sh     # quick
#
# systemd is not PID 1 on a build machine, so it runs as PID 1 in a Debian 12 container of
# the image the container tests use (tests/src/systemd.rs; built with debootstrap on first
# use, no registry); keepup-agent runs on the host. One kernel, so one CLOCK_MONOTONIC for
# every stamp. A cycle, alternating between the two supervisors:
#   1. food starts and sends READY=1 (food --notify-log stamps it just before the send);
#      measured: READY=1 -> the supervisor has it running. keepup: the helper, blocked in
#      inotify on the service log, reads the agent's `ready (READY=1)` line (the line is
#      written when the state becomes `running`; `status` derives the state from the same
#      moment). systemd: the unit's ActiveEnterTimestampMonotonic (`active`).
#   2. after 1.2 s the helper creates food's watchdog stop file: the pings stop; measured:
#      the last WATCHDOG=1 + the watchdog (the missed deadline) -> food's next `start` stamp
#      (the restart's exec). systemd: WatchdogSignal=SIGTERM (the signal keepup sends;
#      the default SIGABRT would also dump core) and RestartSec=0 (keepup respawns a run that
#      lasted >= 1 s at once; systemd's default RestartSec=100ms would add 100 ms).
#
# Environment:
#   CYCLES      cycles per supervisor (default 30), after one uncounted warm-up cycle
#   PORT        food's banner port on the host (default 27471; http on PORT+1)
#   STRICT=1    exit 1 if keepup's median is above systemd's on either measure
#   KEEP=1      keep the temporary directory (logs, stamps, results.json)
#   JSON=1      print the results as JSON instead of the table
# Needs root, Docker and debootstrap (tests/ensure-packages.sh installs it). The container is
# labelled org.keepup.bench=1, named keepup-readiness-bench-<pid>, and removed at the end; the
# role user `benchready` is created for the run and removed again. Method and results:
# docs/benchmarks.md, "Readiness and watchdog (issue 13)".
set -euo pipefail

CYCLES=${CYCLES:-30}
PORT=${PORT:-27471}
STRICT=${STRICT:-0}
KEEP=${KEEP:-0}
JSON=${JSON:-0}
WATCHDOG_MS=1000
for v in CYCLES PORT; do
    case ${!v} in '' | *[!0-9]* | 0) echo "$v must be a positive integer" >&2; exit 2 ;; esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HELPER="$ROOT/tests/bench/readiness/bench.py"
log() { printf '[readiness-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (a role user, setpriv, role kills)"
command -v docker >/dev/null || die "docker CLI not found: install Docker (apt-get install docker.io) and start it"
docker info >/dev/null 2>&1 || die "the Docker daemon is not running (or not reachable): start it"
command -v python3 >/dev/null || die "python3 not found: apt-get install python3"
[ -x /usr/bin/setpriv ] || die "setpriv not found: apt-get install util-linux"
if ss -Hltn 2>/dev/null | awk '{print $4}' | grep -Eq ":($PORT|$((PORT + 1)))\$"; then
    die "port $PORT or $((PORT + 1)) is in use; pick another PORT"
fi

log "building keepup-agent (--profile agent) and food"
(cd "$ROOT" && cargo build --profile agent -q -p keepup-agent && cargo build -q -p keepup-tests --bin food) ||
    die "cargo build failed"
IMAGE=$(bash "$ROOT/tests/bench/readiness/systemd-image.sh") || die "no systemd image"

T=$(mktemp -d "${TMPDIR:-/tmp}/keepup-readiness-bench.XXXXXX")
chmod 711 "$T"
mkdir -p "$T/bin" "$T/keepup" "$T/keepup/services" "$T/keepup/state" "$T/keepup/log" "$T/systemd" "$T/food"
# keepup's food writes its stamps as the role (the agent keeps its socket's directory, $T/keepup,
# to itself); systemd's runs as root in the container.
chmod 777 "$T/food"
cp "$ROOT/target/agent/keepup-agent" "$ROOT/target/debug/food" "$T/bin/"
chmod 755 "$T/bin"/*
CTR="keepup-readiness-bench-$$"
AGENT_PID="" CTR_ID="" MADE_USER=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    [ -z "$CTR_ID" ] || docker rm -f "$CTR_ID" >/dev/null 2>&1 || log "could not remove container $CTR_ID"
    if [ "$MADE_USER" = 1 ]; then
        pkill -KILL -u benchready 2>/dev/null || true
        sleep 0.2
        userdel benchready 2>/dev/null || log "could not remove user benchready"
    fi
    if [ "$KEEP" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- systemd, PID 1 in a container ------------------------------------------------------
log "starting systemd in a container of $IMAGE"
CTR_ID=$(docker run -d --name "$CTR" --network none --label org.keepup.bench=1 \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
    -v "$T/systemd:/bench" -v "$T/bin/food:/usr/local/bin/food:ro" "$IMAGE")
for ((i = 0; i < 200; i++)); do
    state=$(docker exec "$CTR_ID" systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.3
done
case $state in running | degraded) ;; *) die "systemd in the container did not boot (state: $state)" ;; esac
docker exec -i "$CTR_ID" sh -c 'cat >/etc/systemd/system/benchready.service' <<EOF
[Unit]
Description=readiness bench food

[Service]
Type=notify
ExecStart=/usr/local/bin/food --bind 127.0.0.1 --banner-port 7070 --http-port 7071 --notify-log /bench/notify.log --watchdog-stop-file /bench/stop-watchdog
WatchdogSec=1
WatchdogSignal=SIGTERM
Restart=always
RestartSec=0
StartLimitIntervalSec=0
StandardOutput=null
EOF
docker exec "$CTR_ID" systemctl daemon-reload
docker exec "$CTR_ID" systemctl start benchready.service || die "benchready.service did not start in the container"

# ---- keepup-agent, on the host ------------------------------------------------------------
if ! id -u benchready >/dev/null 2>&1; then
    useradd --system --comment "benchready service (keepup)" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin benchready
    MADE_USER=1
fi
pgrep -u benchready >/dev/null 2>&1 && die "processes of role benchready are already running"
cat >"$T/keepup/run-benchready" <<EOF
#!/bin/sh
exec /usr/bin/setpriv --reuid=benchready --regid=benchready --init-groups -- $T/bin/food --bind 127.0.0.1 --banner-port $PORT --http-port $((PORT + 1)) --notify-log $T/food/notify.log --watchdog-stop-file $T/food/stop-watchdog
EOF
chmod 755 "$T/keepup/run-benchready"
cat >"$T/keepup/agent.yaml" <<EOF
manifest_dir: $T/keepup/services
state_dir: $T/keepup/state
log_dir: $T/keepup/log
socket: $T/keepup/agent.sock
EOF
cat >"$T/keepup/services/benchready.yaml" <<EOF
format: 1
name: benchready
version: 1.0.0-1
role: benchready
launch: $T/keepup/run-benchready
supervisor:
  kind: agent
  count: 1000
  within: 1m
  stop_grace: 5s
  ready: notify
  watchdog: 1s
checks: []
EOF
log "starting keepup-agent"
"$T/bin/keepup-agent" run --config "$T/keepup/agent.yaml" </dev/null 2>>"$T/keepup/agent.stderr" &
AGENT_PID=$!
for ((i = 0; i < 100; i++)); do
    [ -s "$T/food/notify.log" ] && [ -s "$T/keepup/log/benchready.log" ] && break
    sleep 0.1
done
[ -s "$T/food/notify.log" ] || die "food did not start under keepup-agent: $(tail -5 "$T/keepup/agent.stderr" "$T"/keepup/log/*.log 2>/dev/null)"

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $LOAD_BEFORE ($(nproc) cores); $CYCLES cycles each"
python3 "$HELPER" run "$T/results.json" "$CYCLES" "$T/food" "$T/keepup/log/benchready.log" \
    "$CTR_ID" "$T/systemd" benchready.service "$WATCHDOG_MS"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
status=$("$T/bin/keepup-agent" --config "$T/keepup/agent.yaml" status --json 2>/dev/null || true)
kills=$(grep -c 'keepup-agent: no WATCHDOG=1' "$T/keepup/log/benchready.log" || true)

if [ "$JSON" = 1 ]; then
    python3 "$HELPER" report "$T/results.json" --json
else
    echo "load average before: $LOAD_BEFORE, after: $LOAD_AFTER ($(nproc) cores); systemd $(docker exec "$CTR_ID" systemctl --version | head -1 | cut -d' ' -f2)"
    echo "keepup-agent watchdog kills logged: $kills; status: $(python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin)["services"] if x["name"]=="benchready"][0]; print(s["state"], "ready_secs", s.get("ready_secs"))' <<<"$status" 2>/dev/null || echo unknown)"
    python3 "$HELPER" report "$T/results.json"
fi
if [ "$STRICT" = 1 ]; then
    python3 - "$T/results.json" <<'EOF' || exit 1
import json, statistics, sys
r = json.load(open(sys.argv[1]))
bad = [k for k in ("ready_ms", "restart_ms")
       if statistics.median(r["keepup"][k]) > statistics.median(r["systemd"][k])]
if bad:
    sys.exit(f"MISS: keepup's median is above systemd's for {', '.join(bad)}")
EOF
fi
