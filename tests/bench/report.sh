#!/usr/bin/env bash
# Report ingestion and `keepup report` at fleet scale (docs/benchmarks.md, "Reports (issue 4)"
# and "Reports at a million hosts (issue 14)").
# Builds release binaries, starts `keepup serve --state` on loopback over a temporary repository
# and state database, registers HOSTS hosts (`keepup host add --bulk`), posts ROUNDS realistic
# reports per host from CONNECTIONS keep-alive connections (tests/src/bin/reportload.rs), times
# `keepup report` (table, --unhealthy and --json) against it, and reads the server's peak RSS
# (VmHWM), then restarts the server on the stored reports (time to listen, RSS).
# BACKEND=sqlite (the default): one server on a SQLite file, then the same ingestion over TLS
# (issue 10): a CA and a certificate for 127.0.0.1 made with openssl, `keepup serve
# --tls-cert/--tls-key` on the same database, the same reportload with --cacert (one handshake
# per connection), and the TLS/plain ratio (TLS=0 skips it).
# BACKEND=postgres: a throwaway PostgreSQL cluster from Debian's `postgresql` package (run as
# nobody on a temporary data directory, synchronous_commit=off like SQLite's
# synchronous=NORMAL), two `keepup serve` replicas on it, reportload spreading its connections
# over both, `keepup report` from the first. PGTLS=1: the cluster with ssl=on and a test CA
# (openssl), the replicas on sslmode=verify-full with it (docs/postgres.md, "TLS").
#
#   bash tests/bench/report.sh                    # 100,000 hosts, 2 rounds
#   HOSTS=10000 ROUNDS=1 bash tests/bench/report.sh
#   HOSTS=1000000 ROUNDS=1 TLS=0 bash tests/bench/report.sh
#   HOSTS=1000000 ROUNDS=1 BACKEND=postgres bash tests/bench/report.sh
#   VIEWS=0 ...                                   # ingestion and restart only
#   KEEPUP=/path/to/keepup ...                    # another keepup binary (turns of old and new)
# With BACKEND=postgres the CPU per stored report is split between the replicas, PostgreSQL (the
# postmaster and its backends, from /proc) and reportload; PGSTAT=1 loads pg_stat_statements in
# the throwaway cluster and prints each statement's calls and execution time after the load.
set -euo pipefail
cd "$(dirname "$0")/../.."

HOSTS=${HOSTS:-100000}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-32}
BACKEND=${BACKEND:-sqlite}
TLS=${TLS:-1}
PGTLS=${PGTLS:-0}

. tests/bench/fleetload.sh
K=${KEEPUP:-$K}
PGSTAT=${PGSTAT:-0}

"$K" repo init "$tmp/repo" >/dev/null 2>&1
"$K" assign --repo "$tmp/repo" '*' --track stable >/dev/null 2>&1
# The track's index as agents see it (the server reads only this public file).
mkdir -p "$tmp/repo/tracks/stable"
cat >"$tmp/repo/tracks/stable/index.json" <<'JSON'
{"track":"stable","serial":42,"generated":0,"packages":[
 {"name":"foo","version":"1.2-1","arch":"amd64","format":"deb","path":"pool/f/foo_1.2-1_amd64.deb","size":1,"sha256":"00"},
 {"name":"bar","version":"2.1-1","arch":"amd64","format":"deb","path":"pool/b/bar_2.1-1_amd64.deb","size":1,"sha256":"00","rollback_of":"2.0-1"},
 {"name":"baz","version":"1.0-1","arch":"all","format":"deb","path":"pool/b/baz_1.0-1_all.deb","size":1,"sha256":"00"}]}
JSON

