"""The thompson learner's parts (rpp.agents.learner, the reward head in rpp.agents.policy) and the gate
(rpp.agents.gate), on synthetic data: no LLM, no dataset."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv

from rpp.agents.gate import GatedPolicy, coordinate_ascent, lower_bound
from rpp.agents.learner import RewardPosterior, ThompsonPPO
from rpp.agents.policy import FourAgentPolicy, PosteriorHead, UserBasis
from rpp.config import PosteriorConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D, K = 12, 3
LAYOUT = {"categorical": [[0, 3]], "numeric": [3], "shares": [4, 5]}
"""A user row: a 3-way one-hot (slots 0-2), one numeric feature (slot 3), two share slots."""
NVEC = [3, 2, 2, 2]


def user_row(category: int, value: float) -> np.ndarray:
    row = np.full(D, -0.1, dtype=np.float32)
    row[category] = 0.5
    row[3] = value
    return row


def test_basis_one_hots_categories_and_bins_numeric_values():
    basis = UserBasis(LAYOUT, bins=3)
    rows = np.stack([user_row(c, v) for c in range(3) for v in np.linspace(-0.9, 0.9, 30)])
    basis.fit(rows)
    phi = basis(th.as_tensor(rows)).numpy()
    assert phi.shape == (len(rows), basis.dim) == (90, 1 + 3 + 3 + 2)
    assert (phi[:, 0] == 1).all()
    np.testing.assert_array_equal(phi[:, 1:4].argmax(1), np.repeat([0, 1, 2], 30))
    bins = phi[:, 4:7]
    assert (bins.sum(1) == 1).all() and np.bincount(bins.argmax(1)).tolist() == [30, 30, 30]
    # the middle third of the numeric feature is its own column: a middle bucket is expressible
    middle = (rows[:, 3] > -0.3) & (rows[:, 3] < 0.3)
    assert (bins[middle, 1] == 1).all() and (bins[~middle, 1] == 0).all()


def _posterior_data(rng, n, best_by_bin):
    """Users in 3 numeric bins; agent 0's best action is best_by_bin[bin] (reward 0.3 more), others irrelevant."""
    basis = UserBasis(LAYOUT, bins=3)
    values = rng.uniform(-0.9, 0.9, n)
    rows = np.stack([user_row(int(rng.integers(3)), v) for v in values])
    basis.fit(rows)
    phi = basis(th.as_tensor(rows)).numpy()
    actions = np.stack([rng.integers(0, n_a, n) for n_a in NVEC], 1)
    bins = phi[:, 4:7].argmax(1)
    rewards = 0.3 * (actions[:, 0] == np.asarray(best_by_bin)[bins]) + 0.05 * rng.standard_normal(n)
    return basis, phi, actions, rewards, bins


def _posterior(basis):
    return RewardPosterior(NVEC, basis.blocks, intercept_sd=0.3, block_sd=[0.01, 0.03, 0.1, 0.3], min_noise_sd=0.01,
                           draws=64)


def test_posterior_finds_a_middle_bucket_rule():
    rng = np.random.default_rng(0)
    basis, phi, actions, rewards, bins = _posterior_data(rng, 600, best_by_bin=[0, 1, 0])
    post = _posterior(basis)
    post.add(phi, actions, rewards)
    greedy = (phi @ post.means()[0][0].T).argmax(1)
    assert (greedy == np.array([0, 1, 0])[bins]).mean() > 0.97
    drawn, prob = post.thompson(phi[:50], rng)
    assert drawn.shape == (50, len(NVEC)) and ((drawn >= 0) & (drawn < NVEC)).all()
    assert ((prob > 0) & (prob <= 1)).all()
    assert (drawn[:, 0] == np.array([0, 1, 0])[bins[:50]]).mean() > 0.9  # the draws follow the evidence


def test_posterior_shrinks_toward_the_population_where_evidence_is_thin():
    """One action pays for everyone; a bin whose users have seen almost nothing still gets the population's best
    action (the intercept), not a guess from its own two samples."""
    rng = np.random.default_rng(1)
    basis, phi, actions, rewards, bins = _posterior_data(rng, 600, best_by_bin=[2, 2, 2])
    keep = (bins != 1) | (np.arange(len(bins)) < 20) & (bins == 1)
    keep &= ~((bins == 1) & (actions[:, 0] == 2))  # the thin bin never saw action 2
    post = _posterior(basis)
    post.add(phi[keep], actions[keep], rewards[keep])
    greedy = (phi @ post.means()[0][0].T).argmax(1)
    assert (greedy[bins == 1] == 2).mean() > 0.9


