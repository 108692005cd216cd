"""Serving: use a trained run's agents outside the CLI, one-shot.

    policy = PromptPolicy.load("runs/demo")
    prompt = policy.personalize(["Toy Story (1995)", "Heat (1995)"], candidates=["Fargo (1996)", ...])
    prompt.rendered_messages  # chat messages for your LLM (the candidate list written out where shown)

One-shot means one observation per user, the one the environment gives at the start of an episode (built by the
environment's own functions): the state text of the task-wise prompt for this history (embedded by the same
encoder), the user's numeric features (genres looked up by title in the run's dataset; titles it does not know
count as genre-less) and mean history embedding, and the candidate titles' embeddings in the order given (zero rows
when no candidates are given, or beyond the policy's K). The four agents then pick their
sentences greedily. This costs no LLM call at all; the caller makes the one ranking call with the returned prompt.

The run's safe-improvement gate (rpp.agents.gate) is applied: when it served the fixed prompt, every user gets that
prompt and no observation is computed; ``PromptPolicy.source`` says which ("policy" or "fixed"). Many users at once
(``personalize_many``: one encoder batch, one policy forward) is what the HTTP service's micro-batches and
`rpp personalize` call; user input is checked there and refused with ``ServingInputError`` (a message that says what
to change).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rpp.agents.checkpoints import latest_checkpoint, load_run_config
from rpp.agents.policy import PATTERNS
from rpp.config import Config


class ServingInputError(ValueError):
    """A user's request the policy cannot serve as given; the message says what to change."""


@dataclass(frozen=True)
class UserRequest:
    """One user to personalize: a history (item ids of the run's dataset, or titles), optional ratings aligned
    with it, optional candidates (ids or titles). Ids and titles may not be mixed within one list."""

    history: tuple
    ratings: Optional[tuple] = None
    candidates: tuple = ()


def load_algorithm(cfg: Config, checkpoint: Path, env=None):
    """The SB3 algorithm saved in a checkpoint (policy ready for predict), on cfg.train.device."""
    from rpp.agents.train import algorithm_class

    return algorithm_class(cfg).load(checkpoint / "model.zip", env=env, device=cfg.train.device)


