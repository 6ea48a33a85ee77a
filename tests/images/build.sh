#!/usr/bin/env bash
# Builds the OCI images that fd's end-to-end tests push to a loopback registry and pull back.
#
#   tests/images/build.sh [--big] [CACHE_DIR]
#
# --big (or FD_BIG_IMAGE=1) also builds debian-big (see below). It is left out by default
# because it downloads and packs about half a gigabyte, which the tests do not need.
#
# CACHE_DIR defaults to $FD_TEST_CACHE, else <repo>/.cache/images. The images are made here from
# Debian packages because the tests cannot reach any container registry on the internet.
#
# Outputs (all under CACHE_DIR):
#   busybox/               OCI layout, tag latest: one gzip layer, static busybox + applet links
#   busybox-raw/           the same image with uncompressed layers
#   busybox-docker.tar     the same image as a docker-archive (`docker save` format)
#   busybox-oci.tar        the same image as an oci-archive (a tar of the layout)
#   debian-python/         OCI layout, tag bookworm: three gzip layers (see layer 3 below)
#   debian-python-zstd/    the same image with zstd layers
#   summary.txt            digests and sizes of the above
#   debian-big/            only with --big: OCI layout, tag bookworm: layer 1 of debian-python,
#                          then python3, numpy, pandas and build-essential, then a padding file
#                          that no workload reads (over 400 MB unpacked); its own stamp
#                          .stamp-big, so building it never touches the images above
#
# The cache counts as complete only when .stamp holds the sha256 of this script: any edit here
# rebuilds everything. Everything is built in a scratch dir inside CACHE_DIR and moved into place
# at the end, and the stamp is written last, so an interrupted build never looks complete.
# Downloaded .deb files are kept in CACHE_DIR/.debs to make rebuilds cheaper on the network.
#
# Needs root (debootstrap, chroot, mknod, chown). Mounts for the chroot live in a private mount
# namespace (unshare), so they vanish with it even if this script is killed.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/../.." && pwd)
BIG=${FD_BIG_IMAGE:-0}
POSITIONAL=()
for arg in "$@"; do
	case $arg in
	--big) BIG=1 ;;
	*) POSITIONAL+=("$arg") ;;
	esac
done
CACHE=${POSITIONAL[0]:-${FD_TEST_CACHE:-$REPO/.cache/images}}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
OUTPUTS=(busybox busybox-raw busybox-docker.tar busybox-oci.tar debian-python debian-python-zstd
	summary.txt)

say() { printf '[images] %s\n' "$*"; }
die() {
	printf '[images] error: %s\n' "$*" >&2
	exit 1
}

case "$CACHE" in
*[[:space:]]*) die "the cache path must not contain whitespace: '$CACHE'" ;;
esac

