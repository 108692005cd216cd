"""`rpp headroom`: rank every (user, prompt, pseudo-episode) through the ranker layer and write the diagnostic.

Users: the split's training then validation users with more than `headroom.items` history items (never test
users). Episodes: each user's last J history items as targets (``BenchContext.history_holdout``: the history before
the item, its own seeded negatives); the test target is never read. Prompts: the task-wise one plus K - 1 seeded
combinations (``prompt_combinations``, as the benchmark's per-user reference uses). Requests go through the ranker
layer (response cache, batching), user by user, so an interrupted run resumes for free and a smaller --users reuses
the cache. The statistics are rpp.benchmark.headroom's.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from rpp.benchmark import headroom as H
from rpp.benchmark.methods import BenchContext, BenchmarkError, chosen_actions, prompt_combinations
from rpp.benchmark.runner import MeteredRanker, _command_line
from rpp.config import Config
from rpp.llm.base import Ranker
from rpp.metrics import ndcg_at_k, target_rank
from rpp.prompts.actions import PATTERNS


def training_cost(cfg: Config) -> int:
    """Ranker requests a training run with this config makes before caching: the environment steps, the
    pre-training ranker check and the safe-improvement gate (rpp.config.TrainConfig.gate_users)."""
    from rpp.agents.gate import BEST_SEEN
    from rpp.prompts import load_action_set

    sizes = load_action_set(cfg.prompt.action_spaces).sizes()
    gate_users = cfg.train.gate_users if cfg.train.gate_users is not None else cfg.data.n_val_users
    # the gate at most: on training users the search (task-wise, the learner's pick and BEST_SEEN starts, each
    # agent's other actions), on validation users the chosen fixed prompt and the policy
    per_gate_user = 2 + BEST_SEEN + sum(s - 1 for s in sizes) + 1 + (cfg.eval.steps or 1)
    return int(cfg.train.total_steps + cfg.train.check_users + gate_users * per_gate_user)


def _labels(cfg: Config, dataset, samples) -> dict:
    """Observable groups per feature, from the history before each user's first held-out item."""
    from rpp.envs.features import UserFeatures
    from rpp.prompts import UserContext

    reader = UserFeatures([], dim=8)
    contexts = [UserContext.from_sample(s, dataset) for s in samples]
    out = {}
    for feature in cfg.headroom.features:
        values = [reader.value(c, feature) for c in contexts]
        if feature in ("genre", "recent_genre"):
            out[feature] = np.array([v if v is not None else "(none)" for v in values], dtype=object)
            continue
        x = np.array(values, dtype=float)
        if np.isnan(x).all():
            continue  # e.g. a dataset without ratings
        edges = np.nanquantile(x, np.linspace(0, 1, cfg.headroom.feature_buckets + 1)[1:-1])
        out[feature] = np.where(np.isnan(x), -1, np.searchsorted(edges, x, side="right"))
    return out


