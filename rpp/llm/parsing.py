"""Map a model's free-text ranked list back onto the candidates, and turn scores into an order.

Small models answer messily: prose around a list, numbers instead of titles, titles in another case or without
the year, repeated items, items that are not candidates, or nothing at all. The parser reads the answer line by
line and, per line, tries in turn:

1. titles mentioned in the line (after normalising case and punctuation; the full title, the title without its
   "(year)", and "Godfather, The" read as "The Godfather"), in the order they appear;
2. a fuzzy match of the whole line (list marker stripped) against those title variants (difflib ratio >= 0.75);
3. candidate numbers: a line that is only a number ("3", "3.", "[3]"), bracketed or labelled references
   ("[3]", "#3", "candidate 3") anywhere in the line, or a line of numbers only ("3, 7, 1", "3 > 7 > 1").
   A leading "1." in front of an unknown title or another number ("1. 7") is a rank marker, not candidate 1.

Duplicates are dropped (first mention wins), unmentioned candidates are appended in presented order, and the
coverage is the share of candidates the answer itself placed. A permutation comes back for every input.
"""
from __future__ import annotations

import difflib
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

FUZZY_CUTOFF = 0.75
MIN_VARIANT_CHARS = 6
"""Shorter title variants (e.g. "Heat" without its year) only match a whole line, never inside prose."""

_MARKER = re.compile(r"^\s*(?:[-*\u2022>]+\s*)?(?:#\s*)?[\[(]?(\d{1,3})[\])]?[.):]?(?=\s|$|[^\w])")
_REFERENCE = re.compile(r"\[(\d{1,3})\]|#(\d{1,3})\b|\b(?:candidate|item|option|number|no\.)\s*(\d{1,3})\b", re.I)
_RANK_THEN_NUMBER = re.compile(r"^\s*\d{1,3}[.)]\s+\[?\d")
_NUMBERS_ONLY = re.compile(r"^[\s\d,;>.\-\[\]()#&]*$")
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLE = re.compile(r"^(.*), (The|A|An|Les|La|Le|Il|Das|Der|Die|El)$", re.I)


@dataclass
class ParseResult:
    order: list
    """A permutation of range(n): the answer's picks first, then the rest in presented order."""
    coverage: float
    """Share of candidates placed by the answer itself."""
    placed: list = field(default_factory=list)
    """Candidate indices the answer named, in its order."""
    unmatched: list = field(default_factory=list)
    """Answer lines that named nothing among the candidates."""


_APOSTROPHES = re.compile(r"['\u2019\u02bc]")
_NOT_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """The one normal form of titles and answers, used on both sides of every comparison: accents folded
    ("Cité" -> "cite"; letters of other scripts are kept), lower case, "&" read as "and", apostrophes dropped
    ("Schindler's" -> "schindlers"), every other run of punctuation, underscores and space one space:
    "Shawshank Redemption, The (1994)" -> "shawshank redemption the 1994"."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    folded = _APOSTROPHES.sub("", folded.replace("&", " and "))
    return _NOT_WORD.sub(" ", folded).strip()


def title_variants(title: str) -> list[str]:
    """Normalised ways a model may write a title: as given, without "(year)", with a trailing article moved."""
    out = {normalize(title)}
    bare = _YEAR.sub("", title).strip()
    out.add(normalize(bare))
    m = _ARTICLE.match(bare)
    if m:
        out.add(normalize(f"{m.group(2)} {m.group(1)}"))
        year = title[len(bare):].strip()
        out.add(normalize(f"{m.group(2)} {m.group(1)} {year}"))
    return sorted((v for v in out if v), key=len, reverse=True)


def _title_mentions(line: str, rest: str, variants: list[list[str]]) -> list[int]:
    """Candidates whose title variant occurs in the line (word-bounded), in order of appearance; the longest
    match wins where two overlap ("Heat" inside "Heat Wave")."""
    norm = f" {normalize(line)} "
    whole = normalize(rest)
    spans = []
    for idx, vs in enumerate(variants):
        for v in vs:
            if len(v) < MIN_VARIANT_CHARS and v != whole:
                continue
            pos = norm.find(f" {v} ")
            if pos >= 0:
                spans.append((pos, -(len(v)), idx))
                break
    spans.sort()
    taken, end_of_last = [], -1
    for pos, neg_len, idx in spans:
        if pos >= end_of_last:
            taken.append(idx)
            end_of_last = pos + (-neg_len) + 1
    return taken


def _fuzzy(text: str, variants: list[list[str]]) -> list[int]:
    key = normalize(text.strip(" \"'*`_"))
    if len(key) < 4:
        return []
    best, best_ratio = None, 0.0
    for idx, vs in enumerate(variants):
        for v in vs:
            ratio = difflib.SequenceMatcher(None, key, v).ratio()
            if ratio > best_ratio:
                best, best_ratio = idx, ratio
    return [best] if best is not None and best_ratio >= FUZZY_CUTOFF else []


def _numbers(line: str, rest: str, marker: str | None, n: int) -> list[int]:
    def valid(nums):
        return [int(x) - 1 for x in nums if x and 1 <= int(x) <= n]

    if marker and not re.search(r"[^\W\d_]", rest):  # no letters: "3", "3.", "[4] [2]", "1. 42"
        if _RANK_THEN_NUMBER.match(line):  # "1. 42": a rank marker, then the pick
            return valid(re.findall(r"\d{1,3}", rest))
        return valid(re.findall(r"\d{1,3}", line))
    refs = [next(g for g in m.groups() if g) for m in _REFERENCE.finditer(line)]
    if refs:
        return valid(refs)
    if _NUMBERS_ONLY.match(line):
        return valid(re.findall(r"\d{1,3}", line))
    return []


def parse_ranking(text: str | None, candidates: Sequence[str]) -> ParseResult:
    """Map a free-text ranked list onto candidate indices (see the module docstring for the rules)."""
    n = len(candidates)
    variants = [title_variants(c) for c in candidates]
    placed: list[int] = []
    seen: set[int] = set()
    unmatched: list[str] = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        m = _MARKER.match(line)
        marker = m.group(1) if m else None
        rest = line[m.end():] if m else line
        picks = _title_mentions(line, rest, variants) or _fuzzy(rest, variants) or _numbers(line, rest, marker, n)
        if not picks:
            unmatched.append(line.strip())
        for idx in picks:
            if idx not in seen:
                seen.add(idx)
                placed.append(idx)
    order = placed + [i for i in range(n) if i not in seen]
    return ParseResult(order=order, coverage=len(placed) / n if n else 0.0, placed=placed, unmatched=unmatched)


def order_from_scores(scores: Sequence[float]) -> list[int]:
    """Indices by descending score; ties (and NaN, treated as -inf) keep the presented order, so the result is a
    deterministic permutation and no ranker (LLM or classic) profits from the slot the target happens to sit in."""
    def key(i: int):
        s = scores[i]
        return (-(s if s is not None and not math.isnan(s) else -math.inf), i)

    return sorted(range(len(scores)), key=key)
