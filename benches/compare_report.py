#!/usr/bin/env python3
"""Turns the raw measurements of benches/compare.sh into one markdown report, a JSON file and
an SVG chart of the cold-start times.

    compare_report.py RAW.jsonl OUT_BASE [--meta K=V ...] [--sizes "IMAGE CSIZE USIZE\\n..."]

Writes OUT_BASE.md (one table per kind of row, covering every image and profile measured, each
followed by a line naming where fd was slower), OUT_BASE.json (meta, image sizes, summary and
raw measurements) and OUT_BASE.svg (cold-start medians of fd and podman, every image x
profile in one figure), and prints the markdown.
"""

import argparse
import json
import statistics
from collections import OrderedDict

ROW_TITLES = OrderedDict(
    [
        ("cold-registry", "Cold start, image only in the registry (time to the workload's first line)"),
        ("cold-peer", "Cold start, image on a team peer, never on this node"),
        ("warm", "Warm start of `true` (time to exit)"),
        ("pull", "Pull into an empty store"),
        ("tar", "`tar cf /dev/null /usr` in a cold start (pull + run)"),
    ]
)
TOOL_LABELS = {
    ("cold-registry", "fd"): "fd run",
    ("cold-registry", "podman"): "podman pull && podman run",
    ("cold-peer", "fd"): "fd run (chunks from peer A)",
    ("cold-peer", "podman"): "podman pull && podman run (registry)",
    ("warm", "fd"): "fd run",
    ("warm", "runc"): "runc run (umoci bundle)",
    ("warm", "podman"): "podman run --rm",
    ("pull", "fd"): "fd pull",
    ("pull", "podman"): "podman pull",
    ("pull", "skopeo"): "skopeo copy docker:// oci:",
    ("tar", "fd"): "fd run",
    ("tar", "podman"): "podman pull && podman run",
}
COLD_ROWS = ("cold-registry", "cold-peer", "tar")
COLORS = {"fd": "#1f77b4", "podman": "#d62728", "runc": "#7f7f7f", "skopeo": "#2ca02c"}
# Lighter shades for the cold-peer bars of the chart, so the two kinds of cold start can be
# told apart while each tool keeps its hue.
PEER_COLORS = {"fd": "#9ecae1", "podman": "#f4a3a3"}


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def mib(n):
    return f"{n / (1 << 20):.1f}"


