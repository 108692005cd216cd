"""RPP+: an LLM rewrites the sentences the agents chose, for one user, during the episode.

RPP limits every pattern (role, history, reasoning, format) to a small curated set of sentences. RPP+ lets a text
generator rewrite the chosen sentence for the user at hand, so the final prompt is no longer limited to that set.
A rewrite is a free-form LLM answer that goes straight into the ranking prompt, so it is only used when it passes
guards (``judge_rewrite``): it must be non-empty, short, keep every ``{placeholder}`` of the original, add no new
ones or numbers, not name any candidate item (that would leak the answer into the prompt), name no genre the user's
summary does not list, and be neither a refusal (or assistant chatter) nor an echo of the instruction or the user
summary. A rejected rewrite falls back to the original sentence and is counted by reason, so a weak refiner model
degrades to plain RPP instead of corrupting the prompt.

Cost control:
- all users x patterns of one step go to the generator in ONE ``generate`` call;
- ``every_k_steps``: only steps 0, k, 2k, ... refine; ``refine`` returns None for the others and the core keeps
  the last refinement;
- raw answers are cached in SQLite (``RefinementCache``) on everything that shapes them (generator identity, the
  rendered messages, i.e. sentence + user summary + pattern purpose + instruction, and the sampling parameters).
  The guards run again on every use, because whether a rewrite leaks depends on the user's candidates, which are
  (deliberately) not part of the request.

The model is shown each sentence with its placeholders filled ("the 15 movies"), and the answer is mapped back to a
template (``templatize``), because a 135M model rewrites natural text far better than text with braces.

The history pattern's sentence is refined like the others: its structured params (how many items, with or without
ratings) still decide what history the builder shows; only the introducing sentence is rewritten, and the
no-new-numbers guard stops a rewrite from contradicting the shown window ("your last 5 movies" over a list of 10).
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import string
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from rpp.config import Config, RefinerConfig, cache_root
from rpp.llm.parsing import normalize
from rpp.prompts.actions import PATTERN_PURPOSES, PATTERNS, pattern_purpose

REFINER_SYSTEM = "You are a helpful assistant."
"""SmolLM2-Instruct's default system prompt (what it was tuned with); the task itself is in the user turn."""

REJECTION_REASONS = (
    "generator_failed", "empty", "refusal", "copies_instruction", "too_long", "lost_placeholder",
    "new_placeholder", "adds_number", "names_candidate", "wrong_genre",
)
"""Every reason a rewrite can be rejected for, in the order the guards check them."""

INSTRUCTION_FIELDS = frozenset({"purpose", "user_summary", "sentence", "item_noun"})
"""Placeholders a refine instruction may use; {sentence} is required."""


# --------------------------------------------------------------------------------------------------------------
# text normalisation and the guards
# --------------------------------------------------------------------------------------------------------------

_ARTICLE_SUFFIX = re.compile(r"^(?P<body>.+?),\s*(?P<art>the|a|an|les|la|le|l'|il|der|die|das|el)$", re.IGNORECASE)
_PARENS = re.compile(r"\s*\([^()]*\)")
_YEAR_PARENS = re.compile(r"\s*\((?:\d{4}|\d{4}\s*[-–]\s*\d{0,4})\)")


def title_variants(title: str) -> set[str]:
    """Normalised ways a text can name an item title.

    MovieLens titles look like "Shawshank Redemption, The (1994)" or "City of Lost Children, The (Cité des enfants
    perdus, La) (1995)". Variants: the full title; without the year; without any parenthesised part; with a
    trailing ", The" moved to the front and dropped; and the main title before a ':' subtitle ("Godfather: Part
    II" -> "godfather"). Variants shorter than 3 characters are dropped (they would match ordinary words)."""
    raw = str(title).strip()
    bases = {raw, _YEAR_PARENS.sub("", raw), _PARENS.sub("", raw)}
    out: set[str] = set()
    for base in bases:
        base = base.strip()
        m = _ARTICLE_SUFFIX.match(base)
        forms = {base}
        if m:
            forms |= {f"{m.group('art')} {m.group('body')}", m.group("body")}
        for form in list(forms):
            head = re.split(r"\s*:\s+|\s+-\s+", form, maxsplit=1)[0]
            if head != form and len(normalize(head)) >= 5:
                forms.add(head)
            if re.match(r"(?i)^(the|a|an)\s", form):
                forms.add(form.split(None, 1)[1])
        out |= {normalize(f) for f in forms}
    return {v for v in out if len(v) >= 3}


