"""Ranking metrics for a single held-out target per user, as small pure functions over arrays.

Convention: ``ranks`` are 0-based positions of the target in a ranking (0 = ranked first). With one relevant
item the ideal DCG is 1, so NDCG@k = 1 / log2(rank + 2) when rank < k, else 0; HR@k = [rank < k];
MRR = 1 / (rank + 1). Ties never arise: a ranking is a permutation, and the ranker breaks score ties by the
presented order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _ranks(ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.size and (arr.min() < 0 or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError("ranks must be non-negative integers (0 = ranked first)")
    return arr.astype(np.int64)


def ndcg_at_k(ranks, k: int) -> np.ndarray:
    r = _ranks(ranks)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def hit_at_k(ranks, k: int) -> np.ndarray:
    return (_ranks(ranks) < k).astype(np.float64)


def mrr(ranks) -> np.ndarray:
    return 1.0 / (_ranks(ranks) + 1.0)


def target_rank(order: Sequence[int], target_index: int) -> int:
    """0-based position of candidate `target_index` in `order` (candidate indices, best first)."""
    for pos, idx in enumerate(order):
        if idx == target_index:
            return pos
    raise ValueError(f"target candidate {target_index} is not in the ranking {list(order)}")


METRIC_NAMES = ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr")


def all_metrics(ranks) -> dict[str, np.ndarray]:
    """Per-user values of every reported metric."""
    return {
        "ndcg@1": ndcg_at_k(ranks, 1), "ndcg@5": ndcg_at_k(ranks, 5), "ndcg@10": ndcg_at_k(ranks, 10),
        "hr@1": hit_at_k(ranks, 1), "hr@5": hit_at_k(ranks, 5), "hr@10": hit_at_k(ranks, 10),
        "mrr": mrr(ranks),
    }


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Mean with a percentile bootstrap (1 - alpha) confidence interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))


@dataclass(frozen=True)
class PairedTest:
    mean_diff: float
    """mean(a - b)"""
    relative_change: float
    """mean(a) / mean(b) - 1"""
    p_value: float
    """two-sided Wilcoxon signed-rank p-value (zero differences dropped); 1.0 when all differences are zero."""
    n: int


def paired_test(a, b) -> PairedTest:
    """Compare two methods on the SAME users (a[i] and b[i] belong to user i)."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired test needs the same users for both methods: {x.shape} vs {y.shape}")
    diff = x - y
    if x.size == 0 or np.allclose(diff, 0):
        p = 1.0
    else:
        p = float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)
    base = y.mean() if y.size else float("nan")
    rel = float(x.mean() / base - 1) if y.size and base != 0 else float("nan")
    return PairedTest(float(diff.mean()) if x.size else float("nan"), rel, p, int(x.size))


def summarize(ranks, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Every metric's mean and 95% bootstrap CI for a set of per-user target ranks."""
    return {name: bootstrap_ci(vals, n_boot=n_boot, seed=seed) for name, vals in all_metrics(ranks).items()}


CLEARLY_ABOVE_RANDOM = 0.02
"""The ranker check asks for at least this much NDCG over a random order, with a CI of the gain above zero."""


def random_ndcg(n_candidates: int, k: int) -> float:
    """Expected NDCG@k of the target when a random order puts it at any of the n_candidates slots alike."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    return float(ndcg_at_k(np.arange(n_candidates), k).mean())


@dataclass(frozen=True)
class RandomCheck:
    """Is a ranker clearly better than a random order on these users? (see ``check_above_random``)"""

    metric: str
    ranker: float
    """mean NDCG@k of the ranker"""
    random: float
    """mean of each user's exact random expectation (per user, it depends only on the number of candidates)"""
    gain: Estimate
    """mean per-user (ranker - random expectation) with its percentile-bootstrap CI"""
    threshold: float
    passes: bool
    """gain.low > 0 and gain.mean >= threshold"""


def check_above_random(ranks, n_candidates, k: int = 10, n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05, threshold: float = CLEARLY_ABOVE_RANDOM) -> RandomCheck:
    """The ranker sanity check shared by training (``rpp.agents.check_ranker``) and the benchmark.

    Rewards from a ranker at chance level are noise, so a ranker must show a mean NDCG@k gain over the exact
    random expectation whose (1 - alpha) bootstrap CI lies above 0, and a gain of at least ``threshold``. The
    mean is what rewards and reports average; a signed-rank test against a constant tests a median instead,
    which for the zero-inflated per-user NDCG passes chance-level rankers and misses better ones.

    ranks: 0-based target ranks per user; n_candidates: one count for all users or one per user."""
    values = ndcg_at_k(ranks, k)
    counts = np.broadcast_to(np.asarray(n_candidates), values.shape)
    if values.size == 0:
        raise ValueError("the ranker check needs at least one user")
    expected = {int(n): random_ndcg(int(n), k) for n in np.unique(counts)}
    rnd = np.array([expected[int(n)] for n in counts])
    gain = bootstrap_ci(values - rnd, n_boot=n_boot, alpha=alpha, seed=seed)
    return RandomCheck(metric=f"ndcg@{k}", ranker=float(values.mean()), random=float(rnd.mean()), gain=gain,
                       threshold=threshold, passes=bool(gain.low > 0 and gain.mean >= threshold))


def adjust_p_values(p_values, method: str = "holm") -> np.ndarray:
    """Family-wise corrected p-values for testing several hypotheses at once (capped at 1).

    bonferroni: p * m. holm: Holm's step-down version, never larger than Bonferroni and as strict about the
    family-wise error rate: the i-th smallest p (0-based) times (m - i), made non-decreasing in that order."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.isnan(p).any():
        raise ValueError("p_values must be a flat sequence of numbers in [0, 1]")
    m = p.size
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    if method != "holm":
        raise ValueError(f"unknown correction {method!r} (holm or bonferroni)")
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def choice_diversity(choices) -> tuple[int, float]:
    """(number of distinct choices, entropy in bits of their distribution) over a sequence of hashable choices,
    e.g. the prompt (tuple of action ids) a policy gives each user: 1 and 0.0 when everyone gets the same."""
    counts = np.array(list(Counter(choices).values()), dtype=np.float64)
    if counts.size == 0:
        return 0, 0.0
    p = counts / counts.sum()
    return int(counts.size), float(max(0.0, -(p * np.log2(p)).sum()))
