"""Statistics and the written report of a benchmark: results.csv, per_user.csv, report.md and two figures.

Every number here is computed from per-user target ranks of methods that ranked the SAME users' SAME candidate
lists, so differences between methods are paired: the Wilcoxon signed-rank test on per-user NDCG@10 against the
reference (the best task-wise prompt, chosen on validation users) is the test that matters, and the bootstrap CIs
are per method. All randomness (bootstrap resamples) is seeded by the config seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from rpp.metrics import METRIC_NAMES, all_metrics, paired_test, summarize

RUN_DEPENDENT_COLUMNS = ("fit_s", "rank_s", "infer_s_per_user", "train_paid_calls", "infer_paid_calls",
                         "train_cache_hits", "infer_cache_hits", "cost_train_s")
"""results.csv columns that legitimately differ between two runs of one config (wall time; what the response
cache answered). Every other column, and all of per_user.csv, must be identical across runs with one seed."""


COST_KEYS = ("train_requests", "train_tokens", "train_generations", "train_users", "infer_requests",
             "infer_tokens", "infer_generations", "forward_passes", "backward_passes", "infer_forward_passes",
             "infer_backward_passes", "train_s")
"""What a method may report through Method.cost(), all totals over the run: ranking requests it scored itself
(outside the metered ranker; added to train_requests / infer_requests_per_user, their tokens to train_tokens /
infer_tokens_per_user), text generations (model and cache answers alike), the users it trained on, model
forward/backward passes it ran itself (all, and those spent while ranking test users), and its own training time.
results.csv holds each as a cost_<key> column."""


@dataclass
class Meter:
    """LLM usage over a span of the benchmark. `requests` counts every ranking request, answered by the model or
    by the cache (what the method costs without a warm cache); `paid_calls` only those the model answered now."""

    requests: int = 0
    paid_calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __sub__(self, other: "Meter") -> "Meter":
        return Meter(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class MethodResult:
    """One method's outcome on the test users (ranks aligned with the benchmark's test-user list)."""

    name: str
    family: str
    notes: str
    ranks: np.ndarray
    failed: np.ndarray
    """Per user: the ranker failed for this user's (last) request, so its ranking is the presented order."""
    fit_usage: Meter
    infer_usage: Meter
    fit_s: float
    rank_s: float
    val_ndcg10: Optional[float] = None
    training_usage: Optional[dict] = None
    """A trained policy's own training-run usage (calls, tokens), read from its run directory."""
    refiner: Optional[dict] = None
    """RPP+ rows: the refiner's counts on the test users (rpp.prompts.refiner.Refiner.stats)."""
    cost: Optional[dict] = None
    """What the method spent outside the metered ranker (Method.cost(); keys in COST_KEYS), or None."""
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = all_metrics(self.ranks)


def results_table(results: Sequence[MethodResult], reference: Optional[str], n_boot: int, seed: int,
                  n_fit_users: int) -> pd.DataFrame:
    """One row per method: every metric with its 95% percentile-bootstrap CI, the paired test against the
    reference on NDCG@10, and usage (training = everything before test ranking, inference = test ranking)."""
    ref = next((r for r in results if r.name == reference), None)
    rows = []
    for r in results:
        n = len(r.ranks)
        row = {"method": r.name, "family": r.family, "n_users": n}
        for name, est in summarize(r.ranks, n_boot=n_boot, seed=seed).items():
            row[name] = est.mean
            row[f"{name}_low"] = est.low
            row[f"{name}_high"] = est.high
        if ref is not None:
            t = paired_test(r.metrics["ndcg@10"], ref.metrics["ndcg@10"])
            row.update({"ndcg@10_diff_vs_ref": t.mean_diff, "ndcg@10_rel_vs_ref": t.relative_change,
                        "p_vs_ref": t.p_value})
        else:
            row.update({"ndcg@10_diff_vs_ref": math.nan, "ndcg@10_rel_vs_ref": math.nan, "p_vs_ref": math.nan})
        row["val_ndcg@10"] = r.val_ndcg10 if r.val_ndcg10 is not None else math.nan
        tu = r.training_usage or {}
        own = r.cost or {}
        row.update({
            "train_requests": r.fit_usage.requests + int(tu.get("requests", 0)) + int(own.get("train_requests", 0)),
            "train_tokens": r.fit_usage.tokens + int(tu.get("tokens", 0)) + int(own.get("train_tokens", 0)),
            "train_users": n_fit_users if r.fit_usage.requests else int(tu.get("users", 0)),
            "infer_requests_per_user": (r.infer_usage.requests + int(own.get("infer_requests", 0))) / n
            if n else math.nan,
            "infer_tokens_per_user": (r.infer_usage.tokens + int(own.get("infer_tokens", 0))) / n if n else math.nan,
            "failed_users": int(r.failed.sum()),
            "train_paid_calls": r.fit_usage.paid_calls, "train_cache_hits": r.fit_usage.cache_hits,
            "infer_paid_calls": r.infer_usage.paid_calls, "infer_cache_hits": r.infer_usage.cache_hits,
            "fit_s": r.fit_s, "rank_s": r.rank_s, "infer_s_per_user": r.rank_s / n if n else math.nan,
        })
        row.update({f"cost_{k}": own[k] if k in own else math.nan for k in COST_KEYS})
        st = r.refiner or {}
        row.update({
            "refine_requests_per_user": refine_requests_per_user(r) if st and n else math.nan,
            "refine_acceptance_rate": st["acceptance_rate"] if st and st.get("acceptance_rate") is not None
            else math.nan,
        })
        rows.append(row)
    return pd.DataFrame(rows)


