"""Paired comparison of two evaluations on the same users, from the runs' prompts.jsonl (e.g. RPP vs RPP+).

    python experiments/compare_runs.py runs/ml100k runs/ml100k-rpp-plus --split test --steps 1 \
        --out experiments/results/rpp_vs_rpp_plus.md

Only users evaluated in both runs are compared; every figure comes from the two files, nothing is re-ranked.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpp.metrics import METRIC_NAMES, all_metrics, bootstrap_ci, paired_test  # noqa: E402


def load(run: Path, split: str, steps: int) -> dict:
    rows = [json.loads(line) for line in (run / "prompts.jsonl").read_text().splitlines() if line.strip()]
    return {str(r["user"]): r for r in rows if r["split"] == split and r["steps"] == steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--split", default="test")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    a, b = load(Path(args.run_a), args.split, args.steps), load(Path(args.run_b), args.split, args.steps)
    users = [u for u in a if u in b]
    if not users:
        raise SystemExit("no user was evaluated in both runs with this split and number of steps")
    ma = all_metrics([a[u]["target_rank"] for u in users])
    mb = all_metrics([b[u]["target_rank"] for u in users])
    changed = sum(a[u]["prompt"] != b[u]["prompt"] for u in users)
    name_a, name_b = Path(args.run_a).name, Path(args.run_b).name
    lines = [f"# `{name_a}` vs `{name_b}`: {len(users)} {args.split} users, {args.steps} step(s)", "",
             f"Command: `python experiments/compare_runs.py {args.run_a} {args.run_b} --split {args.split} "
             f"--steps {args.steps} --out {args.out}`", "",
             f"Prompts that differ between the two runs: {changed} of {len(users)}.", "",
             f"| metric | {name_a} | {name_b} | diff (b - a) | Wilcoxon p |", "|---|---|---|---|---|"]
    for m in METRIC_NAMES:
        t = paired_test(mb[m], ma[m])
        lines.append(f"| {m} | {bootstrap_ci(ma[m])} | {bootstrap_ci(mb[m])} | {t.mean_diff:+.4f} | {t.p_value:.3g} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
