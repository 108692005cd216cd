"""Environments: the state encoder, the shared StepCore, and its three faces (Gymnasium, SB3 VecEnv, PettingZoo).

``import rpp`` registers ``rpp/PromptPersonalization-v0`` (``rpp.ENV_ID``) with Gymnasium:
``gymnasium.make("rpp/PromptPersonalization-v0", cfg=cfg, split="train")`` (or ``core=make_core(...)``).
"""
from rpp import ENV_ID
from rpp.envs.core import EpisodeState, RequestUsage, SingleUserDriver, StepCore, StepTimings, UserStream, make_core
from rpp.envs.encoder import ItemEmbeddings, StateEncoder
from rpp.envs.gym_env import PromptPersonalizationEnv
from rpp.envs.pettingzoo_env import PromptPersonalizationParallelEnv
from rpp.envs.vec_env import BatchedPromptVecEnv


__all__ = ["ENV_ID", "BatchedPromptVecEnv", "EpisodeState", "ItemEmbeddings", "PromptPersonalizationEnv",
           "PromptPersonalizationParallelEnv", "RequestUsage", "SingleUserDriver", "StateEncoder", "StepCore",
           "StepTimings", "UserStream", "make_core"]
