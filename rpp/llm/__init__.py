"""The LLM layer: rank a user's candidates from a prompt, batched, cached and accounted.

    from rpp.llm import make_ranker, RankRequest
    ranker = make_ranker(cfg)                       # cfg.llm picks backend, mode, model, cache
    rankings = ranker.rank([RankRequest(messages, candidate_titles), ...])   # one batched call
    print(ranker.usage.snapshot())                  # calls, tokens, cache hits, failures, retries, time

``make_ranker`` composes: backend (local transformers or OpenAI-compatible) -> BootstrapRanker when
cfg.llm.bootstrap > 1 -> CachedRanker unless cfg.llm.cache is off. The caller holds the outermost one, whose
``usage.batches`` grows by exactly one per rank() call.
"""
from __future__ import annotations

from pathlib import Path

from rpp.llm.base import (
    CANDIDATES_PLACEHOLDER, BootstrapRanker, LLMCallError, LLMError, LLMTimeoutError, RankRequest, Ranker, Ranking,
    RateLimitError, ScoreModeUnsupported, ServerError, TextGenerator, UnparseableResponse, Usage, UsageTracker,
    format_candidate_list, render_candidates,
)
from rpp.llm.cache import CachedRanker, ResponseCache, request_key
from rpp.llm.parsing import ParseResult, order_from_scores, parse_ranking

__all__ = [
    "CANDIDATES_PLACEHOLDER", "BootstrapRanker", "CachedRanker", "LLMCallError", "LLMError", "LLMTimeoutError",
    "ParseResult", "RankRequest", "Ranker", "Ranking", "RateLimitError", "ResponseCache", "ScoreModeUnsupported",
    "ServerError", "TextGenerator", "UnparseableResponse", "Usage", "UsageTracker", "default_cache_path",
    "format_candidate_list", "make_backend", "make_generator", "make_ranker", "order_from_scores", "parse_ranking",
    "render_candidates", "request_key",
]


def default_cache_path(llm_cfg) -> Path:
    from rpp.config import cache_root

    return Path(llm_cfg.cache_path) if llm_cfg.cache_path else cache_root() / "responses.sqlite"


def make_backend(llm_cfg) -> Ranker:
    """The bare backend for cfg.llm (no bootstrap, no cache)."""
    if llm_cfg.backend == "local":
        from rpp.llm.local import LocalRanker

        return LocalRanker.from_config(llm_cfg)
    if llm_cfg.backend == "openai":
        from rpp.llm.openai_backend import OpenAIRanker

        return OpenAIRanker.from_config(llm_cfg)
    if llm_cfg.backend == "planted":
        raise ValueError("llm.backend planted needs the whole config (dataset, split, action set): use make_ranker(cfg)")
    raise ValueError(f"unknown llm.backend {llm_cfg.backend!r} (local, openai or planted)")


def make_ranker(cfg) -> Ranker:
    """The ranker a run uses: backend, then bootstrapping (cfg.llm.bootstrap > 1), then the response cache."""
    llm = cfg.llm
    if llm.backend == "planted":  # deterministic and instant: nothing to bootstrap or cache
        from rpp.llm.planted import PlantedRanker

        return PlantedRanker.from_config(cfg)
    ranker = make_backend(llm)
    if llm.bootstrap > 1:
        ranker = BootstrapRanker(ranker, llm.bootstrap, llm.seed)
    if llm.cache:
        ranker = CachedRanker(ranker, ResponseCache(default_cache_path(llm)))
    return ranker


def make_generator(refiner_cfg) -> TextGenerator:
    """The text generator of the RPP+ refiner (greedy local SmolLM2 or an OpenAI-compatible chat model).
    A local generator shares the loaded weights with a local ranker of the same model in this process."""
    if refiner_cfg.backend == "local":
        from rpp.llm.local import LocalGenerator

        return LocalGenerator(refiner_cfg.model)
    if refiner_cfg.backend == "openai":
        from rpp.llm.openai_backend import OpenAIGenerator

        return OpenAIGenerator(model=refiner_cfg.model, base_url=refiner_cfg.base_url,
                               api_key_env=refiner_cfg.api_key_env, concurrency=refiner_cfg.concurrency,
                               timeout_s=refiner_cfg.timeout_s, max_retries=refiner_cfg.max_retries,
                               temperature=refiner_cfg.temperature)
    raise ValueError(f"unknown refiner.backend {refiner_cfg.backend!r} (local or openai)")
