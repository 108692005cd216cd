"""The ranking interface every backend implements, and the records it returns.

A ``RankRequest`` is a prompt (chat messages) plus the candidate titles in presented order. A ``Ranking`` is the
order over those candidates (indices, best first) with per-candidate scores where the backend knows them, the
share of candidates the model's answer actually covered, usage, and whether it came from the cache or failed.
A failed request is never dropped: it comes back in presented order with ``failed=True`` and is counted.

Errors. A call to a model server that still fails after its bounded retries raises one of the typed
``LLMCallError``s below inside the backend, which turns it into that counted failure (``Ranking.error`` names the
type). A server answer that is not what the API promises is ``UnparseableResponse``: never retried (the same
request gets the same answer), counted apart in ``Usage.unparseable``. Anything else (a bug of ours) propagates.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

CANDIDATES_PLACEHOLDER = "{candidate_list}"
"""The literal marker where a prompt shows the numbered candidate list (rpp.prompts.PromptBuilder writes it wherever
the list is shown). Every ranker replaces it with the list in the order it PRESENTS the candidates, which is what
lets bootstrapping (cfg.llm.bootstrap) shuffle the list the model sees; BootstrapRanker refuses a prompt without
it, since shuffling candidates the model never sees in order changes nothing (score mode) or maps a numbered
answer to the wrong list (generate mode)."""


class LLMError(RuntimeError):
    """Base class of the errors raised by the LLM layer."""


class LLMCallError(LLMError):
    """A call to a model server that failed after `retries` retries, or with an answer not worth retrying (a 4xx
    other than 429: the request itself is wrong). Backends turn it into a counted failed Ranking."""

    def __init__(self, message: str, retries: int = 0) -> None:
        super().__init__(message)
        self.retries = retries


class RateLimitError(LLMCallError):
    """HTTP 429 on every attempt."""


class LLMTimeoutError(LLMCallError):
    """No answer within the timeout on every attempt."""


class ServerError(LLMCallError):
    """HTTP 5xx, or a connection refused or dropped, on every attempt."""


class UnparseableResponse(LLMCallError):
    """The server answered, but not in the shape the API promises (invalid JSON, no choices, no log-probs where
    they were asked for). Not retried; counted in Usage.unparseable as well as in failures."""


class ScoreModeUnsupported(LLMError):
    """The backend cannot give prompt log-probabilities (or gives them wrong); use generate mode."""


@dataclass(frozen=True)
class RankRequest:
    messages: tuple
    """Chat messages as a tuple of {"role", "content"} dicts; the last one is the user's turn."""
    candidates: tuple
    """Candidate titles in presented order."""
    tags: dict = field(default_factory=dict, compare=False)
    """Bookkeeping for instrumented rankers, never sent to a model and not part of the cache key: the environment
    puts the user id and the chosen action ids here ({"user": id, "actions": {pattern: id}}), which is all the
    planted ranker (rpp.llm.planted) reads. Real rankers ignore it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        object.__setattr__(self, "candidates", tuple(str(c) for c in self.candidates))
        object.__setattr__(self, "tags", dict(self.tags or {}))
        if not self.candidates:
            raise ValueError("a RankRequest needs at least one candidate")


@dataclass
class Usage:
    calls: int = 0
    """Requests answered by a model (cache hits excluded)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    failures: int = 0
    """Requests that came back in presented order (failed calls, unparseable answers included)."""
    retries: int = 0
    wall_s: float = 0.0
    unparseable: int = 0
    """Of the failures: answers the server gave in a shape the API does not allow (never retried)."""

    def add(self, other: "Usage") -> None:
        for name in ("calls", "prompt_tokens", "completion_tokens", "cache_hits", "failures", "retries", "wall_s",
                     "unparseable"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.calls} LLM calls, {self.cache_hits} cache hits, {self.failures} failures "
                f"({self.unparseable} unparseable), "
                f"{self.retries} retries, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                f"{self.wall_s:.1f} s")


