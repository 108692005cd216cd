"""rpp: Reinforced Prompt Personalization for LLM-based recommenders.

Four actor-critic agents (role, history, reasoning, format) pick one sentence each for every user; an LLM ranks
the user's candidates from that prompt; NDCG of the held-out item is the reward.

    from rpp import PromptPolicy
    policy = PromptPolicy.load("runs/ml100k")
    prompt = policy.personalize(["Toy Story (1995)", "Fargo (1996)"])

    import gymnasium, rpp
    env = gymnasium.make("rpp/PromptPersonalization-v0", cfg=rpp.load_config("experiments/ml100k.yaml"))
"""
__version__ = "0.2.0"

__all__ = ["ENV_ID", "PromptPolicy", "load_config", "__version__"]

ENV_ID = "rpp/PromptPersonalization-v0"
"""The Gymnasium id of the one-user environment: ``gymnasium.make(rpp.ENV_ID, cfg=cfg, split="train")``."""


def _register_env() -> None:
    """Register ENV_ID on ``import rpp``, as Gymnasium packages do. The entry point is a string, so Gymnasium
    imports the environment (and torch with it) only when the id is made."""
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        # no max_episode_steps: the env ends its episodes itself after env.steps_per_episode
        gymnasium.register(id=ENV_ID, entry_point="rpp.envs.gym_env:PromptPersonalizationEnv")


_register_env()


def __getattr__(name):  # lazy: importing rpp must not load torch or the LLM stack
    if name == "PromptPolicy":
        from rpp.agents.serving import PromptPolicy

        return PromptPolicy
    if name == "load_config":
        from rpp.config import load_config

        return load_config
    raise AttributeError(f"module 'rpp' has no attribute {name!r}")
