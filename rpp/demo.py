"""The main job behind `make demo`: fetch the embedded assets, train the four agents on a small budget on ML-100K
training users, evaluate them on held-out test users (multi-step and one-shot) next to the task-wise prompt, and
show three personalized prompts. With the response cache, a re-run replays every LLM call from disk."""
from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

from rpp.config import Config


def _rule(title: str) -> str:
    return f"\n=== {title} " + "=" * max(0, 100 - len(title))


def example_prompts(run_dir: Path, split: str, steps: int, n: int = 3) -> list[dict]:
    """Up to n evaluated users with distinct action combinations (the most varied ones first)."""
    rows = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == split and r.get("steps") == steps]
    picked, seen = [], set()
    for row in rows:
        combo = tuple(sorted(row["actions"].items()))
        if combo not in seen:
            seen.add(combo)
            picked.append(row)
        if len(picked) == n:
            break
    return picked + [r for r in rows if r not in picked][: n - len(picked)]


def run_demo(cfg: Config) -> None:
    from rpp import assets
    from rpp.agents import evaluate, train

    t0 = time.perf_counter()
    print(_rule("1/4 assets"))
    for name in assets.default_assets():
        assets.fetch(name)
        print(f"{name}: verified")

    print(_rule(f"2/4 training on {cfg.data.n_train_users} ML-100K users ({cfg.train.total_steps} env steps, "
                f"{cfg.env.n_envs} users per batched LLM call)"))
    run_dir = Path(cfg.train.runs_dir) / cfg.name
    if (run_dir / "checkpoints").exists():
        print(f"{run_dir} exists: continuing it (finished runs continue with nothing to do; "
              f"delete {run_dir} to train from scratch)")
        run_dir = train(cfg, resume=run_dir)
    else:
        run_dir = train(cfg)

    split = cfg.eval.split
    print(_rule(f"3/4 evaluation on {cfg.data.n_test_users} held-out {split} users"))
    one_shot = evaluate(run_dir, split=split, steps=1)
    multi = evaluate(run_dir, split=split, steps=cfg.eval.steps) if cfg.eval.steps > 1 else one_shot
    print(multi.table())
    if multi is not one_shot:
        print()
        print(one_shot.table())

    print(_rule("4/4 three personalized prompts (test users)"))
    for row in example_prompts(run_dir, split, multi.steps):
        chosen = ", ".join(f"{p}={a}" for p, a in row["actions"].items())
        print(f"\nuser {row['user']}: {chosen}")
        print(f"target ranked #{row['target_rank'] + 1} (task-wise prompt: #{row['taskwise_target_rank'] + 1})")
        print(textwrap.indent(row["prompt"].strip(), "  | "))
    print(f"\nrun directory: {run_dir} (config, checkpoints, metrics.jsonl, learning_curve.png, prompts.jsonl)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
