#!/usr/bin/env bash
# Side-by-side comparison of fd with podman, runc and skopeo, all measured in one run with
# the repetitions of every row shuffled together:
#
#   cold start, image only in the registry:   fd run REF W   vs  podman pull && podman run
#   cold start, image on a team peer:         fd run on B with A sharing  vs  podman from registry
#   warm start of `true`:                     fd run  vs  runc run (umoci bundle)  vs  podman run --rm
#   pull:                                     fd pull  vs  podman pull  vs  skopeo copy to oci:
#   bytes fetched before the first output (fd's own "Pulled" / "Streamed" lines; podman fetches
#   every compressed layer) against the image's compressed and unpacked sizes
#   tar cf /dev/null /usr in a cold start:    fd run  vs  podman pull && podman run
#
# Usage:
#   bash benches/compare.sh [--plan full] [--reps N] [--out NAME] [--no-peer-delay]
#   bash benches/compare.sh [--quick] [--reps N] [--profiles "1gbit 100mbit 20mbit"]
#                           [--images "busybox debian-python debian-big"]
#                           [--rows "cold-registry cold-peer warm pull tar"] [--out NAME]
#   any of the above with [--tools "fd podman runc skopeo"] to measure only those tools
#
# --plan full (the default when none of --quick, --images, --profiles, --rows is given): every
# workload of the three images, trimmed per image so that the whole run takes about 40 minutes
# on the 2-core machine this was written on:
#   busybox, debian-python:  all rows at 1gbit and 100mbit; cold-registry and cold-peer at
#                            20mbit; 3 repetitions
#   debian-big:              all rows at 1gbit; cold-registry and cold-peer at 100mbit;
#                            2 repetitions (its cold rows at 100mbit move 336 MiB each)
# The estimate behind it, from earlier runs (seconds per repetition, all tools of the rows,
# plus about 1.5 s per task for emptying stores and dropping caches): busybox about 25 s over
# all profiles; debian-python about 230 s at 1gbit+100mbit and 190 s at 20mbit (each 57 s
# podman/registry start is the bulk); debian-big about 115 s at 1gbit and 200 s at 100mbit.
# So 3 x (25 + 230 + 190) + 2 x (115 + 200) = about 1970 s of tasks, plus 2-4 minutes of
# setup (building and pushing images, warm stores, node A's store): about 38 minutes. One run
# with the release binary took 44.5 minutes while other jobs kept the load at 5 to 9.
# --reps N sets the repetitions of every image in the plan.
# Otherwise the plan is every image x profile x row given (defaults: the three profiles,
# debian-python and debian-big, all rows; 3 repetitions).
# --quick: one repetition, the 1gbit profile, busybox and debian-python, and only the
# cold-registry, warm and pull rows (for CI; works with FD=target/debug/fd).
# --no-peer-delay: peer traffic goes straight to node A, without the delay relay (to see what
# the delay costs).
# FD=PATH uses that fd binary instead of building one in release mode; FD_REV=REV names its
# revision in the report (by default: the checkout's HEAD, +dirty when it has changes).
#
# A time is taken from the start of the command until the workload prints its marker line
# (benches/timer.py watches stdout); for `true` it is the time to exit.
#
# The network: the registry runs in its own network namespace and node A (the peer) in
# another; the clients run in a third, joined to both by veth links. tc tbf limits the rate on
# every veth; the added delay comes from benches/relay.py (this kernel has no netem), which
# holds the registry's answers for the profile's delay. The peer's QUIC traffic goes through
# the same relay in UDP mode (relay.py --udp on the client's loopback, port 7701, forwarding to
# node A), which holds node A's datagrams for the same delay: fd run gets --peer pointing at
# the relay, which works because QUIC's TLS checks the peer's id, not its address. The relays
# are Python and share the machine's cores with the tools measured. Every address is inside
# these namespaces, which are deleted at the end, as are every process, mount and temp dir
# the suite made.
#
# Cold rows drop the page cache first (sync; echo 3 > /proc/sys/vm/drop_caches, which needs
# root and slows everything else on the machine for a moment) and start from empty stores.
#
# Results: benches/results/compare-DATE[-NAME].md (one table per row kind, over every image
# and profile measured, with a line under each naming where fd was slower), .json (raw
# measurements, summary and meta) and .svg (cold-start times of fd and podman, every image x
# profile in one figure).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

