#!/bin/sh
# Runs inside the freshly debootstrapped rootfs (via chroot) to finish the keepup host image.
# Changing this file changes the image tag, so the image is rebuilt.
set -eu

# Smaller image: no package caches or lists (tests that need apt run `apt-get update` first).
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# No locale packages: everything runs in the C.UTF-8 locale built into libc.
# (The image's ENV sets LANG=C.UTF-8; this also covers login shells.)
printf 'LANG=C.UTF-8\n' > /etc/default/locale

# Docker provides these at run time; don't ship the build host's copies.
: > /etc/resolv.conf
: > /etc/hostname

# The tools keepup's packages and tests rely on must be there.
for tool in /usr/sbin/useradd /usr/bin/setpriv /usr/bin/pkill /usr/bin/ps \
            /usr/bin/dpkg /usr/bin/rpm /usr/bin/curl /usr/bin/nc /usr/bin/sleep; do
    if [ ! -x "$tool" ]; then
        echo "finish.sh: $tool is missing from the image" >&2
        exit 1
    fi
done
