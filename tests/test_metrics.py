"""Metric values against hand-computed cases, and the statistics against scipy."""
import math

import numpy as np
import pytest
from scipy import stats

from rpp import metrics


def test_ndcg_hand_computed():
    ranks = [0, 1, 2, 9, 10, 19]
    got = metrics.ndcg_at_k(ranks, 10)
    want = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(metrics.ndcg_at_k(ranks, 1), [1, 0, 0, 0, 0, 0])


def test_hit_and_mrr():
    ranks = np.array([0, 4, 5])
    np.testing.assert_array_equal(metrics.hit_at_k(ranks, 5), [1, 1, 0])
    np.testing.assert_allclose(metrics.mrr(ranks), [1, 0.2, 1 / 6])


def test_k_larger_than_list_counts_every_position():
    # 20 candidates, k = 50: every rank is inside the cut-off, so nothing is zeroed.
    ranks = np.arange(20)
    assert (metrics.ndcg_at_k(ranks, 50) > 0).all()
    assert metrics.hit_at_k(ranks, 50).sum() == 20


def test_target_rank_and_ties_are_impossible():
    assert metrics.target_rank([3, 1, 0, 2], 0) == 2
    with pytest.raises(ValueError):
        metrics.target_rank([1, 2], 0)
    with pytest.raises(ValueError):
        metrics.ndcg_at_k([-1], 10)
    with pytest.raises(ValueError):
        metrics.ndcg_at_k([0.5], 10)


def test_summarize_keys_and_bounds():
    s = metrics.summarize([0, 1, 2, 3], n_boot=200)
    assert set(s) == set(metrics.METRIC_NAMES)
    for est in s.values():
        assert est.low <= est.mean <= est.high


def test_bootstrap_ci_matches_scipy_percentile():
    rng = np.random.default_rng(3)
    x = rng.random(300)
    ours = metrics.bootstrap_ci(x, n_boot=4000, seed=1)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert ours.mean == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.low, abs=4e-3)
    assert ours.high == pytest.approx(ref.high, abs=4e-3)


def test_paired_test_matches_scipy_wilcoxon():
    rng = np.random.default_rng(0)
    a = rng.random(100)
    b = a - 0.05 + 0.1 * rng.random(100)
    res = metrics.paired_test(a, b)
    assert res.p_value == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert res.mean_diff == pytest.approx((a - b).mean())
    assert res.relative_change == pytest.approx(a.mean() / b.mean() - 1)
    assert metrics.paired_test(a, a).p_value == 1.0
    with pytest.raises(ValueError):
        metrics.paired_test(a, b[:10])


def test_choice_diversity_counts_distinct_prompts_and_their_entropy():
    from rpp.metrics import choice_diversity

    assert choice_diversity([("history", "a")] * 5) == (1, 0.0)
    n, bits = choice_diversity(["a", "b", "a", "b"])
    assert n == 2 and bits == pytest.approx(1.0)
    assert choice_diversity(["a", "b", "c", "d"])[1] == pytest.approx(2.0)
    assert choice_diversity([]) == (0, 0.0)
