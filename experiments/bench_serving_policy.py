"""What serving a trained run costs: a bounded load test of `rpp serve` on loopback, and `rpp personalize`'s rate.

    python experiments/bench_serving_policy.py --run runs/ml100k --requests 96 --rank-requests 16 --users 400

1. starts `rpp serve --run RUN` as a subprocess on a free 127.0.0.1 port (local ranker of the run's config, response
   cache off, so every /v1/rank is a real forward pass), waits for /healthz and the ranker;
2. /v1/personalize alone: --requests requests at concurrency 1, 8 and 32 (real test users of the run's dataset:
   their history and 20 candidates); p50 / p99 latency and requests per second;
3. /v1/rank with the local ranker: --rank-requests requests at each concurrency; the same figures, plus the
   policy's share of a request: the server-side encoder + policy time of its micro-batch over the ranker time of
   its micro-batch (goal: < 10%);
4. `rpp personalize` on --users users (JSON lines in and out): users per second as the command reports it.
Writes experiments/results/serving-policy.md (--out). Every loop is bounded by its request count; nothing but
127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from llm_server import free_port  # noqa: E402


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def user_bodies(run: str, n: int, seed: int = 0) -> list[dict]:
    """n request bodies from the run's dataset: a user's history (all but the last 20 items, at most 50) and 20
    candidates (their last 10 items and 10 random others), seeded."""
    from rpp.agents import PromptPolicy

    dataset = PromptPolicy.load(run).dataset
    rng = np.random.default_rng(seed)
    items = dataset.items["item"].to_numpy()
    bodies = []
    for user, group in dataset.interactions.groupby("user", sort=True):
        seq = [int(i) for i in group["item"].tolist()]
        if len(seq) < 30:
            continue
        cands = seq[-10:] + [int(i) for i in rng.choice(items, 10, replace=False)]
        rng.shuffle(cands)
        bodies.append({"user": int(user), "history": seq[:-20][-50:], "candidates": cands})
        if len(bodies) == n:
            break
    return bodies


async def load(url: str, path: str, bodies: list[dict], concurrency: int, timeout: float) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies, answers = [], []

    async def one(client, body):
        async with gate:
            t0 = time.perf_counter()
            r = await client.post(path, json=body)
            latencies.append(time.perf_counter() - t0)
            answers.append((r.status_code, r.json()))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(client, b) for b in bodies])
        wall = time.perf_counter() - t0
    ok = [a for s, a in answers if s == 200]
    lat = np.array(latencies) * 1000
    out = {"concurrency": concurrency, "requests": len(bodies), "ok": len(ok), "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99)), "req_per_s": len(bodies) / wall,
           "mean_batch": float(np.mean([a["batch_size"] for a in ok])) if ok else None,
           "errors": sorted({json.dumps(a)[:200] for s, a in answers if s != 200})[:3]}
    if ok and "ranker_ms" in ok[0]["timings"]:
        policy = np.array([a["timings"]["policy_ms"] for a in ok])
        ranker = np.array([a["timings"]["ranker_ms"] for a in ok])
        out.update(policy_ms=float(np.median(policy)), ranker_ms=float(np.median(ranker)),
                   policy_share=float(np.median(policy / ranker)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--requests", type=int, default=96, help="/v1/personalize requests per concurrency level")
    ap.add_argument("--rank-requests", type=int, default=16, help="/v1/rank requests per concurrency level")
    ap.add_argument("--users", type=int, default=400, help="users for the batch command")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "serving-policy.md"))
    args = ap.parse_args()

    levels = args.concurrency
    # distinct users for every level and endpoint: the encoder's LRU cache never serves a repeat, so each figure
    # includes embedding a new user's state text (the batch command gets the first --users users)
    n_levels = len(levels)
    n_bodies = max(8 + n_levels * (args.requests + args.rank_requests), args.users)
    bodies = user_bodies(args.run, n_bodies)
    if len(bodies) < 8 + n_levels * (args.requests + args.rank_requests):
        raise SystemExit(f"the run's dataset has only {len(bodies)} users with 30+ items; ask for fewer requests")
    warm, rest = bodies[:8], bodies[8:]
    personalize_sets = [rest[k * args.requests:(k + 1) * args.requests] for k in range(n_levels)]
    rest = rest[n_levels * args.requests:]
    rank_sets = [rest[k * args.rank_requests:(k + 1) * args.rank_requests] for k in range(n_levels)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_cmd = ["rpp", "serve", "--run", args.run, "--port", str(port), "--threads", "1", "--no-cache",
                 "--set", "llm.threads=1"]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "rpp.cli", *serve_cmd[1:]], cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    personalize, rank = [], []
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"rpp serve did not start:\n{log.read()}")
            try:
                health = httpx.get(f"{url}/healthz", timeout=2).json()
                if health["ranker"] != "loading":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if health["ranker"] != "ready":
            raise SystemExit(f"ranker: {health['ranker']}")
        run_info = httpx.get(f"{url}/v1/run").json()
        asyncio.run(load(url, "/v1/personalize", warm, 8, 120))  # warm-up (first batches, thread pools)
        asyncio.run(load(url, "/v1/rank", warm[:2], 1, 600))
        for c, chunk in zip(levels, personalize_sets):
            personalize.append(asyncio.run(load(url, "/v1/personalize", chunk, c, 120)))
            print("personalize", personalize[-1], flush=True)
        for c, chunk in zip(levels, rank_sets):
            rank.append(asyncio.run(load(url, "/v1/rank", chunk, c, 900)))
            print("rank", rank[-1], flush=True)
        counters = httpx.get(f"{url}/healthz").json()["counters"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)

    with tempfile.TemporaryDirectory() as tmp:
        users = Path(tmp) / "users.jsonl"
        users.write_text("".join(json.dumps(b) + "\n" for b in bodies[:args.users]))
        batch_cmd = ["rpp", "personalize", "--run", args.run, "--users", "users.jsonl", "--out", "prompts.jsonl",
                     "--no-progress"]
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rpp.cli", *batch_cmd[1:5], str(users), "--out",
                               str(Path(tmp) / "prompts.jsonl"), "--no-progress"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=1800)
        batch_wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(done.stderr)
        batch_line = done.stdout.strip()

    lines = [
        "# Serving the trained policy: latency and throughput on loopback",
        "",
        f"Run `{run_info['policy_version']}` (served: {run_info['served']}), ranker "
        f"{run_info['ranker']['backend']} {run_info['ranker']['model']} ({run_info['ranker']['mode']} mode), "
        f"{platform.machine()} CPU, {os.cpu_count()} cores; torch and the ranker on ONE thread each. "
        "**Taken while other jobs ran on the same 2 cores**: absolute figures are pessimistic and noisy; the "
        "policy's share of a ranking is the figure that carries over.",
        "",
        "Commands:",
        "```",
        " ".join(["python", "experiments/bench_serving_policy.py", "--run", args.run, "--requests",
                  str(args.requests), "--rank-requests", str(args.rank_requests), "--users", str(args.users)]),
        "# which runs:  " + " ".join(serve_cmd[:2] + ["--run", args.run, "--port", "PORT"] + serve_cmd[6:]),
        "#              " + " ".join(batch_cmd),
        "```",
        "",
        "## /v1/personalize (encoder + policy, no LLM)",
        "",
        "| concurrency | requests | ok | p50 ms | p99 ms | req/s | mean micro-batch |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
          f"{r['req_per_s']:.1f} | {r['mean_batch']:.1f} |" for r in personalize],
        "",
        "## /v1/rank with the local ranker (prompt + one real SmolLM2 ranking of 20 candidates, no cache)",
        "",
        "| concurrency | requests | ok | p50 ms | p99 ms | req/s | mean micro-batch | policy ms | ranker ms | "
        "policy / ranker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
          f"{r['req_per_s']:.2f} | {r['mean_batch']:.1f} | {r.get('policy_ms', float('nan')):.1f} | "
          f"{r.get('ranker_ms', float('nan')):.0f} | {100 * r.get('policy_share', float('nan')):.1f}% |"
          for r in rank],
        "",
        "policy ms / ranker ms: medians of the server-side time of each request's micro-batch (state encoder + policy "
        "forward; ranker call). Goal: the policy's share of a /v1/rank request < 10% of the ranker's time: "
        + ("**met**" if rank and all(r.get("policy_share", 1) < 0.10 for r in rank) else "**not met**")
        + f" (worst {100 * max(r.get('policy_share', float('nan')) for r in rank):.1f}%).",
        "",
        f"Service counters at the end: {json.dumps(counters)}.",
        "",
        "## rpp personalize (batch, JSON lines in and out)",
        "",
        f"{args.users} users, chunk size 64, one process, one thread: `{batch_line.split(': ', 1)[1]}` "
        f"(wall {batch_wall:.1f} s including start-up and model loading).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
