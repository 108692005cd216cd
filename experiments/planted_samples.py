"""Which whole prompts did training sample on one planted family rule, and did it ever try a group's best prompt?

    python experiments/planted_samples.py --family-seed 1 --rule 0

Trains the default learner on the rule (experiments/ml100k.yaml's budget, rule seed 0, as bench_planted.py does),
then reads the reward head's training samples from the last checkpoint and prints: how many samples and distinct
whole prompts, for each group its best prompt and the rewards of the samples that used it on the rule's agents, the
reward quantiles, the best whole prompts seen (what the gate may start from) and the gate's decision. It explains a
rule the learner missed: a prompt that was never sampled cannot be found by the head or the gate.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family-seed", type=int, required=True)
    parser.add_argument("--rule", type=int, required=True, help="the rule's index in the family of 20")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "ml100k.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from rpp.agents.checkpoints import latest_checkpoint, load_state
    from rpp.agents.gate import read_gate
    from rpp.agents.planted import draw_family, planted_config
    from rpp.agents.serving import load_algorithm
    from rpp.agents.train import train
    from rpp.config import load_config
    from rpp.llm import make_ranker
    from rpp.prompts import PATTERNS

    torch.set_num_threads(args.threads)
    rule = draw_family(20, args.family_seed)[args.rule]
    print("rule", rule)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = planted_config(load_config(args.config, []), rule, 0, tmp)
        ranker = make_ranker(cfg)
        run_dir = train(cfg, progress=False, ranker=ranker)
        model = load_algorithm(cfg, latest_checkpoint(run_dir))
        gate = read_gate(run_dir)
        model.load_learner_state(load_state(latest_checkpoint(run_dir))["learner"])
    head = model.reward_model
    ids = {p: [a.id for a in ranker.action_set.actions[p]] for p in PATTERNS}
    sizes = Counter(ranker.group.values())
    combos, rewards = np.asarray(head.actions), np.asarray(head.rewards)
    print("samples", len(combos), "distinct", len({tuple(c) for c in combos}))
    for g, best in enumerate(ranker.best):
        mask = np.ones(len(combos), bool)
        for p, a in best.items():
            mask &= combos[:, PATTERNS.index(p)] == ids[p].index(a)
        print(f"group {g} size {sizes[g]} best {best}: {mask.sum()} samples, rewards "
              f"{np.round(rewards[mask], 3).tolist()}")
    print("reward quantiles (0.5, 0.9, 0.99, max)", np.round(np.quantile(rewards, [0.5, 0.9, 0.99, 1.0]), 3))
    print("best_seen(4, min_samples=1)", head.best_seen(4, 1))
    print("best_seen(2, min_samples=2)", head.best_seen(2, 2))
    print("gate", json.dumps({k: gate[k] for k in ("served", "reason", "fixed_actions", "starts")}))


if __name__ == "__main__":
    main()
