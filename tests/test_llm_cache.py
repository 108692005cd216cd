"""The SQLite response cache and the CachedRanker wrapper (the wrapper test uses the REAL SmolLM2)."""
from __future__ import annotations

import logging
import multiprocessing as mp

import pytest

from rpp.llm import CachedRanker, RankRequest, Ranking, ResponseCache, make_ranker, request_key

REQ = RankRequest(({"role": "user", "content": "Which movie next?"},), ("Fargo (1996)", "Heat (1995)"))


def test_roundtrip_gives_identical_ranking_marked_cached(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    r = Ranking(order=[1, 0], scores=[-3.25, -1.5], prompt_tokens=12, wall_s=0.4)
    key = request_key("ranker-a", REQ)
    assert cache.get(key) is None
    cache.put(key, r)
    got = cache.get(key)
    assert got.cached and got.order == r.order and got.scores == r.scores and got.prompt_tokens == 12
    assert cache.stats()["entries"] == 1 and cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    cache.clear()
    assert cache.get(key) is None


def test_key_covers_identity_messages_and_candidate_order():
    swapped = RankRequest(REQ.messages, tuple(reversed(REQ.candidates)))
    keys = {request_key("a", REQ), request_key("b", REQ), request_key("a", swapped)}
    assert len(keys) == 3 and request_key("a", REQ) == request_key("a", RankRequest(REQ.messages, REQ.candidates))


def test_failed_rankings_are_not_cached(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put("k", Ranking.presented_order(2, "boom"))
    assert cache.get("k") is None and cache.stats()["entries"] == 0


class CountingRanker:
    """A stand-in inner ranker: answers every request in presented order."""

    identity = "counting"

    def __init__(self) -> None:
        from rpp.llm import UsageTracker

        self.usage = UsageTracker()

    def rank(self, requests):
        return [Ranking(order=list(range(len(r.candidates)))) for r in requests]

    def close(self) -> None:
        pass


def test_one_commit_per_batch_of_puts(tmp_path):
    """A batch of N new rankings (and the hit/miss totals) is written in ONE transaction, not N autocommits."""
    cache = ResponseCache(tmp_path / "c.sqlite")
    ranker = CachedRanker(CountingRanker(), cache)
    statements: list[str] = []
    cache._conn.set_trace_callback(statements.append)
    batch = [RankRequest(REQ.messages, (f"Movie {i}", f"Other {i}")) for i in range(6)]
    ranker.rank(batch[:4])  # four misses
    ranker.rank(batch)  # four hits, two misses
    cache._conn.set_trace_callback(None)

    writes = [i for i, st in enumerate(statements) if st.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]
    commits = [i for i, st in enumerate(statements) if st.strip().upper() == "COMMIT"]
    begins = [i for i, st in enumerate(statements) if st.strip().upper().startswith("BEGIN")]
    assert len(commits) == 2 and len(begins) == 2  # one transaction per rank() call
    for w in writes:  # every write inside one of them, none autocommitted on its own
        assert any(b < w < c for b, c in zip(begins, commits)), statements[w]
    assert cache.stats()["entries"] == 6 and cache.stats()["puts"] == 6
    assert cache.stats()["hits"] == 4 and cache.stats()["misses"] == 6


def test_corrupted_file_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a sqlite database at all" * 100)
    with caplog.at_level(logging.WARNING):
        cache = ResponseCache(path)
    assert "unreadable" in caplog.text
    assert cache.rebuilt_from is not None and cache.rebuilt_from.exists()
    cache.put("k", Ranking(order=[0, 1]))
    assert cache.get("k").order == [0, 1]


def _writer(path: str, worker: int, n: int) -> None:
    cache = ResponseCache(path)
    for i in range(n):
        cache.put(f"{worker}-{i}", Ranking(order=[i % 2, 1 - i % 2], scores=[float(i), float(worker)]))


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ResponseCache(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = ResponseCache(path)
    assert cache.stats()["entries"] == 450
    assert cache.get("2-149").scores == [149.0, 2.0]


@pytest.mark.llm
def test_cached_ranker_hit_does_not_touch_the_model(tmp_path):
    from rpp.llm.local import LocalRanker

    inner = LocalRanker(mode="score", dtype="float32", threads=1)
    ranker = CachedRanker(inner, ResponseCache(tmp_path / "c.sqlite"))
    first = ranker.rank([REQ])[0]
    calls = inner.forward_calls
    second = ranker.rank([REQ])[0]
    assert inner.forward_calls == calls  # answered from the cache
    assert not first.cached and second.cached
    assert second.order == first.order and second.scores == first.scores
    usage = ranker.usage.snapshot()
    assert ranker.usage.batches == 2 and usage.calls == 1 and usage.cache_hits == 1
    # A batch mixing a hit and a miss makes one inner call for the miss only, and one outer batch.
    other = RankRequest(REQ.messages, ("Se7en (1995)", "Heat (1995)", "Fargo (1996)"))
    before = inner.usage.batches
    out = ranker.rank([REQ, other])
    assert [r.cached for r in out] == [True, False] and inner.usage.batches == before + 1
    assert ranker.usage.batches == 3
    assert "1 cache hits" in str(usage)


def test_make_ranker_composes_cache_and_respects_no_cache(tmp_path, small_cfg):
    pytest.importorskip("transformers")
    cfg = small_cfg.model_copy(deep=True)
    cfg.llm.dtype = "float32"
    cfg.llm.cache_path = str(tmp_path / "r.sqlite")
    assert isinstance(make_ranker(cfg), CachedRanker)
    cfg.llm.cache = False
    assert not isinstance(make_ranker(cfg), CachedRanker)
