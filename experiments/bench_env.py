"""Framework overhead of the env step: everything except the ranker's forward, as a share of step time.

One batched step of N users = build N prompts, ONE ranker call, score the rankings, encode N state texts, assemble
the observations. The ranker call is timed inside StepCore (around `ranker.rank`) and the whole VecEnv step from outside, so

    overhead = step time - ranker time   (prompt building, refiner hook, metrics, encoding, obs assembly,
                                          auto-resets of finished episodes)

The response cache is switched off so every step really runs the model (with the cache on, repeated steps cost
almost nothing and the share is meaningless). Goal: overhead <= 10% of step time at 16 users per step.

    .venv/bin/python experiments/bench_env.py --n-envs 16 --steps 2 --warmup 1 --set env.reward_baseline=none \
        --out experiments/results/env.md

(reward_baseline=none skips the task-wise baseline call at reset, which is outside the timed steps anyway; the
step path is the same apart from one subtraction per user.)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-envs", type=int, default=16, help="users per batched step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides, e.g. --set llm.dtype=float32")
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args(argv)

    import torch

    from rpp.config import load_config
    from rpp.envs import BatchedPromptVecEnv, make_core

    overrides = [
        f"seed={args.seed}", f"env.n_envs={args.n_envs}", "llm.cache=false",
        f"data.n_train_users={max(args.n_envs * 4, 64)}", "data.n_val_users=10", "data.n_test_users=10",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    core = make_core(cfg, "train")
    setup_s = time.perf_counter() - t0
    venv = BatchedPromptVecEnv(core)
    rng = np.random.default_rng(args.seed)

    def random_actions() -> np.ndarray:
        return rng.integers(0, venv.action_space.nvec, size=(venv.num_envs, len(core.nvec)))

    load_before = os.getloadavg()[0]
    venv.reset()
    for _ in range(args.warmup):  # first-call costs (kernels, tokenizer caches) are not per-step costs
        venv.step(random_actions())
    t = core.timings
    batches_before = core.ranker.usage.batches
    resets_before = t.resets
    per_step = []
    for _ in range(args.steps):
        # the whole VecEnv step, auto-resets of finished episodes included; ranker time = the rank() calls in it
        before = (t.ranker_s + t.reset_ranker_s, t.encode_s)
        start = time.perf_counter()
        venv.step(random_actions())
        wall = time.perf_counter() - start
        per_step.append((wall, t.ranker_s + t.reset_ranker_s - before[0], t.encode_s - before[1]))
    step_calls = core.ranker.usage.batches - batches_before
    load_after = os.getloadavg()[0]
    steps = np.array(per_step)
    overhead = steps[:, 0] - steps[:, 1]
    share = overhead.sum() / steps[:, 0].sum()
    rows = [
        ("users per step", f"{args.n_envs}"),
        ("timed steps", f"{args.steps} (after {args.warmup} warm-up step(s); auto-resets inside: "
                        f"{t.resets - resets_before})"),
        ("ranker calls per step", f"{step_calls / args.steps:g} (baselines of reset users included)"),
        ("step time, mean", f"{steps[:, 0].mean():.3f} s"),
        ("ranker time, mean", f"{steps[:, 1].mean():.3f} s"),
        ("framework overhead, mean", f"{overhead.mean() * 1000:.1f} ms"),
        ("  of which state encoding (step path)", f"{steps[:, 2].mean() * 1000:.1f} ms"),
        ("  of which the rest (prompts, metrics, obs, auto-resets)", f"{(overhead - steps[:, 2]).mean() * 1000:.1f} ms"),
        ("overhead share of step time", f"{share:.2%} (goal <= 10%)"),
        ("overhead share, worst step", f"{(overhead / steps[:, 0]).max():.2%}"),
        ("setup (dataset, split, encoder, item embeddings, model load)", f"{setup_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))

    if args.out:
        command = "python experiments/bench_env.py " + " ".join(sys.argv[1:] if argv is None else argv)
        lines = [
            "# Env step: framework overhead vs ranker time",
            "",
            "Overhead = wall time of a `BatchedPromptVecEnv` step minus the time of its ranker call(s) (timed inside",
            "`StepCore` around `ranker.rank`): prompt building, the refiner hook, metrics, state-text encoding",
            "(all-MiniLM-L6-v2, one batch), observation assembly and auto-resets. Response cache off, so every",
            "step runs the model.",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; ranker `{cfg.llm.model}` ({cfg.llm.backend}, "
            f"{cfg.llm.mode} mode, dtype {cfg.llm.dtype}); {cfg.data.n_candidates} candidates per user; "
            f"default action set; seed {args.seed}. 1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after (a load above the core count inflates both the ranker and the overhead "
            "times; the share is the figure that transfers).",
            "",
            "| quantity | value |",
            "|---|---|",
            *[f"| {k.strip()} | {v} |" for k, v in rows],
            "",
            "Per step (s): " + ", ".join(f"{s:.2f} (ranker {r:.2f})" for s, r, _ in per_step),
            "",
        ]
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
