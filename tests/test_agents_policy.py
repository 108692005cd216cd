"""The four-agent SB3 policy on a small synthetic env with the real observation/action structure (no LLM)."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from rpp.agents.policy import PATTERNS, FourAgentPolicy, PolicySpaceError, distribution_stats
C = 3  # state row + two user rows: the policy takes any number of user rows (the environment has one)

pytestmark = pytest.mark.usefixtures("one_thread")

K, D = 5, 16
NVEC = [3, 2, 4, 2]


class TasteEnv(gym.Env):
    """Synthetic stand-in for the prompt env: row 0 carries the user's type, rows C.. candidate-like vectors that
    the 'ranking' reorders by the chosen format; the reward depends on the observation AND the action."""

    def __init__(self):
        self.observation_space = spaces.Box(-1.0, 1.0, (C + K, D), np.float32)
        self.action_space = spaces.MultiDiscrete(NVEC)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.user = int(self.np_random.integers(3))
        self.cands = self.np_random.uniform(-1, 1, (K, D)).astype(np.float32)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        obs = np.zeros((C + K, D), np.float32)
        obs[0, self.user] = 1.0
        obs[C:] = self.cands
        return obs

    def step(self, action):
        self.t += 1
        reward = float(action[0] == self.user) + 0.5 * float(action[2] == (self.user + 1) % 4)
        if action[3] == 1:
            self.cands = self.cands[::-1].copy()
        return self._obs(), reward, False, self.t >= 2, {}


def make_vec(n=4, seed=0):
    env = DummyVecEnv([TasteEnv for _ in range(n)])
    env.seed(seed)
    return env


def make_policy(hidden=8):
    obs_space = spaces.Box(-1.0, 1.0, (C + K, D), np.float32)
    return FourAgentPolicy(obs_space, spaces.MultiDiscrete(NVEC), lambda _: 1e-3, hidden_size=hidden,
                           context_rows=C)


def random_obs(n, seed=0):
    return th.as_tensor(np.random.default_rng(seed).uniform(-1, 1, (n, C + K, D)).astype(np.float32))


def test_four_separately_parameterized_agents():
    th.manual_seed(0)
    policy = make_policy()
    extractor = policy.mlp_extractor
    assert len(extractor.agents) == 4 and len(policy.action_net.heads) == 4
    grus = [a.ranking.gru for a in extractor.agents]
    assert all(isinstance(g, th.nn.GRU) for g in grus)
    assert [h.out_features for h in policy.action_net.heads] == NVEC
    # no actor parameter is shared between agents, nor with the critic
    owners = [set(map(id, agent.parameters())) | set(map(id, head.parameters()))
              for agent, head in zip(extractor.agents, policy.action_net.heads)]
    critic = set(map(id, extractor.critic.parameters())) | set(map(id, policy.value_net.parameters()))
    for i in range(4):
        assert not owners[i] & critic
        for j in range(i + 1, 4):
            assert not owners[i] & owners[j]
    # every parameter belongs to exactly one agent or the critic, and the optimizer holds them all
    all_params = set(map(id, policy.parameters()))
    assert all_params == set().union(*owners) | critic
    assert set(map(id, (p for g in policy.optimizer.param_groups for p in g["params"]))) == all_params


@pytest.mark.parametrize("agent", range(4))
def test_changing_one_agent_changes_only_its_logits(agent):
    th.manual_seed(1)
    policy = make_policy()
    obs = random_obs(6)
    with th.no_grad():
        before = [lg.clone() for lg in policy.agent_logits(obs)]
        for p in policy.mlp_extractor.agents[agent].ranking.gru.parameters():  # the agent's own GRU
            p.add_(0.3 * th.randn_like(p))
        after_gru = policy.agent_logits(obs)
        policy.action_net.heads[agent].weight.add_(0.5)  # and its own head
        after_head = policy.agent_logits(obs)
    for i in range(4):
        for after in (after_gru, after_head):
            if i == agent:
                assert not th.allclose(before[i], after[i])
            else:
                assert th.equal(before[i], after[i])


def test_gradients_reach_each_agents_gru_only_from_its_own_loss():
    th.manual_seed(2)
    policy = make_policy()
    logits = policy.agent_logits(random_obs(4))
    logits[2].logsumexp(-1).sum().backward()
    for i, agent in enumerate(policy.mlp_extractor.agents):
        grads = [p.grad for p in agent.ranking.gru.parameters()]
        if i == 2:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_users_in_a_batch_do_not_mix():
    th.manual_seed(3)
    policy = make_policy()
    obs = random_obs(3)
    with th.no_grad():
        ref = policy.agent_logits(obs)
        obs2 = obs.clone()
        obs2[1] = -obs2[1]  # another user's observation changes
        out = policy.agent_logits(obs2)
        values = policy.predict_values(obs), policy.predict_values(obs2)
    for a, b in zip(ref, out):
        assert th.equal(a[0], b[0]) and th.equal(a[2], b[2]) and not th.allclose(a[1], b[1])
    assert th.equal(values[0][0], values[1][0])


def test_ranking_order_matters_to_the_agents():
    """The GRU reads the ranking as a sequence: reordering the candidates changes the agents' logits."""
    th.manual_seed(4)
    policy = make_policy()
    obs = random_obs(2)
    flipped = obs.clone()
    flipped[:, C:] = obs[:, C:].flip(1)
    with th.no_grad():
        assert not th.allclose(policy.agent_logits(obs)[0], policy.agent_logits(flipped)[0])


