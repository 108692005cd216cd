"""Paired comparison of every method of a benchmark against its reference, on every metric, from per_user.csv.

    python experiments/paired_per_user.py experiments/results/benchmark-pooled

A benchmark report gives one Wilcoxon p per method (NDCG@10). This reads the report's per-user rows and gives, for
each method and each of the 7 metrics: the mean per-user difference to the reference with a 95% bootstrap CI of
that PAIRED difference (same users), the raw Wilcoxon p, and Holm's correction over all of them as one family
(rpp.metrics). Writes paired.md next to the report and prints it.
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
    order = pd.read_csv(args.report_dir / "results.csv")["method"].tolist()
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
    holm = adjust_p_values([r[-1] for r in rows], "holm")
    lines = [f"# Paired differences against `{ref}`: `{args.report_dir.as_posix()}`", "",
             f"Command: `python experiments/paired_per_user.py {args.report_dir.as_posix()}`", "",
             f"{len(rows)} paired tests (Wilcoxon signed-rank on per-user values, zero differences dropped) corrected "
             f"as one family with Holm; significant at 0.05 after correction: {int((holm < 0.05).sum())}. "
             "`diff [95% CI]`: mean per-user difference (method - reference) with a percentile bootstrap CI "
             "(1000 resamples of users, seed 0).", "",
             "| method | metric | users | diff [95% CI] | raw p | Holm p |", "|---|---|---|---|---|---|"]
    for (method, metric, n, est, p), h in zip(rows, holm):
        lines.append(f"| {method} | {metric} | {n} | {est.mean:+.4f} [{est.low:+.4f}, {est.high:+.4f}] | {p:.3g} "
                     f"| {h:.3g} |")
    out = args.report_dir / "paired.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
