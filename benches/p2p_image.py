#!/usr/bin/env python3
"""Writes an OCI image layout holding one single-layer image of incompressible data.

    p2p_image.py DIR TAG SIZE_MIB [--gzip]

The layer is a tar with one file, data/random.bin, of SIZE_MIB MiB from os.urandom, so no
tool can win by compressing it. By default the layer is stored as a plain tar (media type
...layer.v1.tar): its blob is then the same bytes a plain HTTP server sends in the comparison,
with no gzip work on either side. --gzip stores it gzip-compressed (level 1) instead, like
most registry layers. Prints one JSON line: the layer's digest, size, media type and path.
"""

import gzip
import hashlib
import json
import os
import platform
import sys
import tarfile

STEP = 4 << 20


class RandomReader:
    """A file-like source of `size` random bytes, read by tarfile in pieces."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        if n < 0 or n > self.left:
            n = self.left
        self.left -= n
        return os.urandom(n)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(STEP):
            h.update(block)
    return h.hexdigest()


def put_blob(root, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return f"sha256:{digest}", len(data)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 3:
        sys.exit(__doc__)
    root, tag, size_mib = args[0], args[1], int(args[2])
    use_gzip = "--gzip" in sys.argv[1:]
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    tar_path = os.path.join(root, "layer.tar")
    with open(tar_path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=STEP) as tar:
            d = tarfile.TarInfo("data")
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(d)
            f = tarfile.TarInfo("data/random.bin")
            f.size, f.mode, f.mtime = size_mib << 20, 0o644, 0
            tar.addfile(f, RandomReader(f.size))
    diff_id = "sha256:" + sha256_file(tar_path)

    if use_gzip:
        gz_path = tar_path + ".gz"
        with open(tar_path, "rb") as src, open(gz_path, "wb") as raw:
            # mtime 0 and no file name keep the gzip header free of anything but the data.
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0) as dst:
                while block := src.read(STEP):
                    dst.write(block)
        os.remove(tar_path)
        layer_path, media = gz_path, "application/vnd.oci.image.layer.v1.tar+gzip"
    else:
        layer_path, media = tar_path, "application/vnd.oci.image.layer.v1.tar"
    layer_hex = sha256_file(layer_path)
    layer_size = os.path.getsize(layer_path)
    final = os.path.join(blobs, layer_hex)
    os.replace(layer_path, final)

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    cfg_digest, cfg_size = put_blob(root, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cfg_digest,
            "size": cfg_size,
        },
        "layers": [{"mediaType": media, "digest": f"sha256:{layer_hex}", "size": layer_size}],
    }
    man_digest, man_size = put_blob(root, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_digest,
                "size": man_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(
        json.dumps(
            {
                "layer_digest": f"sha256:{layer_hex}",
                "layer_size": layer_size,
                "media_type": media,
                "layer_path": final,
                "manifest_digest": man_digest,
            }
        )
    )


if __name__ == "__main__":
    main()