# Tools, each with the Debian package that provides it.
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (package $2)"); }
need sha256sum coreutils
need flock util-linux
need unshare util-linux
need mount mount
need umoci umoci
need skopeo skopeo
need jq jq
need python3 python3
need tar tar
need gzip gzip
need debootstrap debootstrap
need chroot coreutils
need setcap libcap2-bin
need getcap libcap2-bin
need setfattr attr
need getfattr attr
need mknod coreutils
need mkfifo coreutils
[ -x /bin/busybox ] || missing+=("/bin/busybox (package busybox-static)")
if [ ${#missing[@]} -gt 0 ]; then
	die "missing tools: ${missing[*]}"
fi

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
WANT=$(sha256sum "$SCRIPT" | cut -d' ' -f1)

############################################################################################
# debian-big (only with --big): a large image for start-time comparisons. It runs before the
# code below and ends the script, so the images above are built exactly as without --big.
############################################################################################
if [ "$BIG" = 1 ]; then
	# The normal images first (a no-op when cached): layer 1 comes from debian-python.
	FD_BIG_IMAGE=0 bash "$SCRIPT" "$CACHE"
	exec 8>"$CACHE/.build-big.lock"
	flock 8
	big_src=$CACHE/debian-python
	big_src_manifest=$(jq -er '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == "bookworm") | .digest' "$big_src/index.json")
	# Rebuilt when this script or the debian-python image it starts from changes.
	big_want="$WANT $big_src_manifest"
	if [ -f "$CACHE/.stamp-big" ] && [ "$(cat "$CACHE/.stamp-big")" = "$big_want" ] &&
		[ -d "$CACHE/debian-big" ]; then
		say "debian-big: up to date in $CACHE"
		exit 0
	fi
	[ "$(id -u)" = 0 ] || die "building debian-big needs root (chroot, mounts)"
	big_start=$(date +%s)
	for stale in "$CACHE"/.big.*; do
		[ -d "$stale" ] || continue
		if awk -v d="$stale/" 'index($2 "/", d) == 1 { f = 1 } END { exit !f }' /proc/self/mounts; then
			die "something is still mounted under $stale; not deleting it"
		fi
		rm -rf "$stale"
	done
	rm -f "$CACHE/.stamp-big"
	BW=$(mktemp -d "$CACHE/.big.XXXXXX")
	# Every mount below is made inside `unshare --mount`, so none can outlive the build; the
	# check only guards against deleting a tree that still has /dev bound into it.
	# shellcheck disable=SC2317 # reached through the trap
	big_cleanup() {
		local rc=$?
		if awk -v d="$BW/" 'index($2 "/", d) == 1 { f = 1 } END { exit !f }' /proc/self/mounts; then
			printf '[images] error: mounts left under %s; leaving it in place\n' "$BW" >&2
		else
			rm -rf "$BW"
		fi
		[ "$rc" -eq 0 ] || printf '[images] debian-big build failed (exit %s)\n' "$rc" >&2
		exit "$rc"
	}
	trap big_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	export TMPDIR=$BW
	: >"$BW/registries.conf"
	export CONTAINERS_REGISTRIES_CONF=$BW/registries.conf
	mkdir -p "$CACHE/.debs/apt-big"
	L=$BW/layout
	umoci --log error init --layout "$L"
	umoci --log error new --image "$L:empty"

	# Layer 1: the very same debootstrap tree as debian-python's first layer (same diff id, so
	# fd stores its chunks once for both images).
	say "debian-big layer 1: debian-python's debootstrap layer"
	big_m=$big_src/blobs/sha256/${big_src_manifest#sha256:}
	big_l1=$(jq -er '.layers[0].digest' "$big_m")
	gzip -dc "$big_src/blobs/sha256/${big_l1#sha256:}" >"$BW/layer1.tar"
	umoci --log error raw add-layer --image "$L:empty" --tag base \
		--history.created_by "debootstrap --variant=minbase $SUITE (from debian-python)" "$BW/layer1.tar"
	rm -f "$BW/layer1.tar"

	# Layer 2: the packages, installed with apt in a chroot as for debian-python.
	say "debian-big layer 2: apt-get install python3 numpy pandas build-essential (log: apt-big.log)"
	umoci --log error unpack --image "$L:base" "$BW/bundle" >/dev/null
	R=$BW/bundle/rootfs
	cp "$CACHE"/.debs/apt-big/*.deb "$R/var/cache/apt/archives/" 2>/dev/null || true
	cp /etc/resolv.conf "$R/etc/resolv.conf"
	# shellcheck disable=SC2016 # expanded by the inner shell
	if ! unshare --mount --propagation private -- bash -euo pipefail -c '
		R=$1
		undo() {
			umount -R "$R/dev" 2>/dev/null || true
			umount "$R/proc" 2>/dev/null || true
		}
		trap undo EXIT
		mount -t proc proc "$R/proc"
		mount --rbind /dev "$R/dev"
		mount --make-rslave "$R/dev"
		run() {
			chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
				DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"
		}
		run apt-get update -q
		run apt-get install -y -q --no-install-recommends python3 python3-numpy python3-pandas \
			build-essential
		run python3 -c "import pandas; print(pandas.__version__)"
		printf "#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n" >"$R/tmp/h.c"
		run gcc -o /tmp/h /tmp/h.c
		run /tmp/h
		rm -f "$R/tmp/h.c" "$R/tmp/h"
	' _ "$R" >"$BW/apt-big.log" 2>&1; then
		tail -n 30 "$BW/apt-big.log" >&2
		die "installing the debian-big packages in the chroot failed"
	fi
	cp -n "$R"/var/cache/apt/archives/*.deb "$CACHE/.debs/apt-big/" 2>/dev/null || true
	rm -rf "${R:?}"/var/cache/apt/archives/*.deb "${R:?}"/var/cache/apt/*.bin \
		"${R:?}"/var/lib/apt/lists/* "${R:?}/etc/resolv.conf"
	find "${R:?}/dev" -mindepth 1 -delete
	umoci --log error repack --refresh-bundle --image "$L:layer2" \
		--history.created_by "apt-get install --no-install-recommends python3 python3-numpy python3-pandas build-essential" \
		"$BW/bundle"

	# Layer 3: 128 MiB of deterministic incompressible bytes that no workload reads: a lazy
	# start should never fetch them, a full pull always does.
	say "debian-big layer 3: 128 MiB padding file"
	mkdir -p "$R/opt/fdbench"
	python3 -c '
import hashlib, sys
sys.stdout.buffer.write(hashlib.shake_256(b"fd-bench-padding-128m").digest(128 << 20))
' >"$R/opt/fdbench/padding-128m.bin"
	big_bytes=$(du -sb "$R" | cut -f1)
	[ "$big_bytes" -ge 400000000 ] || die "debian-big unpacks to only $big_bytes bytes (want 400 MB)"
	umoci --log error repack --image "$L:layer3" --history.created_by "fd bench: padding" "$BW/bundle"
	rm -rf "$BW/bundle"
	umoci --log error config --image "$L:layer3" --tag "$SUITE" \
		--config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.cmd python3 --config.workingdir / --history.created_by "fd bench: config"
	for tag in empty base layer2 layer3; do
		umoci --log error rm --image "$L:$tag"
	done
	umoci --log error gc --layout "$L"
	big_m=$L/blobs/sha256/$(jq -er --arg t "$SUITE" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$L/index.json" | cut -d: -f2)
	[ "$(jq '.layers | length' "$big_m")" = 3 ] || die "debian-big: expected three layers"
	[ "$(jq -r '.layers[0].digest' "$big_m")" != null ] || die "debian-big: no layers"
	big_layers=$(jq '[.layers[].size] | add' "$big_m")
	rm -rf "$CACHE/debian-big"
	mv "$L" "$CACHE/debian-big"
	printf '%s\n' "$big_want" >"$CACHE/.stamp-big.tmp"
	mv "$CACHE/.stamp-big.tmp" "$CACHE/.stamp-big"
	say "debian-big: $big_bytes bytes unpacked, $big_layers bytes of layers, done in $(($(date +%s) - big_start)) s"
	exit 0
fi

# One build at a time per cache dir; a second caller waits and then finds the cache complete.
exec 9>"$CACHE/.build.lock"
flock 9

complete() {
	[ -f "$CACHE/.stamp" ] && [ "$(cat "$CACHE/.stamp")" = "$WANT" ] || return 1
	local out
	for out in "${OUTPUTS[@]}"; do
		[ -e "$CACHE/$out" ] || return 1
	done
}
if complete; then
	say "up to date in $CACHE"
	exit 0
fi

[ "$(id -u)" = 0 ] || die "building the images needs root (debootstrap, chroot, mknod, chown)"
/bin/busybox --list-full >/dev/null 2>&1 || die "/bin/busybox does not run (package busybox-static)"
if ldd /bin/busybox >/dev/null 2>&1; then
	die "/bin/busybox is dynamically linked: install busybox-static instead of busybox"
fi

START=$(date +%s)
say "building into $CACHE (script changed or cache incomplete)"

# Whether anything is mounted at or below $1.
mounted_under() {
	awk -v d="$1/" 'index($2 "/", d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts
}
# Refuses to go on when anything is mounted below $1: deleting a tree with /dev bound into it
# would delete the host's device nodes.
assert_no_mounts_under() {
	if mounted_under "$1"; then
		die "something is still mounted under $1; not deleting it (see /proc/self/mounts)"
	fi
}

# Scratch dirs of builds that were killed; we hold the lock, so none of them is in use.
for stale in "$CACHE"/.build.*; do
	[ -d "$stale" ] || continue
	assert_no_mounts_under "$stale"
	rm -rf "$stale"
done
rm -f "$CACHE/.stamp"

WORK=$(mktemp -d "$CACHE/.build.XXXXXX")
cleanup() {
	local rc=$?
	if mounted_under "$WORK"; then
		printf '[images] error: mounts left under %s; leaving it in place\n' "$WORK" >&2
	else
		rm -rf "$WORK"
	fi
	if [ $rc -ne 0 ]; then
		printf '[images] build failed (exit %s)\n' "$rc" >&2
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

OUT=$WORK/out
mkdir -p "$OUT" "$CACHE/.debs/debootstrap" "$CACHE/.debs/apt"

# skopeo reads a signature policy; use our own permissive one instead of whatever the host has,
# and keep the host's registry mirrors and credentials out of the picture.
cat >"$WORK/policy.json" <<'EOF'
{"default": [{"type": "insecureAcceptAnything"}]}
EOF
: >"$WORK/registries.conf"
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
export TMPDIR=$WORK
skopeo_copy() { skopeo --policy "$WORK/policy.json" copy --quiet "$@"; }

# Digest (without "sha256:") of the manifest that tag $2 of layout $1 points to.
manifest_of() {
	jq -er --arg t "$2" \
		'.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
		"$1/index.json" | cut -d: -f2
}
blob() { printf '%s/blobs/sha256/%s' "$1" "$(printf '%s' "$2" | cut -d: -f2)"; }

# Runs a command in a private mount namespace: mounts made inside never reach the host and
# disappear when the command ends, however it ends.
in_mount_ns() { unshare --mount --propagation private -- "$@"; }

umoci_q() { umoci --log error "$@"; }

failures=0
check() {
	local what=$1
	shift
	if ! "$@" >/dev/null 2>&1; then
		printf '[images] check failed: %s\n' "$what" >&2
		failures=$((failures + 1))
	fi
}
eq() { [ "$1" = "$2" ]; }

############################################################################################
# busybox
############################################################################################
say "busybox: packing /bin/busybox with $(/bin/busybox --list-full | wc -l) applet links"
BB=$OUT/busybox
umoci_q init --layout "$BB"
umoci_q new --image "$BB:latest"
umoci_q unpack --image "$BB:latest" "$WORK/bb-bundle" >/dev/null
R=$WORK/bb-bundle/rootfs
mkdir -p "$R/bin" "$R/sbin" "$R/usr/bin" "$R/usr/sbin" "$R/etc" "$R/root" "$R/home/user" "$R/tmp"
chmod 0700 "$R/root"
chmod 1777 "$R/tmp"
cp /bin/busybox "$R/bin/busybox"
chmod 0755 "$R/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
	[ "$applet" = bin/busybox ] && continue
	mkdir -p "$R/$(dirname "$applet")"
	ln -sfn /bin/busybox "$R/$applet"
done
cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
user:x:1000:
EOF
chown 1000:1000 "$R/home/user"
umoci_q repack --image "$BB:latest" --history.created_by "fd tests: busybox-static" \
	"$WORK/bb-bundle"
umoci_q config --image "$BB:latest" --config.cmd sh \
	--config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --history.created_by "fd tests: config"
umoci_q gc --layout "$BB"
rm -rf "$WORK/bb-bundle"

umoci_q unpack --image "$BB:latest" "$WORK/bb-verify" >/dev/null
R=$WORK/bb-verify/rootfs
check "busybox: /bin/busybox" test -x "$R/bin/busybox"
check "busybox: /bin/sh -> /bin/busybox" eq "$(readlink "$R/bin/sh")" /bin/busybox
check "busybox: user 1000 in /etc/passwd" grep -q '^user:x:1000:1000:' "$R/etc/passwd"
BB_MANIFEST=$(blob "$BB" "$(manifest_of "$BB" latest)")
check "busybox: one layer" eq "$(jq '.layers | length' "$BB_MANIFEST")" 1
check "busybox: Cmd [sh]" eq \
	"$(jq -c .config.Cmd "$(blob "$BB" "$(jq -r .config.digest "$BB_MANIFEST")")")" '["sh"]'
rm -rf "$WORK/bb-verify"

say "busybox: uncompressed variant, docker-archive and oci-archive"
skopeo_copy --dest-decompress "oci:$BB:latest" "dir:$WORK/bb-dir"
skopeo_copy --dest-oci-accept-uncompressed-layers "dir:$WORK/bb-dir" "oci:$OUT/busybox-raw:latest"
rm -rf "$WORK/bb-dir"
check "busybox-raw: uncompressed layer media type" eq "$(jq -r '.layers[].mediaType' \
	"$(blob "$OUT/busybox-raw" "$(manifest_of "$OUT/busybox-raw" latest)")")" \
	application/vnd.oci.image.layer.v1.tar
skopeo_copy "oci:$BB:latest" "docker-archive:$OUT/busybox-docker.tar:busybox:latest"
skopeo_copy "oci:$BB:latest" "oci-archive:$OUT/busybox-oci.tar:latest"
check "busybox-docker.tar has manifest.json" \
	sh -c "tar -tf '$OUT/busybox-docker.tar' | grep -qx manifest.json"
check "busybox-oci.tar has index.json" \
	sh -c "tar -tf '$OUT/busybox-oci.tar' | grep -Eqx '(\./)?index.json'"

############################################################################################
# debian-python
############################################################################################
DP=$OUT/debian-python
B=$WORK/dp-bundle
R=$B/rootfs
umoci_q init --layout "$DP"
umoci_q new --image "$DP:empty"
umoci_q unpack --image "$DP:empty" "$B" >/dev/null

# Layer 1: a minimal Debian.
say "debian-python layer 1: debootstrap --variant=minbase $SUITE (log: debootstrap.log)"
if ! in_mount_ns debootstrap --variant=minbase --cache-dir="$CACHE/.debs/debootstrap" \
	"$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
	tail -n 30 "$WORK/debootstrap.log" >&2
	die "debootstrap failed"
fi
assert_no_mounts_under "$R"
# debootstrap copies the host's resolver and host name into the tree: they do not belong in
# an image.
rm -rf "${R:?}"/var/cache/apt/archives/*.deb "${R:?}"/var/cache/apt/*.bin \
	"${R:?}"/var/lib/apt/lists/* "${R:?}"/dev/* "${R:?}/etc/resolv.conf" "${R:?}/etc/hostname"
umoci_q repack --refresh-bundle --image "$DP:layer1" \
	--history.created_by "debootstrap --variant=minbase $SUITE" "$B"

# Layer 2: python3 installed with apt inside the tree.
say "debian-python layer 2: apt-get install python3 in a chroot"
cp "$CACHE"/.debs/apt/*.deb "$R/var/cache/apt/archives/" 2>/dev/null || true
cp /etc/resolv.conf "$R/etc/resolv.conf"
# shellcheck disable=SC2016 # expanded by the inner shell
if ! in_mount_ns bash -euo pipefail -c '
	R=$1
	undo() {
		umount -R "$R/dev" 2>/dev/null || true
		umount "$R/proc" 2>/dev/null || true
	}
	trap undo EXIT
	mount -t proc proc "$R/proc"
	mount --rbind /dev "$R/dev"
	mount --make-rslave "$R/dev"
	run() {
		chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
			DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"
	}
	run apt-get update -q
	run apt-get install -y -q --no-install-recommends python3
	run python3 -c "import sys; print(sys.version)"
' _ "$R" >"$WORK/apt.log" 2>&1; then
	tail -n 30 "$WORK/apt.log" >&2
	die "installing python3 in the chroot failed"
fi
assert_no_mounts_under "$R"
cp -n "$R"/var/cache/apt/archives/*.deb "$CACHE/.debs/apt/" 2>/dev/null || true
# apt-get update leaves two package caches of about 40 MB each; images do not carry them.
rm -rf "${R:?}"/var/cache/apt/archives/*.deb "${R:?}"/var/cache/apt/*.bin \
	"${R:?}"/var/lib/apt/lists/* "${R:?}/etc/resolv.conf"
find "${R:?}/dev" -mindepth 1 -delete
umoci_q repack --refresh-bundle --image "$DP:layer2" \
	--history.created_by "apt-get install --no-install-recommends python3" "$B"

# Layer 3: deletions, an opaque directory and every kind of file entry a layer tar can carry.
say "debian-python layer 3: whiteouts, opaque dir, links, xattrs, devices, 64 MiB file"
T=opt/fdtest
mkdir -p "$R/$T"

# Whiteouts: a file from layer 1, a file from layer 2 and a whole directory from layer 2.
WHITEOUTS=(usr/share/doc/apt/copyright usr/share/doc/libpython3.11-minimal/copyright
	usr/share/doc/python3)
for p in "${WHITEOUTS[@]}"; do
	[ -e "$R/$p" ] || [ -L "$R/$p" ] || die "layer 3: expected $p in the lower layers"
	rm -rf "${R:?}/$p"
done

# Opaque directory: full in layer 1, replaced wholesale here.
OPAQUE=usr/share/common-licenses
[ -n "$(ls -A "$R/$OPAQUE")" ] || die "layer 3: expected files in $OPAQUE"
OPAQUE_OLD=$(find "$R/$OPAQUE" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | head -n 1)
rm -rf "${R:?}/$OPAQUE"
mkdir -m 0755 "$R/$OPAQUE"
echo "fd test licence: replaces the whole directory" >"$R/$OPAQUE/FDTEST"

# A file replaced in place.
echo "fd test image: replaced in layer 3" >"$R/etc/motd"

# Regular data.
mkdir -p "$R/$T/data"
echo "hello from layer 3" >"$R/$T/data/hello.txt"
: >"$R/$T/data/empty"
echo "written in 2001" >"$R/$T/data/old-2001.txt"
touch -h -d @1000000000 "$R/$T/data/old-2001.txt"

# 64 MiB of deterministic pseudo-random bytes (SHAKE-256 of a fixed seed): incompressible, and
# the same bytes on every build.
mkdir -p "$R/$T/big"
python3 -c '
import hashlib, sys
sys.stdout.buffer.write(hashlib.shake_256(b"fd-test-random-64m").digest(64 << 20))
' >"$R/$T/big/random-64m.bin"
BIG_SHA=$(sha256sum "$R/$T/big/random-64m.bin" | cut -d' ' -f1)

# Hard links: one inode, three names in three directories.
mkdir -p "$R/$T/hardlinks/one" "$R/$T/hardlinks/two"
echo "one inode, three names" >"$R/$T/hardlinks/one/file"
ln "$R/$T/hardlinks/one/file" "$R/$T/hardlinks/two/link"
ln "$R/$T/hardlinks/one/file" "$R/$T/data/link3"

# Symlinks: relative, absolute, dangling, and one whose target is longer than 100 bytes.
mkdir -p "$R/$T/links"
ln -s ../data/hello.txt "$R/$T/links/relative"
ln -s /etc/os-release "$R/$T/links/absolute"
ln -s /nonexistent/fdtest/target "$R/$T/links/dangling"

# Long paths: a 120-byte file name (over the 100-byte tar name field) and a path over 255 bytes.
mkdir -p "$R/$T/long"
LONG_NAME=$(printf 'n%.0s' $(seq 1 116)).txt
echo "long name" >"$R/$T/long/$LONG_NAME"
D80=$(printf 'd%.0s' $(seq 1 80))
E80=$(printf 'e%.0s' $(seq 1 80))
F80=$(printf 'f%.0s' $(seq 1 80))
DEEP=$T/long/$D80/$E80/$F80/deep-file.txt
mkdir -p "$R/$(dirname "$DEEP")"
echo "deep" >"$R/$DEEP"
ln -s "/$DEEP" "$R/$T/links/long-target"

# Extended attributes: a file capability and a user xattr with bytes that are not UTF-8.
mkdir -p "$R/$T/xattr"
cp "$R/usr/bin/true" "$R/$T/xattr/netraw"
setcap cap_net_raw+ep "$R/$T/xattr/netraw"
echo "binary xattr" >"$R/$T/xattr/binary"
USER_XATTR_HEX=00ff80fe7fc328410a
setfattr -n user.fdtest.binary -v "0x$USER_XATTR_HEX" "$R/$T/xattr/binary"
setfattr -n user.fdtest.text -v "plain text" "$R/$T/xattr/binary"
setfattr -n user.fdtest.dir -v "on a directory" "$R/$T/xattr"

# Permissions and ownership.
mkdir -p "$R/$T/perm"
cp "$R/usr/bin/true" "$R/$T/perm/setuid-true"
chmod 4755 "$R/$T/perm/setuid-true"
cp "$R/usr/bin/true" "$R/$T/perm/setgid-true"
chmod 2755 "$R/$T/perm/setgid-true"
mkdir "$R/$T/perm/sticky"
chmod 1777 "$R/$T/perm/sticky"
echo "owned by 1000" >"$R/$T/perm/owned-1000"
chown 1000:1000 "$R/$T/perm/owned-1000"
mkdir -m 0750 "$R/$T/perm/dir-1000"
chown 1000:1000 "$R/$T/perm/dir-1000"

# Special files.
mkdir -p "$R/$T/special"
mkfifo -m 0644 "$R/$T/special/fifo"
mknod -m 0666 "$R/$T/special/null" c 1 3

umoci_q repack --image "$DP:layer3-umoci" --history.created_by "fd tests: layer 3" "$B"
rm -rf "$B"

# umoci writes one .wh.NAME per removed child instead of an opaque marker. Rewrite its layer:
# drop the whiteouts below $OPAQUE and put a single .wh..wh..opq in their place, copying every
# other tar entry byte for byte. umoci then appends the result and recomputes all digests.
L3_MANIFEST=$(blob "$DP" "$(manifest_of "$DP" layer3-umoci)")
L3_GZ=$(blob "$DP" "$(jq -r '.layers[-1].digest' "$L3_MANIFEST")")
gzip -dc "$L3_GZ" >"$WORK/layer3-umoci.tar"
python3 - "$WORK/layer3-umoci.tar" "$OPAQUE" "$WORK/layer3.tar" <<'PY'
import sys
import tarfile

src, opaque_dir, dst = sys.argv[1], sys.argv[2].strip("/"), sys.argv[3]
prefix = opaque_dir + "/"
marker = prefix + ".wh..wh..opq"


def norm(name):
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


with open(src, "rb") as f:
    raw = f.read()
with tarfile.open(src, mode="r:", errors="surrogateescape") as tf:
    members = tf.getmembers()
    end = tf.offset

names = [norm(m.name) for m in members]
if marker in names:
    # Already opaque: keep the layer as it is.
    with open(dst, "wb") as f:
        f.write(raw)
    sys.exit(0)

bounds = [m.offset for m in members] + [end]
out = []
template = None
inserted = False
for i, (m, name) in enumerate(zip(members, names)):
    chunk = raw[bounds[i] : bounds[i + 1]]
    below = name.startswith(prefix)
    base = name.rsplit("/", 1)[-1]
    if below and base.startswith(".wh."):
        if template is None:
            template = m
        if not inserted:
            ti = tarfile.TarInfo(marker)
            ti.type = tarfile.REGTYPE
            ti.size = 0
            ti.mode = m.mode
            ti.uid, ti.gid = m.uid, m.gid
            ti.uname, ti.gname = m.uname, m.gname
            ti.mtime = m.mtime
            out.append(ti.tobuf(format=tarfile.PAX_FORMAT))
            inserted = True
        continue
    out.append(chunk)

if not inserted:
    sys.exit(f"no whiteouts under {opaque_dir}/ in the layer; cannot make it opaque")
out.append(b"\0" * 1024)
with open(dst, "wb") as f:
    for chunk in out:
        f.write(chunk)
PY
umoci_q raw add-layer --image "$DP:layer2" --tag "$SUITE" \
	--history.created_by "fd tests: layer 3 (whiteouts, opaque dir, special files)" \
	"$WORK/layer3.tar"
rm -f "$WORK/layer3-umoci.tar" "$WORK/layer3.tar"
umoci_q config --image "$DP:$SUITE" \
	--config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	--config.cmd python3 --config.workingdir / --history.created_by "fd tests: config"
for tag in empty layer1 layer2 layer3-umoci; do
	umoci_q rm --image "$DP:$tag"
done
umoci_q gc --layout "$DP"

# Verify: unpack the final image and look at every case above.
say "debian-python: verifying an unpacked copy"
DP_MANIFEST=$(blob "$DP" "$(manifest_of "$DP" "$SUITE")")
DP_CONFIG=$(blob "$DP" "$(jq -r .config.digest "$DP_MANIFEST")")
L3_BLOB=$(blob "$DP" "$(jq -r '.layers[-1].digest' "$DP_MANIFEST")")
check "three layers" eq "$(jq '.layers | length' "$DP_MANIFEST")" 3
check "Cmd [python3]" eq "$(jq -c .config.Cmd "$DP_CONFIG")" '["python3"]'
check "WorkingDir /" eq "$(jq -r .config.WorkingDir "$DP_CONFIG")" /
check "Env PATH" sh -c "jq -r '.config.Env[]' '$DP_CONFIG' | grep -q '^PATH=/'"
tar -tzf "$L3_BLOB" >"$WORK/layer3.list"
check "layer 3 has $OPAQUE/.wh..wh..opq" grep -qx "$OPAQUE/.wh..wh..opq" "$WORK/layer3.list"
check "layer 3 has plain whiteouts" grep -q '/\.wh\.[^.]' "$WORK/layer3.list"
check "layer 3 has no per-file whiteouts under $OPAQUE" \
	sh -c "! grep -q '^$OPAQUE/.wh\.[^.]' '$WORK/layer3.list'"

umoci_q unpack --image "$DP:$SUITE" "$WORK/dp-verify" >/dev/null
V=$WORK/dp-verify/rootfs
check "python3 runs in the tree" chroot "$V" /usr/bin/python3 -c 'print(1)'
for p in "${WHITEOUTS[@]}"; do
	check "whiteout removed $p" sh -c "! test -e '$V/$p' && ! test -L '$V/$p'"
done
check "opaque dir drops $OPAQUE/$OPAQUE_OLD" sh -c "! test -e '$V/$OPAQUE/$OPAQUE_OLD'"
check "opaque dir holds only FDTEST" eq "$(ls -A "$V/$OPAQUE")" FDTEST
check "/etc/motd replaced" grep -q 'replaced in layer 3' "$V/etc/motd"
check "64 MiB file size" eq "$(stat -c %s "$V/$T/big/random-64m.bin")" 67108864
check "64 MiB file digest" eq "$(sha256sum "$V/$T/big/random-64m.bin" | cut -d' ' -f1)" "$BIG_SHA"
check "empty file" sh -c "test -f '$V/$T/data/empty' && ! test -s '$V/$T/data/empty'"
check "old mtime" eq "$(stat -c %Y "$V/$T/data/old-2001.txt")" 1000000000
HL=("$V/$T/hardlinks/one/file" "$V/$T/hardlinks/two/link" "$V/$T/data/link3")
check "hard link count 3" eq "$(stat -c %h "${HL[@]}" | sort -u)" 3
check "hard links share an inode" eq "$(stat -c %i "${HL[@]}" | sort -u | wc -l)" 1
check "relative symlink" eq "$(readlink "$V/$T/links/relative")" ../data/hello.txt
check "absolute symlink" eq "$(readlink "$V/$T/links/absolute")" /etc/os-release
check "dangling symlink" eq "$(readlink "$V/$T/links/dangling")" /nonexistent/fdtest/target
check "long symlink target" eq "$(readlink "$V/$T/links/long-target")" "/$DEEP"
check "file name over 100 bytes" test -f "$V/$T/long/$LONG_NAME"
check "path over 255 bytes" sh -c "test -f '$V/$DEEP' && test ${#DEEP} -gt 255"
check "security.capability" sh -c "getcap '$V/$T/xattr/netraw' | grep -q cap_net_raw"
check "security.capability xattr" sh -c \
	"getfattr --absolute-names -d -m - -e hex '$V/$T/xattr/netraw' | grep -q '^security.capability='"
xattr_of() { getfattr --absolute-names --only-values -n "$1" "$2"; }
check "binary user xattr" eq "$(xattr_of user.fdtest.binary "$V/$T/xattr/binary" |
	od -An -tx1 | tr -d ' \n')" "$USER_XATTR_HEX"
check "text user xattr" eq "$(xattr_of user.fdtest.text "$V/$T/xattr/binary")" "plain text"
check "directory xattr" eq "$(xattr_of user.fdtest.dir "$V/$T/xattr")" "on a directory"
check "setuid file" eq "$(stat -c %a "$V/$T/perm/setuid-true")" 4755
check "setgid file" eq "$(stat -c %a "$V/$T/perm/setgid-true")" 2755
check "sticky dir" eq "$(stat -c %a "$V/$T/perm/sticky")" 1777
check "file owned by 1000:1000" eq "$(stat -c %u:%g "$V/$T/perm/owned-1000")" 1000:1000
check "dir owned by 1000:1000" eq "$(stat -c %u:%g:%a "$V/$T/perm/dir-1000")" 1000:1000:750
check "fifo" test -p "$V/$T/special/fifo"
check "char device 1,3" eq "$(stat -c '%F %t %T' "$V/$T/special/null")" "character special file 1 3"
rm -rf "$WORK/dp-verify"

say "debian-python: zstd variant"
skopeo_copy --dest-compress-format zstd "oci:$DP:$SUITE" "oci:$OUT/debian-python-zstd:$SUITE"
DPZ_MANIFEST=$(blob "$OUT/debian-python-zstd" "$(manifest_of "$OUT/debian-python-zstd" "$SUITE")")
check "zstd variant: every layer zstd" \
	eq "$(jq -r '.layers[].mediaType' "$DPZ_MANIFEST" | sort -u)" \
	application/vnd.oci.image.layer.v1.tar+zstd
check "zstd variant: same config (same diff_ids)" \
	eq "$(jq -r .config.digest "$DPZ_MANIFEST")" "$(jq -r .config.digest "$DP_MANIFEST")"

[ "$failures" -eq 0 ] || die "$failures check(s) failed; the cache was not updated"

# Summary: what the tests can expect, for people reading logs.
{
	printf 'built by tests/images/build.sh %s\n' "$WANT"
	for img in busybox:latest busybox-raw:latest debian-python:$SUITE debian-python-zstd:$SUITE; do
		layout=${img%%:*}
		tag=${img#*:}
		m=$(manifest_of "$OUT/$layout" "$tag")
		printf '%s:%s manifest sha256:%s\n' "$layout" "$tag" "$m"
		jq -r '.layers[] | "  layer \(.digest) \(.size) \(.mediaType)"' \
			"$(blob "$OUT/$layout" "$m")"
	done
	for f in busybox-docker.tar busybox-oci.tar; do
		printf '%s %s bytes sha256:%s\n' "$f" "$(stat -c %s "$OUT/$f")" \
			"$(sha256sum "$OUT/$f" | cut -d' ' -f1)"
	done
	printf '64 MiB file /%s/big/random-64m.bin sha256:%s\n' "$T" "$BIG_SHA"
} >"$OUT/summary.txt"

# Move into place. The stamp was removed above and is written last.
for out in "${OUTPUTS[@]}"; do
	rm -rf "${CACHE:?}/$out"
	mv "$OUT/$out" "$CACHE/$out"
done
printf '%s\n' "$WANT" >"$CACHE/.stamp.tmp"
mv "$CACHE/.stamp.tmp" "$CACHE/.stamp"

cat "$CACHE/summary.txt"
say "done in $(($(date +%s) - START)) s"
