"""The learner (train.learner: thompson): Thompson sampling over a Bayesian reward head, with decoupled PPO for the
agents' neural residual. docs/learner.md has the formulation, the references and what the planted check showed.

Why not PPO alone: PPO is on-policy, each sample feeds one clipped update and is thrown away, so the evidence about
a small group of users never accumulates; on the planted check it served the majority group and missed the rest.
A contextual bandit keeps every sample. This learner is one, inside the four actor-critic agents:

- **Reward head** (``RewardPosterior``; the policy's ``PosteriorHead``): per agent and action, a Bayesian linear
  regression of the step reward on a fixed non-linear basis of the user row (rpp.agents.policy.UserBasis: one-hots of
  the dominant genres, quantile bins of history length and rating statistics, the genre shares), fit by conjugate
  updates on every (user, action, reward) of the run. The intercept is the action's population effect; every other
  weight is a deviation shrunk toward 0 (a random effect per category or bin), so where a user's evidence is thin
  the head predicts the population's best action. Bins make it non-linear: it can carve a middle bucket of a
  feature. How wide each feature block's prior is, is chosen by empirical Bayes on all the run's samples (MacKay
  1992's evidence, per block: automatic relevance determination), so the features that define no group stay
  shrunk and do not add their noise to every user's prediction. Other agents' choices count as noise (the
  per-agent view every agent has of a shared reward).
- **Behaviour policy**: every rollout action is a Thompson draw (the share of posterior draws in which the action
  predicts the highest reward; Russo et al. 2018), so users whose evidence is thin are explored and users whose
  evidence is clear are not.
- **Served policy**: each agent's logits are the head's posterior mean / PRIOR_TEMPERATURE plus its neural actor
  (BERT state row, GRU over the ranking, user MLP; rpp.agents.policy). Greedy serving follows the head wherever
  it sees a difference; the residual can only add what the head cannot express.
- **Residual update**: decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"): the
  ratio and its clip are taken against the policy BEFORE the update (the proximal policy, pi_prox), and each
  sample is weighted by the truncated importance weight min(1, pi_prox / b) of the behaviour policy b (as V-trace
  truncates, Espeholt et al. 2018), so approx_kl and clip_fraction measure the update itself.
- **Failures**: a step whose ranking or baseline call failed (info["ranker_failed"], info["baseline_failed"])
  enters neither the head nor the PPO losses.

The head's samples and random state travel in the checkpoint, so a resumed run continues with the same evidence.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.utils import explained_variance

from rpp.config import PosteriorConfig


class RewardPosterior:
    """Bayesian linear reward models, one per (agent, action), over basis rows whose columns fall in `blocks`
    (UserBasis.blocks: the intercept column, then one block per feature).

    Prior: intercept ~ N(0, intercept_sd^2); every other weight ~ N(0, s_b^2) with one s_b per block, chosen from
    `block_sd` by empirical Bayes (type-II maximum likelihood: the marginal likelihood of all samples, summed over
    the agents and actions, which share the scales; coordinate ascent over the blocks from the smallest value);
    noise ~ N(0, noise_sd^2). The samples are kept (not only sufficient statistics) so a checkpoint can hold them and
    refit exactly; the scales are a function of the samples and are refit with them."""

    def __init__(self, nvec: list[int], blocks: list[int], intercept_sd: float, block_sd: list[float],
                 noise_sd: float, draws: int) -> None:
        self.nvec = [int(n) for n in nvec]
        self.blocks = [int(b) for b in blocks]
        if self.blocks[:2] != [0, 1]:
            raise ValueError("reward head: the basis must start with its intercept column (blocks 0, 1, ...)")
        self.dim = self.blocks[-1]
        self.intercept_sd, self.grid = float(intercept_sd), sorted(float(v) for v in block_sd)
        self.noise_sd, self.draws = float(noise_sd), int(draws)
        self.scales = np.full(len(self.blocks) - 2, self.grid[0])
        """The prior sd of each feature block's deviations (after the intercept), as last fit."""
        self.x = np.zeros((0, self.dim), dtype=np.float32)
        self.actions = np.zeros((0, len(self.nvec)), dtype=np.int64)
        self.rewards = np.zeros(0, dtype=np.float64)
        self._posterior: Optional[list[list[tuple[np.ndarray, np.ndarray]]]] = None

    def __len__(self) -> int:
        return len(self.rewards)

    def add(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        actions = np.asarray(actions, dtype=np.int64).reshape(len(x), len(self.nvec))
        rewards = np.asarray(rewards, dtype=np.float64).reshape(len(x))
        if not np.isfinite(rewards).all():
            raise ValueError("reward head: non-finite rewards")
        self.x = np.concatenate([self.x, x])
        self.actions = np.concatenate([self.actions, actions])
        self.rewards = np.concatenate([self.rewards, rewards])
        self._posterior = None

    def prior_var(self, scales: np.ndarray) -> np.ndarray:
        """Per basis column, the prior variance of its weight under these block scales."""
        sd = np.repeat(np.concatenate([[self.intercept_sd], scales]), np.diff(self.blocks))
        return sd ** 2

    def _stats(self) -> list[list[tuple[np.ndarray, np.ndarray, float, int]]]:
        """[agent][action] -> the sufficient statistics X'X, X'r, r'r and n of that action's samples."""
        x = self.x.astype(np.float64)
        out = []
        for i, n in enumerate(self.nvec):
            per_action = []
            for a in range(n):
                rows = self.actions[:, i] == a
                xa, ra = x[rows], self.rewards[rows]
                per_action.append((xa.T @ xa, xa.T @ ra, float(ra @ ra), int(rows.sum())))
            out.append(per_action)
        return out

    def log_evidence(self, scales: np.ndarray, stats=None) -> float:
        """log p(rewards | scales), summed over every (agent, action) model (Bishop 2006, eq. 3.86)."""
        var, s2 = self.prior_var(scales), self.noise_sd ** 2
        total = 0.0
        for per_action in (self._stats() if stats is None else stats):
            for xtx, xtr, rtr, n in per_action:
                precision = np.diag(1.0 / var) + xtx / s2
                chol = np.linalg.cholesky(precision)
                mean = np.linalg.solve(precision, xtr / s2)
                total -= 0.5 * (n * np.log(2 * np.pi * s2) + np.log(var).sum() + 2 * np.log(np.diag(chol)).sum()
                                + rtr / s2 - mean @ precision @ mean)
        return float(total)

    def fit_scales(self, stats) -> np.ndarray:
        """Empirical Bayes over the block scales (class doc): two passes of coordinate ascent from the smallest."""
        scales = np.full(len(self.blocks) - 2, self.grid[0])
        if len(self):
            best = self.log_evidence(scales, stats)
            for _ in range(2):
                for b in range(len(scales)):
                    for value in self.grid:
                        if value == scales[b]:
                            continue
                        trial = scales.copy()
                        trial[b] = value
                        evidence = self.log_evidence(trial, stats)
                        if evidence > best:
                            best, scales = evidence, trial
        return scales

    def posterior(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """[agent][action] -> (mean weights, lower Cholesky factor of the weight covariance)."""
        if self._posterior is None:
            stats = self._stats()
            self.scales = self.fit_scales(stats)
            prior_precision, s2 = np.diag(1.0 / self.prior_var(self.scales)), self.noise_sd ** 2
            out = []
            for per_action in stats:
                row = []
                for xtx, xtr, _, _ in per_action:
                    cov = np.linalg.inv(prior_precision + xtx / s2)
                    cov = (cov + cov.T) / 2
                    row.append((cov @ xtr / s2, np.linalg.cholesky(cov)))
                out.append(row)
            self._posterior = out
        return self._posterior

    def best_seen(self, k: int, min_samples: int = 2) -> list[list[int]]:
        """The k whole prompts (action indices of all agents together) with the highest mean reward among the
        samples, of those tried at least `min_samples` times: candidates for the best fixed prompt that the
        per-agent models cannot propose when agents only pay together (a joint effect)."""
        combos, inverse = np.unique(self.actions, axis=0, return_inverse=True)
        counts = np.bincount(inverse.ravel(), minlength=len(combos))
        means = np.bincount(inverse.ravel(), weights=self.rewards, minlength=len(combos)) / np.maximum(counts, 1)
        order = [int(i) for i in np.argsort(-means, kind="stable") if counts[i] >= min_samples]
        return [[int(a) for a in combos[i]] for i in order[:k]]

    def means(self) -> list[np.ndarray]:
        """Per agent, [n_actions, dim] posterior-mean weights."""
        return [np.stack([mean for mean, _ in per_action]) for per_action in self.posterior()]

    def choice_probs(self, x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Per agent, [N, n_actions]: the share of posterior draws in which each action predicts the highest reward
        for each basis row (Thompson sampling's choice probabilities)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        out = []
        for per_action in self.posterior():
            scores = np.stack([x @ (mean[None, :] + rng.standard_normal((self.draws, self.dim)) @ chol.T).T
                               for mean, chol in per_action], axis=-1)  # [N, draws, n_actions]
            best = scores.argmax(-1)
            out.append(np.stack([(best == a).mean(1) for a in range(len(per_action))], -1).astype(np.float32))
        return out

    def state(self) -> dict[str, Any]:
        return {"x": self.x, "actions": self.actions, "rewards": self.rewards}

    def load_state(self, state: dict[str, Any]) -> None:
        self.x, self.actions, self.rewards = state["x"], state["actions"], state["rewards"]
        self._posterior = None


class ThompsonPPO(PPO):
    """SB3's PPO with the rollouts, update and reward head of the module doc. Extra keywords: `posterior` (the
    run's rpp.config.PosteriorConfig) and `basis_rows` (the training users' user rows, [N, D]: the basis's bin
    edges are fit on them once, then saved with the policy). The policy must have a reward head
    (FourAgentPolicy with user_layout)."""

    USER_ROW = 1
    """Observation row of the user features (rpp.envs.core)."""

    def __init__(self, *args, posterior: PosteriorConfig | None = None, basis_rows: np.ndarray | None = None,
                 **kwargs):
        self.posterior_config = (posterior or PosteriorConfig()).model_dump()
        """Plain dict (saved in SB3's zip like its other constructor settings)."""
        self._basis_rows = basis_rows
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        head = self.policy.head
        if head is None:
            raise ValueError("ThompsonPPO needs FourAgentPolicy with a reward head (policy_kwargs user_layout)")
        if self._basis_rows is not None:
            head.basis.fit(self._basis_rows)
            self._basis_rows = None
        c = self.posterior_config
        self.reward_model = RewardPosterior(list(self.action_space.nvec), list(head.basis.blocks),
                                            c["intercept_sd"], c["block_sd"], c["noise_sd"], c["draws"])
        self.rng = np.random.default_rng([int(self.seed or 0), 0x7B5])
        self._failed = np.zeros((self.n_steps, self.n_envs), dtype=bool)

    def _excluded_save_params(self) -> list[str]:
        # the samples travel in the checkpoint's state (rpp.agents.train), not in SB3's zip
        return [*super()._excluded_save_params(), "reward_model", "rng", "_failed", "_basis_rows"]

    def learner_state(self) -> dict[str, Any]:
        return {"samples": self.reward_model.state(), "rng": self.rng.bit_generator.state}

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.reward_model.load_state(state["samples"])
        self.rng.bit_generator.state = state["rng"]
        self.policy.head.set_means(self.reward_model.means())

    # ------------------------------------------------------------------ rollouts: Thompson draws

    def basis(self, obs: np.ndarray | th.Tensor) -> np.ndarray:
        """Basis rows [N, dim] of observations [N, C + K, D]."""
        obs_t = th.as_tensor(obs, dtype=th.float32, device=self.device)
        with th.no_grad():
            return self.policy.head.basis(obs_t.reshape(len(obs_t), *self.observation_space.shape)[:, self.USER_ROW]
                                          ).cpu().numpy()

    def _behavior(self, obs: th.Tensor) -> list[th.Tensor]:
        return [th.as_tensor(p, device=obs.device) for p in self.reward_model.choice_probs(self.basis(obs), self.rng)]

    def collect_rollouts(self, *args, **kwargs) -> bool:
        self._failed[:] = False
        self.policy.behavior = self._behavior
        try:
            return super().collect_rollouts(*args, **kwargs)
        finally:
            self.policy.behavior = None

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones=None) -> None:
        # called once per step, before the step is added to the buffer at rollout_buffer.pos
        super()._update_info_buffer(infos, dones)
        pos = self.rollout_buffer.pos
        if pos < self.n_steps:
            self._failed[pos] = [bool(i.get("ranker_failed") or i.get("baseline_failed")) for i in infos]

    # ------------------------------------------------------------------ update: decoupled PPO, then the head

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        buf = self.rollout_buffer
        n = buf.buffer_size * buf.n_envs
        if not buf.generator_ready:
            next(buf.get(batch_size=n))  # SB3 flattens the stored arrays env-major in place on the first get()
        data = buf._get_samples(np.arange(n))  # the whole rollout in env-major order (get() would permute it)
        ok = th.as_tensor(~self._failed.swapaxes(0, 1).reshape(-1), device=self.device)
        n_ok = int(ok.sum())
        rewards = self.rollout_buffer.rewards.swapaxes(0, 1).reshape(-1)
        obs, actions = data.observations, data.actions.long()
        with th.no_grad():
            _, prox_log_prob, _ = self.policy.evaluate_actions(obs, actions)  # pi_prox: before this update
        is_weight = th.exp(th.clamp(prox_log_prob - data.old_log_prob, max=0.0))  # min(1, pi_prox / behaviour)
        advantages = data.advantages
        if n_ok > 1:
            advantages = (advantages - advantages[ok].mean()) / (advantages[ok].std() + 1e-8)
        weight = ok.float() / max(n_ok, 1)
        pg_losses, value_losses, entropy_losses, clip_fractions, kls = [], [], [], [], []
        if n_ok:
            batch = min(self.batch_size, len(ok))
            for _ in range(self.n_epochs):
                order = th.as_tensor(self.rng.permutation(len(ok)), device=self.device)
                for idx in order.split(batch):
                    values, log_prob, entropy = self.policy.evaluate_actions(obs[idx], actions[idx])
                    ratio = th.exp(log_prob - prox_log_prob[idx])
                    surrogate = th.min(advantages[idx] * ratio,
                                       advantages[idx] * th.clamp(ratio, 1 - clip_range, 1 + clip_range))
                    w = weight[idx] * len(ok) / len(idx)
                    policy_loss = -(w * is_weight[idx] * surrogate).mean()
                    value_loss = (w * (data.returns[idx] - values.flatten()) ** 2).mean()
                    entropy_loss = -(w * entropy).mean()
                    loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                    self.policy.optimizer.zero_grad()
                    loss.backward()
                    th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                    self.policy.optimizer.step()
                    with th.no_grad():
                        log_ratio = (log_prob - prox_log_prob[idx])[ok[idx]]
                        kls.append(float((th.exp(log_ratio) - 1 - log_ratio).mean()) if len(log_ratio) else 0.0)
                        clip_fractions.append(float(((ratio - 1).abs() > clip_range)[ok[idx]].float().mean())
                                              if len(log_ratio) else 0.0)
                    pg_losses.append(policy_loss.item())
                    value_losses.append(value_loss.item())
                    entropy_losses.append(entropy_loss.item())
                self._n_updates += 1
        # the head learns from every answered step of the rollout (failed ones dropped), then serves its new means
        keep = ok.cpu().numpy()
        self.reward_model.add(self.basis(obs.cpu().numpy()[keep]), actions.cpu().numpy()[keep], rewards[keep])
        self.policy.head.set_means(self.reward_model.means())
        self.logger.record("train/failed_steps", int(len(keep) - keep.sum()))
        self.logger.record("train/head_samples", len(self.reward_model))
        for b, scale in enumerate(self.reward_model.scales):
            self.logger.record(f"train/head_block_sd_{b}", float(scale))
        self.logger.record("train/is_weight", float(is_weight[ok].mean()) if n_ok else float("nan"))
        for name, values in (("policy_gradient_loss", pg_losses), ("value_loss", value_losses),
                             ("entropy_loss", entropy_losses), ("approx_kl", kls), ("clip_fraction", clip_fractions)):
            if values:
                self.logger.record(f"train/{name}", float(np.mean(values)))
        self.logger.record("train/explained_variance",
                           explained_variance(self.rollout_buffer.values.flatten(),
                                              self.rollout_buffer.returns.flatten()))
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    # ------------------------------------------------------------------ label-free population choice

    def population_best(self, user_rows: np.ndarray) -> list[int]:
        """Per agent, the action whose posterior-mean reward averaged over these users (their user rows, [N, D]) is
        highest: the best fixed prompt by the head, chosen without any evaluation user's label (the gate's
        reference)."""
        with th.no_grad():
            mean_basis = self.policy.head.basis(th.as_tensor(user_rows, dtype=th.float32, device=self.device)
                                                ).cpu().numpy().mean(0)
        return [int(np.argmax(m @ mean_basis)) for m in self.reward_model.means()]
