"""Score mode on servers vs the local backend; writes experiments/results/serving.md.

Same users, same task-wise prompts (tests/vllm_server.py: taskwise_requests), the embedded SmolLM2 everywhere:
  1. request shapes per server, on one user's 20 candidates: one request per candidate (text), one request with
     all candidates as a prompt list (text), the same with token-id prompts, each with max_tokens 1 and 0; seconds,
     and per-title log-prob sums against the local float32 backend (max |diff|, same order or not);
  2. seconds per user through rpp (`OpenAIRanker`, score mode) at concurrency 1 and 8, next to the local backend.
The servers: vLLM (float32, eager, from .venv-vllm: `make vllm`), also as two replicas behind vllm-router, and
llama-cpp-python's server on the Q4_1 GGUF (`make server`). Run it alone on an idle machine; it starts and stops
each server itself. The runs behind experiments/results/serving.md:

    python experiments/bench_serving.py --servers local vllm vllm-2cores --users 3 --concurrency 1 8 --generate 8
    python experiments/bench_serving.py --servers vllm-router --users 3 --concurrency 8 --shapes --generate 8
    python experiments/bench_serving.py --servers llamacpp --users 1 --concurrency 1 8 --shapes 2 3 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from llm_server import LlamaServer  # noqa: E402
from vllm_server import VllmRouter, VllmServer, smollm2_float32_folder, taskwise_requests  # noqa: E402

from rpp.llm.local import LocalRanker, gguf_path, load_model  # noqa: E402
from rpp.llm.openai_backend import OpenAIRanker, title_logprobs  # noqa: E402

MODEL = "smollm2-135m-instruct"
SHAPES = [  # (name, one request for all candidates?, token ids?, max_tokens)
    ("one request per candidate, text, max_tokens 1", False, False, 1),
    ("one request per candidate, text, max_tokens 0", False, False, 0),
    ("one request, prompt list of text, max_tokens 1", True, False, 1),
    ("one request, prompt list of text, max_tokens 0", True, False, 0),
    ("one request, prompt list of token ids, max_tokens 1", True, True, 1),
]


def shape_scores(client, req, shape, tokenizer, template) -> tuple[float, list[float]]:
    """Seconds for all candidates of one request in this request shape, and the per-title log-prob sums."""
    from concurrent.futures import ThreadPoolExecutor

    _, batched, token_ids, max_tokens = shape
    prefix = template(req.messages)
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    texts = [prefix + t for t in req.candidates]
    id_prompts = [prefix_ids + tokenizer(t, add_special_tokens=False).input_ids for t in req.candidates]
    prompts = id_prompts if token_ids else texts
    kw = dict(model=MODEL, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    if batched:
        choices = sorted(client.completions.create(prompt=prompts, **kw).choices, key=lambda c: c.index)
    else:
        with ThreadPoolExecutor(8) as pool:
            choices = [r.choices[0] for r in pool.map(lambda p: client.completions.create(prompt=p, **kw), prompts)]
    seconds = time.perf_counter() - t0
    sums = []
    for choice, title, ids in zip(choices, req.candidates, id_prompts):
        if token_ids:  # positions are known exactly: the title's tokens follow the prefix's
            lps = choice.logprobs.token_logprobs[len(prefix_ids):len(ids)]
        else:
            lps, _ = title_logprobs(types.SimpleNamespace(choices=[choice]), title, "direct")
        sums.append(float(sum(lps)))
    return seconds, sums


def order_of(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def bench_shapes(name, base_url, req, local_sums, template, tokenizer, shapes) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="no-key-needed", max_retries=0, timeout=1800)
    rows = []
    for shape in shapes:
        try:
            seconds, sums = shape_scores(client, req, shape, tokenizer, template)
        except Exception as exc:  # noqa: BLE001 - a shape the server refuses is a result too
            rows.append({"server": name, "shape": shape[0], "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            print(rows[-1], flush=True)
            continue
        diff = max(abs(a - b) for a, b in zip(sums, local_sums))
        rows.append({"server": name, "shape": shape[0], "seconds": round(seconds, 2), "max_abs_diff": diff,
                     "same_order": order_of(sums) == order_of(local_sums)})
        print(rows[-1], flush=True)
    return rows


def bench_rpp(name, base_url, requests, concurrency) -> dict:
    ranker = OpenAIRanker(model=MODEL, base_url=base_url, mode="score", concurrency=concurrency, timeout_s=1800,
                          max_retries=0)
    ranker.echo_mode = ranker.probe()  # once, outside the timing
    t0 = time.perf_counter()
    out = ranker.rank(requests)
    seconds = time.perf_counter() - t0
    row = {"server": name, "concurrency": concurrency, "users": len(requests), "echo": ranker.echo_mode,
           "s_per_user": round(seconds / len(requests), 2), "failures": sum(r.failed for r in out),
           "orders": [r.order for r in out]}
    print({k: v for k, v in row.items() if k != "orders"}, flush=True)
    return row


def start_servers(name: str, llama_threads: int) -> list:
    """The servers for `name`, started; the last one is the one to talk to."""
    if name == "llamacpp":
        return [LlamaServer(gguf_path(MODEL), alias=MODEL, threads=llama_threads).start(timeout_s=300)]
    if name == "vllm":  # vLLM's CPU default: compute on one core, the other left to the API process
        return [VllmServer(smollm2_float32_folder()).start(timeout_s=600)]
    if name == "vllm-2cores":
        return [VllmServer(smollm2_float32_folder(), extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"}).start(600)]
    replicas = []
    try:
        for core in ("0", "1"):  # one replica per core: data parallelism on this 2-core machine
            replicas.append(VllmServer(smollm2_float32_folder(),
                                       extra_env={"VLLM_CPU_OMP_THREADS_BIND": core}).start(timeout_s=600))
        return replicas + [VllmRouter([r.base_url for r in replicas]).start(timeout_s=120)]
    except BaseException:
        for r in replicas:
            r.stop()
        raise


def profile_score_request(server, prompt: str, py_spy: str, raw_out: Path) -> dict:
    """One score request (echo + logprobs) to a llama-cpp-python server, timed next to the same request without
    echo, while py-spy samples the server; the lines of the server's code that hold most samples."""
    import collections
    import signal
    import subprocess

    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="no-key-needed", max_retries=0, timeout=1800)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0)
    t0 = time.perf_counter()
    plain = client.completions.create(**kw)
    plain_s = time.perf_counter() - t0
    spy = subprocess.Popen([py_spy, "record", "--pid", str(server.proc.pid), "--format", "raw", "--rate", "20",
                            "-o", str(raw_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # py-spy attaches
    t0 = time.perf_counter()
    client.completions.create(echo=True, logprobs=1, **kw)
    echo_s = time.perf_counter() - t0
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=120)
    own = collections.Counter()
    for line in raw_out.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        own[stack.split(";")[-1]] += int(count)
    total = sum(own.values())
    row = {"prompt_tokens": plain.usage.prompt_tokens, "s_without_echo": round(plain_s, 2),
           "s_with_echo_logprobs": round(echo_s, 2), "samples": total,
           "top_frames": [(frame, round(n / total, 3)) for frame, n in own.most_common(5)]}
    print(row, flush=True)
    return row


def warm_up(servers: list, prompt: str) -> None:
    """One score request to each model server, outside the timing: a fresh server's first requests are slower."""
    import openai

    for server in servers[:-1] if len(servers) > 1 else servers:  # the replicas, not the router
        client = openai.OpenAI(base_url=server.base_url, api_key="no-key-needed", max_retries=0, timeout=1800)
        client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0.0)


def bench_generate(name, base_url, requests, concurrency) -> dict:
    ranker = OpenAIRanker(model=MODEL, base_url=base_url, mode="generate", concurrency=concurrency,
                          timeout_s=1800, max_retries=0, max_new_tokens=200)
    t0 = time.perf_counter()
    out = ranker.rank(requests)
    seconds = time.perf_counter() - t0
    row = {"server": name, "mode": "generate", "concurrency": concurrency, "users": len(requests),
           "s_per_user": round(seconds / len(requests), 2), "failures": sum(r.failed for r in out),
           "mean_coverage": round(sum(r.coverage for r in out) / len(out), 3)}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--servers", nargs="+", default=["local", "vllm", "llamacpp"],
                    choices=["local", "vllm", "vllm-2cores", "llamacpp", "vllm-router"],
                    help="vllm: one server, vLLM's default core binding (one core computes); vllm-2cores: one "
                         "server computing on both cores; vllm-router: two vLLM replicas, one core each, behind "
                         "vllm-router (round robin)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8],
                    help="score mode through rpp at these concurrencies (none: skip)")
    ap.add_argument("--generate", type=int, default=0, metavar="CONCURRENCY",
                    help="also time generate mode through rpp at this concurrency (0: skip)")
    ap.add_argument("--shapes", type=int, nargs="*", default=list(range(len(SHAPES))),
                    help="which request shapes to time (indices into SHAPES; none: skip)")
    ap.add_argument("--llama-threads", type=int, default=2)
    ap.add_argument("--profile", metavar="PY_SPY", default=None,
                    help="llamacpp: profile one score request with this py-spy executable")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "serving.json"))
    args = ap.parse_args()

    requests = taskwise_requests(args.users)
    loaded = load_model(MODEL, "float32")
    local = LocalRanker(mode="score", dtype="float32")
    local.rank(requests[:1])  # warm-up, outside the timing
    t0 = time.perf_counter()
    local_out = local.rank(requests)
    local_s = (time.perf_counter() - t0) / len(requests)
    local_sums = [list(r.scores) for r in local_out]
    template = OpenAIRanker(model=MODEL, base_url="http://127.0.0.1:1/v1").template
    argv = sys.argv[1:]
    if "--out" in argv:  # where the results went is not part of the measurement
        del argv[argv.index("--out"):argv.index("--out") + 2]
    results = {"users": args.users, "command": " ".join(argv),
               "prefix_tokens": [len(loaded.tokenizer(template(r.messages), add_special_tokens=False).input_ids)
                                 for r in requests],
        "local": {"s_per_user": round(local_s, 2), "orders": [r.order for r in local_out]},
        "shapes": [], "rpp": [], "startup_s": {}}
    print("local", results["local"]["s_per_user"], "s/user", flush=True)

    for name in args.servers:
        if name == "local":
            continue
        t0 = time.perf_counter()
        servers = start_servers(name, args.llama_threads)
        results["startup_s"][name] = round(time.perf_counter() - t0, 1)
        base_url = servers[-1].base_url
        try:
            warm_up(servers, template(requests[0].messages) + requests[0].candidates[0])
            if args.profile and name == "llamacpp":
                results["profile"] = profile_score_request(
                    servers[0], template(requests[0].messages) + requests[0].candidates[0], args.profile,
                    Path(args.out).with_name("llamacpp_score_request.pyspy.txt"))
            shapes = [SHAPES[i] for i in args.shapes]
            results["shapes"] += bench_shapes(name, base_url, requests[0], local_sums[0], template,
                                              loaded.tokenizer, shapes)
            for c in args.concurrency:
                row = bench_rpp(name, base_url, requests, c)
                row["same_orders_as_local"] = row.pop("orders") == results["local"]["orders"]
                results["rpp"].append(row)
            if args.generate:
                results.setdefault("generate", []).append(
                    bench_generate(name, base_url, taskwise_requests(args.users, mode="generate"), args.generate))
        finally:
            for server in reversed(servers):
                server.stop()
        Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
