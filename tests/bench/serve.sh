#!/usr/bin/env bash
# `keepup serve` against nginx (Debian's package) serving the same repository directory, side by
# side in one run (docs/benchmarks.md, "Serving (issue 10)"):
#   1. conditional GETs (If-None-Match with each server's own ETag: 304) of
#      tracks/stable/index.json and dists/stable/InRelease at CONNECTIONS concurrent connections
#      (wrk): requests/s and p99 latency;
#   2. DOWNLOADS parallel downloads of a SIZE_MIB MiB pool file (curl): throughput and the
#      server's peak RSS (VmHWM; nginx: master + workers).
# Prints keepup/nginx ratios against the targets: requests/s within 1.5x, p99 within 1.5x,
# download throughput within 1.2x, keepup's peak RSS under 100 MiB.
#
#   bash tests/bench/serve.sh
#   CONNECTIONS=200 DURATION=5 DOWNLOADS=10 bash tests/bench/serve.sh     # quick
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNECTIONS=${CONNECTIONS:-1000}
DURATION=${DURATION:-10}
DOWNLOADS=${DOWNLOADS:-30}
SIZE_MIB=${SIZE_MIB:-200}
THREADS=${THREADS:-2}

bash tests/ensure-packages.sh nginx wrk curl
cargo build --release -q -p keepup-deploy --bin keepup
K=${CARGO_TARGET_DIR:-$PWD/target}/release/keepup
# wrk holds CONNECTIONS sockets, the servers as many.
ulimit -n "$(ulimit -Hn)"

tmp=$(mktemp -d)
chmod 755 "$tmp" # nginx's workers run as nobody
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_listening() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

"$K" repo init "$tmp/repo" >/dev/null 2>&1
mkdir -p "$tmp/repo/pool"
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$tmp/repo/pool/big_1.0-1_amd64.deb"
chmod -R a+rX "$tmp/repo"
want=$(sha256sum "$tmp/repo/pool/big_1.0-1_amd64.deb" | cut -d' ' -f1)

kport=$(free_port)
"$K" serve --repo "$tmp/repo" --listen "127.0.0.1:$kport" 2>"$tmp/keepup.log" &
kpid=$!
pids+=("$kpid")

nport=$(free_port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile 65536;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 10s;
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$nport backlog=4096;
        root $tmp/repo;
        location ~ /\. { deny all; }
    }
}
EOF
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" 2>>"$tmp/nginx/error.log" &
npid=$!
pids+=("$npid")
wait_listening "$kport"
wait_listening "$nport"

# Peak RSS in KiB of a process and its children (nginx: master + workers).
peak_rss() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" || true); do
        total=$((total + $(awk '/^VmHWM/ {print $2}' "/proc/$p/status")))
    done
    echo "$total"
}

declare -A rps p99 mbs
# wrk's --latency p99 line, in ms.
to_ms() {
    awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v=v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v=v*1000 } printf "%.2f", v }' <<<"$1"
}
conditional() { # server port path
    local etag out
    etag=$(curl -sI "http://127.0.0.1:$2$3" | awk 'tolower($1)=="etag:" {print $2}' | tr -d '\r')
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "If-None-Match: $etag" "http://127.0.0.1:$2$3")" = 304 ] || {
        echo "$1 does not answer 304 to If-None-Match on $3" >&2
        exit 1
    }
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "If-None-Match: $etag" "http://127.0.0.1:$2$3")
    rps[$1,$3]=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
    p99[$1,$3]=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
    local errors
    errors=$(awk '/Non-2xx|Socket errors/' <<<"$out" | tr '\n' ' ')
    printf '%-7s %-28s %9s req/s  p99 %8s ms  %s\n' "$1" "$3" "${rps[$1,$3]}" "${p99[$1,$3]}" "$errors"
}
downloads() { # server port
    local start end i bad=0 clients=()
    start=$(date +%s.%N)
    for i in $(seq "$DOWNLOADS"); do
        curl -sSf "http://127.0.0.1:$2/pool/big_1.0-1_amd64.deb" | sha256sum >"$tmp/sum.$1.$i" &
        clients+=($!)
    done
    wait "${clients[@]}"
    end=$(date +%s.%N)
    for i in $(seq "$DOWNLOADS"); do
        [ "$(cut -d' ' -f1 "$tmp/sum.$1.$i")" = "$want" ] || bad=$((bad + 1))
    done
    mbs[$1]=$(echo "$DOWNLOADS * $SIZE_MIB / ($end - $start)" | bc -l | xargs printf '%.0f')
    printf '%-7s %d x %d MiB: %6s MiB/s, %d corrupt, server peak RSS so far %d MiB\n' "$1" "$DOWNLOADS" "$SIZE_MIB" \
        "${mbs[$1]}" "$bad" "$(($(peak_rss "$3") / 1024))"
}

echo "== conditional GETs (304), $CONNECTIONS connections, ${DURATION}s each, wrk -t$THREADS"
for path in /tracks/stable/index.json /dists/stable/InRelease; do
    conditional keepup "$kport" "$path"
    conditional nginx "$nport" "$path"
done
echo "== $DOWNLOADS parallel downloads of $SIZE_MIB MiB (curl | sha256sum)"
downloads keepup "$kport" "$kpid"
downloads nginx "$nport" "$npid"

krss=$(($(peak_rss "$kpid") / 1024))
echo "== keepup / nginx (target)"
verdict() { if awk "BEGIN {exit !($1)}"; then echo "ok"; else echo "MISSED"; fi; }
for path in /tracks/stable/index.json /dists/stable/InRelease; do
    r=$(echo "${rps[nginx,$path]} / ${rps[keepup,$path]}" | bc -l)
    l=$(echo "${p99[keepup,$path]} / ${p99[nginx,$path]}" | bc -l)
    printf '%-28s nginx/keepup req/s %.2fx (<= 1.5x: %s); keepup/nginx p99 %.2fx (<= 1.5x: %s)\n' \
        "$path" "$r" "$(verdict "$r <= 1.5")" "$l" "$(verdict "$l <= 1.5")"
done
d=$(echo "${mbs[nginx]} / ${mbs[keepup]}" | bc -l)
printf 'downloads: nginx/keepup throughput %.2fx (<= 1.2x: %s); keepup peak RSS %d MiB (< 100: %s)\n' \
    "$d" "$(verdict "$d <= 1.2")" "$krss" "$(verdict "$krss < 100")"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
