"""Environments: the state encoder, the shared StepCore, and its three faces (Gymnasium, SB3 VecEnv, PettingZoo).

Importing this package registers ``rpp/PromptPersonalization-v0`` with Gymnasium:
``gymnasium.make("rpp/PromptPersonalization-v0", cfg=cfg, split="train")`` (or ``core=make_core(...)``).
"""
import gymnasium

from rpp.envs.core import EpisodeState, RequestUsage, SingleUserDriver, StepCore, StepTimings, UserStream, make_core
from rpp.envs.encoder import ItemEmbeddings, StateEncoder
from rpp.envs.gym_env import PromptPersonalizationEnv
from rpp.envs.pettingzoo_env import PromptPersonalizationParallelEnv
from rpp.envs.vec_env import BatchedPromptVecEnv

ENV_ID = "rpp/PromptPersonalization-v0"

if ENV_ID not in gymnasium.registry:
    # no max_episode_steps: the env truncates itself after env.steps_per_episode (a TimeLimit would duplicate it)
    gymnasium.register(id=ENV_ID, entry_point="rpp.envs.gym_env:PromptPersonalizationEnv")

__all__ = ["ENV_ID", "BatchedPromptVecEnv", "EpisodeState", "ItemEmbeddings", "PromptPersonalizationEnv",
           "PromptPersonalizationParallelEnv", "RequestUsage", "SingleUserDriver", "StateEncoder", "StepCore",
           "StepTimings", "UserStream", "make_core"]
