"""Leave-last-out split into disjoint train / val / test users, and candidate lists.

For each user, interactions are sorted by time (ties keep file order); the last one is the held-out target and
the earlier ones, oldest first, are the history. Users whose history is shorter than ``min_history`` are dropped
(and counted). The remaining users are shuffled with the config seed and cut into disjoint train / val / test sets.

Candidates: the target plus ``n_candidates - 1`` items the user never interacted with, drawn uniformly or by
popularity, with the target at a uniformly random slot. Each user's draws come from a generator seeded by
(seed, user id), so a user's candidates do not depend on which other users exist or in what order they are processed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from rpp.config import DataConfig
from rpp.data.dataset import DataError, Dataset


@dataclass(frozen=True)
class UserSample:
    """One user's episode material: history, held-out target and the candidates in presented order."""

    user: object
    history: tuple
    """Item ids, oldest first."""
    history_ratings: tuple
    """Ratings aligned with history (NaN where the dataset has none)."""
    target: object
    candidates: tuple
    """Item ids in presented order; exactly one of them is the target."""
    target_index: int
    """Slot of the target in `candidates`."""


@dataclass
class Split:
    train: list[UserSample]
    val: list[UserSample]
    test: list[UserSample]
    dropped_users: int
    """Users with fewer than min_history history items."""
    eligible_users: int
    train_interactions: pd.DataFrame = field(repr=False)
    """All interactions except every user's held-out last one: what classic recommenders may train on."""

    def users(self, name: str) -> list[UserSample]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split '{name}' (train, val or test)")
        return getattr(self, name)


def user_seed(seed: int, user) -> list[int]:
    """A seed sequence for one user, stable across runs, machines and processing order."""
    digest = hashlib.sha256(repr(user).encode()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def sample_candidates(
    user, seen: set, target, item_ids: np.ndarray, popularity: Optional[np.ndarray],
    n_candidates: int, seed: int,
) -> tuple[tuple, int]:
    """The target plus unseen negatives, shuffled into a seeded order. Returns (candidates, target_index)."""
    rng = np.random.default_rng(user_seed(seed, user))
    eligible_mask = np.fromiter((i not in seen for i in item_ids), dtype=bool, count=len(item_ids))
    eligible = item_ids[eligible_mask]
    n_neg = n_candidates - 1
    if len(eligible) < n_neg:
        raise DataError(f"user {user!r}: only {len(eligible)} unseen items, {n_neg} negatives needed "
                        f"(lower data.n_candidates)")
    if popularity is None:
        negatives = rng.choice(eligible, size=n_neg, replace=False)
    else:
        weights = popularity[eligible_mask].astype(np.float64) + 1.0  # +1: never-seen items stay possible
        negatives = rng.choice(eligible, size=n_neg, replace=False, p=weights / weights.sum())
    slot = int(rng.integers(n_candidates))
    cands = list(negatives.tolist())
    cands.insert(slot, target)
    return tuple(cands), slot


def split_users(dataset: Dataset, cfg: DataConfig, seed: int) -> Split:
    """Leave-last-out split with disjoint, seeded train / val / test users and their candidate lists."""
    inter = dataset.interactions.reset_index(drop=True)
    inter = inter.assign(_row=np.arange(len(inter))).sort_values(["user", "timestamp", "_row"], kind="stable")
    groups = {u: g for u, g in inter.groupby("user", sort=True)}
    eligible = [u for u, g in groups.items() if len(g) - 1 >= cfg.min_history]
    dropped = len(groups) - len(eligible)
    wanted = cfg.n_train_users + cfg.n_val_users + cfg.n_test_users
    if wanted > len(eligible):
        raise DataError(
            f"{dataset.name}: {len(eligible)} users have >= {cfg.min_history} history items, but "
            f"n_train_users + n_val_users + n_test_users = {wanted}; lower them or data.min_history"
        )
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(eligible))
    chosen = [eligible[i] for i in order[:wanted]]

    # Sorted so that a user's negatives do not depend on the row order of the items file.
    item_ids = np.sort(dataset.items["item"].to_numpy())
    popularity = None
    last_rows = inter.groupby("user", sort=False).tail(1)["_row"]
    train_inter = inter[~inter["_row"].isin(set(last_rows.tolist()))].drop(columns="_row")
    if cfg.negatives == "popularity":
        counts = train_inter["item"].value_counts()
        popularity = np.array([counts.get(i, 0) for i in item_ids], dtype=np.float64)

    samples = []
    for user in chosen:
        g = groups[user]
        items = g["item"].tolist()
        ratings = g["rating"].tolist()
        target = items[-1]
        cands, slot = sample_candidates(user, set(items), target, item_ids, popularity, cfg.n_candidates, seed)
        samples.append(UserSample(user=user, history=tuple(items[:-1]), history_ratings=tuple(ratings[:-1]),
                                  target=target, candidates=cands, target_index=slot))
    a, b = cfg.n_train_users, cfg.n_train_users + cfg.n_val_users
    return Split(train=samples[:a], val=samples[a:b], test=samples[b:], dropped_users=dropped,
                 eligible_users=len(eligible), train_interactions=train_inter.reset_index(drop=True))


def dataset_stats(dataset: Dataset, split: Split) -> dict:
    """Numbers for `rpp data stats`."""
    per_user = dataset.interactions.groupby("user").size()
    q = per_user.quantile([0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
    pop = split.train_interactions["item"].value_counts()
    rank_of = {item: r for r, item in enumerate(pop.index.tolist())}
    target_pop_ranks = [rank_of.get(s.target, len(rank_of)) for s in split.train + split.val + split.test]
    return {
        "dataset": dataset.name,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "interactions": len(dataset.interactions),
        "interactions_per_user": {"min": q[0], "p25": q[1], "median": q[2], "p75": q[3], "max": q[4]},
        "eligible_users": split.eligible_users,
        "dropped_users": split.dropped_users,
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "target_popularity_rank": {
            "median": float(np.median(target_pop_ranks)) if target_pop_ranks else float("nan"),
            "share_in_top_100": float(np.mean([r < 100 for r in target_pop_ranks])) if target_pop_ranks else 0.0,
        },
    }
