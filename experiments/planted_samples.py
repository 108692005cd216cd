"""Which whole prompts did training sample on one planted family rule, and did it ever try a group's best prompt?

    python experiments/planted_samples.py --family-seed 1 --rule 0

Trains the default learner on the rule (experiments/ml100k.yaml's budget, rule seed 0, as bench_planted.py does),
then reads the reward head's training samples from the last checkpoint and prints: how many samples and distinct
whole prompts, for each group its best prompt and the rewards of the samples that used it on the rule's agents, the
reward quantiles, the best whole prompts seen (what the gate may start from) and the gate's decision. It explains a
rule the learner missed: a prompt that was never sampled cannot be found by the head or the gate.

Then, on the test users, the fixed prompts that judge a null rule: the served one, the bench's reference (every
combination of the RULE's agents, the others task-wise, best on the gate's validation users), the same chosen over
every whole prompt of all four agents (a chooser that does not know which agents the rule uses), and the best on the
gate's search users among the head's top-K whole prompts by population-mean prediction (K = 1, 3, 5, 10).
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
    from rpp.agents.planted import best_fixed_prompt, draw_family, planted_config
    from rpp.agents.serving import load_algorithm
    from rpp.agents.train import train
    from rpp.config import load_config
    from rpp.data import load_dataset, split_users
    from rpp.envs import make_core
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
        train_core = make_core(cfg, "train", ranker=ranker)
        with torch.no_grad():
            basis = model.policy.head.basis(torch.as_tensor(
                np.stack([train_core.user_rows(s)[0] for s in train_core.samples]), dtype=torch.float32))
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

    split = split_users(load_dataset(cfg.data), cfg.data, cfg.seed)
    k, n = cfg.env.reward_k, cfg.train.gate_users
    search, val, test = ([s.user for s in split.train][:n], [s.user for s in split.val][:n],
                         [s.user for s in split.test])
    taskwise = {p: a.id for p, a in train_core.builder.taskwise().items()}

    def mean(users, actions) -> float:
        return float(np.mean([ranker.ndcg(u, actions, k) for u in users]))

    reference = mean(test, best_fixed_prompt(ranker, val, ranker.rule.agents, taskwise, k)[1])
    every_agent = mean(test, best_fixed_prompt(ranker, val, PATTERNS, taskwise, k)[1])
    print(f"test NDCG@{k}: served fixed prompt {mean(test, gate['fixed_actions']):.4f}; reference (rule's agents) "
          f"{reference:.4f}; chosen over all four agents {every_agent:.4f}")
    order = np.argsort(-head.scores(basis.numpy().mean(0)[None]).reshape(-1).numpy())
    whole = [dict(zip(PATTERNS, (ids[p][int(i)] for p, i in zip(PATTERNS, np.unravel_index(f, head.nvec)))))
             for f in order[:10]]
    for top in (1, 3, 5, 10):
        pick = max(whole[:top], key=lambda a: mean(search, a))
        value = mean(test, pick)
        print(f"best of the head's top {top} on {len(search)} search users: {value:.4f} "
              f"(harm {(reference - value) / reference:+.3f})")


if __name__ == "__main__":
    main()
