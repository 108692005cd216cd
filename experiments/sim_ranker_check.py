"""How often the ranker sanity check passes simulated rankers: the shared check (rpp.metrics.check_above_random,
bootstrap CI of the mean NDCG@10 gain over the exact random expectation) next to the rule it replaced (a
Wilcoxon signed-rank test of per-user NDCG@10 against the constant random expectation, p < 0.05, mean above it).

    python experiments/sim_ranker_check.py experiments/results/ranker_check_simulation.md

A simulated ranker puts the target first with probability p_top and anywhere among 20 candidates otherwise
(p_top = 0: a random order; p_top = 0.094: mean NDCG@10 0.30 against random's 0.227). Pure numpy; seeds 0..199.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpp.metrics import check_above_random, ndcg_at_k, random_ndcg  # noqa: E402

N_CANDIDATES, SEEDS = 20, range(200)


def old_rule(ranks) -> bool:
    values = ndcg_at_k(ranks, 10)
    rnd = np.full(values.shape, random_ndcg(N_CANDIDATES, 10))
    return bool(values.mean() > rnd.mean() and wilcoxon(values, rnd).pvalue < 0.05)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    lines = [f"# Ranker sanity check on simulated rankers ({len(SEEDS)} seeds each)", "",
             f"Command: `python experiments/sim_ranker_check.py {args.out.as_posix()}`", "",
             "| users | p_top | mean NDCG@10 | passes, shared check | passes, old Wilcoxon rule |", "|---|---|---|---|---|"]
    for users, p_top in [(100, 0.0), (300, 0.0), (100, 0.094), (300, 0.094), (100, 0.15)]:
        new = old = 0
        means = []
        for seed in SEEDS:
            rng = np.random.default_rng(seed)
            ranks = rng.integers(0, N_CANDIDATES, users)
            ranks[rng.random(users) < p_top] = 0
            means.append(ndcg_at_k(ranks, 10).mean())
            new += check_above_random(ranks, N_CANDIDATES, seed=seed).passes
            old += old_rule(ranks)
        lines.append(f"| {users} | {p_top} | {np.mean(means):.3f} | {new / len(SEEDS):.1%} | {old / len(SEEDS):.1%} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
