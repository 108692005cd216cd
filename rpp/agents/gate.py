"""The safe-improvement gate: a run serves its per-user policy only where it beats the best fixed prompt with
confidence; otherwise it serves that fixed prompt.

At the end of `rpp train`, on VALIDATION users (never test users; the first train.gate_users of them):
1. the reference, the best fixed prompt, chosen WITHOUT those users' labels: one pass of coordinate ascent on the
   TRAINING users (train.gate_search_users, default all). It starts from the best of the task-wise prompt and the
   learner's own picks (for the thompson learner, the whole prompt whose posterior-mean reward, main effects plus
   pairwise interactions, averaged over the training users is highest, ThompsonPPO.population_best, and the
   BEST_SEEN whole prompts with the best mean reward in training; for PPO alone, the combination its greedy policy
   gives most often on the training users), then for each agent in turn tries every one of its actions with the
   others held and keeps the best. That is up to 4 + sum(n_actions - 1) fixed prompts, one request per search user
   each. The best of ~25 prompts is chosen on noisy means, so the fewer the users the further below the best fixed
   prompt it lands (the winner's curse): on 50 of 200 training users it served 2-3% below it on 2 of 13 held-out
   null planted rules; on all 200 on none, better on 10 of the 13 and worse on 1
   (experiments/results/planted-heldout.md). A fixed prompt picked from the learner's estimates alone can be far
   from the best one: with several equally common user groups, which prompt is best for everybody depends on the
   groups' exact shares, and on a null planted rule the head's pick served 5-10% below the best fixed prompt;
2. the reference and the policy (greedily, over eval.steps steps) are ranked for every validation user; users
   where either request failed are dropped and counted;
3. the paired differences d = NDCG(policy) - NDCG(fixed) give a one-sided (1 - train.gate_alpha) lower confidence
   bound mean(d) - t * sd(d) / sqrt(n); the policy is served if the bound is above 0, else the fixed prompt.
   Because the reference was chosen on other users, its mean on the validation users is not inflated by the
   selection (choosing it on the validation users themselves made the test favour the fixed prompt by the
   winner's curse, and the gate then withheld policies that were better: experiments/results/planted.md).

The decision, its numbers and the LLM calls it cost are written to <run>/gate.json; ``GatedPolicy`` applies it
wherever a run's policy is evaluated or served (rpp evaluate, rpp benchmark, PromptPolicy).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy import stats

from rpp.agents.checkpoints import atomic_write_text
from rpp.config import Config
from rpp.prompts import PATTERNS

GATE_FILE = "gate.json"


def read_gate(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """A run's recorded gate decision, or None (runs trained before the gate, or without validation users)."""
    path = Path(run_dir) / GATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class GatedPolicy:
    """An SB3 policy with a run's gate applied: ``predict`` returns the fixed prompt's action indices for every
    observation when the gate served the fixed prompt, else the policy's. Everything else is the policy's."""

    def __init__(self, policy, gate: Optional[dict[str, Any]]) -> None:
        self.policy = policy
        self.gate = gate
        self.fixed = np.asarray(gate["fixed_indices"], dtype=np.int64) if gate and gate["served"] == "fixed" \
            else None

    @property
    def served(self) -> str:
        return "policy (no gate recorded)" if self.gate is None else self.gate["served"]

    def predict(self, obs, state=None, episode_start=None, deterministic: bool = True):
        if self.fixed is None:
            return self.policy.predict(obs, state, episode_start, deterministic)
        n = 1 if np.asarray(obs).ndim == 2 else len(obs)
        return np.tile(self.fixed, (n, 1)), None

    def __getattr__(self, name):
        return getattr(self.policy, name)


def served_phrase(served: str) -> str:
    """How messages name what a run serves: "the policy" or "the fixed prompt" (gate.json's served is "policy" or
    "fixed")."""
    return "the fixed prompt" if served == "fixed" else f"the {served}"


BEST_SEEN = 2
"""Whole prompts with the best mean reward in training that the gate also tries as starts (thompson learner)."""


def _learner_picks(model, train_core, batch_size: int) -> list[list[int]]:
    """The learner's candidates for the best fixed prompt: its population pick first (module doc), then for the
    thompson learner the BEST_SEEN whole prompts with the best mean reward in training."""
    from rpp.agents.learner import ThompsonPPO

    if isinstance(model, ThompsonPPO):
        rows = np.stack([train_core.user_rows(s)[0] for s in train_core.samples])
        return [model.population_best(rows), *model.reward_model.best_seen(BEST_SEEN)]
    counts: Counter = Counter()
    for start in range(0, len(train_core.samples), batch_size):
        _, obs = train_core.reset(train_core.samples[start:start + batch_size])
        actions, _ = model.policy.predict(obs, deterministic=True)
        counts.update(tuple(int(a) for a in row) for row in np.asarray(actions))
    return [list(counts.most_common(1)[0][0])]


