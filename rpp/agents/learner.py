"""The learner (train.learner: thompson): Thompson sampling over a Bayesian reward head, with decoupled PPO for the
agents' neural residual. docs/learner.md has the formulation, the references and what the planted check showed.

Why not PPO alone: PPO is on-policy, each sample feeds one clipped update and is thrown away, so the evidence about
a small group of users never accumulates; on the planted check it served the majority group and missed the rest.
A contextual bandit keeps every sample. This learner is one, inside the four actor-critic agents:

- **Reward head** (``RewardPosterior``; the policy's ``PosteriorHead``): Bayesian linear regressions of the step
  reward on a fixed non-linear basis of the user row (rpp.agents.policy.UserBasis: one-hots of the dominant
  genres, quantile bins of history length and rating statistics, the genre shares), fit by conjugate updates on
  every (user, prompt, reward) of the run, in two layers: a main effect per (agent, action), and an interaction per
  (agent pair, action pair) fit on what the main effects leave (GA2M's stage-wise pairwise terms; Lou et al. 2013),
  so that agents that only pay together (a joint rule) are seen. The intercepts are population effects; every
  other weight is a deviation shrunk toward 0 (a random effect per category or bin), so where a user's evidence is
  thin the head predicts the population's best prompt. Bins make it non-linear: it can carve a middle bucket of a
  feature. How wide each block's prior is (each feature's for each action, and the interactions' for each pair of
  agents), is chosen by empirical Bayes on all the run's samples (MacKay 1992's evidence, per block: automatic
  relevance determination), so the features that define no group, the actions no group prefers, and the
  interactions where no pair of agents interacts, stay shrunk and add no noise; the reward noise is estimated
  from the residuals the same way.
- **Behaviour policy**: every rollout prompt is a Thompson draw (the best whole prompt under one posterior sample;
  Russo et al. 2018), so users whose evidence is thin are explored and users whose evidence is clear are not.
- **Served policy**: each agent's logits are the head's posterior-mean max-marginal (the best predicted reward of
  a whole prompt with that action) / PRIOR_TEMPERATURE plus its neural actor
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

import math
from typing import Any, Optional

import numpy as np
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.utils import explained_variance

from rpp.agents.policy import agent_pairs, joint_scores
from rpp.config import PosteriorConfig


class RewardPosterior:
    """Bayesian linear reward models over basis rows whose columns fall in `blocks` (UserBasis.blocks: the intercept
    column, then one block per feature), the terms of a second-order additive model of the step reward:

    - **main effects**, one model per (agent, action);
    - **pairwise interactions**, one model per (agent pair, action pair): a pair of agents that only pays together
      (a joint effect) shows up here; a per-agent model sees it only in proportion to how often the partner
      happens to be right.

    The terms are fit jointly by backfitting (each model group refit on the partial residual that all the others
    leave, SWEEPS times; Hastie & Tibshirani 1990), as GA2M fits pairwise terms beside main effects (Lou et al.,
    KDD 2013). Covariances are each group's given the others (the block-diagonal approximation of the joint
    posterior).

    Prior: a main effect's intercept ~ N(0, intercept_sd^2); every other weight ~ N(0, s_b^2), with one s_b per
    block and per ACTION for the main effects (each action's deviations from the population: where a rule makes one
    action best for a few small categories, its prior widens while the actions no group prefers stay shrunk; one sd
    shared by all of an agent's actions settled between the two and kept the small groups at the population's
    prompt), and per block and pair of agents for the interactions (their intercept block too). Each is chosen from
    `block_sd` by empirical Bayes (type-II maximum likelihood: the marginal likelihood of the model's partial
    residual, summed over a pair's models; coordinate ascent over the blocks from the smallest value), between
    ROUNDS of backfitting. The Thompson draws use the posterior with every such sd floored at `explore_sd`:
    empirical Bayes fits the sds to what was tried, so without a floor a deviation nobody has tried yet keeps the
    smallest prior and the draws never try it. So a feature, an action or a pair of agents earns a wide prior only
    when the evidence asks for it: where no pair interacts, the interactions stay shrunk to 0 and the head is the
    per-agent one.
    Noise ~ N(0, noise_sd^2), with noise_sd re-estimated from the residuals in every round (estimate_noise), never
    below the configured floor. The samples are kept (not only sufficient statistics) so a checkpoint can hold them
    and refit exactly; the scales are a function of the samples and are refit with them."""

    def __init__(self, nvec: list[int], blocks: list[int], intercept_sd: float, block_sd: list[float],
                 min_noise_sd: float, draws: int, explore_sd: float = 0.0) -> None:
        self.nvec = [int(n) for n in nvec]
        self.pairs = agent_pairs(len(self.nvec))
        self.blocks = [int(b) for b in blocks]
        if self.blocks[:2] != [0, 1]:
            raise ValueError("reward head: the basis must start with its intercept column (blocks 0, 1, ...)")
        self.dim = self.blocks[-1]
        self.intercept_sd, self.grid = float(intercept_sd), sorted(float(v) for v in block_sd)
        self.min_noise_sd, self.draws, self.explore_sd = float(min_noise_sd), int(draws), float(explore_sd)
        self.noise_sd = self.START_NOISE_SD
        """The noise sd, as last estimated from the samples (posterior())."""
        self.scales = [np.full((n, len(self.blocks) - 2), self.grid[0]) for n in self.nvec]
        """Per agent, [n_actions, blocks]: the prior sd of each feature block of each action's main effect (after the
        intercept), as last fit."""
        self.pair_scales = np.full((len(self.pairs), len(self.blocks) - 1), self.grid[0])
        """Per pair of agents, the prior sd of each block of its interactions (intercept included), as last fit."""
        self.x = np.zeros((0, self.dim), dtype=np.float32)
        self.actions = np.zeros((0, len(self.nvec)), dtype=np.int64)
        self.rewards = np.zeros(0, dtype=np.float64)
        self._posterior: Optional[dict[str, dict[str, list[list[tuple[np.ndarray, np.ndarray]]]]]] = None

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

    def prior_var(self, block_sds: np.ndarray) -> np.ndarray:
        """Per basis column, the prior variance of its weight, from one sd per block (intercept first)."""
        return np.repeat(np.asarray(block_sds, dtype=float), np.diff(self.blocks), axis=-1) ** 2

    def _arms(self) -> list[tuple[np.ndarray, int]]:
        """Per model group (each agent, then each pair), the arm of every sample and the number of arms."""
        out = [(self.actions[:, i], n) for i, n in enumerate(self.nvec)]
        return out + [(self.actions[:, i] * self.nvec[j] + self.actions[:, j], self.nvec[i] * self.nvec[j])
                      for i, j in self.pairs]

    def _stats(self, arms: np.ndarray, n_arms: int, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per arm (one model) with samples (arms[k]: the model sample k belongs to), the sufficient statistics
        X'X [m, dim, dim], X'r [m, dim], r'r [m] and n [m]. An arm without samples has evidence 1 and is left out."""
        x = self.x.astype(np.float64)
        used = [a for a in range(n_arms) if (arms == a).any()]
        xtx = np.stack([x[arms == a].T @ x[arms == a] for a in used]) if used else np.zeros((0, self.dim, self.dim))
        onehot = (arms[:, None] == np.asarray(used)[None]).astype(np.float64)  # [n, m]
        return xtx, (onehot * targets[:, None]).T @ x, onehot.T @ targets ** 2, onehot.sum(0)

    def log_evidence(self, block_sds: np.ndarray, stats: tuple[np.ndarray, ...], per_model: bool = False):
        """log p(targets | block sds) of the models whose statistics are given (Bishop 2006, eq. 3.86; the quadratic
        term m'Pm = b'P^-1 b = |L^-1 b|^2 with P = LL', b = X'r / noise^2): their sum, or per_model, each one's
        [m]. block_sds: [blocks], shared by the models, or [m, blocks], each model its own."""
        xtx, xtr, rtr, n = (th.as_tensor(v, dtype=th.float64) for v in stats)
        var, s2 = th.as_tensor(self.prior_var(block_sds)), self.noise_sd ** 2
        chol = th.linalg.cholesky(th.diag_embed(1.0 / var) + xtx / s2)
        z = th.linalg.solve_triangular(chol, (xtr / s2)[..., None], upper=False)[..., 0]
        logdet = 2 * th.log(th.diagonal(chol, dim1=1, dim2=2)).sum(1)
        terms = -0.5 * (n * np.log(2 * np.pi * s2) + th.log(var).sum(-1) + logdet + rtr / s2 - (z * z).sum(1))
        return terms.numpy() if per_model else float(terms.sum())

    def fit_scales(self, stats: tuple[np.ndarray, ...], fixed: tuple[float, ...], start: np.ndarray,
                   passes: int) -> np.ndarray:
        """Empirical Bayes over the block sds after the `fixed` ones (class doc): `passes` of coordinate ascent over
        the grid from `start`, which is [blocks] (sds shared by the models whose statistics are given: their
        evidences summed) or [m, blocks] (each model its own: each model's evidence alone, all stepped at once).
        Returns the free sds, shaped as `start`."""
        scales = np.array(start, dtype=float)
        own = scales.ndim == 2
        if not len(stats[-1]):
            return scales

        def evidence(trial: np.ndarray):
            head = np.broadcast_to(np.asarray(fixed, dtype=float), (*trial.shape[:-1], len(fixed)))
            return self.log_evidence(np.concatenate([head, trial], -1), stats, per_model=own)

        best = evidence(scales)
        for _ in range(passes):
            for b in range(scales.shape[-1]):
                for value in self.grid:
                    trial = scales.copy()
                    trial[..., b] = value
                    value_evidence = evidence(trial)
                    better = value_evidence > best  # [m] when own
                    best = np.where(better, value_evidence, best) if own else max(best, value_evidence)
                    scales = np.where(np.asarray(better)[..., None], trial, scales)
        return scales

    MAX_SCORES = 4_000_000
    """Whole-prompt scores held at once by a Thompson draw (rows x draws x prompts)."""
    SWEEPS = 20
    """Backfitting sweeps (each model group refit on what all the others leave)."""
    ROUNDS = 3
    """Rounds of (backfit, re-estimate the noise, refit each model group's block sds on its partial residual) per
    fit."""
    START_NOISE_SD = 0.2
    """The noise sd the first round of a fit assumes (the reward's scale: NDCG differences)."""

    def estimate_noise(self, sds: list[np.ndarray], covs: list[np.ndarray], fitted: np.ndarray) -> float:
        """MacKay's re-estimate of the noise sd (1992; Bishop 2006, eq. 3.95): sqrt(RSS / (n - gamma)), where gamma,
        the number of weights the samples determine, is sum(1 - posterior var / prior var) over every weight of every
        model; floored at `min_noise_sd`. A fixed noise sd set for the noisiest ranker makes every deviation look
        unproven on a sharp one (and the head serve the population's prompt); set for the sharpest, one unlucky
        sample would rule an action out for good on a noisy one."""
        rss = float(((self.rewards - fitted.sum(1)) ** 2).sum())
        gamma = sum(float((1.0 - np.diagonal(cov, axis1=1, axis2=2) / self.prior_var(block_sds)).sum())
                    for cov, block_sds in zip(covs, sds))
        return max(self.min_noise_sd, math.sqrt(rss / max(len(self) - gamma, 1.0)))

    def _backfit(self, sds: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """The joint posterior mean of the additive model under these block sds (one per model group), by
        backfitting (Gauss-Seidel over the model groups: Hastie & Tibshirani 1990): returns per group the
        [n_arms, dim] means and [n_arms, dim, dim] covariances given the rest, and the [n, groups] fitted values."""
        x, s2 = self.x.astype(np.float64), self.noise_sd ** 2
        arms = self._arms()
        onehots = [np.eye(n)[a] for a, n in arms]
        xtx = [np.stack([x[a == k].T @ x[a == k] for k in range(n)]) for a, n in arms]
        covs = []
        for g, block_sds in enumerate(sds):
            cov = np.linalg.inv((1.0 / self.prior_var(block_sds))[..., None] * np.eye(self.dim) + xtx[g] / s2)
            covs.append((cov + cov.transpose(0, 2, 1)) / 2)
        fitted = np.zeros((len(self), len(arms)))
        means = [np.zeros((n, self.dim)) for _, n in arms]
        for _ in range(self.SWEEPS):
            for g, (a, _) in enumerate(arms):
                partial = self.rewards - fitted.sum(1) + fitted[:, g]
                means[g] = np.einsum("ade,ae->ad", covs[g], (onehots[g] * partial[:, None]).T @ x / s2)
                fitted[:, g] = np.einsum("kd,kd->k", x, means[g][a])
        return means, covs, fitted

    def posterior(self, explore: bool = False) -> dict[str, list[list[tuple[np.ndarray, np.ndarray]]]]:
        """{"main": [agent][action], "pair": [pair][action pair (row-major)]} -> (mean weights, lower Cholesky
        factor of the weight covariance given the other models). The block sds are refit by empirical Bayes on each
        model group's partial residual between rounds of backfitting, then the model is backfit under them.
        explore: the posterior with the sds floored at explore_sd, which the Thompson draws use."""
        if self._posterior is None:
            n_main, arms = len(self.nvec), self._arms()

            def sds(floor: float = 0.0) -> list[np.ndarray]:
                return ([np.c_[np.full(len(s), self.intercept_sd), np.maximum(s, floor)] for s in self.scales]
                        + list(np.maximum(self.pair_scales, floor)))

            self.scales = [np.full((n, len(self.blocks) - 2), self.grid[0]) for n in self.nvec]
            self.pair_scales = np.full((len(self.pairs), len(self.blocks) - 1), self.grid[0])
            self.noise_sd = self.START_NOISE_SD
            for r in range(self.ROUNDS if len(self) else 0):
                current = sds()
                _, covs, fitted = self._backfit(current)
                self.noise_sd = self.estimate_noise(current, covs, fitted)
                passes = 2 if r == 0 else 1  # later rounds start from the last round's sds
                for g, (arm_of, n_arms) in enumerate(arms):
                    partial = self.rewards - fitted.sum(1) + fitted[:, g]
                    if g < n_main:  # each action's own prior: its deviations from the population
                        used = np.unique(arm_of)  # the actions with samples, as _stats orders them
                        self.scales[g][used] = self.fit_scales(self._stats(arm_of, n_arms, partial),
                                                               (self.intercept_sd,), self.scales[g][used], passes)
                    else:  # one prior per pair of agents: their interactions
                        k = g - n_main
                        self.pair_scales[k] = self.fit_scales(self._stats(arm_of, n_arms, partial), (),
                                                              self.pair_scales[k], passes)
            self._posterior = {}
            for name, floor in (("mean", 0.0), ("explore", self.explore_sd)):
                means, covs, _ = self._backfit(sds(floor))
                models = [[(m, np.linalg.cholesky(c)) for m, c in zip(means[g], covs[g])] for g in range(len(arms))]
                self._posterior[name] = {"main": models[:n_main], "pair": models[n_main:]}
        return self._posterior["explore" if explore else "mean"]

    def best_seen(self, k: int, min_samples: int = 2) -> list[list[int]]:
        """The k whole prompts (action indices of all agents together) with the highest mean reward among the
        samples, of those tried at least `min_samples` times: candidates for the best fixed prompt that the
        per-agent models cannot propose when agents only pay together (a joint effect)."""
        combos, inverse = np.unique(self.actions, axis=0, return_inverse=True)
        counts = np.bincount(inverse.ravel(), minlength=len(combos))
        means = np.bincount(inverse.ravel(), weights=self.rewards, minlength=len(combos)) / np.maximum(counts, 1)
        order = [int(i) for i in np.argsort(-means, kind="stable") if counts[i] >= min_samples]
        return [[int(a) for a in combos[i]] for i in order[:k]]

    def means(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Posterior-mean weights: per agent [n_actions, dim], and per pair [n_i * n_j, dim]."""
        post = self.posterior()
        return ([np.stack([mean for mean, _ in per]) for per in post["main"]],
                [np.stack([mean for mean, _ in per]) for per in post["pair"]])

    def scores(self, x: np.ndarray, draws: int = 0, rng: np.random.Generator | None = None) -> th.Tensor:
        """Predicted reward of every whole prompt for each basis row: [N, n_0, ..., n_last] under the posterior
        mean (draws 0), or [N, draws, n_0, ...] under `draws` posterior samples."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        post = self.posterior(explore=bool(draws))

        def layer(models):
            out = []
            for mean, chol in models:
                value = x @ mean  # [N]
                if draws:  # x . (mean + chol z) = x . mean + (chol' x) . z
                    value = value[:, None] + (x @ chol) @ rng.standard_normal((self.dim, draws))
                out.append(value)
            return th.as_tensor(np.stack(out, -1))

        return joint_scores([layer(m) for m in post["main"]], [layer(p) for p in post["pair"]], self.nvec)

    def thompson(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Whole prompts drawn by Thompson sampling for each basis row: (actions [N, n_agents], their probability
        [N]). Each row takes the best prompt under one of `draws` posterior samples; its probability is the share
        of the samples whose best prompt it is (Thompson sampling's choice probability)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        rows = max(1, self.MAX_SCORES // (self.draws * int(np.prod(self.nvec))))  # bounds memory for big action sets
        flat = np.concatenate([self.scores(x[i:i + rows], self.draws, rng).flatten(2).argmax(-1).numpy()
                               for i in range(0, len(x), rows)])  # [N, draws]: the best prompt of each sample
        pick = flat[np.arange(len(flat)), rng.integers(0, self.draws, len(flat))]
        prob = (flat == pick[:, None]).mean(1)
        return np.stack(np.unravel_index(pick, self.nvec), -1), prob

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
                                            c["intercept_sd"], c["block_sd"], c["min_noise_sd"], c["draws"],
                                            c["explore_sd"])
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
        self.policy.head.set_means(*self.reward_model.means())

    # ------------------------------------------------------------------ rollouts: Thompson draws

    def basis(self, obs: np.ndarray | th.Tensor) -> np.ndarray:
        """Basis rows [N, dim] of observations [N, C + K, D]."""
        obs_t = th.as_tensor(obs, dtype=th.float32, device=self.device)
        with th.no_grad():
            return self.policy.head.basis(obs_t.reshape(len(obs_t), *self.observation_space.shape)[:, self.USER_ROW]
                                          ).cpu().numpy()

    def _behavior(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        actions, prob = self.reward_model.thompson(self.basis(obs), self.rng)
        return th.as_tensor(actions, device=obs.device), th.as_tensor(np.log(prob), dtype=th.float32,
                                                                      device=obs.device)

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
        self.policy.head.set_means(*self.reward_model.means())
        self.logger.record("train/failed_steps", int(len(keep) - keep.sum()))
        self.logger.record("train/head_samples", len(self.reward_model))
        self.logger.record("train/head_noise_sd", self.reward_model.noise_sd)
        for b, scale in enumerate(np.max([s.max(0) for s in self.reward_model.scales], 0)):  # widest, per block
            self.logger.record(f"train/head_block_sd_{b}", float(scale))
        for b, scale in enumerate(self.reward_model.pair_scales.max(0)):  # the widest over pairs, per block
            self.logger.record(f"train/head_pair_block_sd_{b}", float(scale))
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
        """The whole prompt whose posterior-mean reward (main effects plus interactions) averaged over these users
        (their user rows, [N, D]) is highest: the best fixed prompt by the head, chosen without any evaluation
        user's label (the gate's reference)."""
        with th.no_grad():
            mean_basis = self.policy.head.basis(th.as_tensor(user_rows, dtype=th.float32, device=self.device)
                                                ).cpu().numpy().mean(0)
        best = int(self.reward_model.scores(mean_basis[None]).reshape(-1).argmax())
        return [int(a) for a in np.unravel_index(best, self.reward_model.nvec)]
