"""Is per-user prompting worth it on this ranker? The statistics of `rpp headroom`, on an NDCG@10 array.

Input: ``ndcg[u, k, j]``, the NDCG@10 of user u under prompt k (k = 0 is the task-wise prompt) on the user's
pseudo-episode j (one of the user's own last history items as the target, the history before it, seeded
negatives). Items are split in two halves, A = items 0, 2, ... and B = items 1, 3, ...; what is chosen on A is
measured on B, so a gain that is selection on noise shows up as no gain.

- ``decompose``: the variance of NDCG@10 into user, prompt, user x prompt (cell means) and within-cell (item) parts,
  with the user x prompt part also corrected for the item noise it contains (ANOVA: var - within / J).
- ``reliability``: split-half correlation of the prompt main effects (over prompts) and of the per-user prompt
  effects (the user x prompt interaction, over all (user, prompt) cells), Spearman-Brown corrected to all items.
- ``gains``: per-user gains over the task-wise prompt, on half B: the best fixed prompt picked on half A, each
  user's best prompt picked on half A, the label oracle on half B (an UPPER BOUND: it reads B's labels), and, when
  observable user groups are given, a state rule: the best prompt per group of an observable feature, learned on
  OTHER users (two folds over users) and measured on half B: what a policy that reads the user's state could use.
- ``verdict``: one of VERDICTS, with the numbers behind it.

Confidence intervals are percentile bootstraps over users (a choice made across users is made again in every
bootstrap draw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np


FIXED = "a better fixed prompt exists"
TRAIN = "per-user effects are reliable: train a policy"
KEEP = "neither: keep the task-wise prompt"
VERDICTS = (FIXED, TRAIN, KEEP)


def _check(ndcg) -> np.ndarray:
    x = np.asarray(ndcg, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"ndcg must be a users x prompts x items array, got shape {x.shape}")
    if x.shape[0] < 2 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"need at least 2 users, 2 prompts and 2 items per user, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("ndcg has missing values (drop the users whose rankings failed first)")
    return x


def halves(n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Item indices of half A (0, 2, ...) and half B (1, 3, ...)."""
    return np.arange(0, n_items, 2), np.arange(1, n_items, 2)


def _interaction(cells: np.ndarray) -> np.ndarray:
    """cell - user mean - prompt mean + grand mean, for a users x prompts matrix."""
    return cells - cells.mean(1, keepdims=True) - cells.mean(0, keepdims=True) + cells.mean()


def decompose(ndcg) -> dict:
    """Variance components of NDCG@10 (population variances of the effects; within = mean per-cell item
    variance with ddof 1). `interaction_corrected` removes the item noise the cell means carry (about within / J)."""
    x = _check(ndcg)
    cells = x.mean(2)
    grand = cells.mean()
    user = cells.mean(1) - grand
    prompt = cells.mean(0) - grand
    inter = _interaction(cells)
    within = float(x.var(axis=2, ddof=1).mean())
    out = {"user": float(user.var()), "prompt": float(prompt.var()), "interaction": float(inter.var()),
           "within": within}
    n_users, n_prompts, n_items = x.shape
    # double centring keeps (1 - 1/K)(1 - 1/U) of the item noise's within / J in the cell means
    noise_in_cells = within / n_items * (1 - 1 / n_prompts) * (1 - 1 / n_users)
    out["interaction_corrected"] = max(0.0, out["interaction"] - noise_in_cells)
    total = sum(out[k] for k in ("user", "prompt", "interaction", "within"))
    out["shares"] = {k: (out[k] / total if total > 0 else float("nan"))
                     for k in ("user", "prompt", "interaction", "within")}
    return out


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Reliability of a test `factor` times as long, from the reliability r of one part."""
    if not np.isfinite(r) or 1 + (factor - 1) * r == 0:
        return float("nan")
    return float(factor * r / (1 + (factor - 1) * r))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    if a.std() == 0 or b.std() == 0:
        return float("nan")  # no effects to correlate
    return float(np.corrcoef(a, b)[0, 1])


def _reliability_point(x: np.ndarray) -> tuple[float, float]:
    a, b = halves(x.shape[2])
    ca, cb = x[:, :, a].mean(2), x[:, :, b].mean(2)
    r_user = _corr(_interaction(ca), _interaction(cb))
    r_prompt = _corr(ca.mean(0) - ca.mean(), cb.mean(0) - cb.mean())
    return r_user, r_prompt


def half_effects(ndcg) -> tuple[np.ndarray, np.ndarray]:
    """The per-user prompt effects (interaction) on half A and on half B: users x prompts each (for the plot)."""
    x = _check(ndcg)
    a, b = halves(x.shape[2])
    return _interaction(x[:, :, a].mean(2)), _interaction(x[:, :, b].mean(2))


def boot_indices(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_users] user indices drawn with replacement: the bootstrap resamples every CI here shares."""
    return np.random.default_rng([int(seed), 0x4EAD]).integers(0, n_users, size=(n_boot, n_users))


