"""The Gymnasium face: one user per episode, registered as ``rpp/PromptPersonalization-v0``.

An episode is T = env.steps_per_episode prompts tried for one user: each step the policy picks one action index per
pattern (MultiDiscrete [n_role, n_history, n_reasoning, n_format]), the ranker ranks that user's candidates, and the
reward is the target's NDCG (minus the task-wise baseline). The episode terminates after T steps: the budget of
LLM calls is part of the task and nothing follows the last prompt (it is not a time-out of a longer task, so no
value is bootstrapped past it). All the work happens in the shared StepCore.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rpp.envs.core import SingleUserDriver, StepCore, core_or_make


class PromptPersonalizationEnv(gym.Env):
    """Pass a ready `core` (tests, sharing one ranker) or a `cfg` and a `split` name (then make_core builds it,
    with `ranker`/`refiner` if given). `seed` seeds the user order (default cfg.seed / the core's seed)."""

    metadata = {"render_modes": []}

    def __init__(self, core: StepCore | None = None, *, cfg=None, split: str = "train", ranker=None, refiner=None,
                 seed: Optional[int] = None) -> None:
        super().__init__()
        self.core = core = core_or_make(core, cfg, split, ranker, refiner, owner="PromptPersonalizationEnv")
        self.driver = SingleUserDriver(core, seed)
        self.observation_space = core.observation_space
        self.action_space = spaces.MultiDiscrete(core.nvec)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[np.ndarray, dict]:
        """Next user of the split's seeded order; seed restarts that order; options={"user": id} picks a user."""
        super().reset(seed=seed)
        return self.driver.reset(seed=seed, options=options)

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, info = self.driver.step(action)
        return obs, reward, terminated, False, info
