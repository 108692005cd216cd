"""Paired comparison of every method of a benchmark against its reference, on every metric, from per_user.csv.

    python experiments/paired_per_user.py experiments/results/benchmark-personal

A benchmark report gives one Wilcoxon p per method (NDCG@10). This reads the report's per-user rows and gives, for
each method and each of the 7 metrics: the mean per-user difference to the reference with a 95% bootstrap CI of
that PAIRED difference (same users), the raw Wilcoxon p, and Holm's correction over the methods' tests as one family
(rpp.metrics). An upper bound (results.csv family "upper_bound": the label oracle) is not a competitor: its
differences are listed with their raw p, outside the family, so they neither count as findings nor make the
methods' correction stricter. Writes paired.md next to the report and prints it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from rpp.metrics import METRIC_NAMES, adjust_p_values, bootstrap_ci, paired_test  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", type=Path, help="a benchmark's output folder (per_user.csv, results.csv)")
    ap.add_argument("--reference", default=None, help="reference method (default: the report's, first row)")
    args = ap.parse_args(argv)
    per_user = pd.read_csv(args.report_dir / "per_user.csv")
    results = pd.read_csv(args.report_dir / "results.csv")
    order = results["method"].tolist()
    bounds = set(results.loc[results["family"] == "upper_bound", "method"])
    ref = args.reference or order[0]
    wide = {m: g.set_index("user").sort_index() for m, g in per_user.groupby("method")}
    if ref not in wide:
        raise SystemExit(f"{args.report_dir}: no per-user rows of the reference {ref!r}")
    rows = []
    for method in [m for m in order if m != ref]:
        a, b = wide[method], wide[ref]
        users = a.index.intersection(b.index)
        for metric in METRIC_NAMES:
            x, y = a.loc[users, metric].to_numpy(), b.loc[users, metric].to_numpy()
            rows.append((method, metric, len(users), bootstrap_ci(x - y), paired_test(x, y).p_value))
    rows.sort(key=lambda r: r[0] in bounds)  # the methods first, the upper bounds after them
    tested = [r for r in rows if r[0] not in bounds]
    holm = list(adjust_p_values([r[-1] for r in tested], "holm")) + [None] * (len(rows) - len(tested))
    significant = sum(h < 0.05 for h in holm if h is not None)
    outside = (f" The {len(rows) - len(tested)} differences of the upper bound(s) {', '.join(sorted(bounds & set(order)))} "
               "are listed with their raw p only (not a method: outside the family)." if len(rows) > len(tested) else "")
    lines = [f"# Paired differences against `{ref}`: `{args.report_dir.as_posix()}`", "",
             f"Command: `python experiments/paired_per_user.py {args.report_dir.as_posix()}`", "",
             f"{len(tested)} paired tests (Wilcoxon signed-rank on per-user values, zero differences dropped) "
             f"corrected as one family with Holm; significant at 0.05 after correction: {significant}.{outside} "
             "`diff [95% CI]`: mean per-user difference (method - reference) with a percentile bootstrap CI "
             "(1000 resamples of users, seed 0).", "",
             "| method | metric | users | diff [95% CI] | raw p | Holm p |", "|---|---|---|---|---|---|"]
    for (method, metric, n, est, p), h in zip(rows, holm):
        lines.append(f"| {method} | {metric} | {n} | {est.mean:+.4f} [{est.low:+.4f}, {est.high:+.4f}] | {p:.3g} "
                     f"| {'upper bound, not tested' if h is None else f'{h:.3g}'} |")
    out = args.report_dir / "paired.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
