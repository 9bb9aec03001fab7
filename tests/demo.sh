#!/usr/bin/env bash
# The main job, on the embedded default: build keepup, keepup-agent and the example service,
# then run a small fleet of Debian host containers (2 on testing, 3 on stable, one of them an
# RPM host) against `keepup serve` over HTTPS (a private CA and a server certificate made with
# openssl in target/keepup-demo/pki; the agents trust the CA as `ca_file`), publish and promote
# the example service `foo`, and show the fleet converging in `keepup report` and on the page
# https://127.0.0.1:8080/.
# Ctrl-C removes every container. Needs Docker (no registry: the host image is built locally
# with debootstrap on first use).
#
#   bash tests/demo.sh            # run until Ctrl-C
#   bash tests/demo.sh --once     # stop once the fleet has converged
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(debootstrap rpm gnupg xz-utils zstd curl openssl)
bash tests/ensure-packages.sh "${packages[@]}"
if ! docker info >/dev/null 2>&1; then
    echo "demo: Docker is required: start the Docker daemon (docker info must work)" >&2
    exit 1
fi
cargo build --workspace --bins
exec target/debug/keepup-demo "$@"
