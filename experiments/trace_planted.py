"""How the agents learn a planted rule, rollout by rollout: for each user group, the mean probability the history
and reasoning agents give to that group's best action, and to the MAJORITY group's best action, over the training
users' first observation.

    python experiments/trace_planted.py --groups 4 --seed 0     # the learner in ml100k.yaml (evidence pooling)
    python experiments/trace_planted.py --groups 4 --seed 0 --set train.evidence.coef=0   # PPO alone: the record,
                                                               # experiments/results/planted-trace.{csv,png}

A learner that personalizes raises each group's own best action for that group; one that generalizes the majority's
lesson to everyone raises the majority's action for every group first.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402

from rpp.agents.planted import planted_config  # noqa: E402
from rpp.config import load_config  # noqa: E402


class GroupTrace(BaseCallback):
    """After each rollout's update is collected: per group and agent, mean P(own best) and P(majority's best)."""

    def __init__(self, policy_obs, groups, best_index, agents):
        super().__init__()
        self.obs, self.groups, self.best, self.agents = policy_obs, groups, best_index, agents
        self.rows: list[dict] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:  # the policy after the previous rollout's update
        self.record()

    def record(self) -> None:
        from rpp.prompts import PATTERNS

        probs = self.model.policy.agent_probs(self.obs)
        for p in self.agents:
            pi = probs[PATTERNS.index(p)]
            for g in sorted(set(self.groups)):
                mask = self.groups == g
                self.rows.append({"steps": self.num_timesteps, "agent": p, "group": g,
                                  "p_own_best": float(pi[mask, self.best[p][g]].mean()),
                                  "p_majority_best": float(pi[mask, self.best[p][0]].mean())})


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/ml100k.yaml")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="experiments/results/planted-trace")
    args = parser.parse_args()

    from rpp.agents.train import train
    from rpp.envs import StateEncoder, make_core
    from rpp.llm import make_ranker

    cfg = planted_config(load_config(args.config, args.overrides), args.groups, args.seed,
                         tempfile.mkdtemp(prefix="rpp-trace-"))
    ranker = make_ranker(cfg)
    core = make_core(cfg, "train", ranker=ranker, encoder=StateEncoder(cfg.encoder))
    _, obs = core.reset(core.samples)
    groups = np.array([ranker.group[s.user] for s in core.samples])
    ids = {p: [a.id for a in core.action_set.actions[p]] for p in cfg.llm.planted.agents}
    best = {p: [ids[p].index(ranker.best[g][p]) for g in range(args.groups)] for p in ids}
    trace = GroupTrace(obs, groups, best, list(ids))
    train(cfg, callbacks=[trace], progress=True, ranker=ranker)
    trace.record()  # the final policy

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(trace.rows[0]))
        writer.writeheader()
        writer.writerows(trace.rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ids), figsize=(6 * len(ids), 4), sharey=True)
    sizes = np.bincount(groups, minlength=args.groups)
    for ax, p in zip(np.atleast_1d(axes), ids):
        for g in range(args.groups):
            rows = [r for r in trace.rows if r["agent"] == p and r["group"] == g]
            steps = [r["steps"] for r in rows]
            line, = ax.plot(steps, [r["p_own_best"] for r in rows], label=f"group {g} ({sizes[g]} users): own best")
            if g > 0:
                ax.plot(steps, [r["p_majority_best"] for r in rows], ls="--", color=line.get_color(),
                        label=f"group {g}: group 0's best")
        ax.set_title(f"{p} agent")
        ax.set_xlabel("environment steps")
        ax.axhline(1 / len(ids[p]), color="grey", lw=0.5)
    np.atleast_1d(axes)[0].set_ylabel("mean probability over the group's training users")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.suptitle(f"planted rule, {args.groups} groups, seed {args.seed}: {cfg.train.total_steps} steps")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
