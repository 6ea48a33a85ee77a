#!/usr/bin/env bash
# Installs the Debian packages fd's tests and demo need: a registry, image tools to build and
# push real test images, FUSE, and the runtimes fd is compared against. Idempotent and quiet.
set -euo pipefail

packages=(docker-registry skopeo umoci podman runc fuse3 busybox-static debootstrap containerd
  hyperfine libseccomp-dev pkg-config attr libcap2-bin curl apache2-utils jq iproute2 time uidmap)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: these packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
