"""Failed ranker requests counted per phase, with their causes, and the failure budget that stops a phase.

A failed request comes back in presented order (rpp.llm.base.Ranking.failed) so one bad call never crashes a run;
but a run fed mostly by failures is not a result. Every ranker's ``usage`` (UsageTracker) holds a ``FailureLog``;
the caller names what it is doing:

    with phase(ranker, "validation choices", cfg.llm.max_failure_rate):
        ...every rank() call in here is counted under that phase...

A phase's failure rate is failed requests / requests (cache answers included). It is over budget when that rate is
above ``max_rate``: checked on every rank() call that failed as a whole or once ``MIN_FAILURES_TO_STOP`` requests
failed (so a dead server stops a phase at its first call, before a checkpoint can save training on failures; one
unlucky request of a batch does not), and once more when the phase ends. Over budget, ``FailureBudgetExceeded``
(an LLMError: the CLI prints its one line and exits non-zero) names the phase, the counts and the main cause.
"""
from __future__ import annotations

import re
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from rpp.llm.base import LLMError

MIN_FAILURES_TO_STOP = 5
"""A phase is stopped before its end only once this many of its requests failed (a phase of 1000 requests is not
stopped by its first unlucky one); at its end the rate alone decides."""


class FailureBudgetExceeded(LLMError):
    """A phase's share of failed ranker requests went over llm.max_failure_rate."""

    def __init__(self, message: str, phase: "PhaseFailures") -> None:
        super().__init__(message)
        self.phase = phase


def failure_cause(error: Optional[str], unparseable: bool = False) -> str:
    """The short cause of a failed request from its Ranking.error text: "connection refused", "timeout",
    "HTTP 500" (any status), "unparseable answer", or the error's type name."""
    text = str(error or "")
    if unparseable:
        return "unparseable answer"
    status = re.search(r"Error code: (\d{3})", text)
    if status:
        return f"HTTP {status.group(1)}"
    low = text.lower()
    if "timeout" in low or "timed out" in low:
        return "timeout"
    if "connection" in low or "refused" in low:
        return "connection refused"
    return text.split(":", 1)[0].strip() or "unknown"


@dataclass
class PhaseFailures:
    """One phase's counts: requests (cache answers included), failed ones, and failures by cause."""

    name: str
    requests: int = 0
    failures: int = 0
    causes: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def add(self, rankings: Sequence) -> None:
        for r in rankings:
            self.requests += 1
            if r.failed:
                self.failures += 1
                self.causes[failure_cause(r.error, r.unparseable)] += 1

    def summary(self) -> str:
        """E.g. "3 of 40 requests failed (7.5%: connection refused 3)"; "0 of 40 requests failed"."""
        text = f"{self.failures} of {self.requests} requests failed"
        if self.failures:
            causes = ", ".join(f"{c} {n}" for c, n in self.causes.most_common())
            text += f" ({100 * self.rate:.1f}%: {causes})"
        return text

    def to_dict(self) -> dict:
        return {"requests": self.requests, "failures": self.failures, "rate": self.rate,
                "causes": dict(self.causes)}

    def over(self, max_rate: Optional[float]) -> bool:
        return max_rate is not None and self.failures > 0 and self.rate > max_rate

    def error(self, max_rate: float) -> FailureBudgetExceeded:
        cause = self.causes.most_common(1)[0][0] if self.causes else "unknown"
        return FailureBudgetExceeded(
            f"{self.name}: {self.summary()}, over the failure budget llm.max_failure_rate={max_rate:g}; "
            f"main cause: {cause}", self)


class FailureLog:
    """Per-phase failure counts of one ranker (lives on its UsageTracker as ``usage.failures``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phases: dict[str, PhaseFailures] = {}
        self._stack: list[tuple[PhaseFailures, Optional[float]]] = []

    def observe(self, rankings: Sequence) -> None:
        """Count a rank() call's rankings under the open phases; raise if the innermost one went over budget."""
        with self._lock:
            if not self._stack:
                return
            for ph, _ in self._stack:
                ph.add(rankings)
            ph, max_rate = self._stack[-1]
        all_failed = bool(rankings) and all(r.failed for r in rankings)  # a dead server fails whole calls
        if (ph.failures >= MIN_FAILURES_TO_STOP or all_failed) and ph.over(max_rate):
            raise ph.error(max_rate)

    @contextmanager
    def phase(self, name: str, max_rate: Optional[float] = None) -> Iterator[PhaseFailures]:
        """Count rank() calls under `name` (counts add up if the name comes back); check the budget at the end
        (max_rate None: count only)."""
        with self._lock:
            ph = self.phases.setdefault(name, PhaseFailures(name))
            self._stack.append((ph, max_rate))
        ok = False
        try:
            yield ph
            ok = True
        finally:
            with self._lock:
                self._stack = [e for e in self._stack if e[0] is not ph]
        if ok and ph.over(max_rate):
            raise ph.error(max_rate)

    def to_dict(self) -> dict:
        with self._lock:
            return {name: ph.to_dict() for name, ph in self.phases.items()}

    def report_lines(self) -> list[str]:
        with self._lock:
            return [f"{name}: {ph.summary()}" for name, ph in self.phases.items()]


def phase(ranker, name: str, max_rate: Optional[float] = None):
    """``ranker.usage.failures.phase(name, max_rate)``: count the ranker's requests under `name`, with a budget."""
    return ranker.usage.failures.phase(name, max_rate)
