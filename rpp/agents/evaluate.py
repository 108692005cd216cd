"""Evaluate a trained run against the task-wise prompt on the same users, and check a ranker before training.

Evaluation protocol (no label peeking): for each user the policy acts greedily for T steps; each step's observation
is the state embedding and the candidates in the order of the LLM's last ranking, never the target. The reported
ranking is the LAST step's, whatever its NDCG (picking the best step would need the label). T = 1 is the one-shot
mode: one LLM call per user, the cost of the task-wise prompt. Users are processed in batches through the StepCore
(one batched ranker call per step).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from rpp.agents.checkpoints import (
    atomic_write_text, jsonable, latest_checkpoint, load_run_config, read_jsonl, write_json,
)
from rpp.agents.gate import served_phrase
from rpp.agents.policy import PATTERNS
from rpp.config import Config
from rpp.llm.failures import FailureBudgetExceeded, phase as failure_phase
from rpp.metrics import CLEARLY_ABOVE_RANDOM, METRIC_NAMES, Estimate, PairedTest, all_metrics, check_above_random, \
    paired_test, summarize, target_rank


# ------------------------------------------------------------------------------------------------ policy rollouts

def run_policy(policy, core, samples: Sequence, steps: int, batch_size: int) -> list[dict]:
    """Greedy T-step episodes for `samples`, `batch_size` users per batched step. One record per user with the
    LAST step's actions, prompt and ranking. `policy` is an SB3 policy (``predict(obs, deterministic=True)``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    records = []
    bar = tqdm(total=len(samples), unit="user", desc=f"policy, {steps} step(s)", leave=False)
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start:start + batch_size])
        bar.update(len(batch))
        states, obs = core.reset(batch)
        infos: list[dict] = []
        for _ in range(steps):
            actions, _ = policy.predict(obs, deterministic=True)
            obs, _, infos = core.step(states, actions)
        for sample, info in zip(batch, infos):
            chosen = {p: core.action_set.action(p, i) for p, i in zip(PATTERNS, info["action_indices"])}
            records.append({
                "user": sample.user,
                "actions": dict(info["actions"]),
                "action_indices": list(info["action_indices"]),
                "texts": {p: info["refined"].get(p, chosen[p].text) for p in PATTERNS},
                "prompt": info["prompt"],
                "ranking": [sample.candidates[i] for i in info["ranking"]],
                "ranking_indices": list(info["ranking"]),
                "target_rank": int(info["target_rank"]),
                "metrics": dict(info["metrics"]),
                "ranker_failed": bool(info.get("ranker_failed", False)),
            })
    bar.close()
    return records


def taskwise_ranks(core, samples: Sequence, batch_size: int, failed: Optional[list] = None) -> list[int]:
    """Target ranks under the task-wise default prompt (the same request the env's baseline makes, so a cached
    answer is reused). `failed`, when given, gets one flag per sample: did its request fail."""
    ranks = []
    bar = tqdm(total=len(samples), unit="req", desc="task-wise prompt", leave=False)
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start:start + batch_size])
        for s, ranking in zip(batch, core.ranker.rank([core.taskwise_request(s) for s in batch])):
            ranks.append(target_rank(ranking.order, s.target_index))
            if failed is not None:
                failed.append(bool(ranking.failed))
        bar.update(len(batch))
    bar.close()
    return ranks


# ------------------------------------------------------------------------------------------------ evaluate

