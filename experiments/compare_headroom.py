"""Two `rpp headroom` records on the same users: per-user effect reliability and task-wise NDCG side by side.

    python experiments/compare_headroom.py experiments/results/headroom-smollm2 experiments/results/headroom-gemma

Reads each folder's headroom.json, keeps the users both hold (in the first record's order) and prints, per record,
the split-half reliability of the per-user prompt effects (Spearman-Brown, bootstrap CI over users) and the
task-wise prompt's mean NDCG@10 over all items, then the paired task-wise difference (second - first).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rpp.benchmark.headroom import boot_indices, percentile_ci, reliability


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()
    recs = [json.loads((d / "headroom.json").read_text()) for d in (args.first, args.second)]
    common = [u for u in recs[0]["users"] if u in set(recs[1]["users"])]
    arrays = [np.asarray(r["ndcg"])[[r["users"].index(u) for u in common]] for r in recs]
    print(f"{len(common)} users in both records")
    for d, r, x in zip((args.first, args.second), recs, arrays):
        sb = reliability(x)["user_prompt"]["spearman_brown"]
        print(f"{d.name}: per-user effect reliability (Spearman-Brown) {sb['value']:+.2f} "
              f"[{sb['low']:+.2f}, {sb['high']:+.2f}]; task-wise NDCG@10 {x[:, 0, :].mean():.3f}")
    diff = arrays[1][:, 0, :].mean(1) - arrays[0][:, 0, :].mean(1)
    ci = percentile_ci(float(diff.mean()), [diff[i].mean() for i in boot_indices(len(diff), 1000, 0)])
    print(f"task-wise NDCG@10, {args.second.name} - {args.first.name}, paired: {ci['value']:+.3f} "
          f"[{ci['low']:+.3f}, {ci['high']:+.3f}]")


if __name__ == "__main__":
    main()
