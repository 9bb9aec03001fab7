#!/usr/bin/env bash
# Repository at scale (issue 14): promotion into large tracks and a full reindex of a large
# repository, keepup side by side with reprepro, aptly and apt-ftparchive, on tiny generated
# .debs (tests/bench/gendebs.py). Called by tests/bench/repo.sh (SCALE=0 skips it); runs on
# its own too:
#
#   bash tests/bench/repo-scale.sh                       # 200,000 packages; promote at 5,000 and 50,000
#   SCALE_N=20000 SCALE_SIZES="5000" RUNS=3 bash tests/bench/repo-scale.sh   # quick
#
# What is timed (wall clock, median of RUNS; the tools take turns in every round):
#   1. one promotion of one package from unstable into testing, for each size S of
#      SCALE_SIZES: unstable holds S packages, testing S-RUNS (all but those promoted):
#        keepup:   `keepup promote --repo R gpkgX --to testing` (signed views, 4 signatures);
#        reprepro: `reprepro copy testing unstable gpkgX` (unsigned);
#        aptly:    `aptly repo copy unstable testing gpkgX` + `aptly publish update testing`
#                  (unsigned; aptly's published view is what clients read).
#   2. SCALE_N packages in each of 3 tracks (testing without the RUNS promoted ones):
#        keepup:   `keepup repo reindex` (3 tracks, every view signed), with the chunk cache
#                  (the normal case) and once with `--fresh` (the cache dropped, every chunk
#                  rendered from the pool metadata); one promotion into the SCALE_N-package testing;
#        peer:     `apt-ftparchive packages` of the SCALE_N files (one track's Packages; the
#                  set is .debs only).
#
# Environment: SCALE_N, SCALE_SIZES, RUNS (default 5), PKGS=DIR keeps the generated packages
# for the next run, KEEP=1 keeps the work directory. Progress on stderr, the table on stdout.
set -euo pipefail

SCALE_N=${SCALE_N:-200000}
SCALE_SIZES=${SCALE_SIZES:-5000 50000}
RUNS=${RUNS:-5}
KEEP=${KEEP:-0}
for v in SCALE_N RUNS; do
    case ${!v} in '' | *[!0-9]* | 0) echo "$v must be a positive integer" >&2; exit 2 ;; esac
done
for s in $SCALE_SIZES; do
    case $s in *[!0-9]* | 0) echo "SCALE_SIZES must be positive integers, got $s" >&2; exit 2 ;; esac
    [ "$s" -le "$SCALE_N" ] && [ "$s" -gt "$RUNS" ] ||
        { echo "each of SCALE_SIZES must be above RUNS and at most SCALE_N ($SCALE_N)" >&2; exit 2; }
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[repo-scale] %s\n' "$*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keepup-repo-scale.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

need=()
command -v apt-ftparchive >/dev/null || need+=(apt-utils)
command -v reprepro >/dev/null || need+=(reprepro)
command -v aptly >/dev/null || need+=(aptly)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    bash "$ROOT/tests/ensure-packages.sh" "${need[@]}"
fi

. "$ROOT/tests/bench/repo-lib.sh"
name() { printf 'gpkg%0*d' "${#SCALE_N}" "$1"; }

PKGS=${PKGS:-$WORK/pkgs}
DEBS=$PKGS/scale-$SCALE_N
if [ -f "$DEBS.done" ]; then
    log "reusing the $SCALE_N packages in $DEBS"
else
    log "generating $SCALE_N packages in $DEBS"
    rm -rf "$DEBS" && mkdir -p "$DEBS"
    python3 "$ROOT/tests/bench/gendebs.py" "$DEBS" "$SCALE_N"
    touch "$DEBS.done"
fi
ls "$DEBS" >"$WORK/all"

# A directory of the first $1 packages, leaving out the first $2: hard links, or copies when
# PKGS is on another filesystem.
link=ln
ln "$DEBS/$(head -n 1 "$WORK/all")" "$WORK/probe" 2>/dev/null || link="cp"
rm -f "$WORK/probe"
subset() {
    local dir=$WORK/set-$1-$2
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir"
        head -n "$1" "$WORK/all" | tail -n +"$(($2 + 1))" | (cd "$DEBS" && xargs $link -t "$dir")
    fi
    echo "$dir"
}

