#!/usr/bin/env bash
# Publish of many new .debs, in CPU time (user + system) and wall time, against the peers:
#
#   bash tests/bench/publish-debs.sh                   # 10,000 .debs from gendebs.py, 3 rounds
#   N=10000 ROUNDS=3 BASE=/path/to/old/keepup bash tests/bench/publish-debs.sh
#
# Each round, taking turns (so a change of the machine's load hits all alike): `keepup
# publish` of the N files into a new, empty repository (and, with BASE=, the same by another
# keepup binary, for a before/after), then `cp` of the same files into a pool directory
# followed by `apt-ftparchive packages` of that pool (the peers; createrepo_c has nothing to
# do without rpms, see repo.sh, ONLY=publish, for debs and rpms). CPU is what
# `/usr/bin/time` reports for the process and its threads: on a machine shared with other
# work it varies far less than wall time. PKGS=DIR keeps the generated .debs in DIR for the
# next run; KEEP=1 keeps the work directory. The results table goes to stdout.
set -euo pipefail

N=${N:-10000}
ROUNDS=${ROUNDS:-3}
KEEP=${KEEP:-0}
for v in N ROUNDS; do
    case ${!v} in '' | *[!0-9]* | 0) echo "$v must be a positive integer" >&2; exit 2 ;; esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[publish-bench] %s\n' "$*" >&2; }
command -v apt-ftparchive >/dev/null || {
    log "installing apt-utils"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends apt-utils >/dev/null
}
. "$ROOT/tests/bench/repo-lib.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keepup-publish-bench.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

PKGS=${PKGS:-$WORK/debs}
if [ "$(find "$PKGS" -name '*.deb' 2>/dev/null | wc -l)" != "$N" ]; then
    rm -rf "$PKGS"
    log "generating $N .debs in $PKGS"
    python3 "$ROOT/tests/bench/gendebs.py" "$PKGS" "$N" >&2
fi

# "user sys wall" (seconds) of a command, its output discarded.
cpu() {
    /usr/bin/time -f '%U %S %e' -o "$WORK/time" "$@" >/dev/null 2>&1 || { log "failed: $*"; return 1; }
    cat "$WORK/time"
}
bins=("$K")
[ -n "${BASE:-}" ] && bins+=("$BASE")
declare -A rows
for r in $(seq "$ROUNDS"); do
    log "round $r/$ROUNDS"
    for i in "${!bins[@]}"; do
        repo=$WORK/R$r-$i
        "${bins[$i]}" repo init "$repo" --key-dir "$WORK/keys$r-$i" >/dev/null 2>&1
        rows[$i]+="$(cpu "${bins[$i]}" publish --repo "$repo" "$PKGS"/*.deb);"
        "${bins[$i]}" repo verify --repo "$repo" >/dev/null
    done
    pool=$WORK/P$r
    mkdir -p "$pool/pool/debs"
    c=$(cpu cp "$PKGS"/*.deb "$pool/pool/debs/")
    a=$(cd "$pool" && cpu apt-ftparchive packages pool/debs)
    rows[peers]+="$(echo "$c $a" | awk '{printf "%.2f %.2f %.2f", $1 + $4, $2 + $5, $3 + $6}');"
done
# "user sys wall; ..." -> "CPU s (user + sys) per round | wall s per round | median CPU"
fmt() {
    local m
    m=$(tr ';' '\n' <<<"$1" | awk 'NF {printf "%.2f\n", $1 + $2}' | median)
    tr ';' '\n' <<<"$1" | awk -v m="$m" 'NF {c = c sep sprintf("%.2f", $1 + $2); w = w sep $3; sep = " / "}
        END {printf "%s | %s | %s", c, w, m}'
}
med_cpu() { fmt "$1" | awk -F' [|] ' '{print $3}'; }
cat <<EOF

## Publish of $N new .debs: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds

| What | CPU s (user + sys), per round | wall s, per round | median CPU |
|---|---:|---:|---:|
| keepup publish ($K) | $(fmt "${rows[0]}") |
EOF
[ -n "${BASE:-}" ] && echo "| keepup publish ($BASE) | $(fmt "${rows[1]}") |"
cat <<EOF
| cp into a pool + apt-ftparchive packages | $(fmt "${rows[peers]}") |
| **ratio keepup / peers (median CPU)** | | | **$(awk -v a="$(med_cpu "${rows[0]}")" -v b="$(med_cpu "${rows[peers]}")" 'BEGIN {printf "%.2fx", a / b}')** |
EOF
