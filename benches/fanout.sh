#!/usr/bin/env bash
# Fan-out: one node holds an image, then four nodes start it at the same moment.
#
# The LAN: a hub namespace holds a bridge; the registry, node A and nodes N1..N4 each sit in
# their own namespace on a veth to that bridge (10.243.0.0/24), with a tc tbf rate limit on
# both ends of every veth. Debian's docker-registry runs on this namespace's loopback
# (scripts/lib.sh start_registry) and the network reaches it only through
# benches/fanout_relay.py, which listens on 10.243.0.1:5000 inside the registry namespace and
# counts every byte the registry sends. Node A pulls the image once and runs `fd serve`.
#
# Rows (all four nodes start within a few milliseconds of each other, each from an empty
# store, after the page cache was dropped):
#   fd-run      fd run REF python3 -c 'import json, sqlite3; print("fd-mark")' on N1..N4, each
#               its own FD_HOME in A's team, --peer A: time to the marker line
#   fd-pull     fd pull REF on N1..N4 (the whole image moves): time to exit
#   podman      podman pull REF && podman run --rm REF python3 -c ... on N1..N4, each with its
#               own podman state (scripts/lib.sh podman_private_state): time to the marker
# Per row: each node's time (benches/timer.py), median and max, the bytes the registry sent
# (relay counter) and that as a multiple of the image's compressed size, and the blob GETs.
#
# Usage:
#   bash benches/fanout.sh [--profile 1gbit|100mbit] [--reps N] [--rows "fd-run fd-pull podman"]
#                          [--mdns] [--out NAME]
# --mdns: the fd nodes also find each other by mDNS on the LAN (each namespace gets a multicast
# route), so a node still fetching serves what it has verified to the others; without it every
# node knows only A (--peer, --no-mdns) and all four fetch from A alone.
# FD=PATH picks the fd binary (default: this checkout built in release mode); FD_REV=REV
# names its commit in the report (default: the checkout's commit, or REV of a binary named
# fd-REV).
# Image: debian-python:bookworm from tests/images/build.sh (built if missing).
#
# Results: benches/results/fanout-DATE-PROFILE[-NAME].md and .json; the paths are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

profile=1gbit
reps=2
rows="fd-run fd-pull podman"
out_name=
mdns=0
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift ;;
    --reps) reps=$2; shift ;;
    --rows) rows=$2; shift ;;
    --out) out_name=$2; shift ;;
    --mdns) mdns=1 ;;
    -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "fanout: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
declare -A RATE=([1gbit]=1gbit [100mbit]=100mbit)
declare -A BURST=([1gbit]=1mb [100mbit]=256kb)
[ -n "${RATE[$profile]:-}" ] || { echo "fanout: unknown profile $profile (1gbit, 100mbit)" >&2; exit 2; }
[[ $reps =~ ^[0-9]+$ && $reps -gt 0 ]] || { echo "fanout: --reps takes N > 0" >&2; exit 2; }
for r in $rows; do
  case $r in fd-run | fd-pull | podman) ;; *) echo "fanout: unknown row $r" >&2; exit 2 ;; esac
done
[ "$(id -u)" = 0 ] || { echo "fanout: needs root (namespaces, tc, drop_caches, containers)" >&2; exit 1; }

fd_binary "$REPO"

IMAGE=debian-python
TAG=bookworm
NODES=4
REG_ADDR=10.243.0.1:5000
PEER=/ip4/10.243.0.2/udp/7700/quic-v1
ref=$REG_ADDR/$IMAGE:$TAG
WORKLOAD='import json, sqlite3; print("fd-mark")'

started=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== test images"
bash tests/images/build.sh >/dev/null
CACHE=${FD_TEST_CACHE:-$REPO/.cache/images}
layout=$CACHE/$IMAGE
[ -d "$layout" ] || { echo "fanout: no image $layout (tests/images/build.sh)" >&2; exit 1; }

