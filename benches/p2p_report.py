#!/usr/bin/env python3
"""Turns the raw lines of benches/p2p-transfer.sh into a markdown table and a JSON file.

    p2p_report.py RAW.jsonl OUT_BASE META_JSON

Writes OUT_BASE.md and OUT_BASE.json.
"""

import json
import statistics
import sys

# The shared module is imported from the checkout: leave no compiled copy behind in it.
sys.dont_write_bytecode = True
from bench_common import write_report  # noqa: E402


def med(xs):
    return statistics.median(xs) if xs else None


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def main():
    raw, out_base, meta = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rows = [json.loads(line) for line in open(raw) if line.strip()]
    mib = meta["layer_size"] / (1 << 20)
    vb = meta.get("verify_bench") or {}
    summary = []
    for rate in meta["rates"]:
        ok = {t: [r for r in rows if r["rate"] == rate and r["tool"] == t and not r.get("failed")]
              for t in ("fd", "http")}
        failed = {t: sum(1 for r in rows if r["rate"] == rate and r["tool"] == t and r.get("failed"))
                  for t in ("fd", "http")}
        s = {"rate": rate}
        for t in ("fd", "http"):
            secs = [r["seconds"] for r in ok[t]]
            cpu = [r["cpu_user"] + r["cpu_sys"] for r in ok[t]]
            s[t] = {
                "seconds": secs,
                "median_s": med(secs),
                "mib_s": mib / med(secs) if secs else None,
                "client_cpu_s": med(cpu),
                "server_cpu_s": med([r["server_cpu"] for r in ok[t]]),
                "failed": failed[t],
            }
        landed = [r["landed"] for r in ok["fd"] if r.get("landed") is not None]
        s["fd"]["landed_s"] = landed
        s["fd"]["landed_median_s"] = med(landed)
        s["fd"]["landed_mib_s"] = mib / med(landed) if landed else None
        xfer = [r["landed"] - r["appeared"] for r in ok["fd"]
                if r.get("landed") is not None and r.get("appeared") is not None]
        s["fd"]["transfer_s"] = xfer
        s["fd"]["transfer_median_s"] = med(xfer)
        s["fd"]["transfer_mib_s"] = mib / med(xfer) if xfer else None
        appeared = [r["appeared"] for r in ok["fd"] if r.get("appeared") is not None]
        s["fd"]["before_transfer_median_s"] = med(appeared)
        s["fd"]["pulled_lines"] = [r.get("pulled_line", "") for r in ok["fd"]]
        h = s["http"]["median_s"]
        for t in ("fd", "http"):
            m = s[t]["median_s"]
            s[t]["ratio_vs_http"] = m / h if (m and h) else None
        if s["fd"]["landed_median_s"] and h:
            s["fd"]["landed_ratio_vs_http"] = s["fd"]["landed_median_s"] / h
        if s["fd"]["transfer_median_s"] and h:
            s["fd"]["transfer_ratio_vs_http"] = s["fd"]["transfer_median_s"] / h
        # Verification cost: the layer's bytes at the single-thread speed of the bao check,
        # against the time the bytes took to arrive and against the whole pull.
        if vb.get("verify_mib_s") and s["fd"]["median_s"]:
            v = mib / vb["verify_mib_s"]
            s["verify"] = {
                "verify_cpu_s": v,
                "share_of_landed": v / s["fd"]["landed_median_s"] if s["fd"]["landed_median_s"] else None,
                "share_of_transfer": v / s["fd"]["transfer_median_s"] if s["fd"]["transfer_median_s"] else None,
                "share_of_pull": v / s["fd"]["median_s"],
                "share_of_b_cpu": v / s["fd"]["client_cpu_s"] if s["fd"]["client_cpu_s"] else None,
            }
            if vb.get("encode_mib_s"):
                s["verify"]["encode_cpu_s_on_a"] = mib / vb["encode_mib_s"]
        summary.append(s)

    lines = [
        f"# Peer transfer: {meta['size_mib']} MiB layer, fd pull from a peer vs plain HTTP",
        "",
        f"fd {meta['fd_rev']} (`{meta['fd_binary']}`), {meta['date']}; {meta['machine']['cores']} cores "
        f"({meta['machine']['cpu']}), {meta['machine']['memory_gib']} GiB, kernel {meta['machine']['kernel']}; "
        f"{meta['versions']['curl'].split(' (')[0]}, HTTP server `{meta['http_server']}` "
        f"({meta['versions']['python']}). Load average at start / end: "
        f"{meta['machine']['loadavg_start']} / {meta['machine']['loadavg_end']} (other work shared the machine).",
        "",
        f"One layer of {meta['layer_size']:,} bytes of random data ({meta['media_type']}), "
        f"two network namespaces joined by one veth pair. {meta['reps']} repetition(s) per row, "
        "shuffled within each rate, page cache dropped and B's store emptied before each; "
        "medians. fd: the whole `fd pull` on B from node A's `fd share` (tag, manifest, config "
        "and layer all from A; B's registry address has nothing listening). \"landed\": when the "
        "whole layer was in B's download file, before fd chunks it into its two views; \"transfer "
        "alone\": from the download file's creation to that moment (start-up, peer connection, "
        "tag, manifest and config left out). http: "
        "`curl -o FILE` of the same blob from `python3 -m http.server` on A; curl's file and B's "
        f"store are on one file system ({meta['store_and_curl_filesystem']}); fd also fsyncs, curl does not.",
        "",
    ]
    for s in summary:
        lines += [
            f"## rate: {s['rate']}",
            "",
            "| tool | median s | MiB/s | ratio vs HTTP (time) | client CPU s | server CPU s | failed |",
            "|---|---|---|---|---|---|---|",
        ]
        fd, http = s["fd"], s["http"]
        lines.append(
            f"| fd pull from peer | {fmt(fd['median_s'])} | {fmt(fd['mib_s'], 1)} | "
            f"{fmt(fd['ratio_vs_http'])}x | {fmt(fd['client_cpu_s'])} | {fmt(fd['server_cpu_s'])} | {fd['failed']} |"
        )
        lines.append(
            f"| fd: layer landed on B | {fmt(fd['landed_median_s'])} | {fmt(fd['landed_mib_s'], 1)} | "
            f"{fmt(fd.get('landed_ratio_vs_http'))}x | | | |"
        )
        lines.append(
            f"| fd: layer transfer alone | {fmt(fd['transfer_median_s'])} | {fmt(fd['transfer_mib_s'], 1)} | "
            f"{fmt(fd.get('transfer_ratio_vs_http'))}x | | | |"
        )
        lines.append(
            f"| curl from http.server | {fmt(http['median_s'])} | {fmt(http['mib_s'], 1)} | 1.00x | "
            f"{fmt(http['client_cpu_s'])} | {fmt(http['server_cpu_s'])} | {http['failed']} |"
        )
        lines += ["", "Times per repetition: fd " + ", ".join(f"{x:.2f}" for x in fd["seconds"])
                  + "; landed " + ", ".join(f"{x:.2f}" for x in fd["landed_s"])
                  + "; transfer alone " + ", ".join(f"{x:.2f}" for x in fd["transfer_s"])
                  + "; http " + ", ".join(f"{x:.2f}" for x in http["seconds"]) + " s.", ""]
        if fd["before_transfer_median_s"] is not None:
            lines += [f"Before the layer transfer began (start-up, registry attempts, peer connection, tag, "
                      f"manifest and config from A): median {fd['before_transfer_median_s']:.2f} s.", ""]
        if fd["pulled_lines"]:
            lines += [f"fd's own line (last rep): `{fd['pulled_lines'][-1]}`", ""]
        if "verify" in s:
            v = s["verify"]
            lines += [
                f"Verification: {mib:.0f} MiB / {vb['verify_mib_s']:.0f} MiB/s (bao check, one thread) "
                f"= {v['verify_cpu_s']:.2f} CPU s, i.e. {pct(v['share_of_transfer'])} of the layer transfer "
                f"alone, {pct(v['share_of_landed'])} of the time until the layer had landed, "
                f"{pct(v['share_of_pull'])} of the whole pull and {pct(v['share_of_b_cpu'])} of B's "
                "measured CPU time. A's encoding of the same "
                f"streams: {v.get('encode_cpu_s_on_a', 0):.2f} CPU s.",
                "",
            ]
    if vb:
        lines += [
            "## How verification was measured",
            "",
            f"A small Rust program built against `chunker/` (source inside benches/p2p-transfer.sh) "
            f"chunks {vb['mib']} MiB of pseudo-random data with fd's FastCDC settings "
            f"({vb['chunks']} chunks), encodes every chunk's bao stream and then checks every "
            "stream with `RangeDecoder`, fed in 16 KiB pieces as fd's p2p code does; best of "
            f"{vb['rounds']} rounds, one thread"
            + (", run before and after the transfers (the faster of the two runs for each figure)"
               if vb.get("runs") == 2 else "")
            + f". Verify {vb['verify_mib_s']:.0f} MiB/s, encode "
            f"(outboard + range stream) {vb['encode_mib_s']:.0f} MiB/s, plain BLAKE3 "
            f"{vb['blake3_mib_s']:.0f} MiB/s. The verify share above is layer size / verify speed "
            "/ time. It leaves out the receiver's other checks (sha256 of the blob, the layer's "
            "diff_id, BLAKE3 ids while building the two views), which are part of B's CPU column.",
            "",
        ]
    write_report(out_base, lines, {"meta": meta, "summary": summary, "raw": rows})


if __name__ == "__main__":
    main()
