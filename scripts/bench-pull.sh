#!/usr/bin/env bash
# Pull benchmark, side by side in one run: `fd pull` against `podman pull` and
# `skopeo copy docker://… oci:…` of the multi-layer Debian image from one local registry.
# Each tool starts from an empty store every repetition; the order is shuffled per round.
# Prints wall time (median, p90) and peak RSS (median) per tool, and ratios to fd.
#
#   bash scripts/bench-pull.sh [REPS]      (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
reps=${1:-5}

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
ref=$REGISTRY/debian-python:bookworm

podman_private_state "$work/podman"

run_one() { # tool -> prints "seconds max_rss_kib"
  local tool=$1 out=$work/time.txt
  case $tool in
    fd)
      rm -rf "$work/fdstore"; sync
      FD_HOME=$work/fdstore /usr/bin/time -f '%e %M' -o "$out" "$FD" pull -q "$ref" >/dev/null 2>&1 ;;
    podman)
      podman rmi -af >/dev/null 2>&1 || true; sync
      /usr/bin/time -f '%e %M' -o "$out" podman pull -q "$ref" >/dev/null 2>&1 ;;
    skopeo)
      rm -rf "$work/oci"; sync
      /usr/bin/time -f '%e %M' -o "$out" skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$work/oci:t" >/dev/null 2>&1 ;;
  esac
  cat "$out"
}

declare -A times rss
for tool in fd podman skopeo; do times[$tool]=""; rss[$tool]=""; done
for ((i = 0; i < reps; i++)); do
  for tool in $(printf 'fd\npodman\nskopeo\n' | shuf); do
    read -r t m < <(run_one "$tool")
    times[$tool]+="$t "
    rss[$tool]+="$m "
  done
done

python3 - "${times[fd]}" "${times[podman]}" "${times[skopeo]}" "${rss[fd]}" "${rss[podman]}" "${rss[skopeo]}" "$reps" <<'PY'
import statistics, sys
t = {k: [float(x) for x in v.split()] for k, v in zip(["fd", "podman", "skopeo"], sys.argv[1:4])}
m = {k: [int(x) for x in v.split()] for k, v in zip(["fd", "podman", "skopeo"], sys.argv[4:7])}
def p90(xs):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
print(f"pull of debian-python:bookworm (3 layers), {sys.argv[7]} repetitions each, shuffled")
print("| tool | median s | p90 s | peak RSS MiB | time vs fd |")
print("|---|---|---|---|---|")
base = statistics.median(t["fd"])
for k in ["fd", "podman", "skopeo"]:
    med = statistics.median(t[k])
    print(f"| {k} | {med:.2f} | {p90(t[k]):.2f} | {statistics.median(m[k]) / 1024:.0f} | {med / base:.2f}x |")
PY
