#!/usr/bin/env bash
# The main job on this machine, with no internet but package registries:
#
#   1. builds fd and a real multi-layer Debian image from Debian packages (cached after the
#      first run) and serves it from a real registry on 127.0.0.1;
#   2. node A (its own store) pulls the image, then shares it from network namespace A;
#   3. node B (another store, in network namespace B, which cannot reach the registry at all)
#      finds A by mDNS and runs `python3 -c 'import json, sqlite3; print("ok")'` in a container
#      of that image, fetched from A alone;
#   4. prints what happened, then removes every namespace, process and temp dir it made.
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bash scripts/install-deps.sh
echo "== building fd (release; cached after the first run)"
cargo build --release -q -p fd-cli
FD=$PWD/target/release/fd
echo "== test images (cached after the first run)"
bash tests/images/build.sh >/dev/null
CACHE=${FD_TEST_CACHE:-$PWD/.cache/images}

work=$(mktemp -d)
tag=fddemo$$
ns_br=$tag-br ns_a=$tag-a ns_b=$tag-b
share_pid=
cleanup() {
  [ -n "$share_pid" ] && kill "$share_pid" 2>/dev/null && wait "$share_pid" 2>/dev/null
  for ns in "$ns_a" "$ns_b" "$ns_br"; do ip netns del "$ns" 2>/dev/null || true; done
  stop_registry
  rm -rf "$work"
}
trap cleanup EXIT

start_registry "$work/registry"
push_image "$CACHE/debian-python" bookworm debian-python:bookworm
ref=$REGISTRY/debian-python:bookworm
echo "== registry on $REGISTRY serves debian-python:bookworm"

# A private LAN: a bridge in its own namespace, nodes A and B behind veth links. The addresses
# exist only inside these namespaces.
ip netns add "$ns_br"
ip -n "$ns_br" link add br0 type bridge
ip -n "$ns_br" link set br0 up
i=1
for ns in "$ns_a" "$ns_b"; do
  ip netns add "$ns"
  ip -n "$ns_br" link add "p$i" type veth peer name eth0 netns "$ns"
  ip -n "$ns_br" link set "p$i" master br0 up
  ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add 224.0.0.0/4 dev eth0   # mDNS needs a multicast route here
  i=$((i + 1))
done

export FD_HOME_A=$work/a FD_HOME_B=$work/b
token=$(FD_HOME=$FD_HOME_A "$FD" team init 2>/dev/null | tail -n 1)
FD_HOME=$FD_HOME_B "$FD" team join "$token" >/dev/null

echo "== node A pulls from the registry"
FD_HOME=$FD_HOME_A "$FD" pull --no-mdns "$ref"
# nsenter --net enters only the network namespace; `ip netns exec` would also remount /sys,
# hiding the cgroup hierarchy a container needs.
FD_HOME=$FD_HOME_A nsenter --net=/run/netns/"$ns_a" "$FD" serve -q --listen /ip4/10.77.0.1/udp/7700/quic-v1 &
share_pid=$!
sleep 1

echo "== node B (no route to the registry) runs the image, streamed from A"
start=$(date +%s.%N)
FD_HOME=$FD_HOME_B nsenter --net=/run/netns/"$ns_b" "$FD" run --net none "$ref" \
  python3 -c 'import json, sqlite3; print("ok")'
end=$(date +%s.%N)
python3 -c "print(f'== time from command to output on B: {$end - $start:.2f} s')"
FD_HOME=$FD_HOME_B "$FD" images