_EVERYDAY_WORDS = frozenset(
    "the and you your for are with this that what who how why all one not any our out can get her his its big "
    "now new day man men war boy run ran red kid kids job fan fans mad bad top few see old heat love home life "
    "time fire dead face game golf gold blue dark last next best more most play made open rain hard high rose "
    "star fear free girl hero jack king lost mask mind moon rock safe seven shine speed wild world taste story "
    "watch films movie movies music child children crash drama comedy horror action family friends liar money "
    "mother father brother sister".split()
)
"""Everyday words that are also one-word titles (MovieLens has "Heat", "Big", "Kids", "Crash", "Drama"...)."""


class CandidateMatcher:
    """Finds candidate titles named in a text: a whole-word match of any ``title_variants`` on normalised text.

    A one-word variant that is short or an everyday word ("Big", "Heat", "Go") would reject most rewrites, so
    those are matched case-sensitively as a capitalised word that does not start a sentence: "you will love
    Heat" names the candidate, "Heat up your ranking" does not."""

    def __init__(self, titles: Iterable[str]) -> None:
        self.titles = tuple(str(t) for t in titles)
        self._by_variant: dict[str, str] = {}
        self._single: list[tuple[str, re.Pattern]] = []
        for title in self.titles:
            for v in sorted(title_variants(title)):
                if " " in v or (len(v) >= 4 and v not in _EVERYDAY_WORDS):
                    self._by_variant.setdefault(v, title)
                else:
                    word = v[:1].upper() + v[1:]
                    self._single.append((title, re.compile(rf"\b{re.escape(word)}\b")))
        variants = sorted(self._by_variant, key=len, reverse=True)
        self._multi_re = (re.compile(r"(?:^| )(" + "|".join(re.escape(v) for v in variants) + r")(?= |$)")
                          if variants else None)

    def find(self, text: str) -> Optional[str]:
        """The first candidate title named in ``text``, or None."""
        if self._multi_re is not None:
            m = self._multi_re.search(normalize(text))
            if m:
                return self._by_variant[m.group(1)]
        for title, pattern in self._single:
            for m in pattern.finditer(text):
                if m.start() > 0 and not re.search(r"[.!?:;\"“]\s*$", text[:m.start()]):
                    return title
        return None


_REFUSAL = re.compile(
    r"\b(i\s*(?:am|'m)\s+(?:sorry|unable|not able)|i\s+apologi[sz]e|as an ai\b|as a language model|"
    r"i\s+(?:cannot|can't|can not|won't|will not)\b|i\s+do(?:\s+not|n't)\s+have\s+(?:access|enough|information)|"
    r"unfortunately,?\s+i\b|sorry,?\s+(?:but\s+)?i\b|i\s+need\s+more\s+information|"
    # assistant chatter instead of a sentence ("I'm ready to help you with your movie recommendation ...")
    r"i\s*(?:am|'m)\s+(?:ready|here|happy|glad)\s+to\s+help|i(?:'d|\s+would|'ll|\s+will)\s+be\s+(?:happy|glad)\s+to|"
    r"let\s+me\s+know\b)",
    re.IGNORECASE,
)
_LABEL_PREFIX = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)[,!.]?\s*)?"
    r"(?:here(?:'s| is)\s+(?:the|a|your|my)?\s*)?"
    r"(?:rewritten|revised|new|personali[sz]ed|refined|improved|updated|modified)?\s*"
    r"(?:sentence|instruction|version|text|prompt|answer|output)\s*(?:\d+\s*)?[:\-–]\s*",
    re.IGNORECASE,
)
_PREAMBLE_LINE = re.compile(r"^(?:sure|okay|ok|certainly|of course|here(?:'s| is)|below is)\b.*:\s*$", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»", "*": "*"}
_NUMBER = re.compile(r"\d+")


def clean_rewrite(raw: str) -> str:
    """The sentence inside a model answer: drops a preamble line ("Sure! Here is the rewritten sentence:"), a
    label prefix ("Rewritten sentence:"), wrapping quotes/backticks/asterisks and anything after the first blank
    line (small models append explanations). Judging happens on the result."""
    text = str(raw).replace("\r\n", "\n").strip()
    lines = [ln for ln in text.split("\n")]
    while len(lines) > 1 and (not lines[0].strip() or _PREAMBLE_LINE.match(lines[0].strip())):
        lines.pop(0)
    text = "\n".join(lines).strip()
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0].strip()
    for _ in range(3):
        before = text
        text = _LABEL_PREFIX.sub("", text, count=1).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]):
            text = text[1:-1].strip()
        elif text[:1] in _QUOTES and text.count(text[0]) == 1 and text[0] not in "'*":
            text = text[1:].strip()  # an opening quote whose closing one was cut off by max_new_tokens
        if text == before:
            break
    return " ".join(text.split())


