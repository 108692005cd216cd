"""Training, evaluation and resume with the REAL SmolLM2 ranker (score mode, fp32, a throwaway response cache).

One small uninterrupted PPO run (4 users per step, T=2, 3 rollouts) is shared by the tests of this module; the
resume test repeats it in subprocesses (killed with SIGKILL mid-rollout, then resumed) against the same response
cache, so the repeat costs process start-up rather than LLM time.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch as th
from helpers import shuffled_target_rollouts
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

pytestmark = pytest.mark.llm

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("rollout", "timesteps", "mean_reward", "mean_ndcg", "mean_taskwise_ndcg", "entropy", "p_argmax",
            "mean_probs")


def overrides(tmp: Path, name: str) -> list[str]:
    return [
        f"name={name}", f"train.runs_dir={tmp / 'runs'}", f"llm.cache_path={tmp / 'responses.sqlite'}",
        "llm.dtype=float32", "llm.temperature=0",
        "data.n_train_users=4", "data.n_val_users=4", "data.n_test_users=4",
        "env.n_envs=4", "env.steps_per_episode=2", "train.n_steps=2", "train.batch_size=8", "train.n_epochs=4",
        "train.hidden_size=16", "train.learning_rate=0.003", "train.total_steps=24", "train.check_users=4",
        # PPO alone: the first test checks PPO's own promise on the real ranker's rewards (the default learner's
        # residual update is importance-weighted, tests/test_learner.py; its resume with a real server:
        # tests/test_faults.py)
        "train.learner=ppo",
    ]


class RolloutProbe(BaseCallback):
    """Keeps, for every rollout, the policy's parameters before its update and what the update learns from
    (observations, actions, advantages), and the parameters at the end of training."""

    def _on_training_start(self) -> None:
        self.rollouts: list[dict] = []

    def _on_rollout_end(self) -> None:  # after the advantages are computed, before train()
        buf = self.model.rollout_buffer
        self.rollouts.append({
            "params": {k: v.clone() for k, v in self.model.policy.state_dict().items()},
            "obs": buf.observations.reshape(-1, *buf.observations.shape[2:]).copy(),
            "actions": buf.actions.reshape(-1, buf.actions.shape[-1]).astype(int).copy(),
            "advantages": buf.advantages.reshape(-1).copy(),
        })

    def _on_training_end(self) -> None:
        self.final = {k: v.clone() for k, v in self.model.policy.state_dict().items()}

    def _on_step(self) -> bool:
        return True


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    from rpp.agents import train
    from rpp.config import load_config

    tmp = tmp_path_factory.mktemp("agents_llm")
    probe = RolloutProbe()
    run_dir = train(load_config(None, overrides(tmp, "full")), callbacks=[probe], progress=False)
    return tmp, run_dir, probe


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_moves_each_agent_toward_its_better_than_average_actions(llm_run):
    """What PPO promises on the rewards the real ranker gave: each update raises the probability of the actions
    that did better than the critic expected and lowers the others', for every agent. Measured as the change of
    each agent's own surrogate, mean(A_norm * (pi_new(a|s) / pi_old(a|s) - 1)), on the rollout the update learned
    from; a random or sign-flipped update would not make it positive for all four agents."""
    _, run_dir, probe = llm_run
    rows = metric_rows(run_dir)
    assert [r["timesteps"] for r in rows] == [8, 16, 24]
    assert all(r["ranker_failures"] == 0 for r in rows)
    from rpp.agents.checkpoints import latest_checkpoint

    final = PPO.load(latest_checkpoint(run_dir) / "model.zip").policy
    before, after = copy.deepcopy(final), copy.deepcopy(final)
    assert len(probe.rollouts) == 3
    gains = np.zeros((len(probe.rollouts), 4))
    for k, rollout in enumerate(probe.rollouts):
        after_params = probe.rollouts[k + 1]["params"] if k + 1 < len(probe.rollouts) else probe.final
        before.load_state_dict(rollout["params"])
        after.load_state_dict(after_params)
        adv = rollout["advantages"]
        assert adv.std() > 0, "no learning signal in this rollout"
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)  # as PPO normalizes them (one minibatch per rollout)
        rows_ = np.arange(len(adv))
        for i, (b, a) in enumerate(zip(before.agent_probs(rollout["obs"]), after.agent_probs(rollout["obs"]))):
            taken = rollout["actions"][:, i]
            gains[k, i] = np.mean(adv * (a[rows_, taken] / b[rows_, taken] - 1.0))
    for i, name in enumerate(("role", "history", "reasoning", "format")):
        assert gains[:, i].sum() > 0, f"PPO did not move the {name} agent toward its better actions: {gains[:, i]}"
    assert (gains.sum(axis=1) > 0).all(), gains  # and every update improves the team's surrogate
    ranker_check = json.loads((run_dir / "ranker_check.json").read_text())
    assert ranker_check["n_users"] == 4 and "clearly_above_random" in ranker_check


def test_evaluation_with_the_llm_and_target_shuffling(llm_run):
    """Greedy T-step evaluation next to the task-wise prompt; then, with every target moved to another slot,
    the same users get exactly the same actions, prompts and rankings (no label peeking)."""
    from rpp.agents import evaluate
    from rpp.agents.checkpoints import latest_checkpoint, load_run_config
    from rpp.agents.serving import load_algorithm
    from rpp.envs import StateEncoder, make_core
    from rpp.llm import make_ranker

    _, run_dir, _ = llm_run
    result = evaluate(run_dir, split="test", steps=2)
    assert result.n_users == 4 and result.steps == 2
    assert result.llm_requests_per_user == 2.0
    assert set(result.policy) == {"ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"}
    assert 0.0 <= result.paired["ndcg@10"].p_value <= 1.0
    table = result.table()
    assert "task-wise" in table and "ndcg@10" in table and "ranker check" in table
    saved = json.loads((run_dir / "eval-test-T2.json").read_text())
    assert saved["n_users"] == 4 and saved["ranker_check"]["n_users"] == 4
    prompts = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and all(p["steps"] == 2 and p["prompt"] and len(p["ranking"]) == 20 for p in prompts)

    cfg = load_run_config(run_dir)
    cfg.env.reward_baseline = "none"
    from rpp.agents.gate import GatedPolicy, read_gate

    policy = GatedPolicy(load_algorithm(cfg, latest_checkpoint(run_dir)).policy, read_gate(run_dir))  # as served
    ranker = make_ranker(cfg)
    core = make_core(cfg, "test", ranker=ranker, encoder=StateEncoder(cfg.encoder))
    a, b = shuffled_target_rollouts(policy, core, steps=2, seed=1)
    ranker.close()
    assert [r["actions"] for r in a] == [r["actions"] for r in b]
    assert [r["ranking"] for r in a] == [r["ranking"] for r in b]
    assert [r["target_rank"] for r in a] == [p["target_rank"] for p in prompts]  # evaluate() saw the same


KILLED_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from stable_baselines3.common.callbacks import BaseCallback
    from rpp.agents import train
    from rpp.config import load_config

    class KillMidRollout(BaseCallback):
        def _on_step(self):
            if self.model.num_timesteps == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
            return True

    train(load_config(None, sys.argv[2:]), callbacks=[KillMidRollout()], progress=False)
    raise SystemExit("not killed")
""")