def label(row, tool):
    return TOOL_LABELS.get((row, tool), tool)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("out")
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--sizes", default="")
    a = ap.parse_args()
    meta = dict(m.split("=", 1) for m in a.meta)
    sizes = {}
    for line in a.sizes.splitlines():
        if line.strip():
            img, c, u = line.split()
            sizes[img] = {"compressed_bytes": int(c), "unpacked_bytes": int(u)}
    recs = [json.loads(line) for line in open(a.raw) if line.strip()]

    # Group by (row, image, workload, profile), then by tool.
    groups = OrderedDict()
    for r in recs:
        key = (r["row"], r["image"], r["workload"], r["profile"])
        groups.setdefault(key, OrderedDict()).setdefault(r["tool"], []).append(r)
    # Tables in a fixed order: images and profiles as asked, tools fd first.
    img_order = meta.get("images", "").split()
    prof_order = meta.get("profiles", "").split()
    tool_order = ["fd", "runc", "podman", "skopeo"]

    def pos(xs, x):
        return xs.index(x) if x in xs else len(xs)

    groups = OrderedDict(sorted(groups.items(), key=lambda kv: (
        pos(img_order, kv[0][1]), kv[0][2], pos(prof_order, kv[0][3]))))
    for k in groups:
        groups[k] = OrderedDict(sorted(groups[k].items(), key=lambda kv: pos(tool_order, kv[0])))
    summary = []
    for (row, image, wl, prof), tools in groups.items():
        ok = {t: [x["seconds"] for x in rs if not x.get("failed")] for t, rs in tools.items()}
        base = statistics.median(ok["fd"]) if ok.get("fd") else None
        for tool, rs in tools.items():
            xs = ok[tool]
            ent = {"row": row, "image": image, "workload": wl, "profile": prof, "tool": tool,
                   "n": len(xs), "failed": sum(1 for x in rs if x.get("failed")), "seconds": xs}
            if xs:
                ent["median"] = statistics.median(xs)
                ent["p90"] = p90(xs)
                if base:
                    ent["vs_fd"] = ent["median"] / base
            good = [x for x in rs if not x.get("failed")]
            br = [x["bytes_registry"] + x["bytes_peers"] for x in good if "bytes_registry" in x]
            if br:
                ent["bytes_fetched"] = statistics.median(br)
                ent["bytes_from_peers"] = statistics.median([x["bytes_peers"] for x in good if "bytes_peers" in x])
            streamed = [x["streamed"] for x in good if "streamed" in x]
            if streamed:
                ent["streamed_chunks"] = statistics.median([s["chunks"] for s in streamed])
                ent["streamed_metadata_bytes"] = statistics.median([s["metadata_bytes"] for s in streamed])
                ent["streamed_runs"] = len(streamed)
            if tool == "podman" and row in COLD_ROWS and image in sizes and xs:
                # podman pulls every layer before it starts anything.
                ent["bytes_fetched"] = sizes[image]["compressed_bytes"]
                ent["bytes_from_peers"] = 0
            unparsed = [u for x in good for u in x.get("streamed_unparsed", [])]
            if unparsed:
                ent["streamed_unparsed"] = unparsed
            summary.append(ent)
    slower = slower_cases(summary)

    md = header(meta, sizes)
    for row, title in ROW_TITLES.items():
        ents = [e for e in summary if e["row"] == row]
        if not ents:
            continue
        md.append(f"## {title}")
        md.append("")
        md.append("| image | workload | profile | tool | median s | p90 s | n | time vs fd |")
        md.append("|---|---|---|---|---|---|---|---|")
        for e in ents:
            n = f"{e['n']}" + (f" ({e['failed']} failed)" if e["failed"] else "")
            if "median" in e:
                vs = f"{e['vs_fd']:.2f}x" if "vs_fd" in e else "-"
                md.append(f"| {e['image']} | {e['workload']} | {e['profile']} | {label(row, e['tool'])} | "
                          f"{e['median']:.3f} | {e['p90']:.3f} | {n} | {vs} |")
            else:
                md.append(f"| {e['image']} | {e['workload']} | {e['profile']} | {label(row, e['tool'])} | "
                          f"failed | | {n} | |")
        md.append("")
        md.append(slower_line(row, [c for c in slower if c["row"] == row], ents))
        md.append("")
    md += bytes_section(summary, sizes)
    text = "\n".join(md) + "\n"

    with open(a.out + ".md", "w") as f:
        f.write(text)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "image_sizes": sizes, "summary": summary, "fd_slower": slower,
                   "raw": recs}, f, indent=1)
    write_svg(a.out + ".svg", summary, meta)
    print(text, end="")


def header(meta, sizes):
    md = [f"# fd side-by-side comparison ({meta.get('date', '')})".replace(" ()", ""), ""]
    md.append(
        f"Machine: {meta.get('cores')} cores, {meta.get('memory_gib')} GiB, kernel {meta.get('kernel')}. "
        f"fd {meta.get('fd_rev')} ({meta.get('fd_binary')}); {meta.get('podman')}; {meta.get('runc')}; "
        f"{meta.get('skopeo')}; umoci {meta.get('umoci')}."
    )
    md.append("")
    if meta.get("plan_detail"):
        md.append(f"Plan ({meta.get('plan', 'cross')}): {meta['plan_detail']}.")
    reps = meta.get("reps_per_image", "")
    if reps and len(set(r.split("=")[1] for r in reps.split())) > 1:
        md.append(f"Repetitions differ per image ({reps}) to keep the whole run near 40 minutes; "
                  "they are shuffled together within each profile. Warm starts: 3x the repetitions, "
                  "in one profile only.")
    else:
        md.append(f"Repetitions: {meta.get('reps')} per profile, shuffled (warm: 3x that, in one "
                  "profile only).")
    if meta.get("tools", "all") != "all":
        md.append(f"Only these tools were measured: {meta['tools']}.")
    if "cold-peer" not in meta.get("rows", "cold-peer").split():
        peer = "no row used a peer"
    elif meta.get("peer_delay", "1") == "1":
        peer = "node A's QUIC datagrams are held for the same delay by the same relay in UDP mode"
    else:
        peer = "peer traffic (QUIC) is rate limited but gets no added delay"
    md.append(
        "Profiles: tbf rate on the veths; the registry's answers held by a userspace relay for the "
        f"profile's delay (1gbit: 0.2 ms, 100mbit: 5 ms, 20mbit: 40 ms); {peer}. The relays are "
        "Python processes on the same 2 cores as the tools. Page cache dropped and stores emptied "
        "before every cold row and pull."
    )
    if meta.get("seconds"):
        load = ""
        if meta.get("load_start"):
            load = (f" Load average (1, 5, 15 min) at the start: {meta['load_start']}; at the end: "
                    f"{meta.get('load_end')} (other work shared the machine's cores).")
        md.append(f"The whole run took {int(meta['seconds']) / 60:.1f} minutes.{load}")
    md.append("")
    if sizes:
        md.append("| image | compressed layers MiB | unpacked MiB |")
        md.append("|---|---|---|")
        for img, s in sizes.items():
            md.append(f"| {img} | {mib(s['compressed_bytes'])} | {mib(s['unpacked_bytes'])} |")
        md.append("")
    return md


