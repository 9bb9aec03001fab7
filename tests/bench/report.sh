#!/usr/bin/env bash
# Report ingestion and `keepup report` at fleet scale (docs/benchmarks.md, "Reports (issue 4)").
# Builds release binaries, starts `keepup serve --state` on loopback over a temporary repository
# and state database, registers HOSTS hosts (`keepup host add --bulk`), posts ROUNDS realistic
# reports per host from CONNECTIONS keep-alive connections (tests/src/bin/reportload.rs), times
# `keepup report` (table and --json) against it, and reads the server's peak RSS (VmHWM).
# Then the same ingestion over TLS (issue 10): a CA and a certificate for 127.0.0.1 made with
# openssl, `keepup serve --tls-cert/--tls-key` on the same database, the same reportload with
# --cacert (one handshake per connection), and the TLS/plain ratio.
#
#   bash tests/bench/report.sh                    # 100,000 hosts, 2 rounds
#   HOSTS=10000 ROUNDS=1 bash tests/bench/report.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

HOSTS=${HOSTS:-100000}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-32}

. tests/bench/fleetload.sh

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

start=$(date +%s.%N)
seq -f "host-%06g" 1 "$HOSTS" | "$K" host add --bulk --state "$tmp/state.db" >"$tmp/tokens" 2>/dev/null
echo "registered $HOSTS hosts in $(echo "$(date +%s.%N) - $start" | bc) s"

"$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$port" --state "$tmp/state.db" 2>"$tmp/serve.log" &
pid=$!
wait_listening

echo "server after start: $(grep VmRSS "/proc/$pid/status")"
"$LOAD" --server "$url" --tokens "$tmp/tokens" --connections "$CONNECTIONS" --rounds "$ROUNDS" | tee "$tmp/plain.out"
echo "server after the load: $(grep VmRSS "/proc/$pid/status")"

# Wall times depend on what else runs on the machine; CPU times (server: utime+stime of the
# serve process around one request; client: user+sys) do not.
server_cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
TIMEFORMAT='%R s wall, %U s user + %S s sys (client)'
for i in 1 2 3; do
    a=$(server_cpu)
    t=$( { time "$K" report --server "$url" >"$tmp/report.txt"; } 2>&1 )
    b=$(server_cpu)
    echo "keepup report ($HOSTS hosts, $(wc -l <"$tmp/report.txt") lines): $t, $(( (b - a) * 10 )) ms CPU (server)"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
head -1 "$tmp/report.txt"
for i in 1 2; do
    t=$( { time "$K" report --server "$url" --json >"$tmp/report.json"; } 2>&1 )
    echo "keepup report --json ($(du -m "$tmp/report.json" | cut -f1) MiB): $t"
done
t=$( { time "$K" report --server "$url" --unhealthy >/dev/null; } 2>&1 )
echo "keepup report --unhealthy: $t"
t=$(curl -s -o /dev/null -w '%{time_total}' "$url/")
echo "the page at /: $t s"
grep -E 'VmHWM|VmRSS' "/proc/$pid/status" | sed 's/^/server /'
echo "state database: $(du -m "$tmp/state.db" | cut -f1) MiB (+ WAL $(du -m "$tmp/state.db-wal" 2>/dev/null | cut -f1) MiB)"

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