@dataclass
class EvalResult:
    run: str
    split: str
    steps: int
    n_users: int
    policy: dict[str, Estimate]
    taskwise: dict[str, Estimate]
    paired: dict[str, PairedTest]
    """policy vs task-wise on the same users, per metric (mean difference, relative change, Wilcoxon p)."""
    llm_requests_per_user: float
    """Ranker requests the policy made per user (= steps; the task-wise prompt costs 1)."""
    model_calls_per_user: float
    """Of those, answered by the model rather than the response cache."""
    wall_s: float
    policy_wall_s: float
    usage: dict
    action_counts: dict[str, dict[str, int]]
    ranker_failures: int
    ranker_check: Optional[dict] = None
    checkpoint: str = ""
    served: str = "policy"
    """What the run serves: "policy" or "fixed" (the safe-improvement gate's decision, rpp.agents.gate)."""
    served_reason: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "run": self.run, "split": self.split, "steps": self.steps, "n_users": self.n_users,
            "checkpoint": self.checkpoint, "served": self.served, "served_reason": self.served_reason,
            "policy": {m: e.__dict__ for m, e in self.policy.items()},
            "taskwise": {m: e.__dict__ for m, e in self.taskwise.items()},
            "paired_vs_taskwise": {m: t.__dict__ for m, t in self.paired.items()},
            "llm_requests_per_user": self.llm_requests_per_user,
            "model_calls_per_user": self.model_calls_per_user,
            "wall_s": self.wall_s, "policy_wall_s": self.policy_wall_s, "usage": self.usage,
            "action_counts": self.action_counts, "ranker_failures": self.ranker_failures,
            "ranker_check": self.ranker_check, **self.extra,
        }

    def table(self) -> str:
        mode = "one-shot" if self.steps == 1 else f"{self.steps} greedy steps, last step's ranking"
        lines = [
            f"run {self.run} | split {self.split} | {self.n_users} users | {mode}",
            f"served: {served_phrase(self.served)} ({self.served_reason})",
            f"{'metric':8s}  {'served':27s}  {'task-wise prompt':27s}  {'diff':>8s}  {'p':>7s}",
        ]
        for m in METRIC_NAMES:
            t = self.paired[m]
            lines.append(f"{m:8s}  {str(self.policy[m]):27s}  {str(self.taskwise[m]):27s}  {t.mean_diff:+8.4f}  "
                         f"{t.p_value:7.4f}")
        lines.append(f"LLM requests per user: {self.llm_requests_per_user:.2f} (task-wise prompt: 1); answered by "
                     f"the model: {self.model_calls_per_user:.2f}; ranker failures: {self.ranker_failures}; "
                     f"wall time {self.wall_s:.1f} s")
        for p in PATTERNS:
            counts = self.action_counts[p]
            lines.append(f"  {p:9s} " + ", ".join(f"{aid} {n}" for aid, n in counts.items() if n))
        if "refiner" in self.extra:
            st = self.extra["refiner"]
            lines.append(f"RPP+ refiner: {st.get('accepted', 0)} rewrites accepted "
                         f"({st.get('accepted_unchanged', 0)} of them unchanged), rejected by reason "
                         f"{st.get('rejected_by_reason', {})}, {st.get('requests', 0)} generation requests, "
                         f"{st.get('cache_hits', 0)} from the cache")
        if self.ranker_check:
            lines.append(ranker_check_line(self.ranker_check))
        return "\n".join(lines)


def evaluate(run_dir: str | Path, split: Optional[str] = None, steps: Optional[int] = None,
             n_users: Optional[int] = None, cfg_overrides: Optional[list[str]] = None, ranker=None) -> EvalResult:
    """Evaluate the run's latest checkpoint greedily on `split` (default cfg.eval.split) for `steps` steps per user
    (default cfg.eval.steps; 1 = one-shot) on the first `n_users` users (default cfg.eval.n_users, else all), next to
    the task-wise prompt on the same users. Writes eval-<split>-T<steps>.json and prompts.jsonl in the run dir.
    cfg_overrides: ``section.key=value`` strings applied to the run's config (e.g. llm.cache=false); ranker: an
    already-built rpp Ranker to use instead of make_ranker(cfg) (the caller keeps ownership)."""
    from rpp.agents.gate import GatedPolicy, read_gate
    from rpp.agents.serving import load_algorithm
    from rpp.envs import StateEncoder, make_core
    from rpp.llm import make_ranker

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, cfg_overrides)
    split = split or cfg.eval.split
    steps = int(steps or cfg.eval.steps)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate (train first)")
    model = load_algorithm(cfg, checkpoint)
    gate = read_gate(run_dir)
    served = GatedPolicy(model.policy, gate)
    # the reward is not used here; "none" avoids a second task-wise call per user (we make our own, below)
    cfg.env.reward_baseline = "none"
    t0 = time.perf_counter()
    own_ranker = ranker is None
    if own_ranker:
        ranker = make_ranker(cfg)
    try:
        core = make_core(cfg, split, ranker=ranker, encoder=StateEncoder(cfg.encoder))
        if list(model.action_space.nvec) != list(core.nvec):
            raise ValueError(f"{run_dir}: the policy was trained on action sizes {list(model.action_space.nvec)}, "
                             f"the configured action set has {list(core.nvec)}")
        limit = n_users if n_users is not None else cfg.eval.n_users
        samples = core.samples[:limit] if limit else core.samples
        batch = max(cfg.env.n_envs, cfg.llm.batch_size)

        before = ranker.usage.snapshot()
        t_policy = time.perf_counter()
        with failure_phase(ranker, "evaluation", cfg.llm.max_failure_rate) as eval_failures:
            records = run_policy(served, core, samples, steps, batch)
            policy_wall = time.perf_counter() - t_policy
            after = ranker.usage.snapshot()
            base_ranks = taskwise_ranks(core, samples, batch)
        print(f"evaluation: {eval_failures.summary()}", file=sys.stderr)
        end = ranker.usage.snapshot().to_dict()
        usage = {k: end[k] - v for k, v in before.to_dict().items()}
    finally:
        if own_ranker:
            ranker.close()
    wall = time.perf_counter() - t0

    ranks = [r["target_rank"] for r in records]
    n_boot = cfg.eval.n_bootstrap
    policy_metrics = all_metrics(ranks)
    base_metrics = all_metrics(base_ranks)
    result = EvalResult(
        run=cfg.name, split=split, steps=steps, n_users=len(records),
        policy=summarize(ranks, n_boot=n_boot, seed=cfg.seed),
        taskwise=summarize(base_ranks, n_boot=n_boot, seed=cfg.seed),
        paired={m: paired_test(policy_metrics[m], base_metrics[m]) for m in METRIC_NAMES},
        llm_requests_per_user=((after.calls + after.cache_hits) - (before.calls + before.cache_hits)) / len(records),
        model_calls_per_user=(after.calls - before.calls) / len(records),
        wall_s=wall, policy_wall_s=policy_wall, usage=usage,
        action_counts={p: {a.id: sum(r["actions"][p] == a.id for r in records) for a in core.action_set.actions[p]}
                       for p in PATTERNS},
        ranker_failures=sum(r["ranker_failed"] for r in records),
        ranker_check=_read_json(run_dir / "ranker_check.json"),
        checkpoint=checkpoint.name,
        served=served.served,
        served_reason=gate["reason"] if gate else "the run has no gate record (trained without validation users)",
    )
    if core.refiner is not None:  # RPP+: how many rewrites were used, and why the others were not
        result.extra["refiner"] = core.refiner.stats()
    write_json(run_dir / f"eval-{split}-T{steps}.json", result.to_dict())
    _write_prompts(run_dir / "prompts.jsonl", records, base_ranks, split, steps)
    return result


