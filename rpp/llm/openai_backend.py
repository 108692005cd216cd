"""The OpenAI-compatible backend: any server speaking /v1/chat/completions and /v1/completions (vLLM, llama.cpp,
Ollama, hosted providers).

Generate mode asks the chat endpoint for a ranked list and parses it. Score mode needs prompt log-probs, which only
/v1/completions with ``echo=True`` + ``logprobs`` gives; that endpoint takes raw text, so the chat template is
rendered here: the embedded model's own template (from its tokenizer) when ``model`` names the embedded model or a
local folder, else a plain ChatML template (``<|im_start|>role\\ncontent<|im_end|>\\n`` ... ``<|im_start|>assistant\\n``).

Servers disagree about echo log-probs. vLLM's are correct; llama.cpp's own server returns none;
llama-cpp-python 0.3.36 pairs token i with the distribution AFTER it (the right value sits in
``top_logprobs[i-1]``) unless the prompt starts with the model's BOS token, in which case dropping that BOS
realigns everything and the numbers are right (SmolLM2's chat template starts with ``<|im_start|>``, its BOS, so
chat-templated prompts come out correct while plain text comes out shifted). So before scoring, the backend
probes the server once with a chat-templated "The capital of France is Paris" and either reads the numbers
directly, corrects the shift, or raises ``ScoreModeUnsupported``. In shifted mode a title token missing from the previous position's top-k gets the
smallest listed top-k value (an upper bound on its log-prob); such tokens are counted in ``approximated_tokens``.

Every HTTP call goes through one retry loop: rate limits, 5xx, timeouts, dropped connections and unparseable
answers are retried with exponential backoff and jitter up to ``max_retries`` times (the SDK's own retries are off
so that each retry is counted); then the request comes back as a counted failure in presented order. Calls run on
an asyncio loop with at most ``concurrency`` in flight; ``rank()`` stays synchronous for the caller.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from pathlib import Path
from typing import Awaitable, Callable, Optional, Sequence

from rpp.llm.base import (
    LLMError, Ranker, Ranking, RankRequest, ScoreModeUnsupported, TextGenerator, render_candidates, timed,
)
from rpp.llm.parsing import order_from_scores, parse_ranking

log = logging.getLogger(__name__)

PROBE_MESSAGES = ({"role": "user", "content": "What is the capital of France?"},)
PROBE_PROMPT = "The capital of France is"
PROBE_ANSWER = " Paris"
PROBE_MIN_LOGPROB = -3.0
"""An obvious next word: any working model puts it well above this (SmolLM2-135M: -0.26); a shifted echo
reports it far below (-8.45 on llama-cpp-python 0.3.36)."""
TOP_LOGPROBS = 20


class CallFailed(LLMError):
    """A call that failed after its retries (or with an error not worth retrying)."""

    def __init__(self, message: str, retries: int) -> None:
        super().__init__(message)
        self.retries = retries


class _Garbage(LLMError):
    """The server answered 200 but the body is not what the API promises."""


def _chatml(messages: Sequence[dict]) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def chat_template_for(model: str) -> Callable[[Sequence[dict]], str]:
    """Render chat messages to raw text the way `model` expects (falls back to ChatML; see module docstring)."""
    from rpp.assets import ASSETS

    if model in ASSETS or Path(model).expanduser().is_dir():
        from rpp.llm.local import load_tokenizer

        tokenizer = load_tokenizer(model)
    else:
        log.info("no local tokenizer for '%s': rendering prompts with the ChatML template", model)
        return _chatml

    def render(messages: Sequence[dict]) -> str:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    return render


def _run(coro: Awaitable):
    """Run a coroutine to completion from synchronous code, even if this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Client:
    """AsyncOpenAI with our retry policy and a concurrency limit; created per event loop."""

    def __init__(self, *, base_url: Optional[str], api_key_env: str, timeout_s: float, max_retries: int,
                 concurrency: int, seed: int, backoff_base_s: float, backoff_max_s: float) -> None:
        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise LLMError(f"the OpenAI backend needs an API key in the environment variable {api_key_env} "
                               "(llm.api_key_env names the variable), or llm.base_url for a local server")
            key = "no-key-needed"  # local servers (llama.cpp, vLLM) accept anything
        self._key = key
        self.base_url, self.timeout_s, self.max_retries = base_url, timeout_s, max_retries
        self.concurrency = concurrency
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self._rng = random.Random(seed)
        self.sdk = None
        self.sem: Optional[asyncio.Semaphore] = None

    async def __aenter__(self) -> "_Client":
        from openai import AsyncOpenAI

        self.sdk = AsyncOpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)
        self.sem = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.sdk.close()

    def backoff(self, attempt: int, retry_after: Optional[float] = None) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)) * (0.5 + self._rng.random())
        return max(delay, retry_after or 0.0)

    async def call(self, fn: Callable[[], Awaitable]):
        """Run `fn` with bounded retries; returns (result, retries) or raises CallFailed."""
        import openai

        retries = 0
        for attempt in range(self.max_retries + 1):
            try:
                async with self.sem:
                    return await fn(), retries
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError,
                    _Garbage, KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt == self.max_retries:
                    raise CallFailed(f"{error} (after {retries} retries)", retries) from exc
                retries += 1
                retry_after = None
                if isinstance(exc, openai.RateLimitError):
                    try:
                        retry_after = float(exc.response.headers.get("retry-after", ""))
                    except ValueError:
                        retry_after = None
                await asyncio.sleep(self.backoff(attempt, min(retry_after or 0.0, self.backoff_max_s)))
            except openai.APIStatusError as exc:  # 4xx other than 429: our request is wrong, retrying won't help
                raise CallFailed(f"{type(exc).__name__}: {exc}", retries) from exc
        raise AssertionError("unreachable")