quick=0
reps=
profiles=
images=
rows=
plan=
out_name=
tools=
peer_delay=1
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --plan) plan=$2; shift ;;
    --reps) reps=$2; shift ;;
    --profiles) profiles=$2; shift ;;
    --images) images=$2; shift ;;
    --rows) rows=$2; shift ;;
    --out) out_name=$2; shift ;;
    --tools) tools=$2; shift ;;
    --no-peer-delay) peer_delay=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "compare: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
ALL_ROWS="cold-registry cold-peer warm pull tar"
if [ "$quick" = 1 ]; then
  reps=1 profiles=1gbit images="busybox debian-python" rows="cold-registry warm pull"
fi
if [ -z "$plan" ] && [ "$quick$images$profiles$rows" = 0 ]; then plan=full; fi
case $plan in
  "" | full) ;;
  *) echo "compare: unknown plan $plan (full)" >&2; exit 2 ;;
esac
if [ -n "$plan" ] && [ -n "$images$profiles$rows" ]; then
  echo "compare: --plan does not mix with --images, --profiles or --rows" >&2; exit 2
fi
[ "$(id -u)" = 0 ] || { echo "compare: needs root (namespaces, tc, drop_caches, containers)" >&2; exit 1; }

# Profile name -> tbf rate, tbf burst, added delay of the registry's answers in ms.
declare -A RATE=([1gbit]=1gbit [100mbit]=100mbit [20mbit]=20mbit)
declare -A BURST=([1gbit]=1mb [100mbit]=256kb [20mbit]=256kb)
declare -A DELAY=([1gbit]=0.2 [100mbit]=5 [20mbit]=40)
# Image name -> OCI layout in the test image cache and its tag.
declare -A TAG=([busybox]=latest [debian-python]=bookworm [debian-big]=bookworm)
has() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }

# The plan: PLAN[image/profile] = the rows measured there, REPS[image] = its repetitions.
declare -A PLAN REPS
if [ "$plan" = full ]; then
  images="busybox debian-python debian-big"
  profiles="1gbit 100mbit 20mbit"
  for i in busybox debian-python; do
    PLAN[$i/1gbit]=$ALL_ROWS PLAN[$i/100mbit]=$ALL_ROWS PLAN[$i/20mbit]="cold-registry cold-peer"
    REPS[$i]=${reps:-3}
  done
  PLAN[debian-big/1gbit]=$ALL_ROWS PLAN[debian-big/100mbit]="cold-registry cold-peer"
  REPS[debian-big]=${reps:-2}
else
  images=${images:-debian-python debian-big}
  profiles=${profiles:-1gbit 100mbit 20mbit}
  rows=${rows:-$ALL_ROWS}
  for i in $images; do
    for p in $profiles; do PLAN[$i/$p]=$rows; done
    REPS[$i]=${reps:-3}
  done
fi
for p in $profiles; do
  [ -n "${RATE[$p]:-}" ] || { echo "compare: unknown profile $p (1gbit, 100mbit, 20mbit)" >&2; exit 2; }
done
for i in $images; do
  [ -n "${TAG[$i]:-}" ] || { echo "compare: unknown image $i" >&2; exit 2; }
done
for r in $rows; do
  has "$ALL_ROWS" "$r" || { echo "compare: unknown row $r ($ALL_ROWS)" >&2; exit 2; }
done
# rows_of IMAGE: every row the plan measures for that image, over all profiles.
rows_of() {
  local p
  for p in $profiles; do echo "${PLAN[$1/$p]:-}"; done | tr ' ' '\n' | sort -u | tr '\n' ' '
}
all_rows=$(for i in $images; do rows_of "$i"; done | tr ' ' '\n' | sort -u | tr '\n' ' ')
max_reps=0
for i in $images; do [ "${REPS[$i]}" -gt "$max_reps" ] && max_reps=${REPS[$i]}; done
# Warm starts do not touch the network: each image's are measured in the first profile whose
# plan has them.
declare -A WARM_PROF
for i in $images; do
  for p in $profiles; do
    if has "${PLAN[$i/$p]:-}" warm && [ -z "${WARM_PROF[$i]:-}" ]; then WARM_PROF[$i]=$p; fi
  done
