"""`rpp personalize`: the served prompt for every user of a file, resumable.

    rpp personalize --run runs/NAME --users users.parquet --out prompts.parquet

Input (parquet, or JSON lines): one row per user with ``user`` (a unique id), ``history`` (item ids of the run's
dataset, or titles, oldest first), and optionally ``ratings`` (one per history item) and ``candidates``.
Output (same formats, chosen by the suffix of --out): per user ``user``, ``source`` ("policy" or the gate's "fixed"
prompt), ``policy_version``, the four action ids (``role``, ``history``, ``reasoning``, ``format``), ``messages``
(the rendered chat messages) and ``error`` (why a row could not be served: its prompt columns are then empty; such
rows are counted and reported, never dropped).

Resumable: users are processed in input order, in chunks, and each chunk is made durable before the next starts
(JSON lines: appended and fsync'ed; parquet: one part file per chunk, written atomically, under <out>.parts/, joined
into <out> at the end). A run killed at any point (even SIGKILL) is continued by the same command: a half-written
last line is cut off, users already written are skipped, so every user is written once and the output equals an
uninterrupted run's.

Scale-out: ``personalize_rows`` is the one function every path calls; ``RayPersonalizer`` wraps it for Ray Data's
``map_batches`` (docs/serving.md), so many machines run exactly what this command runs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from rpp.agents.serving import PromptPolicy, ServingInputError, UserRequest
from rpp.prompts import PATTERNS

OUTPUT_COLUMNS = ("user", "source", "policy_version", *PATTERNS, "messages", "error")
FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ServingInputError(f"{path}: unknown file type '{path.suffix}'; use .parquet or .jsonl")
    return fmt


def _plain(value):
    """numpy / pandas values (what parquet and Ray batches hold) -> plain Python lists, ints, floats, None."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_users(path: str | Path) -> list[dict]:
    """The rows of a user file (parquet or JSON lines), as plain dicts; refuses files without user/history or with
    a user twice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--users {path}: no such file")
    if _format(path) == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ServingInputError(f"{path}:{n}: not valid JSON ({exc.msg}); one JSON object per line") from None
    for n, row in enumerate(rows, 1):
        missing = [c for c in ("user", "history") if not isinstance(row, dict) or row.get(c) is None]
        if missing:
            raise ServingInputError(f"{path}: row {n} has no {' or '.join(missing)}; every row needs a unique "
                                    "'user' and a 'history' list (item ids or titles)")
    seen: set = set()
    for row in rows:
        key = json.dumps(_plain(row["user"]))
        if key in seen:
            raise ServingInputError(f"{path}: user {row['user']!r} appears twice; user ids must be unique")
        seen.add(key)
    return rows


def personalize_rows(policy: PromptPolicy, rows: Iterable[dict], max_candidates: Optional[int] = None) -> list[dict]:
    """One output row (OUTPUT_COLUMNS) per input row; rows that cannot be served carry their reason in ``error``.
    The function `rpp personalize`, Ray's map_batches and the tests all call."""
    rows = list(rows)
    out: list[Optional[dict]] = [None] * len(rows)
    good, good_at = [], []
    for i, row in enumerate(rows):
        base = {"user": _plain(row.get("user")), "source": policy.source, "policy_version": policy.version,
                **{p: None for p in PATTERNS}, "messages": None, "error": None}
        try:
            ratings = _plain(row.get("ratings"))
            request = UserRequest(history=tuple(_plain(row.get("history")) or ()),
                                  ratings=tuple(ratings) if ratings is not None else None,
                                  candidates=tuple(_plain(row.get("candidates")) or ()))
            good.append(policy.check(request, max_candidates))
            good_at.append(i)
        except ServingInputError as exc:
            base["error"] = str(exc)
        out[i] = base
    for i, prompt in zip(good_at, policy.personalize_many(good)):
        out[i].update({p: prompt.action_ids[p] for p in PATTERNS})
        out[i]["messages"] = [dict(m) for m in prompt.rendered_messages]
    return out


