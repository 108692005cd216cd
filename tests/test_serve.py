"""`rpp serve` and `rpp personalize` with real clients: the service runs as a subprocess on 127.0.0.1 and is called
over HTTP (httpx2, the HTTP client the openai SDK here is built on); the batch command is killed with SIGKILL and
resumed. The run is a tiny one trained in-process with a deterministic stand-in ranker (plumbing); the real SmolLM2
ranks only in the /v1/rank test."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from llm_server import free_port

import rpp

ROOT = Path(rpp.__file__).resolve().parents[1]
PATTERNS = ("role", "history", "reasoning", "format")


pytestmark = pytest.mark.slow  # every test here shares a trained run and starts servers (make test runs them)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run whose gate serves the policy (so the policy path is what the service runs)."""
    import torch

    from test_agents_train import PromptHashRanker, tiny_cfg

    from rpp.agents import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("serve")
        path = train(tiny_cfg(tmp, "served", "train.total_steps=8", "env.reward_baseline=none"),
                     ranker=PromptHashRanker(), progress=False)
    finally:
        torch.set_num_threads(before)
    gate = json.loads((path / "gate.json").read_text())
    gate.update(served="policy", reason="set by the test")
    (path / "gate.json").write_text(json.dumps(gate))
    return path


@pytest.fixture(scope="module")
def policy(run_dir):
    from rpp.agents import PromptPolicy

    return PromptPolicy.load(run_dir)


class Server:
    """`rpp serve` as a subprocess on a free loopback port."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(run_dir).parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "rpp.cli", "serve", "--run", str(run_dir),
                                      "--port", str(self.port), "--threads", "1", *args],
                                     cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"rpp serve exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("rpp serve did not answer /healthz within 180 s")
            time.sleep(0.3)

    def wait_ranker(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = httpx.get(f"{self.url}/healthz").json()["ranker"]
            if state != "loading":
                return state
            time.sleep(0.5)
        return "loading"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """The service with the run's own ranker: the real SmolLM2, fp32, one thread, a throwaway cache."""
    cache = tmp_path_factory.mktemp("servecache") / "responses.sqlite"
    srv = Server(run_dir, "--batch-window-ms", "50", "--max-candidates", "30", "--set", "llm.dtype=float32",
                 "--set", "llm.threads=1", "--set", f"llm.cache_path={cache}")
    yield srv
    srv.stop()


def test_personalize_run_info_health_and_docs(server, policy, run_dir):
    run = httpx.get(f"{server.url}/v1/run").json()
    assert run["checkpoint"] == policy.checkpoint and run["served"] == "policy"
    assert run["config_digest"] == policy.config_digest and run["policy_version"] == policy.version
    assert run["action_set"] == {p: [a.id for a in policy.action_set.actions[p]] for p in PATTERNS}
    assert run["gate"]["reason"] == "set by the test"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/personalize", "/v1/rank", "/healthz", "/v1/run"} <= set(spec["paths"])
    assert httpx.get(f"{server.url}/docs").status_code == 200

    ids, cands = [1, 50, 181, 100, 258], [7, 12, 300, 64]
    titles = [policy.dataset.title(i) for i in ids]
    cand_titles = [policy.dataset.title(i) for i in cands]
    by_id = httpx.post(f"{server.url}/v1/personalize",
                       json={"user": "u1", "history": ids, "ratings": [5, 4, 3, 5, 2], "candidates": cands})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    expected = policy.personalize(titles, cand_titles, [5, 4, 3, 5, 2])
    assert body["user"] == "u1" and body["source"] == "policy"
    assert body["actions"] == expected.action_ids
    assert body["messages"] == [dict(m) for m in expected.rendered_messages]
    by_title = httpx.post(f"{server.url}/v1/personalize",
                          json={"history": titles, "ratings": [5, 4, 3, 5, 2], "candidates": cand_titles}).json()
    assert by_title["actions"] == body["actions"] and by_title["messages"] == body["messages"]
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and health["counters"]["personalized"] >= 2


BAD_INPUTS = [
    # (body sent as raw bytes or JSON, status, words the message must contain)
    (b'{"history": [1, 2', 400, "not valid JSON"),
    (b'[1, 2, 3]', 422, "body"),
    ({"candidates": [1, 2]}, 422, "history: Field required (add it)"),
    ({"history": "Toy Story (1995)"}, 422, "history: Input should be a valid list"),
    ({"history": []}, 422, "history is empty"),
    ({"history": [1, 999999]}, 422, "unknown item id(s) [999999]"),
    ({"history": [1, "Heat (1995)"]}, 422, "mixes item ids and titles"),
    ({"history": [1, 2], "ratings": [5]}, 422, "ratings has 1 values for 2 history items"),
    ({"history": [1, 2], "candidates": list(range(1, 32))}, 422, "31 candidates, at most 30"),
    ({"history": [1, 2], "ratings": [5, "x"]}, 422, "ratings.1"),
]