done
plan_text=$(for i in $images; do
  printf '%s (%s reps):' "$i" "${REPS[$i]}"
  for p in $profiles; do [ -n "${PLAN[$i/$p]:-}" ] && printf ' %s=%s' "$p" "$(echo ${PLAN[$i/$p]} | tr ' ' ',')"; done
  printf '; '
done | sed 's/; $//')
echo "== plan: $plan_text"

# Workloads per image: a label and a shell command for sh -c inside the container. Each prints
# a line starting with fd-mark, the moment the timer stops.
workloads() {
  case $1 in
    busybox) printf 'echo\t%s\n' 'echo fd-mark' ;;
    debian-python) printf 'python\t%s\n' "python3 -c 'import json, sqlite3; print(\"fd-mark\")'" ;;
    debian-big)
      printf 'pandas\t%s\n' "python3 -c 'import pandas; print(\"fd-mark\", pandas.__version__)'"
      printf 'gcc\t%s\n' "printf '#include <stdio.h>\\nint main(void) { puts(\"fd-mark hello\"); return 0; }\\n' >/tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h"
      ;;
  esac
}
TAR_WORKLOAD='tar cf /dev/null /usr && echo fd-mark'

started=$(date +%s)
# Other work on the machine skews every time: keep the load at the start and end for the report.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -z "${FD:-}" ]; then
  echo "== building fd (release)"
  cargo build --release -q -p fd-cli
  FD=$REPO/target/release/fd
fi
[ -x "$FD" ] || { echo "compare: no fd binary at $FD" >&2; exit 1; }
echo "== test images"
if has "$images" debian-big; then
  bash tests/images/build.sh --big >/dev/null
else
  bash tests/images/build.sh >/dev/null
fi
CACHE=${FD_TEST_CACHE:-$REPO/.cache/images}