def placeholders(text: str) -> Optional[set[str]]:
    """The ``{name}`` fields of a format string, or None when its braces are unbalanced (str.format would fail)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError:
        return None


def _ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@dataclass(frozen=True)
class Verdict:
    """The guards' decision on one rewrite."""

    text: str
    """The sentence to use: the cleaned rewrite when accepted, else the original."""
    accepted: bool
    reason: Optional[str] = None
    """None when accepted, else one of REJECTION_REASONS."""
    cleaned: Optional[str] = None
    """The cleaned model answer (for logs), None when the generator failed."""
    detail: Optional[str] = None
    """E.g. the candidate title that was named, the placeholder that was lost."""


def templatize(text: str, template: str, values: Mapping[str, str]) -> str:
    """Turn the values of ``template``'s placeholders in a rewrite back into placeholders.

    The model is shown the sentence with its placeholders filled ("the 15 movies ...", not "the {n_history}
    {item_noun_plural} ..."): a small model rewrites natural text far better than text with braces, which it
    drops or garbles. The answer is mapped back here (longest value first, whole words, any case), so the refined
    text stays a template the builder fills, and "keeps every placeholder" is checked on the result. Literal
    braces in the answer are left alone: they fail the placeholder guard."""
    names = placeholders(template) or set()
    pairs = sorted(((n, str(values[n])) for n in names if n in values and str(values[n]).strip()),
                   key=lambda kv: -len(kv[1]))
    out = text
    for name, value in pairs:
        out = re.sub(rf"(?<![\w{{]){re.escape(value)}(?![\w}}])", lambda _m, n=name: "{" + n + "}", out,
                     flags=re.IGNORECASE)
    return out


_LABEL = re.compile(r"(?m)^\s*([A-Za-z][A-Za-z' ]{0,40}):")
"""A line label of the instruction ("Sentence:", "Example answer:"); an answer that repeats one is filling in the
instruction's form rather than answering (SmolLM2 ends answers with "... Answer:")."""


def _echo(text: str, original: str, instruction: str | Sequence[str], summary: str) -> Optional[str]:
    """What the answer copies from the refiner's own prompt, or None.

    The instruction (its fixed words and the pattern's purpose): any of its line labels ("Sentence:"), or any run of
    5 words shared with it and not in the original sentence, is a copy; small models often answer with the
    instruction itself. The user summary: naming
    a liked genre or a recent title is the personalisation we want, so only an answer that is mostly the summary
    (half or more of its words inside 4-word runs shared with it) counts as echoing it back."""
    tokens = normalize(text).split()
    own5, own4 = _ngrams(normalize(original).split(), 5), _ngrams(normalize(original).split(), 4)
    parts = [instruction] if isinstance(instruction, str) else list(instruction)
    for label in sorted({m.group(1).strip() for part in parts for m in _LABEL.finditer(part)}):
        label_re = rf"(?i)(?:^|\s){re.escape(label)}\s*:"
        if re.search(label_re, text) and not re.search(label_re, original):
            return f"instruction label: {label}:"
    inst5 = set().union(*(_ngrams(normalize(part).split(), 5) for part in parts)) if parts else set()
    shared = (_ngrams(tokens, 5) & inst5) - own5
    if shared:
        return "instruction: " + " ".join(sorted(shared)[0])
    summary_grams = _ngrams(normalize(summary).split(), 4) - own4
    covered = set()
    for i in range(len(tokens) - 3):
        if tuple(tokens[i:i + 4]) in summary_grams:
            covered.update(range(i, i + 4))
    if tokens and len(covered) >= 0.5 * len(tokens):
        return f"user summary: {len(covered)} of {len(tokens)} words"
    return None


def _genre_forms(genre: str) -> set[str]:
    """Normalised ways to write a genre: "Comedy" -> {"comedy", "comedies"}, "Sci-Fi" -> {"sci fi", "sci fis"}."""
    base = normalize(genre)
    if not base:
        return set()
    plural = base[:-1] + "ies" if base.endswith("y") else base + "s"
    return {base, plural}