def slower_cases(summary):
    """Every (row, image, workload, profile) where another tool's median beats fd's."""
    out = []
    by_key = OrderedDict()
    for e in summary:
        by_key.setdefault((e["row"], e["image"], e["workload"], e["profile"]), []).append(e)
    for (row, image, wl, prof), es in by_key.items():
        fd = next((e for e in es if e["tool"] == "fd" and "median" in e), None)
        if not fd:
            continue
        for e in es:
            if e["tool"] != "fd" and "median" in e and e["median"] < fd["median"]:
                out.append({"row": row, "image": image, "workload": wl, "profile": prof,
                            "tool": e["tool"], "fd_median": fd["median"], "other_median": e["median"],
                            "fd_vs_other": fd["median"] / e["median"]})
    return out


def slower_line(row, cases, ents):
    if not cases:
        if any(e["tool"] == "fd" and "median" in e for e in ents):
            return "fd is not slower than any other tool in this table."
        return "fd has no successful measurement in this table."
    parts = []
    for c in cases:
        wl = "" if c["workload"] in ("-", "true", "tar") else f" {c['workload']}"
        near = ", within 5%" if c["fd_vs_other"] < 1.05 else ""
        parts.append(f"{c['image']}{wl} @ {c['profile']} than {label(row, c['tool'])} "
                     f"({c['fd_median']:.3f} s vs {c['other_median']:.3f} s, fd takes "
                     f"{c['fd_vs_other']:.2f}x{near})")
    return f"**fd is slower** in {len(cases)} case{'s' if len(cases) > 1 else ''} here: " + "; ".join(parts) + "."


