"""Evidence pooling beside PPO (rpp.agents.evidence): the reward model, its alignment with SB3's rollout buffer,
and exact resume with the pooled samples."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv
from test_agents_train import PromptHashRanker, tiny_cfg

from rpp.agents.evidence import EvidenceModel, EvidencePPO, JointEvidenceModel
from rpp.agents.policy import FourAgentPolicy
from rpp.config import ConfigError, EvidenceConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_groups(n: int, rng: np.random.Generator, best=(0, 2)):
    """Feature 0 is +1 (group 0) or -1 (group 1); agent 0 earns 0.3 for its group's best action, plus noise."""
    x = np.zeros((n, 4), dtype=np.float32)
    group = rng.integers(0, 2, n)
    x[:, 0] = np.where(group == 0, 1.0, -1.0)
    x[:, 1:] = rng.uniform(-1, 1, (n, 3))  # irrelevant features
    actions = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], axis=1)
    rewards = 0.3 * (actions[:, 0] == np.asarray(best)[group]) + 0.05 * rng.standard_normal(n)
    return x, actions, rewards


def test_the_model_finds_each_groups_best_action_and_starts_from_the_prior():
    rng = np.random.default_rng(0)
    model = EvidenceModel([3, 2], dim=4, prior_sd=0.1, noise_sd=0.1, draws=256)
    probe = np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]], dtype=np.float32)
    before = model.choice_probs(probe, rng)[0]
    assert np.allclose(before.sum(axis=1), 1) and before.min() > 0.2  # no evidence: every action is tried
    model.add(*_two_groups(300, rng))
    after = model.choice_probs(probe, rng)
    assert after[0][0].argmax() == 0 and after[0][1].argmax() == 2, after[0]
    assert after[0][0, 0] > 0.9 and after[0][1, 2] > 0.9


def test_the_joint_model_finds_each_groups_best_action_too():
    rng = np.random.default_rng(0)
    model = JointEvidenceModel([3, 2], dim=4, prior_sd=0.1, noise_sd=0.1, draws=256)
    model.add(*_two_groups(300, rng))
    probe = np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]], dtype=np.float32)
    after = model.choice_probs(probe, rng)
    assert after[0][0, 0] > 0.9 and after[0][1, 2] > 0.9, after[0]
    assert np.allclose(after[1].sum(axis=1), 1)


def _confounded(n: int, rng: np.random.Generator):
    """Agent 0's action 1 earns 0.2, agent 1's action 0 earns 0.05; agent 1 copies agent 0 in 90% of the samples
    (as partners that personalize together do), so agent 1's action 1 LOOKS better when its partner is ignored."""
    a0 = rng.integers(0, 2, n)
    a1 = np.where(rng.random(n) < 0.9, a0, 1 - a0)
    rewards = 0.2 * (a0 == 1) + 0.05 * (a1 == 0) + 0.02 * rng.standard_normal(n)
    return np.zeros((n, 2), dtype=np.float32), np.stack([a0, a1], axis=1), rewards


def test_the_joint_model_credits_each_agent_with_its_own_part_of_the_reward():
    """The reason for train.evidence.model: joint. With correlated partners the per-agent model gives agent 1 the
    credit of agent 0's choice; the joint model does not."""
    probe = np.zeros((1, 2), dtype=np.float32)
    picks = {}
    for cls in (EvidenceModel, JointEvidenceModel):
        rng = np.random.default_rng(1)
        model = cls([2, 2], dim=2, prior_sd=0.3, noise_sd=0.05, draws=256)
        model.add(*_confounded(400, rng))
        picks[cls.__name__] = [p[0] for p in model.choice_probs(probe, rng)]
    assert picks["JointEvidenceModel"][0][1] > 0.99 and picks["JointEvidenceModel"][1][0] > 0.9, picks
    assert picks["EvidenceModel"][1][1] > 0.9, picks  # the confounded answer, so the case does test the credit