def test_empirical_bayes_widens_the_prior_of_the_feature_and_actions_that_matter_only():
    """The rule is on the numeric feature and makes action 0 or 1 of agent 0 best: their numeric block earns a wide
    prior; action 2, which no bin prefers, the categorical block and the shares stay at the smallest scale; with
    no rule at all every block stays there. The chosen scales maximize the evidence."""
    rng = np.random.default_rng(2)
    basis, phi, actions, rewards, _ = _posterior_data(rng, 600, best_by_bin=[0, 1, 0])
    post = _posterior(basis)
    post.add(phi, actions, rewards)
    post.posterior()
    categorical, numeric, shares = post.scales[0].T  # agent 0's main effects, per action
    assert all((s == 0.01).all() for s in post.scales[1:])
    assert numeric[:2].min() >= 0.1 and numeric[2] == 0.01
    assert (categorical == 0.01).all() and (shares == 0.01).all()
    sds = np.c_[np.full(NVEC[0], 0.3), post.scales[0]]  # per action: intercept, then the blocks
    stats = post._stats(actions[:, 0], NVEC[0], rewards)
    assert post.log_evidence(sds, stats) > post.log_evidence(np.full(4, 0.3), stats)
    loop = 0.0  # the batched evidence is the sum of each model's (Bishop 2006, eq. 3.86), each with its prior
    for block_sds, xtx, xtr, rtr, n in zip(sds, *stats):
        var, s2 = post.prior_var(block_sds), post.noise_sd ** 2
        precision = np.diag(1 / var) + xtx / s2
        mean = np.linalg.solve(precision, xtr / s2)
        loop -= 0.5 * (n * np.log(2 * np.pi * s2) + np.log(var).sum() + np.linalg.slogdet(precision)[1]
                       + rtr / s2 - mean @ precision @ mean)
    assert post.log_evidence(sds, stats) == pytest.approx(loop)
    assert (post.pair_scales[:, 1:] == 0.01).all()  # a rule on one agent: no pair's interaction is per user
    null = _posterior(basis)
    null.add(phi, actions, 0.2 * rng.standard_normal(len(phi)))
    null.posterior()
    assert all((s == 0.01).all() for s in null.scales) and (null.pair_scales == 0.01).all()


def test_the_head_estimates_the_reward_noise_from_its_residuals():
    """The same rule with reward noise sd 0.05 and about 0.30: the head's noise estimate follows each (a head that
    kept one assumed noise would be over-cautious on the first or over-confident on the second)."""
    rng = np.random.default_rng(5)
    basis, phi, actions, rewards, _ = _posterior_data(rng, 600, best_by_bin=[0, 1, 0])
    for extra_sd, low, high in ((0.0, 0.04, 0.065), (0.3, 0.25, 0.36)):
        post = _posterior(basis)
        post.add(phi, actions, rewards + extra_sd * rng.standard_normal(len(rewards)))
        post.posterior()
        assert low < post.noise_sd < high


