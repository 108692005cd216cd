"""Trained policies in the benchmark: the run's saved agents, driven over the BENCHMARK's users, candidates and ranker.

``rpp.agents.evaluate`` evaluates a run on its own split with its own ranker; a benchmark instead needs every method
on one user list and one ranker. So this module loads the run's checkpoint and config and runs the same greedy
rollout (``rpp.agents.run_policy``) on a StepCore built from the benchmark's pieces, after checking that the run
is compatible: same action set and prompt settings (the agents' actions must mean the same sentences), same
encoder and observation shape (the agents must see what they were trained on), and no benchmark test user among
the run's training or validation users.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

from rpp.benchmark.methods import BenchContext, BenchmarkError
from rpp.data import UserSample
from rpp.llm.base import Ranking
from rpp.metrics import choice_diversity
from rpp.prompts.actions import PATTERNS


def _check_compatible(run_dir: Path, run_cfg, ctx: BenchContext, users: Sequence[UserSample]) -> list[str]:
    """Raise BenchmarkError on anything that would make the comparison wrong; return notes on what differs but
    is allowed (the ranker: the benchmark's ranker serves every method, by design)."""
    from rpp.data import split_users
    from rpp.prompts import load_action_set

    cfg = ctx.cfg
    run_actions = load_action_set(run_cfg.prompt.action_spaces)
    bench_actions = ctx.builder.action_set
    for p in PATTERNS:
        ours = [(a.id, a.text) for a in bench_actions.actions[p]]
        theirs = [(a.id, a.text) for a in run_actions.actions[p]]
        if ours != theirs:
            raise BenchmarkError(f"{run_dir}: the run's '{p}' actions differ from the benchmark's action set "
                                 f"(prompt.action_spaces); its agents' choices would mean other sentences")
    for key in ("show_candidates", "system", "taskwise"):
        if getattr(run_cfg.prompt, key) != getattr(cfg.prompt, key):
            raise BenchmarkError(f"{run_dir}: prompt.{key} differs between the run and the benchmark config")
    if run_cfg.encoder.model_dump() != cfg.encoder.model_dump():
        raise BenchmarkError(f"{run_dir}: encoder settings differ between the run and the benchmark config; the "
                             f"agents would see states they were not trained on")
    if run_cfg.llm.mode != cfg.llm.mode:
        raise BenchmarkError(f"{run_dir}: llm.mode differs ({run_cfg.llm.mode} vs {cfg.llm.mode}): the prompt "
                             f"layout differs")
    # the user check: rebuild the run's own split and make sure no benchmark test user was seen by the run
    run_split = split_users(ctx.dataset, run_cfg.data, run_cfg.seed)
    seen = {u.user for u in run_split.train + run_split.val}
    leaked = sorted({u.user for u in users} & seen, key=str)
    if leaked:
        raise BenchmarkError(f"{run_dir}: {len(leaked)} benchmark test user(s) were training or validation users "
                             f"of this run (e.g. {leaked[:5]}); use the run's data settings and seed")
    notes = []
    run_llm = {k: v for k, v in run_cfg.llm.model_dump().items() if k not in ("cache", "cache_path", "threads")}
    bench_llm = {k: v for k, v in cfg.llm.model_dump().items() if k not in ("cache", "cache_path", "threads")}
    if run_llm != bench_llm:
        diff = [k for k in run_llm if run_llm[k] != bench_llm.get(k)]
        notes.append(f"trained with different llm settings ({', '.join(diff)}); evaluated on the benchmark's ranker")
    return notes


def training_usage(run_dir: Path, run_cfg) -> Optional[dict]:
    """The run's training LLM usage from usage.json (requests = model calls + cache hits), or None."""
    import json

    path = run_dir / "usage.json"
    if not path.is_file():
        return None
    llm = json.loads(path.read_text()).get("llm", {})
    return {"requests": int(llm.get("calls", 0)) + int(llm.get("cache_hits", 0)),
            "tokens": int(llm.get("prompt_tokens", 0)) + int(llm.get("completion_tokens", 0)),
            "users": int(run_cfg.data.n_train_users)}


def _load_run_config(run_dir: Path):
    from rpp.agents.checkpoints import load_run_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # redacted keys fall back to defaults; irrelevant for acting
        return load_run_config(run_dir)


def trained_with_refiner(run_dir: str | Path) -> bool:
    """Whether the run was trained with refiner.enabled (RPP+). False when its config cannot be read:
    evaluate_policy then reports the real problem."""
    try:
        return bool(_load_run_config(Path(run_dir)).refiner.enabled)
    except Exception:  # noqa: BLE001 - any unreadable run is reported by evaluate_policy, with context
        return False


def evaluate_policy(ctx: BenchContext, run_dir: str | Path, users: Sequence[UserSample], steps: int,
                    refine: bool = False):
    """Greedy `steps`-step episodes of the run's latest checkpoint on `users`; the last step's ranking per user.

    refine: RPP+, with a refiner in the step core: the run's own refiner settings when it was trained with one,
    else the benchmark config's `refiner` section (enabled for this evaluation). Which rows refine is decided
    by rpp.benchmark.methods.policy_methods (every row of a run trained with the refiner does). The refiner's generator shares
    the loaded weights with a local ranker of the same model.

    Returns (rankings, notes, training usage, refiner stats or None)."""
    from rpp.agents import run_policy
    from rpp.agents.checkpoints import latest_checkpoint
    from rpp.agents.gate import GatedPolicy, read_gate, served_phrase
    from rpp.agents.serving import load_algorithm
    from rpp.envs import StepCore
    from rpp.prompts.refiner import make_refiner

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise BenchmarkError(f"benchmark.runs: {run_dir} is not a run directory (no config.yaml)")
    run_cfg = _load_run_config(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise BenchmarkError(f"benchmark.runs: {run_dir} has no checkpoint (train it first)")
    notes = _check_compatible(run_dir, run_cfg, ctx, users)
    model = load_algorithm(run_cfg, checkpoint)
    gate = read_gate(run_dir)
    served = GatedPolicy(model.policy, gate)
    notes.append(f"serves {served_phrase(served.served)}" + (f" ({gate['reason']})" if gate else ""))
    env_cfg = ctx.cfg.env.model_copy(update={"reward_baseline": "none", "steps_per_episode": int(steps),
                                             "obs_candidates": run_cfg.env.obs_candidates})
    refiner = None
    if refine:
        source = run_cfg.refiner if run_cfg.refiner.enabled else ctx.cfg.refiner
        refiner = make_refiner(ctx.cfg.model_copy(update={"refiner": source.model_copy(update={"enabled": True})}),
                               dataset=ctx.dataset)
        notes.append(f"RPP+ refiner from the {'run' if run_cfg.refiner.enabled else 'benchmark'} config "
                     f"({source.backend} `{source.model}`, every {source.every_k_steps} step(s))")
    core = StepCore(ctx.dataset, users, ctx.builder, ctx.encoder, ctx.ranker, env_cfg=env_cfg,
                    encoder_cfg=ctx.cfg.encoder, seed=ctx.seed, refiner=refiner)
    try:
        if list(model.action_space.nvec) != list(core.nvec):
            raise BenchmarkError(f"{run_dir}: the policy has action sizes {list(model.action_space.nvec)}, the "
                                 f"benchmark's action set {list(core.nvec)}")
        if tuple(model.observation_space.shape) != tuple(core.observation_space.shape):
            raise BenchmarkError(f"{run_dir}: the policy observes {tuple(model.observation_space.shape)}, the "
                                 f"benchmark's core gives {tuple(core.observation_space.shape)} (n_candidates or "
                                 f"env.obs_candidates differ)")
        from rpp.benchmark.methods import CHUNK_USERS

        records = run_policy(served, core, list(users), int(steps), CHUNK_USERS)
        stats = refiner.stats() if refiner is not None else None
    finally:
        if refiner is not None:
            refiner.close()
    rankings = [Ranking(order=list(r["ranking_indices"]), failed=bool(r["ranker_failed"])) for r in records]
    distinct, bits = choice_diversity(tuple(sorted(r["actions"].items())) for r in records)
    notes.append(f"{distinct} distinct prompts over {len(records)} users (entropy {bits:.2f} bits)")
    notes.append(f"checkpoint {checkpoint.name}")
    return rankings, notes, training_usage(run_dir, run_cfg), stats
