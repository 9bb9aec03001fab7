#!/usr/bin/env bash
# Repository benchmark: keepup's index build, publish and promotion against the peers, on the
# same generated packages.
#
#   bash tests/bench/repo.sh                 # N=5000 small packages (deb + rpm), SMALL=500
#   N=1000 SMALL=100 RUNS=3 bash tests/bench/repo.sh   # quick run
#
# What is timed (wall clock, median of RUNS; publish: median of up to 3 rounds):
#   1. full index build from the N debs + N rpms already in place (like with like):
#        keepup:  `keepup repo reindex` (every view of every track from the per-package
#                 fragments computed at publish: Packages{,.gz} + by-hash, Release, InRelease,
#                 Release.gpg, repodata, repomd.xml.asc, index.json + sig, for 3 tracks);
#        peers:   `apt-ftparchive packages` + `createrepo_c --no-database` on the same files.
#   2. publishing the 2N new files into an empty repository:
#        keepup:  `keepup publish` (checks every package: each .deb member decompressed to the
#                 end, each rpm's digests and signature; stores its own copy in the pool, a
#                 reflink where the filesystem can; fragments; views), and the same from
#                 another filesystem (/dev/shm);
#        peers:   `cp` (and `cp -l`) of the files into a pool directory + apt-ftparchive +
#                 createrepo_c.
#      (In CPU time, .debs only, with a before/after binary taking turns:
#      tests/bench/publish-debs.sh.)
#   3. one promotion of one package from unstable to testing:
#        keepup:  `keepup promote --repo R pkgXXXX --to testing`, with SMALL and then N
#                 packages in unstable (testing small), and with N packages in unstable and
#                 N-RUNS already in testing (the target track's views are rewritten whole);
#        peer:    `reprepro copy testing unstable pkgXXXX` in the same three repositories
#                 (deb only, unsigned).
#   4. with both keys of a key rotation signing (`keepup repo rotate-key`), every file
#      fsync'ed: a promotion into a track of N-RUNS packages, and `keepup repo refresh` of three
#      tracks of about N packages each.
#   5. at scale (tests/bench/repo-scale.sh, which says what it times): promotion into tracks
#      of 5,000 and 50,000 packages against reprepro and aptly, and `keepup repo reindex` of
#      200,000 packages in 3 tracks against apt-ftparchive. SCALE=0 skips it.
#
# Environment: N, SMALL, RUNS (default 5), SCALE=0 (skip part 5; SCALE_N, SCALE_SIZES: see
# repo-scale.sh), ONLY=publish (part 2 alone, with its ratio; PUBLISH_RUNS rounds, default
# 3), KEEP=1 keeps the work directory, PKGS=DIR keeps the
# generated packages (and their signing key) in DIR and reuses them on the next run with the
# same N. Progress goes to stderr, the results table to stdout. See docs/benchmarks.md.
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
OTHER=""
cleanup() {
    [ -n "$OTHER" ] && rm -rf "$OTHER"
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
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

. "$ROOT/tests/bench/repo-lib.sh"

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
PKGS=${PKGS:-$WORK/pkgs}
KEY=$PKGS/signing-key.asc
if [ -f "$PKGS/done-$N" ] && [ -f "$KEY" ]; then
    log "reusing the $N packages in $PKGS"
else
    log "generating $N packages (deb + rpm) in $PKGS"
    rm -rf "$PKGS" && mkdir -p "$PKGS"
    rm -rf "$WORK/keyrepo" "$WORK/keyrepo-keys"
    "$K" repo init "$WORK/keyrepo" --key-dir "$WORK/keyrepo-keys" >/dev/null
    cp "$WORK"/keyrepo-keys/*.asc "$KEY"
    gen "$N" "$PKGS/big"
    touch "$PKGS/done-$N"
fi
BIG=$PKGS/big/dist
mkdir -p "$WORK/small" "$WORK/debs" "$WORK/rpms" "$WORK/rest"
# small: pkg1..SMALL; rest: every package but pkg1..RUNS (the ones promoted in the rounds).
ls "$BIG" | awk -v s="$SMALL" -F'[_-]' '{n=substr($1,4)+0; if (n<=s) print}' |
    while read -r f; do ln "$BIG/$f" "$WORK/small/$f"; done
ls "$BIG" | awk -v s="$RUNS" -F'[_-]' '{n=substr($1,4)+0; if (n>s) print}' |
    while read -r f; do ln "$BIG/$f" "$WORK/rest/$f"; done
ln "$BIG"/*.deb "$WORK/debs/"
ln "$BIG"/*.rpm "$WORK/rpms/"
log "$(ls "$BIG" | wc -l) files, $(du -sh "$BIG" | cut -f1)"

# ---------------------------------------------------------------------------------------
# 1. Full index build from the files in place
# ---------------------------------------------------------------------------------------
if [ "${ONLY:-}" != publish ]; then
    "$K" repo init "$WORK/R" --key "$KEY" --key-dir "$WORK/keys" >/dev/null
    "$K" publish --repo "$WORK/R" "$BIG"/* >/dev/null
    "$K" repo verify --repo "$WORK/R" >/dev/null
fi

apt_t=() cr_t=() peers_t=() reindex_t=()
[ "${ONLY:-}" = publish ] || for r in $(seq "$RUNS"); do
    log "index build, round $r/$RUNS"
    a=$(ms sh -c "cd '$WORK' && apt-ftparchive packages debs > '$WORK/Packages'")
    rm -rf "$WORK/rpms/repodata"
    c=$(ms createrepo_c --no-database -q "$WORK/rpms")
    apt_t+=("$a") cr_t+=("$c") peers_t+=($((a + c)))
    reindex_t+=("$(ms "$K" repo reindex --repo "$WORK/R")")
done

# Nothing is deleted from here on until the end: ext4 (here without a journal) skips inodes
# freed in the last minutes when it allocates new ones, which makes creating files after a
# mass deletion several times slower, for keepup and the peers alike.

# ---------------------------------------------------------------------------------------
# 2. Publishing 2N new files
# ---------------------------------------------------------------------------------------
if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ] &&
    [ "$(stat -c %d /dev/shm)" != "$(stat -c %d "$WORK")" ]; then
    OTHER=$(mktemp -d /dev/shm/keepup-repo-bench.XXXXXX)
    cp "$BIG"/* "$OTHER/"
fi
PR=${PUBLISH_RUNS:-$((RUNS < 3 ? RUNS : 3))}
pub_t=() pubcp_t=() peerpub_t=() peerpubl_t=()
for r in $(seq "$PR"); do
    log "publish of $((2 * N)) new files, round $r/$PR"
    "$K" repo init "$WORK/PUB$r" --key "$KEY" --key-dir "$WORK/keys" >/dev/null
    pub_t+=("$(ms "$K" publish --repo "$WORK/PUB$r" "$BIG"/*)")
    if [ -n "$OTHER" ]; then
        "$K" repo init "$WORK/PUBCP$r" --key "$KEY" --key-dir "$WORK/keys" >/dev/null
        pubcp_t+=("$(ms "$K" publish --repo "$WORK/PUBCP$r" "$OTHER"/*)")
    fi
    for flag in "" -l; do
        pp=$WORK/PP$r$flag
        mkdir -p "$pp/pool/debs" "$pp/pool/rpms"
        t=$(ms sh -c "cp $flag '$WORK'/debs/*.deb '$pp/pool/debs/' && cp $flag '$WORK'/rpms/*.rpm '$pp/pool/rpms/' &&
            cd '$pp' && apt-ftparchive packages pool/debs > Packages && createrepo_c --no-database -q pool/rpms")
        if [ -z "$flag" ]; then peerpub_t+=("$t"); else peerpubl_t+=("$t"); fi
    done
done
publish_copy_ms=n/a
[ ${#pubcp_t[@]} -gt 0 ] && publish_copy_ms=$(med "${pubcp_t[@]}")
if [ "${ONLY:-}" = publish ]; then
    pub=$(med "${pub_t[@]}") peer=$(med "${peerpub_t[@]}")
    cat <<EOF

## Publishing $((2 * N)) new files ($N debs + $N rpms): $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), median of $PR

| What | Time (ms) |
|---|---|
| cp into a pool + apt-ftparchive + createrepo_c | $peer |
| cp -l (hard links) into a pool + apt-ftparchive + createrepo_c | $(med "${peerpubl_t[@]}") |
| **keepup publish** into an empty repository (pool: its own copies) | **$pub** |
| keepup publish of the same from another filesystem | $publish_copy_ms |
| **ratio keepup / (cp + apt-ftparchive + createrepo_c)** | **$(awk -v a="$pub" -v b="$peer" 'BEGIN {printf "%.2fx", a / b}')** |
EOF
    exit 0
fi

# ---------------------------------------------------------------------------------------
# 3. One promotion: SMALL vs N packages in unstable (testing small), and N in unstable with
#    N-RUNS already in testing
# ---------------------------------------------------------------------------------------
reprepro_repo() {
    local dir=$1 src=$2 testing=$3
    mkdir -p "$dir/conf"
    for t in unstable testing; do
        printf 'Codename: %s\nArchitectures: amd64\nComponents: main\n\n' "$t"
    done >"$dir/conf/distributions"
    reprepro -b "$dir" -S admin -P optional includedeb unstable "$src"/*.deb >/dev/null 2>&1
    if [ -n "$testing" ]; then
        reprepro -b "$dir" -S admin -P optional includedeb testing "$testing"/*.deb >/dev/null 2>&1
    fi
}
declare -A promote_ms reprepro_ms kt rt
cases="small big big-testing"
for case in $cases; do
    case $case in
    small) src=$WORK/small testing="" ;;
    big) src=$BIG testing="" ;;
    *) src=$BIG testing=$WORK/rest ;;
    esac
    log "promotion, setting up $case"
    "$K" repo init "$WORK/P-$case" --key "$KEY" --key-dir "$WORK/keys" >/dev/null
    "$K" publish --repo "$WORK/P-$case" "$src"/* >/dev/null
    if [ -n "$testing" ]; then
        "$K" publish --repo "$WORK/P-$case" --track testing "$testing"/* >/dev/null
    fi
    reprepro_repo "$WORK/RR-$case" "$src" "$testing"
done
# The cases take turns in every round, so a change in the machine's load hits them alike.
for r in $(seq "$RUNS"); do
    log "promotion, round $r/$RUNS"
    p=pkg$(printf "%0${#N}d" "$r")
    for case in $cases; do
        kt[$case]+=" $(ms "$K" promote --repo "$WORK/P-$case" "$p" --to testing)"
        rt[$case]+=" $(ms reprepro -b "$WORK/RR-$case" copy testing unstable "$p")"
    done
done
for case in $cases; do
    # shellcheck disable=SC2086 # word splitting wanted
    promote_ms[$case]=$(med ${kt[$case]})
    # shellcheck disable=SC2086
    reprepro_ms[$case]=$(med ${rt[$case]})
done

# ---------------------------------------------------------------------------------------
# 4. Signing with both keys of a rotation (issue 11): a promotion into a track of N-RUNS, and
#    `repo refresh` of 3 tracks (N, N-RUNS and N packages), every file fsync'ed
# ---------------------------------------------------------------------------------------
log "rotation: setting up 3 tracks and a rotated key"
"$K" repo init "$WORK/ROT" --key "$KEY" --key-dir "$WORK/keys" >/dev/null
"$K" publish --repo "$WORK/ROT" "$BIG"/* >/dev/null
"$K" publish --repo "$WORK/ROT" --track testing "$WORK/rest"/* >/dev/null
"$K" publish --repo "$WORK/ROT" --track stable "$BIG"/* >/dev/null
"$K" repo rotate-key --repo "$WORK/ROT" --key-dir "$WORK/keys" --overlap 30d >/dev/null
# gpg lists each signature, even by a key it does not have (and then exits non-zero).
{ gpg --verify "$WORK/ROT/fleet.yaml.asc" 2>&1 || true; } | grep -c 'Signature made' | grep -qx 2 ||
    { log "the rotated repository does not sign with two keys"; exit 1; }
rot_promote_t=() rot_refresh_t=()
for r in $(seq "$RUNS"); do
    log "rotation, round $r/$RUNS"
    p=pkg$(printf "%0${#N}d" "$r")
    rot_promote_t+=("$(ms "$K" promote --repo "$WORK/ROT" "$p" --to testing)")
    rot_refresh_t+=("$(ms "$K" repo refresh --repo "$WORK/ROT")")
done

cpus=$(nproc)
load=$(cut -d' ' -f1-3 /proc/loadavg)
cat <<EOF

## Repository benchmark: $N packages (deb + rpm), $cpus cores, load $load, median of $RUNS

| What | Time (ms) |
|---|---|
| apt-ftparchive packages ($N debs) | $(med "${apt_t[@]}") |
| createrepo_c --no-database ($N rpms) | $(med "${cr_t[@]}") |
| **peers combined** (index build, files in place) | **$(med "${peers_t[@]}")** |
| **keepup repo reindex** (3 tracks x APT + DNF + index, signed) | **$(med "${reindex_t[@]}")** |
| cp into a pool + apt-ftparchive + createrepo_c ($((2 * N)) new files) | $(med "${peerpub_t[@]}") |
| cp -l (hard links) into a pool + apt-ftparchive + createrepo_c | $(med "${peerpubl_t[@]}") |
| **keepup publish** of $((2 * N)) new files into an empty repository (pool: its own copies) | **$(med "${pub_t[@]}")** |
| keepup publish of the same from another filesystem | $publish_copy_ms |
| keepup promote, $SMALL packages in unstable, testing small | ${promote_ms[small]} |
| keepup promote, $N packages in unstable, testing small | ${promote_ms[big]} |
| keepup promote, $N packages in unstable, $((N - RUNS)) in testing | ${promote_ms[big-testing]} |
| reprepro copy, $SMALL packages in unstable, testing small | ${reprepro_ms[small]} |
| reprepro copy, $N packages in unstable, testing small | ${reprepro_ms[big]} |
| reprepro copy, $N packages in unstable, $((N - RUNS)) in testing | ${reprepro_ms[big-testing]} |
| **keepup promote, two keys signing** ($N in unstable, $((N - RUNS)) in testing) | **$(med "${rot_promote_t[@]}")** |
| **keepup repo refresh, two keys signing** (3 tracks: $N, $((N - RUNS)), $N packages) | **$(med "${rot_refresh_t[@]}")** |
EOF

# ---------------------------------------------------------------------------------------
# 5. At scale (issue 14): promotion into tracks of 5,000 and 50,000 packages against reprepro
#    and aptly, and a reindex of 200,000 packages in 3 tracks (SCALE=0 skips it)
# ---------------------------------------------------------------------------------------
if [ "${SCALE:-1}" != 0 ]; then
    RUNS=$RUNS PKGS=$PKGS KEEP=$KEEP bash "$ROOT/tests/bench/repo-scale.sh"
fi