def test_a_joint_rule_is_found_by_the_pairwise_interactions():
    """Agents 1 and 2 pay only together, with a pair of actions that depends on the user's category; the main
    effects alone see a seventh of it. Thompson draws over the pairwise head find each category's pair, and the
    head's per-agent max-marginals (what the served policy reads) give the pair to every user."""
    rng = np.random.default_rng(4)
    nvec = [3, 5, 7, 2]
    rows = np.stack([user_row(int(rng.integers(3)), rng.uniform(-0.9, 0.9)) for _ in range(768)])
    head = PosteriorHead(LAYOUT, 3, nvec)
    head.basis.fit(rows)
    phi = head.basis(th.as_tensor(rows)).numpy()
    category = rows[:, :3].argmax(1)
    best = np.array([[0, 3], [1, 4], [2, 5]])[category]
    post = RewardPosterior(nvec, head.basis.blocks, intercept_sd=0.3, block_sd=[0.01, 0.03, 0.1, 0.3],
                           min_noise_sd=0.01, draws=64, explore_sd=PosteriorConfig().explore_sd)
    for start in range(0, len(rows), 48):
        batch = slice(start, start + 48)
        drawn, _ = post.thompson(phi[batch], rng)
        paid = (drawn[:, 1] == best[batch, 0]) & (drawn[:, 2] == best[batch, 1])
        post.add(phi[batch], drawn, 0.3 * paid + 0.1 * rng.standard_normal(len(drawn)))
    assert post.pair_scales[3].max() > 0.01  # agents 1 and 2 (pair 3): their interactions earned a wider prior
    head.set_means(*post.means())
    logits = th.split(head(th.as_tensor(rows)), nvec, dim=-1)
    served = np.stack([lg.argmax(-1).numpy() for lg in logits[1:3]], 1)
    assert (served == best).all(1).mean() > 0.95


class BinEnv(gym.Env):
    """A one-step contextual bandit with the env's observation layout (state row, user row, K candidate rows):
    agent 0 must pick action 1 for users in the middle of the numeric feature, action 0 elsewhere. Steps whose
    info says ranker_failed pay a misleading reward of +1 for the WRONG action: a learner that pools them fails."""

    def __init__(self, fail_rate=0.0, seed=0):
        self.observation_space = spaces.Box(-1.0, 1.0, (2 + K, D), np.float32)
        self.action_space = spaces.MultiDiscrete(NVEC)
        self.rng = np.random.default_rng(seed)
        self.fail_rate = fail_rate

    def _obs(self):
        self.value = float(self.rng.uniform(-0.9, 0.9))
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        obs[1] = user_row(int(self.rng.integers(3)), self.value)
        return obs

    def best(self):
        return int(-0.3 < self.value < 0.3)

    def reset(self, *, seed=None, options=None):
        return self._obs(), {}

    def step(self, action):
        failed = self.rng.random() < self.fail_rate
        right = int(action[0]) == self.best()
        reward = (0.0 if right else 1.0) if failed else 0.3 * right + 0.05 * self.rng.standard_normal()
        return self._obs(), float(reward), True, False, {"ranker_failed": failed}


def make_learner(fail_rate=0.0, seed=0):
    env = DummyVecEnv([lambda i=i: BinEnv(fail_rate, seed + i) for i in range(4)])
    users = BinEnv(seed=99)
    rows = np.stack([users._obs()[1] for _ in range(200)])
    return ThompsonPPO(FourAgentPolicy, env, n_steps=8, batch_size=16, n_epochs=4, learning_rate=1e-3, gamma=0.0,
                       ent_coef=0.0, seed=seed, verbose=0, basis_rows=rows,
                       policy_kwargs=dict(hidden_size=8, user_layout=LAYOUT, bins=6))


def served_accuracy(model, n=200):
    env = BinEnv(seed=123)
    hits = []
    for _ in range(n):
        obs, _ = env.reset()
        action, _ = model.predict(obs, deterministic=True)
        hits.append(int(action[0]) == env.best())
    return float(np.mean(hits))


def test_the_learner_serves_a_middle_bucket_rule():
    model = make_learner().learn(640)
    assert len(model.reward_model) == 640
    assert served_accuracy(model) > 0.9


def test_failed_steps_are_dropped_from_every_estimate():
    """30% of steps fail and pay +1 for the wrong action: pooled as samples they would teach the wrong rule."""
    model = make_learner(fail_rate=0.3).learn(640)
    assert 0.2 * 640 < 640 - len(model.reward_model) < 0.4 * 640
    assert served_accuracy(model) > 0.9


