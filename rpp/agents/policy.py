"""The four prompt agents (role, history, reasoning, format) as ONE stable-baselines3 actor-critic policy.

Observation (from rpp.envs): a (C + K, D) float32 array with C = context_rows (2 in the environment): row 0 is the
state embedding (BERT encoding of the current prompt state), rows 1..C-1 describe the user (numeric features with
the episode step), rows C.. the embeddings of the candidates in the order of the LLM's last ranking.
Action: MultiDiscrete([n_role, n_history, n_reasoning, n_format]), one sentence id per agent.

Design (centralized training, decentralized execution, as in RPP):

- Each agent is its own network: a GRU that reads the ranking (rows C..) starting from a hidden state computed
  from the state embedding (row 0), an MLP on [state; final GRU state]; beside it a user encoder (an MLP over
  the user rows), and a linear actor head over both latents giving the logits of a categorical over that agent's
  action set. The user encoder is what lets an agent give different users different sentences: the state text
  alone hardly differs between users at the first step. No actor parameter is shared between agents, so an agent
  can be executed (and inspected) on its own: changing one agent's parameters changes only its own logits.
- The critic is centralized: one value function V(s) of the joint state (its own GRU + MLP over the whole
  observation), used only during training. All four agents receive the same per-user reward (one NDCG for the
  prompt they wrote together), so one team critic is the natural baseline for all four advantages.
- SB3 glue: ``mlp_extractor`` returns latent_pi = the concatenation of the four agents' latents (4 * h) and
  latent_vf = the critic's latent; ``action_net`` splits latent_pi back into the four chunks, applies each
  agent's head to its own chunk and concatenates the logits, which SB3's MultiCategoricalDistribution splits by
  nvec. The joint log-probability is the sum of the per-agent log-probabilities, so PPO's ratio is the product
  of the four agents' ratios (joint clipping) and the entropy bonus is the sum of the four entropies.
  Rollouts, advantages, clipping, optimisation, logging and save/load are SB3's.
- With ``user_layout`` (the thompson learner, rpp.agents.learner), each agent's logits are its Bayesian reward
  head's posterior-mean max-marginal over a fixed basis of the user row (the best predicted reward of a whole
  prompt with that action: main effects plus pairwise interactions), divided by PRIOR_TEMPERATURE, PLUS the neural actor's
  logits: the head is the agent's prior knowledge of which action pays for this user (updated by conjugate Bayes,
  not by gradients: a buffer), the neural part a residual that PPO trains. ``mlp_extractor`` appends the head's
  logits to latent_pi and ``action_net`` adds them to the heads' output.
"""
from __future__ import annotations

import itertools
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from rpp.prompts.actions import PATTERNS  # the agents, in action-vector order


class PolicySpaceError(ValueError):
    """The environment's spaces are not the ones the four-agent policy is built for."""


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space,
                 context_rows: int = 2) -> tuple[int, int, list[int]]:
    """Validate the spaces; return (K candidates, embedding dim D, nvec)."""
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 2:
        raise PolicySpaceError(
            f"the four-agent policy needs a Box observation of shape (C + K, D) (state row, user rows, K ranked "
            f"candidate rows); got {observation_space}")
    rows, dim = observation_space.shape
    if rows < context_rows + 1:
        raise PolicySpaceError(f"observation has {rows} row(s); need {context_rows} context rows (state, user) "
                               "plus at least one candidate row")
    if not isinstance(action_space, spaces.MultiDiscrete) or action_space.nvec.ndim != 1 \
            or len(action_space.nvec) != len(PATTERNS):
        raise PolicySpaceError(
            f"the four-agent policy needs MultiDiscrete([n_role, n_history, n_reasoning, n_format]); got {action_space}")
    nvec = [int(n) for n in action_space.nvec]
    if min(nvec) < 1:
        raise PolicySpaceError(f"every agent needs at least one action; got sizes {nvec}")
    return rows - context_rows, dim, nvec


ABLATIONS = ("state_row", "ranking_gru")
"""Encoder parts that train.ablate can switch off (ablations only)."""