work=$(mktemp -d /tmp/fd-compare.XXXXXX)
tag=fdc$$
ns_r=$tag-reg ns_c=$tag-cli ns_a=$tag-peer
relay_pid='' udp_relay_pid='' udp_relay_prof='' share_pid=''
# Undo everything, in reverse order of creation; each step tolerates a half-done setup.
cleanup() {
  local rc=$?
  set +e
  [ -n "$share_pid" ] && kill "$share_pid" 2>/dev/null && wait "$share_pid" 2>/dev/null
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
  [ -n "$udp_relay_pid" ] && kill "$udp_relay_pid" 2>/dev/null && wait "$udp_relay_pid" 2>/dev/null
  stop_registry
  if [ -d "$work/podman" ]; then
    for s in cold warm; do
      CONTAINERS_STORAGE_CONF=$work/podman/storage-$s.conf podman rm -af >/dev/null 2>&1
      CONTAINERS_STORAGE_CONF=$work/podman/storage-$s.conf podman rmi -af >/dev/null 2>&1
    done
  fi
  # podman's overlay driver and fd runs may leave mounts under the work dir: remove them
  # deepest first before deleting anything.
  awk -v d="$work/" 'index($2 "/", d) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  for ns in "$ns_a" "$ns_c" "$ns_r"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$work"
  [ "$rc" -eq 0 ] || echo "compare: the suite failed (exit $rc)" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The fd binary is copied so that a rebuild during the run does not change what is measured.
mkdir -p "$work/bin"
fd_src=$(readlink -f "$FD")
cp "$FD" "$work/bin/fd"
FD=$work/bin/fd
if [ -n "${FD_REV:-}" ]; then
  fd_rev=$FD_REV
else
  fd_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then fd_rev+="+dirty"; fi
fi

# Namespaces: clients in ns_c; the registry in ns_r (10.231.1.0/24); node A in ns_a
# (10.231.2.0/24). The clients reach the registry only through the relay on their own
# loopback, so every tool sees it as 127.0.0.1:5000 (plain HTTP for fd, podman and skopeo).
for ns in "$ns_r" "$ns_c" "$ns_a"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n "$ns_c" link add veth-reg type veth peer name eth0 netns "$ns_r"
ip -n "$ns_c" link add veth-peer type veth peer name eth0 netns "$ns_a"
ip -n "$ns_c" addr add 10.231.1.2/24 dev veth-reg
ip -n "$ns_r" addr add 10.231.1.1/24 dev eth0
ip -n "$ns_c" addr add 10.231.2.2/24 dev veth-peer
ip -n "$ns_a" addr add 10.231.2.1/24 dev eth0
for l in "$ns_c veth-reg" "$ns_r eth0" "$ns_c veth-peer" "$ns_a eth0"; do
  read -r ns dev <<<"$l"
  ip -n "$ns" link set "$dev" up
done
in_c() { nsenter --net="/run/netns/$ns_c" "$@"; }

# The registry, inside ns_r. start_registry picks a loopback port; rewrite it to the
# namespace address before it starts.
mkdir -p "$work/registry/storage"
cat >"$work/registry/config.yml" <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry/storage
  cache:
    blobdescriptor: inmemory
http:
  addr: 10.231.1.1:5000
CONF
nsenter --net="/run/netns/$ns_r" docker-registry serve "$work/registry/config.yml" \
  >"$work/registry/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 1 100); do
  in_c curl -fsS http://10.231.1.1:5000/v2/ >/dev/null 2>&1 && break
  sleep 0.1
done
in_c curl -fsS http://10.231.1.1:5000/v2/ >/dev/null || { echo "compare: registry did not start" >&2; exit 1; }

policy=$work/policy.json
echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$policy"
declare -A CSIZE USIZE
for i in $images; do
  layout=$CACHE/$i
  [ -d "$layout" ] || { echo "compare: no image $layout (tests/images/build.sh)" >&2; exit 1; }
  in_c skopeo --policy "$policy" copy -q --dest-tls-verify=false \
    "oci:$layout:${TAG[$i]}" "docker://10.231.1.1:5000/$i:${TAG[$i]}"
  m=$(jq -er --arg t "${TAG[$i]}" \
    '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$layout/index.json")
  CSIZE[$i]=$(jq '[.layers[].size] | add' "$layout/blobs/sha256/${m#sha256:}")
  # A runc bundle of the same image, for the warm rows and for the unpacked size.
  umoci --log error unpack --image "$layout:${TAG[$i]}" "$work/bundle-$i" >/dev/null
  USIZE[$i]=$(du -sb "$work/bundle-$i/rootfs" | cut -f1)
  python3 - "$work/bundle-$i/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["true"]
json.dump(c, open(p, "w"))
PY
done

start_relay() { # delay_ms
  if [ -n "$relay_pid" ]; then kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
  # nsenter directly (not through a shell function) so that $! is the relay itself.
  nsenter --net="/run/netns/$ns_c" python3 "$REPO/benches/relay.py" 127.0.0.1:5000 10.231.1.1:5000 "$1" \
    >"$work/relay.log" 2>&1 &
  relay_pid=$!
  for _ in $(seq 1 100); do
    in_c curl -fsS http://127.0.0.1:5000/v2/ >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "compare: the relay did not answer; see $work/relay.log" >&2
  return 1
}
# The UDP relay for node A's QUIC traffic: 127.0.0.1:7701 in ns_c -> 10.231.2.1:7700. Its
# counters (written when it stops) go to relay-udp.log, one JSON line per profile.
start_udp_relay() { # profile
  stop_udp_relay
  udp_relay_prof=$1
  nsenter --net="/run/netns/$ns_c" python3 "$REPO/benches/relay.py" --udp 127.0.0.1:7701 10.231.2.1:7700 "${DELAY[$1]}" \
    2>>"$work/relay-udp.log" &
  udp_relay_pid=$!
  # A datagram socket gives no answer to wait for: check that it is bound.
  for _ in $(seq 1 100); do
    in_c ss -Hlun 'sport = :7701' | grep -q . && return 0
    sleep 0.1
  done
  echo "compare: the UDP relay did not start; see $work/relay-udp.log" >&2
  return 1
}
stop_udp_relay() {
  if [ -n "$udp_relay_pid" ]; then
    kill "$udp_relay_pid" 2>/dev/null || true
    wait "$udp_relay_pid" 2>/dev/null || true
    # Its counters show that the peer's traffic really went through it.
    echo "  peer relay ($udp_relay_prof): $(tail -n 1 "$work/relay-udp.log")"
    printf '%s=%s; ' "$udp_relay_prof" "$(tail -n 1 "$work/relay-udp.log")" >>"$work/relay-udp.stats"
  fi
  udp_relay_pid=
}
current_profile=
set_profile() { # name: the same tbf on both ends of both links
  local p=$1 l ns dev
  # Already set (the Range check below sets the first profile): keep the running relays.
  [ "$p" != "$current_profile" ] || return 0
  current_profile=$p
  for l in "$ns_c veth-reg" "$ns_r eth0" "$ns_c veth-peer" "$ns_a eth0"; do
    read -r ns dev <<<"$l"
    tc -n "$ns" qdisc replace dev "$dev" root tbf rate "${RATE[$p]}" burst "${BURST[$p]}" latency 50ms
  done
  start_relay "${DELAY[$p]}"
  if has "$all_rows" cold-peer && [ "$peer_delay" = 1 ]; then start_udp_relay "$p"; fi
}
if [ "$peer_delay" = 1 ]; then
  PEER_ADDR=/ip4/127.0.0.1/udp/7701/quic-v1
else
  PEER_ADDR=/ip4/10.231.2.1/udp/7700/quic-v1
fi

# Lazy starts need byte ranges: check that the registry answers a Range request with 206
# (through the relay) before anything is timed.
set_profile "${profiles%% *}"
first=${images%% *}
m=$(jq -er --arg t "${TAG[$first]}" \
  '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
  "$CACHE/$first/index.json")
l0=$(jq -r '.layers[0].digest' "$CACHE/$first/blobs/sha256/${m#sha256:}")
code=$(in_c curl -s -o /dev/null -w '%{http_code}' -H 'Range: bytes=0-99' \
  "http://127.0.0.1:5000/v2/$first/blobs/$l0")
[ "$code" = 206 ] || { echo "compare: the registry answered a Range request with $code, not 206" >&2; exit 1; }
echo "== registry in $ns_r answers Range requests with 206"

# podman: state under $work, one store for cold rows (emptied before each) and one for warm.
mkdir -p "$work/podman"
for s in cold warm; do
  cat >"$work/podman/storage-$s.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$work/podman/$s/root"
runroot = "$work/podman/$s/run"
CONF
done
cat >"$work/podman/registries.conf" <<CONF
[[registry]]
location = "127.0.0.1:5000"
insecure = true
CONF
printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n' >"$work/podman/containers.conf"
export CONTAINERS_REGISTRIES_CONF=$work/podman/registries.conf
export CONTAINERS_CONF=$work/podman/containers.conf
export NO_COLOR=1 FD_MDNS=0
# podman needs runc, no network (its default bridge adds iptables chains) and ulimits below
# this machine's hard limits.
cat >"$work/podman-run.sh" <<'SH'
#!/bin/sh
# podman-run.sh pull|nopull REF WORKLOAD: optionally pull, then run WORKLOAD with sh -c.
set -e
if [ "$1" = pull ]; then podman pull -q "$2" >/dev/null; fi
exec podman run --rm --runtime runc --network=none \
  --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 "$2" sh -c "$3"
SH
chmod +x "$work/podman-run.sh"
podman_cold() { CONTAINERS_STORAGE_CONF=$work/podman/storage-cold.conf "$@"; }

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
ref_of() { echo "127.0.0.1:5000/$1:${TAG[$1]}"; }

# Warm stores and node A's store (pulled over the first profile), then A shares from ns_a.
for i in $images; do
  if has "$(rows_of "$i")" warm; then
    in_c env FD_HOME="$work/fdwarm" "$FD" pull -q "$(ref_of "$i")"
    in_c env CONTAINERS_STORAGE_CONF="$work/podman/storage-warm.conf" podman pull -q "$(ref_of "$i")" >/dev/null
  fi
  if has "$(rows_of "$i")" cold-peer; then
    in_c env FD_HOME="$work/nodeA" "$FD" pull -q "$(ref_of "$i")"
  fi
done
team_token=
if has "$all_rows" cold-peer; then
  team_token=$(FD_HOME=$work/nodeA "$FD" team init 2>/dev/null | tail -n 1)
  FD_HOME=$work/nodeA nsenter --net="/run/netns/$ns_a" "$FD" share -q --no-mdns \
    --listen /ip4/10.231.2.1/udp/7700/quic-v1 >"$work/share.log" 2>&1 &
  share_pid=$!
  sleep 1
  kill -0 "$share_pid" || { echo "compare: fd share did not start; $(cat "$work/share.log")" >&2; exit 1; }
fi

raw=$work/raw.jsonl
: >"$raw"
failures=0
runc_n=0
# measure ROW IMAGE WORKLOAD PROFILE TOOL REP MARKER -- COMMAND...: times one command and
# appends a JSON line; a failed command is recorded and counted, and the suite goes on.
measure() {
  local row=$1 image=$2 wl=$3 prof=$4 tool=$5 rep=$6 marker=$7 out err
  shift 8
  err=$work/stderr.txt
  if out=$(python3 "$REPO/benches/timer.py" --marker "$marker" --stderr "$err" --timeout 900 -- "$@"); then
    python3 - "$raw" "$row" "$image" "$wl" "$prof" "$tool" "$rep" "$out" "$err" <<'PY'
import json, re, sys
raw, row, image, wl, prof, tool, rep, out, err = sys.argv[1:]
rec = {"row": row, "image": image, "workload": wl, "profile": prof, "tool": tool,
       "rep": int(rep), **json.loads(out)}
# fd's own summaries on stderr. A pull prints
#   Pulled REF in T: X from registry, Y from peers
# and a run that streamed the image from peers prints (the verb right-aligned)
#   Streamed REF: N from peers (M of file contents in K chunks, P% of the image's S; Q of metadata)
units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
def size(num, unit):
    return round(float(num) * units[unit])
text = re.sub(r"\x1b\[[0-9;]*m", "", open(err, errors="replace").read())
m = re.search(r"^\s*Pulled .* in [^:]+: ([\d.]+) (\w+) from registry, ([\d.]+) (\w+) from peers", text, re.M)
if m:
    rec["bytes_registry"] = size(m[1], m[2])
    rec["bytes_peers"] = size(m[3], m[4])
m = re.search(r"^\s*Streamed \S+: ([\d.]+) (\w+) from peers(?: and --from stores)? "
              r"\(([\d.]+) (\w+) of file contents in (\d+) chunks, ([\d.]+)% of the image's "
              r"([\d.]+) (\w+); ([\d.]+) (\w+) of metadata\)", text, re.M)
if m:
    # A streamed run may also have pulled something first (a registry fallback): add both.
    rec["bytes_registry"] = rec.get("bytes_registry", 0)
    rec["bytes_peers"] = rec.get("bytes_peers", 0) + size(m[1], m[2])
    rec["streamed"] = {"bytes": size(m[1], m[2]), "file_bytes": size(m[3], m[4]),
                       "chunks": int(m[5]), "percent_of_image": float(m[6]),
                       "image_bytes": size(m[7], m[8]), "metadata_bytes": size(m[9], m[10])}
elif "Streamed " in text:
    # The line is there but its shape changed: keep it, so the report shows the gap.
    rec["streamed_unparsed"] = [l.strip() for l in text.splitlines() if "Streamed " in l]
with open(raw, "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
    printf '  %-13s %-13s %-7s %-8s %-14s %s s\n' "$row" "$image" "$wl" "$prof" "$tool" \
      "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$out")"
  else
    failures=$((failures + 1))
    echo "  FAILED: $row $image $wl $prof $tool (stderr tail below)" >&2
    tail -n 5 "$err" >&2 || true
    printf '{"row":"%s","image":"%s","workload":"%s","profile":"%s","tool":"%s","rep":%s,"failed":true}\n' \
      "$row" "$image" "$wl" "$prof" "$tool" "$rep" >>"$raw"
  fi
}

# One task: prepare a fresh state (for cold rows), then measure.
run_task() { # row image wl_label tool prof rep
  local row=$1 image=$2 label=$3 tool=$4 prof=$5 rep=$6 ref wl
  ref=$(ref_of "$image")
  if [ "$row" = tar ]; then wl=$TAR_WORKLOAD; else wl=$(workloads "$image" | awk -F'\t' -v l="$label" '$1 == l { print $2 }'); fi
  case $row/$tool in
    cold-registry/fd | tar/fd)
      rm -rf "$work/fdcold"; drop_caches
      measure "$row" "$image" "$label" "$prof" fd "$rep" fd-mark -- \
        nsenter --net="/run/netns/$ns_c" env FD_HOME="$work/fdcold" "$FD" run --no-mdns --net none "$ref" sh -c "$wl" ;;
    cold-registry/podman | cold-peer/podman | tar/podman)
      podman_cold podman rmi -af >/dev/null 2>&1 || true; drop_caches
      measure "$row" "$image" "$label" "$prof" podman "$rep" fd-mark -- \
        env CONTAINERS_STORAGE_CONF="$work/podman/storage-cold.conf" nsenter --net="/run/netns/$ns_c" "$work/podman-run.sh" pull "$ref" "$wl" ;;
    cold-peer/fd)
      rm -rf "$work/fdcold"
      FD_HOME=$work/fdcold "$FD" team join "$team_token" >/dev/null 2>&1
      drop_caches
      measure "$row" "$image" "$label" "$prof" fd "$rep" fd-mark -- \
        nsenter --net="/run/netns/$ns_c" env FD_HOME="$work/fdcold" "$FD" run --no-mdns \
        --peer "$PEER_ADDR" --net none "$ref" sh -c "$wl" ;;
    warm/fd)
      measure warm "$image" true "$prof" fd "$rep" "" -- \
        nsenter --net="/run/netns/$ns_c" env FD_HOME="$work/fdwarm" "$FD" run --no-mdns --net none "$ref" true ;;
    warm/runc)
      runc_n=$((runc_n + 1))
      measure warm "$image" true "$prof" runc "$rep" "" -- \
        runc --root "$work/runc-state" run -b "$work/bundle-$image" "$tag-$runc_n" ;;
    warm/podman)
      measure warm "$image" true "$prof" podman "$rep" "" -- \
        env CONTAINERS_STORAGE_CONF="$work/podman/storage-warm.conf" nsenter --net="/run/netns/$ns_c" "$work/podman-run.sh" nopull "$ref" true ;;
    pull/fd)
      rm -rf "$work/fdcold"; drop_caches
      measure pull "$image" - "$prof" fd "$rep" "" -- \
        nsenter --net="/run/netns/$ns_c" env FD_HOME="$work/fdcold" "$FD" pull --no-mdns "$ref" ;;
    pull/podman)
      podman_cold podman rmi -af >/dev/null 2>&1 || true; drop_caches
      measure pull "$image" - "$prof" podman "$rep" "" -- \
        env CONTAINERS_STORAGE_CONF="$work/podman/storage-cold.conf" nsenter --net="/run/netns/$ns_c" podman pull -q "$ref" ;;
    pull/skopeo)
      rm -rf "$work/skopeo-oci"; drop_caches
      measure pull "$image" - "$prof" skopeo "$rep" "" -- \
        nsenter --net="/run/netns/$ns_c" skopeo --policy "$policy" copy -q --src-tls-verify=false \
        "docker://$ref" "oci:$work/skopeo-oci:t" ;;
  esac
  rm -rf "$work/fdcold" "$work/skopeo-oci"
}

