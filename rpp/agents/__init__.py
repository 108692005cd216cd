"""The four prompt agents: one SB3 actor-critic policy (four actors, one centralized critic), training with
resumable checkpoints, evaluation against the task-wise prompt, the ranker sanity check, and serving.

    run_dir = train(cfg)                       # runs/<name>/
    result = evaluate(run_dir, split="test")   # result.table(), result.to_dict()
    prompt = PromptPolicy.load(run_dir).personalize(history_titles, candidates)
"""
from rpp.agents.evaluate import EvalResult, check_ranker, evaluate, run_policy
from rpp.agents.policy import FourAgentPolicy
from rpp.agents.serving import PromptPolicy
from rpp.agents.train import train

__all__ = ["EvalResult", "FourAgentPolicy", "PromptPolicy", "check_ranker", "evaluate", "run_policy", "train"]