def percentile_ci(point: float, draws, alpha: float = 0.05) -> dict:
    """{"value", "low", "high"}: the point estimate and the percentile (1 - alpha) interval of its bootstrap draws
    (non-finite draws dropped)."""
    d = np.asarray([v for v in draws if np.isfinite(v)], dtype=np.float64)
    if not d.size or not np.isfinite(point):
        return {"value": point, "low": float("nan"), "high": float("nan")}
    low, high = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    return {"value": float(point), "low": float(low), "high": float(high)}


def reliability(ndcg, n_boot: int = 1000, seed: int = 0) -> dict:
    """Split-half correlations (half A vs half B) with Spearman-Brown corrections and bootstrap CIs over users:
    `user_prompt` (per-user prompt effects) and `prompt` (prompt main effects)."""
    x = _check(ndcg)
    r_user, r_prompt = _reliability_point(x)
    draws = [_reliability_point(x[idx]) for idx in boot_indices(x.shape[0], n_boot, seed)]
    out = {}
    for name, point, col in (("user_prompt", r_user, 0), ("prompt", r_prompt, 1)):
        r = percentile_ci(point, [d[col] for d in draws])
        sb = percentile_ci(spearman_brown(point), [spearman_brown(d[col]) for d in draws])
        out[name] = {"r": r, "spearman_brown": sb}
    return out