keepup_repo() { # dir src testing [stable]
    "$K" repo init "$1" --key-dir "$WORK/keys" >/dev/null
    find "$2" -name '*.deb' -print0 | xargs -0 "$K" publish --repo "$1" >/dev/null
    find "$3" -name '*.deb' -print0 | xargs -0 "$K" publish --repo "$1" --track testing >/dev/null
    if [ -n "${4:-}" ]; then
        find "$4" -name '*.deb' -print0 | xargs -0 "$K" publish --repo "$1" --track stable >/dev/null
    fi
}
reprepro_repo() { # dir src testing
    mkdir -p "$1/conf"
    for t in unstable testing; do
        printf 'Codename: %s\nArchitectures: amd64\nComponents: main\n\n' "$t"
    done >"$1/conf/distributions"
    find "$2" -name '*.deb' -print0 | xargs -0 reprepro -b "$1" -S admin -P optional includedeb unstable >/dev/null 2>&1
    find "$3" -name '*.deb' -print0 | xargs -0 reprepro -b "$1" -S admin -P optional includedeb testing >/dev/null 2>&1
}
aptly_repo() { # dir src testing
    mkdir -p "$1"
    printf '{"rootDir": "%s", "architectures": ["amd64"], "gpgDisableSign": true}\n' "$1/root" >"$1/aptly.conf"
    local a=(aptly -config="$1/aptly.conf")
    "${a[@]}" repo create -distribution=unstable unstable >/dev/null
    "${a[@]}" repo create -distribution=testing testing >/dev/null
    "${a[@]}" repo add -force-replace unstable "$2" >/dev/null 2>&1
    "${a[@]}" repo add -force-replace testing "$3" >/dev/null 2>&1
    "${a[@]}" publish repo -skip-signing -architectures=amd64 testing >/dev/null 2>&1
}
aptly_promote() { # dir package
    local a=(aptly -config="$1/aptly.conf")
    "${a[@]}" repo copy unstable testing "$2" && "${a[@]}" publish update -skip-signing testing
}

# ---------------------------------------------------------------------------------------
# 1. One promotion into a track of S packages
# ---------------------------------------------------------------------------------------
declare -A kt rt at
for s in $SCALE_SIZES; do
    src=$(subset "$s" 0)
    rest=$(subset "$s" "$RUNS")
    log "promotion at $s: setting up keepup"
    keepup_repo "$WORK/K-$s" "$src" "$rest"
    log "promotion at $s: setting up reprepro"
    reprepro_repo "$WORK/RR-$s" "$src" "$rest"
    log "promotion at $s: setting up aptly"
    aptly_repo "$WORK/A-$s" "$src" "$rest"
done
for r in $(seq "$RUNS"); do
    log "promotion, round $r/$RUNS"
    p=$(name "$r")
    for s in $SCALE_SIZES; do
        kt[$s]+=" $(ms "$K" promote --repo "$WORK/K-$s" "$p" --to testing)"
        rt[$s]+=" $(ms reprepro -b "$WORK/RR-$s" copy testing unstable "$p")"
        at[$s]+=" $(ms aptly_promote "$WORK/A-$s" "$p")"
    done
done

# ---------------------------------------------------------------------------------------
# 2. SCALE_N packages in 3 tracks: reindex, and a promotion into the big testing
# ---------------------------------------------------------------------------------------
all=$(subset "$SCALE_N" 0)
rest=$(subset "$SCALE_N" "$RUNS")
log "reindex: publishing $SCALE_N packages into 3 tracks"
s0=$(date +%s%N)
keepup_repo "$WORK/BIG" "$all" "$rest" "$all"
publish3_s=$((($(date +%s%N) - s0) / 1000000000))
apt_t=() reindex_t=() bigpromote_t=()
for r in $(seq "$RUNS"); do
    log "reindex, round $r/$RUNS"
    apt_t+=("$(ms sh -c "cd '$all' && apt-ftparchive packages . > '$WORK/Packages'")")
    reindex_t+=("$(ms "$K" repo reindex --repo "$WORK/BIG")")
    bigpromote_t+=("$(ms "$K" promote --repo "$WORK/BIG" "$(name "$r")" --to testing)")
done
log "reindex without the chunk cache"
cold_ms=$(ms "$K" repo reindex --fresh --repo "$WORK/BIG")
"$K" repo verify --repo "$WORK/BIG" >/dev/null || { log "repo verify failed"; exit 1; }
# Only Packages.gz is written (the Release lists the uncompressed size): measure it decompressed.
pkgs_mb=$(($(gzip -dc "$WORK/BIG/dists/unstable/main/binary-amd64/Packages.gz" | wc -c) / 1000000))
gz_mb=$(($(stat -c %s "$WORK/BIG/dists/unstable/main/binary-amd64/Packages.gz") / 1000000))

cat <<EOF

## Repository at scale: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), median of $RUNS

| What | Time (ms) |
|---|---|
EOF
for s in $SCALE_SIZES; do
    # shellcheck disable=SC2086 # word splitting wanted
    echo "| **keepup promote** into a track of $s packages | **$(med ${kt[$s]})** |"
    # shellcheck disable=SC2086
    echo "| reprepro copy, the same | $(med ${rt[$s]}) |"
    # shellcheck disable=SC2086
    echo "| aptly repo copy + publish update, the same | $(med ${at[$s]}) |"
done
cat <<EOF
| **keepup promote** into a track of $SCALE_N packages (3 tracks of $SCALE_N) | **$(med "${bigpromote_t[@]}")** |
| **keepup repo reindex**, 3 tracks of $SCALE_N packages, chunk cache in place | **$(med "${reindex_t[@]}")** |
| keepup repo reindex, the same, chunk cache removed (once) | $cold_ms |
| apt-ftparchive packages, $SCALE_N debs (one track) | $(med "${apt_t[@]}") |
| (publishing the $SCALE_N files into the 3 tracks, once, seconds) | $publish3_s |
| (one track's Packages / Packages.gz, MB) | $pkgs_mb / $gz_mb |
EOF