def test_user_rows_reach_every_agent_and_the_critic():
    """Rows 1..C-1 (the user's features) feed each agent's own user encoder: changing them changes all four
    agents' logits and the value, while the state and ranking rows stay the same."""
    th.manual_seed(5)
    policy = make_policy()
    obs = random_obs(2)
    other_user = obs.clone()
    other_user[:, 1:C] = -other_user[:, 1:C]
    with th.no_grad():
        for a, b in zip(policy.agent_logits(obs), policy.agent_logits(other_user)):
            assert not th.allclose(a, b)
        assert not th.allclose(policy.predict_values(obs), policy.predict_values(other_user))


def test_unsupported_spaces_are_rejected_clearly():
    box = spaces.Box(-1.0, 1.0, (C + K, D), np.float32)
    with pytest.raises(PolicySpaceError, match="MultiDiscrete"):
        FourAgentPolicy(box, spaces.MultiDiscrete([2, 2, 2]), lambda _: 1e-3)
    with pytest.raises(PolicySpaceError, match="shape"):
        FourAgentPolicy(spaces.Box(-1, 1, (D,), np.float32), spaces.MultiDiscrete(NVEC), lambda _: 1e-3)


def _mean_probs(policy, obs):
    return [p.mean(0) for p in policy.agent_probs(obs)]


@pytest.mark.parametrize("algo", [PPO, A2C])
def test_sb3_trains_the_four_agents(algo):
    """Both algorithms train the policy: the role agent learns the user-dependent best action of the synthetic
    reward, and every agent's distribution moves."""
    env = make_vec()
    kwargs = dict(n_steps=4, learning_rate=3e-3, seed=0, policy_kwargs=dict(hidden_size=16, context_rows=C), verbose=0)
    if algo is PPO:
        kwargs.update(batch_size=16, n_epochs=4)
    model = algo(FourAgentPolicy, env, **kwargs)
    probe = np.zeros((3, C + K, D), np.float32)
    probe[[0, 1, 2], 0, [0, 1, 2]] = 1.0
    before = model.policy.agent_probs(probe)
    model.learn(600 if algo is PPO else 800)
    after = model.policy.agent_probs(probe)
    assert all(not np.allclose(b, a, atol=1e-3) for b, a in zip(before, after))
    role_after = after[0]
    # the best role for user type u is action u; it must have gained probability for each user type
    for u in range(3):
        assert role_after[u, u] > before[0][u, u] + 0.05, (u, before[0][u], role_after[u])


def test_distribution_stats():
    probs = [np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]), np.array([[0.5, 0.5]] * 2),
             np.array([[0.25] * 4] * 2), np.array([[0.9, 0.1]] * 2)]
    stats = distribution_stats(probs)
    assert set(stats) == set(PATTERNS)
    assert stats["role"]["entropy"] == pytest.approx(np.log(3) / 2, abs=1e-6)
    assert stats["role"]["p_argmax"] == pytest.approx((1 + 1 / 3) / 2)
    assert stats["history"]["entropy"] == pytest.approx(np.log(2)) == pytest.approx(stats["history"]["max_entropy"])
    assert stats["format"]["argmax_share"] == [1.0, 0.0]
