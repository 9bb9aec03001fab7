#!/usr/bin/env bash
# Runs every dependency proof (each is its own cargo project, outside the keepup workspace)
# and prints a summary. Exit 0 only if every proof holds.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/keepup-proofs-target}
declare -a names results
run() {
    local name=$1; shift
    echo "################ $name: $*"
    local start=$(date +%s)
    ( cd "$here/$name" && "$@" )
    local rc=$?
    names+=("$name"); results+=("$([ $rc = 0 ] && echo HOLDS || echo "FAILED (exit $rc)") in $(( $(date +%s) - start )) s")
}
run debian-packaging bash run.sh
run serde_yaml cargo test --test proof -- --nocapture --test-threads=1
run cron cargo test --test proof -- --nocapture --test-threads=1
echo
echo "================ summary"
fail=0
for i in "${!names[@]}"; do
    printf '%-18s %s\n' "${names[$i]}" "${results[$i]}"
    case ${results[$i]} in HOLDS*) ;; *) fail=1 ;; esac
done
exit $fail