work=$(mktemp -d /tmp/h2-fanout.XXXXXX)
ns_hub=h2-fo-hub-$$ ns_reg=h2-fo-reg-$$ ns_a=h2-fo-a-$$
ns_n=()
for ((i = 1; i <= NODES; i++)); do ns_n+=("h2-fo-n$i-$$"); done
relay_pid='' share_pid=''
node_pids=()
# Undo everything in reverse order; every step tolerates a half-done setup.
cleanup() {
  local p c d
  local -a kids=()
  # timer.py runs each command in a process group of its own: end those (a few seconds of
  # grace, then SIGKILL), then the timers.
  for p in "${node_pids[@]}"; do
    for c in $(pgrep -P "$p"); do
      kids+=("$c")
      kill -- "-$c" 2>/dev/null
    done
    kill "$p" 2>/dev/null
  done
  for c in "${kids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$c" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$c" 2>/dev/null
  done
  for p in "${node_pids[@]}"; do wait "$p" 2>/dev/null; done
  [ -n "$share_pid" ] && kill "$share_pid" 2>/dev/null && wait "$share_pid" 2>/dev/null
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
  stop_registry
  for d in "$work"/row/n*/podman; do
    [ -f "$d/storage.conf" ] || continue
    CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_CONF=$d/containers.conf podman rm -af >/dev/null 2>&1
    CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_CONF=$d/containers.conf podman rmi -af >/dev/null 2>&1
  done
  unmount_under "$work"
  for ns in "${ns_n[@]}" "$ns_a" "$ns_reg" "$ns_hub"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$work"
}
cleanup_on_exit fanout cleanup

fd_private_copy "$work"
echo "== fd $fd_rev ($fd_src), profile $profile, $reps rep(s), rows: $rows"

# The LAN. Member i gets 10.243.0.ADDR on its eth0; its peer end hangs on the hub's bridge.
ip netns add "$ns_hub"
ip -n "$ns_hub" link set lo up
ip -n "$ns_hub" link add br0 type bridge
ip -n "$ns_hub" link set br0 up
links=()
join_lan() { # ns address port_name
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$1" link add eth0 type veth peer name "$3" netns "$ns_hub"
  ip -n "$1" addr add "10.243.0.$2/24" dev eth0
  ip -n "$1" link set eth0 up
  # mDNS needs a route for its multicast group; these namespaces have no default route.
  ip -n "$1" route add 224.0.0.0/4 dev eth0
  ip -n "$ns_hub" link set "$3" master br0
  ip -n "$ns_hub" link set "$3" up
  links+=("$1 eth0" "$ns_hub $3")
}
join_lan "$ns_reg" 1 p-reg
join_lan "$ns_a" 2 p-a
for ((i = 1; i <= NODES; i++)); do join_lan "${ns_n[i - 1]}" $((10 + i)) "p-n$i"; done
for l in "${links[@]}"; do
  read -r ns dev <<<"$l"
  tc -n "$ns" qdisc add dev "$dev" root tbf rate "${RATE[$profile]}" burst "${BURST[$profile]}" latency 50ms
done

# The registry on loopback here, reached from the LAN only through the counting relay.
start_registry "$work/registry"
push_image "$layout" "$TAG" "$IMAGE:$TAG"
python3 "$REPO/benches/fanout_relay.py" --listen "$REG_ADDR" --upstream "$REGISTRY" \
  --stats "$work/relay.json" --netns "/run/netns/$ns_reg" >"$work/relay.log" 2>&1 &
relay_pid=$!
for _ in $(seq 1 100); do
  nsenter --net="/run/netns/${ns_n[0]}" curl -fsS "http://$REG_ADDR/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
nsenter --net="/run/netns/${ns_n[0]}" curl -fsS "http://$REG_ADDR/v2/" >/dev/null ||
  { echo "fanout: the registry is not reachable through the relay; $(cat "$work/relay.log")" >&2; exit 1; }

# Sizes from the layout: what one full copy of the image costs a registry.
manifest=$(jq -er --arg t "$TAG" \
  '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
  "$layout/index.json")