# The task list of one profile and repetition: every (row, image, workload, tool) the plan has.
tasks() { # profile rep
  local i l rows
  for i in $images; do
    rows=${PLAN[$i/$1]:-}
    [ "$2" -le "${REPS[$i]}" ] || continue
    if has "$rows" cold-registry; then
      while IFS=$'\t' read -r l _; do printf 'cold-registry %s %s fd\ncold-registry %s %s podman\n' "$i" "$l" "$i" "$l"; done < <(workloads "$i")
    fi
    if has "$rows" cold-peer; then
      while IFS=$'\t' read -r l _; do printf 'cold-peer %s %s fd\ncold-peer %s %s podman\n' "$i" "$l" "$i" "$l"; done < <(workloads "$i")
    fi
    if has "$rows" pull; then printf 'pull %s - %s\n' "$i" fd "$i" podman "$i" skopeo; fi
    if has "$rows" tar; then printf 'tar %s tar fd\ntar %s tar podman\n' "$i" "$i"; fi
    # Warm starts are measured in one profile only, with three times the repetitions (they
    # are cheap).
    if has "$rows" warm && [ "${WARM_PROF[$i]}" = "$1" ]; then
      for _ in 1 2 3; do printf 'warm %s true %s\n' "$i" fd "$i" runc "$i" podman; done
    fi
  done
}

