#!/usr/bin/env bash
# Prints the reference of the systemd host image the container tests use (tests/src/systemd.rs:
# Debian 12 minbase + systemd, `docker import`, no registry), building it first if Docker does
# not have it. The recipe and the tag must stay those of tests/src/systemd.rs, so the tests
# and this benchmark share one image.
set -euo pipefail
RECIPE='keepup-systemd/1 bookworm minbase'
PACKAGES='systemd,systemd-sysv,dbus,procps,netcat-openbsd'
MIRROR=${KEEPUP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
tag=$(printf '%s\n%s' "$RECIPE" "$PACKAGES" | sha256sum | cut -c1-12)
ref="keepup-systemd:$tag"
if docker image inspect "$ref" >/dev/null 2>&1; then echo "$ref"; exit 0; fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
# Same lock file as the tests, so a test and this script never build it twice at once.
exec 9>"${TMPDIR:-/tmp}/keepup-systemd-image.lock"
flock 9
if docker image inspect "$ref" >/dev/null 2>&1; then echo "$ref"; exit 0; fi
echo "building systemd host image $ref (debootstrap, ~2 min)..." >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/keepup-systemd-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; echo "debootstrap failed" >&2; exit 1; }
chroot "$work/rootfs" /bin/sh -c 'apt-get clean; rm -rf /var/lib/apt/lists/*; : > /etc/machine-id;
    systemctl mask getty@tty1.service console-getty.service systemd-logind.service >/dev/null 2>&1 || true'
tar -C "$work/rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV container=docker' \
    --change 'CMD ["/lib/systemd/systemd"]' - "$ref" >/dev/null
echo "$ref"