case "$BACKEND" in
sqlite) state="$tmp/state.db" ;;
postgres)
    pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -x "$pgbin/initdb" ] || { echo "BACKEND=postgres needs Debian's postgresql package: apt-get install postgresql" >&2; exit 1; }
    pgdir=$(mktemp -d /tmp/keepup-bench-pg.XXXXXX)
    chown nobody: "$pgdir"
    echo keepup-bench-pw >"$pgdir/pw"
    chown nobody: "$pgdir/pw"
    pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    pgssl="" pgurlssl=""
    if [ "$PGTLS" = 1 ]; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-pg-ca \
            -addext basicConstraints=critical,CA:TRUE -keyout "$pgdir/ca.key" -out "$pgdir/ca.pem" 2>/dev/null
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
            -keyout "$pgdir/server.key" -out "$pgdir/server.csr" 2>/dev/null
        openssl x509 -req -in "$pgdir/server.csr" -CA "$pgdir/ca.pem" -CAkey "$pgdir/ca.key" -CAcreateserial \
            -days 1 -extfile <(printf 'subjectAltName=IP:127.0.0.1\n') -out "$pgdir/server.pem" 2>/dev/null
        chown nobody: "$pgdir/server.pem" "$pgdir/server.key"
        chmod 600 "$pgdir/server.key"
        pgssl="-c ssl=on -c ssl_cert_file=$pgdir/server.pem -c ssl_key_file=$pgdir/server.key"
        pgurlssl="?sslmode=verify-full&sslrootcert=$pgdir/ca.pem"
    fi
    runuser -u nobody -- "$pgbin/initdb" -D "$pgdir/data" -U keepup --auth-local=trust \
        --auth-host=scram-sha-256 --no-sync --pwfile="$pgdir/pw" >/dev/null
    [ "$PGSTAT" = 1 ] && pgssl="$pgssl -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
    runuser -u nobody -- "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w -t 60 -o \
        "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1 -c synchronous_commit=off -c shared_buffers=512MB -c max_connections=60 $pgssl" \
        start >/dev/null
    on_exit() {
        [ -n "${pid2:-}" ] && { kill "$pid2" 2>/dev/null || true; wait "$pid2" 2>/dev/null || true; }
        runuser -u nobody -- "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1 || true
        rm -rf "$pgdir"
    }
    runuser -u nobody -- "$pgbin/psql" -X -q -h "$pgdir" -p "$pgport" -U keepup -d postgres -c 'CREATE DATABASE fleet'
    pgsql() { runuser -u nobody -- "$pgbin/psql" -X -q -A -t -h "$pgdir" -p "$pgport" -U keepup -d fleet -c "$1"; }
    [ "$PGSTAT" = 1 ] && pgsql 'CREATE EXTENSION pg_stat_statements' >/dev/null
    state="postgres://keepup:keepup-bench-pw@127.0.0.1:$pgport/fleet$pgurlssl"
    ;;
*) echo "BACKEND is sqlite or postgres, not $BACKEND" >&2; exit 1 ;;
esac

start=$(date +%s.%N)
seq -f "host-%07.0f" 1 "$HOSTS" | "$K" host add --bulk --state "$state" >"$tmp/tokens" 2>"$tmp/host-add.log" || { cat "$tmp/host-add.log" >&2; exit 1; }
echo "registered $HOSTS hosts in $(echo "$(date +%s.%N) - $start" | bc) s ($BACKEND)"

start=$(date +%s.%N)
"$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$port" --state "$state" 2>"$tmp/serve.log" &
pid=$!
wait_listening
echo "server started in $(echo "$(date +%s.%N) - $start" | bc) s: $(grep VmRSS "/proc/$pid/status")"
servers=$url
if [ "$BACKEND" = postgres ]; then
    port2=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$port2" --state "$state" 2>"$tmp/serve2.log" &
    pid2=$!
    port=$port2 wait_listening
    servers="$url,http://127.0.0.1:$port2"
    echo "replica 2 on port $port2: $(grep VmRSS "/proc/$pid2/status")"
fi

