#!/usr/bin/env bash
# The main job on this machine, with no internet but package registries: builds fd, builds a
# real multi-layer Debian image from Debian packages (cached after the first run), serves it
# from a real registry on 127.0.0.1, and pulls it with fd into a fresh store.
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bash scripts/install-deps.sh
cargo build --release -q -p fd-cli
FD=$PWD/target/release/fd
bash tests/images/build.sh >/dev/null
CACHE=${FD_TEST_CACHE:-$PWD/.cache/images}

work=$(mktemp -d)
cleanup() { stop_registry; rm -rf "$work"; }
trap cleanup EXIT
start_registry "$work/registry"
push_image "$CACHE/debian-python" bookworm debian-python:bookworm
echo "registry on $REGISTRY with debian-python:bookworm"

export FD_HOME=$work/store
"$FD" pull "$REGISTRY/debian-python:bookworm"
"$FD" images
"$FD" inspect "$REGISTRY/debian-python:bookworm" | jq '{digest, layers: [.layers[] | {digest, size, files}], chunks}'
"$FD" pull "$REGISTRY/debian-python:bookworm"
