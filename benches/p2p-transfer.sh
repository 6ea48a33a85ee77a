#!/usr/bin/env bash
# Moves one large layer between two fd nodes in network namespaces and compares it with the
# same bytes over plain HTTP.
#
#   node A (namespace h2-p2p-a-PID, 10.242.1.1) holds a single-layer image of SIZE MiB of
#   random data (benches/p2p_image.py, loaded with `fd load`) and runs `fd share`; it also
#   serves the very same layer blob with `python3 -m http.server` on its veth address.
#   node B (namespace h2-p2p-b-PID, 10.242.1.2), joined to A by one veth pair, runs
#     fd:   `fd pull --no-mdns --peer A REF` from an empty store in A's team. REF names a
#           registry on B's own 127.0.0.1:5000, where nothing listens, so the tag, manifest,
#           config and layer can only come from A.
#     http: `curl -o FILE http://A:8080/LAYER` into a file under the same work dir as B's
#           store (one file system).
#
# Usage:
#   bash benches/p2p-transfer.sh [--size MiB] [--reps N] [--rate "none 1gbit ..."] [--gzip]
#                                [--no-verify-bench] [--out NAME]
#
# --size: layer size in MiB (default 1024; e.g. 64 for a quick check).
# --reps: repetitions per tool and rate (default 3), shuffled within each rate; medians.
# --rate: tc tbf rate(s) on both ends of the veth; "none" (default) = the veth's own speed.
# --gzip: store the layer gzip-compressed (level 1) instead of as a plain tar.
# --no-verify-bench: skip the single-thread bao verification micro-benchmark (it builds a
#   tiny Rust program against chunker/ with cargo --offline into target/p2p-verify-bench).
# FD=PATH picks the fd binary (default: this checkout built in release mode); FD_REV=REV
# names its commit in the report (default: the checkout's commit, or REV of a binary named
# fd-REV).
#
# Before every repetition the page cache is dropped and B's store is emptied (and B joins the
# team again). For fd, the time is the whole `fd pull`; p2p_run.py also notes when the layer
# had fully landed in B's download file ("landed"), before fd chunks it into its two views.
# CPU times are getrusage of the pull (B) and /proc deltas of `fd share` / the HTTP server (A).
#
# Results: benches/results/p2p-transfer-DATE[-NAME].md and .json; the paths are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

size=1024
reps=3
rates=none
gzip=0
verify_bench=1
out_name=
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift ;;
    --reps) reps=$2; shift ;;
    --rate) rates=$2; shift ;;
    --gzip) gzip=1 ;;
    --no-verify-bench) verify_bench=0 ;;
    --out) out_name=$2; shift ;;
    -h | --help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "p2p-transfer: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ $size =~ ^[0-9]+$ && $size -gt 0 ]] || { echo "p2p-transfer: --size takes MiB > 0" >&2; exit 2; }
[[ $reps =~ ^[0-9]+$ && $reps -gt 0 ]] || { echo "p2p-transfer: --reps takes N > 0" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "p2p-transfer: needs root (namespaces, tc, drop_caches)" >&2; exit 1; }

fd_binary "$REPO"
HTTP_PY=/usr/bin/python3
[ -x "$HTTP_PY" ] || HTTP_PY=$(command -v python3)

started=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
work=$(mktemp -d /tmp/h2-p2p.XXXXXX)
ns_a=h2-p2p-a-$$
ns_b=h2-p2p-b-$$
share_pid='' http_pid=''
# Undo everything in reverse order; every step tolerates a half-done setup.
cleanup() {
  for p in "$share_pid" "$http_pid"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
  done
  unmount_under "$work"
  for ns in "$ns_a" "$ns_b"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$work"
}
cleanup_on_exit p2p-transfer cleanup

fd_private_copy "$work"
fd_sha=$(sha256sum "$FD" | cut -c1-16)
echo "== fd $fd_rev ($fd_src)"

# The bao check a receiving node runs per chunk, timed alone on one thread.
# It runs again after the transfers and the faster run of each figure is kept, because other
# work on the machine can slow either run.
verify_json=null verify_bin=''
if [ "$verify_bench" = 1 ]; then
  echo "== bao verification micro-benchmark (cargo --offline, target/p2p-verify-bench)"
  vb=$work/verify-bench
  mkdir -p "$vb/src"
  cp "$REPO/Cargo.lock" "$vb/"
  cat >"$vb/Cargo.toml" <<TOML