def _write_prompts(path: Path, records: list[dict], base_ranks: list[int], split: str, steps: int) -> None:
    """prompts.jsonl holds the latest evaluation of every (split, steps): this one's records replace their own."""
    kept = [r for r in read_jsonl(path) if (r.get("split"), r.get("steps")) != (split, steps)]
    rows = kept + [{"split": split, "steps": steps, **rec,
                    "taskwise_target_rank": rank,
                    "taskwise_metrics": {k: float(v[0]) for k, v in all_metrics([rank]).items()}}
                   for rec, rank in zip(records, base_ranks)]
    atomic_write_text(path, "".join(json.dumps(r, default=jsonable) + "\n" for r in rows))


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ ranker check

def random_expectation(n_candidates: int) -> dict[str, float]:
    """Expected value of every metric when the target's rank is uniform over n_candidates slots."""
    return {m: float(v.mean()) for m, v in all_metrics(np.arange(n_candidates)).items()}


def check_ranker(cfg: Config, core_or_ranker=None, run_dir: str | Path | None = None,
                 n_users: Optional[int] = None, quiet: bool = False) -> dict:
    """Is the configured ranker clearly better than chance on validation users, with the task-wise prompt?

    Compares its NDCG@10 (and the other metrics) on the first cfg.train.check_users validation users with a random
    order (exact expectation) and with popularity on the same candidates. Prints a table; warns loudly on stderr
    when the ranker is not clearly above random (CI of the difference includes 0, or the gain is under +0.02);
    writes ranker_check.json into run_dir when given. core_or_ranker: a StepCore over the val split, a Ranker, or
    None (the configured ranker is loaded)."""
    from rpp.benchmark.classic import PopularityScorer
    from rpp.data import split_users
    from rpp.envs import StepCore, make_core
    from rpp.llm.base import Ranker

    if isinstance(core_or_ranker, StepCore):
        core = core_or_ranker
    elif core_or_ranker is None or isinstance(core_or_ranker, Ranker):
        core = make_core(cfg, "val", ranker=core_or_ranker)
    else:
        raise TypeError(f"check_ranker: expected a StepCore, a Ranker or None, got {type(core_or_ranker).__name__}")
    n = int(n_users if n_users is not None else cfg.train.check_users)
    samples = core.samples[:n]
    if not samples:
        raise ValueError("check_ranker: no validation users (data.n_val_users or train.check_users is 0)")
    t0 = time.perf_counter()
    before = core.ranker.usage.snapshot()
    failed: list = []
    # over the failure budget this stops here (FailureBudgetExceeded), before anything trains on failures
    with failure_phase(core.ranker, "ranker check", cfg.llm.max_failure_rate) as counted:
        ranks = taskwise_ranks(core, samples, max(cfg.env.n_envs, cfg.llm.batch_size), failed)
    after = core.ranker.usage.snapshot()
    failures_line = counted.summary()
    if not quiet:
        print(f"ranker check: {failures_line}", file=sys.stderr)
    # a failed request is the presented order, not the model's answer: judge the model on answered requests only
    samples = [s for s, f in zip(samples, failed) if not f]
    ranks = [r for r, f in zip(ranks, failed) if not f]
    if not samples:
        raise FailureBudgetExceeded(f"ranker check: {failures_line}; no answered request to check", counted)
    split = split_users(core.dataset, cfg.data, cfg.seed)
    pop_ranks = [target_rank(order, s.target_index)
                 for order, s in zip(PopularityScorer(split.train_interactions).rank(samples), samples)]

    k = cfg.env.reward_k
    ndcg_name = f"ndcg@{k}" if f"ndcg@{k}" in METRIC_NAMES else "ndcg@10"
    ranker_values = all_metrics(ranks)
    random_per_user = {m: np.array([random_expectation(len(s.candidates))[m] for s in samples])
                       for m in METRIC_NAMES}
    check = check_above_random(ranks, [len(s.candidates) for s in samples], k=int(ndcg_name.split("@")[1]),
                               n_boot=cfg.eval.n_bootstrap, seed=cfg.seed)
    diff, clearly = check.gain, check.passes
    pop_values = all_metrics(pop_ranks)
    report = {
        "split": "val", "n_users": len(samples),
        "ranker": {"backend": cfg.llm.backend, "model": cfg.llm.model, "mode": cfg.llm.mode,
                   "show_candidates": cfg.prompt.show_candidates},
        "metric": ndcg_name,
        "ranker_metrics": {m: e.__dict__ for m, e in summarize(ranks, seed=cfg.seed).items()},
        "random_metrics": {m: float(v.mean()) for m, v in random_per_user.items()},
        "popularity_metrics": {m: e.__dict__ for m, e in summarize(pop_ranks, seed=cfg.seed).items()},
        "ranker_minus_random": diff.__dict__,
        "ranker_vs_popularity": paired_test(ranker_values[ndcg_name], pop_values[ndcg_name]).__dict__,
        "clearly_above_random": clearly,
        "threshold": CLEARLY_ABOVE_RANDOM,
        "ranker_failures": after.failures - before.failures,
        "failures": counted.to_dict(),
        "failures_line": failures_line,
        "wall_s": time.perf_counter() - t0,
    }
    if not quiet:
        print(ranker_check_table(report))
    if not clearly:
        bar = "!" * 78
        print(f"\n{bar}\n!! WARNING: the ranker is NOT clearly better than a random order on validation users.\n"
              f"!! {ndcg_name}: ranker - random = {diff} (needs a CI above 0 and >= +{CLEARLY_ABOVE_RANDOM}).\n"
              "!! Rewards from this ranker are mostly noise; training agents on it will not mean much.\n"
              "!! Check llm.mode / prompt.show_candidates / the model (see experiments/results/ranker.md).\n"
              f"{bar}\n", file=sys.stderr)
    if run_dir is not None:
        write_json(Path(run_dir) / "ranker_check.json", report)
    return report