echo "load average before the load: $(cut -d' ' -f1-3 /proc/loadavg)"
# The servers' CPU (user + system clock ticks, from /proc) in all and in the `state-writer`
# thread of the first: per stored report, the figures that compare binaries on a shared machine.
ticks() { awk '{print $14 + $15}' "$1" 2>/dev/null || echo 0; }
writer_stat() { grep -l '^state-writer$' /proc/"$1"/task/*/comm 2>/dev/null | head -1 | sed 's/comm$/stat/'; }
wstat=$(writer_stat "$pid")
cpu0=$(ticks "/proc/$pid/stat") wcpu0=$(ticks "$wstat")
cpu20=$([ -n "${pid2:-}" ] && ticks "/proc/$pid2/stat" || echo 0)
# PostgreSQL's CPU: the postmaster (with the children it reaped) and every live child (the
# backends of both replicas, the WAL writer, the checkpointer, autovacuum).
# The postmaster is found as the parent of the checkpointer, which PostgreSQL names itself.
[ "$BACKEND" = postgres ] &&
    pm=$(awk '{print $4}' "/proc/$(pgsql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")/stat")
pg_ticks() {
    awk -v pm="$pm" '$2 != "(postgres)" {next} $4 == pm {t += $14 + $15} $1 == pm {t += $14 + $15 + $16 + $17} END {print t + 0}' \
        /proc/[0-9]*/stat 2>/dev/null
}
pgcpu0=$([ "$BACKEND" = postgres ] && pg_ticks || echo 0)
[ "$PGSTAT" = 1 ] && [ "$BACKEND" = postgres ] && pgsql 'SELECT pg_stat_statements_reset()' >/dev/null
# Reports rejected under load (503 past the store wait) are counted and shown; the figures after
# them are still measured.
/usr/bin/time -f '%U %S' -o "$tmp/load.time" \
    "$LOAD" --server "$servers" --tokens "$tmp/tokens" --connections "$CONNECTIONS" --rounds "$ROUNDS" 2>&1 | grep -v '^ \+[0-9]*: \|^ \+at ' | tee "$tmp/plain.out" || true
echo "load average after the load: $(cut -d' ' -f1-3 /proc/loadavg)"
hz=$(getconf CLK_TCK)
cpu=$(( $(ticks "/proc/$pid/stat") - cpu0 )) wcpu=$(( $(ticks "$wstat") - wcpu0 ))
cpu2=$(( $([ -n "${pid2:-}" ] && ticks "/proc/$pid2/stat" || echo 0) - cpu20 ))
pgcpu=$(( $([ "$BACKEND" = postgres ] && pg_ticks || echo 0) - pgcpu0 ))
# (time writes "Command exited with non-zero status" first when reports were rejected)
loadms=$(tail -1 "$tmp/load.time" 2>/dev/null | awk '{printf "%d", ($1 + $2) * 1000}')
loadms=${loadms:-0}
echo "server CPU during the load (user+sys, all replicas): $(( (cpu + cpu2) * 1000 / hz )) ms"
stored=$(sed -n 's/^total: \([0-9]*\) reports stored.*/\1/p' "$tmp/plain.out")
if [ "${stored:-0}" -gt 0 ]; then
    echo "server CPU per stored report: $(( (cpu + cpu2) * 1000000 / hz / stored )) us in all, $(( wcpu * 1000000 / hz / stored )) us in the first's state-writer thread ($stored reports; $cpu + $cpu2 and $wcpu ticks of 1/$hz s)"
    if [ "$BACKEND" = postgres ]; then
        echo "CPU per stored report: replica 1 $(( cpu * 1000000 / hz / stored )) us, replica 2 $(( cpu2 * 1000000 / hz / stored )) us, PostgreSQL $(( pgcpu * 1000000 / hz / stored )) us, reportload $(( loadms * 1000 / stored )) us (PostgreSQL $pgcpu ticks)"
    else
        echo "reportload CPU per stored report: $(( loadms * 1000 / stored )) us"
    fi
fi
if [ "$PGSTAT" = 1 ] && [ "$BACKEND" = postgres ]; then
    echo "pg_stat_statements during the load (calls, total ms, ms per call, rows; the top 8 by time):"
    pgsql "SELECT calls, round(total_exec_time), round((total_exec_time / calls)::numeric, 3), rows,
               regexp_replace(left(query, 90), '\s+', ' ', 'g')
           FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8" | sed 's/^/  /'
fi
echo "server after the load: $(grep VmRSS "/proc/$pid/status")"
[ -n "${pid2:-}" ] && echo "replica 2 after the load: $(grep VmRSS "/proc/$pid2/status")"
# A replica reads the other's reports within a second or two.
[ -n "${pid2:-}" ] && sleep 3

