"""Write a markdown record of a training run and its evaluations (e.g. experiments/results/ml100k.md).

    python experiments/report_run.py runs/ml100k experiments/results/ml100k.md --command "rpp train ..." ...

Reads what `rpp train` and `rpp evaluate` left in the run directory (config.yaml, ranker_check.json,
metrics.jsonl, usage.json, eval-<split>-T<steps>.json); computes nothing new, so every figure in the record is
the one the commands produced. Also draws the learning curve if the run has none (a run stopped early).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpp.metrics import METRIC_NAMES  # noqa: E402


def _est(d: dict) -> str:
    return f"{d['mean']:.4f} [{d['low']:.4f}, {d['high']:.4f}]"


def eval_section(ev: dict) -> list[str]:
    mode = "one-shot (1 LLM call per user)" if ev["steps"] == 1 else f"{ev['steps']} greedy steps, last step's ranking"
    lines = [f"### {ev['split']} split, {ev['n_users']} users, {mode}", "",
             "| metric | trained policy | task-wise prompt | diff | relative | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for m in METRIC_NAMES:
        t = ev["paired_vs_taskwise"][m]
        lines.append(f"| {m} | {_est(ev['policy'][m])} | {_est(ev['taskwise'][m])} | {t['mean_diff']:+.4f} | "
                     f"{100 * t['relative_change']:+.1f}% | {t['p_value']:.3g} |")
    lines += ["", f"LLM requests per user: {ev['llm_requests_per_user']:.2f} (task-wise: 1); answered by the model in "
              f"this evaluation: {ev['model_calls_per_user']:.2f}; ranker failures: {ev['ranker_failures']}; "
              f"wall time {ev['wall_s']:.0f} s (policy part {ev['policy_wall_s']:.0f} s).", "",
              "Actions chosen (greedy, last step): " + "; ".join(
                  f"{p}: " + ", ".join(f"{a} {n}" for a, n in c.items() if n) for p, c in ev["action_counts"].items()),
              ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--command", action="append", default=[], help="a command that produced the run (repeatable)")
    ap.add_argument("--note", action="append", default=[], help="a paragraph to add under Notes (repeatable)")
    args = ap.parse_args()
    run = Path(args.run_dir)

    from rpp.agents.train import plot_learning_curve

    if not (run / "learning_curve.png").exists():
        plot_learning_curve(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    usage = json.loads((run / "usage.json").read_text())
    check = json.loads((run / "ranker_check.json").read_text())
    evals = sorted((json.loads(p.read_text()) for p in run.glob("eval-*.json")), key=lambda e: -e["steps"])
    cfg_text = (run / "config.yaml").read_text()

    train_users_seen = rows[-1]["timesteps"] // max(1, int(_cfg_value(cfg_text, "steps_per_episode") or 1))
    train_wall = sum(r.get("wall_s", 0.0) for r in rows)
    lines = [f"# Run `{run.name}`: trained four-agent policy vs the task-wise prompt", "",
             "Produced by:", "", "```"] + args.command + ["```", "",
             f"Machine: {os.cpu_count()} CPU cores, no GPU.", "", "## Ranker check (validation users, task-wise prompt)", "",
             f"NDCG@10 ranker {_est(check['ranker_metrics']['ndcg@10'])}, random {check['random_metrics']['ndcg@10']:.4f}, "
             f"popularity {_est(check['popularity_metrics']['ndcg@10'])} on {check['n_users']} users; "
             f"ranker - random = {_est(check['ranker_minus_random'])}; clearly above random: "
             f"**{check['clearly_above_random']}**.", "",
             "## Training", "",
             f"{rows[-1]['timesteps']} environment steps in {len(rows)} rollouts (~{train_users_seen} user episodes), "
             f"{train_wall:.0f} s of rollouts. LLM usage in training: {usage['llm']['calls']} model calls + "
             f"{usage['llm']['cache_hits']} cache hits ({(usage['llm']['calls'] + usage['llm']['cache_hits']) / max(1, train_users_seen):.2f} "
             "requests per user episode, including the task-wise baseline request of each episode).", "",
             "| rollout | timesteps | mean reward | mean NDCG@10 | task-wise NDCG@10 | entropy role/history/reasoning/format |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ent = "/".join(f"{r['entropy'][p]:.3f}" for p in ("role", "history", "reasoning", "format"))
        lines.append(f"| {r['rollout']} | {r['timesteps']} | {r['mean_reward']:+.4f} | {r['mean_ndcg']:.4f} | "
                     f"{r['mean_taskwise_ndcg']:.4f} | {ent} |")
    curve = Path(args.out).with_name(f"{run.name}_learning_curve.png")
    if (run / "learning_curve.png").exists():
        shutil.copyfile(run / "learning_curve.png", curve)
        lines += ["", f"![learning curve]({curve.name})"]
    lines += ["", "## Evaluation on held-out users", ""]
    for ev in evals:
        lines += eval_section(ev)
    if args.note:
        lines += ["## Notes", ""] + [p + "\n" for p in args.note]
    lines += ["## Config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


def _cfg_value(cfg_text: str, key: str):
    for line in cfg_text.splitlines():
        if line.strip().startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return None


if __name__ == "__main__":
    main()
