"""The response cache: a repeated request is free and gives the identical ranking.

Rankings are stored in SQLite (WAL mode, so several processes can read while one writes; a busy timeout makes
concurrent writers wait instead of failing) under the sha256 of the FULL request: the ranker's identity (backend,
model, weights hash, dtype, mode, reduction, sampling parameters, seed, bootstrap), the messages and the
candidates in presented order. Failed rankings are never stored, so a transient outage is retried next time.

A cache file that SQLite cannot read (truncated, overwritten, not a database) is renamed aside with a warning
and a fresh one is created: the cache only ever costs a recomputation, never a wrong answer. A row whose JSON
does not decode to a valid ranking for its request is treated as a miss and replaced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from rpp.llm.base import Ranker, Ranking, RankRequest, timed

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000


class CacheError(RuntimeError):
    """The cache file cannot be used or rebuilt (e.g. the folder is read-only)."""


def request_key(identity: str, request: RankRequest) -> str:
    """sha256 over everything that can change the answer: ranker identity, messages, candidates in order."""
    payload = json.dumps({"v": SCHEMA_VERSION, "ranker": identity, "messages": list(request.messages),
                          "candidates": list(request.candidates)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    """SQLite key -> Ranking store. One connection per thread; safe across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.hits = self.misses = self.puts = 0
        """This object's lookups and stores; ``persist_counts`` adds them to the totals kept in the file."""
        self._persisted = {"hits": 0, "misses": 0, "puts": 0}
        self.rebuilt_from: Optional[Path] = None
        """Where a corrupted file was moved, if this cache had to start over."""
        self._open_checked()

    # -- connection handling
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS rankings (key TEXT PRIMARY KEY, ranking TEXT NOT NULL, "
                     "created REAL NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        return conn

    def _open_checked(self) -> None:
        """Open the file; if SQLite says it is not a usable database, move it aside and start a new one."""
        try:
            conn = self._connect()
            conn.execute("SELECT count(*) FROM rankings").fetchone()
            self._local.conn = conn
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise CacheError(f"response cache {self.path} stayed locked for {BUSY_TIMEOUT_MS} ms") from exc
            bad = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("response cache %s is unreadable (%s); moved it to %s and starting an empty cache",
                        self.path, exc, bad.name)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(bad) + suffix))
            self.rebuilt_from = bad
            try:
                self._local.conn = self._connect()
            except sqlite3.DatabaseError as exc2:
                raise CacheError(f"cannot create a response cache at {self.path}: {exc2}") from exc2

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    # -- the API
    def get(self, key: str) -> Optional[Ranking]:
        row = self._conn.execute("SELECT ranking FROM rankings WHERE key = ?", (key,)).fetchone()
        ranking = None
        if row is not None:
            try:
                ranking = Ranking.from_dict(json.loads(row[0]))
            except (ValueError, TypeError) as exc:
                log.warning("dropping an undecodable cache row %s…: %s", key[:12], exc)
        with self._lock:
            if ranking is None:
                self.misses += 1
            else:
                self.hits += 1
        if ranking is not None:
            ranking.cached = True
        return ranking

    def put(self, key: str, ranking: Ranking) -> None:
        """Store one successful ranking (see put_many)."""
        self.put_many([(key, ranking)])

    def put_many(self, items: Sequence[tuple[str, Ranking]]) -> None:
        """Store a batch's successful rankings (failed ones are refused: they must be retried, not replayed) and
        this object's new hit/miss/put counts in ONE transaction: one commit per batch, not one per ranking (each
        commit appends to the WAL and takes the file's write lock, which other processes wait for)."""
        created = time.time()
        rows = [(key, json.dumps(dataclasses.replace(r, cached=False).to_dict()), created)
                for key, r in items if not r.failed]
        with self._lock:
            self.puts += len(rows)
            counts_changed = (self.hits, self.misses, self.puts) != tuple(self._persisted[k] for k in
                                                                          ("hits", "misses", "puts"))
        if not rows and not counts_changed:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                conn.executemany("INSERT OR REPLACE INTO rankings (key, ranking, created) VALUES (?, ?, ?)", rows)
            self.persist_counts()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def persist_counts(self) -> None:
        """Add the hits, misses and puts since the last call to the totals stored in the file (one statement, so
        processes sharing the file add up), which is what `rpp cache stats` reports."""
        with self._lock:
            now = {"hits": self.hits, "misses": self.misses, "puts": self.puts}
            delta = {k: now[k] - self._persisted[k] for k in now}
            self._persisted = now
        if any(delta.values()):
            self._conn.execute("INSERT INTO counters (name, value) VALUES ('hits', ?), ('misses', ?), ('puts', ?) "
                               "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                               (delta["hits"], delta["misses"], delta["puts"]))

    def stats(self) -> dict:
        """Entries and bytes in the file; hits, misses and puts: the totals of every process that used the file
        since it was created or last cleared."""
        self.persist_counts()
        entries = self._conn.execute("SELECT count(*) FROM rankings").fetchone()[0]
        totals = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
        size = sum(Path(str(self.path) + s).stat().st_size for s in ("", "-wal") if Path(str(self.path) + s).exists())
        return {"path": str(self.path), "entries": entries, "bytes": size, "hits": totals.get("hits", 0),
                "misses": totals.get("misses", 0), "puts": totals.get("puts", 0),
                "rebuilt_from": str(self.rebuilt_from) if self.rebuilt_from else None}

    def clear(self) -> None:
        """Delete every cached response and the stored hit/miss totals."""
        self.persist_counts()
        self._conn.execute("DELETE FROM rankings")
        self._conn.execute("DELETE FROM counters")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self.persist_counts()
            conn.close()
            self._local.conn = None


def _valid_for(ranking: Ranking, request: RankRequest) -> bool:
    n = len(request.candidates)
    return sorted(ranking.order) == list(range(n)) and (ranking.scores is None or len(ranking.scores) == n)


class CachedRanker(Ranker):
    """Puts a ResponseCache in front of any ranker: hits are answered from the cache, misses go to the inner
    ranker in ONE batched call, successful answers are stored. Its `usage` is what callers should read: one
    batch per rank() call, cache hits, and the inner calls' tokens, failures and retries."""

    def __init__(self, inner: Ranker, cache: ResponseCache) -> None:
        super().__init__()
        self.inner, self.cache = inner, cache
        self.identity = inner.identity

    def rank(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        timer = timed()
        keys = [request_key(self.identity, r) for r in requests]
        out: list[Optional[Ranking]] = []
        for key, req in zip(keys, requests):
            hit = self.cache.get(key)
            out.append(hit if hit is not None and _valid_for(hit, req) else None)
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            fresh = self.inner.rank([requests[i] for i in missing])
            for i, ranking in zip(missing, fresh):
                out[i] = ranking
        # the new rankings and the hit/miss totals (so they survive this process): one commit per batch
        self.cache.put_many([(keys[i], out[i]) for i in missing])
        self.usage.record(out, wall_s=timer.elapsed)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.inner.close()
        self.cache.close()
