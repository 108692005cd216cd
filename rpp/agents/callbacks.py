"""SB3 callbacks of a training run: per-rollout metrics (per-agent distributions included), a progress bar, and
resumable checkpoints at rollout boundaries. They observe SB3's loop; none of them changes what it computes."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

from rpp.agents.checkpoints import rng_states, save_checkpoint, write_json
from rpp.agents.policy import PATTERNS, distribution_stats
from rpp.llm.base import Usage


class RolloutMetrics(BaseCallback):
    """One line per rollout in metrics.jsonl and the same numbers in the SB3 logger (TensorBoard):
    mean reward, mean raw NDCG (and the task-wise baseline it is compared with), ranker failures, each agent's
    entropy, probability of its most likely action and mean action distribution over the rollout's observations,
    LLM calls, cache hits and calls per second. Also keeps usage.json current and a tqdm bar live."""

    def __init__(self, run_dir: Path, ranker, action_ids: dict[str, list[str]], total_timesteps: int,
                 usage_before: Optional[dict] = None, progress: bool = True, refiner=None):
        super().__init__()
        self.refiner = refiner
        """RPP+: the step core's refiner; each rollout's row then has its rewrite counts."""
        self._refiner_mark = refiner.stats() if refiner is not None else None
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.ranker = ranker
        self.action_ids = action_ids
        self.total_timesteps = total_timesteps
        self.usage_before = Usage(**usage_before) if usage_before else Usage()
        """Usage of earlier sessions of this run (restored on resume)."""
        self.progress = progress
        self.bar: Optional[tqdm] = None
        self.last: dict = {}
        self._usage_mark = ranker.usage.snapshot()
        """Usage at the end of the previous rollout (at construction: so the first rollout also counts the
        task-wise baselines of the initial reset, which SB3 does before the first rollout starts)."""

    # totals over every session of the run
    def usage_total(self) -> Usage:
        total = Usage(**self.usage_before.to_dict())
        total.add(self.ranker.usage.snapshot())
        return total

    def usage_record(self, timesteps: int) -> dict:
        """What usage.json holds: LLM usage over every session of the run, the timestep count, and for RPP+ runs
        the refiner's counts of this session (process)."""
        record = {"llm": self.usage_total().to_dict(), "timesteps": int(timesteps),
                  "failures_this_session": self.ranker.usage.failures.to_dict()}
        if self.refiner is not None:
            record["refiner_this_session"] = self.refiner.stats()
        return record

    def _on_training_start(self) -> None:
        if self.progress:
            self.bar = tqdm(total=self.total_timesteps, initial=self.num_timesteps, unit="step", desc="train",
                            dynamic_ncols=True)

    def _on_rollout_start(self) -> None:
        self._rewards, self._ndcg, self._baseline, self._failed = [], [], [], 0
        self._failed_baselines = 0
        self._t0 = time.perf_counter()

    def _on_step(self) -> bool:
        self._rewards.extend(np.asarray(self.locals["rewards"], dtype=np.float64).tolist())
        for info in self.locals["infos"]:
            self._ndcg.append(float(info["ndcg"]))
            if info["baseline"] is not None:
                self._baseline.append(float(info["baseline"]))
            self._failed += int(info.get("ranker_failed", False))
            self._failed_baselines += int(info.get("baseline_failed", False))
        if self.bar is not None:
            self.bar.update(self.training_env.num_envs)
        return True

    def _on_rollout_end(self) -> None:
        wall = time.perf_counter() - self._t0
        now = self.ranker.usage.snapshot()
        calls, hits = now.calls - self._usage_mark.calls, now.cache_hits - self._usage_mark.cache_hits
        self._usage_mark = now
        buffer = self.model.rollout_buffer
        obs = buffer.observations.reshape(-1, *buffer.observations.shape[2:])
        stats = distribution_stats(self.model.policy.agent_probs(obs))
        row = {
            "rollout": self.num_timesteps // (buffer.buffer_size * buffer.n_envs),
            "timesteps": int(self.num_timesteps),
            "mean_reward": float(np.mean(self._rewards)),
            "mean_ndcg": float(np.mean(self._ndcg)),
            "mean_taskwise_ndcg": float(np.mean(self._baseline)) if self._baseline else float("nan"),
            "failed_baselines": self._failed_baselines,
            "ranker_failures": self._failed,
            "entropy": {p: stats[p]["entropy"] for p in PATTERNS},
            "p_argmax": {p: stats[p]["p_argmax"] for p in PATTERNS},
            "mean_probs": {p: dict(zip(self.action_ids[p], stats[p]["mean_probs"])) for p in PATTERNS},
            "llm_calls": calls,
            "cache_hits": hits,
            "calls_per_s": calls / wall if wall > 0 else 0.0,
            "wall_s": wall,
        }
        if self.refiner is not None:
            row["refiner"] = self._refiner_delta()
        self.last = row
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log = self.logger
        log.record("rollout/mean_reward", row["mean_reward"])
        log.record("rollout/mean_ndcg", row["mean_ndcg"])
        log.record("rollout/mean_taskwise_ndcg", row["mean_taskwise_ndcg"])
        log.record("rollout/ranker_failures", row["ranker_failures"])
        for p in PATTERNS:
            log.record(f"agents/{p}/entropy", stats[p]["entropy"])
            log.record(f"agents/{p}/p_argmax", stats[p]["p_argmax"])
            for aid, prob in row["mean_probs"][p].items():
                log.record(f"agents/{p}/prob/{aid}", prob)
        log.record("llm/calls", calls)
        log.record("llm/cache_hits", hits)
        log.record("llm/calls_per_s", row["calls_per_s"])
        if self.refiner is not None:
            r = row["refiner"]
            log.record("refiner/acceptance_rate", r["accepted"] / r["sentences"] if r["sentences"] else 0.0)
            log.record("refiner/generation_requests", r["requests"])
        write_json(self.run_dir / "usage.json", self.usage_record(self.num_timesteps))
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{row['mean_reward']:+.4f}", ndcg=f"{row['mean_ndcg']:.3f}",
                                 calls_s=f"{row['calls_per_s']:.2f}")

    def _refiner_delta(self) -> dict:
        """This rollout's rewrite counts (the refiner keeps running totals)."""
        now = self.refiner.stats()
        before = self._refiner_mark
        self._refiner_mark = now
        delta = {k: now[k] - before[k] for k in ("sentences", "accepted", "requests", "cache_hits")}
        delta["rejected_by_reason"] = {k: v - before["rejected_by_reason"].get(k, 0)
                                       for k, v in now["rejected_by_reason"].items()
                                       if v - before["rejected_by_reason"].get(k, 0)}
        return delta

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ResumableCheckpoint(BaseCallback):
    """Saves a resumable checkpoint every `every` rollouts, at the START of the next rollout: SB3 has trained on
    the previous rollout, the VecEnv has just auto-reset a fresh block of users (rollouts are whole episodes), and
    nothing of the next rollout has been sampled yet. `extra_state()` adds what SB3 does not save (user-stream
    state, usage so far). `save_now()` writes the final checkpoint after learn()."""

    def __init__(self, run_dir: Path, steps_per_rollout: int, every: int, extra_state: Callable[[], dict],
                 resumed_at: int = -1):
        super().__init__()
        self.run_dir = run_dir
        self.steps_per_rollout = steps_per_rollout
        self.every = every
        self.extra_state = extra_state
        self.last_saved = resumed_at
        """Rollout count of the newest checkpoint on disk (the one we resumed from, or -1)."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        rollouts = self.model.num_timesteps // self.steps_per_rollout
        if rollouts > 0 and rollouts % self.every == 0 and rollouts != self.last_saved:
            self.save_now()

    def save_now(self) -> Path | None:
        timesteps = int(self.model.num_timesteps)
        rollouts = timesteps // self.steps_per_rollout
        if rollouts == self.last_saved:
            return None
        if timesteps % self.steps_per_rollout:
            raise RuntimeError(f"checkpoint requested mid-rollout (num_timesteps={timesteps}, "
                               f"{self.steps_per_rollout} steps per rollout): it could not be resumed exactly")
        state = {"num_timesteps": timesteps, "rollouts": rollouts, "rng": rng_states(),
                 **self.extra_state()}
        path = save_checkpoint(self.run_dir, self.model, state, rollouts)
        self.last_saved = rollouts
        return path


class EntropySchedule(BaseCallback):
    """Anneal PPO's/A2C's entropy coefficient linearly from `start` to `end` over the run (SB3 reads
    ``model.ent_coef`` at each update; it has no schedule of its own for it). Broad exploration early is what lets
    the agents find actions that pay only for some users; a small coefficient late lets them commit."""

    def __init__(self, start: float, end: float, total_timesteps: int):
        super().__init__()
        self.start, self.end, self.total = float(start), float(end), max(1, int(total_timesteps))

    def value(self, timesteps: int) -> float:
        frac = min(1.0, timesteps / self.total)
        return self.start + (self.end - self.start) * frac

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        # the update that follows this rollout uses the coefficient for the progress made so far
        self.model.ent_coef = self.value(self.num_timesteps)
        self.logger.record("train/ent_coef_scheduled", self.model.ent_coef)
