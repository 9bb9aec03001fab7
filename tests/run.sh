#!/usr/bin/env bash
# Runs every keepup test on a fresh Debian 12 machine: installs the tools the tests drive
# (dpkg, lintian, rpm, rpmlint, debootstrap, gnupg, ...), builds the workspace, and runs all test
# suites. Fleet tests build the Debian host image (debootstrap + docker import) on first use.
#
#   bash tests/run.sh                          # everything
#   KEEPUP_SKIP_DOCKER_TESTS=1 bash tests/run.sh   # explicitly skip the container tests
#   KEEPUP_SKIP_S3_TESTS=1 bash tests/run.sh       # explicitly skip the S3 (`repo sync`) tests
#   bash tests/run.sh -p keepup-packager       # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(debootstrap lintian rpm rpmlint gnupg zstd xz-utils binutils cpio netcat-openbsd curl apt-utils createrepo-c python3 openssl chromium fonts-dejavu-core postgresql)
bash tests/ensure-packages.sh "${packages[@]}"

if [ "${KEEPUP_SKIP_DOCKER_TESTS:-}" = 1 ]; then
    echo "tests/run.sh: KEEPUP_SKIP_DOCKER_TESTS=1: container (fleet) tests will be skipped" >&2
elif ! docker info >/dev/null 2>&1; then
    echo "tests/run.sh: Docker is required for the fleet tests: start the Docker daemon, or set KEEPUP_SKIP_DOCKER_TESTS=1 to skip them explicitly" >&2
    exit 1
fi

# `keepup repo sync` is tested against moto, a real S3-compatible server from PyPI, in its own
# virtualenv (tests/src/s3.rs finds it there; KEEPUP_MOTO_VENV overrides the place).
if [ "${KEEPUP_SKIP_S3_TESTS:-}" = 1 ]; then
    echo "tests/run.sh: KEEPUP_SKIP_S3_TESTS=1: the S3 (repo sync) tests will be skipped" >&2
else
    moto_venv="${KEEPUP_MOTO_VENV:-$HOME/.cache/keepup/moto-py311}"
    if [ ! -x "$moto_venv/bin/moto_server" ]; then
        bash tests/ensure-packages.sh python3 python3-venv
        python3 -m venv "$moto_venv"
        "$moto_venv/bin/pip" install --quiet 'moto[server]>=5,<6'
    fi
fi

# Tests copy workspace binaries (food, keepup-agent, keepup) into host containers.
cargo build --workspace --bins
cargo test --workspace "$@"
