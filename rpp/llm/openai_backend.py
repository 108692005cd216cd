"""The OpenAI-compatible backend: any server speaking /v1/chat/completions and /v1/completions (vLLM, llama.cpp,
Ollama, hosted providers).

Generate mode asks the chat endpoint for a ranked list and parses it. Score mode needs prompt log-probs, which only
/v1/completions with ``echo=True`` + ``logprobs`` gives; that endpoint takes raw text, so the chat template is
rendered here: the embedded model's own template (from its tokenizer; a base model such as gemma3-270m gets the
local backend's plain-text rendering, ``rpp.llm.local.render_prompt``) when ``model`` names an embedded model or a
local folder, else a plain ChatML template (``<|im_start|>role\\ncontent<|im_end|>\\n`` ... ``<|im_start|>assistant\\n``).

Servers disagree about echo log-probs. vLLM's are correct; llama.cpp's own server returns none;
llama-cpp-python 0.3.36 pairs token i with the distribution AFTER it (the right value sits in
``top_logprobs[i-1]``) unless the prompt starts with the model's BOS token, in which case dropping that BOS
realigns everything and the numbers are right (SmolLM2's chat template starts with ``<|im_start|>``, its BOS, so
chat-templated prompts come out correct while plain text comes out shifted). So before scoring, the backend
probes the server once with a chat-templated "The capital of France is Paris" and either reads the numbers
directly, corrects the shift, or raises ``ScoreModeUnsupported``. In shifted mode a title token missing from the previous position's top-k gets the
smallest listed top-k value (an upper bound on its log-prob); such tokens are counted in ``approximated_tokens``.

Every HTTP call goes through one retry loop: rate limits (429), 5xx, timeouts and refused or dropped connections
are retried with exponential backoff and jitter up to ``max_retries`` times (the SDK's own retries are off so that
each retry is counted); then the request comes back as a counted failure in presented order, its error naming the
typed error (RateLimitError, LLMTimeoutError, ServerError). An answer that is not what the API promises (invalid
JSON, no choices, no log-probs) is NOT retried (the same request gets the same answer): it is a failure counted
apart in ``usage.unparseable``. Exceptions of our own code are never retried nor counted: they propagate.

Each backend holds ONE AsyncOpenAI client (one connection pool) for its lifetime, on its own event-loop thread;
``rank()`` stays synchronous for the caller (from any thread, inside a running event loop too) and at most
``concurrency`` calls are in flight. ``close()`` releases the client and its thread.
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
    LLMCallError, LLMError, LLMTimeoutError, Ranker, Ranking, RankRequest, RateLimitError, ScoreModeUnsupported,
    ServerError, TextGenerator, UnparseableResponse, render_candidates, timed,
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


def _chatml(messages: Sequence[dict]) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def chat_template_for(model: str) -> Callable[[Sequence[dict]], str]:
    """Render chat messages to raw text the way `model` expects (falls back to ChatML; see module docstring)."""
    from rpp.assets import ASSETS

    if model in ASSETS or Path(model).expanduser().is_dir():
        from rpp.llm.local import load_tokenizer, render_prompt

        tokenizer = load_tokenizer(model)
    else:
        log.info("no local tokenizer for '%s': rendering prompts with the ChatML template", model)
        return _chatml
    base_model = model in ASSETS and ASSETS[model].base_model

    def render(messages: Sequence[dict]) -> str:
        return render_prompt(tokenizer, messages, base_model)

    return render


class _Client:
    """One AsyncOpenAI client with our retry policy and a concurrency limit, on an event loop of its own thread.

    Started on first use and kept until close(), so every rank() of a backend shares one connection pool."""

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
        self._start_lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.sdk = None
        self.sem: Optional[asyncio.Semaphore] = None
        self.sdk_clients_created = 0
        """How many AsyncOpenAI clients this backend made (one per start; the tests check it stays at one)."""

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                from openai import AsyncOpenAI

                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="rpp-openai-client", daemon=True)
                thread.start()

                async def create() -> None:
                    self.sdk = AsyncOpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout_s,
                                           max_retries=0)
                    self.sem = asyncio.Semaphore(self.concurrency)

                asyncio.run_coroutine_threadsafe(create(), loop).result()
                self._loop, self._thread = loop, thread
                self.sdk_clients_created += 1
            return self._loop

    def run(self, coro: Awaitable):
        """Run a coroutine on the client's loop and wait for its result (or exception) in the calling thread."""
        loop = self._started_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("rank()/generate() called from inside the OpenAI backend's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def close(self) -> None:
        with self._start_lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            if loop is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(self.sdk.close(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                loop.close()
                self.sdk = self.sem = None

    def backoff(self, attempt: int, retry_after: Optional[float] = None) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)) * (0.5 + self._rng.random())
        return max(delay, retry_after or 0.0)

    async def call(self, fn: Callable[[], Awaitable], parse: Callable = lambda resp: resp):
        """``parse(await fn())`` with bounded retries of transport and server errors; returns (value, retries).

        Raises a typed LLMCallError when the call still fails after its retries, at once for a 4xx other than
        429, and UnparseableResponse (not retried) when the SDK cannot decode the body or `parse` finds it
        malformed. Any other exception is a bug of ours and propagates untouched."""
        import openai

        retries = 0
        for attempt in range(self.max_retries + 1):
            try:
                async with self.sem:
                    resp = await fn()
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
                if attempt == self.max_retries:
                    raise _transport_error(exc)(f"{type(exc).__name__}: {exc} (after {retries} retries)",
                                                retries) from exc
                retries += 1
                retry_after = None
                if isinstance(exc, openai.RateLimitError):
                    try:
                        retry_after = float(exc.response.headers.get("retry-after", ""))
                    except ValueError:
                        retry_after = None
                await asyncio.sleep(self.backoff(attempt, min(retry_after or 0.0, self.backoff_max_s)))
                continue
            except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
                raise UnparseableResponse(f"{type(exc).__name__}: {exc}", retries) from exc
            except openai.APIStatusError as exc:  # 4xx other than 429: our request is wrong, retrying won't help
                raise LLMCallError(f"{type(exc).__name__}: {exc}", retries) from exc
            try:
                return parse(resp), retries
            except UnparseableResponse as exc:
                exc.retries = retries
                raise
        raise AssertionError("unreachable")


def _transport_error(exc: Exception) -> type[LLMCallError]:
    """Our typed error for a transport or server failure of the SDK."""
    import openai

    if isinstance(exc, openai.RateLimitError):
        return RateLimitError
    if isinstance(exc, openai.APITimeoutError):
        return LLMTimeoutError
    return ServerError


def _first_choice(resp):
    """The first choice of a completion, or UnparseableResponse when the body has none."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise UnparseableResponse("the answer has no choices")
    return choices[0]


def _token_usage(resp) -> tuple[int, int]:
    usage = getattr(resp, "usage", None)
    counts = (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
    if not all(isinstance(c, int) for c in counts):
        raise UnparseableResponse(f"the answer's usage is not token counts: {usage!r}")
    return counts


def chat_answer(resp) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of a chat completion; UnparseableResponse if it is malformed."""
    choice = _first_choice(resp)
    text = getattr(getattr(choice, "message", None), "content", None)
    if text is None and getattr(choice, "finish_reason", None) != "length":
        raise UnparseableResponse("the chat answer has no content")
    if text is not None and not isinstance(text, str):
        raise UnparseableResponse(f"the chat answer's content is a {type(text).__name__}, not text")
    return (text or "", *_token_usage(resp))


def _failed(n: int, exc: LLMCallError, wall_s: float) -> Ranking:
    failed = Ranking.presented_order(n, f"{type(exc).__name__}: {exc}", retries=exc.retries,
                                     unparseable=isinstance(exc, UnparseableResponse))
    failed.wall_s = wall_s
    return failed


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
        self.base_url = base_url
        # fails now, not mid-run, when the key is missing; the SDK client itself starts on the first call
        self.client = _Client(base_url=base_url, api_key_env=api_key_env, timeout_s=timeout_s,
                              max_retries=max_retries, concurrency=concurrency, seed=seed,
                              backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s)
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
        rankings = self.client.run(self._rank_all(requests))
        self.usage.record(rankings, wall_s=timer.elapsed)
        return rankings

    def probe(self) -> str:
        """Ask the server for the echo log-probs of an obvious answer; "direct", "shifted", or raise.

        The probe goes through the same chat template as real requests: llama-cpp-python's alignment depends on
        whether the prompt starts with the BOS token (SmolLM2's template starts with it, plain text does not),
        so a probe on plain text would describe a different situation than the one we score in."""
        text = self.template(PROBE_MESSAGES) + PROBE_PROMPT + PROBE_ANSWER
        client = self.client
        try:
            echo_mode, _ = client.run(client.call(lambda: client.sdk.completions.create(
                model=self.model, prompt=text, echo=True, logprobs=5, max_tokens=1, temperature=0.0),
                parse=classify_echo))
        except LLMCallError as exc:
            raise ScoreModeUnsupported(f"score mode needs /v1/completions with echo + logprobs, and the probe "
                                       f"call to {self.base_url} failed: {type(exc).__name__}: {exc}") from exc
        return echo_mode

    # -- async internals (on the client's loop)
    async def _rank_all(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        work = self._score_one if self.mode == "score" else self._generate_one
        results = await asyncio.gather(*(work(r) for r in requests), return_exceptions=True)
        for r in results:  # a bug of ours: raise it, after every request of the batch has settled
            if isinstance(r, BaseException):
                raise r
        return list(results)

    async def _generate_one(self, req: RankRequest) -> Ranking:
        timer = timed()
        client = self.client
        try:
            (text, prompt_tokens, completion_tokens), retries = await client.call(
                lambda: client.sdk.chat.completions.create(
                    model=self.model, messages=list(req.messages), temperature=self.temperature,
                    max_tokens=self.max_new_tokens, seed=self.seed),
                parse=chat_answer)
        except LLMCallError as exc:
            return _failed(len(req.candidates), exc, timer.elapsed)
        parsed = parse_ranking(text, req.candidates)
        return Ranking(order=parsed.order, coverage=parsed.coverage, raw=text, retries=retries,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, wall_s=timer.elapsed)

    async def _score_one(self, req: RankRequest) -> Ranking:
        timer = timed()
        client = self.client
        prefix = self.template(req.messages)
        echo_mode = self.echo_mode or "direct"
        logprobs = TOP_LOGPROBS if echo_mode == "shifted" else 1

        def parse(title: str):
            def read(resp) -> tuple[list[float], int, int]:
                lps, approx = title_logprobs(resp, title, echo_mode)
                return lps, approx, _token_usage(resp)[0]
            return read

        results = await asyncio.gather(*(client.call(
            lambda t=title: client.sdk.completions.create(model=self.model, prompt=prefix + t, echo=True,
                                                          logprobs=logprobs, max_tokens=1, temperature=0.0),
            parse=parse(title)) for title in req.candidates), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, LLMCallError):
                raise r
        errors = [r for r in results if isinstance(r, LLMCallError)]
        retries = sum(e.retries for e in errors) + sum(r[1] for r in results if isinstance(r, tuple))
        if errors:
            first = errors[0]
            failed = _failed(len(req.candidates), first, timer.elapsed)
            failed.error = f"{len(errors)} of {len(results)} candidate calls failed; first: {failed.error}"
            failed.retries = retries
            failed.unparseable = any(isinstance(e, UnparseableResponse) for e in errors)
            return failed
        values = [r[0] for r in results]
        self.approximated_tokens += sum(v[1] for v in values)
        from rpp.llm.local import reduce_scores

        scores = reduce_scores([v[0] for v in values], self.reduction)
        return Ranking(order=order_from_scores(scores), scores=scores, coverage=1.0,
                       prompt_tokens=sum(v[2] for v in values), retries=retries, wall_s=timer.elapsed)

    def close(self) -> None:
        self.client.close()


def _echo(resp, suffix: str) -> tuple[list[str], list, list, int]:
    """tokens, token_logprobs, top_logprobs, and the number of entries up to the end of the prompt, which ends
    with `suffix` (the title, or the probe's answer).

    The end is found by text, not by usage counts: llama-cpp-python leaves BOS-id tokens out of the echo and,
    depending on alignment, drops the completion's entry, so neither usage.prompt_tokens nor
    usage.completion_tokens says where the prompt ends there. The echo has one completion token at most.
    ScoreModeUnsupported when the answer has no log-probs at all, UnparseableResponse when they are malformed."""
    lp = getattr(_first_choice(resp), "logprobs", None)
    if lp is None or not getattr(lp, "tokens", None) or getattr(lp, "token_logprobs", None) is None:
        raise ScoreModeUnsupported("the server returned no prompt log-probs for echo=True")
    tokens, tlp = lp.tokens, lp.token_logprobs
    top = lp.top_logprobs if lp.top_logprobs is not None else [None] * len(tokens)
    if not (isinstance(tokens, list) and isinstance(tlp, list) and isinstance(top, list)
            and len(tokens) == len(tlp) == len(top) and all(isinstance(t, str) for t in tokens)):
        raise UnparseableResponse("the echo's tokens, token_logprobs and top_logprobs are not aligned lists")

    def fold(text: str) -> str:  # byte-split characters come back mangled; compare on ASCII
        return text.encode("ascii", "ignore").decode()

    for end in range(len(tokens), max(0, len(tokens) - 3), -1):
        joined = "".join(tokens[:end])
        if joined.endswith(suffix) or (fold(suffix) and fold(joined).endswith(fold(suffix))):
            return list(tokens), list(tlp), list(top), end
    raise UnparseableResponse(f"the echoed tokens do not end with {suffix!r}")


def classify_echo(resp) -> str:
    """Decide from the probe answer whether echo log-probs are "direct" or "shifted"; raise if neither."""
    try:
        tokens, tlp, top, n_prompt = _echo(resp, PROBE_ANSWER)
    except ScoreModeUnsupported as exc:
        raise ScoreModeUnsupported(f"{exc}; use llm.mode=generate with this server") from None
    except UnparseableResponse as exc:
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
    count special tokens, so we walk back over token strings instead). UnparseableResponse where the echo lacks
    what scoring needs (after a successful probe, a missing log-prob is a malformed answer, not a mode problem).
    """
    try:
        tokens, tlp, top, n_prompt = _echo(resp, title)
    except ScoreModeUnsupported as exc:
        raise UnparseableResponse(str(exc)) from None
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
            if not dist or not isinstance(dist, dict):
                raise UnparseableResponse("shifted echo without top_logprobs")
            value = dist.get(tokens[i])
            if value is None:
                value = min(dist.values())
                approx += 1
        if not isinstance(value, (int, float)):
            raise UnparseableResponse(f"no log-prob for prompt token {i}")
        out.append(float(value))
    return out, approx


class OpenAIGenerator(TextGenerator):
    """Chat generation through an OpenAI-compatible server (the RPP+ refiner); None for a failed prompt."""

    def __init__(self, *, model: str, base_url: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 3, temperature: float = 0.0,
                 seed: int = 0, backoff_base_s: float = 0.5, backoff_max_s: float = 8.0) -> None:
        super().__init__()
        self.model, self.temperature, self.seed = model, temperature, seed
        self.client = _Client(base_url=base_url, api_key_env=api_key_env, timeout_s=timeout_s,
                              max_retries=max_retries, concurrency=concurrency, seed=seed,
                              backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s)
        self.identity = f"openai|{base_url or 'api.openai.com'}|{model}|temperature={temperature}|seed={seed}"

    def generate(self, prompts: Sequence[tuple], max_new_tokens: int) -> list[Optional[str]]:
        timer = timed()
        results = self.client.run(self._generate_all(prompts, max_new_tokens))
        texts = [r[0] for r in results]
        self.usage.record_calls(calls=len(prompts), failures=sum(t is None for t in texts),
                                prompt_tokens=sum(r[1] for r in results),
                                completion_tokens=sum(r[2] for r in results),
                                retries=sum(r[3] for r in results), unparseable=sum(r[4] for r in results),
                                wall_s=timer.elapsed)
        return texts

    async def _generate_all(self, prompts, max_new_tokens):
        client = self.client

        async def one(messages):
            try:
                (text, prompt_tokens, completion_tokens), retries = await client.call(
                    lambda: client.sdk.chat.completions.create(
                        model=self.model, messages=[dict(m) for m in messages], temperature=self.temperature,
                        max_tokens=max_new_tokens, seed=self.seed),
                    parse=chat_answer)
            except LLMCallError as exc:
                log.warning("generation failed: %s: %s", type(exc).__name__, exc)
                return None, 0, 0, exc.retries, isinstance(exc, UnparseableResponse)
            return text.strip() or None, prompt_tokens, completion_tokens, retries, False

        results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def close(self) -> None:
        self.client.close()
