"""Helpers shared by several test modules (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np


def shuffled_target_rollouts(policy, core, steps: int, seed: int = 0):
    """Greedy rollouts of `policy` on the core's users, and again on the same users with each target moved to
    another candidate slot (a fresh StepCore, so no cache inside a core carries anything over).

    A policy and evaluation that never read the target must give identical actions, prompts and rankings on
    both; the caller asserts that. Returns (records on the real targets, records on the shuffled targets)."""
    from rpp.agents import run_policy
    from rpp.envs import StepCore

    rng = np.random.default_rng(seed)
    shuffled = []
    for s in core.samples:
        slot = int(rng.choice([i for i in range(len(s.candidates)) if i != s.target_index]))
        shuffled.append(replace(s, target=s.candidates[slot], target_index=slot))
    other = StepCore(core.dataset, shuffled, core.builder, core.encoder, core.ranker, env_cfg=core.env_cfg,
                     encoder_cfg=core.encoder_cfg, seed=core.seed)
    real = run_policy(policy, core, core.samples, steps=steps, batch_size=4)
    moved = run_policy(policy, other, shuffled, steps=steps, batch_size=4)
    return real, moved