def bytes_section(summary, sizes):
    ents = [e for e in summary if e["row"] in COLD_ROWS and e["tool"] == "fd" and "bytes_fetched" in e]
    if not ents:
        return []
    ents.sort(key=lambda e: COLD_ROWS.index(e["row"]))  # stable: keeps image/profile order
    podman = {(e["row"], e["image"], e["workload"], e["profile"]): e for e in summary
              if e["tool"] == "podman" and "bytes_fetched" in e}
    md = ["## Bytes fetched before the first output, against the image's size", ""]
    md.append("fd: its own summary lines (\"Pulled ...: X from registry, Y from peers\", and "
              "\"Streamed ...: N from peers (...)\" when `fd run` streamed from a peer, which "
              "counts file contents as stored, not compressed, plus metadata). podman: the "
              "compressed layers, all fetched before it starts. Medians over the repetitions.")
    md.append("")
    md.append("| row | image | workload | profile | fd fetched MiB | from peers MiB | "
              "% of compressed | % of unpacked | how | podman fetched MiB |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for e in ents:
        s = sizes.get(e["image"], {})
        c, u = s.get("compressed_bytes"), s.get("unpacked_bytes")
        pc = f"{100 * e['bytes_fetched'] / c:.1f}" if c else "-"
        pu = f"{100 * e['bytes_fetched'] / u:.1f}" if u else "-"
        if e.get("streamed_runs"):
            how = (f"streamed ({e['streamed_chunks']:.0f} chunks, "
                   f"{e['streamed_metadata_bytes'] / 1024:.0f} KiB metadata)")
        elif e["bytes_from_peers"] > 0:
            how = "pulled, from peers"
        else:
            how = "pulled"
        if e.get("streamed_runs") and e["streamed_runs"] < e["n"]:
            how += f" in {e['streamed_runs']} of {e['n']} runs"
        pm = podman.get((e["row"], e["image"], e["workload"], e["profile"]))
        pm = mib(pm["bytes_fetched"]) if pm else "-"
        md.append(f"| {e['row']} | {e['image']} | {e['workload']} | {e['profile']} | "
                  f"{mib(e['bytes_fetched'])} | {mib(e['bytes_from_peers'])} | {pc} | {pu} | {how} | {pm} |")
    md.append("")
    missing = [e for e in summary if e["row"] in COLD_ROWS and e["tool"] == "fd" and e.get("n")
               and "bytes_fetched" not in e]
    for e in missing:
        md.append(f"No byte count for fd in {e['row']} {e['image']} {e['workload']} @ {e['profile']}: "
                  "no summary line was found on its stderr.")
    for e in summary:
        for u in e.get("streamed_unparsed", [])[:1]:
            md.append(f"Unparsed summary line in {e['row']} {e['image']} @ {e['profile']}: `{u}`")
    if missing or any(e.get("streamed_unparsed") for e in summary):
        md.append("")
    return md


def write_svg(path, summary, meta):
    """One figure of cold starts: a section per image (each with its own linear scale, since
    busybox starts in a fraction of a second and the big image in tens of seconds), a group per
    workload and profile, and up to four bars per group: fd and podman in the cold-registry
    row, then in the cold-peer row. Bar length = median, thin whisker to the p90."""
    series = [("cold-registry", "fd", "fd run, image in registry"),
              ("cold-registry", "podman", "podman pull+run, registry"),
              ("cold-peer", "fd", "fd run, image on peer A"),
              ("cold-peer", "podman", "podman pull+run (cold-peer row)")]
    ents = {(e["row"], e["image"], e["workload"], e["profile"], e["tool"]): e
            for e in summary if e["row"] in ("cold-registry", "cold-peer") and "median" in e}
    sections = OrderedDict()
    for (row, image, wl, prof, tool) in ents:
        sections.setdefault(image, OrderedDict()).setdefault((wl, prof), None)
    bar_h, gap, left, width = 13, 10, 300, 520
    n_bars = sum(len([s for s in series if (s[0], img, wl, prof, s[1]) in ents])
                 for img, g in sections.items() for (wl, prof) in g)
    n_groups = sum(len(g) for g in sections.values())
    height = 80 + len(sections) * 40 + n_bars * bar_h + n_groups * gap
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 100}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">Cold starts: median (bar) and p90 '
           f'(whisker), seconds to the first output; fd {esc(meta.get("fd_rev", ""))}</text>']
    # Legend.
    lx = 10
    for row, tool, text in series:
        color = (PEER_COLORS if row == "cold-peer" else COLORS).get(tool, "#9467bd")
        out.append(f'<rect x="{lx}" y="32" width="12" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="41">{esc(text)}</text>')
        lx += 28 + 6 * len(text)
    y = 60
    for image, groups in sections.items():
        vals = [ents[k]["p90"] for k in ents if k[1] == image]
        vmax = max(vals) or 0.001
        scale = width / vmax
        out.append(f'<text x="10" y="{y + 12}" font-size="12" font-weight="bold">{esc(image)} '
                   f'(scale 0 to {fmt(vmax)})</text>')
        y += 22
        top = y
        for (wl, prof) in groups:
            out.append(f'<text x="10" y="{y + 10}">{esc(wl)} @ {esc(prof)}</text>')
            for row, tool, text in series:
                e = ents.get((row, image, wl, prof, tool))
                if not e:
                    continue
                w = max(1.0, e["median"] * scale)
                color = (PEER_COLORS if row == "cold-peer" else COLORS).get(tool, "#9467bd")
                out.append(f'<text x="{left - 6}" y="{y + 10}" text-anchor="end">{esc(text)}</text>')
                out.append(f'<rect x="{left}" y="{y + 1}" width="{w:.1f}" height="{bar_h - 3}" fill="{color}"/>')
                px = left + e["p90"] * scale
                out.append(f'<line x1="{left + w:.1f}" x2="{px:.1f}" y1="{y + bar_h / 2}" '
                           f'y2="{y + bar_h / 2}" stroke="black"/>')
                out.append(f'<text x="{max(left + w, px) + 4:.1f}" y="{y + 10}">{fmt(e["median"])}</text>')
                y += bar_h
            y += gap
        out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{y}" stroke="#444"/>')
        y += 18
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def fmt(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    main()