def ranker_check_table(report: dict) -> str:
    m = report["metric"]
    lines = ([report["failures_line"]] if report.get("failures_line") else []) + [
             f"ranker check: task-wise prompt on {report['n_users']} answered validation users "
             f"({report['ranker']['model']}, {report['ranker']['mode']} mode)",
             f"{'':12s} {m:>8s}  {'95% CI':>18s}"]
    r, p = report["ranker_metrics"][m], report["popularity_metrics"][m]
    lines.append(f"{'ranker':12s} {r['mean']:8.4f}  [{r['low']:.4f}, {r['high']:.4f}]")
    lines.append(f"{'random':12s} {report['random_metrics'][m]:8.4f}  (expected value)")
    lines.append(f"{'popularity':12s} {p['mean']:8.4f}  [{p['low']:.4f}, {p['high']:.4f}]")
    d = report["ranker_minus_random"]
    lines.append(f"ranker - random: {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] -> "
                 + ("clearly above random" if report["clearly_above_random"] else "NOT clearly above random"))
    return "\n".join(lines)


def ranker_check_line(report: dict) -> str:
    m = report["metric"]
    d = report["ranker_minus_random"]
    return (f"ranker check ({report['n_users']} val users, task-wise prompt): {m} "
            f"{report['ranker_metrics'][m]['mean']:.4f} vs random {report['random_metrics'][m]:.4f} "
            f"({d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]) vs popularity "
            f"{report['popularity_metrics'][m]['mean']:.4f}"
            + ("" if report["clearly_above_random"] else "  << NOT clearly above random"))
