#!/usr/bin/env python3
"""Turns the raw measurements of benches/compare.sh into a markdown table, a JSON file and an
SVG bar chart of the start times.

    compare_report.py RAW.jsonl OUT_BASE [--meta K=V ...] [--sizes "IMAGE CSIZE USIZE\\n..."]

Writes OUT_BASE.md, OUT_BASE.json and OUT_BASE.svg and prints the markdown.
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
COLORS = {"fd": "#1f77b4", "podman": "#d62728", "runc": "#7f7f7f", "skopeo": "#2ca02c"}


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def mib(n):
    return f"{n / (1 << 20):.1f}"


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

    # Group by (row, image, workload, profile) keeping first-seen order, then by tool.
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
            br = [x["bytes_registry"] + x["bytes_peers"] for x in rs if "bytes_registry" in x]
            if br:
                ent["bytes_fetched"] = statistics.median(br)
                ent["bytes_from_peers"] = statistics.median([x["bytes_peers"] for x in rs if "bytes_peers" in x])
            summary.append(ent)

    md = []
    md.append(f"# fd side-by-side comparison ({meta.get('date', '')})".replace(" ()", ""))
    md.append("")
    md.append(
        f"Machine: {meta.get('cores')} cores, {meta.get('memory_gib')} GiB, kernel {meta.get('kernel')}. "
        f"fd {meta.get('fd_rev')} ({meta.get('fd_binary')}); {meta.get('podman')}; {meta.get('runc')}; "
        f"{meta.get('skopeo')}; umoci {meta.get('umoci')}."
    )
    md.append(
        f"Repetitions: {meta.get('reps')} per profile, shuffled (warm: 3x that, first profile only). "
        "Profiles: tbf rate on the veths; the registry's answers held by a userspace relay for the "
        "profile's delay (1gbit: 0.2 ms, 100mbit: 5 ms, 20mbit: 40 ms); peer traffic (QUIC) is rate "
        "limited but gets no added delay. Page cache dropped and stores emptied before every cold "
        "row and pull."
    )
    md.append("")
    for row, title in ROW_TITLES.items():
        ents = [e for e in summary if e["row"] == row]
        if not ents:
            continue
        md.append(f"## {title}")
        md.append("")
        md.append("| image | workload | profile | tool | median s | p90 s | n | time vs fd |")
        md.append("|---|---|---|---|---|---|---|---|")
        for e in ents:
            label = TOOL_LABELS.get((row, e["tool"]), e["tool"])
            if "median" in e:
                vs = f"{e['vs_fd']:.2f}x" if "vs_fd" in e else "-"
                md.append(f"| {e['image']} | {e['workload']} | {e['profile']} | {label} | "
                          f"{e['median']:.3f} | {e['p90']:.3f} | {e['n']} | {vs} |")
            else:
                md.append(f"| {e['image']} | {e['workload']} | {e['profile']} | {label} | failed | | 0 | |")
        md.append("")
    fetched = [e for e in summary if e["tool"] == "fd" and "bytes_fetched" in e and e["row"] != "pull"]
    if fetched:
        md.append("## Bytes fd fetched before the first output (its own \"Pulled\" line) vs image size")
        md.append("")
        md.append("| row | image | workload | profile | fetched MiB | of which from peers MiB | "
                  "image compressed MiB | image unpacked MiB | fetched / compressed |")
        md.append("|---|---|---|---|---|---|---|---|---|")
        for e in fetched:
            s = sizes.get(e["image"], {})
            c, u = s.get("compressed_bytes"), s.get("unpacked_bytes")
            ratio = f"{e['bytes_fetched'] / c:.2f}" if c else "-"
            md.append(f"| {e['row']} | {e['image']} | {e['workload']} | {e['profile']} | "
                      f"{mib(e['bytes_fetched'])} | {mib(e['bytes_from_peers'])} | "
                      f"{mib(c) if c else '-'} | {mib(u) if u else '-'} | {ratio} |")
        md.append("")
    text = "\n".join(md)

    with open(a.out + ".md", "w") as f:
        f.write(text)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "image_sizes": sizes, "summary": summary, "raw": recs}, f, indent=1)
    write_svg(a.out + ".svg", summary, meta)
    print(text)


def write_svg(path, summary, meta):
    """Horizontal bars, one section per kind of start (each with its own scale, since warm
    starts take milliseconds and cold ones seconds), one group per image, workload and
    profile, one bar per tool: length = median, thin whisker to the p90."""
    ents = [e for e in summary if e["row"] in ("cold-registry", "cold-peer", "warm", "tar") and "median" in e]
    bar_h, gap, left, width = 14, 8, 330, 520
    sections = OrderedDict((r, OrderedDict()) for r in ROW_TITLES if any(e["row"] == r for e in ents))
    for e in ents:
        sections.setdefault(e["row"], OrderedDict()).setdefault(
            (e["image"], e["workload"], e["profile"]), []).append(e)
    height = 50 + sum(40 + sum(len(v) * bar_h + gap for v in g.values()) for g in sections.values())
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">Start times: median (bar) and p90 '
           f'(whisker); fd {esc(meta.get("fd_rev", ""))}</text>']
    y = 40
    for row, groups in sections.items():
        vmax = max(e["p90"] for es in groups.values() for e in es) or 0.001
        scale = width / vmax
        out.append(f'<text x="10" y="{y + 12}" font-size="12" font-weight="bold">{esc(row)} '
                   f'(scale 0 to {fmt(vmax)})</text>')
        y += 20
        top = y
        for (image, wl, prof), es in groups.items():
            out.append(f'<text x="10" y="{y + 11}">{esc(image)} {esc(wl)} @ {esc(prof)}</text>')
            for e in es:
                w = max(1.0, e["median"] * scale)
                color = COLORS.get(e["tool"], "#9467bd")
                out.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{esc(e["tool"])}</text>')
                out.append(f'<rect x="{left}" y="{y + 1}" width="{w:.1f}" height="{bar_h - 3}" fill="{color}"/>')
                px = left + e["p90"] * scale
                out.append(f'<line x1="{left + w:.1f}" x2="{px:.1f}" y1="{y + bar_h / 2}" '
                           f'y2="{y + bar_h / 2}" stroke="black"/>')
                out.append(f'<text x="{max(left + w, px) + 4:.1f}" y="{y + 11}">{fmt(e["median"])}</text>')
                y += bar_h
            y += gap
        out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{y}" stroke="#444"/>')
        y += 20
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def fmt(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    main()