def test_the_joint_model_keeps_only_the_columns_that_carry_features():
    rng = np.random.default_rng(2)
    model = JointEvidenceModel([3, 2], dim=6, prior_sd=0.1, noise_sd=0.1, draws=4)
    x, actions, rewards = _two_groups(50, rng)
    model.add(np.concatenate([x, np.zeros((50, 2), np.float32)], axis=1), actions, rewards)
    cols, mean, chol = model.posterior()
    assert list(cols) == [0, 1, 2, 3] and mean.shape == ((3 + 2) * 5,) and chol.shape == (25, 25)


def _rare_category(n: int, rng: np.random.Generator):
    """Columns 1-2: one-hot of two rare categories (4% of the samples each; the rest, the common category, has
    neither); columns 0 and 3: dense features. Agent 0's action 1 earns 0.15 for the rare categories, action 0
    earns 0.1 for everyone else."""
    category = rng.choice(3, n, p=[0.92, 0.04, 0.04])
    x = np.zeros((n, 4), dtype=np.float32)
    x[category == 1, 1] = 1.0
    x[category == 2, 2] = 1.0
    x[:, [0, 3]] = rng.uniform(-1, 1, (n, 2))
    actions = rng.integers(0, 2, (n, 1))
    rare = category > 0
    rewards = np.where(rare, 0.15 * (actions[:, 0] == 1), 0.1 * (actions[:, 0] == 0)) + 0.05 * rng.standard_normal(n)
    return x, actions, rewards


@pytest.mark.parametrize("cls", [EvidenceModel, JointEvidenceModel])
def test_the_category_prior_lets_a_rare_categorys_few_samples_show_its_own_best_action(cls):
    """The reason for train.evidence.category_prior_sd: with the tight prior of the dense columns the rare
    categories' ~8 samples each are shrunk into the majority's answer; with a wider prior on the one-hot columns
    they get their own."""
    probe = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32)
    picks = {}
    for category_sd in (None, 0.15):
        rng = np.random.default_rng(3)
        model = cls([2], dim=4, prior_sd=0.03, noise_sd=0.1, draws=512, category_columns=[1, 2],
                    category_prior_sd=category_sd)
        model.add(*_rare_category(200, rng))
        picks[category_sd] = model.choice_probs(probe, rng)[0]
    assert picks[0.15][:2, 1].min() > 0.8 and picks[0.15][2, 0] > 0.9, picks
    assert picks[None][:2, 1].max() < 0.5, picks  # without it the rare categories get the majority's action


def test_the_assumed_noise_decides_whether_one_unlucky_sample_rules_out_a_rare_categorys_action():
    """What experiments/evidence_bandit.py found behind the planted check's lost smallest group: each agent's model
    counts its partners' choices as noise, and one rare-genre sample whose partner chose wrong (reward -0.3 for the
    right action) is, under noise_sd 0.1, a 3-sigma verdict: Thompson sampling stops trying that action for the
    genre. With noise_sd 0.3, about the spread the partners' choices really add, the action keeps being tried."""
    rng = np.random.default_rng(0)
    x = np.zeros((150, 4), dtype=np.float32)
    x[:, [0, 3]] = rng.uniform(-1, 1, (150, 2))
    actions = rng.integers(0, 3, (150, 1))
    rewards = 0.1 * (actions[:, 0] == 2) + 0.05 * rng.standard_normal(150)  # the common category: action 2
    rare = np.array([[0, 1, 0, 0]], dtype=np.float32)
    p_action_0 = {}
    for noise_sd in (0.1, 0.3):
        model = EvidenceModel([3], dim=4, prior_sd=0.03, noise_sd=noise_sd, draws=4096, category_columns=[1, 2],
                              category_prior_sd=0.1)
        model.add(np.concatenate([x, rare]), np.concatenate([actions, [[0]]]), np.concatenate([rewards, [-0.3]]))
        p_action_0[noise_sd] = float(model.choice_probs(rare, np.random.default_rng(1))[0][0, 0])
        common = model.choice_probs(np.zeros((1, 4), dtype=np.float32), np.random.default_rng(1))[0][0]
        assert common.argmax() == 2, common  # the common category's best action is found either way
    assert p_action_0[0.1] < 0.02 and p_action_0[0.3] > 0.1, p_action_0