@dataclass
class Ranking:
    order: list
    """Candidate indices, best first; always a permutation of range(len(candidates))."""
    scores: Optional[list] = None
    """Per-candidate score in PRESENTED order (higher = better), where the backend knows them."""
    coverage: float = 1.0
    """Share of candidates placed by the model itself (generate mode); the rest were appended in presented order."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    cached: bool = False
    failed: bool = False
    error: Optional[str] = None
    raw: Optional[str] = None
    """The model's text answer (generate mode)."""
    retries: int = 0
    """Retried attempts spent on this request (network backends); summed into Usage.retries."""
    unparseable: bool = False
    """Failed because the server's answer was malformed (UnparseableResponse), not because the call failed."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Ranking":
        return cls(**d)

    @classmethod
    def presented_order(cls, n: int, error: str, *, retries: int = 0, unparseable: bool = False) -> "Ranking":
        """The fallback for a request that failed after its retries: presented order, counted as a failure."""
        return cls(order=list(range(n)), scores=None, coverage=0.0, failed=True, error=error, retries=retries,
                   unparseable=unparseable)


class UsageTracker:
    """Thread-safe running totals, one per ranker (and per refiner)."""

    def __init__(self) -> None:
        from rpp.llm.failures import FailureLog

        self._lock = threading.Lock()
        self.total = Usage()
        self.batches = 0
        """Calls to rank()/generate() (a batch of N requests counts once)."""
        self.failures = FailureLog()
        """Failed requests per named phase, with causes and the failure budget (rpp.llm.failures)."""

    def record(self, rankings: Sequence[Ranking] = (), *, retries: int = 0, wall_s: float = 0.0) -> None:
        """Count one rank() call: its rankings (cache hits apart), the retries they carry plus `retries`."""
        with self._lock:
            self.batches += 1
            self.total.retries += retries
            self.total.wall_s += wall_s
            for r in rankings:
                if r.cached:
                    self.total.cache_hits += 1
                    continue
                self.total.calls += 1
                self.total.failures += int(r.failed)
                self.total.unparseable += int(r.failed and r.unparseable)
                self.total.retries += r.retries
                self.total.prompt_tokens += r.prompt_tokens
                self.total.completion_tokens += r.completion_tokens
        self.failures.observe(rankings)  # after counting: may raise FailureBudgetExceeded

    def record_calls(self, *, calls: int, failures: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
                     retries: int = 0, cache_hits: int = 0, wall_s: float = 0.0, unparseable: int = 0) -> None:
        """Count one generate() call of a TextGenerator (no Ranking objects there)."""
        with self._lock:
            self.batches += 1
            self.total.calls += calls
            self.total.failures += failures
            self.total.unparseable += unparseable
            self.total.prompt_tokens += prompt_tokens
            self.total.completion_tokens += completion_tokens
            self.total.retries += retries
            self.total.cache_hits += cache_hits
            self.total.wall_s += wall_s

    def snapshot(self) -> Usage:
        with self._lock:
            return Usage(**self.total.to_dict())


class Ranker(ABC):
    """Ranks candidates for a batch of prompts. Implementations must return one Ranking per request, in order,
    and never raise for a single bad answer or a single failed call (those become counted failures)."""

    identity: str = "ranker"
    """Everything about the model that changes its answers (backend, model, weights hash, dtype, mode, ...);
    part of every cache key."""

    def __init__(self) -> None:
        self.usage = UsageTracker()

    @abstractmethod
    def rank(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        ...

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


class TextGenerator(ABC):
    """Writes one completion per chat prompt (used by the RPP+ refiner). Failures return None, counted."""

    identity: str = "generator"

    def __init__(self) -> None:
        self.usage = UsageTracker()

    @abstractmethod
    def generate(self, prompts: Sequence[tuple], max_new_tokens: int) -> list[Optional[str]]:
        ...

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


def format_candidate_list(candidates: Sequence[str]) -> str:
    """The numbered list shown to the model: "1. title" per line (the parser maps "1" back to the first)."""
    return "\n".join(f"{i}. {title}" for i, title in enumerate(candidates, start=1))


def render_candidates(request: RankRequest) -> RankRequest:
    """Replace CANDIDATES_PLACEHOLDER in the messages by the numbered list of the request's candidates."""
    if not any(CANDIDATES_PLACEHOLDER in str(m.get("content", "")) for m in request.messages):
        return request
    listing = format_candidate_list(request.candidates)
    messages = tuple({**m, "content": str(m.get("content", "")).replace(CANDIDATES_PLACEHOLDER, listing)}
                     for m in request.messages)
    return RankRequest(messages=messages, candidates=request.candidates)


