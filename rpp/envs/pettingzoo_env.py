"""The PettingZoo face: the four prompt agents (role, history, reasoning, format) as a ParallelEnv.

Each agent has its own Discrete action space (its pattern's action set) and sees the same observation; all four
get the same reward, because the ranker judges the prompt they wrote together. Episodes are one user and terminate after
env.steps_per_episode steps, exactly as in the Gymnasium face (both drive the shared StepCore).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from rpp.envs.core import SingleUserDriver, StepCore, core_or_make
from rpp.prompts import PATTERNS


class PromptPersonalizationParallelEnv(ParallelEnv):
    metadata = {"name": "rpp_prompt_personalization_v0", "render_modes": []}

    def __init__(self, core: StepCore | None = None, *, cfg=None, split: str = "train", ranker=None, refiner=None,
                 seed: Optional[int] = None) -> None:
        self.core = core = core_or_make(core, cfg, split, ranker, refiner,
                                        owner="PromptPersonalizationParallelEnv")
        self.driver = SingleUserDriver(core, seed)
        self.possible_agents = list(PATTERNS)
        self.agents: list[str] = []
        self.render_mode = None
        # one space object per agent, returned as-is every time (PettingZoo's API test checks identity)
        self._action_spaces = {p: spaces.Discrete(n) for p, n in zip(PATTERNS, core.nvec)}
        self._observation_space = core.observation_space

    def observation_space(self, agent: str) -> spaces.Box:
        return self._observation_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._action_spaces[agent]

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None):
        obs, info = self.driver.reset(seed=seed, options=options)
        self.agents = list(self.possible_agents)
        return {a: obs.copy() for a in self.agents}, {a: dict(info) for a in self.agents}

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError("the episode is over; call reset()")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"missing actions for agent(s) {', '.join(missing)}: all four agents act every step")
        vector = np.array([int(actions[a]) for a in PATTERNS], dtype=np.int64)
        obs, reward, terminated, info = self.driver.step(vector)
        agents = self.agents
        observations = {a: obs.copy() for a in agents}
        rewards = {a: reward for a in agents}
        terminations = {a: terminated for a in agents}
        truncations = {a: False for a in agents}
        infos = {a: dict(info) for a in agents}
        if terminated:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def close(self) -> None:
        pass
