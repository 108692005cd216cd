"""The methods a benchmark compares, behind one small protocol, and the registry that names them.

A method is a class with ``fit()`` (optional: tune on the validation users or train on the training interactions
the context hands it) and ``rank(users) -> rankings`` (one ``Ranking`` or one list of candidate indices, best first,
per user). Everything a method may learn from lives in its ``BenchContext``: the validation users it may tune on and
the training interactions, never the test users. The runner is the only code that sees test users, and it gives
them to ``rank`` only after ``fit`` has returned. New optimizers (PAP-REC- or AGP-style) join by registering a
factory under a name; nothing else changes.

LLM methods never call the ranker once per user: ``BenchContext.rank_prompts`` builds all prompts of a chunk of
users and sends them in ONE ``ranker.rank`` call.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from rpp.config import Config
from rpp.data import Dataset, UserSample
from rpp.data.split import user_seed
from rpp.llm.base import Ranker, Ranking
from rpp.metrics import ndcg_at_k, target_rank
from rpp.prompts.actions import PATTERNS

RankOutput = Union[Ranking, Sequence[int]]

CHUNK_USERS = 64
"""Users per ranker.rank call. The local backend batches inside a call by llm.batch_size; chunking only bounds
memory and gives progress output on long runs."""


class BenchmarkError(ValueError):
    """A benchmark that cannot be run as configured; the message says what to change."""


# ---------------------------------------------------------------------------------------------- context


@dataclass
class BenchContext:
    """What methods may use. Deliberately holds no test users.

    `fit_users` are validation users (the first ``benchmark.enumeration_val_users`` of the split's val set): every
    method that chooses anything (a prompt combination, the best task-wise prompt) chooses it on them.
    The ranker is created on first use, so a benchmark of classic methods never loads a model.
    """

    cfg: Config
    dataset: Dataset
    fit_users: list
    train_interactions: pd.DataFrame = field(repr=False)
    ranker_factory: Optional[Callable[[], Ranker]] = field(default=None, repr=False)
    train_users: list = field(default_factory=list, repr=False)
    """The split's training users (disjoint from validation and test users): what PAP-REC and AGP train on."""
    _ranker: Optional[Ranker] = field(default=None, init=False, repr=False)
    _builder: object = field(default=None, init=False, repr=False)
    _encoder: object = field(default=None, init=False, repr=False)
    _contexts: dict = field(default_factory=dict, init=False, repr=False)
    _negatives: Optional[tuple] = field(default=None, init=False, repr=False)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def ranker(self) -> Ranker:
        if self._ranker is None:
            if self.ranker_factory is None:
                raise BenchmarkError("this benchmark has no ranker (an LLM method was asked for without one)")
            self._ranker = self.ranker_factory()
        return self._ranker

    @property
    def has_ranker(self) -> bool:
        return self._ranker is not None

    @property
    def builder(self):
        """The PromptBuilder every LLM method shares (same action set, prompt settings and ranking mode)."""
        if self._builder is None:
            from rpp.prompts import PromptBuilder, load_action_set

            action_set = load_action_set(self.cfg.prompt.action_spaces)
            self._builder = PromptBuilder(action_set, self.cfg.prompt, self.dataset.item_noun, mode=self.cfg.llm.mode)
        return self._builder

    @property
    def encoder(self):
        """The state encoder shared by the random and trained policies' step cores (loaded once)."""
        if self._encoder is None:
            from rpp.envs import StateEncoder

            self._encoder = StateEncoder(self.cfg.encoder)
        return self._encoder

    def user_context(self, sample: UserSample):
        from rpp.prompts import UserContext

        ctx = self._contexts.get(sample.user)
        if ctx is None:
            ctx = self._contexts[sample.user] = UserContext.from_sample(sample, self.dataset)
        return ctx

    def history_holdout(self, user: UserSample, n_history: Optional[int] = None, tag: str = "holdout") -> UserSample:
        """A pseudo-episode from the user's own HISTORY: history[:n_history] as the history, history item
        n_history as the target (default: the last history item), and seeded negatives the user never
        interacted with in the history (drawn like the split's, keyed by (user, tag, n_history)). The test
        target is never read. What per-user choices (PAP-REC, the per-user prompt reference) validate on."""
        from rpp.data.split import sample_candidates

        n = len(user.history) - 1 if n_history is None else int(n_history)
        if not 1 <= n < len(user.history):
            raise BenchmarkError(f"user {user.user!r}: cannot hold out history item {n} of {len(user.history)}")
        if self._negatives is None:
            item_ids = np.sort(self.dataset.items["item"].to_numpy())
            popularity = None
            if self.cfg.data.negatives == "popularity":
                counts = self.train_interactions["item"].value_counts()
                popularity = np.array([counts.get(i, 0) for i in item_ids], dtype=np.float64)
            self._negatives = (item_ids, popularity)
        item_ids, popularity = self._negatives
        target = user.history[n]
        cands, slot = sample_candidates((user.user, tag, n), set(user.history), target, item_ids, popularity,
                                        self.cfg.data.n_candidates, self.seed)
        return UserSample(user=user.user, history=tuple(user.history[:n]),
                          history_ratings=tuple(user.history_ratings[:n]), target=target, candidates=cands,
                          target_index=slot)

    def rank_samples(self, samples: Sequence[UserSample], chosen: Sequence[dict]) -> list[Ranking]:
        """Like rank_prompts, for samples that are not the split's (history holdouts): their contexts are built
        from the sample itself, never from the per-user context cache."""
        from rpp.prompts import UserContext

        if len(chosen) != len(samples):
            raise ValueError(f"{len(chosen)} prompt choices for {len(samples)} samples")

        def request(i: int):
            req = self.builder.request(UserContext.from_sample(samples[i], self.dataset), chosen[i])[1]
            # for instrumented rankers only (rpp.llm.planted): this episode's target slot and history length
            req.tags.update(target_index=samples[i].target_index, episode=len(samples[i].history))
            return req

        return self._rank_in_chunks(len(samples), request, desc="ranking holdouts", unit="sample")

    def rank_prompts(self, users: Sequence[UserSample], chosen: Sequence[dict],
                     refined: Optional[Sequence[Optional[dict]]] = None) -> list[Ranking]:
        """Rank every user's candidates under their own prompt (chosen actions [+ sentence texts]), one ranker
        call per chunk of CHUNK_USERS users."""
        if len(chosen) != len(users):
            raise ValueError(f"{len(chosen)} prompt choices for {len(users)} users")
        refined = list(refined) if refined is not None else [None] * len(users)
        return self._rank_in_chunks(
            len(users), lambda i: self.builder.request(self.user_context(users[i]), chosen[i], refined[i])[1],
            desc="ranking", unit="user")

    def _rank_in_chunks(self, n: int, request_of, desc: str, unit: str) -> list[Ranking]:
        """Requests 0..n-1 (request_of(i) builds one), one ranker call per chunk of CHUNK_USERS, with a progress
        bar when there is more than one chunk."""
        from tqdm.auto import tqdm

        out: list[Ranking] = []
        bar = tqdm(total=n, unit=unit, desc=desc, leave=False)  # every phase shows its rate (requests/s)
        for start in range(0, n, CHUNK_USERS):
            requests = [request_of(i) for i in range(start, min(start + CHUNK_USERS, n))]
            rankings = self.ranker.rank(requests)
            if len(rankings) != len(requests):
                raise RuntimeError(f"ranker returned {len(rankings)} rankings for {len(requests)} requests")
            out.extend(rankings)
            bar.update(len(requests))
        bar.close()
        return out


def ranks_of(users: Sequence[UserSample], rankings: Sequence[RankOutput]) -> np.ndarray:
    """0-based target ranks, after checking that every ranking is a permutation of the user's candidates."""
    if len(rankings) != len(users):
        raise BenchmarkError(f"a method returned {len(rankings)} rankings for {len(users)} users")
    out = np.empty(len(users), dtype=np.int64)
    for i, (u, r) in enumerate(zip(users, rankings)):
        order = list(r.order) if isinstance(r, Ranking) else [int(x) for x in r]
        if sorted(order) != list(range(len(u.candidates))):
            raise BenchmarkError(f"user {u.user!r}: ranking {order} is not a permutation of "
                                 f"0..{len(u.candidates) - 1}")
        out[i] = target_rank(order, u.target_index)
    return out


def mean_ndcg10(users: Sequence[UserSample], rankings: Sequence[RankOutput]) -> float:
    return float(ndcg_at_k(ranks_of(users, rankings), 10).mean())


# ---------------------------------------------------------------------------------------------- protocol


class Method:
    """Base class. Subclasses set `family` and implement `rank`; `fit` is optional.

    family: "taskwise" (fixed prompts; the best of them on validation users is the reference every method is
    tested against), "optimizer" (chooses prompts on validation users), "policy" (per-user prompts), "classic",
    "floor".
    """

    family = "other"
    uses_llm = False

    def __init__(self, ctx: BenchContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.val_ndcg10: Optional[float] = None
        """Mean NDCG@10 on the context's fit users, where the method measured it (task-wise prompts, enumeration)."""

    def fit(self) -> None:
        """Learn from ctx.fit_users / ctx.train_interactions. Default: nothing to learn."""

    def rank(self, users: Sequence[UserSample]) -> list[RankOutput]:  # pragma: no cover - abstract
        raise NotImplementedError

    def notes(self) -> str:
        """One line for the report: what was chosen or how the method was configured."""
        return ""

    def training_usage(self) -> Optional[dict]:
        """LLM usage spent before this benchmark (a trained policy's training run); None when there was none."""
        return None

    def refiner_stats(self) -> Optional[dict]:
        """RPP+ methods: the refiner's counts on the test users (rpp.prompts.refiner.Refiner.stats); else None."""
        return None

    def cost(self) -> Optional[dict]:
        """What a method spent outside the benchmark's metered ranker (rpp.benchmark.report.COST_KEYS: its own
        ranking requests, text generations, forward/backward passes), or None when everything went through it."""
        return None


# ---------------------------------------------------------------------------------------------- LLM: fixed prompts


class FixedPromptMethod(Method):
    """One prompt for every user: a choice of the four actions, optionally with fixed sentence texts in place of
    some actions' texts (placeholders such as {last_item} are filled per user by the builder).

    fit() scores the prompt on the validation users: that is what choosing "the best task-wise prompt" honestly
    costs, and it is counted as this method's training usage.
    """

    family = "taskwise"
    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str, chosen: Optional[dict] = None,
                 texts: Optional[dict] = None, description: str = "") -> None:
        super().__init__(ctx, name)
        self._chosen = chosen
        self.texts = dict(texts or {})
        self.val_ranks: Optional[np.ndarray] = None
        self.val_failed: Optional[np.ndarray] = None
        self.description = description

    @property
    def chosen(self) -> dict:
        if self._chosen is None:
            self._chosen = self.ctx.builder.taskwise()
        return self._chosen

    def fit(self) -> None:
        users = self.ctx.fit_users
        if not users:
            raise BenchmarkError(f"{self.name}: choosing the best task-wise prompt needs validation users "
                                 f"(data.n_val_users > 0)")
        rankings = self.rank(users)
        self.val_ranks = ranks_of(users, rankings)
        self.val_failed = np.array([bool(getattr(r, "failed", False)) for r in rankings], dtype=bool)
        """Per validation user: did the request fail (the ranker check judges answered requests only)."""
        self.val_ndcg10 = float(ndcg_at_k(self.val_ranks, 10).mean())

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        refined = self.texts or None
        return self.ctx.rank_prompts(users, [self.chosen] * len(users), [refined] * len(users))

    def notes(self) -> str:
        ids = ", ".join(f"{p}={self.chosen[p].id}" + (" (own text)" if p in self.texts else "")
                        for p in PATTERNS)
        extra = f"; {self.description}" if self.description else ""
        return f"actions {ids}{extra}"


# Three LLMRank-style prompts (Hou et al. 2024), in our own words. Each keeps the task-wise actions (so the
# history window and layout stay the same) and replaces one or two sentences; {placeholders} are filled per user.
LLMRANK_PROMPTS = {
    "llmrank_sequential": (
        {"history": "This user chose these {n_history} {item_noun_plural} one after another, in this order "
                    "(oldest first):",
         "reasoning": "Treat the list as a sequence and pick the {item_noun} that would most naturally come next "
                      "in it."},
        "sequential: the history is presented as an ordered sequence to be continued",
    ),
    "llmrank_recency": (
        {"reasoning": "Note that the user's most recent {item_noun} is {last_item}; weigh it more than the "
                      "older ones when choosing."},
        "recency-focused: names the most recent history item",
    ),
    "llmrank_in_context": (
        {"reasoning": "Here is an example of how this user chooses: after the {item_noun_plural} listed before "
                      "it, the user's next choice was {last_item}, the last one in the list. In the same way, "
                      "decide what the user chooses after {last_item}."},
        "in-context: the last history item is used as a worked example",
    ),
}


# ---------------------------------------------------------------------------------------------- LLM: enumeration


def prompt_combinations(builder, budget: int, seed: int) -> list[tuple[int, ...]]:
    """Up to `budget` action combinations (indices in PATTERNS order), the task-wise one first: all of them when
    there are at most `budget`, else the task-wise one plus a seeded random subset of the others."""
    action_set = builder.action_set
    sizes = action_set.sizes()
    taskwise = builder.taskwise()
    tw = tuple(action_set.index(p, taskwise[p].id) for p in PATTERNS)
    total = int(np.prod(sizes))
    if total <= budget:
        everything = list(itertools.product(*(range(s) for s in sizes)))
        everything.remove(tw)
        return [tw] + everything
    # Sample flat indices (no need to materialize thousands of combinations), excluding the task-wise one.
    strides = np.cumprod([1] + sizes[::-1][:-1])[::-1]
    tw_flat = int(sum(i * s for i, s in zip(tw, strides)))
    rng = np.random.default_rng([int(seed), 0xE7E7])
    pool = np.setdiff1d(np.arange(total), [tw_flat])
    picked = np.sort(rng.choice(pool, size=budget - 1, replace=False))
    combos = [tw]
    for flat in picked.tolist():
        combos.append(tuple(int(flat // s) % n for s, n in zip(strides, sizes)))
    return combos


def chosen_actions(builder, combo: Sequence[int]) -> dict:
    """{pattern: Action} for a combination of action indices in PATTERNS order."""
    return {p: builder.action_set.action(p, int(i)) for p, i in zip(PATTERNS, combo)}


class EnumerationMethod(Method):
    """The best FIXED combination of the four patterns, chosen on validation users, then applied to test users.

    All combinations are tried when there are at most ``benchmark.enumeration_budget`` of them; otherwise a seeded
    random subset of that size, which always includes the task-wise combination (so, on the validation users,
    enumeration is never worse than the default prompt it is meant to improve on). Ties go to the earlier
    combination of the tried list (task-wise first), so the choice is deterministic.
    """

    family = "optimizer"
    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str = "enumeration") -> None:
        super().__init__(ctx, name)
        self.tried: list[tuple[tuple[int, ...], float]] = []
        self.total_combinations = 0
        self.best: Optional[tuple[int, ...]] = None

    def combinations(self) -> list[tuple[int, ...]]:
        """The combinations to try, as action indices in PATTERNS order; task-wise first."""
        self.total_combinations = int(np.prod(self.ctx.builder.action_set.sizes()))
        return prompt_combinations(self.ctx.builder, self.ctx.cfg.benchmark.enumeration_budget, self.ctx.seed)

    def _chosen(self, combo: tuple[int, ...]) -> dict:
        return chosen_actions(self.ctx.builder, combo)

    def fit(self) -> None:
        users = self.ctx.fit_users
        if not users:
            raise BenchmarkError("enumeration needs validation users (data.n_val_users > 0)")
        combos = self.combinations()
        # All (user, combination) prompts of a chunk of users go out together: still one call per chunk.
        pairs = [(u, c) for c in combos for u in users]
        rankings = self.ctx.rank_prompts([u for u, _ in pairs], [self._chosen(c) for _, c in pairs])
        n = len(users)
        self.tried = []
        for k, combo in enumerate(combos):
            self.tried.append((combo, mean_ndcg10(users, rankings[k * n:(k + 1) * n])))
        best_k = int(np.argmax([v for _, v in self.tried]))  # argmax takes the first of ties
        self.best, self.val_ndcg10 = self.tried[best_k]

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        if self.best is None:
            raise BenchmarkError("enumeration.rank() before fit()")
        chosen = self._chosen(self.best)
        return self.ctx.rank_prompts(users, [chosen] * len(users))

    def describe(self, combo: tuple[int, ...]) -> str:
        chosen = self._chosen(combo)
        return ", ".join(f"{p}={chosen[p].id}" for p in PATTERNS)

    def notes(self) -> str:
        if self.best is None:
            return "not fitted"
        return (f"best of {len(self.tried)} / {self.total_combinations} combinations on "
                f"{len(self.ctx.fit_users)} val users: {self.describe(self.best)}")


# ---------------------------------------------------------------------------------------------- LLM: random policy


class RandomPolicyMethod(Method):
    """Uniformly random actions for T steps per user through the same StepCore a trained policy uses (so the
    cost, the refiner if any, and the last-step-counts rule are the same); the LAST step's ranking is reported.

    T = eval.steps, the number of steps a trained policy is evaluated with. Each user's actions come from a
    generator seeded by (seed, user), independent of batching. The core runs with reward_baseline "none": the
    task-wise baseline call is a training-time device and costs nothing at inference.
    """

    family = "policy"
    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str = "random_policy", steps: Optional[int] = None) -> None:
        super().__init__(ctx, name)
        self.steps = int(steps or ctx.cfg.eval.steps)
        self._core = None

    def core(self, users: Sequence[UserSample]):
        from rpp.envs import StepCore

        env_cfg = self.ctx.cfg.env.model_copy(update={"reward_baseline": "none", "steps_per_episode": self.steps})
        if self._core is None:
            self._core = StepCore(self.ctx.dataset, users, self.ctx.builder, self.ctx.encoder,
                                  self.ctx.ranker, env_cfg=env_cfg, encoder_cfg=self.ctx.cfg.encoder,
                                  seed=self.ctx.seed)
        return self._core

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        core = self.core(users)
        nvec = core.nvec
        actions = np.stack([
            np.random.default_rng(user_seed(self.ctx.seed, ("random-policy", u.user))).integers(
                0, nvec, size=(self.steps, len(nvec)))
            for u in users
        ])  # [N, T, 4]
        out: list[Ranking] = []
        for start in range(0, len(users), CHUNK_USERS):
            batch = list(users[start:start + CHUNK_USERS])
            states, _ = core.reset(batch)
            for t in range(self.steps):
                _, _, infos = core.step(states, actions[start:start + len(batch), t])
            for info in infos:  # the last step's ranking counts
                out.append(Ranking(order=list(info["ranking"]), failed=bool(info["ranker_failed"]),
                                   error=info["ranker_error"]))
        return out

    def notes(self) -> str:
        return f"uniform seeded actions, T={self.steps} steps, last step counts"


# ---------------------------------------------------------------------------------------------- trained policies


class TrainedPolicyMethod(Method):
    """A trained four-agent policy from a run directory, acting greedily for `steps` steps per user (the last
    step's ranking counts) on the benchmark's users, candidates and ranker (see rpp.benchmark.policies).

    refine: RPP+, the refiner rewrites the chosen sentences during the episode (the run's own refiner settings
    if it was trained with one, else the benchmark config's `refiner` section)."""

    family = "policy"
    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str, run_dir: str, steps: int, refine: bool = False) -> None:
        super().__init__(ctx, name)
        self.run_dir = run_dir
        self.steps = int(steps)
        self.refine = bool(refine)
        self._training_usage: Optional[dict] = None
        self._refiner_stats: Optional[dict] = None
        self._notes: list[str] = []

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        from rpp.benchmark.policies import evaluate_policy

        rankings, self._notes, self._training_usage, self._refiner_stats = evaluate_policy(
            self.ctx, self.run_dir, users, self.steps, refine=self.refine)
        return rankings

    def training_usage(self) -> Optional[dict]:
        return self._training_usage

    def refiner_stats(self) -> Optional[dict]:
        return self._refiner_stats

    def notes(self) -> str:
        extra = "".join(f"; {n}" for n in self._notes)
        return (f"run {self.run_dir}, greedy, T={self.steps} step{'s' if self.steps != 1 else ''}, last step "
                f"counts{extra}")


# ---------------------------------------------------------------------------------------------- classic


class PopularityMethod(Method):
    """Candidates by their number of training interactions."""

    family = "classic"

    def __init__(self, ctx: BenchContext, name: str = "popularity") -> None:
        super().__init__(ctx, name)
        self.scorer = None

    def fit(self) -> None:
        from rpp.benchmark.classic import PopularityScorer

        self.scorer = PopularityScorer(self.ctx.train_interactions)

    def rank(self, users: Sequence[UserSample]) -> list[list[int]]:
        return self.scorer.rank(users)

    def notes(self) -> str:
        return "training-interaction counts; ties keep the presented order"


class BPRMethod(Method):
    """BPR-MF (implicit) trained on the training interactions; candidates by predicted score."""

    family = "classic"

    def __init__(self, ctx: BenchContext, name: str = "bpr") -> None:
        super().__init__(ctx, name)
        self.scorer = None

    def fit(self) -> None:
        from rpp.benchmark.classic import BPRScorer

        b = self.ctx.cfg.benchmark
        self.scorer = BPRScorer(self.ctx.train_interactions, factors=b.bpr_factors, iterations=b.bpr_iterations,
                                seed=self.ctx.seed)

    def rank(self, users: Sequence[UserSample]) -> list[list[int]]:
        return self.scorer.rank(users)

    def notes(self) -> str:
        b = self.ctx.cfg.benchmark
        return f"implicit BPR, {b.bpr_factors} factors, {b.bpr_iterations} iterations, seed {self.ctx.seed}, 1 thread"


class RandomRankingMethod(Method):
    """A seeded uniformly random permutation per user: the floor (expected NDCG@10 about 0.23 for 20 candidates)."""

    family = "floor"

    def __init__(self, ctx: BenchContext, name: str = "random") -> None:
        super().__init__(ctx, name)

    def rank(self, users: Sequence[UserSample]) -> list[list[int]]:
        from rpp.benchmark.classic import random_orders

        return random_orders(users, self.ctx.seed)

    def notes(self) -> str:
        return f"seeded per user (seed {self.ctx.seed})"


# ---------------------------------------------------------------------------------------------- registry

MethodFactory = Callable[[BenchContext], list]
METHODS: dict[str, MethodFactory] = {}


def register(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Register a factory ``ctx -> list[Method]`` under `name` (a name may stand for several rows, like the three
    LLMRank-style prompts). Registering a name twice is an error, so a plugin cannot silently replace a method."""
    def deco(factory: MethodFactory) -> MethodFactory:
        if name in METHODS:
            raise ValueError(f"benchmark method '{name}' is already registered")
        METHODS[name] = factory
        return factory
    return deco


register("taskwise")(lambda ctx: [FixedPromptMethod(ctx, "taskwise", description="the default combination")])
register("llmrank")(lambda ctx: [FixedPromptMethod(ctx, name, texts=texts, description=desc)
                                 for name, (texts, desc) in LLMRANK_PROMPTS.items()])
register("enumeration")(lambda ctx: [EnumerationMethod(ctx)])
register("random_policy")(lambda ctx: [RandomPolicyMethod(ctx)])
register("popularity")(lambda ctx: [PopularityMethod(ctx)])
register("bpr")(lambda ctx: [BPRMethod(ctx)])
register("random")(lambda ctx: [RandomRankingMethod(ctx)])


def _per_user(kind: str):
    def factory(ctx: BenchContext) -> list:
        from rpp.benchmark.per_user import LabelOracleMethod, PerUserSelectMethod

        return [PerUserSelectMethod(ctx) if kind == "per_user_select" else LabelOracleMethod(ctx)]
    return factory


register("per_user_select")(_per_user("per_user_select"))  # rpp.benchmark.per_user
register("label_oracle")(_per_user("label_oracle"))  # an upper bound that reads the test label, never a method


def _papprec(ctx: BenchContext) -> list:
    from rpp.benchmark.papprec import papprec_methods

    return papprec_methods(ctx)


def _agp(name: str):
    def factory(ctx: BenchContext) -> list:
        from rpp.benchmark.agp import agp_methods

        return agp_methods(ctx, name)
    return factory


register("papprec")(_papprec)  # rows papprec_shared, papprec_personal (rpp.benchmark.papprec)
register("profile_fixed")(_agp("profile_fixed"))  # rpp.benchmark.agp
register("agp")(_agp("agp"))


def policy_methods(ctx: BenchContext, run_dir: str) -> list[Method]:
    """Each trained run is evaluated twice: multi-step (eval.steps) and one-shot (1 step, one call per user).
    A run trained with the refiner is RPP+ in every row; a plain run also gets the RPP+ rows of
    benchmark.rpp_plus_steps (the same agents, with the benchmark's refiner rewriting their sentences)."""
    from pathlib import Path

    from rpp.benchmark.policies import trained_with_refiner as _trained_with_refiner

    label = Path(run_dir).name or str(run_dir)
    trained_with_refiner = _trained_with_refiner(run_dir)
    prefix = "rpp+" if trained_with_refiner else "rpp"
    all_steps = list(dict.fromkeys([ctx.cfg.eval.steps, 1]))
    methods: list[Method] = [TrainedPolicyMethod(ctx, f"{prefix}[{label}] T={t}", run_dir, t,
                                                 refine=trained_with_refiner) for t in all_steps]
    if not trained_with_refiner:
        methods += [TrainedPolicyMethod(ctx, f"rpp+[{label}] T={t}", run_dir, t, refine=True)
                    for t in dict.fromkeys(ctx.cfg.benchmark.rpp_plus_steps)]
    return methods


def build_methods(ctx: BenchContext, names: Sequence[str], runs: Sequence[str] = ()) -> list[Method]:
    """Instantiate the named methods (in the given order) plus two rows per trained run."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise BenchmarkError(f"unknown benchmark method(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(METHODS))})")
    if len(set(names)) != len(names):
        raise BenchmarkError(f"benchmark.methods lists a method twice: {list(names)}")
    methods: list[Method] = []
    for n in names:
        methods.extend(METHODS[n](ctx))
    for run in runs:
        methods.extend(policy_methods(ctx, run))
    seen = set()
    for m in methods:
        if m.name in seen:
            raise BenchmarkError(f"two benchmark rows are named '{m.name}'")
        seen.add(m.name)
    return methods
