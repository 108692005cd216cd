"""The one step core shared by the Gymnasium env, the batched SB3 VecEnv and the PettingZoo ParallelEnv.

``StepCore`` does all the work of an RPP step for N users at once: turn the four chosen action indices into
prompts (with the RPP+ refiner's texts when one is attached), rank every user's candidates in ONE batched ranker
call, score the target's rank, and encode the next observations in one encoder batch. The three env faces only
decide which users are in the batch and how results are packaged, so no step logic exists twice.

Observation (per user): a (C + K, dim) float32 array in [-1, 1], C = ``CONTEXT_ROWS`` (2):
- row 0 embeds the state text (the four current sentences, the recent history, and from step 1 on the top of the
  last ranking): the BERT state of RPP;
- row 1 holds the user's standardized features (genre shares, dominant genres, history length, rating statistics;
  rpp.envs.features) and, in its last slot, the episode step t / T;
- rows C.. embed the candidate titles in the order of the last ranking (the presented order before the first
  step), so a policy sees both the prompt it used and what the LLM made of it (the GRU reads these rows).
The user rows are what let agents tell users apart: the state text of step 0 is nearly the same for everyone.

Reward: NDCG@reward_k of the target in this step's ranking, minus the user's NDCG under the task-wise prompt when
env.reward_baseline == "taskwise". That baseline is one extra ranker call per user, made at reset for all users
being reset in one batch, and cached per user for the life of the core (a user's task-wise ranking never changes).
A step whose ranking failed, or whose user's baseline call failed, earns reward 0 (no signal either way) and is
counted (``StepCore.failed_baselines``, info["baseline_failed"]).

Episodes end after T = env.steps_per_episode steps with terminated=True: the budget of LLM calls is part of the
task, nothing follows the last prompt, so no value is bootstrapped past it (docs/architecture.md, "The RL
formulation").

Also here: ``UserStream`` (the seeded, cycling order in which a split's users are served) and ``SingleUserDriver``
(one user at a time over the core, used by the Gymnasium and PettingZoo faces).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from gymnasium import spaces

from rpp.config import Config, EncoderConfig, EnvConfig
from rpp.data import Dataset, UserSample
from rpp.llm.base import Ranker, Ranking, RankRequest
from rpp.metrics import all_metrics, ndcg_at_k, target_rank
from rpp.prompts import PATTERNS, Action, PromptBuilder, UserContext, load_action_set
from rpp.envs.encoder import ItemEmbeddings, StateEncoder
from rpp.envs.features import UserRows


CONTEXT_ROWS = 2
"""Observation rows before the candidate rows: the state text and the user features (+ step)."""


@dataclass
class EpisodeState:
    """Everything the core remembers about one running user-episode."""

    sample: UserSample
    context: UserContext
    candidate_embeddings: np.ndarray
    """[n_candidates, dim], presented order."""
    baseline: Optional[float]
    """NDCG of the task-wise prompt (0.0 when env.reward_baseline is "none"; None when its call failed: the
    episode then earns no reward)."""
    user_rows: np.ndarray
    """[2, dim]: the numeric user features and the history embedding (observation rows 1 and 2)."""
    chosen: dict
    """pattern -> the Action currently in the prompt (the task-wise choice before the first step)."""
    refined: dict = field(default_factory=dict)
    """pattern -> (action id, refined text): the latest RPP+ refinement, applied only while that action is chosen."""
    last_order: list = field(default_factory=list)
    """Candidate indices of the last ranking, best first (presented order before the first step)."""
    step: int = 0
    sentences: dict = field(default_factory=dict)
    """pattern -> the sentence currently in the prompt (as built; what the state text shows)."""

    def applied_refinements(self) -> dict[str, str]:
        """Refined texts that belong to the currently chosen actions (a refinement of an action the agent has
        since switched away from must not leak into the new action's sentence)."""
        return {p: text for p, (aid, text) in self.refined.items() if self.chosen[p].id == aid}


@dataclass(frozen=True)
class RequestUsage:
    """Per-request usage in step infos. Equality compares what the model produced (token counts) and ignores how
    it was served (wall time, cache hit), so two identical transitions compare equal in determinism checks."""

    prompt_tokens: int
    completion_tokens: int
    wall_s: float = field(compare=False)
    cached: bool = field(compare=False)


@dataclass
class StepTimings:
    """Running totals for the framework-overhead benchmark (experiments/bench_env.py)."""

    steps: int = 0
    step_s: float = 0.0
    ranker_s: float = 0.0
    encode_s: float = 0.0
    """State-text encoding inside steps (part of the overhead)."""
    resets: int = 0
    reset_s: float = 0.0
    reset_ranker_s: float = 0.0


class StepCore:
    """Batched reset/step over N user-episodes; see the module docstring. Holds no episode state itself: callers
    keep the list of EpisodeState objects, so one core can serve a VecEnv and several single envs at once."""

    def __init__(self, dataset: Dataset, samples: Sequence[UserSample], builder: PromptBuilder,
                 encoder: StateEncoder, ranker: Ranker, env_cfg: EnvConfig | None = None,
                 encoder_cfg: EncoderConfig | None = None, seed: int = 0, refiner=None) -> None:
        if not samples:
            raise ValueError("StepCore needs at least one user sample (is the split empty?)")
        self.dataset = dataset
        self.samples = list(samples)
        self.by_user = {s.user: s for s in self.samples}
        self.builder = builder
        self.action_set = builder.action_set
        self.encoder = encoder
        self.ranker = ranker
        self.env_cfg = env_cfg or EnvConfig()
        self.encoder_cfg = encoder_cfg or encoder.cfg
        self.seed = int(seed)
        self.refiner = refiner
        self.nvec = self.action_set.sizes()
        self.steps_per_episode = self.env_cfg.steps_per_episode
        n_cand = max(len(s.candidates) for s in self.samples)
        self.obs_candidates = self.env_cfg.obs_candidates or n_cand
        self.context_rows = CONTEXT_ROWS
        self.observation_space = spaces.Box(low=-1.0, high=1.0,
                                            shape=(self.context_rows + self.obs_candidates, encoder.dim),
                                            dtype=np.float32)
        self.item_embeddings: ItemEmbeddings = encoder.item_embeddings(dataset)
        self.user_features = UserRows.fit(dataset, encoder.dim)
        self._contexts: dict = {}
        self._user_rows: dict = {}
        self._baselines: dict = {}
        self.failed_baselines = 0
        """Task-wise baseline calls that failed (their users' episodes earned no reward)."""
        self.timings = StepTimings()

    # ------------------------------------------------------------------ helpers

    def context(self, sample: UserSample) -> UserContext:
        ctx = self._contexts.get(sample.user)
        if ctx is None:
            ctx = self._contexts[sample.user] = UserContext.from_sample(sample, self.dataset)
        return ctx

    def sample_for(self, user) -> UserSample:
        """The split's sample of `user` (for reset options={"user": id})."""
        if user in self.by_user:
            return self.by_user[user]
        # ids from JSON or a CLI arrive as strings or ints; match by text as a fallback
        for key, sample in self.by_user.items():
            if str(key) == str(user):
                return sample
        raise KeyError(f"user {user!r} is not in this split ({len(self.samples)} users)")

    def _rank(self, requests: list[RankRequest]) -> tuple[list[Ranking], float]:
        start = time.perf_counter()
        rankings = self.ranker.rank(requests)
        elapsed = time.perf_counter() - start
        if len(rankings) != len(requests):
            raise RuntimeError(f"ranker returned {len(rankings)} rankings for {len(requests)} requests")
        return rankings, elapsed

    def user_rows(self, sample: UserSample) -> np.ndarray:
        """[C - 1, dim]: the user rows of the observation, computed once per user (history only)."""
        rows = self._user_rows.get(sample.user)
        if rows is None:
            rows = self._user_rows[sample.user] = self.user_features.rows(self.context(sample))
        return rows

    def observe(self, states: Sequence[EpisodeState]) -> np.ndarray:
        """[N, C + K, dim] float32: the N state texts encoded in one batch, the rest by lookup."""
        texts = [state_text(s.context, s.chosen, s.sentences, s.step, s.last_order, self.encoder_cfg)
                 for s in states]
        return observation(self.encoder.encode(texts) if states else np.zeros((0, self.encoder.dim)),
                           [s.user_rows for s in states],
                           [s.candidate_embeddings[s.last_order[:self.obs_candidates]] for s in states],
                           [s.step / self.steps_per_episode for s in states], self.obs_candidates)

    # ------------------------------------------------------------------ reset

    def reset(self, samples: Sequence[UserSample]) -> tuple[list[EpisodeState], np.ndarray]:
        """Start one episode per sample. Users without a cached task-wise baseline get it in ONE ranker call."""
        start = time.perf_counter()
        taskwise = self.builder.taskwise()
        ranker_s = 0.0
        if self.env_cfg.reward_baseline == "taskwise":
            todo = list({s.user: s for s in samples if s.user not in self._baselines}.values())
            if todo:
                rankings, ranker_s = self._rank([self.taskwise_request(s) for s in todo])
                for s, r in zip(todo, rankings):
                    if r.failed:  # retried at the user's next reset instead of cached; this episode earns nothing
                        self.failed_baselines += 1
                    else:
                        self._baselines[s.user] = self._ndcg(r, s)
        states = []
        for s in samples:
            ctx = self.context(s)
            baseline = self._baselines.get(s.user) if self.env_cfg.reward_baseline == "taskwise" else 0.0
            states.append(EpisodeState(
                sample=s, context=ctx,
                candidate_embeddings=self.item_embeddings.lookup(s.candidates),
                baseline=baseline, user_rows=self.user_rows(s), chosen=dict(taskwise),
                last_order=list(range(len(s.candidates))), sentences=self.builder.sentences(ctx, taskwise),
            ))
        obs = self.observe(states)
        t = self.timings
        t.resets += 1
        t.reset_s += time.perf_counter() - start
        t.reset_ranker_s += ranker_s
        return states, obs

    def taskwise_request(self, sample: UserSample) -> RankRequest:
        """The ranker request of the task-wise prompt for a user (the baseline; evaluation reuses it, so a cached
        answer is shared)."""
        return self.builder.request(self.context(sample), self.builder.taskwise())[1]

    def _ndcg(self, ranking: Ranking, sample: UserSample) -> float:
        return float(ndcg_at_k([target_rank(ranking.order, sample.target_index)], self.env_cfg.reward_k)[0])

    def reset_info(self, state: EpisodeState) -> dict:
        return {"user": state.sample.user, "step": 0, "baseline": state.baseline,
                "actions": {p: a.id for p, a in state.chosen.items()}}

    # ------------------------------------------------------------------ step

    def decode_actions(self, actions) -> list[dict[str, Action]]:
        """[N, 4] action indices (PATTERNS order) -> one {pattern: Action} per user, range-checked."""
        arr = np.asarray(actions)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != len(PATTERNS):
            raise ValueError(f"actions must have shape [N, {len(PATTERNS)}] ({', '.join(PATTERNS)}), "
                             f"got {np.asarray(actions).shape}")
        chosen = []
        for row in arr:
            choice = {}
            for j, p in enumerate(PATTERNS):
                idx = int(row[j])
                if not 0 <= idx < self.nvec[j]:
                    raise ValueError(f"action {idx} for pattern '{p}' is out of range [0, {self.nvec[j]})")
                choice[p] = self.action_set.action(p, idx)
            chosen.append(choice)
        return chosen

    def _refine(self, states: list[EpisodeState], chosen: list[dict[str, Action]]) -> None:
        """RPP+: ask the refiner for new sentence texts; users are grouped by episode step (the contract passes one
        step per call). The refiner returns None for a user when this step does not refine."""
        by_step: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            by_step.setdefault(s.step, []).append(i)
        for step, idx in by_step.items():
            results = self.refiner.refine([states[i].context for i in idx], [chosen[i] for i in idx], step)
            if len(results) != len(idx):
                raise RuntimeError(f"refiner returned {len(results)} results for {len(idx)} users")
            for i, texts in zip(idx, results):
                if texts is None:
                    continue
                for p, text in texts.items():
                    if p not in PATTERNS:
                        raise ValueError(f"refiner returned text for unknown pattern '{p}'")
                    if text is not None:
                        states[i].refined[p] = (chosen[i][p].id, str(text))

    def step(self, states: list[EpisodeState], actions) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Apply one action vector per user: build N prompts, ONE ranker call, rewards, next observations.
        Mutates `states` (step count, current actions, last ranking, refinements)."""
        start = time.perf_counter()
        chosen = self.decode_actions(actions)
        if len(chosen) != len(states):
            raise ValueError(f"{len(chosen)} action vectors for {len(states)} running episodes")
        for s, c in zip(states, chosen):
            s.chosen = c
        if self.refiner is not None:
            self._refine(states, chosen)
        prompts, requests = zip(*[self.builder.request(s.context, s.chosen, s.applied_refinements())
                                  for s in states]) if states else ((), ())
        rankings, ranker_s = self._rank(list(requests))

        rewards = np.zeros(len(states), dtype=np.float64)
        infos = []
        k = self.env_cfg.reward_k
        for i, (s, prompt, ranking) in enumerate(zip(states, prompts, rankings)):
            rank = target_rank(ranking.order, s.sample.target_index)
            metrics = {name: float(v[0]) for name, v in all_metrics([rank]).items()}
            ndcg = metrics.get(f"ndcg@{k}")
            if ndcg is None:
                ndcg = float(ndcg_at_k([rank], k)[0])
            # a failed request comes back in presented order: its NDCG says nothing about the prompt, so it earns
            # neither credit nor blame (it is counted in info and in the ranker's usage); nor does a step whose
            # baseline is unknown (raw NDCG would reward the user effect)
            rewards[i] = 0.0 if ranking.failed or s.baseline is None else ndcg - s.baseline
            s.step += 1
            s.last_order = list(ranking.order)
            s.sentences = dict(prompt.sentences)
            infos.append({
                "user": s.sample.user,
                "step": s.step,
                "prompt": prompt.text,
                "actions": dict(prompt.action_ids),
                "action_indices": [self.action_set.index(p, prompt.action_ids[p]) for p in PATTERNS],
                "refined": s.applied_refinements(),
                "ranking": list(ranking.order),
                "target_rank": rank,
                "metrics": metrics,
                "ndcg": ndcg,
                "baseline": s.baseline,
                "baseline_failed": s.baseline is None,
                "reward": float(rewards[i]),
                "usage": RequestUsage(ranking.prompt_tokens, ranking.completion_tokens, ranking.wall_s,
                                      ranking.cached),
                "ranker_failed": bool(ranking.failed),
                "ranker_error": ranking.error,
            })
        encode_start = time.perf_counter()
        obs = self.observe(states)
        t = self.timings
        t.encode_s += time.perf_counter() - encode_start
        t.steps += 1
        t.step_s += time.perf_counter() - start
        t.ranker_s += ranker_s
        return obs, rewards, infos

    def done(self, state: EpisodeState) -> bool:
        """The episode is over (terminated: T prompts were tried; nothing follows the last one)."""
        return state.step >= self.steps_per_episode


# ---------------------------------------------------------------------- user stream

class UserStream:
    """The split's users in an order seeded by `seed`, cycling; each epoch is reshuffled with (seed, epoch).

    Its whole state is (seed, epoch, position), so saving and restoring it resumes the exact same sequence.
    """

    def __init__(self, samples: Sequence[UserSample], seed: int) -> None:
        self.samples = list(samples)
        self.restart(seed)

    def restart(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x05E7]).permutation(len(self.samples))

    def next(self) -> UserSample:
        if self.position >= len(self.samples):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        sample = self.samples[self._order[self.position]]
        self.position += 1
        return sample

    def take(self, n: int) -> list[UserSample]:
        return [self.next() for _ in range(n)]

    def get_state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "n_users": len(self.samples)}

    def set_state(self, state: dict) -> None:
        if state.get("n_users") != len(self.samples):
            raise ValueError(f"user-stream state is for {state.get('n_users')} users, this split has "
                             f"{len(self.samples)}: not the same split")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


class SingleUserDriver:
    """One user-episode at a time over a StepCore: what the Gymnasium and PettingZoo faces share.

    reset(seed) restarts the user stream with that seed (so a seeded reset always serves the same user, as
    Gymnasium's determinism checks expect); reset() serves the next user; options={"user": id} picks one.
    """

    def __init__(self, core: StepCore, seed: Optional[int] = None) -> None:
        self.core = core
        self.stream = UserStream(core.samples, core.seed if seed is None else seed)
        self.state: Optional[EpisodeState] = None

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.stream.restart(seed)
        options = options or {}
        sample = self.core.sample_for(options["user"]) if "user" in options else self.stream.next()
        states, obs = self.core.reset([sample])
        self.state = states[0]
        return obs[0], self.core.reset_info(self.state)

    def step(self, action) -> tuple[np.ndarray, float, bool, dict]:
        """(obs, reward, terminated, info)."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if self.core.done(self.state):
            raise RuntimeError("the episode is over; call reset()")
        obs, rewards, infos = self.core.step([self.state], np.asarray(action).reshape(1, -1))
        return obs[0], float(rewards[0]), self.core.done(self.state), infos[0]


def core_or_make(core: "StepCore | None", cfg, split: str, ranker=None, refiner=None,
                 owner: str = "the environment") -> "StepCore":
    """The given core, or one built from a Config: the shared constructor logic of the env faces."""
    if core is not None:
        return core
    if cfg is None:
        raise ValueError(f"{owner} needs either a StepCore or a Config (cfg=...)")
    return make_core(cfg, split, ranker=ranker, refiner=refiner)


def make_core(cfg: Config, split: str, ranker: Ranker | None = None, encoder: StateEncoder | None = None,
              refiner=None) -> StepCore:
    """Everything a StepCore needs, from a Config: dataset, split users, action set, builder, encoder, ranker.

    Pass `ranker` (tests, or to share one loaded model) to skip make_ranker. The RPP+ refiner is built from
    cfg.refiner when it is enabled, unless one is passed.
    """
    from rpp.data import load_dataset, split_users

    dataset = load_dataset(cfg.data)
    samples = split_users(dataset, cfg.data, cfg.seed).users(split)
    action_set = load_action_set(cfg.prompt.action_spaces)
    builder = PromptBuilder(action_set, cfg.prompt, dataset.item_noun, mode=cfg.llm.mode)
    if encoder is None:
        encoder = StateEncoder(cfg.encoder)
    if ranker is None:
        from rpp.llm import make_ranker

        ranker = make_ranker(cfg)
    if refiner is None and cfg.refiner.enabled:
        from rpp.prompts.refiner import make_refiner

        refiner = make_refiner(cfg, dataset=dataset)
    return StepCore(dataset, samples, builder, encoder, ranker, env_cfg=cfg.env, encoder_cfg=cfg.encoder,
                    seed=cfg.seed, refiner=refiner)


# ---------------------------------------------------------------------- what the agents see (shared with serving)

def state_text(context: UserContext, chosen: dict, sentences: dict, step: int, last_order: Sequence[int],
               encoder_cfg: EncoderConfig) -> str:
    """What the BERT encoder sees: the four current sentences, the history window choice, recent history titles
    and (after the first step) the top of the last ranking. Used by the environment and by serving."""
    hist = chosen["history"]
    lines = [f"{p}: {sentences[p] or '(none)'}" for p in PATTERNS]
    shown = f"history window: last {hist.window}"
    if hist.params.get("ratings"):
        shown += ", with ratings"
    if hist.params.get("note_last"):
        shown += ", most recent named"
    lines.append(shown)
    n_hist = encoder_cfg.history_summary_items
    if n_hist:
        lines.append("recent: " + "; ".join(context.history_titles[-n_hist:]))
    n_rank = encoder_cfg.ranking_summary_items
    if step > 0 and n_rank:
        lines.append("ranked first: " + "; ".join(context.candidate_titles[i] for i in last_order[:n_rank]))
    return "\n".join(lines)


PROGRESS_SLOT = -1
"""Slot of the first user row that holds the episode progress t / T (the user features leave it free)."""


def observation(state_rows: np.ndarray, user_rows: Sequence[np.ndarray], candidate_rows: Sequence[np.ndarray],
                progress: Sequence[float], k: int) -> np.ndarray:
    """Assemble [N, C + k, dim] observations (layout in the module doc; C = 1 + the user rows); `progress` is
    t / T, written in the last slot of the first user row; candidate rows beyond k are dropped, missing ones stay
    zero."""
    n, dim = len(user_rows), state_rows.shape[-1]
    c = 1 + (len(user_rows[0]) if n else 1)
    obs = np.zeros((n, c + k, dim), dtype=np.float32)
    for i in range(n):
        obs[i, 0] = state_rows[i]
        obs[i, 1:c] = user_rows[i]
        obs[i, 1, PROGRESS_SLOT] = progress[i]
        cand = candidate_rows[i][:k]
        obs[i, c:c + len(cand)] = cand
    return obs