def test_the_ppo_ratio_is_taken_against_the_policy_before_the_update():
    """Decoupled PPO: the first minibatch of an update sees ratio 1 (pi_theta = pi_prox), so its KL to pi_prox is
    0 whatever the behaviour policy was; the behaviour enters only through the truncated weight min(1, pi/b)."""
    model = make_learner()
    kls = []
    original = model.policy.evaluate_actions

    def spy(obs, actions):
        values, log_prob, entropy = original(obs, actions)
        kls.append(log_prob.detach())
        return values, log_prob, entropy

    model.policy.evaluate_actions = spy
    model.learn(32)
    prox, first = kls[0], kls[1]  # the proximal pass over the whole rollout, then the first minibatch
    assert len(prox) == 32 and len(first) == 16
    assert model.logger.name_to_value["train/is_weight"] <= 1.0
    rollout = model.rollout_buffer
    behaviour = th.as_tensor(rollout.log_probs.reshape(-1))
    assert not th.allclose(behaviour, prox, atol=1e-3)  # the behaviour policy is not the actor


def test_the_head_is_saved_and_a_loaded_policy_serves_the_same(tmp_path):
    model = make_learner().learn(320)
    model.save(tmp_path / "m.zip")
    loaded = ThompsonPPO.load(tmp_path / "m.zip")
    users = BinEnv(seed=5)
    obs = np.stack([users._obs() for _ in range(20)])
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    assert isinstance(loaded.policy.mlp_extractor.head, PosteriorHead)


def test_lower_bound_and_gated_policy():
    assert lower_bound(np.array([0.1] * 50 + [0.12] * 50), 0.05) > 0.09
    assert lower_bound(np.array([0.01, -0.01] * 50), 0.05) < 0
    assert lower_bound(np.array([0.5]), 0.05) == -np.inf

    class Fixed:
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.zeros((len(obs), 4), dtype=np.int64), None

    gated = GatedPolicy(Fixed(), {"served": "fixed", "fixed_indices": [2, 1, 0, 1]})
    np.testing.assert_array_equal(gated.predict(np.zeros((3, 5, 4)))[0], [[2, 1, 0, 1]] * 3)
    assert gated.served == "fixed"
    ungated = GatedPolicy(Fixed(), {"served": "policy", "fixed_indices": [2, 1, 0, 1]})
    np.testing.assert_array_equal(ungated.predict(np.zeros((3, 5, 4)))[0], np.zeros((3, 4)))
    assert GatedPolicy(Fixed(), None).served.startswith("policy")


def test_the_gate_searches_the_best_fixed_prompt_agent_by_agent():
    """The gate's reference: from the better start, every action of each agent in turn; failed users (nan) do not
    count against a prompt; 2 + sum(n - 1) prompts at most are scored."""
    values = {0: [0.0, 0.1, 0.3], 1: [0.0, 0.2], 2: [0.0, 0.05, 0.0, 0.15]}  # additive effects per agent

    def score(combo):
        user_values = np.full(10, sum(values[a][i] for a, i in enumerate(combo)))
        if combo == [2, 1, 0]:
            user_values[:5] = np.nan  # failed requests: judged on the answered users only
        return user_values

    calls = []
    best, tried = coordinate_ascent([[0, 0, 0], [1, 0, 1]], [3, 2, 4], lambda c: calls.append(c) or score(c))
    assert best == [2, 1, 3] and tried[(2, 1, 3)] == pytest.approx(0.65)
    assert len(calls) == len(set(map(tuple, calls))) <= 2 + (2 + 1 + 3)
    assert tried[(2, 1, 0)] == pytest.approx(0.5)


def test_the_best_whole_prompts_seen_in_training_are_gate_starts():
    """A joint effect (agents 0 and 1 pay only together) is invisible to per-agent means but not to whole prompts:
    best_seen ranks whole prompts by their mean reward, ignoring those tried fewer than min_samples times."""
    rng = np.random.default_rng(3)
    basis = UserBasis(LAYOUT, bins=3)
    actions = np.stack([rng.integers(0, n_a, 400) for n_a in NVEC], 1)
    rewards = 0.3 * ((actions[:, 0] == 2) & (actions[:, 1] == 1)) + 0.05 * rng.standard_normal(400)
    rewards = rewards[actions.any(1)]
    actions = actions[actions.any(1)]
    actions = np.concatenate([actions, [[0, 0, 0, 0]]])  # one lucky sample of a prompt tried once
    rewards = np.concatenate([rewards, [5.0]])
    post = _posterior(basis)
    post.add(np.ones((len(actions), basis.dim)), actions, rewards)
    seen = post.best_seen(3)
    assert len(seen) == 3 and all(s[:2] == [2, 1] for s in seen)