mfile=$layout/blobs/sha256/${manifest#sha256:}
layers_size=$(jq '[.layers[].size] | add' "$mfile")
image_size=$((layers_size + $(jq '.config.size' "$mfile") + $(stat -c %s "$mfile")))

relay_down() { jq .down "$work/relay.json"; }
relay_snapshot() { cp "$work/relay.json" "$1"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
export NO_COLOR=1
if [ "$mdns" = 1 ]; then nomdns=(); else nomdns=(--no-mdns); export FD_MDNS=0; fi

# Node A: pulls the image through the relay, then shares it.
d0=$(relay_down)
FD_HOME=$work/nodeA nsenter --net="/run/netns/$ns_a" "$FD" pull -q --no-mdns \
  --insecure-registry "$REG_ADDR" "$ref"
sleep 0.3
a_pull_bytes=$(($(relay_down) - d0))
token=$(FD_HOME=$work/nodeA "$FD" team init 2>/dev/null | tail -n 1)
[[ $token == fdteam* ]] || { echo "fanout: fd team init printed no token" >&2; exit 1; }
FD_HOME=$work/nodeA nsenter --net="/run/netns/$ns_a" "$FD" serve -q "${nomdns[@]}" \
  --listen "$PEER" >"$work/share.log" 2>&1 &
share_pid=$!
sleep 1
kill -0 "$share_pid" 2>/dev/null || { echo "fanout: fd serve did not start: $(cat "$work/share.log")" >&2; exit 1; }
echo "== node A pulled $ref ($image_size bytes compressed; registry sent $a_pull_bytes) and shares it"

# podman for one node: private state under DIR, trusting the relay's address over plain HTTP,
# and its own tmp dir so four instances do not share lock files.
podman_dir() { # dir
  (REGISTRY=$REG_ADDR; podman_private_state "$1")
  printf 'tmp_dir = "%s"\n' "$1/tmp" >>"$1/containers.conf"
}
cat >"$work/podman-run.sh" <<'SH'
#!/bin/sh
# podman-run.sh REF PYTHON_CODE: pull, then run python3 -c PYTHON_CODE (runc, no network,
# ulimits below this machine's hard limits).
set -e
podman pull -q "$1" >/dev/null
exec podman run --rm --runtime runc --network=none \
  --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 "$1" python3 -c "$2"
SH
chmod +x "$work/podman-run.sh"

# Start one node's command in the background under timer.py; its JSON goes to out-I, the
# command's stderr to err-I.
start_node() { # i row
  local i=$1 row=$2 ns=${ns_n[$1 - 1]} dir=$work/row/n$1
  local -a cmd
  case $row in
    fd-run)
      cmd=(--marker fd-mark -- nsenter --net="/run/netns/$ns" env FD_HOME="$dir/fd" "$FD" run
        "${nomdns[@]}" --peer "$PEER" --insecure-registry "$REG_ADDR" --net none "$ref"
        python3 -c "$WORKLOAD") ;;
    fd-pull)
      cmd=(-- nsenter --net="/run/netns/$ns" env FD_HOME="$dir/fd" "$FD" pull "${nomdns[@]}"
        --peer "$PEER" --insecure-registry "$REG_ADDR" "$ref") ;;
    podman)
      cmd=(--marker fd-mark -- env CONTAINERS_STORAGE_CONF="$dir/podman/storage.conf"
        CONTAINERS_REGISTRIES_CONF="$dir/podman/registries.conf"
        CONTAINERS_CONF="$dir/podman/containers.conf"
        nsenter --net="/run/netns/$ns" "$work/podman-run.sh" "$ref" "$WORKLOAD") ;;
  esac
  python3 "$REPO/benches/timer.py" --stderr "$work/row/err-$i" --timeout 900 "${cmd[@]}" \
    >"$work/row/out-$i" 2>"$work/row/timer-$i" &
  node_pids+=($!)
}

# Empty stores for every node (a fresh directory each), the unmounts and podman cleanup of the
# previous row first.
reset_row() {
  local d
  for d in "$work"/row/n*/podman; do
    [ -f "$d/storage.conf" ] || continue
    CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_CONF=$d/containers.conf podman rm -af >/dev/null 2>&1 || true
    CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_CONF=$d/containers.conf podman rmi -af >/dev/null 2>&1 || true
  done
  unmount_under "$work/row"
  rm -rf "$work/row"
  mkdir -p "$work/row"
}

