# Shared by repo.sh and repo-scale.sh (sourced, after ROOT and log are set): the release
# build of `keepup` (in $K) and the timing helpers.

log "building keepup (release)"
(cd "$ROOT" && cargo build --release -q -p keepup-deploy --bin keepup)
K=${CARGO_TARGET_DIR:-$ROOT/target}/release/keepup

# Milliseconds of wall time of a command (its output discarded).
ms() {
    local s e
    s=$(date +%s%N)
    "$@" >/dev/null 2>&1 || { log "failed: $*"; return 1; }
    e=$(date +%s%N)
    echo $(((e - s) / 1000000))
}
# The median of numbers on stdin, and of the arguments.
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
med() { printf '%s\n' "$@" | median; }
