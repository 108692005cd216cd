"""Train the four prompt agents with SB3 on the batched prompt environment: the thompson learner (the default,
rpp.agents.learner) or PPO alone (train.learner: ppo, a baseline).

Reads top to bottom: run directory -> seeding -> ranker, encoder and environment -> ranker sanity check ->
derived sizes -> algorithm (new, or loaded from the last checkpoint) -> learn (SB3 owns rollouts, advantages,
optimisation and logging; our callbacks only record and checkpoint) -> final checkpoint, usage, plot -> the
safe-improvement gate on validation users (rpp.agents.gate: serve the policy, or the best fixed prompt).

Budget arithmetic: a rollout is n_steps = cfg.rollout_steps steps of each of the n_envs users-in-parallel, i.e.
n_envs * n_steps environment steps (= LLM calls before caching); n_steps is a multiple of the episode length T, so
every rollout is whole episodes and ends on a user boundary, which is what makes checkpoints resumable exactly.
The run does ceil(total_steps / (n_envs * n_steps)) rollouts.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch as th
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import set_random_seed

from rpp.agents.gate import safe_improvement_gate, served_phrase
from rpp.agents.callbacks import EntropySchedule, ResumableCheckpoint, RolloutMetrics
from rpp.agents.checkpoints import (
    atomic_write_text, check_resume_config, latest_checkpoint, load_run_config, load_state, read_jsonl,
    set_rng_states, write_json,
)
from rpp.agents.learner import ThompsonPPO
from rpp.agents.policy import PATTERNS, FourAgentPolicy
from rpp.config import Config
from rpp.llm.failures import FailureBudgetExceeded, phase as failure_phase
from rpp.envs.core import CONTEXT_ROWS

ALGORITHMS = {"thompson": ThompsonPPO, "ppo": PPO}


def algorithm_class(cfg: Config):
    """The SB3 class a run trains and loads with (train.learner)."""
    return ALGORITHMS[cfg.train.learner]


def algorithm_kwargs(cfg: Config, n_envs: int, core=None) -> dict:
    """SB3 hyperparameters from cfg.train; for the thompson learner also the reward head's settings, layout and
    the training users' rows its basis is fit on (from `core`, the training split's StepCore)."""
    t = cfg.train
    policy_kwargs = dict(hidden_size=t.hidden_size, context_rows=CONTEXT_ROWS, ablate=list(t.ablate))
    # a minibatch larger than the rollout would just be the rollout; SB3 warns on a ragged last minibatch
    kwargs = dict(learning_rate=t.learning_rate, n_steps=cfg.rollout_steps, gamma=t.gamma, gae_lambda=t.gae_lambda,
                  ent_coef=t.ent_coef, vf_coef=t.vf_coef, max_grad_norm=t.max_grad_norm,
                  batch_size=min(t.batch_size, n_envs * cfg.rollout_steps), n_epochs=t.n_epochs,
                  clip_range=t.clip_range, policy_kwargs=policy_kwargs, device=t.device, seed=cfg.seed, verbose=0)
    if t.learner == "thompson":
        policy_kwargs.update(user_layout=core.user_features.features.layout, bins=t.posterior.bins)
        kwargs.update(posterior=t.posterior, basis_rows=np.stack([core.user_rows(s)[0] for s in core.samples]))
    return kwargs


def seed_everything(seed: int) -> None:
    """The one seeding block: python, numpy, torch (and SB3's helper, which also covers CUDA). The environment's
    user order is seeded where it is built (and by SB3, which calls env.seed(seed) when the algorithm is created)."""
    random.seed(seed)
    np.random.seed(seed)
    th.manual_seed(seed)
    set_random_seed(seed)
    th.backends.cudnn.deterministic = True
    th.backends.cudnn.benchmark = False


def train(cfg: Optional[Config], resume: str | Path | None = None,
          callbacks: Optional[Sequence[BaseCallback]] = None, progress: bool = True, ranker=None) -> Path:
    """Train (or resume) a run; returns its directory ``<train.runs_dir>/<name>`` (or `resume`).

    resume: a run directory; training continues from its latest checkpoint with the same users, RNG states,
    optimizer and timestep count as the uninterrupted run. cfg may then be None (the run's own config is used) or
    a config that differs only in keys a continuation may change (e.g. a larger train.total_steps).
    callbacks: extra SB3 callbacks (run after ours). ranker: an already-built rpp Ranker to use instead of
    make_ranker(cfg) (the caller keeps ownership); progress: show the tqdm bar."""
    from rpp.envs import BatchedPromptVecEnv, StateEncoder, make_core
    from rpp.llm import make_ranker
    from rpp.prompts import load_action_set

    # ---- 1. run directory ------------------------------------------------------------------------------------
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (checkpoints/latest is missing)")
        if cfg is None:
            cfg = load_run_config(run_dir)
        else:
            cfg = cfg.model_copy(deep=True)
            check_resume_config(run_dir, cfg)
            cfg.prompt.action_spaces = str(run_dir / "actions.yaml")
            _record_resume_changes(run_dir, cfg)
    else:
        if cfg is None:
            raise ValueError("train() needs a config (or resume=RUN_DIR)")
        cfg = cfg.model_copy(deep=True)
        run_dir = Path(cfg.train.runs_dir) / cfg.name
        if latest_checkpoint(run_dir) is not None:
            raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick "
                                  "another name (name: ... or --set name=...)")
        if (run_dir / "metrics.jsonl").exists():
            raise FileExistsError(f"{run_dir} holds a run that stopped before its first checkpoint; delete the "
                                  "folder or pick another name")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        action_set = load_action_set(cfg.prompt.action_spaces)  # validate before copying
        shutil.copyfile(action_set.source, run_dir / "actions.yaml")
    action_set = load_action_set(cfg.prompt.action_spaces)

    # ---- 2. seeding ------------------------------------------------------------------------------------------
    seed_everything(cfg.seed)

    # ---- 3. ranker, state encoder, environment (N users per step, one batched ranker call) -------------------
    own_ranker = ranker is None
    if own_ranker:
        ranker = make_ranker(cfg)
    try:
        encoder = StateEncoder(cfg.encoder)
        env = BatchedPromptVecEnv(make_core(cfg, "train", ranker=ranker, encoder=encoder), n_envs=cfg.env.n_envs,
                                  seed=cfg.seed)

        # ---- 4. is the ranker worth training against? (fresh runs; the result stays in the run dir) ----------
        if checkpoint is None and cfg.train.check_users > 0:
            from rpp.agents.evaluate import check_ranker

            check_ranker(cfg, make_core(cfg, "val", ranker=ranker, encoder=encoder), run_dir=run_dir)

        # ---- 5. derived sizes ----------------------------------------------------------------------------------
        n_envs = env.num_envs
        n_steps = cfg.rollout_steps
        steps_per_rollout = n_envs * n_steps
        n_rollouts = math.ceil(cfg.train.total_steps / steps_per_rollout)
        total_timesteps = n_rollouts * steps_per_rollout

        # ---- 6. algorithm: new, or restored exactly from the last checkpoint ----------------------------------
        algo_cls = algorithm_class(cfg)
        usage_before, resumed_at = None, -1
        if checkpoint is None:
            model = algo_cls(FourAgentPolicy, env, **algorithm_kwargs(cfg, n_envs, env.core))
        else:
            model, state = _restore(algo_cls, checkpoint, env, cfg)
            resumed_at = state["rollouts"]
            _truncate_metrics(run_dir / "metrics.jsonl", state["num_timesteps"])
            usage_before = _usage_so_far(run_dir, state)
        model.set_logger(configure(str(run_dir / "tb"), ["tensorboard"]))

        # ---- 7. learn --------------------------------------------------------------------------------------------
        action_ids = {p: [a.id for a in action_set.actions[p]] for p in PATTERNS}
        metrics = RolloutMetrics(run_dir, ranker, action_ids, total_timesteps, usage_before, progress=progress,
                                 refiner=env.core.refiner)
        checkpoints = ResumableCheckpoint(
            run_dir, steps_per_rollout, cfg.train.checkpoint_every, resumed_at=resumed_at,
            extra_state=lambda: {"env": env.get_state(), "usage": metrics.usage_total().to_dict(),
                                 **({"learner": model.learner_state()} if isinstance(model, ThompsonPPO) else {})})
        ours = [metrics, checkpoints]
        if cfg.train.ent_coef_final is not None:
            schedule = EntropySchedule(cfg.train.ent_coef, cfg.train.ent_coef_final, total_timesteps)
            model.ent_coef = schedule.value(model.num_timesteps)
            ours.append(schedule)
        remaining = total_timesteps - model.num_timesteps
        if remaining > 0:
            try:  # rollouts and their baselines: over the failure budget, stop on the last checkpoint
                with failure_phase(ranker, "training rollouts", cfg.llm.max_failure_rate):
                    model.learn(total_timesteps=remaining, reset_num_timesteps=checkpoint is None, log_interval=1,
                                callback=CallbackList([*ours, *(callbacks or [])]))
            except FailureBudgetExceeded as exc:
                write_json(run_dir / "usage.json", metrics.usage_record(model.num_timesteps))
                raise FailureBudgetExceeded(
                    f"{exc}. Checkpoints up to the last complete one are kept in {run_dir}; once the server "
                    f"answers again, continue with: rpp train --resume {run_dir}", exc.phase) from None

        # ---- 8. final checkpoint, usage, learning curve ------------------------------------------------------------
        checkpoints.init_callback(model)
        checkpoints.save_now()
        usage = metrics.usage_total()
        write_json(run_dir / "usage.json", metrics.usage_record(model.num_timesteps))
        plot_learning_curve(run_dir)
        rows = read_jsonl(run_dir / "metrics.jsonl")
        if rows:
            print(f"trained {model.num_timesteps} steps ({len(rows)} rollouts); last rollout: mean reward "
                  f"{rows[-1]['mean_reward']:+.4f}, mean NDCG@{cfg.env.reward_k} {rows[-1]['mean_ndcg']:.4f}; "
                  f"usage: {usage}", file=sys.stderr)
        env.close()

        # ---- 9. safe-improvement gate: serve the policy only where it beats the best fixed prompt ---------------
        if cfg.data.n_val_users > 0:
            with failure_phase(ranker, "validation gate", cfg.llm.max_failure_rate):
                gate = safe_improvement_gate(cfg, run_dir, model, ranker, encoder, progress=progress)
            print(f"gate: serving {served_phrase(gate['served'])} ({gate['reason']})", file=sys.stderr)
    finally:
        if own_ranker:
            ranker.close()
    return run_dir


def _restore(algo_cls, checkpoint: Path, env, cfg: Config):
    """Load the algorithm (policy, optimizer, counters) and put env and RNGs where the checkpoint left them."""
    model = algo_cls.load(checkpoint / "model.zip", env=env, device=cfg.train.device, force_reset=False)
    state = load_state(checkpoint)
    if int(model.num_timesteps) != int(state["num_timesteps"]):
        raise RuntimeError(f"{checkpoint}: model.zip is at {model.num_timesteps} steps, state.pkl at "
                           f"{state['num_timesteps']}: the checkpoint is inconsistent")
    # SB3's load re-seeded the env (set_random_seed); rewind the user stream to the block that was loaded when
    # the checkpoint was taken, and serve it again.
    env.set_state(state["env"])
    obs = env.reset()
    saved_obs = model._last_obs
    if saved_obs is not None and (saved_obs.shape != obs.shape or not np.allclose(saved_obs, obs, atol=1e-5)):
        raise RuntimeError(f"{checkpoint}: the restored environment does not serve the users the run had loaded; "
                           "the data, split or encoder changed since the checkpoint")
    model._last_obs = obs
    model._last_episode_starts = np.ones((env.num_envs,), dtype=bool)
    if isinstance(model, ThompsonPPO):
        model.load_learner_state(state["learner"])
    # last, so that nothing above (policy construction, env reset) consumes the restored random streams
    set_rng_states(state["rng"])
    return model, state


def _record_resume_changes(run_dir: Path, cfg: Config) -> None:
    """Keep config.yaml truthful when a resume raises the budget (only the keys a resume may change)."""
    path = run_dir / "config.yaml"
    saved = yaml.safe_load(path.read_text()) or {}
    train = saved.setdefault("train", {})
    changed = False
    for key in ("total_steps", "checkpoint_every", "gate_users", "gate_alpha", "gate_search_users"):
        value = getattr(cfg.train, key)
        if train.get(key) != value:
            train[key] = value
            changed = True
    if changed:
        atomic_write_text(path, yaml.safe_dump(saved, sort_keys=False))


def _truncate_metrics(path: Path, timesteps: int) -> None:
    """Drop the lines of rollouts after the checkpoint (they are about to be redone)."""
    rows = [r for r in read_jsonl(path) if r["timesteps"] <= timesteps]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _usage_so_far(run_dir: Path, state: dict) -> dict:
    """LLM usage of earlier sessions: usage.json (kept current every rollout, so it also counts the calls of
    rollouts a crash threw away: they were paid for) or, failing that, the checkpoint's own record."""
    path = run_dir / "usage.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["llm"]
        except (ValueError, KeyError):
            pass
    return state.get("usage") or {}


def plot_learning_curve(run_dir: Path) -> Optional[Path]:
    """learning_curve.png: mean reward and raw NDCG per rollout, and each agent's entropy (share of its maximum)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["timesteps"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["mean_ndcg"] for r in rows], marker="o", label="NDCG@k (policy)")
    ax1.plot(steps, [r["mean_taskwise_ndcg"] for r in rows], linestyle="--", label="task-wise prompt, same users")
    ax1.plot(steps, [r["mean_reward"] for r in rows], marker=".", label="reward")
    ax1.set_xlabel("environment steps")
    ax1.set_title("per-rollout means")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for p in PATTERNS:
        n_actions = len(rows[0]["mean_probs"][p])
        max_entropy = math.log(n_actions) if n_actions > 1 else 1.0
        ax2.plot(steps, [r["entropy"][p] / max_entropy for r in rows], marker=".", label=p)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("environment steps")
    ax2.set_title("agent entropy / max entropy")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