@pytest.mark.parametrize("body,status,words", BAD_INPUTS, ids=[w for _, _, w in BAD_INPUTS])
def test_bad_input_gets_a_4xx_that_says_what_to_change(server, body, status, words):
    before = httpx.get(f"{server.url}/healthz").json()["counters"]["bad_requests"]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    answer = httpx.post(f"{server.url}/v1/personalize", **kwargs)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    assert httpx.get(f"{server.url}/healthz").json()["counters"]["bad_requests"] == before + 1


def test_rank_needs_candidates(server):
    answer = httpx.post(f"{server.url}/v1/rank", json={"history": [1, 2]})
    assert answer.status_code == 422 and "candidates" in answer.json()["error"]


def test_concurrent_callers_share_micro_batches(server, policy):
    histories = [[i, i + 1, i + 2] for i in range(1, 65, 4)]

    async def call_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/personalize", json={"history": h, "candidates": [9, 10]})
                                          for h in histories])

    answers = asyncio.run(call_all())
    assert all(a.status_code == 200 for a in answers)
    assert max(a.json()["batch_size"] for a in answers) > 1  # requests were batched across callers
    for h, a in zip(histories, answers):  # ... and batching changed no one's answer
        expected = policy.personalize([policy.dataset.title(i) for i in h], [policy.dataset.title(9),
                                                                              policy.dataset.title(10)])
        assert a.json()["actions"] == expected.action_ids
    batches = httpx.get(f"{server.url}/healthz").json()["batches"]["policy"]
    assert any(int(size) > 1 for size in batches)


@pytest.mark.llm
def test_rank_with_the_real_smollm2(server, policy, smollm_ranker):
    from rpp.llm.base import RankRequest

    assert server.wait_ranker() == "ready"
    ids, cands = [1, 50, 181], [7, 12, 300, 64, 98]
    answer = httpx.post(f"{server.url}/v1/rank", json={"history": ids, "candidates": cands}, timeout=300)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    cand_titles = [policy.dataset.title(i) for i in cands]
    prompt = policy.personalize([policy.dataset.title(i) for i in ids], cand_titles)
    expected = smollm_ranker.rank([RankRequest(messages=prompt.messages, candidates=cand_titles)])[0]
    assert body["order"] == expected.order and body["ranking"] == [cand_titles[i] for i in expected.order]
    assert body["actions"] == prompt.action_ids
    assert body["timings"]["ranker_ms"] > 0 and body["timings"]["policy_ms"] > 0
    assert httpx.get(f"{server.url}/healthz").json()["counters"]["ranked"] >= 1


