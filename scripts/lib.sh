# shellcheck shell=bash
# Shell helpers shared by the demo and benchmark scripts. Source it; do not run it.
#
# start_registry DIR     starts Debian's docker-registry on a free 127.0.0.1 port with its
#                        storage in DIR; sets REGISTRY (host:port) and REGISTRY_PID.
# push_image LAYOUT TAG NAME:TAG   pushes an OCI layout image to $REGISTRY with skopeo.
# stop_registry          kills the registry by PID.
# podman_private_state DIR   points podman at config files under DIR that keep all of its
#                        state there and trust $REGISTRY over plain HTTP.
# fd_binary REPO         picks the fd binary of a benchmark: $FD when set, else REPO's fd
#                        built in release mode; exits when it is not executable. Sets FD,
#                        fd_src (the binary's real path) and fd_rev (its commit for the
#                        report: $FD_REV, else REV of a binary named fd-REV, else REPO's
#                        commit, "+dirty" with uncommitted changes).
# fd_private_copy DIR    copies $fd_src to DIR/bin/fd and points FD at the copy, so that a
#                        rebuild while a benchmark runs does not change what is measured.
# unmount_under DIR      unmounts every mount point below DIR, deepest first (lazily if busy).
# cleanup_on_exit NAME FUNC   runs FUNC when the script exits, also on Ctrl-C and SIGTERM,
#                        with errors ignored; then says "NAME: failed (exit RC)" unless the
#                        script succeeded, and exits with the script's status.

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

fd_binary() {
  local repo=$1
  if [ -z "${FD:-}" ]; then
    echo "== building fd (release)"
    cargo build --release -q -p fd-cli --manifest-path "$repo/Cargo.toml"
    FD=$repo/target/release/fd
  fi
  [ -x "$FD" ] || { echo "$(basename "$0"): no fd binary at $FD (set FD=PATH)" >&2; exit 1; }
  fd_src=$(readlink -f "$FD")
  fd_rev=${FD_REV:-}
  if [ -z "$fd_rev" ]; then
    case $(basename "$fd_src") in
      fd-*) fd_rev=${fd_src##*/fd-} ;;
      *)
        fd_rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
        if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
          fd_rev+="+dirty"
        fi
        ;;
    esac
  fi
}

fd_private_copy() {
  mkdir -p "$1/bin"
  cp "$fd_src" "$1/bin/fd"
  FD=$1/bin/fd
}

unmount_under() {
  awk -v d="$1/" 'index($2 "/", d) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
}

cleanup_on_exit() {
  # NAME and FUNC are fixed now, when the trap is set.
  # shellcheck disable=SC2064
  trap "_run_cleanup '$1' '$2'" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

_run_cleanup() {
  # First, before any other command can change $?: the status the script is exiting with.
  local rc=$?
  set +e
  "$2"
  [ "$rc" -eq 0 ] || echo "$1: failed (exit $rc)" >&2
  exit "$rc"
}
