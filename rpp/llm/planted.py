"""The planted-interaction ranker: a known user-by-action interaction in place of an LLM (llm.backend: planted).

A learner that cannot find a planted rule cannot find a real one, and on the real ranker nobody knows the answer.
This ranker knows it: users fall into groups by an observable feature of their history, each group has its own
best action for some agents, and the rank of the held-out target follows a quality score (the rule is documented
on rpp.config.PlantedConfig). It is deterministic and seeded, makes no model call and needs no cache, so a full
training run costs seconds of ranking and only the learner is being judged.

It reads what a real ranker never sees: the user id and the chosen action ids from ``RankRequest.tags`` (the
environment fills them) and the target from the split it was built on, or, for a history-holdout episode, the
target slot and episode key that ``BenchContext.rank_samples`` adds to the tags (each such episode draws its own
noise; the user's group and best actions stay the user's). Requests without those tags (e.g. hand-made
prompts) are refused with a clear error rather than ranked at random.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Sequence

import numpy as np

from rpp.config import Config, PlantedConfig
from rpp.llm.base import Ranker, Ranking, RankRequest
from rpp.metrics import ndcg_at_k
from rpp.prompts import PATTERNS


class PlantedRequestError(ValueError):
    """The request lacks what the planted ranker needs (user and action tags, a candidate list of the split)."""


def user_groups(samples: Sequence, dataset, n_groups: int, feature: str) -> dict:
    """user -> group index in [0, n_groups), from an observable feature of the user's HISTORY (never the target),
    or from a hash of the user id (feature user_hash: a null rule).

    Categorical features (genre, recent_genre): the users' values are dealt to groups largest first, each to the
    group with the fewest users so far, so groups come out about equally large. Numeric ones (history_length and
    the rating statistics): quantile buckets of the value over these samples."""
    if n_groups == 1:
        return {s.user: 0 for s in samples}
    if feature == "user_hash":
        return {s.user: _stable(("group", s.user)) % n_groups for s in samples}
    from rpp.envs.features import FEATURES, UserFeatures
    from rpp.prompts import UserContext

    if feature not in FEATURES:
        raise PlantedRequestError(f"planted feature {feature!r} is not one of {', '.join(FEATURES)} or user_hash")
    reader = UserFeatures([], dim=8)
    values = {s.user: reader.value(UserContext.from_sample(s, dataset), feature) for s in samples}
    if feature in ("genre", "recent_genre"):
        missing = [u for u, v in values.items() if v is None]
        if missing:
            raise PlantedRequestError(f"user {missing[0]!r} has no genres in the history; the planted rule's "
                                      f"feature {feature!r} needs a dataset with genres (use history_length)")
        sizes = Counter(values.values())
        load = [0] * n_groups
        group_of = {}
        for value, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
            g = int(np.argmin(load))
            group_of[value] = g
            load[g] += size
        return {user: group_of[value] for user, value in values.items()}
    numbers = np.array([values[s.user] for s in samples], dtype=float)
    if np.isnan(numbers).all():
        raise PlantedRequestError(f"planted feature {feature!r}: no user has ratings in this dataset")
    edges = np.nanquantile(numbers, np.linspace(0, 1, n_groups + 1)[1:-1])
    return {s.user: int(np.searchsorted(edges, v, side="right")) if not np.isnan(v) else 0
            for s, v in zip(samples, numbers)}


class PlantedRanker(Ranker):
    """Ranks by the planted rule; see the module doc. Build it with ``from_config(cfg)`` (the run's own dataset,
    split and action set) or directly from samples (tests)."""

    def __init__(self, samples: Sequence, dataset, action_set, rule: PlantedConfig, seed: int = 0) -> None:
        super().__init__()
        self.rule = rule
        self.seed = int(seed)
        self.action_set = action_set
        self.by_user = {s.user: s for s in samples}
        self.group = user_groups(list(self.by_user.values()), dataset, rule.groups, rule.feature)
        rng = np.random.default_rng([self.seed, 0x91A7])
        # each group's best action per agent: distinct across groups while the set has enough actions
        self.best: list[dict[str, str]] = [{} for _ in range(rule.groups)]
        for p in rule.agents:
            ids = [a.id for a in action_set.actions[p]]
            picks = rng.permutation(len(ids))
            for g in range(rule.groups):
                self.best[g][p] = ids[picks[g % len(ids)]]
        if rule.main_low > rule.main_high:
            raise ValueError(f"llm.planted: main_low {rule.main_low} > main_high {rule.main_high}")
        self.main = {u: float(np.random.default_rng([self.seed, _stable(u), 1]).uniform(rule.main_low,
                                                                                         rule.main_high))
                     for u in self.by_user}

    @classmethod
    def from_config(cls, cfg: Config) -> "PlantedRanker":
        from rpp.data import load_dataset, split_users
        from rpp.prompts import load_action_set

        dataset = load_dataset(cfg.data)
        split = split_users(dataset, cfg.data, cfg.seed)
        return cls(split.train + split.val + split.test, dataset, load_action_set(cfg.prompt.action_spaces),
                   cfg.llm.planted, seed=cfg.llm.seed)

    @property
    def identity(self) -> str:
        return "planted:" + json.dumps(self.rule.model_dump(), sort_keys=True) + f":{self.seed}"

    # ------------------------------------------------------------------ the rule

    def optimal_actions(self, user) -> dict[str, str]:
        """The best action id of each agent that matters, for this user's group."""
        return dict(self.best[self.group[user]])

    def quality(self, user, actions: dict[str, str], noise: bool = True, episode=None) -> float:
        """`episode`: a history-holdout episode key (its history length) drawing its own noise; None for the
        split's episode."""
        best = self.best[self.group[user]]
        hits = [actions.get(p) == best[p] for p in self.rule.agents]
        match = float(all(hits)) if self.rule.interaction == "joint" else float(np.mean(hits))
        q = self.main[user] + self.rule.effect * match
        if noise and self.rule.noise > 0:
            key = json.dumps(sorted(actions.items())) + ("" if episode is None else f"|{episode}")
            q += self.rule.noise * np.random.default_rng([self.seed, _stable(user), _stable(key)]).standard_normal()
        return float(np.clip(q, 0.0, 1.0))

    def target_rank(self, quality: float, n_candidates: int) -> int:
        """1-based position of the target (1 = first)."""
        return 1 + int(round((1.0 - quality) * (n_candidates - 1)))

    def ndcg(self, user, actions: dict[str, str], k: int = 10, noise: bool = True) -> float:
        """The NDCG@k this user gets with these actions (what the environment will measure)."""
        n = len(self.by_user[user].candidates)
        return float(ndcg_at_k([self.target_rank(self.quality(user, actions, noise), n) - 1], k)[0])  # 0-based

    # ------------------------------------------------------------------ Ranker API

    def rank(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        out = []
        for req in requests:
            user, actions = req.tags.get("user"), req.tags.get("actions")
            if user is None or not actions:
                raise PlantedRequestError("the planted ranker needs requests made by the rpp environment "
                                          "(RankRequest.tags with 'user' and 'actions'); it cannot rank a bare prompt")
            sample = self.by_user.get(user)
            if sample is None:
                raise PlantedRequestError(f"user {user!r} is not in the split the planted ranker was built on")
            if len(req.candidates) != len(sample.candidates):
                raise PlantedRequestError(f"user {user!r}: {len(req.candidates)} candidates, the split has "
                                          f"{len(sample.candidates)}")
            missing = set(PATTERNS) - set(actions)
            if missing:
                raise PlantedRequestError(f"tags['actions'] lacks {sorted(missing)}")
            # a history-holdout request (BenchContext.rank_samples) names its own target slot and episode
            slot = int(req.tags.get("target_index", sample.target_index))
            rank = self.target_rank(self.quality(user, actions, episode=req.tags.get("episode")), len(req.candidates))
            others = [i for i in range(len(req.candidates)) if i != slot]
            order = others[:rank - 1] + [slot] + others[rank - 1:]
            scores = [0.0] * len(order)
            for pos, idx in enumerate(order):
                scores[idx] = float(-pos)
            out.append(Ranking(order=order, scores=scores))
        self.usage.record(out)
        return out


def _stable(value) -> int:
    """A process-independent 64-bit integer for any value (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little")