for prof in $profiles; do
  [ -n "$(for i in $images; do echo "${PLAN[$i/$prof]:-}"; done | tr -d ' \n')" ] || continue
  pd=
  if has "$all_rows" cold-peer; then
    if [ "$peer_delay" = 1 ]; then pd=", peer's ${DELAY[$prof]} ms"; else pd=", peer's not delayed"; fi
  fi
  echo "== profile $prof: rate ${RATE[$prof]}, registry answers delayed ${DELAY[$prof]} ms$pd"
  set_profile "$prof"
  for ((rep = 1; rep <= max_reps; rep++)); do
    while read -r row image label tool; do
      if [ -n "$tools" ] && ! has "$tools" "$tool"; then continue; fi
      run_task "$row" "$image" "$label" "$tool" "$prof" "$rep"
    done < <(tasks "$prof" "$rep" | shuf)
  done
done
stop_udp_relay

# Machine, tools and sizes for the report.
date_tag=$(date -u +%Y-%m-%d)
mkdir -p benches/results
out_base=benches/results/compare-$date_tag${out_name:+-$out_name}
[ "$quick" = 1 ] && out_base=$work/compare-quick
sizes=$(for i in $images; do printf '%s %s %s\n' "$i" "${CSIZE[$i]}" "${USIZE[$i]}"; done)
reps_text=$(for i in $images; do printf '%s=%s ' "$i" "${REPS[$i]}"; done)
python3 "$REPO/benches/compare_report.py" "$raw" "$out_base" \
  --meta "quick=$quick" --meta "reps=$max_reps" --meta "reps_per_image=${reps_text% }" \
  --meta "plan=${plan:-cross}" --meta "plan_detail=$plan_text" \
  --meta "profiles=$profiles" --meta "images=$images" \
  --meta "rows=$all_rows" --meta "peer_delay=$peer_delay" --meta "tools=${tools:-all}" \
  --meta "peer_relay_counters=$(cat "$work/relay-udp.stats" 2>/dev/null)" \
  --meta "fd_rev=$fd_rev" --meta "fd_binary=$fd_src" \
  --meta "podman=$(podman --version)" --meta "runc=$(runc --version | head -n 1)" \
  --meta "skopeo=$(skopeo --version)" --meta "umoci=$(umoci --version)" \
  --meta "date=$date_tag" --meta "kernel=$(uname -r)" --meta "cores=$(nproc)" \
  --meta "memory_gib=$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)" \
  --meta "load_start=$load_start" --meta "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" \
  --meta "seconds=$(($(date +%s) - started))" --sizes "$sizes"
measured=$(grep -vc '"failed"' "$raw" || true)
echo "compare: $measured rows measured, $failures failed, in $(($(date +%s) - started)) s"
[ "$failures" -eq 0 ] || exit 1
