"""The ranker sanity check: one statistic (the bootstrap CI of the mean per-user NDCG gain over the exact random
expectation), shared by training's check_ranker and the benchmark's report. Pure numpy, simulated rankers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from rpp.metrics import CLEARLY_ABOVE_RANDOM, check_above_random, ndcg_at_k, random_ndcg

N_CANDIDATES = 20
SEEDS = range(100)


def simulated_ranks(n_users: int, p_top: float, seed: int) -> np.ndarray:
    """Target ranks of a simulated ranker: uniform over the slots (a random order), except that with probability
    p_top the target is put first. p_top = 0.094 gives a mean NDCG@10 of 0.30 against random's 0.227."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(0, N_CANDIDATES, n_users)
    ranks[rng.random(n_users) < p_top] = 0
    return ranks


def test_random_expectation_is_exact():
    assert random_ndcg(N_CANDIDATES, 10) == pytest.approx(np.mean([1 / np.log2(r + 2) for r in range(10)]) / 2)
    assert random_ndcg(1, 10) == 1.0
    with pytest.raises(ValueError, match="n_candidates"):
        random_ndcg(0, 10)


def test_a_random_ranker_fails_and_a_planted_better_ranker_passes_over_many_seeds():
    random_passes = [check_above_random(simulated_ranks(100, 0.0, s), N_CANDIDATES, seed=s).passes for s in SEEDS]
    better = [check_above_random(simulated_ranks(300, 0.094, s), N_CANDIDATES, seed=s) for s in SEEDS]
    assert np.mean([c.ranker for c in better]) == pytest.approx(0.30, abs=0.01)
    assert sum(random_passes) <= 5, "a chance-level ranker must fail the check (at most ~alpha/2 of the time)"
    assert sum(c.passes for c in better) >= 85, "a ranker 0.07 NDCG@10 above random on 300 users must pass"


def test_verdict_follows_the_ci_of_the_mean_gain_and_the_threshold():
    ranks = simulated_ranks(300, 0.3, 0)
    check = check_above_random(ranks, N_CANDIDATES, n_boot=500, seed=1)
    gain = ndcg_at_k(ranks, 10) - random_ndcg(N_CANDIDATES, 10)
    assert check.gain.mean == pytest.approx(gain.mean()) and check.gain.low > 0 and check.passes
    # the same gain, but a threshold above it: not "clearly" above random
    assert not check_above_random(ranks, N_CANDIDATES, n_boot=500, seed=1, threshold=gain.mean() + 0.01).passes
    # every user ranks the target last: a CI far below zero
    assert not check_above_random(np.full(50, N_CANDIDATES - 1), N_CANDIDATES).passes
    assert check.threshold == CLEARLY_ABOVE_RANDOM


def test_per_user_candidate_counts_give_per_user_expectations():
    check = check_above_random([0, 0], [1, 20], k=10)
    assert check.random == pytest.approx((1.0 + random_ndcg(20, 10)) / 2)
    with pytest.raises(ValueError, match="at least one user"):
        check_above_random([], N_CANDIDATES)


def _fake_benchmark(ranks: np.ndarray):
    """What runner._sanity_check reads: the validation users, the training interactions, the reference's ranks."""
    users = [SimpleNamespace(user=i, candidates=list(range(N_CANDIDATES)), target_index=0) for i in range(len(ranks))]
    ctx = SimpleNamespace(fit_users=users, train_interactions=pd.DataFrame({"item": [0, 1, 1, 2, 2, 2]}))
    reference = SimpleNamespace(name="taskwise", val_ranks=ranks)
    return ctx, reference


def test_benchmark_report_uses_the_shared_check():
    from rpp.benchmark.runner import _sanity_check
    from rpp.config import load_config

    cfg = load_config(None, ["eval.n_bootstrap=500"])
    verdicts = []
    for seed in range(20):
        ranks = simulated_ranks(300, 0.094, seed)
        ctx, reference = _fake_benchmark(ranks)
        sanity = _sanity_check(ctx, reference, cfg)
        shared = check_above_random(ranks, N_CANDIDATES, n_boot=500, seed=cfg.seed)
        assert sanity["vs_random"] == shared and sanity["passes"] == shared.passes
        verdicts.append(sanity["passes"])
    assert sum(verdicts) >= 16, "the benchmark must pass a ranker that training's check passes"
    chance = [_sanity_check(*_fake_benchmark(simulated_ranks(300, 0.0, seed)), cfg)["passes"] for seed in range(20)]
    assert sum(chance) <= 1, "the benchmark must fail a chance-level ranker"


def test_training_check_uses_the_shared_check(tmp_path, monkeypatch):
    """check_ranker's verdict and gain are the shared check's, on the task-wise ranks it measured."""
    import importlib

    from rpp.config import load_config

    ev = importlib.import_module("rpp.agents.evaluate")  # rpp.agents.evaluate is also the name of a function

    ranks = list(simulated_ranks(40, 0.5, 3))
    samples = [SimpleNamespace(candidates=list(range(N_CANDIDATES)), target_index=i % N_CANDIDATES)
               for i in range(len(ranks))]
    from rpp.llm.failures import FailureLog

    core = SimpleNamespace(samples=samples, dataset=None,
                           ranker=SimpleNamespace(usage=SimpleNamespace(snapshot=lambda: SimpleNamespace(failures=0),
                                                                        failures=FailureLog())))
    monkeypatch.setattr(ev, "taskwise_ranks",
                        lambda core, samples, batch, failed: failed.extend([False] * len(ranks)) or ranks)
    monkeypatch.setattr("rpp.envs.StepCore", SimpleNamespace)
    monkeypatch.setattr("rpp.data.split_users", lambda *a: SimpleNamespace(
        train_interactions=pd.DataFrame({"item": [1, 2, 2]})))
    cfg = load_config(None, [])
    report = ev.check_ranker(cfg, core, quiet=True, n_users=len(ranks))
    shared = check_above_random(ranks, N_CANDIDATES, n_boot=cfg.eval.n_bootstrap, seed=cfg.seed)
    assert report["ranker_minus_random"] == shared.gain.__dict__
    assert report["clearly_above_random"] == shared.passes is True