# ------------------------------------------------------------------------------------------------ durable sinks

def _user_key(user) -> str:
    return json.dumps(_plain(user))


class JsonlSink:
    """Appends rows as JSON lines, fsync'ed per chunk; repairs a half-written last line on open."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self) -> list[str]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keep = data[:data.rfind(b"\n") + 1]  # a line without its newline was cut by a kill: drop it
        if len(keep) != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(len(keep))
        return [_user_key(json.loads(line)["user"]) for line in keep.decode().splitlines() if line.strip()]

    def write(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self) -> None:
        pass


class ParquetSink:
    """One atomically written part file per chunk under <out>.parts/, joined into <out> by finish()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts = path.with_name(path.name + ".parts")

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def done(self) -> list[str]:
        import pyarrow.parquet as pq

        if self.path.exists() and not self.parts.exists():
            return [_user_key(u) for u in pq.read_table(self.path, columns=["user"]).column("user").to_pylist()]
        return [_user_key(u) for part in self._part_files()
                for u in pq.read_table(part, columns=["user"]).column("user").to_pylist()]

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.parts.mkdir(parents=True, exist_ok=True)
        final = self.parts / f"part-{len(self._part_files()):06d}.parquet"
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, final)

    def finish(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self._part_files()
        if not parts:
            return
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        shutil.rmtree(self.parts)


def personalize_file(run_dir: str | Path, users: str | Path, out: str | Path, chunk_size: int = 64,
                     overrides: Optional[list[str]] = None, max_candidates: Optional[int] = None,
                     progress: bool = True) -> dict:
    """Write the served prompt of every user in `users` to `out` (module doc); continues a killed run.
    Returns a summary: users, written now, already there, errors, wall seconds, users per second."""
    out = Path(out)
    sink = ParquetSink(out) if _format(out) == "parquet" else JsonlSink(out)
    rows = read_users(users)
    keys = [_user_key(r["user"]) for r in rows]
    done = sink.done()
    stray = set(done) - set(keys)
    if stray:
        raise ServingInputError(f"--out {out} holds {len(stray)} user(s) that are not in --users {users} (e.g. "
                                f"{sorted(stray)[0]}); is it the output of another user file? choose another --out")
    done_set = set(done)
    pending = [r for r, k in zip(rows, keys) if k not in done_set]
    policy = PromptPolicy.load(run_dir, overrides)
    from tqdm import tqdm

    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), unit="user", disable=not progress,
               file=sys.stderr, desc="personalize")
    errors, t0 = 0, time.perf_counter()
    try:
        for start in range(0, len(pending), chunk_size):
            chunk = personalize_rows(policy, pending[start:start + chunk_size], max_candidates)
            sink.write(chunk)
            errors += sum(r["error"] is not None for r in chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    sink.finish()
    wall = time.perf_counter() - t0
    return {"users": len(rows), "written": len(pending), "already_written": len(rows) - len(pending),
            "errors": errors, "wall_s": wall, "users_per_s": len(pending) / wall if wall > 0 and pending else None,
            "source": policy.source, "policy_version": policy.version, "out": str(out)}


class RayPersonalizer:
    """``personalize_rows`` as a Ray Data callable class: each actor loads the run once.

        ds = ray.data.read_parquet("users.parquet")
        ds.map_batches(RayPersonalizer, fn_constructor_kwargs={"run_dir": "runs/NAME"}, batch_size=256,
                       batch_format="pandas", concurrency=4).write_parquet("prompts/")
    """

    def __init__(self, run_dir: str, overrides: Optional[list[str]] = None,
                 max_candidates: Optional[int] = None) -> None:
        self.policy = PromptPolicy.load(run_dir, overrides)
        self.max_candidates = max_candidates

    def __call__(self, batch):
        import pandas as pd

        rows = personalize_rows(self.policy, batch.to_dict("records"), self.max_candidates)
        out = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        out["messages"] = [json.dumps(m) if m is not None else None for m in out["messages"]]
        return out
