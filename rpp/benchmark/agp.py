"""AGP (arXiv 2504.03965): optimize ONE user-profile generation prompt with position feedback; and profile_fixed.

Two stages. A profile writer (a text generator) turns a user's recent history (``agp.history_items`` items) into a
short profile, following the profile-generation prompt; the ranker then ranks the user's candidates from the
task-wise prompt with that profile placed before its reasoning sentence. What is optimized is the profile-generation
prompt, a single task-wise prompt: personalization comes from the profile it makes for each user.

Optimization on ``agp.train_users`` training users, in batches of ``agp.batch_size``:
1. profiles with the current prompt, rankings, and per user a line of position feedback ("ranked 7th of 20,
   should be 1st", weight 1 / position, with the profile and the item the user chose next);
2. a summarizer condenses the batch's feedback; an optimizer rewrites the prompt from it;
3. verify: the rewrite is used for the same batch (new profiles, new rankings) and kept only if the batch's mean
   NDCG@10 improves; otherwise the current prompt stays.
A rewrite that is not a usable prompt (no answer, empty, unbalanced braces or unknown fields, no {history} field,
too long, unchanged) is rejected and counted by reason before any ranking; with no accepted rewrite the initial
prompt is what the test users get. The three generators are one text generator configured like the refiner
(``agp.generator``: the local SmolLM2 by default, or any OpenAI-compatible chat model); with a 135M model expect
every rewrite to be rejected. Generations are cached (the refiner's ``refinements.sqlite``), keyed on the generator
and the full request, so a rerun costs nothing; cost counts model and cache answers alike.

profile_fixed: the same ranking prompt with a deterministic profile computed from the data (the most frequent
genres and the release years of the same recent items), no LLM: it separates "a profile helps" from "the
optimized prompt helps".

Neither method reads a test user's target or candidates: profiles come from the history only, and optimization
uses training users.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from rpp.benchmark.methods import BenchContext, Method, mean_ndcg10, ranks_of
from rpp.data import UserSample
from rpp.llm.base import Ranking

PROFILE_FIELDS = frozenset({"history", "n_items", "item_noun", "item_noun_plural"})
"""Fields a profile-generation prompt may use; {history} is required."""

REJECTION_REASONS = ("generator_failed", "empty", "malformed", "missing_history", "too_long", "unchanged",
                     "no_improvement")
"""Why a rewrite of the profile prompt was not kept, in the order they are checked (no_improvement: the verify
step, the batch's NDCG@10 did not rise)."""

SYSTEM = "You are a helpful assistant."
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_PREAMBLE = re.compile(r"^(?:sure|okay|ok|certainly|of course|here(?:'s| is)|below is)\b.*:\s*$", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:improved|new|rewritten|revised|updated)?\s*prompt\s*:\s*", re.IGNORECASE)


def _escape(text: str) -> str:
    """A literal text inside a sentence template (the builder fills {placeholders} and reads {{ as a brace)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def recent_items(dataset, sample: UserSample, n: int) -> list:
    return list(sample.history[-n:])


def history_block(dataset, sample: UserSample, n: int) -> str:
    """The numbered recent titles with their genres, oldest first: what a profile is written from."""
    lines = []
    for k, item in enumerate(recent_items(dataset, sample, n), 1):
        genres = dataset.genres(item)
        lines.append(f"{k}. {dataset.title(item)}" + (f" ({', '.join(genres)})" if genres else ""))
    return "\n".join(lines)


def fixed_profile(dataset, sample: UserSample, n: int, item_noun_plural: str) -> str:
    """profile_fixed's profile: the most frequent genres (ties by name) and the release years of the last n items."""
    from rpp.prompts.refiner import top_genres

    items = recent_items(dataset, sample, n)
    genres = top_genres({"history_genres": [tuple(dataset.genres(i)) for i in items]}, 3)
    years = sorted(int(m.group(1)) for m in (_YEAR.search(dataset.title(i)) for i in items) if m)
    parts = []
    if genres:
        parts.append("mostly " + (", ".join(genres[:-1]) + " and " + genres[-1] if len(genres) > 1 else genres[0]))
    if years:
        parts.append(f"released {years[0]}" + (f" to {years[-1]}" if years[-1] != years[0] else ""))
    if not parts:
        return ""
    return f"In their last {len(items)} {item_noun_plural} this user chose " + ", ".join(parts) + "."


def profile_sentences(builder, profile: str) -> Optional[dict]:
    """The refined-sentence dict that puts the profile before the task-wise reasoning sentence (None: no profile)."""
    if not profile:
        return None
    reasoning = builder.taskwise()["reasoning"].text
    return {"reasoning": (f"Profile of this user: {_escape(profile)}\n{reasoning}").strip()}


def check_prompt(raw: Optional[str], current: str, max_chars: int) -> tuple[Optional[str], Optional[str]]:
    """(the cleaned rewrite, None) when it is a usable profile prompt, else (None, rejection reason)."""
    from rpp.prompts.refiner import placeholders

    if raw is None:
        return None, "generator_failed"
    lines = str(raw).replace("\r\n", "\n").strip().split("\n")
    while len(lines) > 1 and (not lines[0].strip() or _PREAMBLE.match(lines[0].strip())
                              or lines[0].strip().startswith("```")):
        lines.pop(0)
    while lines and lines[-1].strip().startswith("```"):
        lines.pop()
    text = _LABEL.sub("", "\n".join(lines).strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    if not text:
        return None, "empty"
    fields = placeholders(text)
    if fields is None or fields - PROFILE_FIELDS or any(not f for f in fields):
        return None, "malformed"
    if "history" not in fields:
        return None, "missing_history"
    if len(text) > max_chars:
        return None, "too_long"
    if " ".join(text.split()) == " ".join(current.split()):
        return None, "unchanged"
    return text, None


class Generations:
    """The AGP text generator behind the generation cache, counting what it is asked (model and cache answers)."""

    def __init__(self, ctx: BenchContext, generator: Any = None) -> None:
        from rpp.prompts.refiner import RefinementCache, refinement_cache_path

        cfg = ctx.cfg
        if generator is None:
            from rpp.llm import make_generator

            generator = make_generator(cfg.agp.generator)
        self.generator = generator
        self.identity = str(getattr(generator, "identity", type(generator).__name__))
        self.temperature = float(cfg.agp.generator.temperature)
        self.cache = RefinementCache(refinement_cache_path(cfg)) if cfg.llm.cache else None
        self.requests = 0
        """Generation requests, model and cache answers alike (the cost on a cold cache)."""
        self.model_answers = 0
        self.failures = 0

    def __call__(self, contents: Sequence[str], max_new_tokens: int, what: str) -> list[Optional[str]]:
        from rpp.prompts.refiner import RefinementCache

        messages = [({"role": "system", "content": SYSTEM}, {"role": "user", "content": c}) for c in contents]
        keys = [RefinementCache.key(self.identity, m, max_new_tokens, self.temperature) for m in messages]
        answers: dict = dict(self.cache.get_many(keys)) if self.cache is not None else {}
        todo = {k: m for k, m in zip(keys, messages) if k not in answers}
        if todo:
            outputs = self.generator.generate(list(todo.values()), max_new_tokens)
            if len(outputs) != len(todo):
                raise RuntimeError(f"generator {self.identity} returned {len(outputs)} answers for {len(todo)}")
            fresh = dict(zip(todo, outputs))
            answers.update(fresh)
            self.model_answers += len(todo)
            if self.cache is not None:
                self.cache.put_many((k, self.identity, f"agp:{what}", o) for k, o in fresh.items() if o is not None)
        self.requests += len(keys)
        out = [answers.get(k) for k in keys]
        self.failures += sum(o is None or not str(o).strip() for o in out)
        return out


# ---------------------------------------------------------------------------------------------- methods


class ProfileFixedMethod(Method):
    """The task-wise prompt with a deterministic profile of the recent history (top genres, years); no LLM."""

    family = "other"
    uses_llm = True

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        b, n = self.ctx.builder, self.ctx.cfg.agp.history_items
        refined = [profile_sentences(b, fixed_profile(self.ctx.dataset, u, n, b.item_noun_plural)) for u in users]
        return self.ctx.rank_prompts(users, [b.taskwise()] * len(users), refined)

    def notes(self) -> str:
        return (f"task-wise prompt + a profile computed from the last {self.ctx.cfg.agp.history_items} history "
                "items (top 3 genres, release years) before the reasoning sentence; no LLM generation")


class AGPMethod(Method):
    """The task-wise prompt + a profile written by an LLM with the optimized profile-generation prompt."""

    family = "optimizer"
    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str = "agp", generator: Any = None) -> None:
        super().__init__(ctx, name)
        self.cfg = ctx.cfg.agp
        self._generator = generator
        self._gen: Optional[Generations] = None
        self.initial_prompt = self.cfg.profile_prompt
        self.prompt = self.initial_prompt
        self.batches: list[dict] = []
        """Per batch: users, NDCG@10 with the current prompt, with the rewrite (if any), outcome."""
        self.accepted = 0
        self.rejected = {r: 0 for r in REJECTION_REASONS}
        self.train_users = 0
        self.train_generations = 0
        self.infer_generations = 0
        self.failed_profiles = 0
        self._check_prompt_template(self.initial_prompt)

    def _check_prompt_template(self, text: str) -> None:
        from rpp.benchmark.methods import BenchmarkError
        from rpp.prompts.refiner import placeholders

        checked, reason = check_prompt(text, "", self.cfg.max_prompt_chars)
        if checked is None:
            raise BenchmarkError(f"agp.profile_prompt is not a usable prompt ({reason}); it needs the {{history}} "
                                 f"field and may use {sorted(PROFILE_FIELDS)}")
        for key, fields in (("summarizer_instruction", {"feedback"}), ("optimizer_instruction", {"prompt", "summary"})):
            got = placeholders(getattr(self.cfg, key))
            allowed = fields | {"item_noun", "item_noun_plural"}
            if got is None or not fields <= got or got - allowed:
                raise BenchmarkError(f"agp.{key} must use the fields {sorted(fields)} (and may use item_noun, "
                                     f"item_noun_plural); write a literal brace as {{{{ or }}}}")

    @property
    def gen(self) -> Generations:
        if self._gen is None:
            self._gen = Generations(self.ctx, self._generator)
        return self._gen

    # -- the two stages
    def profiles(self, prompt: str, users: Sequence[UserSample]) -> list[str]:
        b, n = self.ctx.builder, self.cfg.history_items
        contents = [prompt.format(history=history_block(self.ctx.dataset, u, n), n_items=len(recent_items(
            self.ctx.dataset, u, n)), item_noun=b.item_noun, item_noun_plural=b.item_noun_plural) for u in users]
        raw = self.gen(contents, self.cfg.profile_max_new_tokens, "profile")
        out = []
        for text in raw:
            text = " ".join(str(text or "").split())[:self.cfg.max_profile_chars]
            self.failed_profiles += not text
            out.append(text)
        return out

    def rank_with(self, prompt: str, users: Sequence[UserSample]) -> tuple[list[Ranking], list[str]]:
        profiles = self.profiles(prompt, users)
        b = self.ctx.builder
        rankings = self.ctx.rank_prompts(users, [b.taskwise()] * len(users),
                                         [profile_sentences(b, p) for p in profiles])
        return rankings, profiles

    def feedback(self, users: Sequence[UserSample], rankings: Sequence[Ranking], profiles: Sequence[str]) -> str:
        """One line per training user: the target's actual vs wanted position, weight 1 / position."""
        ds = self.ctx.dataset
        lines = []
        for k, (u, rank, profile) in enumerate(zip(users, ranks_of(users, rankings), profiles), 1):
            pos = int(rank) + 1
            lines.append(f"User {k}: the {self.ctx.builder.item_noun} they chose next, {ds.title(u.target)}, was "
                         f"ranked {_ordinal(pos)} of {len(u.candidates)}, should be 1st (weight {1 / pos:.2f}). "
                         f"Profile: \"{profile[:200] or '(none)'}\"")
        return "\n".join(lines)

    # -- optimization
    def fit(self) -> None:
        from rpp.benchmark.methods import BenchmarkError

        users = list(self.ctx.train_users[:self.cfg.train_users])
        if not users:
            raise BenchmarkError("agp needs training users (data.n_train_users > 0)")
        g0 = self.gen.requests
        b = self.ctx.builder
        nouns = {"item_noun": b.item_noun, "item_noun_plural": b.item_noun_plural}
        for start in range(0, len(users), self.cfg.batch_size):
            batch = users[start:start + self.cfg.batch_size]
            rankings, profiles = self.rank_with(self.prompt, batch)
            current = mean_ndcg10(batch, rankings)
            record = {"users": len(batch), "ndcg10": current, "rewrite_ndcg10": None, "outcome": None}
            summary = self.gen([self.cfg.summarizer_instruction.format(
                feedback=self.feedback(batch, rankings, profiles), **nouns)],
                self.cfg.summary_max_new_tokens, "summary")[0]
            raw = None
            if summary is not None and str(summary).strip():
                raw = self.gen([self.cfg.optimizer_instruction.format(
                    prompt=self.prompt, summary=" ".join(str(summary).split()), **nouns)],
                    self.cfg.rewrite_max_new_tokens, "rewrite")[0]
            candidate, reason = check_prompt(raw, self.prompt, self.cfg.max_prompt_chars)
            if candidate is not None:
                new_rankings, _ = self.rank_with(candidate, batch)
                record["rewrite_ndcg10"] = new = mean_ndcg10(batch, new_rankings)
                if new > current:
                    self.prompt = candidate
                    self.accepted += 1
                    record["outcome"] = "accepted"
                else:
                    reason = "no_improvement"
            if reason is not None:
                self.rejected[reason] += 1
                record["outcome"] = reason
            self.batches.append(record)
        self.train_users = len(users)
        self.train_generations = self.gen.requests - g0

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        g0 = self.gen.requests
        rankings, _ = self.rank_with(self.prompt, users)
        self.infer_generations = self.gen.requests - g0
        return rankings

    def cost(self) -> dict:
        return {"train_generations": self.train_generations, "infer_generations": self.infer_generations,
                "train_users": self.train_users}

    def notes(self) -> str:
        rejected = ", ".join(f"{k} {v}" for k, v in self.rejected.items() if v) or "none"
        final = "the initial prompt (no rewrite kept)" if self.prompt == self.initial_prompt else \
            "a rewritten prompt: " + repr(" ".join(self.prompt.split())[:160])
        return (f"profile-generation prompt optimized on {self.train_users} training users in {len(self.batches)} "
                f"batches of {self.cfg.batch_size} (profile from the last {self.cfg.history_items} items, "
                f"generator {self.gen.identity.split('|sha256')[0] if self._gen else '-'}): {self.accepted} "
                f"rewrites kept, rejected: {rejected}; {self.failed_profiles} empty profiles; test users got "
                f"{final}")


def agp_methods(ctx: BenchContext, name: str) -> list[Method]:
    if name == "profile_fixed":
        return [ProfileFixedMethod(ctx, "profile_fixed")]
    return [AGPMethod(ctx, "agp")]
