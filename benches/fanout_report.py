#!/usr/bin/env python3
"""Collects and reports the rows of benches/fanout.sh.

    fanout_report.py row RAW.jsonl ROW REP ROW_DIR NODES
        appends one JSON line for a finished row: per node the timer's JSON (out-I) and what
        fd said it fetched (err-I), and the relay's counters before and after the row
    fanout_report.py report RAW.jsonl OUT_BASE META_JSON
        writes OUT_BASE.md and OUT_BASE.json
"""

import json
import os
import re
import statistics
import sys

# The shared module is imported from the checkout: leave no compiled copy behind in it.
sys.dont_write_bytecode = True
from bench_common import write_report  # noqa: E402

UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
PULLED = re.compile(r"Pulled .* in [^:]+: ([\d.]+) (\w+) from registry, ([\d.]+) (\w+) from peers")
STREAMED = re.compile(r"Streamed \S+: ([\d.]+) (\w+) from peers")


def size(n, unit):
    return round(float(n) * UNITS[unit])


def node_record(row_dir, i):
    rec = {"node": f"N{i}"}
    out = os.path.join(row_dir, f"out-{i}")
    try:
        rec.update(json.loads(open(out).read()))
    except (OSError, ValueError):
        rec["failed"] = True
    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(row_dir, f"err-{i}"), errors="replace").read())
    except OSError:
        text = ""
    if m := PULLED.search(text):
        rec["fd_bytes_registry"] = size(m[1], m[2])
        rec["fd_bytes_peers"] = size(m[3], m[4])
    if m := STREAMED.search(text):
        rec["fd_bytes_peers"] = rec.get("fd_bytes_peers", 0) + size(m[1], m[2])
        rec["streamed"] = True
    return rec


def add_row(raw, row, rep, row_dir, nodes):
    before = json.load(open(os.path.join(row_dir, "relay-before.json")))
    after = json.load(open(os.path.join(row_dir, "relay-after.json")))
    gets = {}
    for line, n in after["requests"].items():
        d = n - before["requests"].get(line, 0)
        if d:
            gets[line] = d
    rec = {
        "row": row,
        "rep": int(rep),
        "nodes": [node_record(row_dir, i) for i in range(1, int(nodes) + 1)],
        "registry_bytes": after["down"] - before["down"],
        "registry_connections": after["connections"] - before["connections"],
        "blob_gets": sum(n for line, n in gets.items() if line.startswith("GET ") and "/blobs/" in line),
        "manifest_gets": sum(n for line, n in gets.items() if "/manifests/" in line),
        "requests": gets,
    }
    with open(raw, "a") as f:
        f.write(json.dumps(rec) + "\n")
    times = [f"{n['seconds']:.2f}" if "seconds" in n else "FAIL" for n in rec["nodes"]]
    print(f"   times {' '.join(times)} s; registry sent {rec['registry_bytes']:,} bytes "
          f"({rec['blob_gets']} blob GETs)")


def label(row):
    return {
        "fd-run": "fd run (stream from peer A)",
        "fd-pull": "fd pull (whole image, peer A first)",
        "podman": "podman pull && podman run",
    }.get(row, row)


def report(raw, out_base, meta):
    recs = [json.loads(line) for line in open(raw) if line.strip()]
    img = meta["image_compressed_bytes"]
    summary = []
    for row in meta["rows"]:
        rs = [r for r in recs if r["row"] == row]
        times = [n["seconds"] for r in rs for n in r["nodes"] if "seconds" in n]
        per_rep_max = [max(n["seconds"] for n in r["nodes"] if "seconds" in n)
                       for r in rs if any("seconds" in n for n in r["nodes"])]
        reg = [r["registry_bytes"] for r in rs]
        peers = [n["fd_bytes_peers"] for r in rs for n in r["nodes"] if "fd_bytes_peers" in n]
        summary.append({
            "row": row,
            "node_seconds": times,
            "median_s": statistics.median(times) if times else None,
            "max_s": max(times) if times else None,
            "median_of_rep_max_s": statistics.median(per_rep_max) if per_rep_max else None,
            "failed_nodes": sum(1 for r in rs for n in r["nodes"] if "seconds" not in n),
            "registry_bytes_per_rep": reg,
            "registry_bytes_median": statistics.median(reg) if reg else None,
            "registry_multiple_of_image": (statistics.median(reg) / img) if reg else None,
            "blob_gets_per_rep": [r["blob_gets"] for r in rs],
            "fd_bytes_from_peers_per_node_median": statistics.median(peers) if peers else None,
        })

    def f(x, nd=2):
        return "–" if x is None else f"{x:.{nd}f}"

    lines = [
        f"# Fan-out: 4 nodes start {meta['image']} at once, one peer holds it ({meta['profile']})",
        "",
        f"fd {meta['fd_rev']} (`{meta['fd_binary']}`), {meta['date']}; {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gib']} GiB, kernel {meta['machine']['kernel']}; {meta['versions']['podman']}, "
        f"{meta['versions']['runc']}. Load average at start / end: {meta['machine']['loadavg_start']} / "
        f"{meta['machine']['loadavg_end']} (other work shared the machine).",
        "",
        f"Registry, node A and N1..N4 each in a network namespace on one bridge, tbf {meta['tbf']['rate']} "
        f"(burst {meta['tbf']['burst']}) on both ends of every veth; the registry is reached through a "
        "byte-counting relay. Node A pulled the image beforehand and runs `fd serve`. "
        + ("The fd nodes find each other by mDNS too, so a node still fetching serves the others. "
           if meta.get("mdns") else "The fd nodes know only A (`--peer`, no mDNS). ")
        + "Each row: "
        "page cache dropped, every node's store empty, the four commands started together; the time "
        "per node is to the `fd-mark` line (fd run, podman) or to exit (fd pull). "
        f"{meta['reps']} repetition(s), rows shuffled within each. Image: "
        f"{img:,} bytes compressed (manifest + config + layers).",
        "",
        "| row | median s (all nodes) | max s | median of per-rep max s | registry bytes (median per row) | x image | blob GETs per row | fd bytes from peers per node (median) | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        peers = s["fd_bytes_from_peers_per_node_median"]
        reg = s["registry_bytes_median"]
        reg = "–" if reg is None else f"{reg:,.0f}"
        lines.append(
            f"| {label(s['row'])} | {f(s['median_s'])} | {f(s['max_s'])} | {f(s['median_of_rep_max_s'])} | "
            f"{reg} | "
            f"{f(s['registry_multiple_of_image'], 3)} | {', '.join(map(str, s['blob_gets_per_rep']))} | "
            f"{'–' if peers is None else f'{peers / (1 << 20):.2f} MiB'} | {s['failed_nodes']} |"
        )
    lines += ["", "Per node seconds (N1..N4), per repetition:", ""]
    for r in recs:
        t = ", ".join(f"{n['seconds']:.2f}" if "seconds" in n else "failed" for n in r["nodes"])
        lines.append(f"- {label(r['row'])}, rep {r['rep']}: {t}; registry sent {r['registry_bytes']:,} bytes")
    lines += [
        "",
        f"Node A's own pull beforehand made the registry send {meta['registry_bytes_for_node_a_pull']:,} bytes "
        f"({meta['registry_bytes_for_node_a_pull'] / img:.3f}x the image).",
        "",
    ]
    write_report(out_base, lines, {"meta": meta, "summary": summary, "rows": recs})


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "row":
        add_row(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
