"""How alike are the early rollouts of trained planted runs (evidence pooling on)? For each run, per rollout, the
share of its actions equal to the first run's at the same position.

Learners that differ only in their evidence settings start from the same seed: the same users, the same
near-uniform first actions (an untrained actor and an empty evidence model give every action about the same
probability) and the same torch random stream, so their first rollouts are nearly identical, and so is whatever
luck those rollouts bring. Comparisons of such learners on one seed are paired, not independent trials.

    python experiments/compare_rollouts.py RUN_DIR RUN_DIR ... [--rollouts 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rpp.agents.checkpoints import latest_checkpoint, load_state  # noqa: E402
from rpp.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rollouts", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.runs[0] / "config.yaml")
    size = cfg.env.n_envs * cfg.rollout_steps
    actions = [load_state(latest_checkpoint(run))["evidence"]["samples"]["actions"] for run in args.runs]
    print("| run | evidence settings | " + " | ".join(f"rollout {r + 1}" for r in range(args.rollouts)) + " |")
    print("|---|---|" + "---|" * args.rollouts)
    for run, a in zip(args.runs, actions):
        ev = load_config(run / "config.yaml").train.evidence
        shares = [float(np.mean(a[r * size:(r + 1) * size] == actions[0][r * size:(r + 1) * size]))
                  for r in range(args.rollouts)]
        print(f"| {run.name} ({len(a)} samples) | explore {ev.explore}, noise_sd {ev.noise_sd}, distill_on "
              f"{ev.distill_on} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")


if __name__ == "__main__":
    main()
