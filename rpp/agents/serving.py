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
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rpp.agents.checkpoints import latest_checkpoint, load_run_config
from rpp.agents.policy import PATTERNS
from rpp.config import Config


def load_algorithm(cfg: Config, checkpoint: Path, env=None):
    """The SB3 algorithm saved in a checkpoint (policy ready for predict), on cfg.train.device."""
    from rpp.agents.train import algorithm_class

    return algorithm_class(cfg).load(checkpoint / "model.zip", env=env, device=cfg.train.device)


class PromptPolicy:
    """A trained run's four agents plus what they need to see a user: the prompt builder and the state encoder."""

    def __init__(self, model, cfg: Config, checkpoint: str = "") -> None:
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
        self._dataset = None
        self._features = None

    @classmethod
    def load(cls, run_dir: str | Path) -> "PromptPolicy":
        """The latest checkpoint of a run directory (as written by `rpp train`)."""
        cfg = load_run_config(run_dir)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint (was the run trained?)")
        return cls(load_algorithm(cfg, checkpoint), cfg, checkpoint.name)

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

    def _genres_by_title(self) -> dict:
        if self._dataset is None:
            from rpp.data import load_dataset
            from rpp.envs.features import UserRows

            self._dataset = load_dataset(self.cfg.data)
            self._features = UserRows.fit(self._dataset, self.encoder.dim)
            self._title_genres = {self._dataset.title(i): self._dataset.genres(i)
                                  for i in self._dataset.items["item"].tolist()}
        return self._title_genres

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
        """{pattern: action id} the four agents pick (greedy) for this user."""
        actions, _ = self.policy.predict(self.observation(history_titles, candidates, ratings), deterministic=True)
        return {p: self.action_set.action(p, int(i)).id for p, i in zip(PATTERNS, np.asarray(actions).reshape(-1))}

    def personalize(self, history_titles: Sequence[str], candidates: Optional[Sequence[str]] = None,
                    ratings: Optional[Sequence[float]] = None):
        """The personalized prompt (rpp.prompts.Prompt: .messages, .text, .action_ids) for this user."""
        ids = self.choose(history_titles, candidates, ratings)
        chosen = {p: self.action_set.action(p, self.action_set.index(p, ids[p])) for p in PATTERNS}
        return self.builder.build(self.context(history_titles, candidates, ratings), chosen)