def fixed_ndcg(core, samples, indices: list[int], batch_size: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NDCG@k of one fixed prompt (action indices) for each sample, and whether its request failed."""
    ndcg, failed = [], []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start:start + batch_size])
        states, _ = core.reset(batch)
        _, _, infos = core.step(states, np.tile(indices, (len(batch), 1)))
        ndcg += [info["metrics"][f"ndcg@{k}"] for info in infos]
        failed += [bool(info.get("ranker_failed")) for info in infos]
    return np.asarray(ndcg, dtype=float), np.asarray(failed)


def coordinate_ascent(starts: list[list[int]], sizes: list[int], score) -> tuple[list[int], dict]:
    """One pass of coordinate ascent over fixed prompts (action indices per agent): the best of `starts`, then for
    each agent in turn every action with the others held, keeping the best. score(combo) -> per-user values with nan
    for users whose request failed (a combo is judged by its mean over its answered users). Returns the best combo
    and {combo: mean} of every combo tried."""
    means: dict[tuple[int, ...], float] = {}

    def mean(combo) -> float:
        key = tuple(int(i) for i in combo)
        if key not in means:
            values = np.asarray(score(list(key)), dtype=float)
            means[key] = float(np.nanmean(values)) if np.isfinite(values).any() else -math.inf
        return means[key]

    best = list(max(starts, key=mean))
    for agent, size in enumerate(sizes):
        for action in range(size):
            candidate = best[:agent] + [action] + best[agent + 1:]
            if mean(candidate) > mean(best):
                best = candidate
    return best, means


def lower_bound(diffs: np.ndarray, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound of the mean of paired differences (Student t)."""
    n = len(diffs)
    if n < 2:
        return -math.inf
    sd = float(np.std(diffs, ddof=1))
    return float(np.mean(diffs)) - float(stats.t.ppf(1 - alpha, n - 1)) * sd / math.sqrt(n)


def safe_improvement_gate(cfg: Config, run_dir: Path, model, ranker, encoder, progress: bool = False) -> dict:
    """Decide and record what a trained run serves (module doc); returns the record written to gate.json."""
    from rpp.agents.evaluate import run_policy
    from rpp.envs import make_core

    from tqdm.auto import tqdm

    k, batch = cfg.env.reward_k, cfg.env.n_envs
    calls_before = ranker.usage.total.calls
    train_core = make_core(cfg, "train", ranker=ranker, encoder=encoder)
    picks = _learner_picks(model, train_core, batch)
    core = make_core(cfg, "val", ranker=ranker, encoder=encoder)
    samples = core.samples[:cfg.train.gate_users] if cfg.train.gate_users else core.samples
    search_samples = train_core.samples[:cfg.train.gate_search_users]  # None: every training user
    taskwise = [core.action_set.index(p, a.id) for p, a in core.builder.taskwise().items()]
    sizes = [int(n) for n in core.nvec]
    starts = [list(s) for s in dict.fromkeys(tuple(s) for s in [taskwise, *picks])]  # distinct, in order
    bar = tqdm(total=len(starts) + sum(n - 1 for n in sizes), unit="prompt", desc="gate: best fixed prompt",
               disable=not progress, leave=False)

    def score(combo: list[int]) -> np.ndarray:
        bar.update(1)
        values, failed = fixed_ndcg(train_core, search_samples, combo, batch, k)
        return np.where(failed, np.nan, values)

    fixed, tried = coordinate_ascent(starts, sizes, score)
    bar.close()
    reference, reference_failed = fixed_ndcg(core, samples, fixed, batch, k)
    records = run_policy(model.policy, core, samples, steps=cfg.eval.steps, batch_size=batch)
    policy = np.array([r["metrics"][f"ndcg@{k}"] for r in records])
    policy_failed = np.array([r["ranker_failed"] for r in records])
    answered = ~(policy_failed | reference_failed)
    diffs = policy[answered] - reference[answered]
    lcb = lower_bound(diffs, cfg.train.gate_alpha)
    served = "policy" if lcb > 0 else "fixed"
    level = f"{1 - cfg.train.gate_alpha:.0%}"
    if not len(diffs):
        reason = "no validation user was answered"
    elif served == "policy":
        reason = (f"policy beats the best fixed prompt on {len(diffs)} validation users: {diffs.mean():+.4f} "
                  f"NDCG@{k}, {level} lower bound {lcb:+.4f} > 0")
    else:
        reason = (f"policy does not beat the best fixed prompt with confidence on {len(diffs)} validation users: "
                  f"{diffs.mean():+.4f} NDCG@{k}, {level} lower bound {lcb:+.4f} <= 0")
    distinct = len({tuple(r["action_indices"]) for r in records})
    gate = {
        "served": served,
        "reason": reason,
        "fixed_indices": [int(i) for i in fixed],
        "fixed_actions": {p: core.action_set.action(p, int(i)).id for p, i in zip(PATTERNS, fixed)},
        "fixed_prompts_tried": len(tried),
        "learner_pick": {p: core.action_set.action(p, int(i)).id for p, i in zip(PATTERNS, picks[0])},
        "starts": [{p: core.action_set.action(p, int(i)).id for p, i in zip(PATTERNS, s)} for s in starts],
        "split": "val",
        "search_split": "train",
        "search_users": int(len(search_samples)),
        "n_users": int(len(samples)),
        "n_answered": int(answered.sum()),
        "failed_users": int((~answered).sum()),
        "metric": f"ndcg@{k}",
        "policy_ndcg": float(policy[answered].mean()) if answered.any() else None,
        "fixed_ndcg": float(reference[answered].mean()) if answered.any() else None,
        "mean_diff": float(diffs.mean()) if len(diffs) else None,
        "lower_bound": lcb if math.isfinite(lcb) else None,
        "alpha": cfg.train.gate_alpha,
        "policy_distinct_prompts": distinct,
        "llm_calls": int(ranker.usage.total.calls - calls_before),
        "timesteps": int(model.num_timesteps),
    }
    atomic_write_text(Path(run_dir) / GATE_FILE, json.dumps(gate, indent=2) + "\n")
    return gate
