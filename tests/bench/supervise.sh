#!/usr/bin/env bash
# Side-by-side supervision benchmark (issue 2, "Performance"): keepup-agent against runit
# (runsvdir + runsv) and supervisord, each supervising 20 copies of the same small service,
# all three running at the same time in one run.
#
#   bash tests/bench/supervise.sh                  # full run: 200 kills each, 60 s idle windows
#   KILLS=40 IDLE_SECS=10 bash tests/bench/supervise.sh   # quick run (~2.5 minutes)
#
# Measured, per supervisor, over the supervision processes only (keepup-agent; runsvdir + all
# runsv; supervisord), never the services:
#   * RSS and PSS summed from /proc/PID/smaps_rollup (at the end of the idle window);
#   * CPU over an idle window (IDLE_SECS, default 60) in ms per minute: per-thread run time
#     from /proc/PID/task/*/schedstat (ns), polled every 200 ms so that threads which come
#     and go (tokio's blocking pool) are counted, and as a cross-check utime+stime from
#     /proc/PID/stat (10 ms ticks); the three supervisors share one window. keepup-agent is measured again
#     with a tcp probe and then with an exec probe (/bin/true) per service every 10 s;
#   * restart latency: SIGKILL the service (running for >= MIN_RUN_MS) -> next exec of its
#     launch script (the script appends "<pid> <date +%s%N>" before it execs the service);
#     KILLS per supervisor, round-robin over the 20 copies and interleaved across the three
#     supervisors (kills at least PACE_MS apart; a supervisor's next kill waits until its
#     previous restart was seen), so background load falls on all alike.
#   * floor: the same launch script spawned directly (no supervisor): spawn -> stamp.
#   * keepup-agent only: `keepup-agent down` of a fork-loop service (bash `trap "" TERM;
#     while :; do sleep 1000 & done`, up to 200 processes of its role, all ignoring SIGTERM),
#     FORK_DOWNS times: the time `down` takes (stop_grace 1 s, then the kill) and how many
#     processes of the role are left after it (must be 0).
#
# keepup-agent runs in a cgroup of its own when the host has a writable cgroup2 tree with
# cgroup.kill (AGENT_CGROUP=auto, the default; as under systemd with Delegate=yes): it then
# spawns each service into its own cgroup and stops with cgroup.kill. AGENT_CGROUP=0 runs it
# where the script runs (on a host's root cgroup: the freeze-then-kill path). The report
# says which path the agent took.
#
# The service is copy NN's launch script: stamp, then
#   exec setpriv --reuid=<role> --regid=<role> --init-groups -- nc -dlk 127.0.0.1 <port>
# One role user per copy and supervisor (benchk01.., benchr01.., benchs01..; created if
# missing, removed again at the end unless KEEP_USERS=1), since keepup kills by the role's uid.
#
# Environment:
#   KILLS       kills per supervisor (default 200)
#   IDLE_SECS   idle window (default 60)
#   COPIES      services per supervisor (default 20)
#   PACE_MS     minimum gap between two kills (default 100); a supervisor's next kill also
#               waits until its previous kill's restart has been seen
#   MIN_RUN_MS  a copy is killed only after running this long (default 2500; supervisord
#               reaches RUNNING only at its first 1 s poll tick after startsecs=1)
#   BASE_PORT   first service port (default 27301; keepup, runit, supervisord get
#               BASE_PORT, +COPIES, +2*COPIES)
#   STRICT=1    exit 1 if a target is missed (default: report only)
#   KEEP=1      keep the temporary directory (logs, stamps, configs, JSON results)
#   KEEP_USERS=1  keep the role users this run created
#   AGENT_CGROUP  auto (default) or 0, see above
#   FORK_DOWNS  downs of the fork-loop service (default 5)
#
# Everything runs from a temporary directory (manifests, state, socket, logs, runit service
# dirs, supervisord config and socket); nothing under /usr/lib/keepup or /run/keepup is used,
# /etc only gains the role users for the run, and no system-wide runit or supervisord is
# started. Progress goes to stderr, the table
# to stdout. Method and results: docs/benchmarks.md, "Supervision (issue 2)".
set -euo pipefail