[package]
name = "p2p-verify-bench"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
fd-chunker = { path = "$REPO/chunker" }
blake3 = "1.8"

[workspace]
TOML
  cat >"$vb/src/main.rs" <<'RS'
// Times on one thread what a peer transfer costs per byte besides the network: the sender's
// outboard + range encoding of every chunk, the receiver's group-by-group bao check of the
// same streams (fed in 16 KiB pieces, as fd's p2p code feeds them), and plain BLAKE3 for scale.
use std::time::Instant;

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (mib, rounds) = (arg(1, 256), arg(2, 3));
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let spans = fd_chunker::chunk_slice(&data, &fd_chunker::ChunkerConfig::default());
    let group = fd_chunker::GROUP_SIZE as usize;
    let mut best = [f64::MAX; 3];
    for _ in 0..rounds {
        let t = Instant::now();
        let mut streams = Vec::with_capacity(spans.len());
        for s in &spans {
            let bytes = &data[s.offset as usize..s.end() as usize];
            let ob = fd_chunker::outboard(bytes);
            streams.push(fd_chunker::encode_range(bytes, &ob, 0..u64::from(s.len)));
        }
        best[0] = best[0].min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut verified = 0usize;
        for (s, enc) in spans.iter().zip(&streams) {
            let len = u64::from(s.len);
            let mut dec = fd_chunker::RangeDecoder::new(s.id, len, 0..len);
            for piece in enc.chunks(group) {
                for (_, b) in dec.push(piece).expect("a correct stream verifies") {
                    verified += b.len();
                }
            }
            dec.finish().expect("a complete stream finishes");
        }
        assert_eq!(verified, data.len());
        best[1] = best[1].min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        std::hint::black_box(blake3::hash(std::hint::black_box(&data)));
        best[2] = best[2].min(t.elapsed().as_secs_f64());
    }
    let rate = |s: f64| mib as f64 / s;
    println!(
        "{{\"mib\": {mib}, \"chunks\": {}, \"rounds\": {rounds}, \"encode_mib_s\": {:.1}, \
         \"verify_mib_s\": {:.1}, \"blake3_mib_s\": {:.1}}}",
        spans.len(),
        rate(best[0]),
        rate(best[1]),
        rate(best[2])
    );
}
RS
  if (cd "$vb" && CARGO_TARGET_DIR=$REPO/target/p2p-verify-bench nice -n 19 \
    cargo build --release --offline -q) >"$work/verify-build.log" 2>&1; then
    verify_json=$("$REPO/target/p2p-verify-bench/release/p2p-verify-bench" 256 3)
    echo "   $verify_json"
    verify_bin=$REPO/target/p2p-verify-bench/release/p2p-verify-bench
  else
    echo "p2p-transfer: the micro-benchmark did not build (see below); going on without it" >&2
    tail -n 5 "$work/verify-build.log" >&2
  fi
fi

# Two namespaces, one veth pair.
for ns in "$ns_a" "$ns_b"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n "$ns_a" link add eth0 type veth peer name eth0 netns "$ns_b"
ip -n "$ns_a" addr add 10.242.1.1/24 dev eth0
ip -n "$ns_b" addr add 10.242.1.2/24 dev eth0
ip -n "$ns_a" link set eth0 up
ip -n "$ns_b" link set eth0 up
in_b() { nsenter --net="/run/netns/$ns_b" "$@"; }