class PromptPolicy:
    """A trained run's four agents plus what they need to see a user: the prompt builder and the state encoder."""

    def __init__(self, model, cfg: Config, checkpoint: str = "", gate: Optional[dict] = None,
                 config_digest: str = "") -> None:
        from rpp.agents.gate import GatedPolicy
        from rpp.envs import StateEncoder
        from rpp.prompts import PromptBuilder, load_action_set

        self.model = model
        self.policy = model.policy
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.action_set = load_action_set(cfg.prompt.action_spaces)
        if list(self.action_set.sizes()) != [int(n) for n in model.action_space.nvec]:
            raise ValueError(f"the policy was trained on action sizes {list(model.action_space.nvec)}, the action "
                             f"set {self.action_set.source} has {self.action_set.sizes()}")
        self.builder = PromptBuilder(self.action_set, cfg.prompt, cfg.data.item_noun, mode=cfg.llm.mode)
        self.encoder = StateEncoder(cfg.encoder)
        rows, dim = model.observation_space.shape
        if dim != self.encoder.dim:
            raise ValueError(f"the policy expects {dim}-d embeddings, encoder {cfg.encoder.model} gives "
                             f"{self.encoder.dim}")
        self.n_candidates = rows - self.policy.context_rows
        self.gate = gate
        self.gated = GatedPolicy(self.policy, gate)
        self.source = "fixed" if self.gated.fixed is not None else "policy"
        """What this run serves: "policy" (the per-user agents) or "fixed" (the gate's best fixed prompt)."""
        self.config_digest = config_digest
        self._dataset = None
        self._features = None

    @classmethod
    def load(cls, run_dir: str | Path, overrides: Optional[list[str]] = None) -> "PromptPolicy":
        """The latest checkpoint of a run directory (as written by `rpp train`), with the run's gate applied.
        overrides: ``section.key=value`` strings on the run's config (e.g. llm.base_url for the service's ranker)."""
        from rpp.agents.gate import read_gate

        cfg = load_run_config(run_dir, overrides)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint (was the run trained?)")
        digest = hashlib.sha256((Path(run_dir) / "config.yaml").read_bytes()).hexdigest()[:16]
        return cls(load_algorithm(cfg, checkpoint), cfg, checkpoint.name, gate=read_gate(run_dir),
                   config_digest=digest)

    @property
    def version(self) -> str:
        """Names the served policy: run name, checkpoint, config digest and the gate's choice."""
        return f"{self.cfg.name}/{self.checkpoint}/cfg-{self.config_digest or 'unknown'}/{self.source}"

    # ------------------------------------------------------------------ one user

    def context(self, history_titles: Sequence[str], candidates: Optional[Sequence[str]] = None,
                ratings: Optional[Sequence[float]] = None):
        from rpp.prompts import UserContext

        history = tuple(str(t) for t in history_titles)
        if ratings is not None and len(ratings) != len(history):
            raise ValueError(f"{len(ratings)} ratings for {len(history)} history titles")
        genres = self._genres_by_title()
        return UserContext(
            user=None, history_titles=history,
            history_ratings=tuple(float(r) for r in ratings) if ratings is not None else (math.nan,) * len(history),
            history_genres=tuple(tuple(genres.get(t, ())) for t in history),
            candidate_titles=tuple(str(c) for c in candidates or ()),
        )

    @property
    def dataset(self):
        """The run's dataset (loaded on first use)."""
        self._genres_by_title()
        return self._dataset

    def _genres_by_title(self) -> dict:
        if self._dataset is None:
            from rpp.data import load_dataset
            from rpp.envs.features import UserRows

            self._dataset = load_dataset(self.cfg.data)
            self._features = UserRows.fit(self._dataset, self.encoder.dim)
            self._title_genres = {self._dataset.title(i): self._dataset.genres(i)
                                  for i in self._dataset.items["item"].tolist()}
            self._id_titles = {str(i): self._dataset.title(i) for i in self._dataset.items["item"].tolist()}
        return self._title_genres

    def titles(self, items: Sequence, what: str) -> tuple[str, ...]:
        """Item ids (ints, or their string form) or titles -> titles. A list of ids must name items of the run's
        dataset; a list of strings that are not all ids is taken as titles (titles the dataset does not know
        count as genre-less, as in ``context``)."""
        self._genres_by_title()
        items = list(items)
        if any(isinstance(i, bool) or not isinstance(i, (int, str)) for i in items):
            raise ServingInputError(f"{what}: every entry must be an item id (integer) or a title (string)")
        ints = [i for i in items if isinstance(i, int)]
        if ints and len(ints) != len(items):
            raise ServingInputError(f"{what}: mixes item ids and titles; send all ids or all titles")
        if ints:
            unknown = [i for i in ints if str(i) not in self._id_titles]
            if unknown:
                ids = sorted(self._dataset.items["item"].tolist())
                raise ServingInputError(
                    f"{what}: unknown item id(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''}; the run's "
                    f"dataset '{self._dataset.name}' has {len(ids)} items with ids {ids[0]}..{ids[-1]} "
                    "(or send titles instead of ids)")
            return tuple(self._id_titles[str(i)] for i in ints)
        if any(not str(t).strip() for t in items):
            raise ServingInputError(f"{what}: empty title; drop it or send its item id")
        return tuple(str(t) for t in items)

    def check(self, request: UserRequest, max_candidates: Optional[int] = None) -> UserRequest:
        """The request with ids resolved to titles, or ServingInputError saying what to change."""
        history = self.titles(request.history, "history")
        if not history:
            raise ServingInputError("history is empty; send at least one item the user interacted with "
                                    "(item ids of the run's dataset, or titles)")
        ratings = request.ratings
        if ratings is not None:
            if len(ratings) != len(history):
                raise ServingInputError(f"ratings has {len(ratings)} values for {len(history)} history items; "
                                        "send one rating per history item, in the same order, or no ratings")
            if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)
                       for r in ratings):
                raise ServingInputError("ratings must be finite numbers, one per history item")
            ratings = tuple(float(r) for r in ratings)
        candidates = self.titles(request.candidates or (), "candidates")
        if max_candidates is not None and len(candidates) > max_candidates:
            raise ServingInputError(f"{len(candidates)} candidates, at most {max_candidates} are served per "
                                    "request; send fewer (split the list) or start the service with a higher "
                                    "--max-candidates")
        return UserRequest(history=history, ratings=ratings, candidates=candidates)

    def observation(self, history_titles: Sequence[str], candidates: Optional[Sequence[str]] = None,
                    ratings: Optional[Sequence[float]] = None) -> np.ndarray:
        """The (C + K, D) observation of the first step of an episode for this user."""
        from rpp.envs.core import observation, state_text

        ctx = self.context(history_titles, candidates, ratings)
        taskwise = self.builder.taskwise()
        text = state_text(ctx, taskwise, self.builder.sentences(ctx, taskwise), 0, [], self.cfg.encoder)
        user_rows = self._features.rows(ctx)
        shown = list(ctx.candidate_titles[:self.n_candidates])
        cand = self.encoder.encode(shown) if shown else np.zeros((0, self.encoder.dim), dtype=np.float32)
        return observation(self.encoder.encode([text]), [user_rows], [cand], [0.0], self.n_candidates)[0]

    def choose(self, history_titles: Sequence[str], candidates: Optional[Sequence[str]] = None,
               ratings: Optional[Sequence[float]] = None) -> dict[str, str]:
        """{pattern: action id} the four agents pick (greedy) for this user, or the gate's fixed prompt."""
        obs = self.observation(history_titles, candidates, ratings)
        actions, _ = self.gated.predict(obs, deterministic=True)
        return {p: self.action_set.action(p, int(i)).id for p, i in zip(PATTERNS, np.asarray(actions).reshape(-1))}

    def personalize(self, history_titles: Sequence[str], candidates: Optional[Sequence[str]] = None,
                    ratings: Optional[Sequence[float]] = None):
        """The personalized prompt (rpp.prompts.Prompt: .messages, .text, .action_ids) for this user."""
        ids = self.choose(history_titles, candidates, ratings)
        chosen = {p: self.action_set.action(p, self.action_set.index(p, ids[p])) for p in PATTERNS}
        return self.builder.build(self.context(history_titles, candidates, ratings), chosen)

    # ------------------------------------------------------------------ many users

    def personalize_many(self, requests: Sequence[UserRequest]) -> list:
        """Prompts for many already-checked requests (``check``): one encoder batch and one policy forward, or
        the gate's fixed prompt for each when the run serves the fixed prompt."""
        from rpp.envs.core import observation, state_text

        contexts = [self.context(r.history, r.candidates, r.ratings) for r in requests]
        if not contexts:
            return []
        if self.source == "fixed":
            indices = np.tile(self.gated.fixed, (len(contexts), 1))
        else:
            taskwise = self.builder.taskwise()
            texts = [state_text(c, taskwise, self.builder.sentences(c, taskwise), 0, [], self.cfg.encoder)
                     for c in contexts]
            shown = [list(c.candidate_titles[:self.n_candidates]) for c in contexts]
            flat = self.encoder.encode([t for s in shown for t in s])
            cand, start = [], 0
            for s in shown:
                cand.append(flat[start:start + len(s)])
                start += len(s)
            obs = observation(self.encoder.encode(texts), [self._features.rows(c) for c in contexts], cand,
                              [0.0] * len(contexts), self.n_candidates)
            indices, _ = self.policy.predict(obs, deterministic=True)
            indices = np.asarray(indices).reshape(len(contexts), len(PATTERNS))
        return [self.builder.build(c, {p: self.action_set.action(p, int(i)) for p, i in zip(PATTERNS, row)})
                for c, row in zip(contexts, indices)]
