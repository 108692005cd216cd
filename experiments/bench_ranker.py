"""Benchmark of the LLM ranking layer; writes experiments/results/ranker.md.

Measured in one run:
  1. shared-prefix batched scoring vs a naive forward per candidate (one request, 20 candidates);
  2. 16 users in one batched rank() call vs 16 sequential calls;
  3. the openai backend at concurrency 1 vs 8 against a local fake endpoint with fixed latency;
  4. ranking quality of score mode on ML-100K test users (NDCG@10, MRR): candidate list shown or not,
     sum vs per-token-mean scoring, next to random and popularity rankings of the same candidates.

The prompt here is a fixed one of this script's own (system + user message with the user's last 15 history
titles); the real prompt builder lives in rpp/prompts/.

    python experiments/bench_ranker.py                 # 300 test users, ~10-15 min on 2 cores
    python experiments/bench_ranker.py --users 20      # quick run
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rpp import metrics  # noqa: E402
from rpp.config import load_config  # noqa: E402
from rpp.data import load_ml100k, split_users  # noqa: E402
from rpp.llm import RankRequest, format_candidate_list  # noqa: E402
from rpp.llm.base import render_candidates  # noqa: E402
from rpp.llm.parsing import order_from_scores  # noqa: E402
from rpp.llm.local import LocalRanker, reduce_scores, score_candidates, score_naive  # noqa: E402
from tqdm import tqdm  # noqa: E402

HISTORY = 15
SYSTEM = "You are a movie recommender system."


def build_request(sample, ds, show_list: bool) -> RankRequest:
    noun = ds.item_noun
    history = ", ".join(ds.title(i) for i in sample.history[-HISTORY:])
    titles = tuple(ds.title(i) for i in sample.candidates)
    text = f"The user has recently watched these {noun}s, oldest first: {history}."
    if show_list:
        text += f"\nCandidate {noun}s:\n{format_candidate_list(titles)}"
    text += f"\nWhich {noun} will this user watch next? Answer with the title only."
    return RankRequest(({"role": "system", "content": SYSTEM}, {"role": "user", "content": text}), titles)


def timeit(fn, repeat: int = 3) -> float:
    """Median wall time of fn() over `repeat` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def load_fake_endpoint():
    spec = importlib.util.spec_from_file_location("llm_server", ROOT / "tests" / "llm_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FakeEndpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=300, help="test users for the quality runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "ranker.md"))
    args = ap.parse_args()

    cfg = load_config(None)
    ds = load_ml100k()
    split = split_users(ds, cfg.data, cfg.seed)
    test = split.test[:args.users]
    ranker = LocalRanker(mode="score", dtype=args.dtype, batch_size=16, threads=args.threads)
    lines = []
    print(f"model {ranker.loaded.identity}", flush=True)

    # 1. shared prefix vs naive
    req = build_request(split.val[0], ds, show_list=False)
    t_shared = timeit(lambda: score_candidates(ranker.loaded, [req]))
    t_naive = timeit(lambda: score_naive(ranker.loaded, req), repeat=1)
    print(f"shared {t_shared:.2f}s naive {t_naive:.2f}s", flush=True)

    # 2. 16 users batched vs sequential
    reqs16 = [build_request(s, ds, show_list=False) for s in split.val[:16]]
    t_batched = timeit(lambda: ranker.rank(reqs16), repeat=1)
    t_seq = timeit(lambda: [ranker.rank([r]) for r in reqs16], repeat=1)
    print(f"batched {t_batched:.2f}s sequential {t_seq:.2f}s", flush=True)

    # 3. openai backend concurrency against a latency-bound endpoint
    from rpp.llm.openai_backend import OpenAIRanker

    latency, n_req = 0.2, 32
    gen_reqs = [build_request(s, ds, show_list=True) for s in split.val[:n_req]]
    with load_fake_endpoint()(latency_s=latency) as fake:
        tput = {}
        for conc in (1, 8):
            oa = OpenAIRanker(model="fake", base_url=fake.base_url, mode="generate", concurrency=conc)
            t = time.perf_counter()
            out = oa.rank(gen_reqs)
            tput[conc] = n_req / (time.perf_counter() - t)
            assert not any(r.failed for r in out)
    print(f"throughput {tput}", flush=True)

    lines += [
        "## Speed", "",
        "| measurement | baseline | optimized | speed-up | goal |", "|---|---|---|---|---|",
        f"| score 20 candidates of one request ({len(req.candidates)} titles) | naive forward per candidate "
        f"{t_naive:.2f} s | shared prefix, one batch {t_shared:.2f} s | {t_naive / t_shared:.1f}x | >= 4x |",
        f"| 16 users | 16 sequential rank() calls {t_seq:.2f} s | one batched rank() call {t_batched:.2f} s | "
        f"{t_seq / t_batched:.1f}x | >= 1.5x |",
        f"| openai backend, {n_req} generate requests, fake endpoint with {latency * 1000:.0f} ms latency | "
        f"concurrency 1: {tput[1]:.1f} req/s | concurrency 8: {tput[8]:.1f} req/s | {tput[8] / tput[1]:.1f}x | "
        ">= 5x |", "",
    ]

    # 4. quality
    pop = split.train_interactions["item"].value_counts()
    rng = np.random.default_rng(cfg.seed)
    ranks: dict[str, list[int]] = {"random": [], "popularity": []}
    for s in test:
        ranks["random"].append(metrics.target_rank(list(rng.permutation(len(s.candidates))), s.target_index))
        counts = [int(pop.get(i, 0)) for i in s.candidates]
        order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
        ranks["popularity"].append(metrics.target_rank(order, s.target_index))
    timings = {}
    for show in (False, True):
        requests = [render_candidates(build_request(s, ds, show_list=show)) for s in test]
        t = time.perf_counter()
        # one scoring pass gives both reductions: sum and per-token mean of the same title log-probs
        token_lps = []
        for req in tqdm(requests, desc=f"quality, list {'shown' if show else 'not shown'}", unit="user"):
            token_lps.extend(score_candidates(ranker.loaded, [req]))  # one request per pass: fastest on CPU
        timings[show] = (time.perf_counter() - t) / len(test)
        sums = [order_from_scores(reduce_scores(lps, "sum")) for lps in token_lps]
        means = [order_from_scores(reduce_scores(lps, "mean")) for lps in token_lps]
        label = "list shown" if show else "no list"
        ranks[f"score, sum, {label}"] = [metrics.target_rank(o, s.target_index) for o, s in zip(sums, test)]
        ranks[f"score, mean, {label}"] = [metrics.target_rank(o, s.target_index) for o, s in zip(means, test)]
        print(f"quality {label} done ({timings[show]:.2f} s/user)", flush=True)

    lines += [f"## Quality on {len(test)} ML-100K test users ({cfg.data.n_candidates} candidates, "
              f"{cfg.data.negatives} negatives, last {HISTORY} history titles in the prompt)", "",
              "| ranking | NDCG@10 (95% CI) | MRR (95% CI) | HR@1 |", "|---|---|---|---|"]
    for name, r in ranks.items():
        summ = metrics.summarize(r, n_boot=1000, seed=cfg.seed)
        n, m, h = summ["ndcg@10"], summ["mrr"], summ["hr@1"]
        lines.append(f"| {name} | {n.mean:.3f} ({n.low:.3f}-{n.high:.3f}) | {m.mean:.3f} ({m.low:.3f}-{m.high:.3f}) "
                     f"| {h.mean:.3f} |")
    notes = ["## Notes", ""]
    if t_seq / t_batched < 1.5:
        notes.append(f"- Batching 16 users into one forward pass ran at {t_seq / t_batched:.1f}x the speed of 16 single "
                     "passes. On CPU a single ~300-600-token prompt already keeps the matrix multiplications busy, so "
                     "a batch adds no parallelism, while left-padding every prompt to the longest one adds work. "
                     "That is why `llm.batch_size` defaults to 1 (one request per pass); on a GPU, raise it.")
    sum_nl, mean_nl = (metrics.ndcg_at_k(np.asarray(ranks[f"score, {k}, no list"]), 10) for k in ("sum", "mean"))
    t = metrics.paired_test(mean_nl, sum_nl)
    notes.append(f"- Without the list, per-token mean minus sum: NDCG@10 {t.mean_diff:+.3f} on the same users (Wilcoxon "
                 f"p = {t.p_value:.2g}; one forward pass, two reductions). `llm.score_reduction` chooses.")
    lines += ["", "Scoring time per user (20 candidates, one user per pass; one pass serves both reductions): "
              f"{timings[False]:.2f} s without the "
              f"list, {timings[True]:.2f} s with it.", ""]
    lines += notes + [""]

    import torch

    header = [
        "# Ranker benchmark", "",
        f"Command: `python experiments/bench_ranker.py --users {args.users}"
        + (f" --threads {args.threads}" if args.threads else "") + (f" --dtype {args.dtype}" if args.dtype != "auto" else "")
        + "`", "",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} on {torch.get_num_threads()} threads, "
        f"model `{ranker.loaded.name}` in {ranker.loaded.dtype} (weights sha256 {ranker.loaded.weights_sha256[:12]}…). "
        f"Load average at the end: {os.getloadavg()[0]:.1f} (1.0 per busy core; above the core count, other jobs "
        "shared the cores and timings are pessimistic).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(header + lines) + "\n")
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
