"""The learner's evidence model alone, as a bandit on the planted rule: does its own exploration find each group's
best actions, and does it recover from an unlucky first rollout?

No PPO and no policy: every rollout action of all four agents is drawn from the evidence model's Thompson choice
probabilities (rpp.agents.evidence, built with the config's train.evidence settings), the model is refit after
each rollout of n_envs * n_steps steps, and the training users come in the environment's seeded order, T steps
each, exactly as in training. The rewards are the environment's (NDCG@reward_k minus the task-wise NDCG, read from
the planted ranker). At the end each test user gets, per agent, the action most often best under the posterior;
the table gives the share of test users given their group's best actions, overall and per group.

`--start RUN_DIR` replays the first rollout's actions of a trained run (read from its last checkpoint's evidence
samples) instead of drawing them, then goes on drawing: whether an unlucky first rollout decides the result.

    python experiments/evidence_bandit.py --groups 4 --seeds 0 1 2 --rng 0 --set train.evidence.noise_sd=0.3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpp.agents.checkpoints import latest_checkpoint, load_state  # noqa: E402
from rpp.agents.evidence import make_evidence_model  # noqa: E402
from rpp.agents.planted import planted_config  # noqa: E402
from rpp.config import load_config  # noqa: E402
from rpp.envs import StateEncoder, make_core  # noqa: E402
from rpp.envs.core import PROGRESS_SLOT, UserStream  # noqa: E402
from rpp.llm import make_ranker  # noqa: E402
from rpp.prompts import PATTERNS  # noqa: E402


def first_rollout(run_dir: Path, steps: int, T: int) -> dict:
    """(user row bytes, step) -> the action vector a trained run took there in its first rollout."""
    samples = load_state(latest_checkpoint(run_dir))["evidence"]["samples"]
    x = np.asarray(samples["x"][:steps], dtype=np.float32).copy()
    step = np.rint(x[:, PROGRESS_SLOT] * T).astype(int)
    x[:, PROGRESS_SLOT] = 0.0  # the step slot is the environment's, not the user's
    return {(x[i].tobytes(), int(step[i])): samples["actions"][i] for i in range(len(x))}


def run(cfg, rng_seed: int, encoder, start: dict | None = None) -> dict:
    ranker = make_ranker(cfg)
    train, test = (make_core(cfg, split, ranker=ranker, encoder=encoder) for split in ("train", cfg.eval.split))
    model = make_evidence_model(cfg.train.evidence.model_dump(), list(train.nvec), encoder.dim,
                                train.user_features.features.category_columns)
    ids = {p: [a.id for a in ranker.action_set.actions[p]] for p in PATTERNS}
    taskwise = {p: a.id for p, a in train.builder.taskwise().items()}
    k, T, n_envs = cfg.env.reward_k, cfg.env.steps_per_episode, cfg.env.n_envs
    per_rollout = n_envs * cfg.rollout_steps

    def row(sample, t: int) -> np.ndarray:
        r = train.user_rows(sample)[0].copy()
        r[PROGRESS_SLOT] = t / T
        return r

    rng = np.random.default_rng([cfg.seed, rng_seed, 0xB4D])
    stream = UserStream(train.samples, cfg.seed)
    done = 0
    while done < cfg.train.total_steps:
        xs, acts, rewards = [], [], []
        for _ in range(cfg.rollout_steps // T):
            users = stream.take(n_envs)
            base = np.array([ranker.ndcg(s.user, taskwise, k) for s in users])
            for t in range(T):
                x = np.stack([row(s, t) for s in users])
                probs = model.choice_probs(x, rng)
                a = np.stack([[rng.choice(len(q), p=q / q.sum()) for q in agent] for agent in probs], axis=1)
                if start is not None and done < per_rollout:
                    zero = x.copy()
                    zero[:, PROGRESS_SLOT] = 0.0
                    a = np.stack([start[(z.tobytes(), t)] for z in zero])
                r = [ranker.ndcg(s.user, {p: ids[p][a[i, j]] for j, p in enumerate(PATTERNS)}, k)
                     for i, s in enumerate(users)]
                xs.append(x), acts.append(a), rewards.append(np.asarray(r) - base)
                done += n_envs
        model.add(np.concatenate(xs), np.concatenate(acts), np.concatenate(rewards))
    x = np.stack([row(s, 0) for s in test.samples])
    choice = [p.argmax(1) for p in model.choice_probs(x, np.random.default_rng([cfg.seed, rng_seed, 1]))]
    by_group: dict[int, list[bool]] = {}
    for i, s in enumerate(test.samples):
        best = ranker.optimal_actions(s.user)
        hit = all(ids[p][choice[PATTERNS.index(p)][i]] == best[p] for p in ranker.rule.agents)
        by_group.setdefault(ranker.group[s.user], []).append(hit)
    hits = [h for v in by_group.values() for h in v]
    return {"optimal_share": float(np.mean(hits)),
            "by_group": [float(np.mean(by_group[g])) for g in sorted(by_group)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/ml100k.yaml")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rng", nargs="+", type=int, default=[0], help="seeds of the Thompson draws")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--start", type=Path, default=None,
                        help="a trained planted run whose first rollout's actions are replayed (one seed only)")
    parser.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    args = parser.parse_args()
    if args.start is not None and len(args.seeds) != 1:
        parser.error("--start replays one run's first rollout: give the one seed it was trained with")
    command = ("python experiments/evidence_bandit.py " + f"--config {args.config} --groups {args.groups} --seeds "
               + " ".join(map(str, args.seeds)) + " --rng " + " ".join(map(str, args.rng))
               + "".join(f" --set {o}" for o in args.overrides)
               + (f" --start {args.start.name}" if args.start else ""))
    lines = ["# The evidence model alone as a bandit on the planted rule", "", f"Command: `{command}`", "",
             "| seed | draws seed | users optimal | by group |", "|---|---|---|---|"]
    encoder, shares = None, []
    for seed in args.seeds:
        cfg = planted_config(load_config(args.config, args.overrides), args.groups, seed,
                             tempfile.mkdtemp(prefix="rpp-bandit-"))
        encoder = encoder or StateEncoder(cfg.encoder)
        start = (first_rollout(args.start, cfg.env.n_envs * cfg.rollout_steps, cfg.env.steps_per_episode)
                 if args.start else None)
        for r in args.rng:
            result = run(cfg, r, encoder, start)
            shares.append(result["optimal_share"])
            lines.append(f"| {seed} | {r} | {result['optimal_share']:.3f} | "
                         + " / ".join(f"{v:.2f}" for v in result["by_group"]) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"Mean users optimal {np.mean(shares):.3f}; at least 95%: {sum(s >= 0.95 for s in shares)} of "
              f"{len(shares)} runs."]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