PRIOR_TEMPERATURE = 0.02
"""Reward units per logit of the Bayesian head: a predicted NDCG gain of 0.02 over another action is one nat of
preference, 0.1 five nats. Small, so that the head's posterior mean decides the served action wherever it sees a
difference, and the neural residual only where it does not."""


class RankingEncoder(nn.Module):
    """State embedding + GRU over the ranked candidate embeddings -> a latent of width `hidden`.

    The GRU's initial hidden state is a projection of the state embedding, so the ranking is read in the context
    of the prompt state; the output combines both. Inputs are (B, D) and (B, K, D), batch first (no reshape ever
    mixes candidates of different users). `ablate` switches parts off: state_row (h0 = 0: the state text is not
    read), ranking_gru (the GRU's output replaced by h0: the ranking is not read)."""

    def __init__(self, embed_dim: int, hidden: int, ablate: tuple[str, ...] = ()):
        super().__init__()
        self.ablate = tuple(ablate)
        self.state_proj = nn.Linear(embed_dim, hidden)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True)
        self.out = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh())

    def forward(self, state: th.Tensor, ranking: th.Tensor) -> th.Tensor:
        h0 = th.tanh(self.state_proj(state))
        if "state_row" in self.ablate:
            h0 = th.zeros_like(h0)
        if "ranking_gru" in self.ablate:
            return self.out(th.cat([h0, h0], dim=-1))
        _, h_last = self.gru(ranking, h0.unsqueeze(0).contiguous())
        return self.out(th.cat([h0, h_last[0]], dim=-1))


class UserBasis(nn.Module):
    """A fixed non-linear basis of the user row (rpp.envs.features.UserFeatures.layout): [1; one-hot of each
    categorical block (the slot that is on: standardized one-hots are > 0 exactly there); `bins` quantile-bin
    one-hots of each numeric slot; the share slots as they are]. The bin edges are buffers, fit once from the
    training users' rows (``fit``) and saved with the policy, so a user's basis never drifts."""

    def __init__(self, layout: dict, bins: int):
        super().__init__()
        self.categorical = [tuple(int(v) for v in block) for block in layout["categorical"]]
        self.numeric = [int(c) for c in layout["numeric"]]
        self.shares = [int(c) for c in layout["shares"]]
        self.bins = int(bins)
        self.register_buffer("edges", th.zeros(len(self.numeric), self.bins - 1))
        sizes = [1] + [b - a for a, b in self.categorical] + [self.bins] * len(self.numeric) + [len(self.shares)]
        self.blocks = np.cumsum([0] + sizes)
        """Start of each block in the basis: intercept, categorical blocks, numeric bins, shares."""
        self.dim = int(self.blocks[-1])

    def fit(self, rows: np.ndarray) -> None:
        """Bin edges: per numeric slot, the inner quantiles of the training users' values (rows [N, D])."""
        q = np.linspace(0, 1, self.bins + 1)[1:-1]
        edges = np.quantile(np.asarray(rows, dtype=np.float64)[:, self.numeric], q, axis=0).T  # [n_numeric, bins-1]
        self.edges.copy_(th.as_tensor(edges, dtype=th.float32))

    def forward(self, row: th.Tensor) -> th.Tensor:
        parts = [th.ones(len(row), 1, dtype=row.dtype, device=row.device)]
        for a, b in self.categorical:
            parts.append((row[:, a:b] > 0).to(row.dtype))
        for i, c in enumerate(self.numeric):
            idx = th.bucketize(row[:, c].contiguous(), self.edges[i].contiguous(), right=True)
            parts.append(th.nn.functional.one_hot(idx, self.bins).to(row.dtype))
        parts.append(row[:, self.shares])
        return th.cat(parts, dim=-1)