def test_category_columns_must_lie_in_the_row():
    with pytest.raises(ValueError, match="outside the feature row"):
        EvidenceModel([2], dim=4, prior_sd=0.03, noise_sd=0.1, draws=4, category_columns=[4], category_prior_sd=0.1)


def test_the_model_refuses_non_finite_rewards():
    model = EvidenceModel([3], dim=2, prior_sd=0.1, noise_sd=0.1, draws=8)
    with pytest.raises(ValueError, match="non-finite"):
        model.add(np.zeros((1, 2)), np.zeros((1, 1)), np.array([np.nan]))


class KnownRewardEnv(gym.Env):
    """Observation (3, 4): row 1 holds a per-episode user feature u in {-2..2} at slot 0; the reward of a step is
    10 * u + action[1], so every (row, action, reward) triple can be checked against its own row and action."""

    observation_space = spaces.Box(-10, 10, (3, 4), np.float32)
    action_space = spaces.MultiDiscrete([2, 3, 2, 2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.u = 0, int(self.np_random.integers(-2, 3))
        return self._obs(), {}

    def _obs(self):
        obs = np.zeros((3, 4), np.float32)
        obs[0, :] = self.np_random.uniform(-1, 1, 4)  # the step's own "state" row varies within an episode
        obs[1, 0] = self.u
        return obs

    def step(self, action):
        self.t += 1
        return self._obs(), float(10 * self.u + int(action[1])), self.t >= 2, False, {}


def test_pooled_samples_pair_each_observation_with_its_own_action_and_reward():
    """SB3 flattens the buffer's observations and actions env-major in place during the update but not its
    rewards; a pooled sample must still carry its own reward (a mix-up silently teaches the wrong actions)."""
    env = DummyVecEnv([KnownRewardEnv for _ in range(4)])
    env.seed(0)
    model = EvidencePPO(FourAgentPolicy, env, n_steps=4, batch_size=8, n_epochs=2, gamma=0.0, seed=0,
                        policy_kwargs=dict(hidden_size=8), evidence=EvidenceConfig(coef=1.0, epochs=2))
    model.learn(total_timesteps=48)
    ev = model.evidence
    assert len(ev) == 48
    np.testing.assert_allclose(ev.rewards, 10 * ev.x[:, 0] + ev.actions[:, 1])
    assert len(np.unique(ev.x[:, 0])) > 1 and len(np.unique(ev.actions[:, 1])) > 1  # the check can fail


def _pull_run(coef: float) -> float:
    env = DummyVecEnv([KnownRewardEnv for _ in range(4)])
    env.seed(1)
    model = EvidencePPO(FourAgentPolicy, env, n_steps=4, batch_size=16, n_epochs=1, gamma=0.0, seed=1,
                        learning_rate=3e-3, policy_kwargs=dict(hidden_size=8),
                        evidence=EvidenceConfig(coef=coef, epochs=20, prior_sd=1.0, noise_sd=0.5))
    model.learn(total_timesteps=96)
    obs = np.stack([KnownRewardEnv().reset(seed=s)[0] for s in range(16)])
    return float(model.policy.agent_probs(obs)[1][:, 2].mean())


def test_the_pull_moves_each_agent_toward_the_evidence():
    """Same seed, same PPO: with the evidence step the agent that matters comes to prefer the action the reward
    pays for (action 2 of agent 1) much more than PPO's own update makes it in the same budget."""
    plain, pooled = _pull_run(0.0), _pull_run(1.0)
    assert pooled > max(0.6, plain + 0.2), (plain, pooled)


def test_distill_on_all_pulls_earlier_rollouts_users_too(monkeypatch):
    """train.evidence.distill_on: all: each distillation step sees the rollout's observations plus as many of the
    earlier rollouts' (marked here in a slot the environment never fills), and the rollout joins them afterwards."""
    env = DummyVecEnv([KnownRewardEnv for _ in range(4)])
    env.seed(0)
    model = EvidencePPO(FourAgentPolicy, env, n_steps=4, batch_size=16, n_epochs=1, gamma=0.0, seed=0,
                        policy_kwargs=dict(hidden_size=8),
                        evidence=EvidenceConfig(coef=1.0, epochs=3, distill_on="all"))
    model.learn(total_timesteps=16)
    assert len(model.past_obs) == 16
    marked = model.past_obs.copy()
    marked[:, 1, 3] = 7.0
    model.past_obs = marked
    seen = []
    logits = model.policy.agent_logits
    monkeypatch.setattr(model.policy, "agent_logits", lambda obs: seen.append(obs.detach().clone()) or logits(obs))
    model.learn(total_timesteps=16, reset_num_timesteps=False)
    distilled = [o for o in seen if len(o) == 32]  # PPO's own minibatches hold 16
    assert len(distilled) == 3, [len(o) for o in seen]
    assert all(int((o[:, 1, 3] == 7.0).sum()) == 16 for o in distilled)
    assert len(model.past_obs) == 32


def test_explore_draws_the_rollouts_actions_from_the_actors_mixed_with_the_evidence(monkeypatch):
    """train.evidence.explore: 0.5: each agent's rollout action comes from 0.5 * actor + 0.5 * the evidence's
    choice probabilities, and the buffer holds THAT distribution's log-probability (PPO's ratio is then actor over
    behaviour); the policy samples from its actors again once the rollout is over."""
    env = DummyVecEnv([KnownRewardEnv for _ in range(4)])
    env.seed(0)
    model = EvidencePPO(FourAgentPolicy, env, n_steps=4, batch_size=16, n_epochs=1, gamma=0.0, seed=0,
                        policy_kwargs=dict(hidden_size=8),
                        evidence=EvidenceConfig(coef=1.0, epochs=1, explore=0.5, explore_beta=0.7))
    fixed = [np.full(n, 1 / n, dtype=np.float32) for n in (2, 3, 2, 2)]
    fixed[1] = np.array([0, 0, 1], dtype=np.float32)  # the evidence is sure: agent 1's action 2 for every user
    seen = {"betas": set()}

    def choice_probs(x, rng, beta=1.0):
        seen["betas"].add(beta)
        return [np.tile(f, (len(x), 1)) for f in fixed]

    monkeypatch.setattr(model.evidence, "choice_probs", choice_probs)

    class Capture(BaseCallback):
        def _on_step(self) -> bool:
            seen["behavior_set"] = self.model.policy.behavior is not None
            return True

        def _on_rollout_end(self) -> None:  # after the rollout, before the update changes the actors
            buf = self.model.rollout_buffer
            seen.update(actions=buf.actions.reshape(-1, 4).astype(int), log_probs=buf.log_probs.reshape(-1).copy(),
                        actor=self.model.policy.agent_probs(buf.observations.reshape(-1, 3, 4)))

    model.learn(total_timesteps=16, callback=Capture())
    actions, actor, rows = seen["actions"], seen["actor"], np.arange(16)
    behaviour = [0.5 * actor[i][rows, actions[:, i]] + 0.5 * fixed[i][actions[:, i]] for i in range(4)]
    np.testing.assert_allclose(seen["log_probs"], np.log(behaviour).sum(axis=0), rtol=1e-4)
    assert (actions[:, 1] == 2).mean() > actor[1][:, 2].mean() + 0.3, (actions[:, 1], actor[1][:, 2].mean())
    assert seen["behavior_set"] and model.policy.behavior is None
    assert 0.7 in seen["betas"]  # the rollout's draws use explore_beta (the distillation targets: beta 1)
    # deterministic actions (evaluation, serving) never use the behaviour
    assert model.policy.forward(th.zeros(2, 3, 4), deterministic=True)[0].shape == (2, 4)


def test_top_two_shares_give_the_runner_up_its_part():
    """_best_shares: the share of draws in which each action is best; with beta < 1, beta of that plus 1 - beta of
    the share in which it comes second (top-two sampling)."""
    from rpp.agents.evidence import _best_shares

    scores = np.array([[[3, 2, 1], [3, 1, 2], [1, 3, 2], [3, 2, 1]]], dtype=float)  # 1 row, 4 draws, 3 actions
    np.testing.assert_allclose(_best_shares(scores), [[0.75, 0.25, 0.0]])
    # seconds: action 1 in draws 0 and 3, action 2 in draws 1 and 2
    np.testing.assert_allclose(_best_shares(scores, 0.5), [[0.5 * 0.75, 0.5 * 0.25 + 0.5 * 0.5, 0.5 * 0.5]])
    assert _best_shares(scores, 0.5).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("distill_on,explore", [("rollout", 0.0), ("all", 0.0), ("rollout", 0.5)])
def test_resume_continues_with_the_same_evidence_and_parameters(tmp_path, distill_on, explore):
    from rpp.agents import train
    from rpp.agents.checkpoints import latest_checkpoint, load_state
    from rpp.agents.serving import load_algorithm

    evidence = ("train.evidence.coef=1", "train.evidence.epochs=3", f"train.evidence.distill_on={distill_on}",
                f"train.evidence.explore={explore}")
    ranker = PromptHashRanker()
    straight = train(tiny_cfg(tmp_path, "straight", "train.total_steps=16", *evidence), ranker=ranker,
                     progress=False)
    first = tiny_cfg(tmp_path, "resumed", "train.total_steps=8", *evidence)
    resumed = train(first, ranker=ranker, progress=False)
    longer = first.model_copy(deep=True)
    longer.train.total_steps = 16
    train(longer, resume=resumed, ranker=ranker, progress=False)

    states = [load_state(latest_checkpoint(run)) for run in (straight, resumed)]
    for key in ("x", "actions", "rewards"):
        assert len(states[0]["evidence"]["samples"][key]) == 16
        np.testing.assert_array_equal(states[0]["evidence"]["samples"][key], states[1]["evidence"]["samples"][key])
    # distill_on=all keeps every rollout's observations (and saves them); rollout keeps none
    past = [state["evidence"]["past_obs"] for state in states]
    assert len(past[0]) == (16 if distill_on == "all" else 0)
    np.testing.assert_array_equal(past[0], past[1])
    models = [load_algorithm(longer, latest_checkpoint(run)) for run in (straight, resumed)]
    assert all(isinstance(m, EvidencePPO) for m in models)
    # the dominant-genre one-hot of the user row reaches the model (and its saved zip) with its own prior
    columns = np.array(models[1].category_columns)
    assert len(columns) > 0 and len(models[1].evidence.prior_var) == models[1].evidence.dim + 1
    np.testing.assert_allclose(models[1].evidence.prior_var[1 + columns], longer.train.evidence.category_prior_sd ** 2)
    assert models[1].evidence.prior_var[0] == pytest.approx(longer.train.evidence.prior_sd ** 2)
    for (name, a), b in zip(models[0].policy.state_dict().items(), models[1].policy.state_dict().values()):
        assert th.equal(a, b), name


def test_explore_settings_that_would_do_nothing_are_refused():
    """explore and final_epochs need the evidence model (coef > 0), explore_beta needs explore: otherwise they
    would silently change nothing."""
    with pytest.raises(ConfigError, match="coef > 0"):
        load_config(None, ["train.evidence.explore=0.5"])
    with pytest.raises(ConfigError, match="final_epochs=5 distils"):
        load_config(None, ["train.evidence.final_epochs=5"])
    with pytest.raises(ConfigError, match="explore > 0"):
        load_config(None, ["train.evidence.coef=1", "train.evidence.explore_beta=0.5"])
    cfg = load_config(None, ["train.evidence.coef=1", "train.evidence.explore=0.5", "train.evidence.explore_beta=0.5"])
    assert cfg.train.evidence.explore_beta == 0.5


def test_evidence_pooling_is_refused_for_a2c():
    """train.evidence extends PPO's update; with A2C it would silently do nothing, so the config says so."""
    with pytest.raises(ConfigError, match="extends PPO"):
        load_config(None, ["train.algo=a2c", "train.evidence.coef=1"])
    assert load_config(None, ["train.algo=a2c"]).train.evidence.coef == 0


def test_final_distillation_makes_the_agents_serve_the_evidence_models_greedy_choice(monkeypatch):
    """train.evidence.final_epochs: after training, each actor is fit to the evidence model's greedy choice on
    every observation of the run (kept for it). The evidence here mildly prefers one action per agent; one pull
    step per update has not made the actors agree with it, the final step does."""
    env = DummyVecEnv([KnownRewardEnv for _ in range(4)])
    env.seed(0)
    model = EvidencePPO(FourAgentPolicy, env, n_steps=4, batch_size=16, n_epochs=1, gamma=0.0, seed=0,
                        learning_rate=3e-3, policy_kwargs=dict(hidden_size=8),
                        evidence=EvidenceConfig(coef=1.0, epochs=1, final_epochs=150))
    monkeypatch.setattr(model.evidence, "choice_probs", lambda x, rng, beta=1.0: [
        np.tile(np.eye(n)[(1 + i) % n] * 0.5 + 0.5 / n, (len(x), 1)) for i, n in enumerate(model.action_space.nvec)])
    model.learn(total_timesteps=32)
    assert len(model.past_obs) == 32  # kept for the final step although distill_on is rollout
    want = [(1 + i) % n for i, n in enumerate(model.action_space.nvec)]
    obs = model.past_obs.astype(np.float32)
    before = [p.argmax(1) for p in model.policy.agent_probs(obs)]
    assert not all((b == w).all() for b, w in zip(before, want)), before
    agreement = model.final_distill()
    after = [p.argmax(1) for p in model.policy.agent_probs(obs)]
    assert agreement == 1.0 and all((a == w).all() for a, w in zip(after, want)), after
    assert model.final_distill() is None  # once per step count: a finished run is not distilled twice


def test_a_finished_run_is_distilled_once_and_the_checkpoint_says_when(tmp_path):
    """rpp.agents.train runs the final distillation when the budget is reached and saves the step it ran at, so
    that the saved agents are the distilled ones and a resume with no more steps does not distill again."""
    from rpp.agents import train
    from rpp.agents.checkpoints import latest_checkpoint, load_state
    from rpp.agents.serving import load_algorithm

    cfg = tiny_cfg(tmp_path, "final", "train.total_steps=16", "train.evidence.coef=1", "train.evidence.epochs=1",
                   "train.evidence.final_epochs=30")
    ranker = PromptHashRanker()
    run = train(cfg, ranker=ranker, progress=False)
    state = load_state(latest_checkpoint(run))
    assert state["evidence"]["final_distilled_at"] == 16 and len(state["evidence"]["past_obs"]) == 16
    saved = load_algorithm(cfg, latest_checkpoint(run)).policy.state_dict()
    train(cfg, resume=run, ranker=ranker, progress=False)  # nothing left to train: nothing changes
    again = load_algorithm(cfg, latest_checkpoint(run)).policy.state_dict()
    assert all(th.equal(a, b) for a, b in zip(saved.values(), again.values()))