# VIEWS=0 skips the reads below (keepup report, --unhealthy, the page, --json): ingestion and
# restart only.
if [ "${VIEWS:-1}" = 1 ]; then
# Wall times depend on what else runs on the machine; CPU times (server: utime+stime of the
# serve process around one request; client: user+sys) do not.
server_cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
TIMEFORMAT='%R s wall, %U s user + %S s sys (client)'
for i in 1 2 3; do
    a=$(server_cpu)
    t=$( { time "$K" report --server "$url" >"$tmp/report.txt"; } 2>&1 )
    b=$(server_cpu)
    echo "keepup report ($HOSTS hosts, $(wc -l <"$tmp/report.txt") lines): $t, $(( (b - a) * 10 )) ms CPU (server)"
    # The next one builds the view again (past the server's 1 s cache).
    sleep 1.1
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
head -1 "$tmp/report.txt"
t=$( { time "$K" report --server "$url" --unhealthy >"$tmp/unhealthy.txt"; } 2>&1 )
echo "keepup report --unhealthy ($(wc -l <"$tmp/unhealthy.txt") lines): $t"
t=$(curl -s -o /dev/null -w '%{time_total}' "$url/")
echo "the page at /: $t s"
grep -E 'VmHWM|VmRSS' "/proc/$pid/status" | sed 's/^/server /'
t=$( { time "$K" report --server "$url" --json >"$tmp/report.json"; } 2>&1 )
echo "keepup report --json ($(du -m "$tmp/report.json" | cut -f1) MiB, with events): $t"
grep -E 'VmHWM|VmRSS' "/proc/$pid/status" | sed 's/^/server after --json: /'
[ -n "${pid2:-}" ] && grep -E 'VmHWM|VmRSS' "/proc/$pid2/status" | sed 's/^/replica 2 /'
fi
if [ "$BACKEND" = sqlite ]; then
    echo "state database: $(du -m "$tmp/state.db" | cut -f1) MiB (+ WAL $(du -m "$tmp/state.db-wal" 2>/dev/null | cut -f1) MiB)"
else
    echo "state database: $(runuser -u nobody -- "$pgbin/psql" -X -A -t -h "$pgdir" -p "$pgport" -U keepup -d fleet -c "SELECT pg_size_pretty(pg_database_size('fleet'))")"
fi
# A restart reads the stored summaries (not the bodies); with PostgreSQL, replica 1 restarts
# while replica 2 runs.
stop_server
start=$(date +%s.%N)
"$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$port" --state "$state" 2>"$tmp/serve.log" &
pid=$!
wait_listening
echo "restart with $HOSTS stored reports: listening after $(echo "$(date +%s.%N) - $start" | bc) s, $(grep -E 'VmRSS' "/proc/$pid/status" | tr -s '\t ' ' '), $(grep -E 'VmHWM' "/proc/$pid/status" | tr -s '\t ' ' ')"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$BACKEND" = sqlite ] && [ "$TLS" = 1 ] || exit 0

# --- The same ingestion over TLS (issue 10), on the same database, right after.
stop_server
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$tmp/server.ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
    -days 1 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null
"$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$port" --state "$tmp/state.db" \
    --tls-cert "$tmp/server.pem" --tls-key "$tmp/server.key" 2>"$tmp/serve-tls.log" &
pid=$!
wait_listening
echo
echo "TLS (ECDSA P-256 certificate, TLS 1.3, one handshake per connection):"
"$LOAD" --server "https://127.0.0.1:$port" --cacert "$tmp/ca.pem" --tokens "$tmp/tokens" \
    --connections "$CONNECTIONS" --rounds "$ROUNDS" | tee "$tmp/tls.out"
grep -E 'VmHWM|VmRSS' "/proc/$pid/status" | sed 's/^/TLS server /'
rate() { sed -n 's/^total: .*: \([0-9]*\) reports\/s$/\1/p' "$1"; }
plain=$(rate "$tmp/plain.out")
tls=$(rate "$tmp/tls.out")
echo "ingestion: plain $plain reports/s, TLS $tls reports/s: TLS/plain = $(echo "scale=2; $tls / $plain" | bc) (target: TLS >= 5000/s)"