def _client_kwargs(cfg) -> dict:
    return dict(base_url=cfg.base_url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                max_retries=cfg.max_retries, concurrency=cfg.concurrency)


class OpenAIRanker(Ranker):
    """Ranks through an OpenAI-compatible server, in generate or score mode (see the module docstring)."""

    def __init__(self, *, model: str, base_url: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 mode: str = "generate", score_reduction: str = "sum", concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 3, temperature: float = 0.0,
                 max_new_tokens: int = 256, seed: int = 0, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 8.0, template: Optional[Callable[[Sequence[dict]], str]] = None) -> None:
        super().__init__()
        if mode not in ("score", "generate"):
            raise ValueError(f"llm.mode must be score or generate, got {mode!r}")
        self.model, self.mode, self.reduction = model, mode, score_reduction
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self._client_args = dict(base_url=base_url, api_key_env=api_key_env, timeout_s=timeout_s,
                                 max_retries=max_retries, concurrency=concurrency, seed=seed,
                                 backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s)
        _Client(**self._client_args)  # fail now, not mid-run, when the key is missing
        self._template = template
        self.echo_mode: Optional[str] = None
        """After the probe: "direct" (echo log-probs are right) or "shifted" (corrected by one token)."""
        self.approximated_tokens = 0
        detail = (f"reduction={score_reduction}" if mode == "score"
                  else f"temperature={temperature}|max_new={max_new_tokens}|seed={seed}")
        self.identity = f"openai|{base_url or 'api.openai.com'}|{model}|mode={mode}|{detail}"

    @classmethod
    def from_config(cls, llm_cfg) -> "OpenAIRanker":
        return cls(model=llm_cfg.model, mode=llm_cfg.mode, score_reduction=llm_cfg.score_reduction,
                   temperature=llm_cfg.temperature, max_new_tokens=llm_cfg.max_new_tokens, seed=llm_cfg.seed,
                   **_client_kwargs(llm_cfg))

    @property
    def template(self) -> Callable[[Sequence[dict]], str]:
        if self._template is None:
            self._template = chat_template_for(self.model)
        return self._template

    # -- public entry point
    def rank(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        timer = timed()
        requests = [render_candidates(r) for r in requests]
        if self.mode == "score" and self.echo_mode is None:
            self.echo_mode = self.probe()
        rankings = _run(self._rank_all(requests))
        self.usage.record(rankings, wall_s=timer.elapsed)
        return rankings

    def probe(self) -> str:
        """Ask the server for the echo log-probs of an obvious answer; "direct", "shifted", or raise.

        The probe goes through the same chat template as real requests: llama-cpp-python's alignment depends on
        whether the prompt starts with the BOS token (SmolLM2's template starts with it, plain text does not),
        so a probe on plain text would describe a different situation than the one we score in."""
        text = self.template(PROBE_MESSAGES) + PROBE_PROMPT + PROBE_ANSWER

        async def go():
            async with _Client(**self._client_args) as client:
                return await client.call(lambda: client.sdk.completions.create(
                    model=self.model, prompt=text, echo=True, logprobs=5, max_tokens=1, temperature=0.0))
        try:
            resp, _ = _run(go())
        except CallFailed as exc:
            raise ScoreModeUnsupported(f"score mode needs /v1/completions with echo + logprobs, and the probe "
                                       f"call to {self._client_args['base_url']} failed: {exc}") from exc
        return classify_echo(resp)

    # -- async internals
    async def _rank_all(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        async with _Client(**self._client_args) as client:
            work = self._score_one if self.mode == "score" else self._generate_one
            return list(await asyncio.gather(*(work(client, r) for r in requests)))

    async def _generate_one(self, client: _Client, req: RankRequest) -> Ranking:
        timer = timed()

        async def ask():
            resp = await client.sdk.chat.completions.create(
                model=self.model, messages=list(req.messages), temperature=self.temperature,
                max_tokens=self.max_new_tokens, seed=self.seed)
            text = resp.choices[0].message.content
            if text is None and resp.choices[0].finish_reason != "length":
                raise _Garbage("the chat answer has no content")
            return text or "", resp.usage

        try:
            (text, usage), retries = await client.call(ask)
        except CallFailed as exc:
            failed = Ranking.presented_order(len(req.candidates), str(exc))
            failed.retries, failed.wall_s = exc.retries, timer.elapsed
            return failed
        parsed = parse_ranking(text, req.candidates)
        return Ranking(order=parsed.order, coverage=parsed.coverage, raw=text, retries=retries,
                       prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                       completion_tokens=getattr(usage, "completion_tokens", 0) or 0, wall_s=timer.elapsed)

    async def _score_one(self, client: _Client, req: RankRequest) -> Ranking:
        timer = timed()
        prefix = self.template(req.messages)
        results = await asyncio.gather(*(client.call(lambda t=title: self._title_logprobs(client, prefix, t))
                                         for title in req.candidates), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        retries = sum(getattr(e, "retries", 0) for e in errors) + sum(r[1] for r in results if isinstance(r, tuple))
        if errors:
            failed = Ranking.presented_order(len(req.candidates), f"{len(errors)} of {len(results)} candidate "
                                             f"calls failed; first: {errors[0]}")
            failed.retries, failed.wall_s = retries, timer.elapsed
            return failed
        lps = [r[0][0] for r in results]
        prompt_tokens = sum(r[0][1] for r in results)
        from rpp.llm.local import reduce_scores

        scores = reduce_scores(lps, self.reduction)
        return Ranking(order=order_from_scores(scores), scores=scores, coverage=1.0, prompt_tokens=prompt_tokens,
                       retries=retries, wall_s=timer.elapsed)

    async def _title_logprobs(self, client: _Client, prefix: str, title: str) -> tuple[list[float], int]:
        resp = await client.sdk.completions.create(
            model=self.model, prompt=prefix + title, echo=True,
            logprobs=TOP_LOGPROBS if self.echo_mode == "shifted" else 1, max_tokens=1,
            temperature=0.0)
        lps, approx = title_logprobs(resp, title, self.echo_mode or "direct")
        self.approximated_tokens += approx
        return lps, int(getattr(resp.usage, "prompt_tokens", 0) or 0)

    def close(self) -> None:
        pass


def _echo(resp, suffix: str) -> tuple[list[str], list, list, int]:
    """tokens, token_logprobs, top_logprobs, and the number of entries up to the end of the prompt, which ends
    with `suffix` (the title, or the probe's answer).

    The end is found by text, not by usage counts: llama-cpp-python leaves BOS-id tokens out of the echo and,
    depending on alignment, drops the completion's entry, so neither usage.prompt_tokens nor
    usage.completion_tokens says where the prompt ends there. The echo has one completion token at most."""
    choice = resp.choices[0]
    lp = choice.logprobs
    if lp is None or not lp.tokens or lp.token_logprobs is None:
        raise ScoreModeUnsupported("the server returned no prompt log-probs for echo=True")
    tokens = list(lp.tokens)
    top = list(lp.top_logprobs or [None] * len(tokens))

    def fold(text: str) -> str:  # byte-split characters come back mangled; compare on ASCII
        return text.encode("ascii", "ignore").decode()

    for end in range(len(tokens), max(0, len(tokens) - 3), -1):
        joined = "".join(tokens[:end])
        if joined.endswith(suffix) or (fold(suffix) and fold(joined).endswith(fold(suffix))):
            return tokens, list(lp.token_logprobs), top, end
    raise _Garbage(f"the echoed tokens do not end with {suffix!r}")


def classify_echo(resp) -> str:
    """Decide from the probe answer whether echo log-probs are "direct" or "shifted"; raise if neither."""
    try:
        tokens, tlp, top, n_prompt = _echo(resp, PROBE_ANSWER)
    except ScoreModeUnsupported as exc:
        raise ScoreModeUnsupported(f"{exc}; use llm.mode=generate with this server") from None
    except (AttributeError, IndexError, TypeError, _Garbage) as exc:
        raise ScoreModeUnsupported(f"the probe answer is not a completion with logprobs ({exc}); "
                                   "use llm.mode=generate with this server") from None
    i = n_prompt - 1
    if tokens[i].strip() != PROBE_ANSWER.strip():
        raise ScoreModeUnsupported(f"the probe's last prompt token is {tokens[i]!r}, not {PROBE_ANSWER!r}; "
                                   "cannot locate prompt log-probs; use llm.mode=generate")
    direct = tlp[i]
    shifted = (top[i - 1] or {}).get(tokens[i]) if i >= 1 else None
    if direct is not None and direct > PROBE_MIN_LOGPROB:
        return "direct"
    if shifted is not None and shifted > PROBE_MIN_LOGPROB:
        log.info("this server's echo log-probs are shifted by one token (%.2f at the token, %.2f one earlier); "
                 "correcting", direct if direct is not None else float("nan"), shifted)
        return "shifted"
    raise ScoreModeUnsupported(
        f"the server's echo log-probs look wrong: log p({PROBE_ANSWER!r} | {PROBE_PROMPT!r}) is reported as "
        f"{direct} at the token and {shifted} one token earlier, and neither is plausible (> {PROBE_MIN_LOGPROB}); "
        "use llm.mode=generate with this server")


def title_logprobs(resp, title: str, echo_mode: str) -> tuple[list[float], int]:
    """Log-probs of the title's tokens at the end of the echoed prompt, and how many were approximated.

    The title's tokens are the trailing prompt tokens whose text covers the title (servers' text offsets do not
    count special tokens, so we walk back over token strings instead).
    """
    tokens, tlp, top, n_prompt = _echo(resp, title)
    start, covered = n_prompt, 0
    while start > 0 and covered < len(title):
        start -= 1
        covered += len(tokens[start])
    out, approx = [], 0
    for i in range(start, n_prompt):
        if echo_mode == "direct":
            value = tlp[i]
        else:
            dist = top[i - 1] if i >= 1 else None
            if not dist:
                raise _Garbage("shifted echo without top_logprobs")
            value = dist.get(tokens[i])
            if value is None:
                value = min(dist.values())
                approx += 1
        if value is None:
            raise _Garbage(f"no log-prob for prompt token {i}")
        out.append(float(value))
    return out, approx


class OpenAIGenerator(TextGenerator):
    """Chat generation through an OpenAI-compatible server (the RPP+ refiner); None for a failed prompt."""

    def __init__(self, *, model: str, base_url: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 3, temperature: float = 0.0,
                 seed: int = 0, backoff_base_s: float = 0.5, backoff_max_s: float = 8.0) -> None:
        super().__init__()
        self.model, self.temperature, self.seed = model, temperature, seed
        self._client_args = dict(base_url=base_url, api_key_env=api_key_env, timeout_s=timeout_s,
                                 max_retries=max_retries, concurrency=concurrency, seed=seed,
                                 backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s)
        _Client(**self._client_args)
        self.identity = f"openai|{base_url or 'api.openai.com'}|{model}|temperature={temperature}|seed={seed}"

    def generate(self, prompts: Sequence[tuple], max_new_tokens: int) -> list[Optional[str]]:
        timer = timed()
        results = _run(self._generate_all(prompts, max_new_tokens))
        texts = [r[0] for r in results]
        self.usage.record_calls(calls=len(prompts), failures=sum(t is None for t in texts),
                                prompt_tokens=sum(r[1] for r in results),
                                completion_tokens=sum(r[2] for r in results),
                                retries=sum(r[3] for r in results), wall_s=timer.elapsed)
        return texts

    async def _generate_all(self, prompts, max_new_tokens):
        async with _Client(**self._client_args) as client:
            async def one(messages):
                async def ask():
                    resp = await client.sdk.chat.completions.create(
                        model=self.model, messages=[dict(m) for m in messages], temperature=self.temperature,
                        max_tokens=max_new_tokens, seed=self.seed)
                    return resp.choices[0].message.content, resp.usage
                try:
                    (text, usage), retries = await client.call(ask)
                except CallFailed as exc:
                    log.warning("generation failed: %s", exc)
                    return None, 0, 0, exc.retries
                return ((text or "").strip() or None, getattr(usage, "prompt_tokens", 0) or 0,
                        getattr(usage, "completion_tokens", 0) or 0, retries)
            return await asyncio.gather(*(one(p) for p in prompts))
