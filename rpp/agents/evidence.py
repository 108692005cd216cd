"""Evidence pooling beside PPO (train.evidence): every reward the agents have ever earned, not only the last rollout's.

Why: PPO is on-policy. Each sample feeds one clipped update and is thrown away, so evidence about a small group of
users (a few samples per rollout) never accumulates; on the planted check the PPO agents served the majority group
and missed most small ones, while a Thompson-sampling learner TOLD the groups, with the same samples, found all of
them (experiments/results/planted.md). The fix keeps the four agents, their encoders and PPO, and adds beside them
what the bandit had: a memory of all evidence.

- ``EvidenceModel``: per agent and action, a Bayesian linear regression of the step reward on the user's feature
  row (observation row 1: genre shares, dominant genre, history length, ratings, step; rpp.envs.features), fit on
  every (user row, action, reward) of the run so far. Other agents' choices are noise to it, as they are to each
  agent in the reward. The dominant-genre one-hot columns of the row get a wider prior of their own
  (train.evidence.category_prior_sd): a genre's deviation from the rest is learnt from its own few users instead of
  being shrunk away with the dense columns' noise. ``choice_probs`` draws weights from the posteriors (Thompson
  sampling) and returns, for each observation and agent, the share of draws in which each action scores best: the
  probability that the action is the user's best one, given the evidence. Unseen actions keep the prior's spread,
  so they keep being tried.
- ``EvidencePPO``: SB3's PPO; after its own update on a rollout (unchanged), the rollout's rewards join the model and
  the actors take `epochs` extra gradient steps of coef * cross-entropy(choice_probs, pi_agent) on the rollout's
  observations, so each agent's policy matches the pooled evidence for these users (probability matching: broad
  while the evidence is thin, sharp once it is not). The critic is untouched.
- train.evidence.explore (an option): the rollouts' actions are drawn from each actor mixed with the evidence's
  choice probabilities, so that users whose evidence is thin (a rare genre's few) are explored the way a
  Thompson-sampling bandit would explore them, and not only as far as an actor fit mostly on other users does;
  PPO's update weighs those samples by actor / behaviour probability. With explore_beta < 1 those draws use
  top-two sampling (a probable runner-up is tried too). Neither is the code's default. explore 0.5 alone passed 8
  of twelve runs of the planted check's 4-group rule against 6 but served the same mean share of users, and
  top-two did worse (experiments/results/planted.md, variants explore and top_two). What the rare genres lacked
  was a wider assumed noise (noise_sd): the per-agent model counts the partners' choices as noise, and under 0.1
  one unlucky rare-genre sample ruled that genre's best action out. experiments/ml100k.yaml now draws every
  rollout action from the evidence (explore 1) with noise_sd and category_prior_sd 0.3 and distill_on all
  (variant wide_genre: 9 of 12 runs of the 4-group rule pass against 6, and every run of the pass bar's seeds).
- train.evidence.distill_on: all pulls, at each of those steps, the rollout's users plus as many drawn
  from every earlier rollout, so users seen long ago keep being pulled toward the evidence; it served the planted
  check's smallest group better on some seeds but passed no more runs over six (experiments/results/planted.md,
  variant replay).
- train.evidence.final_epochs (an option): once the run reaches its budget, the actors are fit to the evidence
  model's greedy choice on every observation of the run (``final_distill``), so they serve what the model says
  where it knows more than they do; on the planted check it passed one run more of twelve, but moved single seeds
  both ways (experiments/results/planted.md, variant genre_final).
- ``JointEvidenceModel`` (train.evidence.model: joint): ONE such model over all agents' choices together, each
  agent credited with its own part of the reward. It serves the planted check's smallest group somewhat better
  but passes fewer runs than the per-agent model, which stays the default (experiments/results/planted.md).

The reward pooled is each step's own reward (NDCG minus the task-wise baseline), the contextual-bandit view that
gamma 0 takes; a step whose ranking failed pools its reward of 0 like PPO sees it (failures are counted by the
environment). The samples are part of the checkpoint, so a resumed run continues with the same evidence.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch as th
from scipy.linalg import solve_triangular
from stable_baselines3 import PPO

from rpp.config import EvidenceConfig


class EvidenceModel:
    """Bayesian linear reward models, one per (agent, action), over a feature row of width `dim` plus an intercept.

    Prior: weights ~ N(0, prior_sd^2), except the weights of `category_columns` (the row's one-hot of a categorical
    feature: the dominant genre), which get N(0, category_prior_sd^2); noise ~ N(0, noise_sd^2). Samples are kept
    (not only sufficient statistics) so the model can be saved with a checkpoint and refit exactly.

    Why the category columns get their own prior: a one-hot weight is that category's own deviation from the rest
    (a random effect per category), learnt from that category's users alone. A rare category has a handful of
    samples per action, and the tight prior that keeps the ~50 dense columns from fitting noise (0.03) shrinks
    such a deviation to almost nothing; a wider one lets a few samples show it (experiments/results/planted.md)."""

    def __init__(self, nvec: list[int], dim: int, prior_sd: float, noise_sd: float, draws: int,
                 category_columns: Sequence[int] = (), category_prior_sd: float | None = None) -> None:
        self.nvec = [int(n) for n in nvec]
        self.dim = int(dim)
        self.prior_sd, self.noise_sd, self.draws = float(prior_sd), float(noise_sd), int(draws)
        sd = np.full(self.dim + 1, self.prior_sd)
        if category_prior_sd is not None:
            columns = np.asarray(category_columns, dtype=np.int64)
            if columns.size and (columns.min() < 0 or columns.max() >= self.dim):
                raise ValueError(f"evidence: category columns outside the feature row (width {self.dim})")
            sd[1 + columns] = float(category_prior_sd)
        self.prior_var = sd ** 2
        """Prior variance of each weight of [intercept, row] (width dim + 1)."""
        self.x = np.zeros((0, self.dim), dtype=np.float32)
        self.actions = np.zeros((0, len(self.nvec)), dtype=np.int64)
        self.rewards = np.zeros(0, dtype=np.float64)
        self._posterior: list[list[tuple[np.ndarray, np.ndarray]]] | None = None

    def __len__(self) -> int:
        return len(self.rewards)

    def add(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        actions = np.asarray(actions, dtype=np.int64).reshape(len(x), len(self.nvec))
        rewards = np.asarray(rewards, dtype=np.float64).reshape(len(x))
        if not np.isfinite(rewards).all():
            raise ValueError("evidence: non-finite rewards")
        self.x = np.concatenate([self.x, x])
        self.actions = np.concatenate([self.actions, actions])
        self.rewards = np.concatenate([self.rewards, rewards])
        self._posterior = None

    def _design(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.ones((len(x), 1)), np.asarray(x, dtype=np.float64)], axis=1)

    def posterior(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """[agent][action] -> (mean weights, Cholesky factor of the weight covariance), width dim + 1."""
        if self._posterior is None:
            design = self._design(self.x)
            prior_precision = np.diag(1.0 / self.prior_var)
            out = []
            for i, n in enumerate(self.nvec):
                per_action = []
                for a in range(n):
                    rows = self.actions[:, i] == a
                    xa, ra = design[rows], self.rewards[rows]
                    precision = prior_precision + xa.T @ xa / self.noise_sd ** 2
                    cov = np.linalg.inv(precision)
                    cov = (cov + cov.T) / 2
                    mean = cov @ (xa.T @ ra) / self.noise_sd ** 2
                    per_action.append((mean, np.linalg.cholesky(cov)))
                out.append(per_action)
            self._posterior = out
        return self._posterior

    def choice_probs(self, x: np.ndarray, rng: np.random.Generator, beta: float = 1.0) -> list[np.ndarray]:
        """Per agent, [N, n_actions]: the share of posterior draws in which each action predicts the highest reward
        for each feature row (Thompson sampling's choice probabilities); beta < 1: top-two sampling's, beta * that
        share + (1 - beta) * the share of draws in which the action comes second (see _best_shares)."""
        design = self._design(np.asarray(x).reshape(-1, self.dim))
        out = []
        for per_action in self.posterior():
            scores = []
            for mean, chol in per_action:
                w = mean[None, :] + rng.standard_normal((self.draws, len(mean))) @ chol.T  # [draws, d + 1]
                scores.append(design @ w.T)  # [N, draws]
            out.append(_best_shares(np.stack(scores, axis=-1), beta))
        return out

    def state(self) -> dict[str, Any]:
        return {"x": self.x, "actions": self.actions, "rewards": self.rewards}

    def load_state(self, state: dict[str, Any]) -> None:
        self.x, self.actions, self.rewards = state["x"], state["actions"], state["rewards"]
        self._posterior = None


class JointEvidenceModel(EvidenceModel):
    """ONE Bayesian linear model of the step reward over all agents' choices together (train.evidence.model: joint):

        reward = sum over agents i of  w[i, a_i] . [1, x]  + noise,

    so each agent's estimate is credited with the part of the reward its partners' choices explain, instead of
    counting that part as noise (the per-agent model). Same prior and noise as EvidenceModel; only the feature
    columns that are non-zero in some sample take part (the user row fills ~60 of its 384 slots), which keeps the
    joint weight vector at about sum(nvec) * 63 entries."""

    def _columns(self) -> np.ndarray:
        return np.flatnonzero(np.abs(self.x).max(axis=0) > 0) if len(self.x) else np.zeros(0, dtype=np.int64)

    def _blocks(self, width: int) -> np.ndarray:
        """Start of each (agent, action) block in the joint weight vector, agent-major."""
        return np.concatenate([[0], np.cumsum([n * width for n in self.nvec])])

    def posterior(self):
        """(columns, mean [D], lower Cholesky factor of the posterior precision [D, D]), D = sum(nvec) * width."""
        if self._posterior is None:
            cols = self._columns()
            z = self._design(self.x[:, cols])
            width = z.shape[1]
            start = self._blocks(width)
            prior_var = self.prior_var[np.concatenate([[0], 1 + cols])]  # intercept, then the columns used
            precision = np.diag(1.0 / np.tile(prior_var, sum(self.nvec)))
            b = np.zeros(start[-1])
            chosen = [[self.actions[:, i] == a for a in range(n)] for i, n in enumerate(self.nvec)]
            for i, n in enumerate(self.nvec):
                for a in range(n):
                    ia = slice(start[i] + a * width, start[i] + (a + 1) * width)
                    b[ia] = z[chosen[i][a]].T @ self.rewards[chosen[i][a]]
                    for k, m in enumerate(self.nvec):
                        for c in range(m):
                            both = chosen[i][a] & chosen[k][c]
                            if both.any():
                                kc = slice(start[k] + c * width, start[k] + (c + 1) * width)
                                precision[ia, kc] += z[both].T @ z[both] / self.noise_sd ** 2
            chol = np.linalg.cholesky(precision)
            mean = _chol_solve(chol, b / self.noise_sd ** 2)
            self._posterior = (cols, mean, chol)
        return self._posterior

    def _scores(self, x: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
        """Per agent, [N, draws, n_actions]: each action's predicted reward share under weight draws w [D, draws]."""
        cols = self.posterior()[0]
        z = self._design(np.asarray(x).reshape(-1, self.dim)[:, cols])
        start = self._blocks(z.shape[1])
        return [np.einsum("nd,adk->nka", z, w[start[i]:start[i + 1]].reshape(n, z.shape[1], -1))
                for i, n in enumerate(self.nvec)]

    def choice_probs(self, x: np.ndarray, rng: np.random.Generator, beta: float = 1.0) -> list[np.ndarray]:
        _, mean, chol = self.posterior()
        noise = rng.standard_normal((len(mean), self.draws))
        w = mean[:, None] + solve_triangular(chol.T, noise, lower=False)  # draws from N(mean, precision^-1)
        return [_best_shares(scores, beta) for scores in self._scores(x, w)]


def make_evidence_model(settings: dict[str, Any], nvec: list[int], dim: int,
                        category_columns: Sequence[int] = ()) -> EvidenceModel:
    """The reward model a run's evidence settings (EvidenceConfig.model_dump()) call for: EvidenceModel, or
    JointEvidenceModel with model: joint."""
    model = JointEvidenceModel if settings.get("model") == "joint" else EvidenceModel
    return model(nvec, dim, prior_sd=settings["prior_sd"], noise_sd=settings["noise_sd"], draws=settings["draws"],
                 category_columns=category_columns, category_prior_sd=settings.get("category_prior_sd"))


def _best_shares(scores: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """[N, draws, n_actions] predicted rewards -> [N, n_actions]: the share of draws in which each action is best;
    beta < 1: beta * that + (1 - beta) * the share in which it is second best (top-two Thompson sampling, Russo
    2016, with the runner-up taken from the same draw): the runner-ups keep being tried, which is what finding
    the best action needs, where plain Thompson sampling soon stops trying an action that is probably second."""
    order = np.argsort(-scores, axis=-1)
    n = scores.shape[-1]
    best = np.stack([(order[..., 0] == a).mean(axis=1) for a in range(n)], axis=-1)
    if beta < 1 and n > 1:
        second = np.stack([(order[..., 1] == a).mean(axis=1) for a in range(n)], axis=-1)
        best = beta * best + (1 - beta) * second
    return best.astype(np.float32)


def _chol_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    """precision^-1 b for precision = chol @ chol.T."""
    return solve_triangular(chol.T, solve_triangular(chol, b, lower=True), lower=False)


class EvidencePPO(PPO):
    """SB3's PPO plus the pooled-evidence step of the module doc after each update. Extra keywords: `evidence`, the
    run's rpp.config.EvidenceConfig (the one home of its settings and defaults); the feature row is observation row
    `feature_row` (1: the user row); `category_columns`, the slots of that row that one-hot a categorical feature
    (rpp.envs.features.UserFeatures.category_columns), which get evidence.category_prior_sd."""

    category_columns: tuple[int, ...] = ()
    """Class default for checkpoints saved before the attribute existed."""

    def __init__(self, *args, evidence: EvidenceConfig | None = None, feature_row: int = 1,
                 category_columns: Sequence[int] = (), **kwargs):
        self.evidence_config = (evidence or EvidenceConfig(coef=1.0)).model_dump()
        """Plain dict (saved in SB3's zip like its other constructor settings)."""
        self.feature_row = int(feature_row)
        self.category_columns = tuple(int(c) for c in category_columns)
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        self.evidence = make_evidence_model(self.evidence_config, list(self.action_space.nvec),
                                            self.observation_space.shape[-1], self.category_columns)
        self.evidence_rng = np.random.default_rng([int(self.seed or 0), 0xE71D])
        self.past_obs = np.zeros((0, *self.observation_space.shape), dtype=np.float16)
        """Observations of every earlier rollout (distill_on: all or final_epochs > 0 only; float16 to halve the
        memory)."""
        self.final_distilled_at = -1
        """num_timesteps of the last final distillation (a finished run resumed with no more steps is not
        distilled twice)."""

    def _excluded_save_params(self) -> list[str]:
        # the samples travel in the checkpoint's state (rpp.agents.train), not in SB3's zip
        return [*super()._excluded_save_params(), "evidence", "evidence_rng", "past_obs"]

    def evidence_state(self) -> dict[str, Any]:
        return {"samples": self.evidence.state(), "rng": self.evidence_rng.bit_generator.state,
                "past_obs": self.past_obs, "final_distilled_at": self.final_distilled_at}

    def load_evidence_state(self, state: dict[str, Any]) -> None:
        self.evidence.load_state(state["samples"])
        self.evidence_rng.bit_generator.state = state["rng"]
        self.past_obs = state.get("past_obs", self.past_obs)
        self.final_distilled_at = state.get("final_distilled_at", -1)

    def collect_rollouts(self, *args, **kwargs) -> bool:
        """SB3's rollouts; with evidence.explore > 0 the actions are drawn from the actors mixed with the
        evidence's choice probabilities (FourAgentPolicy.behavior), only while collecting."""
        if self.evidence_config.get("explore", 0.0) <= 0:
            return super().collect_rollouts(*args, **kwargs)
        self.policy.behavior = self._behavior
        try:
            return super().collect_rollouts(*args, **kwargs)
        finally:
            self.policy.behavior = None

    def _behavior(self, obs: th.Tensor, actor_probs: list[th.Tensor]) -> list[th.Tensor]:
        share = self.evidence_config["explore"]
        rows = obs.reshape(len(obs), *self.observation_space.shape)[:, self.feature_row].cpu().numpy()
        evidence = self.evidence.choice_probs(rows, self.evidence_rng, self.evidence_config.get("explore_beta", 1.0))
        return [(1 - share) * p + share * th.as_tensor(q, dtype=p.dtype, device=p.device)
                for p, q in zip(actor_probs, evidence, strict=True)]

    def train(self) -> None:
        super().train()
        buf = self.rollout_buffer
        # SB3's buffer.get() flattened observations and actions env-major ([n_envs * n_steps, ...]) in place;
        # rewards are not among the arrays it flattens, so they are flattened the same way here (before any get(),
        # all three are still step-major)
        rewards = buf.rewards.swapaxes(0, 1).reshape(-1) if buf.generator_ready else buf.rewards.reshape(-1)
        obs = buf.observations.reshape(-1, *self.observation_space.shape)
        actions = buf.actions.reshape(-1, len(self.action_space.nvec)).astype(np.int64)
        self.evidence.add(obs[:, self.feature_row], actions, rewards)
        replay = self.evidence_config.get("distill_on") == "all"
        if self.evidence_config["coef"] > 0:
            self._distill_rollout(obs, replay)
        if replay or self.evidence_config.get("final_epochs", 0) > 0:
            self.past_obs = np.concatenate([self.past_obs, obs.astype(np.float16)])
        self.logger.record("train/evidence_samples", len(self.evidence))

    def _distill_rollout(self, obs: np.ndarray, replay: bool) -> None:
        coef, epochs = self.evidence_config["coef"], self.evidence_config["epochs"]
        pool = np.concatenate([obs, self.past_obs.astype(np.float32)]) if replay and len(self.past_obs) else obs
        targets = [th.as_tensor(p, device=self.device)
                   for p in self.evidence.choice_probs(pool[:, self.feature_row], self.evidence_rng)]
        obs_t = th.as_tensor(pool, dtype=th.float32, device=self.device)
        losses = []
        for _ in range(epochs):
            # the rollout's observations, plus as many drawn from earlier rollouts (distill_on: all)
            rows = np.arange(len(obs))
            if len(pool) > len(obs):
                extra = self.evidence_rng.choice(np.arange(len(obs), len(pool)),
                                                 size=min(len(obs), len(pool) - len(obs)), replace=False)
                rows = np.concatenate([rows, extra])
            rows_t = th.as_tensor(rows, device=self.device)
            loss = sum(-(tgt[rows_t] * th.log_softmax(lg, dim=-1)).sum(-1).mean()
                       for tgt, lg in zip(targets, self.policy.agent_logits(obs_t[rows_t]), strict=True))
            losses.append(self._actor_step(coef * loss))
        self.logger.record("train/evidence_loss", float(np.mean(losses)))

    def _actor_step(self, loss: th.Tensor) -> float:
        """One optimizer step on a distillation loss, with PPO's gradient clipping; returns the loss."""
        self.policy.optimizer.zero_grad()
        loss.backward()
        th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        return float(loss.item())

    def final_distill(self, batch: int = 1024) -> Optional[float]:
        """evidence.final_epochs gradient steps of each actor's cross-entropy toward the evidence model's greedy
        choice (the action most often best under the posterior), each on up to `batch` observations drawn from
        every rollout of the run. Returns the share of those observations on which all four actors' greedy
        actions then agree with the model (None when there is nothing to do)."""
        epochs = self.evidence_config.get("final_epochs", 0)
        if epochs <= 0 or not len(self.past_obs) or self.final_distilled_at == self.num_timesteps:
            return None
        pool = self.past_obs.astype(np.float32)
        greedy = [th.as_tensor(p.argmax(1), device=self.device)
                  for p in self.evidence.choice_probs(pool[:, self.feature_row], self.evidence_rng)]
        obs_t = th.as_tensor(pool, dtype=th.float32, device=self.device)
        self.policy.set_training_mode(True)
        for _ in range(epochs):
            rows = th.as_tensor(self.evidence_rng.choice(len(pool), size=min(batch, len(pool)), replace=False),
                                device=self.device)
            self._actor_step(sum(th.nn.functional.cross_entropy(lg, tgt[rows])
                                 for tgt, lg in zip(greedy, self.policy.agent_logits(obs_t[rows]), strict=True)))
        self.policy.set_training_mode(False)
        self.final_distilled_at = self.num_timesteps
        with th.no_grad():
            agree = th.stack([lg.argmax(-1) == tgt
                              for tgt, lg in zip(greedy, self.policy.agent_logits(obs_t), strict=True)]).all(0)
        return float(agree.float().mean())