def agent_pairs(n_agents: int) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of agents whose joint choice the reward head models (every pair)."""
    return list(itertools.combinations(range(n_agents), 2))


def joint_scores(main: Sequence[th.Tensor], pair: Sequence[th.Tensor], nvec: Sequence[int]) -> th.Tensor:
    """The predicted reward of every whole prompt: main[i] [..., n_i] (agent i's action effects) and pair[p]
    [..., n_i * n_j] (the interaction of pair p = agent_pairs()[p], row-major over (a_i, a_j)) -> [..., n_0, ...,
    n_last], their sum at each combination of actions."""
    lead, n = main[0].shape[:-1], len(nvec)
    total = th.zeros(*lead, *nvec, dtype=main[0].dtype, device=main[0].device)
    for i, m in enumerate(main):
        shape = [1] * n
        shape[i] = nvec[i]
        total = total + m.reshape(*lead, *shape)
    for (i, j), q in zip(agent_pairs(n), pair, strict=True):
        shape = [1] * n
        shape[i], shape[j] = nvec[i], nvec[j]
        total = total + q.reshape(*lead, *shape)
    return total


def max_marginals(total: th.Tensor, n_agents: int) -> list[th.Tensor]:
    """Per agent i, [..., n_i]: the best whole-prompt score reachable with each of its actions (max over the
    others). The argmax of each agent's max-marginal is its action in the best whole prompt, so independent
    per-agent choices still serve the joint optimum."""
    lead = total.ndim - n_agents
    return [total.amax(dim=tuple(lead + k for k in range(n_agents) if k != i)) if n_agents > 1 else total
            for i in range(n_agents)]


class PosteriorHead(nn.Module):
    """The posterior-mean weights of the Bayesian reward head (buffers, set by the learner after each update;
    rpp.agents.learner) and the basis they apply to: [sum(nvec), basis] main effects of every (agent, action) and
    [sum(n_i * n_j), basis] interactions of every (agent pair, action pair). forward(user row) -> the concatenated
    per-agent prior logits: each action's max-marginal predicted reward (joint_scores, max_marginals) /
    PRIOR_TEMPERATURE, so that the agents' greedy choices together form the head's best whole prompt."""

    def __init__(self, layout: dict, bins: int, nvec: list[int]):
        super().__init__()
        self.basis = UserBasis(layout, bins)
        self.nvec = list(nvec)
        self.pairs = agent_pairs(len(self.nvec))
        self.pair_sizes = [self.nvec[i] * self.nvec[j] for i, j in self.pairs]
        self.register_buffer("weights", th.zeros(sum(self.nvec), self.basis.dim))
        self.register_buffer("pair_weights", th.zeros(sum(self.pair_sizes), self.basis.dim))

    def set_means(self, main: list[np.ndarray], pair: list[np.ndarray]) -> None:
        self.weights.copy_(th.as_tensor(np.concatenate(main), dtype=th.float32))
        self.pair_weights.copy_(th.as_tensor(np.concatenate(pair), dtype=th.float32))

    def forward(self, row: th.Tensor) -> th.Tensor:
        phi = self.basis(row)
        main = th.split(phi @ self.weights.T, self.nvec, dim=-1)
        pair = th.split(phi @ self.pair_weights.T, self.pair_sizes, dim=-1)
        return th.cat(max_marginals(joint_scores(main, pair, self.nvec), len(self.nvec)), -1) / PRIOR_TEMPERATURE


class AgentEncoder(nn.Module):
    """One agent's (or the critic's) latent: [RankingEncoder(state, ranking); MLP(user rows)], width 2 * hidden."""

    def __init__(self, embed_dim: int, hidden: int, user_rows: int, ablate: tuple[str, ...] = ()):
        super().__init__()
        self.ranking = RankingEncoder(embed_dim, hidden, ablate)
        self.user = nn.Sequential(nn.Linear(user_rows * embed_dim, hidden), nn.Tanh(),
                                  nn.Linear(hidden, hidden), nn.Tanh())

    def forward(self, state: th.Tensor, user: th.Tensor, ranking: th.Tensor) -> th.Tensor:
        return th.cat([self.ranking(state, ranking), self.user(user.flatten(1))], dim=-1)


class FourAgentExtractor(nn.Module):
    """SB3 ``mlp_extractor``: per-agent actor latents (concatenated) and the centralized critic latent."""

    def __init__(self, n_candidates: int, embed_dim: int, hidden: int, n_agents: int = len(PATTERNS),
                 context_rows: int = 2, ablate: tuple[str, ...] = (), head: "PosteriorHead | None" = None):
        super().__init__()
        self.context_rows = context_rows
        self.n_rows, self.embed_dim = context_rows + n_candidates, embed_dim
        self.agents = nn.ModuleList([AgentEncoder(embed_dim, hidden, context_rows - 1, ablate)
                                     for _ in range(n_agents)])
        self.critic = AgentEncoder(embed_dim, hidden, context_rows - 1, ablate)
        self.head = head
        self.latent_dim_pi = n_agents * 2 * hidden + (sum(head.nvec) if head is not None else 0)
        self.latent_dim_vf = 2 * hidden

    def _split(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        obs = features.reshape(features.shape[0], self.n_rows, self.embed_dim)
        return obs[:, 0], obs[:, 1:self.context_rows], obs[:, self.context_rows:]

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        parts = self._split(features)
        latents = [agent(*parts) for agent in self.agents]
        if self.head is not None:
            latents.append(self.head(parts[1][:, 0]))  # the prior logits, read off the user row
        return th.cat(latents, dim=-1)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        return self.critic(*self._split(features))


class PerAgentHeads(nn.Module):
    """SB3 ``action_net``: agent i's Linear head reads only chunk i of latent_pi; logits are concatenated in
    PATTERNS order (MultiCategoricalDistribution splits them by nvec). With `prior` the last sum(nvec) entries of
    latent_pi are the Bayesian head's prior logits, added to the Linear heads' output."""

    def __init__(self, hidden: int, nvec: list[int], prior: bool = False):
        super().__init__()
        self.hidden = hidden
        """Width of one agent's chunk of latent_pi."""
        self.heads = nn.ModuleList([nn.Linear(hidden, n) for n in nvec])
        self.prior = prior

    def forward(self, latent_pi: th.Tensor) -> th.Tensor:
        n = len(self.heads) * self.hidden
        chunks = th.split(latent_pi[:, :n], self.hidden, dim=-1)
        logits = th.cat([head(chunk) for head, chunk in zip(self.heads, chunks, strict=True)], dim=-1)
        return logits + latent_pi[:, n:] if self.prior else logits