raw=$work/raw.jsonl
: >"$raw"
failures=0
run_row() { # row rep
  local row=$1 rep=$2 i p rc fails=0
  reset_row
  for ((i = 1; i <= NODES; i++)); do
    mkdir -p "$work/row/n$i"
    case $row in
      fd-*) FD_HOME=$work/row/n$i/fd "$FD" team join "$token" >/dev/null 2>&1 ;;
      podman) podman_dir "$work/row/n$i/podman" ;;
    esac
  done
  drop_caches
  relay_snapshot "$work/row/relay-before.json"
  node_pids=()
  for ((i = 1; i <= NODES; i++)); do start_node "$i" "$row"; done
  i=0
  for p in "${node_pids[@]}"; do
    i=$((i + 1))
    rc=0
    wait "$p" || rc=$?
    if [ "$rc" != 0 ]; then
      fails=$((fails + 1))
      echo "  FAILED: $row rep $rep node N$i: $(tail -n 3 "$work/row/timer-$i" "$work/row/err-$i" | tr '\n' ' ')" >&2
    fi
  done
  node_pids=()
  # The relay writes its counters every 100 ms.
  sleep 0.3
  relay_snapshot "$work/row/relay-after.json"
  if [ "$row" = fd-pull ]; then
    for ((i = 1; i <= NODES; i++)); do
      if [ -s "$work/row/out-$i" ] && [ "$(FD_HOME=$work/row/n$i/fd "$FD" images --json |
        jq --arg r "$ref" '[.[] | select(.reference == $r and (.lazy | not))] | length')" != 1 ]; then
        fails=$((fails + 1))
        echo "  FAILED: fd-pull rep $rep node N$i: fd images does not list $ref as complete" >&2
        : >"$work/row/out-$i"
      fi
    done
  fi
  failures=$((failures + fails))
  python3 "$REPO/benches/fanout_report.py" row "$raw" "$row" "$rep" "$work/row" "$NODES"
}

while read -r rep row; do
  echo "== rep $rep: $row"
  run_row "$row" "$rep"
done < <(for ((r = 1; r <= reps; r++)); do for row in $rows; do echo "$r $row"; done | shuf; done)
reset_row

date_tag=$(date -u +%Y-%m-%d)
mkdir -p "$REPO/benches/results"
out_base=$REPO/benches/results/fanout-$date_tag-$profile${out_name:+-$out_name}
meta=$(jq -n \
  --arg fd_rev "$fd_rev" --arg fd_binary "$fd_src" --arg date "$date_tag" \
  --arg kernel "$(uname -r)" --argjson cores "$(nproc)" \
  --argjson mem "$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)" \
  --arg podman "$(podman --version)" --arg runc "$(runc --version | head -n 1)" \
  --arg profile "$profile" --arg rate "${RATE[$profile]}" --arg burst "${BURST[$profile]}" \
  --argjson reps "$reps" --arg rows "$rows" --arg ref "$ref" --arg image "$IMAGE:$TAG" \
  --argjson image_size "$image_size" --argjson layers_size "$layers_size" \
  --argjson a_pull_bytes "$a_pull_bytes" --argjson nodes "$NODES" \
  --argjson seconds "$(($(date +%s) - started))" \
  --arg load_start "$load_start" --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
  --argjson mdns "$mdns" \
  '{fd_rev: $fd_rev, mdns: ($mdns == 1), fd_binary: $fd_binary, date: $date,
    machine: {kernel: $kernel, cores: $cores, memory_gib: $mem,
              loadavg_start: $load_start, loadavg_end: $load_end},
    versions: {podman: $podman, runc: $runc},
    profile: $profile, tbf: {rate: $rate, burst: $burst}, reps: $reps, rows: ($rows | split(" ")),
    nodes: $nodes, ref: $ref, image: $image, image_compressed_bytes: $image_size,
    layers_bytes: $layers_size, registry_bytes_for_node_a_pull: $a_pull_bytes, seconds: $seconds}')
python3 "$REPO/benches/fanout_report.py" report "$raw" "$out_base" "$meta"
echo "fanout: results in $out_base.md and $out_base.json"
[ "$failures" -eq 0 ] || { echo "fanout: $failures node run(s) failed" >&2; exit 1; }
