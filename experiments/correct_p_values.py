"""Family-wise corrected p-values for every paired test of a run record (e.g. experiments/results/ml100k.md).

    python experiments/correct_p_values.py experiments/results/ml100k.md experiments/results/ml100k_corrected_p.md

A record reports one Wilcoxon p per metric and evaluation mode (7 metrics x 2 modes = 14 tests for ml100k.md).
Reading the smallest of them alone overstates the evidence; this script reads every table row of the record
(`| metric | policy | task-wise | diff | relative | p |`), applies Holm's and Bonferroni's corrections over all of
them as one family (rpp.metrics.adjust_p_values) and writes a table of raw and corrected p-values.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpp.metrics import METRIC_NAMES, adjust_p_values  # noqa: E402


def read_tests(record: str) -> list[tuple[str, str, str, float]]:
    """(section heading, metric, diff, p) for every metric row of every evaluation table of the record."""
    tests, section = [], ""
    for line in record.splitlines():
        if line.startswith("### "):
            section = line[4:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 6 and cells[0] in METRIC_NAMES:
            tests.append((section, cells[0], cells[3], float(cells[5])))
    return tests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args(argv)
    tests = read_tests(args.record.read_text())
    if not tests:
        raise SystemExit(f"{args.record}: no metric rows with a p-value found")
    raw = [p for *_, p in tests]
    holm, bonf = adjust_p_values(raw, "holm"), adjust_p_values(raw, "bonferroni")
    lines = [f"# Corrected p-values of `{args.record.as_posix()}`", "",
             f"Command: `python experiments/correct_p_values.py {args.record.as_posix()} {args.out.as_posix()}`", "",
             f"{len(tests)} paired tests (Wilcoxon signed-rank, as recorded) corrected as one family; "
             f"significant at alpha = {args.alpha} after correction: "
             f"Holm {int((holm < args.alpha).sum())}, Bonferroni {int((bonf < args.alpha).sum())}.", "",
             "| evaluation | metric | diff | raw p | Holm p | Bonferroni p |", "|---|---|---|---|---|---|"]
    for (section, metric, diff, p), h, b in zip(tests, holm, bonf):
        lines.append(f"| {section} | {metric} | {diff} | {p:.3g} | {h:.3g} | {b:.3g} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