def per_user_table(users: Sequence, results: Sequence[MethodResult]) -> pd.DataFrame:
    """One row per (method, test user): target slot, target rank (both 0-based), every metric, failure flag."""
    frames = []
    for r in results:
        df = pd.DataFrame({
            "user": [u.user for u in users],
            "method": r.name,
            "target_slot": [u.target_index for u in users],
            "rank": r.ranks,
            **{name: r.metrics[name] for name in METRIC_NAMES},
            "failed": r.failed.astype(bool),
        })
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------- figures


def plot_ndcg(table: pd.DataFrame, reference: Optional[str], path: Path) -> None:
    """Horizontal bars of mean NDCG@10 with 95% CIs, one per method; the reference bar is highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"taskwise": "#4C72B0", "optimizer": "#55A868", "policy": "#C44E52", "classic": "#8172B2",
              "floor": "#937860", "reference": "#DD8452", "upper_bound": "#CCCCCC", "other": "#777777"}
    t = table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(t) + 1.4))
    y = np.arange(len(t))
    err = np.vstack([t["ndcg@10"] - t["ndcg@10_low"], t["ndcg@10_high"] - t["ndcg@10"]])
    ax.barh(y, t["ndcg@10"], xerr=err, capsize=3,
            color=[colors.get(f, "#777777") for f in t["family"]],
            edgecolor=["black" if m == reference else "none" for m in t["method"]], linewidth=1.5)
    ax.set_yticks(y, t["method"])
    ax.set_xlabel(f"NDCG@10 (mean, 95% bootstrap CI; n = {int(t['n_users'].iloc[0])} test users)")
    for yi, v in zip(y, t["ndcg@10"]):
        ax.text(v + 0.005, yi + 0.18, f"{v:.3f}", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for f, c in colors.items() if f in set(t["family"])]
    ax.legend(handles, [f for f in colors if f in set(t["family"])], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.set_title("NDCG@10 per method" + (f" (outlined: reference '{reference}')" if reference else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slot_bins(n_candidates: int, n_bins: int = 5) -> list[tuple[int, int]]:
    """Contiguous 0-based slot ranges [lo, hi) covering 0..n_candidates-1 in about n_bins groups: with a few
    hundred users one slot holds ~15 of them, too few for a readable curve, so slots are grouped."""
    width = max(1, math.ceil(n_candidates / n_bins))
    return [(lo, min(lo + width, n_candidates)) for lo in range(0, n_candidates, width)]


def position_bias_table(per_user: pd.DataFrame, n_candidates: int) -> pd.DataFrame:
    """Mean NDCG@10 per method per group of target slots (rows: methods, columns: slot ranges, 1-based labels)."""
    bins = slot_bins(n_candidates)
    labels = [f"{lo + 1}-{hi}" if hi - lo > 1 else f"{lo + 1}" for lo, hi in bins]
    out = {}
    for method, g in per_user.groupby("method", sort=False):
        vals = []
        for lo, hi in bins:
            sel = g[(g["target_slot"] >= lo) & (g["target_slot"] < hi)]
            vals.append(sel["ndcg@10"].mean() if len(sel) else math.nan)
        out[method] = vals
    return pd.DataFrame.from_dict(out, orient="index", columns=labels)


def plot_position_bias(per_user: pd.DataFrame, n_candidates: int, path: Path) -> pd.DataFrame:
    """NDCG@10 by the target's slot in the presented candidate list, one line per method. A flat line means no
    position bias; the classic methods and random ranking should be flat up to noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = position_bias_table(per_user, n_candidates)
    counts = [int(((per_user["target_slot"] >= lo) & (per_user["target_slot"] < hi)).sum()
                  / max(1, per_user["method"].nunique())) for lo, hi in slot_bins(n_candidates)]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = np.arange(table.shape[1])
    for method, row in table.iterrows():
        ax.plot(x, row.to_numpy(), marker="o", label=method)
    ax.set_xticks(x, [f"{c}\n(n={n})" for c, n in zip(table.columns, counts)])
    ax.set_xlabel("slot of the target in the presented candidate list (1 = first)")
    ax.set_ylabel("NDCG@10")
    ax.set_ylim(bottom=0)
    ax.set_title("Position bias: NDCG@10 by target slot", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return table


# ---------------------------------------------------------------------------------------------- report.md


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _pval(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def markdown_table(table: pd.DataFrame, reference: Optional[str]) -> str:
    head = ("| method | NDCG@1 | NDCG@5 | NDCG@10 [95% CI] | HR@1 | HR@5 | HR@10 | MRR | "
            "rel. vs ref | p (Wilcoxon) | val NDCG@10 | train req. | infer req./user | infer tok./user | "
            "failed | wall s |")
    sep = "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"
    lines = [head, sep]
    for _, r in table.iterrows():
        name = f"**{r['method']}** (ref)" if r["method"] == reference else r["method"]
        rel = "-" if r["method"] == reference or math.isnan(r["ndcg@10_rel_vs_ref"]) \
            else f"{100 * r['ndcg@10_rel_vs_ref']:+.1f}%"
        p = "-" if r["method"] == reference else _pval(r["p_vs_ref"])
        lines.append(
            f"| {name} | {_fmt(r['ndcg@1'])} | {_fmt(r['ndcg@5'])} | "
            f"{_fmt(r['ndcg@10'])} [{_fmt(r['ndcg@10_low'], 3)}, {_fmt(r['ndcg@10_high'], 3)}] | "
            f"{_fmt(r['hr@1'])} | {_fmt(r['hr@5'])} | {_fmt(r['hr@10'])} | {_fmt(r['mrr'])} | {rel} | {p} | "
            f"{_fmt(r['val_ndcg@10'])} | {int(r['train_requests'])} | {_fmt(r['infer_requests_per_user'], 2)} | "
            f"{_fmt(r['infer_tokens_per_user'], 0)} | {int(r['failed_users'])} | "
            f"{r['fit_s'] + r['rank_s']:.1f} |")
    return "\n".join(lines)


def df_markdown(df: pd.DataFrame, digits: int = 3, index_name: str = "") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join([index_name] + [str(c) for c in cols]) + " |",
             "|" + "|".join(["---"] * (len(cols) + 1)) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v, digits) if isinstance(v, (float, np.floating))
                                                     else str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def refine_requests_per_user(r: MethodResult) -> float:
    """An RPP+ row's generation requests per test user, model answers and cache answers alike (the cost on a
    cold cache, like the ranking request counts)."""
    return (r.refiner["requests"] + r.refiner["cache_hits"]) / len(r.ranks)


def refiner_markdown(results: Sequence[MethodResult]) -> list[str]:
    """The RPP+ section: per refining row, how many rewrites were asked for, accepted and rejected (by reason),
    and what they cost; empty when no row refined."""
    rows = [r for r in results if r.refiner]
    if not rows:
        return []
    reasons = sorted({k for r in rows for k in r.refiner["rejected_by_reason"]})
    lines = ["## RPP+ refiner", "",
             "Per RPP+ row, on the test users: `sentences` = chosen non-empty sentences the refiner was asked to "
             "rewrite; `accepted` = rewrites that passed every guard and replaced the sentence (`unchanged`: equal "
             "to the original up to case and punctuation); the other columns count rejections by reason (the "
             "original sentence was used). `gen. req./user` = generation requests per user, cache answers "
             "included (the cost on a cold cache); `s/gen.` = generator wall time per request the model answered.",
             "",
             "| method | sentences | accepted (unchanged) | acceptance | " + " | ".join(reasons)
             + " | gen. req./user | s/gen. |",
             "|" + "|".join(["---"] * (6 + len(reasons))) + "|"]
    for r in rows:
        st = r.refiner
        rate = st.get("acceptance_rate")
        spr = st.get("s_per_request")
        lines.append(
            f"| {r.name} | {st['sentences']} | {st['accepted']} ({st['accepted_unchanged']}) | "
            + (f"{100 * rate:.1f}%" if rate is not None else "-") + " | "
            + " | ".join(str(st["rejected_by_reason"].get(k, 0)) for k in reasons)
            + f" | {refine_requests_per_user(r):.2f} | " + (f"{spr:.2f}" if spr else "-") + " |")
    by_name = {r.name: r for r in results}
    pairs = [(by_name[r.name.replace("rpp+[", "rpp[", 1)], r) for r in rows
             if r.name.startswith("rpp+[") and r.name.replace("rpp+[", "rpp[", 1) in by_name]
    if pairs:
        lines += ["", "RPP vs RPP+ on the same users (the same agents; the RPP+ row has the refiner on):", "",
                  "| RPP row | RPP+ row | NDCG@10 RPP | NDCG@10 RPP+ | diff | p (Wilcoxon) | sentences rewritten "
                  "(accepted and different from the original) |", "|---|---|---|---|---|---|---|"]
        for plain, plus in pairs:
            t = paired_test(plus.metrics["ndcg@10"], plain.metrics["ndcg@10"])
            changed = plus.refiner["accepted"] - plus.refiner["accepted_unchanged"]
            lines.append(f"| {plain.name} | {plus.name} | {plain.metrics['ndcg@10'].mean():.4f} | "
                         f"{plus.metrics['ndcg@10'].mean():.4f} | {t.mean_diff:+.4f} | {_pval(t.p_value)} | "
                         f"{changed} of {plus.refiner['sentences']} |")
    return lines + [""]


def cost_markdown(results: Sequence[MethodResult]) -> list[str]:
    """The cost section of the rows that report their own cost (PAP-REC, AGP): LLM calls for training and per
    test user, forward/backward passes, wall time; empty when no row does."""
    rows = [r for r in results if r.cost]
    if not rows:
        return []
    lines = ["## Cost of the seed methods", "",
             "Per row: `train calls` = ranking requests + text generations spent before ranking test users "
             "(through the shared ranker and the method's own scorer; cache answers included), on `train users`; "
             "`infer calls/user` = ranking requests + generations per test user (PAP-REC's personal row searches "
             "each test user's token here); `fwd`/`bwd` = model forward/backward passes the method ran itself "
             "(PAP-REC; in brackets: per test user, while ranking test users); `fit s` = the method's training time (rows that share one "
             "training, like the two PAP-REC rows, both show it), `rank s` = time ranking the test users, in this run "
             "(generations and ranking requests answered by a cache cost almost nothing).", "",
             "| method | train calls (rank + gen.) | train users | infer calls/user (rank + gen.) | fwd (infer) | "
             "bwd (infer) | fit s | rank s | rank s/user |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, n = r.cost, len(r.ranks)
        train_rank = r.fit_usage.requests + int(c.get("train_requests", 0))
        train_gen = int(c.get("train_generations", 0))
        infer_rank = (r.infer_usage.requests + int(c.get("infer_requests", 0))) / n if n else math.nan
        infer_gen = int(c.get("infer_generations", 0)) / n if n else math.nan
        fwd = f"{int(c['forward_passes'])} ({c.get('infer_forward_passes', 0) / n:.1f}/user)" \
            if "forward_passes" in c and n else "-"
        bwd = f"{int(c['backward_passes'])} ({c.get('infer_backward_passes', 0) / n:.1f}/user)" \
            if "backward_passes" in c and n else "-"
        lines.append(f"| {r.name} | {train_rank + train_gen} ({train_rank} + {train_gen}) | "
                     f"{int(c.get('train_users', 0))} | {infer_rank + infer_gen:.2f} ({infer_rank:.2f} + "
                     f"{infer_gen:.2f}) | {fwd} | {bwd} | {c.get('train_s', r.fit_s):.1f} | {r.rank_s:.1f} | "
                     f"{r.rank_s / n if n else math.nan:.2f} |")
    return lines + [""]
