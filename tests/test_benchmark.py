"""The benchmark without an LLM: metric wiring (oracle and reversed methods), statistics against scipy, classic
recommenders on real ML-100K, the method registry, enumeration's choice of combinations, report files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from rpp.benchmark import METHODS, BenchmarkError, Method, build_methods, register, run_benchmark
from rpp.benchmark.methods import BenchContext, EnumerationMethod, ranks_of
from rpp.benchmark.report import MethodResult, Meter, results_table, slot_bins
from rpp.config import load_config
from rpp.metrics import all_metrics


class OracleMethod(Method):
    """Puts the held-out item first: every metric must be exactly 1."""

    family = "floor"

    def rank(self, users):
        return [[u.target_index] + [i for i in range(len(u.candidates)) if i != u.target_index] for u in users]


class TargetLastMethod(Method):
    """Puts the held-out item last (rank n-1): NDCG@k = HR@k = 0 for k < n and MRR = 1/n exactly."""

    family = "floor"

    def rank(self, users):
        return [[i for i in range(len(u.candidates)) if i != u.target_index] + [u.target_index] for u in users]


class ReversedMethod(Method):
    """The presented list backwards: the target lands at rank n-1-slot, a known per-user value."""

    family = "floor"

    def rank(self, users):
        return [list(range(len(u.candidates)))[::-1] for u in users]


def _cfg(tmp_path, methods, *extra):
    return load_config(None, [
        f"benchmark.methods={methods}", f"benchmark.output_dir={tmp_path.as_posix()}", "name=t",
        "benchmark.bpr_iterations=20", "benchmark.bpr_factors=16", "eval.n_bootstrap=200", *extra,
    ])


@pytest.fixture
def test_methods(monkeypatch):
    monkeypatch.setitem(METHODS, "oracle", lambda ctx: [OracleMethod(ctx, "oracle")])
    monkeypatch.setitem(METHODS, "target_last", lambda ctx: [TargetLastMethod(ctx, "target_last")])
    monkeypatch.setitem(METHODS, "reversed", lambda ctx: [ReversedMethod(ctx, "reversed")])


def test_oracle_and_reversed_methods_get_the_known_metrics(tmp_path, test_methods):
    out = run_benchmark(_cfg(tmp_path, "[oracle,target_last,reversed,random]", "eval.n_users=60"),
                        progress=lambda m: None)
    table = pd.read_csv(out / "results.csv").set_index("method")
    per_user = pd.read_csv(out / "per_user.csv")
    for metric in ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"):
        assert table.loc["oracle", metric] == 1.0
        assert table.loc["oracle", f"{metric}_low"] == 1.0
    assert table.loc["target_last", "ndcg@10"] == 0.0
    assert table.loc["target_last", "hr@10"] == 0.0
    assert table.loc["target_last", "mrr"] == pytest.approx(1 / 20)
    rev = per_user[per_user["method"] == "reversed"]
    expected_rank = 19 - rev["target_slot"].to_numpy()
    assert (rev["rank"].to_numpy() == expected_rank).all()
    expected_ndcg = np.where(expected_rank < 10, 1 / np.log2(expected_rank + 2), 0.0)
    assert rev["ndcg@10"].to_numpy() == pytest.approx(expected_ndcg, abs=1e-6)
    assert table.loc["reversed", "ndcg@10"] == pytest.approx(expected_ndcg.mean(), abs=1e-6)
    assert len(per_user) == 4 * 60


def test_a_non_permutation_is_rejected(ml100k_split):
    users = ml100k_split.test[:2]
    with pytest.raises(BenchmarkError, match="not a permutation"):
        ranks_of(users, [[0, 0] + list(range(2, 20)), list(range(20))])
    with pytest.raises(BenchmarkError, match="3 rankings for 2 users"):
        ranks_of(users, [list(range(20))] * 3)


def _result(name, ranks, family="classic", val=None):
    ranks = np.asarray(ranks, dtype=np.int64)
    return MethodResult(name=name, family=family, notes="", ranks=ranks, failed=np.zeros(len(ranks), bool),
                        fit_usage=Meter(), infer_usage=Meter(), fit_s=0.0, rank_s=0.0, val_ndcg10=val)


def test_paired_test_and_cis_match_scipy():
    """Ranks of 300 users from two skewed rank distributions (like popularity vs random on 20 candidates)."""
    rng = np.random.default_rng(7)
    a = np.minimum(rng.geometric(0.25, 300) - 1, 19)
    b = rng.integers(0, 20, 300)
    table = results_table([_result("a", a), _result("b", b, family="taskwise", val=0.2)], reference="b",
                          n_boot=5000, seed=3, n_fit_users=0).set_index("method")
    na, nb = all_metrics(a)["ndcg@10"], all_metrics(b)["ndcg@10"]
    assert table.loc["a", "p_vs_ref"] == pytest.approx(scipy.stats.wilcoxon(na, nb).pvalue, rel=1e-9)
    assert table.loc["a", "ndcg@10_diff_vs_ref"] == pytest.approx(na.mean() - nb.mean())
    assert table.loc["a", "ndcg@10_rel_vs_ref"] == pytest.approx(na.mean() / nb.mean() - 1)
    assert table.loc["b", "p_vs_ref"] == 1.0  # the reference against itself
    for name, vals in (("a", na), ("b", nb)):
        ref = scipy.stats.bootstrap((vals,), np.mean, n_resamples=20000, method="percentile",
                                    confidence_level=0.95, random_state=11)
        # different resamples: the endpoints agree up to Monte-Carlo error (~0.003 at these sizes)
        assert table.loc[name, "ndcg@10_low"] == pytest.approx(ref.confidence_interval.low, abs=0.006)
        assert table.loc[name, "ndcg@10_high"] == pytest.approx(ref.confidence_interval.high, abs=0.006)
        assert table.loc[name, "ndcg@10"] == pytest.approx(vals.mean())
        # and a normal-approximation CI (mean +- 1.96 se) is close for n = 300
        se = vals.std(ddof=1) / np.sqrt(len(vals))
        assert table.loc[name, "ndcg@10_low"] == pytest.approx(vals.mean() - 1.96 * se, abs=0.01)


def test_popularity_and_bpr_beat_random_on_ml100k(tmp_path):
    """Real implicit BPR on the real training interactions, 300 real test users."""
    out = run_benchmark(_cfg(tmp_path, "[popularity,bpr,random]"), progress=lambda m: None)
    table = pd.read_csv(out / "results.csv").set_index("method")
    per_user = pd.read_csv(out / "per_user.csv")
    assert table.loc["bpr", "n_users"] == 300
    rnd = per_user[per_user["method"] == "random"]["ndcg@10"].to_numpy()
    assert rnd.mean() == pytest.approx(0.23, abs=0.04)  # the 20-candidate chance level
    for m in ("popularity", "bpr"):
        vals = per_user[per_user["method"] == m]["ndcg@10"].to_numpy()
        assert vals.mean() > rnd.mean() + 0.15
        assert scipy.stats.wilcoxon(vals, rnd).pvalue < 1e-6
        assert table.loc[m, "infer_requests_per_user"] == 0  # no LLM involved
    for name in ("report.md", "results.csv", "per_user.csv", "config.yaml", "ndcg10.png", "position_bias.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| bpr |" in report and "## Position bias" in report and "Cores:" in report


def test_classic_methods_give_permutations_and_are_seeded(ml100k, ml100k_split):
    from rpp.benchmark.classic import BPRScorer, PopularityScorer, random_orders

    users = ml100k_split.test + ml100k_split.val
    inter = ml100k_split.train_interactions
    b1 = BPRScorer(inter, factors=8, iterations=5, seed=1).rank(users)
    b2 = BPRScorer(inter, factors=8, iterations=5, seed=1).rank(users)
    b3 = BPRScorer(inter, factors=8, iterations=5, seed=2).rank(users)
    for orders in (b1, PopularityScorer(inter).rank(users), random_orders(users, 0)):
        for u, o in zip(users, orders):
            assert sorted(o) == list(range(len(u.candidates)))
    assert b1 == b2 and b1 != b3
    assert random_orders(users, 0) == random_orders(users, 0) != random_orders(users, 1)
    # a user's random order does not depend on who else is ranked
    assert random_orders(users[1:], 0) == random_orders(users, 0)[1:]


def test_registry_rejects_unknown_and_duplicate_names(ml100k, ml100k_split):
    cfg = load_config()
    ctx = BenchContext(cfg=cfg, dataset=ml100k, fit_users=ml100k_split.val, train_interactions=None)
    with pytest.raises(BenchmarkError, match="unknown benchmark method.*bogus.*known:.*bpr"):
        build_methods(ctx, ["popularity", "bogus"])
    with pytest.raises(BenchmarkError, match="twice"):
        build_methods(ctx, ["popularity", "popularity"])
    with pytest.raises(ValueError, match="already registered"):
        register("bpr")(lambda ctx: [])
    names = [m.name for m in build_methods(ctx, ["taskwise", "llmrank", "enumeration", "random_policy"])]
    assert names == ["taskwise", "llmrank_sequential", "llmrank_recency", "llmrank_in_context", "enumeration",
                     "random_policy"]
    rows = [m.name for m in build_methods(ctx, [], runs=["runs/my-run"])]
    assert rows == [f"rpp[my-run] T={cfg.eval.steps}", "rpp[my-run] T=1"]


def test_enumeration_combinations_are_seeded_and_include_taskwise(ml100k, ml100k_split):
    def combos(seed, budget):
        cfg = load_config(None, [f"seed={seed}", f"benchmark.enumeration_budget={budget}"])
        m = EnumerationMethod(BenchContext(cfg=cfg, dataset=ml100k, fit_users=[], train_interactions=None))
        return m, m.combinations()

    m, c = combos(0, 10)
    sizes = m.ctx.builder.action_set.sizes()
    tw = m.ctx.builder.taskwise()
    tw_combo = tuple(m.ctx.builder.action_set.index(p, tw[p].id) for p in ("role", "history", "reasoning", "format"))
    assert len(c) == 10 and len(set(c)) == 10 and c[0] == tw_combo
    assert all(0 <= i < n for combo in c for i, n in zip(combo, sizes))
    assert combos(0, 10)[1] == c and combos(1, 10)[1] != c
    total = int(np.prod(sizes))
    m, everything = combos(0, total + 5)
    assert len(everything) == total == len(set(everything)) and everything[0] == tw_combo


def test_slot_bins_cover_every_slot_once():
    for n in (2, 5, 19, 20, 21, 100):
        bins = slot_bins(n)
        covered = [s for lo, hi in bins for s in range(lo, hi)]
        assert covered == list(range(n))


def test_per_user_select_costs_k_plus_one_requests_and_the_label_oracle_bounds_it(tmp_path):
    """per_user_select ranks K prompts on each user's own last history item and the test candidates with the best
    one (K + 1 requests per user); label_oracle picks each user's best of the same K prompts WITH the test label,
    so per user it is never below per_user_select or the task-wise prompt (one of the K)."""
    from test_agents_train import PromptHashRanker

    cfg = _cfg(tmp_path, "[taskwise,per_user_select,label_oracle]", "eval.n_users=24",
               "benchmark.per_user_prompts=3", "benchmark.enumeration_val_users=8")
    out = run_benchmark(cfg, ranker=PromptHashRanker())
    t = pd.read_csv(out / "results.csv").set_index("method")
    assert t.loc["per_user_select", "infer_requests_per_user"] == 4.0
    assert t.loc["label_oracle", "infer_requests_per_user"] == 3.0
    ndcg = pd.read_csv(out / "per_user.csv").pivot(index="user", columns="method", values="ndcg@10")
    assert len(ndcg) == 24
    assert (ndcg["label_oracle"] >= ndcg["per_user_select"] - 1e-12).all()
    assert (ndcg["label_oracle"] >= ndcg["taskwise"] - 1e-12).all()
    assert ndcg["label_oracle"].mean() > ndcg["taskwise"].mean()  # the hash ranker's prompts do differ per user
