"""How noisy is the null-rule harm bar itself? The harm reference of experiments/bench_planted.py is the best fixed
prompt chosen on the run's 50 validation users (every combination of the rule's agents), scored on the 300 test
users. This script runs the SAME procedure on other users of the same split, the first N training users, and
reports its harm against the reference: a chooser exactly as good as the reference, so whatever harm it shows is
the selection noise of choosing one fixed prompt on N users (near-tied prompts whose order flips between user
samples), the floor under any learner's harm on that rule.

    python experiments/null_harm_floor.py --family-seeds 1 2 3 4 5 6 7 8 --out experiments/results/planted-null-floor.md

No training and no LLM: the planted ranker answers every request (a few seconds a rule).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def floors(cfg, users: tuple[int, ...]) -> dict[int, float]:
    """{N: (reference - chosen on the first N training users) / reference}, NDCG@reward_k on the test users."""
    from rpp.agents.planted import best_fixed_prompt
    from rpp.data import load_dataset, split_users
    from rpp.llm import make_ranker
    from rpp.prompts import PromptBuilder

    ranker = make_ranker(cfg)
    split = split_users(load_dataset(cfg.data), cfg.data, cfg.seed)
    train, test = [s.user for s in split.train], [s.user for s in split.test]
    val = [s.user for s in split.val][:cfg.train.gate_users or None]
    taskwise = {p: a.id for p, a in PromptBuilder(ranker.action_set, cfg.prompt, cfg.data.item_noun)
                .taskwise().items()}
    agents = ranker.rule.agents
    k = cfg.env.reward_k

    def on_test(users) -> float:  # the test users' mean NDCG@k of the fixed prompt chosen on `users`
        actions = best_fixed_prompt(ranker, users, agents, taskwise, k)[1]
        return float(np.mean([ranker.ndcg(u, actions, k) for u in test]))

    reference = on_test(val)
    return {n: (reference - on_test(train[:n])) / reference for n in users}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family-seeds", nargs="+", type=int, required=True)
    parser.add_argument("--users", nargs="+", type=int, default=[50, 200], help="training users to choose on")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "ml100k.yaml"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from rpp.agents.planted import draw_family, planted_config
    from rpp.config import load_config

    base = load_config(args.config, [])
    rows = []
    for family_seed in args.family_seeds:
        for index, rule in enumerate(draw_family(20, family_seed)):
            if rule["feature"] != "user_hash":
                continue
            with tempfile.TemporaryDirectory() as tmp:
                harm = floors(planted_config(base, rule, 0, tmp), tuple(args.users))
            rows.append((family_seed, index, rule, harm))
            print(family_seed, index, rule, {n: round(h, 3) for n, h in harm.items()}, flush=True)
    n_rules = len(rows)
    lines = ["# The noise floor of the null-rule harm bar", "", "Made by:", "",
             f"    python experiments/null_harm_floor.py {' '.join(sys.argv[1:])}", "",
             __doc__.split("\n\n")[0].replace("\n", " "), "",
             "| family seed / rule | rule (agents, groups, interaction, noise) | "
             + " | ".join(f"harm, chosen on {n} training users" for n in args.users) + " |",
             "|---|---|" + "---|" * len(args.users)]
    for family_seed, index, rule, harm in rows:
        lines.append(f"| {family_seed}/{index} | {'+'.join(a[:3] for a in rule['agents'])} g{rule['groups']} "
                     f"{rule['interaction'][:3]} n{rule['noise']} | "
                     + " | ".join(f"{harm[n]:+.3f}" for n in args.users) + " |")
    lines += ["", "## Summary", "", "| chosen on | null rules | harm > 0.02 | max harm |", "|---|---|---|---|"]
    for n in args.users:
        values = np.array([harm[n] for *_, harm in rows])
        lines.append(f"| {n} training users | {n_rules} | {int((values > 0.02).sum())} | {values.max():+.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