# The image, in A's store.
echo "== making a ${size} MiB layer of random data"
ref=127.0.0.1:5000/h2/blob:${size}m
img_args=("$work/image" "${size}m" "$size")
[ "$gzip" = 1 ] && img_args+=(--gzip)
img=$(python3 "$REPO/benches/p2p_image.py" "${img_args[@]}")
layer_digest=$(jq -r .layer_digest <<<"$img")
layer_hex=${layer_digest#sha256:}
layer_size=$(jq -r .layer_size <<<"$img")
media_type=$(jq -r .media_type <<<"$img")
manifest_digest=$(jq -r .manifest_digest <<<"$img")
FD_HOME=$work/nodeA "$FD" load -q --name "$ref" "$work/image"
token=$(FD_HOME=$work/nodeA "$FD" team init 2>/dev/null | tail -n 1)
[[ $token == fdteam* ]] || { echo "p2p-transfer: fd team init printed no token" >&2; exit 1; }
echo "   $ref: layer $layer_size bytes ($media_type)"

# A serves: fd share on QUIC, and the layer blob over plain HTTP, both on A's veth address.
# nsenter execs the command, so each PID below is the server itself.
FD_HOME=$work/nodeA NO_COLOR=1 nsenter --net="/run/netns/$ns_a" "$FD" share -q --no-mdns \
  --listen /ip4/10.242.1.1/udp/7700/quic-v1 >"$work/share.log" 2>&1 &
share_pid=$!
nsenter --net="/run/netns/$ns_a" "$HTTP_PY" -m http.server --bind 10.242.1.1 \
  --directory "$work/image/blobs/sha256" 8080 >"$work/http.log" 2>&1 &
http_pid=$!
url=http://10.242.1.1:8080/$layer_hex
for _ in $(seq 1 100); do
  in_b curl -fsS -o /dev/null -I "$url" 2>/dev/null && break
  sleep 0.1
done
in_b curl -fsS -o /dev/null -I "$url" || { echo "p2p-transfer: the HTTP server did not answer" >&2; exit 1; }
kill -0 "$share_pid" 2>/dev/null || { echo "p2p-transfer: fd share died: $(cat "$work/share.log")" >&2; exit 1; }

set_rate() { # none | tbf rate, on both ends of the veth
  local ns
  for ns in "$ns_a" "$ns_b"; do
    tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
    if [ "$1" != none ]; then
      tc -n "$ns" qdisc add dev eth0 root tbf rate "$1" burst 1mb latency 50ms
    fi
  done
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# utime + stime of a process in clock ticks.
ticks_of() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

raw=$work/raw.jsonl
: >"$raw"
failures=0
record() { # rate tool rep json_from_p2p_run extra_json
  jq -c --arg rate "$1" --arg tool "$2" --argjson rep "$3" --argjson extra "$5" \
    '. + {rate: $rate, tool: $tool, rep: $rep} + $extra' <<<"$4" >>"$raw"
}
fail() { # rate tool rep why
  failures=$((failures + 1))
  echo "  FAILED: $2 rep $3 at rate $1: $4" >&2
  jq -nc --arg rate "$1" --arg tool "$2" --argjson rep "$3" --arg why "$4" \
    '{rate: $rate, tool: $tool, rep: $rep, failed: true, why: $why}' >>"$raw"
}

run_fd() { # rate rep
  local home=$work/nodeB err=$work/fd-err.txt out a0 a1 pulled listed
  rm -rf "$home"
  FD_HOME=$home "$FD" team join "$token" >/dev/null 2>&1
  drop_caches
  a0=$(ticks_of "$share_pid")
  if ! out=$(python3 "$REPO/benches/p2p_run.py" --watch "$home/downloads/sha256-$layer_hex" \
    --size "$layer_size" --stderr "$err" -- \
    nsenter --net="/run/netns/$ns_b" env FD_HOME="$home" NO_COLOR=1 "$FD" pull --no-mdns \
    --peer /ip4/10.242.1.1/udp/7700/quic-v1 "$ref"); then
    fail "$1" fd "$2" "fd pull failed: $(tail -n 3 "$err" | tr '\n' ' ')"
    return
  fi
  a1=$(ticks_of "$share_pid")
  pulled=$(grep -a 'Pulled' "$err" | tail -n 1 | sed 's/\x1b\[[0-9;]*m//g; s/^ *//')
  listed=$(FD_HOME=$home "$FD" images --json |
    jq -r --arg r "$ref" --arg m "$manifest_digest" \
      '[.[] | select(.reference == $r and .manifest_digest == $m and (.lazy | not))] | length')
  if [ "$listed" != 1 ]; then
    fail "$1" fd "$2" "fd images on B does not list $ref as complete"
    return
  fi
  record "$1" fd "$2" "$out" "$(jq -nc --arg p "$pulled" --argjson t "$tck" --argjson a "$((a1 - a0))" \
    '{pulled_line: $p, server_cpu: ($a / $t)}')"
  echo "  rate $1 rep $2 fd:   $(jq -r '"\(.seconds) s (landed \(.landed) s), B cpu \(.cpu_user + .cpu_sys | . * 100 | round / 100) s"' <<<"$out"); $pulled"
  rm -rf "$home"
}

run_http() { # rate rep
  local file=$work/curl/layer err=$work/curl-err.txt out a0 a1 got
  rm -rf "$work/curl"
  mkdir -p "$work/curl"
  drop_caches
  a0=$(ticks_of "$http_pid")
  if ! out=$(python3 "$REPO/benches/p2p_run.py" --stderr "$err" -- \
    nsenter --net="/run/netns/$ns_b" curl -sS --fail -o "$file" "$url"); then
    fail "$1" http "$2" "curl failed: $(tail -n 3 "$err" | tr '\n' ' ')"
    return
  fi
  a1=$(ticks_of "$http_pid")
  # Checked after the clock stopped: the same bytes as the layer fd moved.
  got=$(sha256sum "$file" | cut -d' ' -f1)
  if [ "$got" != "$layer_hex" ]; then
    fail "$1" http "$2" "curl's file has sha256 $got, not $layer_hex"
    return
  fi
  record "$1" http "$2" "$out" "$(jq -nc --argjson t "$tck" --argjson a "$((a1 - a0))" '{server_cpu: ($a / $t)}')"
  echo "  rate $1 rep $2 http: $(jq -r '"\(.seconds) s, curl cpu \(.cpu_user + .cpu_sys | . * 100 | round / 100) s"' <<<"$out")"
  rm -rf "$work/curl"
}

for rate in $rates; do
  echo "== rate $rate"
  set_rate "$rate"
  while read -r tool rep; do
    "run_$tool" "$rate" "$rep"
  done < <(for ((r = 1; r <= reps; r++)); do printf 'fd %s\nhttp %s\n' "$r" "$r"; done | shuf)
done

if [ -n "$verify_bin" ]; then
  again=$("$verify_bin" 256 3)
  echo "== bao verification micro-benchmark again: $again"
  verify_json=$(jq -c --argjson b "$again" \
    'with_entries(if (.key | endswith("_mib_s")) then .value = ([.value, $b[.key]] | max) else . end)
     | .runs = 2' <<<"$verify_json")
fi

date_tag=$(date -u +%Y-%m-%d)
mkdir -p "$REPO/benches/results"
out_base=$REPO/benches/results/p2p-transfer-$date_tag${out_name:+-$out_name}
meta=$(jq -n \
  --arg fd_rev "$fd_rev" --arg fd_binary "$fd_src" --arg fd_sha "$fd_sha" \
  --arg date "$date_tag" --arg kernel "$(uname -r)" --argjson cores "$(nproc)" \
  --arg cpu "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
  --argjson mem "$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)" \
  --arg curl "$(curl --version | head -n 1)" --arg python "$("$HTTP_PY" --version 2>&1)" \
  --arg http_server "$HTTP_PY -m http.server" --argjson size_mib "$size" \
  --argjson layer_size "$layer_size" --arg media_type "$media_type" --arg ref "$ref" \
  --argjson reps "$reps" --arg rates "$rates" --argjson verify "$verify_json" \
  --arg fs "$(df --output=source,fstype "$work" | tail -n 1 | tr -s ' ')" \
  --argjson seconds "$(($(date +%s) - started))" \
  --arg load_start "$load_start" --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
  '{fd_rev: $fd_rev, fd_binary: $fd_binary, fd_sha256_prefix: $fd_sha, date: $date,
    machine: {kernel: $kernel, cores: $cores, cpu: $cpu, memory_gib: $mem,
              loadavg_start: $load_start, loadavg_end: $load_end},
    versions: {curl: $curl, python: $python}, http_server: $http_server,
    size_mib: $size_mib, layer_size: $layer_size, media_type: $media_type, ref: $ref,
    reps: $reps, rates: ($rates | split(" ")), verify_bench: $verify,
    store_and_curl_filesystem: $fs, seconds: $seconds}')
python3 "$REPO/benches/p2p_report.py" "$raw" "$out_base" "$meta"
echo "p2p-transfer: results in $out_base.md and $out_base.json"
[ "$failures" -eq 0 ] || { echo "p2p-transfer: $failures measurement(s) failed" >&2; exit 1; }