RESUME_SCRIPT = textwrap.dedent("""
    import sys
    from rpp.agents import train
    train(None, resume=sys.argv[1], progress=False)
""")


def test_resume_after_sigkill_matches_the_uninterrupted_run(llm_run):
    tmp, full_dir, _ = llm_run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILLED_SCRIPT, "20", *overrides(tmp, "killed")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp / "runs" / "killed"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "rollout-000002"
    assert len(metric_rows(run_dir)) == 2  # killed in rollout 3, after the checkpoint at its start

    resumed = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(run_dir)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    full, again = metric_rows(full_dir), metric_rows(run_dir)
    assert len(full) == len(again) == 3
    for a, b in zip(full, again):
        for key in COMPARED:
            assert json.dumps(a[key]) == json.dumps(b[key]), (key, a[key], b[key])
    final_full = PPO.load(full_dir / "checkpoints" / "rollout-000003" / "model.zip")
    final_again = PPO.load(run_dir / "checkpoints" / "rollout-000003" / "model.zip")
    assert final_again.num_timesteps == final_full.num_timesteps == 24
    for (name, p), q in zip(final_full.policy.state_dict().items(), final_again.policy.state_dict().values()):
        assert th.equal(p, q), name
    opt_a, opt_b = final_full.policy.optimizer.state_dict(), final_again.policy.optimizer.state_dict()
    for key in opt_a["state"]:
        for field in ("exp_avg", "exp_avg_sq"):
            assert th.equal(opt_a["state"][key][field], opt_b["state"][key][field])
