"""The benchmark with the REAL SmolLM2 ranker: enumeration never sees test users, two runs with one seed give the
same tables (the second one from the response cache), LLM calls are batched, trained policies join from a run dir."""
from __future__ import annotations

import time

import pandas as pd
import pytest

from rpp.benchmark import BenchmarkError, run_benchmark
from rpp.benchmark.methods import BenchContext, EnumerationMethod
from rpp.benchmark.report import RUN_DEPENDENT_COLUMNS
from rpp.config import load_config
from rpp.data import split_users
from rpp.llm import CachedRanker, ResponseCache
from rpp.llm.base import Ranker

pytestmark = [pytest.mark.llm, pytest.mark.slow]


class SpyRanker(Ranker):
    """Forwards to the real ranker and records, per rank() call, the candidate lists it was asked about (a
    user's candidate titles identify the user: they are 20 random items in a random order)."""

    def __init__(self, inner: Ranker) -> None:
        self.inner, self.identity, self.usage = inner, inner.identity, inner.usage
        self.calls: list[list[tuple]] = []

    def rank(self, requests):
        self.calls.append([tuple(r.candidates) for r in requests])
        return self.inner.rank(requests)


def _titles(dataset, users):
    return {tuple(dataset.title(i) for i in u.candidates): u.user for u in users}


def test_enumeration_fits_on_validation_users_only(smollm_ranker, ml100k, tmp_path):
    cfg = load_config(None, ["data.n_train_users=4", "data.n_val_users=3", "data.n_test_users=3",
                             "benchmark.enumeration_budget=3"])
    split = split_users(ml100k, cfg.data, cfg.seed)
    spy = SpyRanker(smollm_ranker)
    ctx = BenchContext(cfg=cfg, dataset=ml100k, fit_users=split.val, train_interactions=split.train_interactions,
                       ranker_factory=lambda: spy)
    method = EnumerationMethod(ctx)
    method.fit()
    val, test = _titles(ml100k, split.val), _titles(ml100k, split.test)
    seen = [c for call in spy.calls for c in call]
    assert len(spy.calls) == 1  # 3 combinations x 3 users in ONE batched call
    assert len(seen) == 9 and set(seen) == set(val)
    assert not set(seen) & set(test)
    assert len(method.tried) == 3 and method.best in [c for c, _ in method.tried]
    assert method.val_ndcg10 == max(v for _, v in method.tried)
    spy.calls.clear()
    rankings = method.rank(split.test)
    assert {c for call in spy.calls for c in call} == set(test) and len(rankings) == 3


def test_two_runs_with_one_seed_give_identical_tables(smollm_ranker, tmp_path, capsys):
    """The full method set on 4 test users; a fresh response cache, so run 1 pays and run 2 is served by it."""
    cfg = load_config(None, [
        "name=twice", f"benchmark.output_dir={(tmp_path / 'out').as_posix()}",
        "data.n_train_users=8", "data.n_val_users=3", "data.n_test_users=4",
        "benchmark.enumeration_val_users=3", "benchmark.enumeration_budget=2", "eval.steps=2",
        "benchmark.bpr_factors=16", "benchmark.bpr_iterations=20", "eval.n_bootstrap=200",
    ])
    backend = smollm_ranker.inner if isinstance(smollm_ranker, CachedRanker) else smollm_ranker
    ranker = SpyRanker(CachedRanker(backend, ResponseCache(tmp_path / "fresh.sqlite")))
    times, tables, per_user = [], [], []
    for _ in range(2):
        t0 = time.perf_counter()
        out = run_benchmark(cfg, ranker=ranker, progress=lambda m: None)
        times.append(time.perf_counter() - t0)
        tables.append(pd.read_csv(out / "results.csv"))
        per_user.append((out / "per_user.csv").read_text())
    stable = [c for c in tables[0].columns if c not in RUN_DEPENDENT_COLUMNS]
    pd.testing.assert_frame_equal(tables[0][stable], tables[1][stable])
    assert per_user[0] == per_user[1]
    t = tables[1].set_index("method")
    assert t.loc["taskwise", "infer_paid_calls"] == 0 and t.loc["taskwise", "infer_cache_hits"] == 4
    assert tables[0].set_index("method").loc["taskwise", "infer_paid_calls"] == 4
    # batching: every rank() call carries a whole group of users (never one call per user)
    assert all(len(call) >= 3 for call in ranker.calls)
    # costs: a fixed prompt is 1 request per test user, the random policy T = 2
    assert t.loc["taskwise", "infer_requests_per_user"] == 1.0
    assert t.loc["random_policy", "infer_requests_per_user"] == 2.0
    assert t.loc["enumeration", "train_requests"] == 2 * 3
    assert t.loc["taskwise", "infer_tokens_per_user"] > 0
    with capsys.disabled():
        print(f"\nbenchmark on 4 test users: cold cache {times[0]:.1f} s, warm cache {times[1]:.1f} s")
    assert times[1] < times[0]
    report = (out / "report.md").read_text()
    assert "Ranker sanity check" in report and "Reference for the paired tests" in report


