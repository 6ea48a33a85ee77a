# shellcheck shell=bash
# Shell helpers shared by the demo and benchmark scripts. Source it; do not run it.
#
# start_registry DIR     starts Debian's docker-registry on a free 127.0.0.1 port with its
#                        storage in DIR; sets REGISTRY (host:port) and REGISTRY_PID.
# push_image LAYOUT TAG NAME:TAG   pushes an OCI layout image to $REGISTRY with skopeo.
# stop_registry          kills the registry by PID.
# podman_private_state DIR   points podman at config files under DIR that keep all of its
#                        state there and trust $REGISTRY over plain HTTP.

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start_registry() {
  local dir=$1 port
  port=$(free_port)
  mkdir -p "$dir/storage"
  cat >"$dir/config.yml" <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/storage
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
CONF
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  REGISTRY_PID=$!
  REGISTRY=127.0.0.1:$port
  for _ in $(seq 1 100); do
    curl -fsS "http://$REGISTRY/v2/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "error: registry did not start; see $dir/registry.log" >&2
  return 1
}

push_image() {
  skopeo copy -q --dest-tls-verify=false "oci:$1:$2" "docker://$REGISTRY/$3"
}

stop_registry() {
  if [ -n "${REGISTRY_PID:-}" ]; then
    kill "$REGISTRY_PID" 2>/dev/null || true
    wait "$REGISTRY_PID" 2>/dev/null || true
    REGISTRY_PID=
  fi
}

podman_private_state() {
  # See the machine notes for why each setting: state out of /etc and /var, no systemd
  # cgroup manager or journal (PID 1 is not systemd here).
  local dir=$1
  mkdir -p "$dir"
  cat >"$dir/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$dir/root"
runroot = "$dir/run"
CONF
  cat >"$dir/registries.conf" <<CONF
[[registry]]
location = "$REGISTRY"
insecure = true
CONF
  printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n' >"$dir/containers.conf"
  export CONTAINERS_STORAGE_CONF=$dir/storage.conf
  export CONTAINERS_REGISTRIES_CONF=$dir/registries.conf
  export CONTAINERS_CONF=$dir/containers.conf
}