def _group_best(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Best prompt per group label (ties to the earlier prompt, so to the task-wise one)."""
    return {g: int(np.argmax(scores[labels == g].mean(0))) for g in np.unique(labels)}


def _state_gain(x: np.ndarray, labels: Mapping[str, np.ndarray], seed: int) -> tuple[np.ndarray, list]:
    """Per-user gain (half B, vs task-wise) of the best prompt per observable group, learned on the other fold of
    users. Within the training fold, the feature is chosen by its own A->B gain, then the group's best prompt is
    taken on all of the training fold's items; the held-out fold is read only on half B, to be measured."""
    n_users, n_items = x.shape[0], x.shape[2]
    a, b = halves(n_items)
    fold = np.zeros(n_users, dtype=int)
    fold[np.random.default_rng([int(seed), 0x57A7]).permutation(n_users)[n_users // 2:]] = 1
    xa, xb, xall = x[:, :, a].mean(2), x[:, :, b].mean(2), x.mean(2)
    gain = np.zeros(n_users)
    chosen = []
    for f in (0, 1):
        train, test = fold != f, fold == f
        best_name, best_val = None, -np.inf
        for name, lab in labels.items():
            lab = np.asarray(lab)
            rule = _group_best(xa[train], lab[train])
            val = np.mean([xb[u, rule[lab[u]]] - xb[u, 0] for u in np.flatnonzero(train)])
            if val > best_val:
                best_name, best_val = name, val
        lab = np.asarray(labels[best_name])
        rule = _group_best(xall[train], lab[train])
        for u in np.flatnonzero(test):
            k = rule.get(lab[u], 0)  # a group the training fold never saw: the task-wise prompt
            gain[u] = xb[u, k] - xb[u, 0]
        chosen.append(best_name)
    return gain, chosen


@dataclass
class Gains:
    taskwise_b: float
    """Mean NDCG@10 of the task-wise prompt on half B."""
    fixed_pick: int
    fixed: dict
    per_user: dict
    oracle: dict
    state: Optional[dict]
    state_vs_fixed: Optional[dict]
    """The state rule's gain minus the best fixed prompt's, per user: what personalization adds to a fixed prompt."""
    state_features: list
    per_user_gain: np.ndarray
    """Per-user gains of the per-user pick (for plots)."""


def gains(ndcg, labels: Optional[Mapping[str, np.ndarray]] = None, n_boot: int = 1000, seed: int = 0) -> Gains:
    """Honest selection gains over the task-wise prompt (k = 0), measured on half B, with bootstrap CIs over users.
    `labels`: observable user groups by feature name (ints or strings per user), for the state rule."""
    x = _check(ndcg)
    a, b = halves(x.shape[2])
    xa, xb = x[:, :, a].mean(2), x[:, :, b].mean(2)
    rows = np.arange(x.shape[0])
    k_fixed = int(np.argmax(xa.mean(0)))
    per_user = xb[rows, xa.argmax(1)] - xb[:, 0]
    oracle = xb.max(1) - xb[:, 0]
    idx = boot_indices(x.shape[0], n_boot, seed)

    def fixed_gain(sub_a, sub_b):
        k = int(np.argmax(sub_a.mean(0)))
        return float((sub_b[:, k] - sub_b[:, 0]).mean())

    fixed = percentile_ci(fixed_gain(xa, xb), [fixed_gain(xa[i], xb[i]) for i in idx])
    out = Gains(taskwise_b=float(xb[:, 0].mean()), fixed_pick=k_fixed, fixed=fixed,
                per_user=percentile_ci(float(per_user.mean()), [per_user[i].mean() for i in idx]),
                oracle=percentile_ci(float(oracle.mean()), [oracle[i].mean() for i in idx]),
                state=None, state_vs_fixed=None, state_features=[], per_user_gain=per_user)
    if labels:
        labels = {k: np.asarray(v) for k, v in labels.items()}
        for name, lab in labels.items():
            if len(lab) != x.shape[0]:
                raise ValueError(f"labels[{name!r}] has {len(lab)} entries for {x.shape[0]} users")
        state, out.state_features = _state_gain(x, labels, seed)
        # the fold assignment and choices are fixed; the CI is over the held-out users' measurements
        out.state = percentile_ci(float(state.mean()), [state[i].mean() for i in idx])
        over = state - (xb[:, k_fixed] - xb[:, 0])
        out.state_vs_fixed = percentile_ci(float(over.mean()), [over[i].mean() for i in idx])
    return out


def verdict(rel: dict, g: Gains) -> tuple[str, str]:
    """(verdict, the numbers behind it). TRAIN needs all three: per-user effects that repeat across items (the
    Spearman-Brown reliability's CI above 0), a per-user pick on half A that gains on half B (CI above 0) and, when
    observable groups were given, a state rule learned on other users that gains MORE than the best fixed prompt
    (CI of the per-user difference above 0): a policy only reads the state, and must beat a fixed prompt. Else
    FIXED when the fixed prompt picked on half A gains on half B (CI above 0); else KEEP."""
    sb = rel["user_prompt"]["spearman_brown"]
    fmt = lambda d: f"{d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"  # noqa: E731
    numbers = (f"per-user effect reliability (Spearman-Brown) {fmt(sb)}; gains on half B vs task-wise "
               f"({g.taskwise_b:.4f}): per-user pick {fmt(g.per_user)}, best fixed {fmt(g.fixed)}")
    if g.state is not None:
        numbers += (f", state rule ({'/'.join(g.state_features)}) {fmt(g.state)}, i.e. "
                    f"{fmt(g.state_vs_fixed)} over the best fixed prompt")
    numbers += f"; label oracle (upper bound) {fmt(g.oracle)}"
    reliable = np.isfinite(sb["low"]) and sb["low"] > 0 and g.per_user["low"] > 0
    learnable = g.state is None or g.state_vs_fixed["low"] > 0
    if reliable and learnable:
        return TRAIN, numbers
    why = ("per-user effects repeat, but no observable feature predicts them better than a fixed prompt"
           if reliable else "per-user effects do not repeat from one half of the items to the other")
    if g.fixed["low"] > 0:
        return FIXED, f"{why}; {numbers}"
    return KEEP, f"{why}; {numbers}"


def analyse(ndcg, labels: Optional[Mapping[str, np.ndarray]] = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Everything above in one dict (json-ready apart from `gains`, a Gains)."""
    x = _check(ndcg)
    rel = reliability(x, n_boot, seed)
    g = gains(x, labels, n_boot, seed)
    v, numbers = verdict(rel, g)
    return {"shape": list(x.shape), "variance": decompose(x), "reliability": rel, "gains": g,
            "verdict": v, "numbers": numbers}