def wrong_genre(text: str, known: Iterable[str], allowed: Iterable[str]) -> Optional[str]:
    """A known genre the text names although the user's summary does not list it (nor the original sentence),
    or None. Small models copy genres from the instruction's example ("dark thrillers") into every rewrite, which
    would tell the ranker about a taste the user does not have."""
    padded = f" {normalize(text)} "
    allowed_forms = set().union(*(_genre_forms(g) for g in allowed)) if allowed else set()
    for genre in sorted(known):
        forms = _genre_forms(genre) - allowed_forms
        if any(f" {f} " in padded for f in forms):
            return genre
    return None


def judge_rewrite(raw: Optional[str], original: str, *, max_chars: int,
                  candidates: CandidateMatcher | Iterable[str], instruction: str | Sequence[str] = "",
                  user_summary: str = "", values: Optional[Mapping[str, str]] = None,
                  known_genres: Iterable[str] = (), user_genres: Iterable[str] = ()) -> Verdict:
    """Accept a model's rewrite of ``original``, or fall back to ``original`` with the reason.

    instruction: the refiner prompt's own words (the instruction's literal parts and the pattern's purpose);
    user_summary: the summary the model was shown. values: the placeholder values the model saw filled in (see
    ``templatize``); None when it saw the raw template. Numbers are allowed only when the original or the summary
    has them (a title like "Apollo 13"), so a rewrite cannot invent a count that contradicts the prompt.
    known_genres/user_genres: a rewrite may name a genre only if it is one of the user's (or in the original).
    The accepted text is the templatized rewrite (placeholders restored)."""
    matcher = candidates if isinstance(candidates, CandidateMatcher) else CandidateMatcher(candidates)

    def reject(reason: str, cleaned: Optional[str], detail: Optional[str] = None) -> Verdict:
        return Verdict(text=original, accepted=False, reason=reason, cleaned=cleaned, detail=detail)

    if raw is None:
        return reject("generator_failed", None)
    text = clean_rewrite(raw)
    if values:
        text = templatize(text, original, values)
    if not normalize(text):
        return reject("empty", text)
    if _REFUSAL.search(text):
        return reject("refusal", text)
    echo = _echo(text, original, instruction, user_summary)
    if echo:
        return reject("copies_instruction", text, echo)
    if len(text) > max_chars:
        return reject("too_long", text, f"{len(text)} > {max_chars} chars")
    want, got = placeholders(original) or set(), placeholders(text)
    if got is None:
        return reject("new_placeholder", text, "unbalanced braces")
    if want - got:
        return reject("lost_placeholder", text, ", ".join(sorted(want - got)))
    if got - want:
        return reject("new_placeholder", text, ", ".join(sorted(got - want)))
    allowed_numbers = set(_NUMBER.findall(original)) | set(_NUMBER.findall(user_summary))
    new_numbers = [n for n in _NUMBER.findall(text) if n not in allowed_numbers]
    if new_numbers:
        return reject("adds_number", text, ", ".join(new_numbers))
    named = matcher.find(text)
    if named is not None:
        return reject("names_candidate", text, named)
    genre = wrong_genre(text, known_genres, list(user_genres) + normalize(original).split())
    if genre is not None:
        return reject("wrong_genre", text, genre)
    return Verdict(text=text, accepted=True, cleaned=text)


# --------------------------------------------------------------------------------------------------------------
# the user summary
# --------------------------------------------------------------------------------------------------------------

def _field(ctx: Any, *names: str, default: Any = ()) -> Any:
    for name in names:
        value = ctx.get(name) if isinstance(ctx, Mapping) else getattr(ctx, name, None)
        if value is not None:
            return value
    return default


def _short_title(title: str) -> str:
    """"Shawshank Redemption, The (1994)" -> "The Shawshank Redemption": shorter, and how people write it."""
    base = _PARENS.sub("", str(title)).strip()
    m = _ARTICLE_SUFFIX.match(base)
    return f"{m.group('art').capitalize()} {m.group('body')}" if m else base


