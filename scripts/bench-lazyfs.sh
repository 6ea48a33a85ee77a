#!/usr/bin/env bash
# lazyfs benchmark, side by side in one run on the debian-python image: an `fd mount` of the
# image against the same tree unpacked on local disk by `umoci unpack`.
#
#   1. read every file, warm:        find ROOT -type f -exec cat {} + >/dev/null
#   2. stat walk, warm:              find ROOT -ls >/dev/null
#   3. 64 MiB file, warm:            cat BIG >/dev/null
#   4. 64 MiB file, first read after a fresh mount (chunks local, so this is the FUSE path
#      itself; the disk side is the warm read of step 3)
#   5. first read of a small file whose chunk comes from another store (`--from`), each time
#      into an empty store, against the first read of that file through a mount whose chunks
#      are local, and a warm read on disk
#
# Steps 1-3 use hyperfine (one warm-up run, then RUNS runs). Prints medians and fd/disk ratios.
#
#   bash scripts/bench-lazyfs.sh [RUNS]      (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

bash scripts/install-deps.sh
cargo build --release -q -p fd-cli
FD=$PWD/target/release/fd
bash tests/images/build.sh >/dev/null
CACHE=${FD_TEST_CACHE:-$PWD/.cache/images}
BIG=opt/fdtest/big/random-64m.bin
SMALL=opt/fdtest/data/hello.txt

work=$(mktemp -d)
mount_pids=()
mounted_dirs=()
cleanup() {
  for pid in "${mount_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${mount_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for dir in "${mounted_dirs[@]}"; do
    if is_mounted "$dir"; then umount -l "$dir" || true; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT

is_mounted() { awk -v d="$1" '$5 == d { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# start_mount STORE DIR ARGS... : runs `fd mount` in the background, waits for the mount.
start_mount() {
  local store=$1 dir=$2
  shift 2
  mkdir -p "$dir"
  FD_HOME=$store "$FD" mount "$ref" "$dir" "$@" 2>>"$work/mount.log" &
  mount_pids+=("$!")
  mounted_dirs+=("$dir")
  for _ in $(seq 1 500); do
    is_mounted "$dir" && return 0
    sleep 0.01
  done
  echo "error: no mount at $dir; log:" >&2
  cat "$work/mount.log" >&2
  return 1
}

# stop_mount DIR : `fd umount`, then waits for the mount process (the last one started).
stop_mount() {
  FD_HOME=$2 "$FD" umount "$1" 2>>"$work/mount.log"
  wait "${mount_pids[-1]}" 2>/dev/null || true
  unset 'mount_pids[-1]'
}

now_ns() { date +%s%N; }

echo "== preparing: fd load and umoci unpack of debian-python"
FD_HOME=$work/a "$FD" load "$CACHE/debian-python" 2>/dev/null
ref=$(FD_HOME=$work/a "$FD" images --json | jq -r '.[0].reference')
umoci --log error unpack --image "$CACHE/debian-python:bookworm" "$work/bundle"
disk=$work/bundle/rootfs
start_mount "$work/a" "$work/mnt" --prefetch none
fuse=$work/mnt
echo "   $ref: $(find "$disk" | wc -l) paths, $(du -sh --apparent-size "$disk" | cut -f1)"

median_of() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

declare -A result
hf() { # name command-with-ROOT
  local name=$1 cmd=$2 json=$work/$1.json
  hyperfine -N --style none --warmup 1 --runs "$runs" --export-json "$json" \
    -n disk "bash -c '${cmd//ROOT/$disk}'" -n fd "bash -c '${cmd//ROOT/$fuse}'" >/dev/null
  result[$name.disk]=$(jq '.results[] | select(.command == "disk") | .median * 1000' "$json")
  result[$name.fd]=$(jq '.results[] | select(.command == "fd") | .median * 1000' "$json")
}

echo "== 1-3: warm reads and stat walk (hyperfine, $runs runs)"
hf cat_all 'find ROOT -type f -exec cat {} + >/dev/null'
hf stat_walk 'find ROOT -ls >/dev/null'
hf big_warm "cat ROOT/$BIG >/dev/null"

echo "== 4: 64 MiB first read through a fresh mount ($runs mounts)"
stop_mount "$work/mnt" "$work/a"
times=()
for _ in $(seq 1 "$runs"); do
  start_mount "$work/a" "$work/mnt" --prefetch none
  t0=$(now_ns)
  cat "$work/mnt/$BIG" >/dev/null
  t1=$(now_ns)
  times+=("$(( (t1 - t0) / 1000 ))")
  stop_mount "$work/mnt" "$work/a"
done
result[big_first.fd]=$(printf '%s\n' "${times[@]}" | median_of | awk '{ print $1 / 1000 }')
result[big_first.disk]=${result[big_warm.disk]}

echo "== 5: first read of a small file: chunk from another store, chunk local, disk ($runs each)"
remote=()
local_first=()
warm_disk=()
for i in $(seq 1 "$runs"); do
  start_mount "$work/b$i" "$work/mb$i" --prefetch none --from "$work/a"
  t0=$(now_ns); cat "$work/mb$i/$SMALL" >/dev/null; t1=$(now_ns)
  remote+=("$(( (t1 - t0) / 1000 ))")
  stop_mount "$work/mb$i" "$work/b$i"

  start_mount "$work/a" "$work/mnt" --prefetch none
  t0=$(now_ns); cat "$work/mnt/$SMALL" >/dev/null; t1=$(now_ns)
  local_first+=("$(( (t1 - t0) / 1000 ))")
  stop_mount "$work/mnt" "$work/a"

  t0=$(now_ns); cat "$disk/$SMALL" >/dev/null; t1=$(now_ns)
  warm_disk+=("$(( (t1 - t0) / 1000 ))")
done
result[small_remote.fd]=$(printf '%s\n' "${remote[@]}" | median_of | awk '{ print $1 / 1000 }')
result[small_local.fd]=$(printf '%s\n' "${local_first[@]}" | median_of | awk '{ print $1 / 1000 }')
result[small_remote.disk]=$(printf '%s\n' "${warm_disk[@]}" | median_of | awk '{ print $1 / 1000 }')
result[small_local.disk]=${result[small_remote.disk]}

echo
printf '%-58s %12s %12s %8s\n' "benchmark (median)" "disk ms" "fd ms" "fd/disk"
row() {
  local d=${result[$1.disk]} f=${result[$1.fd]}
  printf '%-58s %12.2f %12.2f %8.2f\n' "$2" "$d" "$f" "$(awk -v f="$f" -v d="$d" 'BEGIN { print f / d }')"
}
row cat_all "find -type f -exec cat {} + (warm)"
row stat_walk "find -ls stat walk (warm)"
row big_warm "64 MiB sequential read (warm)"
row big_first "64 MiB first read, fresh mount (disk: warm read)"
row small_local "small file first read, chunk local (disk: warm cat)"
row small_remote "small file first read, chunk from --from store"
echo "(process start of cat, ~1 ms, is inside the small-file times on both sides)"
