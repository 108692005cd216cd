"""The learner's own test: train the four agents against the planted-interaction ranker and score how many users
get their group's best prompt (rpp.llm.planted has the rule; experiments/bench_planted.py runs it over seeds and
rules; a small version is in the test suite).

A learner that personalizes must reach, on held-out users, (a) the share of users whose agents pick their group's
best actions and (b) a mean NDCG close to the planted oracle (every user with their group's best actions). Beside
them the table shows the task-wise prompt and the best FIXED prompt (one combination for every user, chosen with
the label on the same users: an upper bound for any fixed prompt): a learner that collapses to one prompt for everyone lands at
or below the best fixed prompt, however well it trained. All of them are measured like the policy, with the rule's
seeded noise (the same user and prompt always get the same draw).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from rpp.config import Config
from rpp.metrics import choice_diversity
from rpp.prompts import PATTERNS


def planted_check(cfg: Config, progress: bool = False, references: bool = True,
                  curve: Sequence[int] = (), curve_users: int = 100) -> dict:
    """Train a run on cfg (whose llm.backend must be 'planted') and evaluate what it serves (the gated policy)
    greedily on cfg.eval.split. references=False skips the group ceilings and the bandit references (the tests
    do). curve: environment-step budgets at which the policy (ungated) is also scored on the first `curve_users`
    evaluation users while it trains (the sample-efficiency curve; result["curve"])."""
    if cfg.llm.backend != "planted":
        raise ValueError("planted_check needs llm.backend: planted")
    from rpp.agents.evaluate import run_policy
    from rpp.agents.gate import read_gate
    from rpp.agents.serving import load_algorithm
    from rpp.agents.checkpoints import latest_checkpoint
    from rpp.agents.train import train
    from rpp.envs import StateEncoder, make_core
    from rpp.llm import make_ranker

    ranker = make_ranker(cfg)
    encoder = StateEncoder(cfg.encoder)
    core = make_core(cfg, cfg.eval.split, ranker=ranker, encoder=encoder)
    callbacks = [CurveCallback(core, ranker, core.samples[:curve_users], curve, cfg)] if curve else []
    start = time.perf_counter()
    run_dir = train(cfg, progress=progress, callbacks=callbacks, ranker=ranker)
    train_s = time.perf_counter() - start
    model = load_algorithm(cfg, latest_checkpoint(run_dir))
    gate = read_gate(run_dir)
    samples = core.samples[:cfg.eval.n_users] if cfg.eval.n_users else core.samples
    records = run_policy(model.policy, core, samples, steps=cfg.eval.steps, batch_size=cfg.env.n_envs)
    val = make_core(cfg, "val", ranker=ranker, encoder=encoder).samples
    val_users = [s.user for s in (val[:cfg.train.gate_users] if cfg.train.gate_users else val)]
    result = summarize_planted(ranker, core, records, gate=gate, reference_users=val_users) | {
        "train_s": round(train_s, 1), "run_dir": str(run_dir)}
    if gate is not None:
        result["gate"] = {key: gate.get(key) for key in ("served", "reason", "n_users", "n_answered", "mean_diff",
                                                         "lower_bound", "llm_calls", "search_split",
                                                         "search_users")}
    if curve:
        result["curve"] = callbacks[0].points
    if references:
        result |= bandit_references(cfg, ranker) | {
            "group_ceiling": feature_ceiling(cfg, ranker, core.encoder)["eval_accuracy"],
            "group_ceiling_mlp": feature_ceiling(cfg, ranker, core.encoder, hidden=64)["eval_accuracy"]}
    return result


class CurveCallback:
    """Scores the policy being trained (greedy, ungated) on `samples` once the run passes each budget in
    `points`: {budget: {"optimal_share", "captured_headroom"}} in self.points. An SB3 callback (built lazily so
    this module imports without SB3 at the top)."""

    def __new__(cls, core, ranker, samples, points, cfg):
        from stable_baselines3.common.callbacks import BaseCallback

        from rpp.agents.evaluate import run_policy

        class _Curve(BaseCallback):
            def __init__(self):
                super().__init__()
                self.todo = sorted(int(p) for p in points)
                self.points: dict[int, dict] = {}

            def _on_step(self) -> bool:
                return True

            def _on_rollout_end(self) -> None:
                while self.todo and self.model.num_timesteps >= self.todo[0]:
                    budget = self.todo.pop(0)
                    records = run_policy(self.model.policy, core, samples, steps=cfg.eval.steps,
                                         batch_size=cfg.env.n_envs)
                    summary = summarize_planted(ranker, core, records)
                    self.points[budget] = {"timesteps": int(self.model.num_timesteps),
                                           "optimal_share": summary["optimal_share"],
                                           "captured_headroom": summary["captured_headroom"]}

            def _on_training_end(self) -> None:
                # budgets past the last rollout (a run whose total is not a multiple of its rollout): the final
                # policy stands for them
                todo, self.todo = self.todo, [0]
                if todo:
                    self._on_rollout_end()
                    final = self.points.pop(0)
                    self.points.update({budget: final for budget in todo})

        return _Curve()


def feature_ceiling(cfg: Config, ranker, encoder=None, l2: float = 1e-2, hidden: int = 0) -> dict:
    """How well the observation's user rows tell the planted groups apart at all: a softmax regression (hidden 0)
    or a one-hidden-layer network (hidden > 0: a non-linear probe, which can carve a middle bucket) trained on the
    TRAINING users' rows with their true group labels (which the learner never sees), scored on the evaluation
    users. A learner rewarded only through NDCG cannot beat this supervised ceiling, so it is reported beside every
    planted result."""
    import torch as th

    from rpp.envs import StateEncoder, make_core

    encoder = encoder or StateEncoder(cfg.encoder)
    cores = {split: make_core(cfg, split, ranker=ranker, encoder=encoder) for split in ("train", cfg.eval.split)}
    data = {}
    for split, core in cores.items():
        x = th.as_tensor(np.stack([core.user_rows(s).reshape(-1) for s in core.samples]))
        y = th.as_tensor([ranker.group[s.user] for s in core.samples])
        data[split] = (x, y)
    x, y = data["train"]
    th.manual_seed(cfg.seed)
    groups = ranker.rule.groups
    net = (th.nn.Sequential(th.nn.Linear(x.shape[1], hidden), th.nn.Tanh(), th.nn.Linear(hidden, groups))
           if hidden else th.nn.Linear(x.shape[1], groups))
    opt = th.optim.LBFGS(list(net.parameters()), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = th.nn.functional.cross_entropy(net(x), y) + l2 * sum(p.pow(2).sum() for p in net.parameters()
                                                                    if p.ndim > 1)
        loss.backward()
        return loss

    opt.step(closure)
    with th.no_grad():
        acc = {split: float((net(xs).argmax(1) == ys).float().mean()) for split, (xs, ys) in data.items()}
    return {"train_accuracy": acc["train"], "eval_accuracy": acc[cfg.eval.split]}


def bandit_references(cfg: Config, ranker, prior_sd: float = 0.3, steps: int | None = None) -> dict:
    """Is the budget enough at all? Learners that are TOLD what the agents must find out: each user's group
    ("bandit_told_group") or the value of the feature that defines the groups ("bandit_told_feature": the dominant
    genre; None for other rules). Per told value and per agent (all four; they do not know which ones matter),
    Gaussian Thompson sampling over the agent's actions, fed the environment's reward (NDCG@reward_k minus the
    task-wise NDCG) for the run's number of environment steps, the training users served in the environment's
    seeded order, T steps each. The final choice (each agent's best mean for the user's told value) is scored on
    the evaluation users like the policy (share of users with their group's best actions); a value never seen in
    training counts as a miss. When they find the groups and the policy does not, the budget held the evidence and
    the policy did not use it."""
    from rpp.data import load_dataset, split_users
    from rpp.envs.features import dominant_genre

    dataset = load_dataset(cfg.data)
    split = split_users(dataset, cfg.data, cfg.seed)
    users = getattr(split, cfg.eval.split)
    users = users[:cfg.eval.n_users] if cfg.eval.n_users else users
    keys = {"bandit_told_group": lambda s: ranker.group[s.user]}
    if ranker.rule.feature == "genre":
        keys["bandit_told_feature"] = lambda s: dominant_genre(dataset.genres(item) for item in s.history)
    out = {"bandit_told_group": None, "bandit_told_feature": None}
    for name, key in keys.items():
        out[name] = _told_bandit(cfg, ranker, split.train, users, key, prior_sd, steps or cfg.train.total_steps)
    return out


def _told_bandit(cfg: Config, ranker, train_users, eval_users, key, prior_sd: float, steps: int) -> float:
    """One learner of bandit_references, told key(sample); returns its share of optimal evaluation users."""
    from rpp.envs.core import UserStream
    from rpp.prompts import PromptBuilder

    builder = PromptBuilder(ranker.action_set, cfg.prompt, cfg.data.item_noun)
    taskwise = {p: a.id for p, a in builder.taskwise().items()}
    ids = {p: [a.id for a in ranker.action_set.actions[p]] for p in PATTERNS}
    rng = np.random.default_rng([cfg.seed, 0xBA4D])
    sums: dict = {}
    counts: dict = {}
    k, t = cfg.env.reward_k, cfg.env.steps_per_episode
    for sample in UserStream(train_users, cfg.seed).take(math.ceil(steps / t)):
        value = key(sample)
        for p in PATTERNS:
            sums.setdefault((value, p), np.zeros(len(ids[p])))
            counts.setdefault((value, p), np.zeros(len(ids[p])))
        base = ranker.ndcg(sample.user, taskwise, k)
        for _ in range(t):
            chosen = {}
            for p in PATTERNS:
                n = counts[value, p]
                mean = np.divide(sums[value, p], n, out=np.zeros_like(n), where=n > 0)
                chosen[p] = int(np.argmax(mean + prior_sd * rng.standard_normal(len(n)) / np.sqrt(n + 1)))
            reward = ranker.ndcg(sample.user, {p: ids[p][i] for p, i in chosen.items()}, k) - base
            for p, i in chosen.items():
                sums[value, p][i] += reward
                counts[value, p][i] += 1

    def best(value, p):
        n = counts[value, p]
        return ids[p][int(np.argmax(np.divide(sums[value, p], n, out=np.full_like(n, -np.inf), where=n > 0)))]

    hits = []
    for s in eval_users:
        value, optimal = key(s), ranker.optimal_actions(s.user)
        hits.append(all((value, p) in counts and best(value, p) == optimal[p] for p in ranker.rule.agents))
    return float(np.mean(hits))


def summarize_planted(ranker, core, records: list[dict], k: int = 10, gate: dict | None = None,
                      reference_users: Sequence = ()) -> dict:
    """Scores of greedy evaluation records of the policy against the planted rule (see the module doc), and of
    what the run SERVES: the policy, or the fixed prompt where its gate (gate.json) chose that.

    captured_headroom H = (served NDCG - best fixed NDCG) / (oracle NDCG - best fixed NDCG), against the best fixed
    prompt chosen WITH the evaluation users' labels (an upper bound of any fixed prompt, so H is conservative).
    harm = (reference - served) / reference, what a null rule is judged by, against the best fixed prompt chosen on
    `reference_users` (the run's validation users: the reference a user of the benchmark gets, chosen without the
    evaluation users' labels), scored on the evaluation users; without them, against the upper bound. The upper
    bound selects on the evaluation users' own noise and group shares: on a 5-group null rule, the fixed prompt best
    for the training users scored 12% below it on the test users (harm_vs_upper_bound reports it anyway)."""
    rule = ranker.rule
    users = [r["user"] for r in records]
    taskwise = {p: a.id for p, a in core.builder.taskwise().items()}
    if gate is not None and gate["served"] == "fixed":
        fixed = gate["fixed_actions"]
        records = [{**r, "actions": dict(fixed), "metrics": {f"ndcg@{k}": ranker.ndcg(r["user"], fixed, k)}}
                   for r in records]
    hits = [all(r["actions"][p] == ranker.optimal_actions(r["user"])[p] for p in rule.agents) for r in records]
    policy_ndcg = np.array([r["metrics"][f"ndcg@{k}"] for r in records])
    oracle = np.array([ranker.ndcg(u, {**taskwise, **ranker.optimal_actions(u)}, k) for u in users])
    taskwise_ndcg = np.array([ranker.ndcg(u, taskwise, k) for u in users])
    best_fixed, best_actions = best_fixed_prompt(ranker, users, rule.agents, taskwise, k)
    best_combo = {p: best_actions[p] for p in rule.agents}
    reference = best_fixed
    if len(reference_users):
        _, val_actions = best_fixed_prompt(ranker, reference_users, rule.agents, taskwise, k)
        reference = float(np.mean([ranker.ndcg(u, val_actions, k) for u in users]))
    distinct, bits = choice_diversity(tuple(sorted(r["actions"].items())) for r in records)
    groups = Counter(ranker.group[u] for u in users)
    return {
        "rule": rule.model_dump(),
        "n_users": len(records),
        "group_sizes": [groups.get(g, 0) for g in range(rule.groups)],
        "optimal_share": float(np.mean(hits)),
        "optimal_share_by_group": [float(np.mean([h for h, u in zip(hits, users) if ranker.group[u] == g]))
                                   if groups.get(g) else math.nan for g in range(rule.groups)],
        "policy_ndcg": float(policy_ndcg.mean()),
        "oracle_ndcg": float(oracle.mean()),
        "ndcg_vs_oracle": float(policy_ndcg.mean() / oracle.mean()) if oracle.mean() > 0 else math.nan,
        "best_fixed_ndcg": best_fixed,
        "best_fixed": best_combo,
        "taskwise_ndcg": float(taskwise_ndcg.mean()),
        "served": "policy (no gate)" if gate is None else gate["served"],
        "captured_headroom": captured_headroom(policy_ndcg.mean(), best_fixed, oracle.mean()),
        "reference_fixed_ndcg": reference,
        "harm": float((reference - policy_ndcg.mean()) / reference) if reference > 0 else math.nan,
        "harm_vs_upper_bound": float((best_fixed - policy_ndcg.mean()) / best_fixed) if best_fixed > 0 else math.nan,
        "distinct_prompts": distinct,
        "prompt_entropy_bits": bits,
    }


def best_fixed_prompt(ranker, users: Sequence, agents: Sequence[str], base: dict[str, str],
                      k: int) -> tuple[float, dict[str, str]]:
    """The fixed prompt with the best mean NDCG@k on `users` among `base` (action ids of every agent) with every
    combination of `agents`' actions (the first on ties), and that mean."""
    ids = [[a.id for a in ranker.action_set.actions[p]] for p in agents]
    best, chosen = -1.0, dict(base)
    for combo in itertools.product(*ids):
        actions = {**base, **dict(zip(agents, combo))}
        value = float(np.mean([ranker.ndcg(u, actions, k) for u in users]))
        if value > best:
            best, chosen = value, actions
    return best, chosen


def captured_headroom(served: float, best_fixed: float, oracle: float) -> float:
    """(served - best fixed) / (oracle - best fixed): 1 = every user's best prompt, 0 = no better than one fixed
    prompt, negative = worse; nan where no headroom exists (the oracle is no better than the best fixed prompt)."""
    room = oracle - best_fixed
    return float((served - best_fixed) / room) if room > 1e-9 else math.nan


def passes(result: dict, share: float = 0.95, of_oracle: float = 0.95) -> bool:
    """The acceptance bar of the planted check."""
    return result["optimal_share"] >= share and result["ndcg_vs_oracle"] >= of_oracle


FAMILY_FEATURES = ("genre", "recent_genre", "history_length", "mean_rating", "rating_spread")
"""The user features a family rule may be defined by (all held by the user row; rpp.envs.features)."""


def draw_family(n: int, family_seed: int, null_share: float = 0.25) -> list[dict]:
    """n planted rules drawn from one seed: each with probability null_share a NULL rule (groups by a hash of the
    user id, which nothing observable reveals), else a rule on one of FAMILY_FEATURES; any non-empty subset of the
    four agents, 2-5 groups, additive or joint, noise 0.02 / 0.05 / 0.1. Rule i depends on (family_seed, i) only,
    so a family of 20 starts with the family of 10."""
    rules = []
    for i in range(n):
        rng = np.random.default_rng([family_seed, i, 0xFA])
        null = bool(rng.random() < null_share)
        agents = []
        while not agents:
            agents = [p for p in PATTERNS if rng.random() < 0.5]
        rules.append({"feature": "user_hash" if null else str(rng.choice(FAMILY_FEATURES)),
                      "agents": agents,
                      "groups": int(rng.integers(2, 6)),
                      "interaction": str(rng.choice(["additive", "joint"])),
                      "noise": float(rng.choice([0.02, 0.05, 0.1]))})
    return rules


def planted_config(base: Config, rule: dict, seed: int, runs_dir: str | Path) -> Config:
    """`base` (e.g. experiments/ml100k.yaml) with the planted ranker for `rule` (llm.planted keys: feature,
    agents, groups, interaction, noise; a draw_family entry) in place of the LLM; everything the learner sees and
    its whole budget stay as configured."""
    cfg = base.model_copy(deep=True)
    cfg.llm.planted = cfg.llm.planted.model_copy(update=rule)
    cfg.name = f"planted-g{cfg.llm.planted.groups}-s{seed}"
    cfg.seed = seed
    cfg.llm.backend = "planted"
    cfg.llm.seed = seed
    cfg.train.check_users = 0
    cfg.train.runs_dir = str(runs_dir)
    return cfg
