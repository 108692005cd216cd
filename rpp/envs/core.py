"""The one step core shared by the Gymnasium env, the batched SB3 VecEnv and the PettingZoo ParallelEnv.

``StepCore`` does all the work of an RPP step for N users at once: turn the four chosen action indices into
prompts (with the RPP+ refiner's texts when one is attached), rank every user's candidates in ONE batched ranker
call, score the target's rank, and encode the next observations in one encoder batch. The three env faces only
decide which users are in the batch and how results are packaged, so no step logic exists twice.

Observation (per user): a (1 + K, dim) float32 array in [-1, 1]. Row 0 embeds the state text (the four current
sentences, the recent history, and from step 1 on the top of the last ranking); rows 1..K embed the candidate titles
in the order of the last ranking (the presented order before the first step), so a policy sees both the prompt it
used and what the LLM made of it.

Reward: NDCG@reward_k of the target in this step's ranking, minus the user's NDCG under the task-wise prompt when
env.reward_baseline == "taskwise". That baseline is one extra ranker call per user, made at reset for all users
being reset in one batch, and cached per user for the life of the core (a user's task-wise ranking never changes).

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


@dataclass
class EpisodeState:
    """Everything the core remembers about one running user-episode."""

    sample: UserSample
    context: UserContext
    candidate_embeddings: np.ndarray
    """[n_candidates, dim], presented order."""
    baseline: float
    """NDCG of the task-wise prompt (0.0 when env.reward_baseline is "none" or the baseline call failed)."""
    chosen: dict
    """pattern -> the Action currently in the prompt (the task-wise choice before the first step)."""
    refined: dict = field(default_factory=dict)
    """pattern -> (action id, refined text): the latest RPP+ refinement, applied only while that action is chosen."""
    last_order: list = field(default_factory=list)
    """Candidate indices of the last ranking, best first (presented order before the first step)."""
    step: int = 0

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
        self.observation_space = spaces.Box(low=-1.0, high=1.0, shape=(1 + self.obs_candidates, encoder.dim),
                                            dtype=np.float32)
        self.item_embeddings: ItemEmbeddings = encoder.item_embeddings(dataset)
        self._contexts: dict = {}
        self._baselines: dict = {}
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

    def _ndcg(self, ranking: Ranking, sample: UserSample) -> tuple[int, float]:
        rank = target_rank(ranking.order, sample.target_index)
        return rank, float(ndcg_at_k([rank], self.env_cfg.reward_k)[0])

    def state_text(self, state: EpisodeState) -> str:
        """What the encoder sees: the four current sentences, the history window choice, recent history titles
        and (after the first step) the top of the last ranking."""
        ctx = state.context
        sentences = self.builder.sentences(ctx, state.chosen, state.applied_refinements())
        hist = state.chosen["history"]
        lines = [f"{p}: {sentences[p] or '(none)'}" for p in PATTERNS]
        shown = f"history window: last {hist.window}"
        if hist.params.get("ratings"):
            shown += ", with ratings"
        if hist.params.get("note_last"):
            shown += ", most recent named"
        lines.append(shown)
        n_hist = self.encoder_cfg.history_summary_items
        if n_hist:
            lines.append("recent: " + "; ".join(ctx.history_titles[-n_hist:]))
        n_rank = self.encoder_cfg.ranking_summary_items
        if state.step > 0 and n_rank:
            lines.append("ranked first: " + "; ".join(ctx.candidate_titles[i] for i in state.last_order[:n_rank]))
        return "\n".join(lines)

    def observe(self, states: Sequence[EpisodeState]) -> np.ndarray:
        """[N, 1 + K, dim] float32: the N state texts encoded in one batch, candidate rows by lookup."""
        k, dim = self.obs_candidates, self.encoder.dim
        obs = np.zeros((len(states), 1 + k, dim), dtype=np.float32)
        if not states:
            return obs
        obs[:, 0] = self.encoder.encode([self.state_text(s) for s in states])
        for i, s in enumerate(states):
            order = s.last_order[:k]
            obs[i, 1:1 + len(order)] = s.candidate_embeddings[order]
        return obs

    # ------------------------------------------------------------------ reset

    def reset(self, samples: Sequence[UserSample]) -> tuple[list[EpisodeState], np.ndarray]:
        """Start one episode per sample. Users without a cached task-wise baseline get it in ONE ranker call."""
        start = time.perf_counter()
        taskwise = self.builder.taskwise()
        ranker_s = 0.0
        if self.env_cfg.reward_baseline == "taskwise":
            todo = list({s.user: s for s in samples if s.user not in self._baselines}.values())
            if todo:
                requests = [RankRequest(messages=self.builder.build(self.context(s), taskwise).messages,
                                        candidates=self.context(s).candidate_titles) for s in todo]
                rankings, ranker_s = self._rank(requests)
                for s, r in zip(todo, rankings):
                    if not r.failed:  # a failed call is retried at the user's next reset instead of cached
                        self._baselines[s.user] = self._ndcg(r, s)[1]
        states = []
        for s in samples:
            states.append(EpisodeState(
                sample=s, context=self.context(s),
                candidate_embeddings=self.item_embeddings.lookup(s.candidates),
                baseline=self._baselines.get(s.user, 0.0), chosen=dict(taskwise),
                last_order=list(range(len(s.candidates))),
            ))
        obs = self.observe(states)
        t = self.timings
        t.resets += 1
        t.reset_s += time.perf_counter() - start
        t.reset_ranker_s += ranker_s
        return states, obs

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
        prompts = [self.builder.build(s.context, s.chosen, s.applied_refinements()) for s in states]
        requests = [RankRequest(messages=p.messages, candidates=s.context.candidate_titles)
                    for p, s in zip(prompts, states)]
        rankings, ranker_s = self._rank(requests)

        rewards = np.zeros(len(states), dtype=np.float64)
        infos = []
        for i, (s, prompt, ranking) in enumerate(zip(states, prompts, rankings)):
            rank, ndcg = self._ndcg(ranking, s.sample)
            # a failed request comes back in presented order: its NDCG says nothing about the prompt, so it earns
            # neither credit nor blame (it is counted in info and in the ranker's usage)
            rewards[i] = 0.0 if ranking.failed else ndcg - s.baseline
            s.step += 1
            s.last_order = list(ranking.order)
            infos.append({
                "user": s.sample.user,
                "step": s.step,
                "prompt": prompt.text,
                "actions": dict(prompt.action_ids),
                "action_indices": [self.action_set.index(p, prompt.action_ids[p]) for p in PATTERNS],
                "refined": s.applied_refinements(),
                "ranking": list(ranking.order),
                "target_rank": rank,
                "metrics": {k: float(v[0]) for k, v in all_metrics([rank]).items()},
                "ndcg": ndcg,
                "baseline": s.baseline,
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

    def truncated(self, state: EpisodeState) -> bool:
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
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if self.core.truncated(self.state):
            raise RuntimeError("the episode is over (truncated); call reset()")
        obs, rewards, infos = self.core.step([self.state], np.asarray(action).reshape(1, -1))
        return obs[0], float(rewards[0]), self.core.truncated(self.state), infos[0]


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

        refiner = make_refiner(cfg)
    return StepCore(dataset, samples, builder, encoder, ranker, env_cfg=cfg.env, encoder_cfg=cfg.encoder,
                    seed=cfg.seed, refiner=refiner)
