#!/usr/bin/env bash
# The test command: installs what the tests need, then runs format and lint checks and every
# test of the workspace (unit, property and end-to-end tests against a real local registry).
#
#   bash tests/run.sh
#
# Test images are built once from Debian packages and cached in .cache/images (see
# tests/images/build.sh); delete that folder to rebuild them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== test images"
bash tests/images/build.sh

echo "== cargo build (the fd binary the end-to-end tests run)"
cargo build --locked -p fd-cli

echo "== cargo test"
# Two test threads: the end-to-end tests run registries and real image pulls, and this
# machine class has two cores.
cargo test --workspace --locked -- --test-threads=2
echo "== comparison suite, quick mode (fails only if the suite itself breaks, not if fd is slower)"
FD=target/debug/fd bash benches/compare.sh --quick