def test_trained_policy_rows_and_leak_check(smollm_ranker, tmp_path, monkeypatch):
    """Train a tiny real run, then benchmark it (multi-step, one-shot and RPP+ one-shot rows) on the run's own
    test users; a benchmark whose test users were the run's training users is refused."""
    import re

    import rpp.llm
    from rpp.agents import train
    from rpp.llm.base import TextGenerator

    class SentenceEcho(TextGenerator):
        """A stand-in refiner model that appends ' Take your time.' to every sentence (a valid rewrite)."""
        identity = "echo-generator"

        def generate(self, prompts, max_new_tokens):
            self.usage.record_calls(calls=len(prompts))
            return [re.search(r"Sentence: (.*)\n", m[-1]["content"]).group(1) + " Take your time." for m in prompts]

    monkeypatch.setattr(rpp.llm, "make_generator", lambda refiner_cfg: SentenceEcho())

    overrides = ["name=tiny", f"train.runs_dir={(tmp_path / 'runs').as_posix()}",
                 f"llm.cache_path={(tmp_path / 'cache.sqlite').as_posix()}",
                 "data.n_train_users=8", "data.n_val_users=4", "data.n_test_users=4",
                 "env.n_envs=4", "env.steps_per_episode=2", "train.n_steps=2", "train.total_steps=8",
                 "train.batch_size=8", "train.check_users=0", "eval.steps=2"]
    run_dir = train(load_config(None, overrides), progress=False)
    cfg = load_config(None, overrides + [
        f"benchmark.output_dir={(tmp_path / 'out').as_posix()}", "benchmark.methods=[taskwise]",
        f"benchmark.runs=[{run_dir.as_posix()}]", "benchmark.enumeration_val_users=2", "eval.n_bootstrap=200",
        "benchmark.rpp_plus_steps=[1]",
    ])
    out = run_benchmark(cfg, ranker=smollm_ranker, progress=lambda m: None)
    t = pd.read_csv(out / "results.csv").set_index("method")
    assert list(t.index) == ["taskwise", "rpp[tiny] T=2", "rpp[tiny] T=1", "rpp+[tiny] T=1"]
    assert t.loc["rpp[tiny] T=2", "infer_requests_per_user"] == 2.0
    assert t.loc["rpp[tiny] T=1", "infer_requests_per_user"] == 1.0
    assert t.loc["rpp[tiny] T=2", "train_requests"] > 0  # from the run's usage.json
    # RPP+: same agents, one ranking request per user plus one generation per non-empty chosen sentence
    plus = t.loc["rpp+[tiny] T=1"]
    assert plus["infer_requests_per_user"] == 1.0
    assert 1.0 <= plus["refine_requests_per_user"] <= 4.0
    assert plus["refine_acceptance_rate"] == 1.0
    assert pd.isna(t.loc["rpp[tiny] T=1", "refine_requests_per_user"])
    report = (out / "report.md").read_text()
    assert "## RPP+ refiner" in report and "| rpp+[tiny] T=1 |" in report
    assert "| rpp[tiny] T=1 | rpp+[tiny] T=1 |" in report  # the paired RPP vs RPP+ line
    assert set(pd.read_csv(out / "per_user.csv")["method"]) == set(t.index)
    # the same run against a benchmark split where the run's training users are test users
    leaky = load_config(None, [o for o in overrides if not o.startswith("data.")] + [
        "data.n_train_users=0", "data.n_val_users=4", "data.n_test_users=12",
        f"benchmark.output_dir={(tmp_path / 'out2').as_posix()}", "benchmark.methods=[]",
        f"benchmark.runs=[{run_dir.as_posix()}]",
    ])
    with pytest.raises(BenchmarkError, match="were training or validation users of this run"):
        run_benchmark(leaky, ranker=smollm_ranker, progress=lambda m: None)