KILLS=${KILLS:-200}
IDLE_SECS=${IDLE_SECS:-60}
COPIES=${COPIES:-20}
PACE_MS=${PACE_MS:-100}
MIN_RUN_MS=${MIN_RUN_MS:-2500}
BASE_PORT=${BASE_PORT:-27301}
STRICT=${STRICT:-0}
KEEP=${KEEP:-0}
KEEP_USERS=${KEEP_USERS:-0}
SETTLE_SECS=${SETTLE_SECS:-5}
AGENT_CGROUP=${AGENT_CGROUP:-auto}
FORK_DOWNS=${FORK_DOWNS:-5}

for v in KILLS IDLE_SECS COPIES PACE_MS MIN_RUN_MS BASE_PORT FORK_DOWNS; do
    case ${!v} in '' | *[!0-9]* | 0) echo "$v must be a positive integer" >&2; exit 2 ;; esac
done
[ "$COPIES" -le 99 ] || { echo "COPIES must be at most 99" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HELPER="$ROOT/tests/bench/supervise/bench.py"
log() { printf '[supervise-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (role users, setpriv, role kills)"

# ---------------------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------------------
need_apt=()
command -v runsvdir >/dev/null || need_apt+=(runit)
command -v supervisord >/dev/null || need_apt+=(supervisor)
[ -x /usr/bin/time ] || need_apt+=(time)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
[ -x /bin/nc.openbsd ] || need_apt+=(netcat-openbsd)
[ -x /usr/bin/setpriv ] || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing apt packages: ${need_apt[*]}"
    # Debian's packages would start a system-wide runsvdir / supervisord; a policy-rc.d that
    # says 101 keeps invoke-rc.d from starting anything (there is no systemd here).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
fi
# The helper should not share its interpreter binary with supervisord (/usr/bin/python3),
# or supervisord's PSS would be understated while it samples: prefer another python3 on PATH.
PY=/usr/bin/python3
if other=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null) &&
    [ -x "$other" ] && [ "$other" != "$(readlink -f /usr/bin/python3)" ]; then
    PY=$other
fi
SETPRIV=/usr/bin/setpriv
NC=/bin/nc.openbsd

log "building keepup-agent (release)"
(cd "$ROOT" && cargo build --profile agent -q -p keepup-agent) || die "cargo build failed"
AGENT="$ROOT/target/agent/keepup-agent"
[ -x "$AGENT" ] || die "$AGENT missing after the build"

# ---------------------------------------------------------------------------------------
# 2. Scratch directory, cleanup
# ---------------------------------------------------------------------------------------
T=$(mktemp -d "${TMPDIR:-/tmp}/keepup-supervise-bench.XXXXXX")
RES="$T/results"
mkdir -p "$RES" "$T/bin"
# A private copy of the binary: other engineers may rebuild target/release during the run, and
# another process mapping the same file would halve the agent's PSS for its text pages.
cp "$AGENT" "$T/bin/keepup-agent"
AGENT="$T/bin/keepup-agent"
CREATED_USERS=()
AGENT_PID="" AGENT_TIME_PID="" RUNSVDIR_PID="" SUPD_PID=""

# The agent's own cgroup (AGENT_CGROUP=auto): a new cgroup under the first writable cgroup2
# mount, if its cgroups have cgroup.kill.
AGENT_CG=""
if [ "$AGENT_CGROUP" = auto ]; then
    cg2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)
    if [ -n "$cg2" ] && mkdir "$cg2/keepup-supervise-bench.$$" 2>/dev/null; then
        if [ -e "$cg2/keepup-supervise-bench.$$/cgroup.kill" ]; then
            AGENT_CG="$cg2/keepup-supervise-bench.$$"
        else
            rmdir "$cg2/keepup-supervise-bench.$$"
        fi
    fi
fi

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
wait_gone() { # pid secs
    local i
    for ((i = 0; i < $2 * 10; i++)); do alive "$1" || return 0; sleep 0.1; done
    return 1
}