def test_ranker_timeout_and_failure_are_5xx_with_a_reason_and_counted(run_dir):
    """An OpenAI-compatible ranker that accepts and never answers: 504 within the service's timeout; the same
    address refusing connections: 502 naming the error. Both counted in /healthz."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    port = hang.getsockname()[1]
    srv = Server(run_dir, "--rank-timeout-s", "1", "--set", "llm.backend=openai", "--set",
                 f"llm.base_url=http://127.0.0.1:{port}/v1", "--set", "llm.timeout_s=2", "--set", "llm.max_retries=0",
                 "--set", "llm.cache=false", "--set", "llm.model=smollm2", "--set", "llm.mode=generate")
    try:
        assert srv.wait_ranker() == "ready"
        t0 = time.monotonic()
        slow = httpx.post(f"{srv.url}/v1/rank", json={"history": [1, 2], "candidates": [3, 4]}, timeout=30)
        assert slow.status_code == 504 and "did not answer within 1 s" in slow.json()["error"]
        assert time.monotonic() - t0 < 10
        hang.close()
        time.sleep(2.5)  # the hung call times out in the ranker thread (llm.timeout_s)
        refused = httpx.post(f"{srv.url}/v1/rank", json={"history": [1, 2], "candidates": [3, 4]}, timeout=30)
        assert refused.status_code == 502, refused.text
        assert "the ranker failed: ServerError" in refused.json()["error"]
        counters = httpx.get(f"{srv.url}/healthz").json()["counters"]
        assert counters["rank_timeouts"] == 1 and counters["rank_failures"] == 1 and counters["ranked"] == 0
    finally:
        hang.close()
        srv.stop()


def test_no_rank_answers_503(run_dir):
    srv = Server(run_dir, "--no-rank")
    try:
        answer = httpx.post(f"{srv.url}/v1/rank", json={"history": [1, 2], "candidates": [3, 4]})
        assert answer.status_code == 503 and "--no-rank" in answer.json()["error"]
        assert httpx.post(f"{srv.url}/v1/personalize", json={"history": [1, 2]}).status_code == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ batch

def _users(policy, n: int) -> list[dict]:
    """n real users of the run's dataset (their last 10 items as ids), one with an unknown item."""
    inter = policy.dataset.interactions
    rows = []
    for user, group in inter.groupby("user", sort=True):
        items = [int(i) for i in group["item"].tolist()[-10:]]
        rows.append({"user": int(user), "history": items[:-3], "candidates": items[-3:]})
        if len(rows) == n:
            break
    rows[3]["history"] = [1, 999999]
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_batch_killed_with_sigkill_resumes_to_the_uninterrupted_output(run_dir, policy, tmp_path):
    from rpp.serve.batch import personalize_file

    users = tmp_path / "users.jsonl"
    _write_jsonl(users, _users(policy, 400))
    reference = tmp_path / "reference.jsonl"
    summary = personalize_file(run_dir, users, reference, chunk_size=5, progress=False)
    assert summary["written"] == 400 and summary["errors"] == 1
    lines = reference.read_text().splitlines()
    assert len(lines) == 400 and len({json.loads(line)["user"] for line in lines}) == 400
    assert "unknown item id(s) [999999]" in json.loads(lines[3])["error"]

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "rpp.cli", "personalize", "--run", str(run_dir), "--users", str(users),
           "--out", str(out), "--chunk-size", "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = out.read_text().count("\n")
    assert 20 <= written < 400, written
    with open(out, "a") as fh:  # what a kill in the middle of a write leaves: half a line
        fh.write('{"user": 999, "source": "pol')
    resumed = subprocess.run(cmd + ["--no-progress"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{400 - written} written now, {written} already there" in resumed.stdout
    assert out.read_bytes() == reference.read_bytes()
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert "0 written now, 400 already there" in again.stdout and out.read_bytes() == reference.read_bytes()


def test_batch_parquet_resumes_from_its_parts_and_matches_jsonl(run_dir, policy, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rpp.serve.batch import ParquetSink, personalize_file, personalize_rows

    rows = _users(policy, 30)
    users = tmp_path / "users.parquet"
    pq.write_table(pa.Table.from_pylist(rows), users)
    jsonl = tmp_path / "users.jsonl"
    _write_jsonl(jsonl, rows)
    personalize_file(run_dir, jsonl, tmp_path / "ref.jsonl", progress=False)
    reference = [json.loads(line) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    out = tmp_path / "out.parquet"
    ParquetSink(out).write(personalize_rows(policy, rows[:8]))  # what a run killed after one chunk leaves
    summary = personalize_file(run_dir, users, out, chunk_size=7, progress=False)
    assert summary["written"] == 22 and summary["already_written"] == 8
    assert not out.with_name(out.name + ".parts").exists()
    assert pq.read_table(out).to_pylist() == reference
    subset = tmp_path / "subset.jsonl"  # an --out written for another user file is refused, not mixed
    _write_jsonl(subset, rows[:5])
    with pytest.raises(ValueError, match="not in --users"):
        personalize_file(run_dir, subset, tmp_path / "ref.jsonl", progress=False)


def test_a_run_whose_gate_serves_the_fixed_prompt_serves_it_to_everyone(run_dir, policy, tmp_path):
    from rpp.agents import PromptPolicy
    from rpp.serve.batch import personalize_rows

    fixed_run = tmp_path / "fixed"
    shutil.copytree(run_dir, fixed_run)
    gate = json.loads((fixed_run / "gate.json").read_text())
    gate.update(served="fixed", fixed_indices=[1, 0, 1, 0],
                fixed_actions={p: policy.action_set.action(p, i).id for p, i in zip(PATTERNS, [1, 0, 1, 0])})
    (fixed_run / "gate.json").write_text(json.dumps(gate))
    fixed = PromptPolicy.load(fixed_run)
    out = personalize_rows(fixed, _users(policy, 12))
    assert {r["source"] for r in out} == {"fixed"}
    for r in out:
        if r["error"] is None:
            assert {p: r[p] for p in PATTERNS} == gate["fixed_actions"]
    assert fixed.choose(["Toy Story (1995)"]) == gate["fixed_actions"]


@pytest.mark.slow
def test_ray_data_map_batches_runs_the_same_function(run_dir, policy):
    ray = pytest.importorskip("ray")
    from rpp.serve.batch import RayPersonalizer, personalize_rows

    rows = _users(policy, 24)
    expected = personalize_rows(policy, rows)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}})
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(rows).map_batches(RayPersonalizer, fn_constructor_kwargs={"run_dir": str(run_dir)},
                                                   batch_size=8, batch_format="pandas", concurrency=1)
        got = sorted(ds.take_all(), key=lambda r: r["user"])
    finally:
        ray.shutdown()
    want = sorted(expected, key=lambda r: r["user"])
    assert [r["user"] for r in got] == [r["user"] for r in want]
    for g, w in zip(got, want):
        assert {p: g[p] for p in PATTERNS} == {p: w[p] for p in PATTERNS}
        assert (json.loads(g["messages"]) if g["messages"] else None) == w["messages"]
        assert g["error"] == w["error"]