def run_headroom(cfg: Config, *, ranker: Optional[Ranker] = None, command: Optional[str] = None,
                 progress=None) -> Path:
    """Measure, write report.md, headroom.png and headroom.json; returns the output folder."""
    from rpp.data import load_dataset, split_users

    say = progress or (lambda msg: print(msg, flush=True))
    h = cfg.headroom
    t_start = time.perf_counter()
    out_dir = Path(h.output_dir or Path("experiments/results") / f"headroom-{cfg.name}")
    dataset = load_dataset(cfg.data)
    split = split_users(dataset, cfg.data, cfg.seed)
    pool = [u for u in list(split.train) + list(split.val) if len(u.history) > h.items]
    users = pool[:h.users]
    if len(users) < 2:
        raise BenchmarkError(f"headroom needs at least 2 training/validation users with more than {h.items} "
                             f"history items; this split has {len(pool)}")
    if len(users) < h.users:
        say(f"headroom: only {len(users)} training/validation users have more than {h.items} history items "
            f"(asked for {h.users})")

    def make() -> Ranker:
        if ranker is not None:
            return MeteredRanker(ranker)
        from rpp.llm import make_ranker

        return MeteredRanker(make_ranker(cfg))

    ctx = BenchContext(cfg=cfg, dataset=dataset, fit_users=[], train_interactions=split.train_interactions,
                       ranker_factory=make, train_users=list(split.train))
    combos = prompt_combinations(ctx.builder, h.prompts, cfg.seed)
    n_u, n_k, n_j = len(users), len(combos), h.items
    episodes = [[ctx.history_holdout(u, len(u.history) - n_j + j, tag="headroom") for j in range(n_j)]
                for u in users]
    chosen = [chosen_actions(ctx.builder, c) for c in combos]
    say(f"headroom '{cfg.name}': {n_u} users x {n_k} prompts x {n_j} episodes = {n_u * n_k * n_j} ranker requests "
        f"(ranker: {cfg.llm.backend} {cfg.llm.model if cfg.llm.backend != 'planted' else ''})".rstrip())
    samples = [e for eps in episodes for e in eps for _ in combos]  # user-major: a partial run covers whole users
    t_rank = time.perf_counter()
    rankings = ctx.rank_samples(samples, [c for _ in range(n_u * n_j) for c in chosen])
    rank_s = time.perf_counter() - t_rank
    ndcg = np.empty((n_u, n_j, n_k))
    failed = np.zeros(n_u, dtype=bool)
    for i, (s, r) in enumerate(zip(samples, rankings)):
        u, rest = divmod(i, n_j * n_k)
        j, k = divmod(rest, n_k)
        failed[u] |= bool(r.failed)
        ndcg[u, j, k] = ndcg_at_k([target_rank(r.order, s.target_index)], 10)[0]
    ndcg = ndcg.transpose(0, 2, 1)  # users x prompts x items
    keep = ~failed
    if keep.sum() < 2:
        raise BenchmarkError(f"the ranker failed on {int(failed.sum())} of {n_u} users; nothing to analyse")
    labels = _labels(cfg, dataset, [eps[0] for eps in episodes])
    labels = {k: v[keep] for k, v in labels.items()}
    res = H.analyse(ndcg[keep], labels=labels or None, n_boot=h.n_bootstrap, seed=cfg.seed)
    meter = ctx.ranker.snapshot()
    total_s = time.perf_counter() - t_start
    prompts = [{p: a.id for p, a in c.items()} for c in chosen]
    cost = {"requests": meter.requests, "paid_calls": meter.paid_calls, "cache_hits": meter.cache_hits,
            "failures": meter.failures, "tokens": meter.tokens, "rank_s": rank_s, "wall_s": total_s}
    train_requests = training_cost(cfg)
    per_request_s = rank_s / meter.paid_calls if meter.paid_calls else None
    tokens_per_request = meter.tokens / meter.requests if meter.requests else 0.0
    cost["training_estimate"] = {
        "requests": train_requests, "tokens": int(round(train_requests * tokens_per_request)),
        "wall_s": train_requests * per_request_s if per_request_s is not None else None}
    g = res["gains"]
    record = {
        "command": _command_line(command, "headroom"), "config_name": cfg.name, "ranker": ctx.ranker.identity,
        "users": [u.user for u, k in zip(users, keep) if k],
        "failed_users": [u.user for u, f in zip(users, failed) if f],
        "prompts": prompts, "items": n_j, "variance": res["variance"], "reliability": res["reliability"],
        "gains": {"taskwise_b": g.taskwise_b, "fixed_pick": g.fixed_pick, "fixed": g.fixed, "per_user": g.per_user,
                  "state": g.state, "state_vs_fixed": g.state_vs_fixed, "state_features": g.state_features,
                  "oracle": g.oracle},
        "verdict": res["verdict"], "numbers": res["numbers"], "cost": cost,
        "ndcg": np.round(ndcg[keep], 6).tolist()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "headroom.json").write_text(json.dumps(record, indent=1, default=_jsonable))
    _plot(ndcg[keep], g, out_dir / "headroom.png")
    (out_dir / "report.md").write_text(_markdown(cfg, record, int(keep.sum())))
    say(f"verdict: {res['verdict']}\n  {res['numbers']}")
    say(_cost_line(cost))
    say(f"report: {out_dir / 'report.md'}")
    return out_dir


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt_s(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "unknown (every answer came from the cache)"
    return f"{s:,.0f} s" if s < 600 else f"{s / 60:,.1f} min"


def _cost_line(cost: dict) -> str:
    t = cost["training_estimate"]
    return (f"this diagnostic: {cost['requests']:,} requests ({cost['paid_calls']:,} answered by the model, "
            f"{cost['cache_hits']:,} from the cache), {cost['tokens']:,} tokens, {_fmt_s(cost['wall_s'])} | "
            f"a training run with this config: ~{t['requests']:,} requests, ~{t['tokens']:,} tokens, "
            f"~{_fmt_s(t['wall_s'])} at this run's speed")


def _plot(ndcg: np.ndarray, g: "H.Gains", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ea, eb = H.half_effects(ndcg)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.scatter(ea.ravel(), eb.ravel(), s=6, alpha=0.4)
    lim = max(1e-6, float(np.abs(np.concatenate([ea.ravel(), eb.ravel()])).max()))
    ax1.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    r = np.corrcoef(ea.ravel(), eb.ravel())[0, 1] if ea.std() > 0 and eb.std() > 0 else float("nan")
    ax1.set_xlabel("per-user prompt effect, half A (NDCG@10)")
    ax1.set_ylabel("same effect, half B")
    ax1.set_title(f"do per-user prompt effects repeat? r = {r:.3f}")
    rows = [("best fixed (A->B)", g.fixed), ("per-user pick (A->B)", g.per_user)]
    if g.state is not None:
        rows.append(("state rule (other users)", g.state))
    rows.append(("label oracle on B\n(upper bound)", g.oracle))
    ys = np.arange(len(rows))[::-1]
    for y, (name, d) in zip(ys, rows):
        ax2.errorbar(d["value"], y, xerr=[[d["value"] - d["low"]], [d["high"] - d["value"]]], fmt="o",
                     color="tab:red" if "oracle" in name else "tab:blue", capsize=4)
    ax2.axvline(0, color="grey", lw=0.8)
    ax2.set_yticks(ys, [n for n, _ in rows])
    ax2.set_xlabel(f"NDCG@10 gain on half B vs task-wise ({g.taskwise_b:.3f}), 95% CI")
    ax2.set_title("gains")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(d: Optional[dict], sign: bool = True) -> str:
    if d is None:
        return "n/a"
    f = "{:+.4f}" if sign else "{:.4f}"
    return f"{f.format(d['value'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _markdown(cfg: Config, rec: dict, n_users: int) -> str:
    v, rel, g, c = rec["variance"], rec["reliability"], rec["gains"], rec["cost"]
    t = c["training_estimate"]
    prompts = "\n".join(f"{i}. " + ", ".join(f"{p}={a[p]}" for p in PATTERNS) + (" (task-wise)" if i == 0 else "")
                        for i, a in enumerate(rec["prompts"]))
    lines = [
        f"# Per-user headroom: {cfg.name}",
        "",
        f"**Verdict: {rec['verdict']}**",
        "",
        rec["numbers"] + ".",
        "",
        f"Command: `{rec['command']}`",
        "",
        f"Ranker: `{rec['ranker']}`. {n_users} training/validation users (never test users), "
        f"{len(rec['prompts'])} prompts, the last {rec['items']} history items of each user as pseudo-episodes "
        f"(history before the item, {cfg.data.n_candidates} candidates with seeded {cfg.data.negatives} negatives); "
        f"half A = items 1, 3, ..., half B = items 2, 4, ... (oldest first). "
        f"{len(rec['failed_users'])} users dropped for failed rankings. 95% CIs: bootstrap over users "
        f"({cfg.headroom.n_bootstrap} draws).",
        "",
        "Prompts:",
        "",
        prompts,
        "",
        "## Variance of NDCG@10",
        "",
        "| part | variance | share |",
        "|---|---|---|",
        *[f"| {name} | {v[key]:.5f} | {100 * v['shares'][key]:.1f}% |" for name, key in
          (("user", "user"), ("prompt", "prompt"), ("user x prompt (cell means)", "interaction"),
           ("within cell (items)", "within"))],
        f"| user x prompt, less the item noise it holds | {v['interaction_corrected']:.5f} | |",
        "",
        "## Split-half reliability (half A vs half B)",
        "",
        "| effects | r | Spearman-Brown |",
        "|---|---|---|",
        f"| per-user prompt effects (user x prompt) | {_ci(rel['user_prompt']['r'])} | "
        f"{_ci(rel['user_prompt']['spearman_brown'])} |",
        f"| prompt main effects | {_ci(rel['prompt']['r'])} | {_ci(rel['prompt']['spearman_brown'])} |",
        "",
        "## Gains on half B over the task-wise prompt",
        "",
        f"Task-wise prompt on half B: NDCG@10 {g['taskwise_b']:.4f}.",
        "",
        "| selection | gain | note |",
        "|---|---|---|",
        f"| best fixed prompt, picked on half A | {_ci(g['fixed'])} | prompt {g['fixed_pick']} |",
        f"| each user's best prompt, picked on half A | {_ci(g['per_user'])} | |",
    ]
    if g["state"] is not None:
        lines += [f"| state rule: best prompt per feature group, learned on other users | {_ci(g['state'])} | "
                  f"feature {' / '.join(g['state_features'])} (one per user fold) |",
                  f"| state rule minus best fixed prompt | {_ci(g['state_vs_fixed'])} | what a policy adds |"]
    lines += [
        f"| label oracle on half B (UPPER BOUND, reads B's labels) | {_ci(g['oracle'])} | selection on noise "
        f"included |",
        "",
        "![headroom](headroom.png)",
        "",
        "## Cost",
        "",
        f"This diagnostic: {c['requests']:,} ranker requests ({c['paid_calls']:,} answered by the model, "
        f"{c['cache_hits']:,} by the cache, {c['failures']} failed), {c['tokens']:,} tokens, wall time "
        f"{_fmt_s(c['wall_s'])} (ranking {_fmt_s(c['rank_s'])}).",
        f"A training run with this config (`rpp train`: {cfg.train.total_steps} environment steps, the ranker check, "
        f"the gate): about {t['requests']:,} requests, {t['tokens']:,} tokens, {_fmt_s(t['wall_s'])} at this run's "
        f"speed per model-answered request (before caching; the policy's own compute not included).",
        "",
        "How to read this: docs/headroom.md.",
        "",
    ]
    return "\n".join(lines)
