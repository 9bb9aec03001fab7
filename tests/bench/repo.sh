#!/usr/bin/env bash
# Repository benchmark: keepup's index build and promotion against the peers, on the same
# generated packages.
#
#   bash tests/bench/repo.sh                 # N=5000 small packages (deb + rpm), SMALL=500
#   N=1000 SMALL=100 RUNS=3 bash tests/bench/repo.sh   # quick run
#
# What is timed (wall clock, median of RUNS):
#   1. full index build of N debs + N rpms:
#        keepup:  `keepup repo reindex` (every view of every track from the repository state:
#                 Packages{,.gz}, Release, InRelease, Release.gpg, repodata, repomd.xml.asc,
#                 index.json + sig, for 3 tracks) and, once, the whole `keepup publish` of the
#                 N+N files into an empty repository (checks every package, copies into the
#                 pool, computes per-package fragments, writes the unstable views);
#        peers:   `apt-ftparchive packages` + `createrepo_c --no-database` on the same files.
#   2. one promotion of one package from unstable to testing, in a repository holding SMALL
#      and then N packages in unstable:
#        keepup:  `keepup promote --repo R pkgXXXX --to testing`
#        peer:    `reprepro copy testing unstable pkgXXXX` (deb only, unsigned).
#
# Environment: N, SMALL, RUNS (default 5), KEEP=1 keeps the work directory.
# Progress goes to stderr, the results table to stdout. See docs/benchmarks.md.
set -euo pipefail

N=${N:-5000}
SMALL=${SMALL:-500}
RUNS=${RUNS:-5}
KEEP=${KEEP:-0}
for v in N SMALL RUNS; do
    case ${!v} in '' | *[!0-9]* | 0) echo "$v must be a positive integer" >&2; exit 2 ;; esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[repo-bench] %s\n' "$*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keepup-repo-bench.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

need=()
command -v apt-ftparchive >/dev/null || need+=(apt-utils)
command -v createrepo_c >/dev/null || need+=(createrepo-c)
command -v reprepro >/dev/null || need+=(reprepro)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

log "building keepup (release)"
(cd "$ROOT" && cargo build --release -q -p keepup-deploy --bin keepup)
K=$ROOT/target/release/keepup

