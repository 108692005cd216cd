"""The batched SB3 VecEnv: N user-episodes stepped together with ONE ranker call per step.

SB3's DummyVecEnv would step N single envs one after another, i.e. N separate ranker calls; here the N users are
the batch dimension of a single StepCore call (one padded forward on a local model, N concurrent requests to a
server). Finished episodes are reset automatically to the next users of the stream, following SB3's conventions
(``terminal_observation`` in the info of the finishing step). An episode ends TERMINATED after T steps, never
flagged ``TimeLimit.truncated``: nothing follows the last prompt, so SB3 must not add gamma * V(terminal obs) to
the last reward. Their task-wise baselines cost at most one more batched call.

All N episodes start together and last exactly T steps, so they always finish on the same step: the batch of
running episodes was drawn from the stream as one block. ``get_state()`` returns the stream position where the
CURRENT block was drawn; after ``set_state(state)``, ``reset()`` redraws that same block. Saved at a rollout
boundary (rollouts are whole episodes), this makes a resumed run serve exactly the users the uninterrupted run did.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from rpp.envs.core import EpisodeState, StepCore, UserStream, make_core


class BatchedPromptVecEnv(VecEnv):
    """Pass a ready `core` or a `cfg` and a `split`; `n_envs` defaults to cfg.env.n_envs (8 without a cfg);
    `seed` seeds the user order (default: the core's seed, i.e. cfg.seed)."""

    def __init__(self, core: StepCore | None = None, *, cfg=None, split: str = "train", n_envs: Optional[int] = None,
                 ranker=None, refiner=None, seed: Optional[int] = None) -> None:
        if core is None:
            if cfg is None:
                raise ValueError("BatchedPromptVecEnv needs either a StepCore or a Config (cfg=...)")
            core = make_core(cfg, split, ranker=ranker, refiner=refiner)
        self.core = core
        n = n_envs or core.env_cfg.n_envs
        self.render_mode = None
        self.stream = UserStream(core.samples, core.seed if seed is None else seed)
        self._block_start = self.stream.get_state()
        self.states: list[EpisodeState] = []
        self._actions: Optional[np.ndarray] = None
        super().__init__(num_envs=n, observation_space=core.observation_space,
                         action_space=spaces.MultiDiscrete(core.nvec))

    # ------------------------------------------------------------------ SB3 VecEnv API

    def reset(self) -> np.ndarray:
        """Start N new episodes on the next N users (or the users named in set_options([{"user": id}, ...]))."""
        self._block_start = self.stream.get_state()
        samples = []
        for i in range(self.num_envs):
            opts = self._options[i] or {}
            samples.append(self.core.sample_for(opts["user"]) if "user" in opts else self.stream.next())
        self.states, obs = self.core.reset(samples)
        self.reset_infos = [self.core.reset_info(s) for s in self.states]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        if not self.states:
            raise RuntimeError("call reset() before step()")
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async()")
        obs, rewards, infos = self.core.step(self.states, self._actions)
        self._actions = None
        dones = np.array([self.core.done(s) for s in self.states], dtype=bool)
        if dones.any():
            done_idx = np.flatnonzero(dones)
            if dones.all():
                self._block_start = self.stream.get_state()
            for i in done_idx:
                infos[i]["terminal_observation"] = obs[i].copy()
            new_states, new_obs = self.core.reset(self.stream.take(len(done_idx)))
            for j, i in enumerate(done_idx):
                self.states[i] = new_states[j]
                obs[i] = new_obs[j]
                self.reset_infos[i] = self.core.reset_info(new_states[j])
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    def seed(self, seed: Optional[int] = None) -> Sequence[Optional[int]]:
        """Restart the user stream with `seed` (taking effect at the next reset, as in SB3); None keeps it."""
        if seed is not None:
            self.stream.restart(seed)
            self._block_start = self.stream.get_state()
        return [seed] * self.num_envs

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        # the N "envs" are one object: call once (a side effect must not happen N times) and share the result
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    # ------------------------------------------------------------------ resumable position

    def get_state(self) -> dict:
        """Where the running block of episodes was drawn from the user stream (see the module docstring)."""
        return {"stream": dict(self._block_start), "num_envs": self.num_envs,
                "episode_step": self.states[0].step if self.states else 0}

    def set_state(self, state: dict) -> None:
        """Rewind the stream to a saved block; the next reset() serves that block's users again."""
        if state.get("num_envs") != self.num_envs:
            raise ValueError(f"VecEnv state was saved with {state.get('num_envs')} envs, this one has "
                             f"{self.num_envs}")
        self.stream.set_state(state["stream"])
        self._block_start = self.stream.get_state()
        self.states = []
