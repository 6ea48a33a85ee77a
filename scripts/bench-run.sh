#!/usr/bin/env bash
# Container start times, side by side in one run, on the debian-python:bookworm test image
# served by a registry on 127.0.0.1:
#
#   warm start (`true` in an image already local):
#     fd run            vs  runc run on a bundle from `umoci unpack`  vs  podman run --rm
#   cold start (empty store, image in the local registry):
#     fd run (pulls)    vs  podman pull && podman run --rm
#
# Usage: bash scripts/bench-run.sh [WARM_REPS] [COLD_REPS]   (defaults 20 and 3)
# podman keeps its state under a temp dir, runs with runc, no network and lowered ulimits
# (this machine's hard limits are below podman's defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
warm_reps=${1:-20}
cold_reps=${2:-3}

bash scripts/install-deps.sh
cargo build --release -q -p fd-cli
FD=$PWD/target/release/fd
bash tests/images/build.sh >/dev/null
CACHE=${FD_TEST_CACHE:-$PWD/.cache/images}

work=$(mktemp -d)
cleanup() {
  stop_registry
  podman rm -af >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
start_registry "$work/registry"
push_image "$CACHE/debian-python" bookworm debian-python:bookworm
ref=$REGISTRY/debian-python:bookworm

podman_private_state "$work/podman"
podman_run=(podman run --rm --runtime runc --network=none
  --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

# The runc bundle: the same image unpacked, without a terminal.
umoci unpack --image "$CACHE/debian-python:bookworm" "$work/bundle" >/dev/null
python3 - "$work/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["true"]
# Share the host network, as fd run does by default.
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
json.dump(c, open(p, "w"))
PY

# Warm stores.
export FD_HOME=$work/fdstore
"$FD" pull -q "$ref" >/dev/null
podman pull -q "$ref" >/dev/null

now() { date +%s.%N; }
time_it() { # command... -> prints seconds
  local t0 t1
  t0=$(now)
  "$@" >/dev/null 2>&1 </dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}

declare -A times
for k in fd runc podman fd_cold podman_cold; do times[$k]=""; done
n=0
for ((i = 0; i < warm_reps; i++)); do
  for tool in $(printf 'fd\nrunc\npodman\n' | shuf); do
    case $tool in
      fd) t=$(time_it "$FD" run "$ref" true) ;;
      runc) n=$((n + 1)); t=$(time_it runc run -b "$work/bundle" "fdbench-$$-$n") ;;
      podman) t=$(time_it "${podman_run[@]}" "$ref" true) ;;
    esac
    times[$tool]+="$t "
  done
done
for ((i = 0; i < cold_reps; i++)); do
  for tool in $(printf 'fd_cold\npodman_cold\n' | shuf); do
    case $tool in
      fd_cold)
        rm -rf "$work/fdcold"; sync
        t=$(FD_HOME=$work/fdcold time_it "$FD" run "$ref" true) ;;
      podman_cold)
        podman rmi -af >/dev/null 2>&1 || true; sync
        t=$(time_it sh -c "podman pull -q '$ref' && ${podman_run[*]} '$ref' true") ;;
    esac
    times[$tool]+="$t "
  done
done
rm -rf "$work/fdcold"

python3 - "$warm_reps" "$cold_reps" "${times[fd]}" "${times[runc]}" "${times[podman]}" \
  "${times[fd_cold]}" "${times[podman_cold]}" <<'PY'
import statistics, sys
warm, cold = sys.argv[1], sys.argv[2]
names = ["fd", "runc", "podman", "fd_cold", "podman_cold"]
t = {k: [float(x) for x in v.split()] for k, v in zip(names, sys.argv[3:8])}
def p90(xs):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
def table(title, rows, base):
    print(title)
    print("| tool | median ms | p90 ms | time vs fd |")
    print("|---|---|---|---|")
    b = statistics.median(t[base])
    for label, k in rows:
        med = statistics.median(t[k])
        print(f"| {label} | {med*1000:.0f} | {p90(t[k])*1000:.0f} | {med / b:.2f}x |")
    print()
table(f"warm start of `true` in debian-python:bookworm, {warm} repetitions each, shuffled",
      [("fd run", "fd"), ("runc run (umoci bundle)", "runc"), ("podman run --rm", "podman")], "fd")
table(f"cold start from the local registry, {cold} repetitions each, shuffled",
      [("fd run (pull + run)", "fd_cold"), ("podman pull && podman run --rm", "podman_cold")],
      "fd_cold")
PY