# Milliseconds of wall time of a command (its output discarded).
ms() {
    local s e
    s=$(date +%s%N)
    "$@" >/dev/null 2>&1 || { log "failed: $*"; return 1; }
    e=$(date +%s%N)
    echo $(((e - s) / 1000000))
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

log "signing key"
"$K" repo init "$WORK/keyrepo" >/dev/null
KEY=$WORK/keyrepo/.keepup/signing-key.asc

# ---------------------------------------------------------------------------------------
# Packages: N tiny services, each one small file, deb + signed rpm.
# ---------------------------------------------------------------------------------------
gen() {
    local n=$1 dir=$2
    mkdir -p "$dir/specs"
    printf '#!/bin/sh\nexec sleep infinity\n' >"$dir/specs/daemon"
    for i in $(seq -w 1 "$n"); do
        cat >"$dir/specs/pkg$i.yaml" <<EOF
name: pkg$i
version: 1.0.$((10#$i % 7))
summary: Benchmark service $i
maintainer: Bench <bench@example.org>
license: Apache-2.0
role: pkg$i
files:
  - src: daemon
    dst: /usr/bin/pkg$i
    mode: "0755"
launch:
  exec: [/usr/bin/pkg$i]
EOF
    done
    SOURCE_DATE_EPOCH=1700000000 "$K" pack --sign-key "$KEY" --out "$dir/dist" "$dir"/specs/*.yaml >/dev/null 2>&1
}
log "generating $N packages (deb + rpm)"
gen "$N" "$WORK/big"
mkdir -p "$WORK/small/dist"
ls "$WORK/big/dist" | awk -v s="$SMALL" -F'[_-]' '{n=substr($1,4)+0; if (n<=s) print}' |
    while read -r f; do ln "$WORK/big/dist/$f" "$WORK/small/dist/$f"; done
mkdir -p "$WORK/debs" "$WORK/rpms"
ln "$WORK"/big/dist/*.deb "$WORK/debs/"
ln "$WORK"/big/dist/*.rpm "$WORK/rpms/"
log "$(ls "$WORK/big/dist" | wc -l) files, $(du -sh "$WORK/big/dist" | cut -f1)"

# ---------------------------------------------------------------------------------------
# 1. Full index build
# ---------------------------------------------------------------------------------------
log "keepup publish of all $((2 * N)) files into an empty repository"
"$K" repo init "$WORK/R" --key "$KEY" >/dev/null
publish_ms=$(ms "$K" publish --repo "$WORK/R" "$WORK"/big/dist/*)
"$K" repo verify --repo "$WORK/R" >/dev/null

apt_t=() cr_t=() peers_t=() reindex_t=()
for r in $(seq "$RUNS"); do
    log "index build, round $r/$RUNS"
    a=$(ms sh -c "cd '$WORK' && apt-ftparchive packages debs > '$WORK/Packages'")
    rm -rf "$WORK/rpms/repodata"
    c=$(ms createrepo_c --no-database -q "$WORK/rpms")
    apt_t+=("$a") cr_t+=("$c") peers_t+=($((a + c)))
    reindex_t+=("$(ms "$K" repo reindex --repo "$WORK/R")")
done
apt_ms=$(printf '%s\n' "${apt_t[@]}" | median)
cr_ms=$(printf '%s\n' "${cr_t[@]}" | median)
peers_ms=$(printf '%s\n' "${peers_t[@]}" | median)
reindex_ms=$(printf '%s\n' "${reindex_t[@]}" | median)

# ---------------------------------------------------------------------------------------
# 2. One promotion, SMALL vs N packages in unstable
# ---------------------------------------------------------------------------------------
reprepro_repo() {
    local dir=$1 src=$2
    mkdir -p "$dir/conf"
    for t in unstable testing; do
        printf 'Codename: %s\nArchitectures: amd64\nComponents: main\n\n' "$t"
    done >"$dir/conf/distributions"
    reprepro -b "$dir" -S admin -P optional includedeb unstable "$src"/*.deb >/dev/null 2>&1
}
declare -A promote_ms reprepro_ms
for size in "$SMALL" "$N"; do
    if [ "$size" = "$N" ]; then src=$WORK/big/dist; else src=$WORK/small/dist; fi
    log "promotion with $size packages in unstable"
    repo=$WORK/P$size
    "$K" repo init "$repo" --key "$KEY" >/dev/null
    "$K" publish --repo "$repo" "$src"/* >/dev/null
    reprepro_repo "$WORK/RR$size" "$src"
    kt=() rt=()
    for r in $(seq "$RUNS"); do
        p=pkg$(printf "%0${#N}d" "$r")
        kt+=("$(ms "$K" promote --repo "$repo" "$p" --to testing)")
        rt+=("$(ms reprepro -b "$WORK/RR$size" copy testing unstable "$p")")
    done
    promote_ms[$size]=$(printf '%s\n' "${kt[@]}" | median)
    reprepro_ms[$size]=$(printf '%s\n' "${rt[@]}" | median)
done

cpus=$(nproc)
load=$(cut -d' ' -f1-3 /proc/loadavg)
cat <<EOF

## Repository benchmark: $N packages (deb + rpm), $cpus cores, load $load, median of $RUNS

| What | Time (ms) |
|---|---|
| apt-ftparchive packages ($N debs) | $apt_ms |
| createrepo_c --no-database ($N rpms) | $cr_ms |
| **peers combined** | **$peers_ms** |
| **keepup repo reindex** (3 tracks x APT + DNF + index, signed) | **$reindex_ms** |
| keepup publish of all $((2 * N)) files into an empty repository (once) | $publish_ms |
| keepup promote, $SMALL packages in unstable | ${promote_ms[$SMALL]} |
| keepup promote, $N packages in unstable | ${promote_ms[$N]} |
| reprepro copy, $SMALL packages in unstable | ${reprepro_ms[$SMALL]} |
| reprepro copy, $N packages in unstable | ${reprepro_ms[$N]} |
EOF