class BootstrapRanker(Ranker):
    """Ranks B orders of each request's candidates (the presented one, then B-1 seeded shuffles) in ONE inner
    call and aggregates them, against the model's position bias: scores are summed per candidate where the
    inner ranker gives scores, else Borda points (n-1 for first place, 0 for last) are summed. The shuffles
    are seeded by (seed, messages, candidates), so the same request always gets the same orders. Each order is
    SHOWN to the model through CANDIDATES_PLACEHOLDER; a request without the marker is refused (ValueError)."""

    def __init__(self, inner: Ranker, bootstrap: int, seed: int = 0) -> None:
        super().__init__()
        if bootstrap < 1:
            raise ValueError("bootstrap must be >= 1")
        self.inner, self.bootstrap, self.seed = inner, int(bootstrap), int(seed)
        self.identity = f"{inner.identity}|bootstrap={self.bootstrap}|seed={self.seed}"

    def permutations(self, request: RankRequest) -> list[list[int]]:
        import hashlib
        import json
        import random

        n = len(request.candidates)
        digest = hashlib.sha256(json.dumps([self.seed, list(request.messages), list(request.candidates)],
                                           sort_keys=True).encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        perms = [list(range(n))]
        for _ in range(self.bootstrap - 1):
            p = list(range(n))
            rng.shuffle(p)
            perms.append(p)
        return perms

    def rank(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        timer = timed()
        for r in requests:
            if not any(CANDIDATES_PLACEHOLDER in str(m.get("content", "")) for m in r.messages):
                raise ValueError(
                    f"llm.bootstrap={self.bootstrap} shuffles the candidate list shown in the prompt, but this prompt "
                    f"shows none (no {CANDIDATES_PLACEHOLDER} marker): set prompt.show_candidates=true or "
                    "llm.bootstrap=1")
        perms = [self.permutations(r) for r in requests]
        expanded = [render_candidates(RankRequest(messages=r.messages,
                                                  candidates=tuple(r.candidates[i] for i in p)))
                    for r, ps in zip(requests, perms) for p in ps]
        inner = self.inner.rank(expanded)
        out = []
        for k, (req, ps) in enumerate(zip(requests, perms)):
            parts = inner[k * self.bootstrap:(k + 1) * self.bootstrap]
            out.append(self._aggregate(len(req.candidates), ps, parts))
        self.usage.record(out, wall_s=timer.elapsed)
        return out

    @staticmethod
    def _aggregate(n: int, perms: list, parts: list) -> Ranking:
        ok = [(p, r) for p, r in zip(perms, parts) if not r.failed]
        retries = sum(r.retries for r in parts)
        tokens = (sum(r.prompt_tokens for r in parts), sum(r.completion_tokens for r in parts))
        if not ok:
            failed = Ranking.presented_order(n, "; ".join(sorted({str(r.error) for r in parts})), retries=retries,
                                             unparseable=any(r.unparseable for r in parts))
            failed.prompt_tokens, failed.completion_tokens = tokens
            return failed
        totals = [0.0] * n
        use_scores = all(r.scores is not None for _, r in ok)
        for perm, r in ok:
            if use_scores:
                for j, s in enumerate(r.scores):
                    totals[perm[j]] += s
            else:
                for pos, j in enumerate(r.order):
                    totals[perm[j]] += n - 1 - pos
        order = sorted(range(n), key=lambda i: (-totals[i], i))
        return Ranking(order=order, scores=totals, coverage=sum(r.coverage for _, r in ok) / len(ok),
                       prompt_tokens=tokens[0], completion_tokens=tokens[1],
                       wall_s=sum(r.wall_s for r in parts), retries=retries,
                       raw="\n---\n".join(r.raw for _, r in ok if r.raw) or None,
                       error=None if len(ok) == len(parts) else f"{len(parts) - len(ok)} of {len(parts)} orders failed")

    def close(self) -> None:
        self.inner.close()


def timed() -> "_Timer":
    return _Timer()


@dataclass
class _Timer:
    start: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
