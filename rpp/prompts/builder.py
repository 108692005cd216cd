"""The prompt builder: (user context, one chosen action per pattern, optional refined texts) -> chat messages.

Pure and deterministic: the same inputs always give the same messages, which is what makes the response cache hit
and an episode reproducible. Layout (system + one user turn):

    system: cfg.prompt.system [+ the role sentence]
    user:   history sentence, the numbered history window (titles, ratings if the action says so)
            [+ a line naming the most recent item]
            [+ the candidate list: cfg.prompt.show_candidates, always in generate mode]
            reasoning sentence, format sentence
            the closing question

The closing question is fixed by the mode, not by an action: in score mode the ranker scores each candidate title as
the assistant's answer, so the user turn must end with a question whose natural answer is one title. In generate mode
the model must name the candidates, so the list is always shown and the question asks for a ranked list.

Where the list is shown, ``Prompt.messages`` (what goes to the ranker) hold ``rpp.llm.CANDIDATES_PLACEHOLDER``, not
the list itself: every ranker writes the numbered list there in the order it presents the candidates, which is how
llm.bootstrap shows the model shuffled lists. ``Prompt.rendered_messages`` and ``Prompt.text`` have the list filled
in, in presented order (for logs, or for sending the prompt to an LLM yourself).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from rpp.config import PromptConfig
from rpp.llm.base import CANDIDATES_PLACEHOLDER, format_candidate_list
from rpp.prompts.actions import PATTERNS, Action, ActionSet, ActionSetError

if TYPE_CHECKING:
    from rpp.llm.base import RankRequest

SCORE_QUESTION = "Which {item_noun} will this user choose next? Answer with the title only."
GENERATE_QUESTION = (
    "Rank all {n_candidates} candidate {item_noun_plural} above from the most to the least likely next choice of "
    "this user. Answer with a numbered list of their titles, one per line, and nothing else."
)


@dataclass(frozen=True)
class UserContext:
    """What the prompt may say about one user. Deliberately holds no target: the builder cannot leak it."""

    user: object
    history_titles: tuple
    """Oldest first."""
    history_ratings: tuple
    """Aligned with history_titles; NaN where the dataset has no rating."""
    history_genres: tuple
    """Aligned with history_titles; a tuple of genre names per item (empty when unknown)."""
    candidate_titles: tuple
    """In presented order (the order of the RankRequest)."""

    @classmethod
    def from_sample(cls, sample, dataset) -> "UserContext":
        """Gather titles, ratings and genres of a UserSample's history and candidates from its Dataset."""
        return cls(
            user=sample.user,
            history_titles=tuple(dataset.title(i) for i in sample.history),
            history_ratings=tuple(float(r) for r in sample.history_ratings),
            history_genres=tuple(tuple(dataset.genres(i)) for i in sample.history),
            candidate_titles=tuple(dataset.title(i) for i in sample.candidates),
        )

    @property
    def last_item(self) -> str:
        return self.history_titles[-1] if self.history_titles else ""


@dataclass(frozen=True)
class Prompt:
    messages: tuple
    """({"role": "system", ...}, {"role": "user", ...}), as sent to a ranker: where the candidate list is shown they
    hold CANDIDATES_PLACEHOLDER, which the ranker replaces by the list in the order it presents the candidates."""
    sentences: dict
    """pattern -> the sentence as it appears in the prompt (placeholders filled, refined text if given)."""
    action_ids: dict
    """pattern -> the chosen action's id."""
    history_shown: int
    candidates: tuple = ()
    """The candidate titles in presented order (what rendered_messages fill the list with)."""

    @property
    def rendered_messages(self) -> tuple:
        """The messages with the candidate list written out in presented order, ready for any chat LLM."""
        listing = format_candidate_list(self.candidates)
        return tuple({**m, "content": m["content"].replace(CANDIDATES_PLACEHOLDER, listing)} for m in self.messages)

    @property
    def text(self) -> str:
        """The whole prompt as one readable string, candidate list written out (for logs and env infos)."""
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in self.rendered_messages)


def pluralize(noun: str) -> str:
    """English plural of a simple noun ("movie" -> "movies", "story" -> "stories", "box" -> "boxes")."""
    if not noun:
        return noun
    if noun.endswith("y") and len(noun) > 1 and noun[-2].lower() not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    return noun + "s"


_FIELD_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_placeholders(text: str, values: dict[str, str]) -> str:
    """Replace {name} by values[name] and {{ / }} by literal braces; unknown {names} stay as written.

    Lenient on purpose: action-set texts were already validated strictly at load time, and RPP+ refined texts are
    LLM output that may contain stray braces, which must not crash a step.
    """
    def sub(m: re.Match) -> str:
        token = m.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return values.get(m.group(1), token)

    return _FIELD_RE.sub(sub, text)


