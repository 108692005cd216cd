"""Classic (non-LLM) rankers over the same candidate lists: popularity, BPR-MF and a seeded random floor.

They answer the question every LLM-ranking number must face: does the LLM beat what the training interactions
alone give? With uniformly random negatives, popularity is a strong baseline (LLMRank reports it on ML-1M), so it
is always worth a row. All three only reorder each user's candidate list; none of them ever sees a target,
because ``Split.train_interactions`` leaves out every user's held-out last interaction.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from rpp.data import UserSample
from rpp.data.split import user_seed
from rpp.llm.parsing import order_from_scores


class PopularityScorer:
    """Score = number of training interactions of the item (items never seen in training score 0)."""

    def __init__(self, train_interactions: pd.DataFrame) -> None:
        if train_interactions.empty:
            raise ValueError("popularity needs training interactions, got an empty frame")
        self.counts = train_interactions["item"].value_counts().to_dict()

    def rank(self, users: Sequence[UserSample]) -> list[list[int]]:
        return [order_from_scores([self.counts.get(i, 0) for i in u.candidates]) for u in users]


class BPRScorer:
    """BPR-MF from `implicit`, fitted on the training interactions; score = user factor . item factor.

    ``num_threads=1`` on purpose: implicit's multi-threaded BPR updates factors hogwild-style, so its result
    depends on thread timing; with one thread the seeded fit is bit-for-bit reproducible (the benchmark's
    two-runs-one-table guarantee). The GPU path is never used for the same reason.
    """

    def __init__(self, train_interactions: pd.DataFrame, factors: int, iterations: int, seed: int,
                 learning_rate: float = 0.01, regularization: float = 0.01) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        from scipy.sparse import csr_matrix

        if train_interactions.empty:
            raise ValueError("BPR needs training interactions, got an empty frame")
        users = pd.Index(pd.unique(train_interactions["user"]))
        items = pd.Index(pd.unique(train_interactions["item"]))
        rows = users.get_indexer(train_interactions["user"])
        cols = items.get_indexer(train_interactions["item"])
        # Implicit feedback: any interaction is a positive; duplicates collapse to 1.
        matrix = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(items)))
        matrix.data[:] = 1.0
        self.model = BayesianPersonalizedRanking(
            factors=factors, iterations=iterations, learning_rate=learning_rate, regularization=regularization,
            num_threads=1, random_state=int(seed),
        )
        self.model.fit(matrix, show_progress=False)
        self._user_row = {u: i for i, u in enumerate(users.tolist())}
        self._item_col = {it: j for j, it in enumerate(items.tolist())}
        self.user_factors = np.asarray(self.model.user_factors)
        self.item_factors = np.asarray(self.model.item_factors)

    def scores(self, user: UserSample) -> np.ndarray:
        """Scores of the user's candidates in presented order. A candidate without training interactions has no
        learned factor: it gets -inf (ranked last, in presented order), which is what a deployed MF model would
        do with an unknown item. A user without training interactions cannot be scored at all: error."""
        row = self._user_row.get(user.user)
        if row is None:
            raise ValueError(f"user {user.user!r} has no training interactions; BPR cannot score them")
        u = self.user_factors[row]
        out = np.full(len(user.candidates), -np.inf)
        for k, item in enumerate(user.candidates):
            col = self._item_col.get(item)
            if col is not None:
                out[k] = float(self.item_factors[col] @ u)
        return out

    def rank(self, users: Sequence[UserSample]) -> list[list[int]]:
        return [order_from_scores(self.scores(u)) for u in users]


def random_orders(users: Sequence[UserSample], seed: int) -> list[list[int]]:
    """A uniformly random permutation per user, from a generator seeded by (seed, user): a user's order does not
    depend on which other users are ranked or in what order (so a subset run agrees with the full run)."""
    out = []
    for u in users:
        rng = np.random.default_rng(user_seed(seed, ("random-ranking", u.user)))
        out.append(rng.permutation(len(u.candidates)).tolist())
    return out
