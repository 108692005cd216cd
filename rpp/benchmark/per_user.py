"""How much is a per-user prompt choice worth on this ranker, with no policy at all?

``per_user_select`` (a reference, not a learner): for each test user, K candidate prompts (the task-wise one plus
K - 1 seeded combinations, ``benchmark.per_user_prompts``) are scored on that user's OWN last history item (the
history before it, its own seeded negatives: ``BenchContext.history_holdout``); the best one (ties to the earlier,
so to the task-wise prompt) then ranks the user's test candidates. K + 1 ranker calls per user, no training, the
test target never read. A 1-call policy that personalizes should approach it.

``label_oracle`` (an UPPER BOUND, never a method): the best of the same K prompts for each user chosen WITH the
test label. It bounds what choosing among these prompts per user could ever give; the report marks its family
"upper_bound" and no test is run against it as if it were a competitor.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rpp.benchmark.methods import BenchContext, Method, chosen_actions, prompt_combinations
from rpp.data import UserSample
from rpp.llm.base import Ranking
from rpp.metrics import ndcg_at_k, target_rank


class _PromptSet(Method):
    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str) -> None:
        super().__init__(ctx, name)
        self.combos = prompt_combinations(ctx.builder, ctx.cfg.benchmark.per_user_prompts, ctx.seed)
        self.picked: list[int] = []

    def _best(self, samples: Sequence[UserSample], rankings: Sequence[Ranking]) -> list[int]:
        """Index of the best combination per user; rankings are combination-major (all users of combo 0 ...)."""
        n = len(samples)
        ndcg = np.array([[ndcg_at_k([target_rank(rankings[k * n + i].order, s.target_index)], 10)[0]
                          for i, s in enumerate(samples)] for k in range(len(self.combos))])
        return [int(i) for i in ndcg.argmax(axis=0)]  # argmax takes the first of ties: the task-wise prompt

    def notes(self) -> str:
        counts = np.bincount(self.picked, minlength=len(self.combos)) if self.picked else []
        described = "; ".join(
            f"{', '.join(f'{p}={a.id}' for p, a in chosen_actions(self.ctx.builder, c).items())}: {int(n)} users"
            for c, n in zip(self.combos, counts) if n)
        return f"best of {len(self.combos)} prompts per user ({described})"


class PerUserSelectMethod(_PromptSet):
    family = "reference"

    def __init__(self, ctx: BenchContext, name: str = "per_user_select") -> None:
        super().__init__(ctx, name)

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        holdouts = [self.ctx.history_holdout(u, tag="per-user-select") for u in users]
        rankings = self.ctx.rank_samples([h for _ in self.combos for h in holdouts],
                                         [chosen_actions(self.ctx.builder, c) for c in self.combos for _ in holdouts])
        self.picked = self._best(holdouts, rankings)
        return self.ctx.rank_prompts(users, [chosen_actions(self.ctx.builder, self.combos[k]) for k in self.picked])

    def notes(self) -> str:
        return "chosen on each user's own last history item; " + super().notes()


class LabelOracleMethod(_PromptSet):
    family = "upper_bound"

    def __init__(self, ctx: BenchContext, name: str = "label_oracle") -> None:
        super().__init__(ctx, name)

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        rankings = self.ctx.rank_prompts([u for _ in self.combos for u in users],
                                         [chosen_actions(self.ctx.builder, c) for c in self.combos for _ in users])
        self.picked = self._best(users, rankings)  # reads the TEST label: an upper bound, not a method
        n = len(users)
        return [rankings[k * n + i] for i, k in enumerate(self.picked)]

    def notes(self) -> str:
        return "UPPER BOUND, reads the test label; " + super().notes()