def top_genres(ctx: Any, n: int = 3) -> list[str]:
    """The n most frequent genres of the user's history (ties by name, so it is deterministic)."""
    counts: Counter = Counter()
    for g in _field(ctx, "history_genres", "genres"):
        counts.update([g] if isinstance(g, str) else list(g))
    return [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def user_summary(ctx: Any, n_genres: int = 3, n_titles: int = 3) -> str:
    """A one-line description of the user for the refiner: the most frequent genres of the history (ties by
    name, so it is deterministic) and the most recent titles. Titles that equal a candidate's title (MovieLens
    has distinct items with the same title) are left out, so the summary itself never names a candidate."""
    titles = list(_field(ctx, "history_titles", "history"))
    candidate_titles = list(_field(ctx, "candidate_titles", "candidates"))
    top = top_genres(ctx, n_genres)
    forbidden = {normalize(t) for t in candidate_titles}
    recent = [t for t in reversed(titles) if normalize(t) not in forbidden][:n_titles]
    parts = []
    if top:
        parts.append("likes " + ", ".join(top))
    if recent:
        parts.append("recently watched " + ", ".join(_short_title(t) for t in recent))
    return "; ".join(parts) if parts else "no history yet"


# --------------------------------------------------------------------------------------------------------------
# the cache of raw answers
# --------------------------------------------------------------------------------------------------------------

class RefinementCache:
    """Raw refiner answers in a small SQLite table, keyed on the full request. Failures are not cached (a later
    run retries them). Safe across threads (one connection behind a lock) and processes (WAL, busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS refinements (key TEXT PRIMARY KEY, identity TEXT NOT NULL, "
                "sentence TEXT NOT NULL, output TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise RuntimeError(f"refinement cache {self.path}: cannot be opened ({exc}); delete the file to reset "
                               f"it") from None

    @staticmethod
    def key(identity: str, messages: Sequence[Mapping], max_new_tokens: int, temperature: float) -> str:
        payload = json.dumps({"v": 1, "identity": identity, "messages": [dict(m) for m in messages],
                              "max_new_tokens": max_new_tokens, "temperature": temperature},
                             sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            return {}
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i:i + 500])
                rows = self._db.execute(
                    f"SELECT key, output FROM refinements WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                out.update(dict(rows))
        return out

    def put_many(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """rows: (key, identity, sentence, output)."""
        now = time.time()
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO refinements (key, identity, sentence, output, created) VALUES (?, ?, ?, ?, ?)",
                [(k, ident, s, o, now) for k, ident, s, o in rows],
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM refinements").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------------------------
# the refiner
# --------------------------------------------------------------------------------------------------------------

def _action_text(action: Any) -> str:
    return action if isinstance(action, str) else str(getattr(action, "text", "") or "")


def placeholder_values(ctx: Any, picks: Mapping[str, Any], item_noun: str) -> dict[str, str]:
    """The values the builder will give the placeholders of this user's prompt (see rpp.prompts.PLACEHOLDERS)."""
    from rpp.prompts.builder import pluralize

    history = list(_field(ctx, "history_titles", "history"))
    values = {"item_noun": item_noun, "item_noun_plural": pluralize(item_noun),
              "last_item": str(history[-1]) if history else ""}
    params = getattr(picks.get("history"), "params", None) or {}
    if "window" in params:
        values["n_history"] = str(min(int(params["window"]), len(history)))
    return values


@dataclass
class _Job:
    """One sentence of one user to refine in this step."""

    user: int
    pattern: str
    template: str
    """The chosen action's text, placeholders unfilled."""
    values: dict
    summary: str
    genres: list
    """The user's top genres (the ones the summary names)."""
    matcher: CandidateMatcher
    messages: tuple = ()
    key: str = ""


class Refiner:
    """Rewrites the chosen sentences of a batch of users (one ``generate`` call per refining step), guarded and
    cached. ``refine`` is what ``StepCore`` calls; ``stats`` is what training/evaluation/benchmark report."""

    def __init__(self, cfg: RefinerConfig, generator: Any, *, genres: Iterable[str], item_noun: str = "item",
                 cache: Optional[RefinementCache] = None, patterns: Sequence[str] = PATTERNS) -> None:
        fields = placeholders(cfg.instruction)
        if fields is None:
            raise ValueError("refiner.instruction: unbalanced braces (write a literal brace as {{ or }})")
        unknown = fields - INSTRUCTION_FIELDS
        if unknown:
            raise ValueError(f"refiner.instruction: unknown placeholder(s) {sorted(unknown)}; allowed: "
                             f"{sorted(INSTRUCTION_FIELDS)}")
        if "sentence" not in fields:
            raise ValueError("refiner.instruction must contain {sentence} (the sentence to rewrite)")
        bad = set(patterns) - set(PATTERN_PURPOSES)
        if bad:
            raise ValueError(f"refiner patterns: unknown pattern(s) {sorted(bad)}; known: {list(PATTERNS)}")
        self.cfg = cfg
        self.generator = generator
        self.item_noun = item_noun
        self.cache = cache
        self.patterns = tuple(patterns)
        self.identity = str(getattr(generator, "identity", type(generator).__name__))
        self._instruction_parts = tuple(lit for lit, *_ in string.Formatter().parse(cfg.instruction) if lit.strip())
        self._lock = threading.Lock()
        self._stats = self._empty_stats()
        self.known_genres: frozenset[str] = frozenset(str(g) for g in genres if str(g).strip())
        """The vocabulary of the wrong_genre guard: every genre of the dataset (``dataset_genres``), fixed when the
        refiner is made, so a rewrite's verdict never depends on which users were refined before it."""
        self.last_verdicts: list[Optional[dict[str, Verdict]]] = []
        """Per user of the last refine() call: pattern -> Verdict (None on non-refining steps); for logs."""

    @staticmethod
    def _empty_stats() -> dict:
        return {"refine_steps": 0, "skipped_steps": 0, "calls": 0, "requests": 0, "cache_hits": 0,
                "sentences": 0, "skipped_empty": 0, "accepted": 0, "accepted_unchanged": 0,
                "rejected_by_reason": {r: 0 for r in REJECTION_REASONS}, "wall_s": 0.0}

    def should_refine(self, step: int) -> bool:
        """Steps 0, k, 2k, ... refine (k = every_k_steps)."""
        return step % self.cfg.every_k_steps == 0

    def _purpose(self, pattern: str) -> str:
        return pattern_purpose(pattern, self.item_noun)

    def messages(self, sentence: str, pattern: str, summary: str) -> tuple[dict, ...]:
        """The chat prompt that asks for one rewrite of ``sentence`` (placeholders already filled); it is also
        the main part of the cache key."""
        content = self.cfg.instruction.format(purpose=self._purpose(pattern), user_summary=summary,
                                              sentence=sentence, item_noun=self.item_noun)
        return ({"role": "system", "content": REFINER_SYSTEM}, {"role": "user", "content": content})

    def refine(self, contexts: Sequence[Any], chosen: Sequence[Mapping[str, Any]], step: int
               ) -> list[Optional[dict[str, str]]]:
        """Rewritten sentence per pattern for each user, or None for every user on a step that does not refine.

        contexts: UserContext per user; chosen: pattern -> Action per user. Each returned dict holds every pattern
        of ``chosen``: the accepted rewrite, or the original text (empty sentences, rejected rewrites). Texts are
        templates with their {placeholders}, like action texts; the builder fills them.
        """
        from rpp.prompts.builder import fill_placeholders

        if len(contexts) != len(chosen):
            raise ValueError(f"refine: {len(contexts)} contexts but {len(chosen)} chosen-action dicts")
        if not self.should_refine(step):
            with self._lock:
                self._stats["skipped_steps"] += 1
            self.last_verdicts = [None] * len(contexts)
            return [None] * len(contexts)

        results: list[dict[str, str]] = []
        jobs: list[_Job] = []
        skipped = 0
        for i, (ctx, picks) in enumerate(zip(contexts, chosen)):
            out = {p: _action_text(a) for p, a in picks.items()}
            results.append(out)
            summary = user_summary(ctx)
            matcher = CandidateMatcher(_field(ctx, "candidate_titles", "candidates"))
            values = placeholder_values(ctx, picks, self.item_noun)
            for pattern in self.patterns:
                if pattern not in out:
                    continue
                if not out[pattern].strip():
                    skipped += 1  # "no role" stays empty: nothing to personalise, and a rewrite would invent one
                    continue
                job = _Job(i, pattern, out[pattern], values, summary, top_genres(ctx), matcher)
                job.messages = self.messages(fill_placeholders(job.template, values), pattern, summary)
                job.key = RefinementCache.key(self.identity, job.messages, self.cfg.max_new_tokens,
                                              self.cfg.temperature)
                jobs.append(job)

        start = time.perf_counter()
        answers: dict[str, Optional[str]] = {}
        if self.cache is not None:
            answers.update(self.cache.get_many([j.key for j in jobs]))
        hits = sum(1 for j in jobs if j.key in answers)
        todo: dict[str, _Job] = {}
        for job in jobs:
            if job.key not in answers:
                todo.setdefault(job.key, job)  # identical requests in one batch are asked once
        calls = 0
        if todo:
            prompts = [j.messages for j in todo.values()]
            outputs = self.generator.generate(prompts, self.cfg.max_new_tokens)
            calls = 1
            if len(outputs) != len(prompts):
                raise RuntimeError(f"refiner generator {self.identity} returned {len(outputs)} answers for "
                                   f"{len(prompts)} prompts")
            fresh = dict(zip(todo.keys(), outputs))
            answers.update(fresh)
            if self.cache is not None:
                self.cache.put_many((k, self.identity, todo[k].template, o) for k, o in fresh.items() if o is not None)
        wall = time.perf_counter() - start

        verdicts: list[dict[str, Verdict]] = [{} for _ in contexts]
        for job in jobs:
            v = judge_rewrite(answers.get(job.key), job.template, max_chars=self.cfg.max_chars,
                              candidates=job.matcher, instruction=self._instruction_parts + (self._purpose(job.pattern),),
                              user_summary=job.summary, values=job.values, known_genres=self.known_genres,
                              user_genres=job.genres)
            verdicts[job.user][job.pattern] = v
            results[job.user][job.pattern] = v.text
        self.last_verdicts = verdicts

        with self._lock:
            s = self._stats
            s["refine_steps"] += 1
            s["calls"] += calls
            s["requests"] += len(todo)
            s["cache_hits"] += hits
            s["sentences"] += len(jobs)
            s["skipped_empty"] += skipped
            s["wall_s"] += wall
            for job in jobs:
                v = verdicts[job.user][job.pattern]
                if v.accepted:
                    s["accepted"] += 1
                    s["accepted_unchanged"] += int(normalize(v.text) == normalize(job.template))
                else:
                    s["rejected_by_reason"][v.reason] += 1
        return results

    def stats(self) -> dict:
        """Counts so far: calls (generate() batches), requests (prompts the model answered), cache_hits,
        sentences judged, skipped_empty, accepted (accepted_unchanged: the 'rewrite' equals the original up to
        case/punctuation), rejected and rejected_by_reason, acceptance_rate, wall_s and s_per_call/s_per_request
        (time in the generator and cache, excluding guards)."""
        with self._lock:
            s = json.loads(json.dumps(self._stats))
        s["rejected"] = sum(s["rejected_by_reason"].values())
        s["acceptance_rate"] = s["accepted"] / s["sentences"] if s["sentences"] else None
        s["s_per_call"] = s["wall_s"] / s["calls"] if s["calls"] else None
        s["s_per_request"] = s["wall_s"] / s["requests"] if s["requests"] else None
        return s

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = self._empty_stats()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def refinement_cache_path(cfg: Config) -> Path:
    """refinements.sqlite next to the response cache: the folder of llm.cache_path when set, else $RPP_CACHE."""
    if cfg.llm.cache_path:
        return Path(cfg.llm.cache_path).expanduser().parent / "refinements.sqlite"
    return cache_root() / "refinements.sqlite"


def dataset_genres(dataset: Any) -> frozenset[str]:
    """Every genre name of a dataset's items (``rpp.data.Dataset``): the wrong_genre guard's vocabulary."""
    return frozenset(g for item in dataset.items["item"].tolist() for g in dataset.genres(item))


def make_refiner(cfg: Config, generator: Any = None, dataset: Any = None) -> Optional[Refiner]:
    """The RPP+ refiner of a config, or None when ``refiner.enabled`` is false.

    generator: a TextGenerator to use instead of ``rpp.llm.make_generator(cfg.refiner)`` (tests, sharing one
    loaded model). dataset: the loaded ``cfg.data`` dataset, whose genres are the guard's vocabulary (loaded
    from cfg.data when not given). The cache follows ``llm.cache`` (``--no-cache`` turns both off)."""
    if not cfg.refiner.enabled:
        return None
    if dataset is None:
        from rpp.data import load_dataset

        dataset = load_dataset(cfg.data)
    if generator is None:
        from rpp.llm import make_generator

        generator = make_generator(cfg.refiner)
    cache = RefinementCache(refinement_cache_path(cfg)) if cfg.llm.cache else None
    return Refiner(cfg.refiner, generator, genres=dataset_genres(dataset), item_noun=cfg.data.item_noun, cache=cache)
