#!/usr/bin/env bash
# The main job, on the embedded default: build keepup and the example service, then pack the
# example spec (docs/examples/foo.yaml) into dist/foo_1.0.0-1_amd64.deb and
# dist/foo-1.0.0-1.x86_64.rpm, and show what they hold.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p keepup-deploy -p keepup-tests --bin keepup --bin food
target/release/keepup pack docs/examples/foo.yaml --out dist
echo
if command -v dpkg-deb >/dev/null; then
    for deb in dist/foo_*.deb; do
        echo "== $deb"
        dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
        dpkg-deb --contents "$deb" | awk '{print "   " $1, $2, $6}'
    done
fi
echo
echo "Next: install it on a Debian host (dpkg -i dist/foo_*.deb) and run /usr/sbin/run-foo,"
echo "or read docs/spec.md to write a spec for your own service."
