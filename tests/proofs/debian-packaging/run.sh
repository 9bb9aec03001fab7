#!/usr/bin/env bash
# Proof: debian-packaging 0.18's DebBuilder writes an md5sums member whose digests are raw
# bytes, not hex. Builds a one-file .deb with the crate, then lets the real tools judge it.
# Exit 0: defect reproduced (the proof holds). Exit 1: the crate wrote a correct md5sums
# (reconsider the choice). Exit 2: the proof could not run.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/keepup-proofs-target}
tmp=$(mktemp -d /tmp/keepup-proof-deb.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$here" || exit 2

echo "== crates pulled by debian-packaging 0.18 (default-features = false)"
ncrates=$(cargo tree -e normal,build --prefix none 2>/dev/null | sed 's/ (\*)$//; s/ (proc-macro)$//' | sort -u | wc -l)
echo "unique packages in cargo tree (normal+build, incl. this proof): $ncrates"

echo "== cargo build --release"
start=$(date +%s)
cargo build --release --quiet || { echo "PROOF NOT RUN: build failed"; exit 2; }
echo "build time: $(( $(date +%s) - start )) s (0 if already built)"

deb=$tmp/hello_1.0-1_amd64.deb
"$CARGO_TARGET_DIR/release/proof-debian-packaging" "$deb" || exit 2

echo "== dpkg-deb --info"
dpkg-deb --info "$deb"

echo "== md5sums member (od -c): expected '<32 hex digits>  usr/bin/hello'"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./md5sums > "$tmp/md5sums" || exit 2
od -c "$tmp/md5sums"
mkdir -p "$tmp/data" && dpkg-deb -x "$deb" "$tmp/data" || exit 2
echo "real md5 of usr/bin/hello: $(cd "$tmp/data" && md5sum usr/bin/hello)"
hex_ok=0
LC_ALL=C grep -Eq '^[0-9a-f]{32}  usr/bin/hello$' "$tmp/md5sums" && hex_ok=1

echo "== dpkg -i into a throwaway root (dpkg does not check md5sums at install), then dpkg --verify"
root=$tmp/root
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
: > "$root/var/lib/dpkg/status"; : > "$root/var/lib/dpkg/available"
dpkg --root="$root" --force-not-root --force-script-chrootless --force-depends -i "$deb" 2>&1 | sed 's/^/  /'
echo "installed: $(ls "$root/usr/bin/hello" 2>&1)"
dpkg --root="$root" --force-not-root --verify hello > "$tmp/verify" 2>&1
verify_rc=$?
sed 's/^/  /' "$tmp/verify"; echo "  dpkg --verify exit status: $verify_rc"

echo "== lintian"
lintian_hit=0
if command -v lintian >/dev/null; then
    lintian --tag-display-limit 0 "$deb" > "$tmp/lintian" 2>&1
    sed 's/^/  /' "$tmp/lintian"
    grep -q 'malformed-md5sums-control-file' "$tmp/lintian" && lintian_hit=1
else
    echo "  lintian not installed"
fi

echo
if [ "$hex_ok" = 1 ]; then
    echo "PROOF FAILED: debian-packaging wrote a hex md5sums line; the crate may be fixed -> reconsider"
    exit 1
fi
if [ "$lintian_hit" = 1 ]; then
    echo "PROOF: debian-packaging 0.18 writes md5sums that are not hex digests -> rejected (lintian: malformed-md5sums-control-file)"
    exit 0
fi
if [ "$verify_rc" != 0 ]; then
    echo "PROOF: debian-packaging 0.18 writes md5sums that are not hex digests -> rejected (dpkg --verify exit $verify_rc)"
    exit 0
fi
echo "PROOF INCONCLUSIVE: md5sums is not hex, but neither lintian nor dpkg --verify complained"
exit 2
