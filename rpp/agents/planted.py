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

import numpy as np

from rpp.config import Config
from rpp.metrics import choice_diversity
from rpp.prompts import PATTERNS


def planted_check(cfg: Config, progress: bool = False, references: bool = True) -> dict:
    """Train a run on cfg (whose llm.backend must be 'planted') and evaluate it greedily on cfg.eval.split.
    references=False skips the group ceiling and the bandit references (about half a minute; the tests do)."""
    if cfg.llm.backend != "planted":
        raise ValueError("planted_check needs llm.backend: planted")
    from rpp.agents.evaluate import run_policy
    from rpp.agents.serving import load_algorithm
    from rpp.agents.checkpoints import latest_checkpoint
    from rpp.agents.train import train
    from rpp.envs import StateEncoder, make_core
    from rpp.llm import make_ranker

    start = time.perf_counter()
    run_dir = train(cfg, progress=progress)
    train_s = time.perf_counter() - start
    ranker = make_ranker(cfg)
    core = make_core(cfg, cfg.eval.split, ranker=ranker, encoder=StateEncoder(cfg.encoder))
    model = load_algorithm(cfg, latest_checkpoint(run_dir))
    samples = core.samples[:cfg.eval.n_users] if cfg.eval.n_users else core.samples
    records = run_policy(model.policy, core, samples, steps=cfg.eval.steps, batch_size=cfg.env.n_envs)
    result = summarize_planted(ranker, core, records) | {"train_s": round(train_s, 1), "run_dir": str(run_dir)}
    if references:
        result |= bandit_references(cfg, ranker) | {
            "group_ceiling": feature_ceiling(cfg, ranker, core.encoder)["eval_accuracy"]}
    return result


def feature_ceiling(cfg: Config, ranker, encoder=None, l2: float = 1e-2) -> dict:
    """How well the observation's user rows tell the planted groups apart at all: a softmax regression trained
    on the TRAINING users' rows with their true group labels (which the learner never sees), scored on the
    evaluation users. A learner rewarded only through NDCG cannot beat this supervised ceiling, so it is
    reported beside every planted result."""
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
    g = th.Generator().manual_seed(cfg.seed)
    weight = (0.01 * th.randn(x.shape[1], ranker.rule.groups, generator=g)).requires_grad_()
    bias = th.zeros(ranker.rule.groups, requires_grad=True)
    opt = th.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = th.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with th.no_grad():
        acc = {split: float(((xs @ weight + bias).argmax(1) == ys).float().mean()) for split, (xs, ys) in data.items()}
    return {"train_accuracy": acc["train"], "eval_accuracy": acc[cfg.eval.split]}


def bandit_references(cfg: Config, ranker, prior_sd: float = 0.3) -> dict:
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
        out[name] = _told_bandit(cfg, ranker, split.train, users, key, prior_sd)
    return out


def _told_bandit(cfg: Config, ranker, train_users, eval_users, key, prior_sd: float) -> float:
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
    for sample in UserStream(train_users, cfg.seed).take(math.ceil(cfg.train.total_steps / t)):
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


def summarize_planted(ranker, core, records: list[dict], k: int = 10) -> dict:
    """Scores of greedy evaluation records against the planted rule (see the module doc)."""
    rule = ranker.rule
    users = [r["user"] for r in records]
    taskwise = {p: a.id for p, a in core.builder.taskwise().items()}
    hits = [all(r["actions"][p] == ranker.optimal_actions(r["user"])[p] for p in rule.agents) for r in records]
    policy_ndcg = np.array([r["metrics"][f"ndcg@{k}"] for r in records])
    oracle = np.array([ranker.ndcg(u, {**taskwise, **ranker.optimal_actions(u)}, k) for u in users])
    taskwise_ndcg = np.array([ranker.ndcg(u, taskwise, k) for u in users])
    ids = {p: [a.id for a in core.action_set.actions[p]] for p in rule.agents}
    best_fixed, best_combo = -1.0, None
    for combo in itertools.product(*(ids[p] for p in rule.agents)):
        actions = {**taskwise, **dict(zip(rule.agents, combo))}
        value = float(np.mean([ranker.ndcg(u, actions, k) for u in users]))
        if value > best_fixed:
            best_fixed, best_combo = value, dict(zip(rule.agents, combo))
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
        "distinct_prompts": distinct,
        "prompt_entropy_bits": bits,
    }


def passes(result: dict, share: float = 0.95, of_oracle: float = 0.95) -> bool:
    """The acceptance bar of the planted check."""
    return result["optimal_share"] >= share and result["ndcg_vs_oracle"] >= of_oracle


def planted_config(base: Config, groups: int, seed: int, runs_dir: str | Path, **rule) -> Config:
    """`base` (e.g. experiments/ml100k.yaml) with the planted ranker in place of the LLM; everything the learner
    sees and its whole budget stay as configured."""
    cfg = base.model_copy(deep=True)
    cfg.name = f"planted-g{groups}-s{seed}"
    cfg.seed = seed
    cfg.llm.backend = "planted"
    cfg.llm.seed = seed
    cfg.llm.planted = cfg.llm.planted.model_copy(update={"groups": groups, **rule})
    cfg.train.check_users = 0
    cfg.train.runs_dir = str(runs_dir)
    return cfg
