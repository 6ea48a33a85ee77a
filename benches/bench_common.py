"""Pieces shared by the benchmark report scripts; imported from the scripts' own folder."""

import json


def write_report(out_base, lines, record):
    """Writes the Markdown report `lines` to OUT_BASE.md and `record` to OUT_BASE.json, and
    prints the report, so that a run's summary is on screen as well as in the results."""
    with open(out_base + ".md", "w") as fh:
        fh.write("\n".join(lines))
    with open(out_base + ".json", "w") as fh:
        json.dump(record, fh, indent=1)
    print("\n".join(lines))
