"""Do the local ranker's scores depend on the torch thread count? (docs/reliability.md, Reproducibility)

Scores the same 20-candidate requests with SmolLM2-135M on 1 and on 2 threads, per dtype, and prints the largest
difference of a title's log-prob sum and whether the candidate orders agree.

    python experiments/bench_threads.py [--requests 4]
"""
from __future__ import annotations

import argparse

import torch

from rpp.llm.base import RankRequest
from rpp.llm.local import load_model, reduce_scores, score_candidates


def requests(n: int) -> list[RankRequest]:
    return [RankRequest(messages=({"role": "user", "content": f"I watched Toy Story (1995), Heat (1995), Fargo (1996) "
                                                             f"and {i} more. Rank these movies."},),
                        candidates=tuple(f"Movie {j} ({1980 + j + i})" for j in range(20))) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4)
    args = ap.parse_args()
    reqs = requests(args.requests)
    for dtype in ("bfloat16", "float32"):
        model = load_model("smollm2-135m-instruct", dtype)
        sums = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums[threads] = [reduce_scores(r, "sum") for r in score_candidates(model, reqs)]
        diff = max(abs(a - b) for r1, r2 in zip(sums[1], sums[2]) for a, b in zip(r1, r2))
        same = all(sorted(range(len(a)), key=lambda j: -a[j]) == sorted(range(len(b)), key=lambda j: -b[j])
                   for a, b in zip(sums[1], sums[2]))
        print(f"{dtype:9s} max |sum(1 thread) - sum(2 threads)| = {diff:.2e}; candidate orders equal: {same}")


if __name__ == "__main__":
    main()