def _format_rating(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else f"{r:g}"


class PromptBuilder:
    """Assembles prompts from chosen actions; holds only the action set and formatting settings."""

    def __init__(self, action_set: ActionSet, cfg: PromptConfig, item_noun: str,
                 mode: Literal["score", "generate"] = "score") -> None:
        if mode not in ("score", "generate"):
            raise ValueError(f"unknown ranking mode {mode!r} (score or generate)")
        self.action_set = action_set
        self.cfg = cfg
        self.item_noun = item_noun
        self.item_noun_plural = pluralize(item_noun)
        self.mode = mode
        self.show_candidates = cfg.show_candidates or mode == "generate"
        self._taskwise = self._resolve_taskwise()

    def _resolve_taskwise(self) -> dict[str, Action]:
        unknown = [p for p in self.cfg.taskwise if p not in PATTERNS]
        if unknown:
            raise ActionSetError(f"prompt.taskwise: unknown pattern '{unknown[0]}' (patterns: {', '.join(PATTERNS)})")
        chosen = {}
        for p in PATTERNS:
            if p in self.cfg.taskwise:
                chosen[p] = self.action_set.action(p, self.action_set.index(p, self.cfg.taskwise[p]))
            else:
                chosen[p] = self.action_set.action(p, 0)
        return chosen

    def taskwise(self) -> dict[str, Action]:
        """The task-wise default choice: prompt.taskwise where given, else each pattern's first action."""
        return dict(self._taskwise)

    def history_window(self, ctx: UserContext, action: Action) -> int:
        return min(action.window, len(ctx.history_titles))

    def sentences(self, ctx: UserContext, chosen: dict[str, Action],
                  refined: Optional[dict[str, str]] = None) -> dict[str, str]:
        """The four sentences as they appear in the prompt: refined text where given, placeholders filled."""
        missing = [p for p in PATTERNS if p not in chosen]
        if missing:
            raise ValueError(f"no action chosen for pattern(s) {', '.join(missing)}")
        values = {
            "item_noun": self.item_noun,
            "item_noun_plural": self.item_noun_plural,
            "n_history": str(self.history_window(ctx, chosen["history"])),
            "last_item": ctx.last_item,
        }
        refined = refined or {}
        out = {}
        for p in PATTERNS:
            text = refined.get(p)
            if text is None:
                text = chosen[p].text
            out[p] = fill_placeholders(text, values).strip()
        return out

    def build(self, ctx: UserContext, chosen: dict[str, Action],
              refined: Optional[dict[str, str]] = None) -> Prompt:
        """Chat messages for one user and one choice of actions. `refined` (RPP+) replaces sentence texts only;
        the chosen history action's params still decide what of the history is shown."""
        sent = self.sentences(ctx, chosen, refined)
        hist = chosen["history"]
        n_shown = self.history_window(ctx, hist)
        start = len(ctx.history_titles) - n_shown

        system = self.cfg.system.strip()
        if sent["role"]:
            system = f"{system} {sent['role']}".strip()

        blocks = []
        lines = [sent["history"]] if sent["history"] else []
        if n_shown == 0:
            lines.append("(no history)")
        for k, idx in enumerate(range(start, len(ctx.history_titles)), 1):
            line = f"{k}. {ctx.history_titles[idx]}"
            rating = ctx.history_ratings[idx] if idx < len(ctx.history_ratings) else math.nan
            if hist.params.get("ratings") and not math.isnan(rating):
                line += f" (rating: {_format_rating(rating)})"
            lines.append(line)
        if hist.params.get("note_last") and ctx.history_titles:
            lines.append(f"The most recent {self.item_noun} is {ctx.last_item}.")
        blocks.append("\n".join(lines))

        if self.show_candidates:
            # the ranker writes the numbered list here, in the order it presents the candidates (bootstrapping)
            blocks.append(f"Candidate {self.item_noun_plural}:\n{CANDIDATES_PLACEHOLDER}")

        question = SCORE_QUESTION if self.mode == "score" else GENERATE_QUESTION
        question = question.format(item_noun=self.item_noun, item_noun_plural=self.item_noun_plural,
                                   n_candidates=len(ctx.candidate_titles))
        closing = [s for s in (sent["reasoning"], sent["format"]) if s] + [question]
        blocks.append("\n".join(closing))

        messages = ({"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(blocks)})
        return Prompt(messages=messages, sentences=sent, action_ids={p: chosen[p].id for p in PATTERNS},
                      history_shown=n_shown, candidates=tuple(ctx.candidate_titles))

    def request(self, ctx: UserContext, chosen: dict[str, Action],
                refined: Optional[dict[str, str]] = None) -> tuple[Prompt, "RankRequest"]:
        """The prompt and the ranker request for it: the one place a prompt becomes a RankRequest (environment
        steps, task-wise baselines, evaluation and benchmark methods all come here). The request's tags carry the
        user and the action ids for instrumented rankers (rpp.llm.planted); no model ever sees them."""
        from rpp.llm.base import RankRequest

        prompt = self.build(ctx, chosen, refined)
        return prompt, RankRequest(messages=prompt.messages, candidates=ctx.candidate_titles,
                                   tags={"user": ctx.user, "actions": dict(prompt.action_ids)})
