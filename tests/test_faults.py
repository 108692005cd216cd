"""Faults of a REAL model server (llama.cpp on 127.0.0.1, behind a small fault proxy): a server killed mid-`rpp
train` and mid-`rpp benchmark`, HTTP 500 on a share of requests, answers slower than llm.timeout_s; and a truncated
response-cache file. A failed request is never a result: a phase over llm.max_failure_rate stops with one line
naming the cause, after saving what was done (docs/reliability.md)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import FaultProxy, LlamaServer  # noqa: E402

from rpp.llm import RankRequest  # noqa: E402
from rpp.llm.failures import FailureBudgetExceeded, FailureLog  # noqa: E402
from rpp.llm.openai_backend import OpenAIRanker  # noqa: E402

pytestmark = [pytest.mark.llm, pytest.mark.server]

MODEL = "smollm2-135m-instruct"
CANDS = ("Fargo (1996)", "Heat (1995)", "Se7en (1995)")


@pytest.fixture(scope="module")
def server():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test installs llama-cpp-python[server]==0.3.36)")
    from rpp.llm.local import gguf_path

    srv = LlamaServer(gguf_path(MODEL), alias=MODEL).start(timeout_s=120)
    yield srv
    srv.stop()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "no-key-needed")


def request(i: int) -> RankRequest:
    listing = "\n".join(f"{j}. {t}" for j, t in enumerate(CANDS, start=1))
    return RankRequest(({"role": "user", "content": f"User {i} liked Toy Story. Rank:\n{listing}"},), CANDS)


def ranker(proxy: FaultProxy, **kw) -> OpenAIRanker:
    args = dict(model=MODEL, base_url=proxy.base_url, mode="generate", max_new_tokens=8, timeout_s=60.0,
                max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05, concurrency=2)
    args.update(kw)
    return OpenAIRanker(**args)


def test_http_500_on_a_share_of_requests_is_retried_counted_and_under_budget(server, key):
    with FaultProxy(server.base_url) as proxy:
        proxy.error_every = 3
        r = ranker(proxy)
        try:
            with r.usage.failures.phase("validation choices", 0.02) as counted:
                rankings = r.rank([request(i) for i in range(4)])
        finally:
            r.close()
    assert proxy.errors >= 1 and not any(x.failed for x in rankings)
    assert r.usage.snapshot().retries == proxy.errors  # every injected 500 was retried, and counted
    assert counted.summary() == "0 of 4 requests failed"


def test_http_500_on_every_request_stops_the_phase_naming_the_status(server, key):
    with FaultProxy(server.base_url) as proxy:
        proxy.error_every = 1
        r = ranker(proxy, max_retries=1)
        try:
            with pytest.raises(FailureBudgetExceeded, match=r"validation choices: 2 of 2 requests failed.*HTTP 500"):
                with r.usage.failures.phase("validation choices", 0.02):
                    r.rank([request(i) for i in range(2)])
        finally:
            r.close()


def test_a_server_slower_than_timeout_is_named_as_timeouts(server, key):
    with FaultProxy(server.base_url) as proxy:
        proxy.delay_s = 2.0
        r = ranker(proxy, timeout_s=0.5, max_retries=0)
        try:
            with pytest.raises(FailureBudgetExceeded, match="main cause: timeout"):
                with r.usage.failures.phase("evaluation", 0.02):
                    r.rank([request(i) for i in range(2)])
        finally:
            r.close()


def test_one_failure_in_a_long_phase_under_budget_is_counted_not_fatal(server, key):
    """A single failed request among 60 (1.7% < 2%): the phase completes and says so."""
    log = FailureLog()
    from rpp.llm.base import Ranking

    with log.phase("rank: taskwise", 0.02) as counted:
        for i in range(6):
            batch = [Ranking(order=[0, 1, 2]) for _ in range(10)]
            if i == 3:
                batch[0] = Ranking.presented_order(3, "ServerError: InternalServerError: Error code: 500")
            log.observe(batch)
    assert counted.summary() == "1 of 60 requests failed (1.7%: HTTP 500 1)"


def _cli(args: list[str]) -> int:
    from rpp.cli import main

    return main(args)


def _sets(pairs: list[str]) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


def test_server_killed_mid_train_stops_and_resume_matches_an_uninterrupted_run(server, key, tmp_path, capsys,
                                                                                one_thread):
    with FaultProxy(server.base_url) as proxy:
        base = [f"train.runs_dir={tmp_path / 'runs'}", "llm.backend=openai", "llm.mode=generate",
                f"llm.base_url={proxy.base_url}", f"llm.model={MODEL}", "llm.max_new_tokens=8",
                "llm.max_retries=1", f"llm.cache_path={tmp_path / 'cache.sqlite'}",
                "data.n_train_users=4", "data.n_val_users=0", "data.n_test_users=2", "data.n_candidates=5",
                "env.n_envs=2", "env.steps_per_episode=1", "env.reward_baseline=none", "train.n_steps=2",
                "train.check_users=0", "train.total_steps=8", "train.checkpoint_every=1"]
        proxy.die_after = 4  # the first rollout (2 steps x 2 envs) is answered, then the server is gone
        assert _cli(["train", *_sets(["name=killed", *base])]) != 0
        err = capsys.readouterr().err
        assert "rpp: error:" in err, err[-3000:]
        line = err.split("rpp: error:")[-1].strip()
        assert "\n" not in line  # one line
        assert line.startswith("training rollouts: 2 of 6 requests failed") and "connection refused" in line
        assert f"rpp train --resume {tmp_path / 'runs' / 'killed'}" in line
        run = tmp_path / "runs" / "killed"
        assert [json.loads(x)["timesteps"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [4]

        proxy.up()  # the server is back
        assert _cli(["train", "--resume", str(run)]) == 0
        # the uninterrupted run: same config, every answer now in the response cache (same server, same keys)
        forwarded = proxy.forwarded
        assert _cli(["train", *_sets(["name=whole", *base])]) == 0
        assert proxy.forwarded == forwarded
    rows = {name: [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("killed", "whole")}
    strip = ("wall_s", "calls_per_s", "llm_calls", "cache_hits", "steps_per_s")
    same = [{k: v for k, v in r.items() if k not in strip} for r in rows["killed"]]
    assert same == [{k: v for k, v in r.items() if k not in strip} for r in rows["whole"]]
    assert [r["ranker_failures"] for r in rows["killed"]] == [0, 0]


def test_server_killed_mid_benchmark_keeps_completed_rows_and_marks_the_failed_one_invalid(server, key, tmp_path,
                                                                                           capsys):
    with FaultProxy(server.base_url) as proxy:
        proxy.die_after = 2  # taskwise's first call (its 4 validation users) is answered, then the server is gone
        sets = ["name=killed", f"benchmark.output_dir={tmp_path}", "benchmark.methods=[popularity,random,taskwise]",
                "llm.backend=openai", "llm.mode=generate", f"llm.base_url={proxy.base_url}", f"llm.model={MODEL}",
                "llm.max_new_tokens=8", "llm.max_retries=1", f"llm.cache_path={tmp_path / 'cache.sqlite'}",
                "data.n_train_users=4", "data.n_val_users=4", "data.n_test_users=4", "data.n_candidates=5",
                "eval.n_bootstrap=200"]
        config = tmp_path / "bench.yaml"
        config.write_text("{}\n")
        assert _cli(["benchmark", "--config", str(config), *_sets(sets)]) != 0
    captured = capsys.readouterr()
    line = captured.err.split("rpp: error:")[-1].strip()
    assert line.startswith("benchmark stopped, row 'taskwise' is INVALID: rank: taskwise: 4 of 4 requests failed"), \
        captured.err[-2000:]
    assert "connection refused" in line and "2 completed rows" in line
    table = pd.read_csv(tmp_path / "killed" / "results.csv")
    assert dict(zip(table["method"], table["status"])) == {"popularity": "ok", "random": "ok",
                                                          "taskwise": "INVALID"}
    assert table.loc[table["method"] == "taskwise", "ndcg@10"].isna().all()  # no number for a failed row
    report = (tmp_path / "killed" / "report.md").read_text()
    assert "**INVALID: `taskwise`**" in report and "| taskwise" not in report


def test_a_truncated_response_cache_is_rebuilt_never_served(tmp_path):
    from rpp.llm.base import Ranking
    from rpp.llm.cache import ResponseCache

    path = tmp_path / "c.sqlite"
    cache = ResponseCache(path)
    cache.put_many([(f"k{i}", Ranking(order=[2, 0, 1], raw="x" * 200)) for i in range(300)])
    cache.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    cache = ResponseCache(path)
    assert cache.rebuilt_from is not None and cache.rebuilt_from.exists()
    assert all(cache.get(f"k{i}") is None for i in range(300))  # a miss is recomputed; nothing corrupt is served