stop_agent() {
    if alive "$AGENT_PID"; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        wait_gone "$AGENT_PID" 20 || { log "keepup-agent did not exit; SIGKILL"; kill -KILL "$AGENT_PID" 2>/dev/null || true; }
    fi
    if [ -n "$AGENT_TIME_PID" ]; then wait "$AGENT_TIME_PID" 2>/dev/null || true; fi
    AGENT_PID="" AGENT_TIME_PID=""
}
remove_agent_cgroup() { # the services' cgroups (the agent removes them when empty), then its own
    [ -n "$AGENT_CG" ] || return 0
    local d
    for d in "$AGENT_CG"/services/* "$AGENT_CG"/services "$AGENT_CG"/agent "$AGENT_CG"; do
        if [ -d "$d" ]; then rmdir "$d" 2>/dev/null || log "could not remove cgroup $d"; fi
    done
}
stop_runit() {
    if alive "$RUNSVDIR_PID"; then
        sv -w 10 force-stop "$T"/runit/service/* >/dev/null 2>&1 || true
        sv exit "$T"/runit/service/* >/dev/null 2>&1 || true
        kill -HUP "$RUNSVDIR_PID" 2>/dev/null || true
        wait_gone "$RUNSVDIR_PID" 10 || kill -KILL "$RUNSVDIR_PID" 2>/dev/null || true
        wait "$RUNSVDIR_PID" 2>/dev/null || true
    fi
    RUNSVDIR_PID=""
}
stop_supervisord() {
    if alive "$SUPD_PID"; then
        kill -TERM "$SUPD_PID" 2>/dev/null || true
        wait_gone "$SUPD_PID" 20 || kill -KILL "$SUPD_PID" 2>/dev/null || true
        wait "$SUPD_PID" 2>/dev/null || true
    fi
    SUPD_PID=""
}
# Whatever still runs as one of this run's role users (or is a runsv of this run) is ours:
# kill it by pid.
kill_leftovers() {
    local uids=() u p
    for u in "${ROLES[@]}"; do uids+=("$(id -u "$u" 2>/dev/null || true)"); done
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        u=$(awk '/^Uid:/ {print $2; exit}' "/proc/$p/status" 2>/dev/null) || continue
        for x in "${uids[@]}"; do
            if [ -n "$x" ] && [ "$u" = "$x" ]; then kill -KILL "$p" 2>/dev/null || true; fi
        done
        if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = runsv ]; then
            case $(readlink "/proc/$p/cwd" 2>/dev/null) in "$T"/*) kill -KILL "$p" 2>/dev/null || true ;; esac
        fi
    done
}
ROLES=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_agent
    stop_runit
    stop_supervisord
    [ ${#ROLES[@]} -eq 0 ] || kill_leftovers
    remove_agent_cgroup
    if [ "$KEEP_USERS" != 1 ] && [ ${#CREATED_USERS[@]} -gt 0 ]; then
        sleep 0.5
        for u in "${CREATED_USERS[@]}"; do userdel "$u" 2>/dev/null || log "could not remove user $u"; done
    fi
    if [ "$KEEP" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# 3. Roles, ports, launch scripts
# ---------------------------------------------------------------------------------------
SUPS=(keepup runit supervisord)
declare -A LETTER=([keepup]=k [runit]=r [supervisord]=s)
declare -A PORT0=([keepup]=$BASE_PORT [runit]=$((BASE_PORT + COPIES)) [supervisord]=$((BASE_PORT + 2 * COPIES)))

listening=$(ss -Hltn 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u)
for ((p = BASE_PORT; p < BASE_PORT + 3 * COPIES; p++)); do
    if grep -qx "$p" <<<"$listening"; then die "port $p is in use; pick another BASE_PORT"; fi
done

for sup in "${SUPS[@]}"; do
    for ((i = 1; i <= COPIES; i++)); do
        n=$(printf %02d "$i")
        ROLES+=("bench${LETTER[$sup]}$n")
    done
done
ROLES+=(benchkfork)
for u in "${ROLES[@]}"; do
    if ! id -u "$u" >/dev/null 2>&1; then
        # keepup's roles carry the mark keepup-agent checks (docs/agent.md, "A role is an
        # account keepup owns"): the GECOS of an account keepup made for that service.
        mark=()
        case "$u" in
            benchkfork) mark=(--comment "benchfork service (keepup)") ;;
            benchk*) mark=(--comment "bench${u#benchk} service (keepup)") ;;
        esac
        useradd --system "${mark[@]}" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$u"
        CREATED_USERS+=("$u")
    fi
done
[ ${#CREATED_USERS[@]} -eq 0 ] || log "created ${#CREATED_USERS[@]} role users (bench[krs]01..$(printf %02d "$COPIES"), benchkfork)"
# Nothing may run as these roles yet (keepup would kill it, and it would skew the numbers).
for u in "${ROLES[@]}"; do
    if pgrep -u "$u" >/dev/null 2>&1; then die "processes of role $u are already running"; fi
done

# launch_script PATH STAMPFILE ROLE PORT
launch_script() {
    cat >"$1" <<EOF
#!/bin/sh
# supervise bench service: stamp this exec, then become the service (as the role)
echo "\$\$ \$(date +%s%N)" >>$2
exec $SETPRIV --reuid=$3 --regid=$3 --init-groups -- $NC -dlk 127.0.0.1 $4
EOF
    chmod 755 "$1"
}
for sup in "${SUPS[@]}"; do
    mkdir -p "$T/$sup/launch" "$T/$sup/stamps"
    for ((i = 1; i <= COPIES; i++)); do
        n=$(printf %02d "$i")
        launch_script "$T/$sup/launch/run-bench$n" "$T/$sup/stamps/$n" \
            "bench${LETTER[$sup]}$n" "$((PORT0[$sup] + i - 1))"
    done
done

# keepup: agent config and manifests (format 1). count is raised from the default 10/1m:
# a copy is killed every ~6 s here, which is no crash loop but would be >10 starts a minute.
mkdir -p "$T/keepup/services" "$T/keepup/state" "$T/keepup/log"
cat >"$T/keepup/agent.yaml" <<EOF
manifest_dir: $T/keepup/services
state_dir: $T/keepup/state
log_dir: $T/keepup/log
socket: $T/keepup/agent.sock
EOF
write_manifests() { # none|tcp|exec
    local i n port
    for ((i = 1; i <= COPIES; i++)); do
        n=$(printf %02d "$i")
        port=$((PORT0[keepup] + i - 1))
        {
            cat <<EOF
format: 1
name: bench$n
version: 1.0.0-1
role: benchk$n
launch: $T/keepup/launch/run-bench$n
supervisor:
  kind: agent
  count: 100
  within: 1m
  stop_grace: 5s
EOF
            case $1 in
                none) echo "checks: []" ;;
                tcp) printf 'checks:\n  - name: port\n    probe: {tcp: {host: 127.0.0.1, port: %s}}\n    every: 10s\n    timeout: 2s\n    failures: 3\n    grace: 2s\n' "$port" ;;
                exec) printf 'checks:\n  - name: exec-true\n    probe: {exec: {argv: [/bin/true]}}\n    every: 10s\n    timeout: 2s\n    failures: 3\n    grace: 2s\n' ;;
            esac
        } >"$T/keepup/services/bench$n.yaml"
    done
}

# runit: one service dir per copy, ./run is the launch script.
mkdir -p "$T/runit/service"
for ((i = 1; i <= COPIES; i++)); do
    n=$(printf %02d "$i")
    mkdir -p "$T/runit/service/bench$n"
    ln -s "$T/runit/launch/run-bench$n" "$T/runit/service/bench$n/run"
done

# supervisord: one config, one [program:x] per copy.
mkdir -p "$T/supervisord/log"
{
    cat <<EOF
[unix_http_server]
file=$T/supervisord/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile=$T/supervisord/supervisord.log
pidfile=$T/supervisord/supervisord.pid
childlogdir=$T/supervisord/log

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://$T/supervisord/supervisor.sock
EOF
    for ((i = 1; i <= COPIES; i++)); do
        n=$(printf %02d "$i")
        printf '\n[program:bench%s]\ncommand=%s\nautostart=true\nautorestart=true\nstartsecs=1\n' \
            "$n" "$T/supervisord/launch/run-bench$n"
    done
} >"$T/supervisord/supervisord.conf"

# ---------------------------------------------------------------------------------------
# 4. Start / measure
# ---------------------------------------------------------------------------------------
start_agent() {
    local in_cg=()
    # Into its own cgroup first (time(1) stays there; the agent moves itself to a leaf).
    [ -z "$AGENT_CG" ] || in_cg=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$AGENT_CG")
    "${in_cg[@]}" /usr/bin/time -f '%M' -o "$RES/agent-maxrss-$1.txt" \
        "$AGENT" run --config "$T/keepup/agent.yaml" </dev/null 2>>"$T/keepup/agent.stderr" &
    AGENT_TIME_PID=$!
    local i c
    for ((i = 0; i < 50; i++)); do
        c=$(cat /proc/"$AGENT_TIME_PID"/task/*/children 2>/dev/null | awk '{print $1}')
        [ -n "$c" ] && break
        sleep 0.1
    done
    [ -n "$c" ] || die "keepup-agent did not start"
    AGENT_PID=$c
}
wait_up() { # sup
    $PY "$HELPER" wait-up "$T/$1/stamps" "$COPIES" 30 || die "$1: services did not come up"
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

LOAD_BEFORE=$(loadavg)
log "load average before: $LOAD_BEFORE ($(nproc) cores); scratch dir $T"

log "floor: spawning a launch script directly, 50 times"
mkdir -p "$T/floor"
cat >"$T/floor/run" <<EOF
#!/bin/sh
echo "\$\$ \$(date +%s%N)" >>$T/floor/stamps
exec /bin/true
EOF
chmod 755 "$T/floor/run"
$PY "$HELPER" floor "$RES/floor.json" 50 "$T/floor/run" "$T/floor/stamps"

log "starting keepup-agent, runsvdir and supervisord, $COPIES services each"
write_manifests none
start_agent none
runsvdir "$T/runit/service" </dev/null >"$T/runit/runsvdir.out" 2>&1 &
RUNSVDIR_PID=$!
/usr/bin/supervisord -n -c "$T/supervisord/supervisord.conf" </dev/null >"$T/supervisord/stdout" 2>&1 &
SUPD_PID=$!
for sup in "${SUPS[@]}"; do wait_up "$sup"; done
log "all $((3 * COPIES)) services up; settling ${SETTLE_SECS}s"
sleep "$SETTLE_SECS"

log "idle window: ${IDLE_SECS}s, all three supervisors, no probes"
$PY "$HELPER" idle "$RES/idle.json" "$IDLE_SECS" \
    keepup="$AGENT_PID" runit="$RUNSVDIR_PID" supervisord="$SUPD_PID"

log "restart latency: $KILLS kills per supervisor, interleaved, >= ${PACE_MS} ms apart"
$PY "$HELPER" kills "$RES/kills.json" "$KILLS" "$PACE_MS" "$MIN_RUN_MS" \
    keepup="$T/keepup/stamps" runit="$T/runit/stamps" supervisord="$T/supervisord/stamps"
$PY "$HELPER" sample keepup "$AGENT_PID" >"$RES/keepup-after-kills.json"

log "stopping runit and supervisord"
stop_runit
stop_supervisord
stop_agent

for probe in tcp exec; do
    log "keepup-agent with one $probe probe per service every 10s: ${IDLE_SECS}s idle window"
    write_manifests "$probe"
    start_agent "$probe"
    wait_up keepup
    # grace 2 s, then one probe round every 10 s: let the first round pass
    sleep $((SETTLE_SECS + 10))
    $PY "$HELPER" idle "$RES/idle-$probe.json" "$IDLE_SECS" keepup="$AGENT_PID"
    n_fail=$(cat "$T"/keepup/log/*.log | grep -c 'probe .* failed' || true)
    [ "$n_fail" = 0 ] || log "warning: $n_fail failed-probe lines in the keepup logs"
    stop_agent
done

# keepup-agent only: `down` of a fork-loop service whose processes ignore SIGTERM.
cat >"$T/keepup/launch/run-fork" <<EOF
#!/bin/sh
exec $SETPRIV --reuid=benchkfork --regid=benchkfork --init-groups -- /bin/bash -c 'ulimit -u 200 || exit 1; trap "" TERM; while :; do sleep 1000 & done'
EOF
chmod 755 "$T/keepup/launch/run-fork"
rm -f "$T"/keepup/services/*.yaml
cat >"$T/keepup/services/benchfork.yaml" <<EOF
format: 1
name: benchfork
version: 1.0.0-1
role: benchkfork
launch: $T/keepup/launch/run-fork
supervisor:
  kind: agent
  count: 100
  within: 1m
  stop_grace: 1s
checks: []
EOF
fork_procs() { ps -u benchkfork -o stat= 2>/dev/null | grep -vc '^Z' || true; }
ctl() { "$AGENT" --config "$T/keepup/agent.yaml" "$@" >/dev/null; }
log "keepup-agent: down of a fork-loop service (~200 processes ignoring SIGTERM, stop_grace 1s), $FORK_DOWNS times"
start_agent fork
FORK_MS=() FORK_LEFT=()
for ((k = 0; k < FORK_DOWNS; k++)); do
    for ((i = 0; i < 200; i++)); do [ "$(fork_procs)" -ge 150 ] && break; sleep 0.1; done
    [ "$(fork_procs)" -ge 150 ] || die "the fork loop did not reach 150 processes: $(fork_procs)"
    t0=$(date +%s%N)
    ctl down benchfork || die "keepup-agent down benchfork failed"
    t1=$(date +%s%N)
    FORK_LEFT+=("$(fork_procs)")
    FORK_MS+=("$(((t1 - t0) / 1000000))")
    ctl up benchfork || die "keepup-agent up benchfork failed"
done
FORK_PATH=$(grep -o 'stopping services [a-z. ]*' "$T/keepup/agent.stderr" | tail -1)
FORK_NOTE=$(grep 'stopped (admin-down)' "$T/keepup/log/benchfork.log" | tail -1 | sed 's/.*: SIGTERM/SIGTERM/')
stop_agent

LOAD_AFTER=$(loadavg)
log "load average after: $LOAD_AFTER"

# ---------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------
echo "supervise bench: $COPIES services per supervisor, $KILLS kills each, ${IDLE_SECS}s idle windows"
echo "load average before: $LOAD_BEFORE, after: $LOAD_AFTER ($(nproc) cores)"
echo "peak RSS of keepup-agent per phase (GNU time %M, KiB): none=$(cat "$RES/agent-maxrss-none.txt" 2>/dev/null | tail -1) tcp=$(cat "$RES/agent-maxrss-tcp.txt" 2>/dev/null | tail -1) exec=$(cat "$RES/agent-maxrss-exec.txt" 2>/dev/null | tail -1)"
sorted=$(printf '%s\n' "${FORK_MS[@]}" | sort -n)
echo "keepup-agent path: ${FORK_PATH:-unknown}${AGENT_CG:+ (agent cgroup $AGENT_CG)}"
echo "fork-loop down (stop_grace 1s, ~200 processes ignoring SIGTERM), $FORK_DOWNS runs: median $(sed -n "$(((FORK_DOWNS + 1) / 2))p" <<<"$sorted") ms, max $(tail -1 <<<"$sorted") ms (all: ${FORK_MS[*]}); processes left after down: ${FORK_LEFT[*]}; last: $FORK_NOTE"
echo
rc=0
$PY "$HELPER" report "$RES" || rc=$?
for left in "${FORK_LEFT[@]}"; do
    if [ "$left" != 0 ]; then log "MISS: $left fork-loop processes left after down"; rc=3; fi
done
if [ "$rc" = 3 ]; then
    [ "$STRICT" = 1 ] && exit 1
elif [ "$rc" != 0 ]; then
    die "report failed ($rc)"
fi
exit 0
