#!/usr/bin/env bash
# Mirror benchmark, side by side in one run: pulls of the debian-python image straight from a
# local registry vs through `fd serve --mirror` in front of it.
#   1. per client (skopeo copy to an OCI layout, podman pull): wall time straight vs warm mirror;
#   2. 8 concurrent skopeo clients: total wall time and bytes the registry sent, straight vs
#      through a cold mirror (a counting TCP relay sits in front of the registry).
#
#   bash scripts/bench-mirror.sh [REPS]    (default 3; FD=path/to/fd to pick a build)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
reps=${1:-3}

if [ -z "${FD:-}" ]; then
  cargo build -q -p fd-cli
  FD=$PWD/target/debug/fd
fi
bash tests/images/build.sh >/dev/null
CACHE=${FD_TEST_CACHE:-$PWD/.cache/images}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  stop_registry
  rm -rf "$work"
}
trap cleanup EXIT
start_registry "$work/registry"
push_image "$CACHE/debian-python" bookworm debian-python:bookworm
image=debian-python:bookworm
printf '{"default":[{"type":"insecureAcceptAnything"}]}' >"$work/policy.json"
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY

# A TCP relay on 127.0.0.1 that counts the bytes the registry sends; prints them on SIGTERM.
relay() { # LISTEN_PORT UPSTREAM OUTFILE
  python3 - "$1" "$2" "$3" <<'PY' &
import socket, sys, threading, signal
port, up, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
h, p = up.rsplit(":", 1); total = [0]; lock = threading.Lock()
def pump(a, b, count):
    try:
        while True:
            d = a.recv(1 << 16)
            if not d: break
            if count:
                with lock: total[0] += len(d)
            b.sendall(d)
    except OSError: pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
def done(*_):
    open(out, "w").write(str(total[0])); sys.exit(0)
signal.signal(signal.SIGTERM, done)
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(64)
while True:
    c, _ = ls.accept(); s = socket.create_connection((h, int(p)))
    threading.Thread(target=pump, args=(c, s, False), daemon=True).start()
    threading.Thread(target=pump, args=(s, c, True), daemon=True).start()
PY
  pids+=($!)
  for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$1/v2/" >/dev/null 2>&1 && return 0; sleep 0.1; done
}

start_mirror() { # UPSTREAM HOME -> sets MIRROR
  local port; port=$(free_port)
  FD_HOME=$2 "$FD" -q serve --mirror "127.0.0.1:$port" --upstream "$1" 2>"$2.log" &
  pids+=($!)
  MIRROR=127.0.0.1:$port
  for _ in $(seq 1 100); do curl -fsS "http://$MIRROR/v2/" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "mirror did not start" >&2; return 1
}

skopeo_pull() { # HOST DEST
  skopeo --policy "$work/policy.json" copy -q --src-tls-verify=false \
    "docker://$1/$image" "oci:$2:t" >/dev/null
}

podman_pull() { # MIRROR_OR_EMPTY DIR
  local d=$2; mkdir -p "$d"
  printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/root"\nrunroot = "%s/run"\n' "$d" "$d" >"$d/storage.conf"
  { echo 'unqualified-search-registries = []'
    printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$REGISTRY"
    if [ -n "$1" ]; then printf '[[registry.mirror]]\nlocation = "%s"\ninsecure = true\n' "$1"; fi
  } >"$d/registries.conf"
  printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n' >"$d/containers.conf"
  CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_REGISTRIES_CONF=$d/registries.conf \
    CONTAINERS_CONF=$d/containers.conf podman pull -q --signature-policy "$work/policy.json" \
    "$REGISTRY/$image" >/dev/null
  CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_REGISTRIES_CONF=$d/registries.conf \
    CONTAINERS_CONF=$d/containers.conf podman rmi -a -f >/dev/null 2>&1 || true
  rm -rf "$d"
}

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

start_mirror "$REGISTRY" "$work/fd-warm"
skopeo_pull "$MIRROR" "$work/warmup"; rm -rf "$work/warmup"   # warms the mirror

echo "| client | straight s | warm mirror s | mirror / straight |"
echo "|---|---|---|---|"
for client in skopeo podman; do
  : >"$work/t-direct"; : >"$work/t-mirror"
  for i in $(seq 1 "$reps"); do
    for via in direct mirror; do
      t0=$(now)
      if [ $client = skopeo ]; then
        if [ $via = direct ]; then skopeo_pull "$REGISTRY" "$work/o"; else skopeo_pull "$MIRROR" "$work/o"; fi
        rm -rf "$work/o"
      else
        if [ $via = direct ]; then podman_pull "" "$work/p"; else podman_pull "$MIRROR" "$work/p"; fi
      fi
      echo "$(now) - $t0" | bc >>"$work/t-$via"
    done
  done
  d=$(median <"$work/t-direct"); m=$(median <"$work/t-mirror")
  printf '| %s | %.2f | %.2f | %.2fx |\n' "$client" "$d" "$m" "$(echo "$m / $d" | bc -l)"
done

# 8 concurrent clients: straight through relay A, or through a cold mirror behind relay B.
run8() { # HOST
  local t0; t0=$(now)
  for i in $(seq 1 8); do skopeo_pull "$1" "$work/c$i" & done
  wait_clients=$(jobs -p | grep -vxF -f <(printf '%s\n' "${pids[@]}") || true)
  for j in $wait_clients; do wait "$j"; done
  echo "$(now) - $t0" | bc
  rm -rf "$work"/c*
}
pa=$(free_port); relay "$pa" "$REGISTRY" "$work/bytes-a"
t_direct=$(run8 "127.0.0.1:$pa")
pb=$(free_port); relay "$pb" "$REGISTRY" "$work/bytes-b"
start_mirror "127.0.0.1:$pb" "$work/fd-cold"
t_mirror=$(run8 "$MIRROR")
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
pids=()
echo
echo "| 8 concurrent skopeo clients | total s | bytes from the registry |"
echo "|---|---|---|"
printf '| straight | %.2f | %s |\n' "$t_direct" "$(cat "$work/bytes-a")"
printf '| through a cold fd mirror | %.2f | %s |\n' "$t_mirror" "$(cat "$work/bytes-b")"
