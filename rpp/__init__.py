"""rpp: Reinforced Prompt Personalization for LLM-based recommenders.

Four actor-critic agents (role, history, reasoning, format) pick one sentence each for every user; an LLM ranks
the user's candidates from that prompt; NDCG of the held-out item is the reward.

    from rpp import PromptPolicy
    policy = PromptPolicy.load("runs/ml100k")
    prompt = policy.personalize(["Toy Story (1995)", "Fargo (1996)"])
"""
__version__ = "0.1.0"

__all__ = ["PromptPolicy", "load_config", "__version__"]


def __getattr__(name):  # lazy: importing rpp must not load torch or the LLM stack
    if name == "PromptPolicy":
        from rpp.agents.serving import PromptPolicy

        return PromptPolicy
    if name == "load_config":
        from rpp.config import load_config

        return load_config
    raise AttributeError(f"module 'rpp' has no attribute {name!r}")