class FourAgentPolicy(ActorCriticPolicy):
    """Four separately parameterized actors (one GRU encoder + head each) and one centralized critic.

    Extra keywords: ``hidden_size`` (width of each agent's GRU and MLPs, and of the critic), from
    cfg.train.hidden_size; ``context_rows`` (observation rows before the candidates; rpp.envs.core.CONTEXT_ROWS);
    ``ablate`` (cfg.train.ablate); ``user_layout`` and ``bins`` (the Bayesian reward head of the thompson learner:
    rpp.envs.features.UserFeatures.layout and cfg.train.posterior.bins; None: no head, the actors alone).
    ``net_arch`` is not used: the architecture is the one described in the module doc.
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule,
                 hidden_size: int = 64, context_rows: int = 2, ablate: Sequence[str] = (),
                 user_layout: dict | None = None, bins: int = 6, **kwargs: Any):
        self.context_rows = int(context_rows)
        self.n_candidates, self.embed_dim, self.nvec = check_spaces(observation_space, action_space,
                                                                    self.context_rows)
        self.hidden_size = int(hidden_size)
        unknown = set(ablate) - set(ABLATIONS)
        if unknown:
            raise PolicySpaceError(f"ablate: unknown part(s) {sorted(unknown)}; known: {', '.join(ABLATIONS)}")
        self.ablate = tuple(ablate)
        self.user_layout = user_layout
        self.bins = int(bins)
        kwargs.setdefault("features_extractor_class", FlattenExtractor)  # parameter-free; we reshape back to rows
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    behavior = None
    """Set by rpp.agents.learner.ThompsonPPO during its rollouts only: a callable obs -> (actions [B, n_agents],
    log-probabilities [B]) of whole prompts drawn by the behaviour policy (Thompson draws). None (and always for
    deterministic actions): SB3's forward, sampling from the actors."""

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """SB3's forward (actions, values, log-probabilities), or, while `behavior` is set, the behaviour policy's
        whole prompts with THEIR log-probability (the learner's off-policy correction needs it)."""
        if self.behavior is None or deterministic:
            return super().forward(obs, deterministic)
        latent_vf = self.mlp_extractor.forward_critic(self.extract_features(obs))
        actions, log_prob = self.behavior(obs)
        return actions, self.value_net(latent_vf), log_prob

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(hidden_size=self.hidden_size, context_rows=self.context_rows, ablate=list(self.ablate),
                    user_layout=self.user_layout, bins=self.bins)
        return data

    def _build(self, lr_schedule) -> None:
        # Mirrors ActorCriticPolicy._build with our extractor and per-agent heads (built before the optimizer,
        # so the optimizer owns exactly these parameters).
        head = PosteriorHead(self.user_layout, self.bins, self.nvec) if self.user_layout is not None else None
        self.mlp_extractor = FourAgentExtractor(self.n_candidates, self.embed_dim, self.hidden_size,
                                                context_rows=self.context_rows, ablate=self.ablate, head=head)
        self.action_net = PerAgentHeads(2 * self.hidden_size, self.nvec, prior=head is not None)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:  # SB3's gains: sqrt(2) hidden layers, 0.01 policy output, 1 value output
            for module, gain in ((self.mlp_extractor, np.sqrt(2)), (self.action_net, 0.01), (self.value_net, 1.0)):
                # (the reward head holds buffers only; init_weights touches Linear and Conv2d layers)
                module.apply(partial(self.init_weights, gain=gain))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    # ----- per-agent views (logging, tests, serving) -----

    def agent_logits(self, obs: th.Tensor | np.ndarray) -> list[th.Tensor]:
        """Logits of each agent's categorical, in PATTERNS order; obs (B, C+K, D) or (C+K, D)."""
        obs_t = self._as_tensor(obs)
        features = self.extract_features(obs_t, self.pi_features_extractor)
        logits = self.action_net(self.mlp_extractor.forward_actor(features))
        return list(th.split(logits, self.nvec, dim=-1))

    @property
    def head(self) -> "PosteriorHead | None":
        """The Bayesian reward head (thompson learner), or None."""
        return self.mlp_extractor.head

    def agent_probs(self, obs: th.Tensor | np.ndarray) -> list[np.ndarray]:
        """Each agent's action probabilities, (B, n_i) numpy arrays, without gradients."""
        with th.no_grad():
            return [th.softmax(lg, dim=-1).cpu().numpy() for lg in self.agent_logits(obs)]

    def _as_tensor(self, obs: th.Tensor | np.ndarray) -> th.Tensor:
        obs_t = th.as_tensor(obs, dtype=th.float32, device=self.device)
        if obs_t.ndim == 2:
            obs_t = obs_t.unsqueeze(0)
        return obs_t


def distribution_stats(probs: list[np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per-agent summary of a batch of action distributions: mean entropy (nats), mean probability of the most
    likely action, the mean distribution over the batch, and how often each action is the argmax."""
    out = {}
    for name, p in zip(PATTERNS, probs, strict=True):
        p = np.clip(p, 1e-12, 1.0)
        entropy = -(p * np.log(p)).sum(axis=1)
        argmax = p.argmax(axis=1)
        out[name] = {
            "entropy": float(entropy.mean()),
            "max_entropy": float(np.log(p.shape[1])),
            "p_argmax": float(p.max(axis=1).mean()),
            "mean_probs": [float(x) for x in p.mean(axis=0)],
            "argmax_share": [float(x) for x in np.bincount(argmax, minlength=p.shape[1]) / len(argmax)],
        }
    return out
