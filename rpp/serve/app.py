"""`rpp serve`: a trained run's prompt policy over HTTP (FastAPI on uvicorn).

FastAPI on uvicorn because it is the Python serving ecosystem's default ASGI stack (vLLM's and llama.cpp's
OpenAI-compatible servers use it): typed request bodies (pydantic, already an rpp dependency), OpenAPI docs at
/docs and /openapi.json for free, and an event loop that keeps many slow callers cheap.

Endpoints
    POST /v1/personalize  a user's history (+ optional ratings, candidates) -> each agent's action, the rendered chat
                          messages, and the source that served them ("policy" or the gate's "fixed" prompt)
    POST /v1/rank         the same, plus the ranking of the candidates by the run's configured ranker
    GET  /healthz         liveness, ranker state, counters (requests, bad inputs, ranker failures and timeouts)
    GET  /v1/run          the run: name, checkpoint, config digest, policy version, gate, action set
    GET  /docs            OpenAPI docs

Concurrency. The state encoder and the policy run on one worker thread, never on the event loop, and requests
that arrive within ``ServeOptions.batch_window_ms`` of each other share one encoder batch and one policy forward
(``MicroBatcher``); the ranker has its own thread and micro-batch (a local model ranks a batch in one padded pass,
a server backend sends the batch concurrently). A ranker that does not answer within ``rank_timeout_s`` gets a 504,
one whose call failed a 502 (timeouts from a server backend a 504 too), each counted in /healthz.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from pydantic import BaseModel, Field, StrictInt

from rpp.agents.serving import PromptPolicy, ServingInputError, UserRequest
from rpp.prompts import PATTERNS


@dataclass
class ServeOptions:
    """How the service runs (CLI flags of `rpp serve`); the run's config says everything else."""

    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; put a reverse proxy in front for anything else)."""
    port: int = 8080
    """TCP port."""
    batch_window_ms: float = 5.0
    """How long the first request of a micro-batch waits for others before the batch runs."""
    max_batch: int = 64
    """Most requests in one micro-batch (one encoder batch, one policy forward, one ranker call)."""
    max_candidates: int = 100
    """Most candidates one request may carry (more gets a 422 saying so)."""
    rank_timeout_s: float = 60.0
    """A /v1/rank request whose ranking takes longer gets a 504 (the ranker's own timeouts still apply)."""
    rank: bool = True
    """Load the run's ranker at start-up and serve /v1/rank (False: /v1/rank answers 503)."""
    threads: Optional[int] = None
    """torch threads of the encoder and policy (default: torch's)."""


# ------------------------------------------------------------------------------------------------ request bodies

Item = Union[StrictInt, str]


class PersonalizeBody(BaseModel):
    user: Optional[Item] = None
    """Your id for the user, echoed back (not used to personalize)."""
    history: list[Item] = Field(description="The user's items, oldest first: item ids of the run's dataset, or "
                                            "titles (all ids or all titles)")
    ratings: Optional[list[float]] = Field(None, description="One rating per history item (optional)")
    candidates: list[Item] = Field(default_factory=list, description="Items to rank (ids or titles); shown to "
                                                                     "the policy and written into the prompt")


class RankBody(PersonalizeBody):
    candidates: list[Item] = Field(min_length=1, description="Items to rank (ids or titles), presented order")


# ------------------------------------------------------------------------------------------------ micro-batching

class MicroBatcher:
    """Collects items submitted by concurrent callers for up to ``window_s`` (or ``max_batch`` items) and runs
    ``fn(items) -> results`` once for them on ``executor``; a result that is an Exception is raised to its caller
    alone. ``sizes`` counts the batches run, by size."""

    def __init__(self, fn: Callable[[list], list], executor: ThreadPoolExecutor, window_s: float,
                 max_batch: int) -> None:
        self.fn, self.executor, self.window_s, self.max_batch = fn, executor, window_s, max_batch
        self.queue: Optional[asyncio.Queue] = None
        self.sizes: dict[int, int] = {}
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def submit(self, item):
        """The (result, batch size) of item; waits for its batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.sizes[len(batch)] = self.sizes.get(len(batch), 0) + 1
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
            except Exception as exc:  # the whole batch failed: every caller hears why
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result((result, len(batch)))


# ------------------------------------------------------------------------------------------------ the service

@dataclass
class Counters:
    requests: int = 0
    bad_requests: int = 0
    """4xx answers (bad JSON, missing fields, unknown items, too many candidates, ...)."""
    personalized: int = 0
    ranked: int = 0
    rank_failures: int = 0
    """/v1/rank requests whose ranker call failed (502, or 504 for a server backend's timeout)."""
    rank_timeouts: int = 0
    """/v1/rank requests the ranker did not answer within rank_timeout_s (504)."""
    rank_unavailable: int = 0
    """/v1/rank requests refused because the ranker was off, loading or failed to load (503)."""


class Service:
    """The state behind the app: the policy, the ranker (loaded in the background), the batchers, the counters."""

    def __init__(self, run_dir: str | Path, options: ServeOptions, overrides: Optional[list[str]] = None) -> None:
        self.run_dir = Path(run_dir)
        self.options = options
        if options.threads:
            import torch

            torch.set_num_threads(options.threads)
        self.policy = PromptPolicy.load(run_dir, overrides)
        self.policy.dataset  # load the dataset (and its title index) now, not in the first request
        self.counters = Counters()
        self.ranker = None
        self.ranker_state = "off" if not options.rank else "loading"
        self._policy_pool = ThreadPoolExecutor(1, thread_name_prefix="rpp-policy")
        self._ranker_pool = ThreadPoolExecutor(1, thread_name_prefix="rpp-ranker")
        window = options.batch_window_ms / 1000
        self.personalizer = MicroBatcher(self._personalize, self._policy_pool, window, options.max_batch)
        self.ranking = MicroBatcher(self._rank, self._ranker_pool, window, options.max_batch)

    def load_ranker(self) -> None:
        from rpp.llm import make_ranker

        try:
            self.ranker = make_ranker(self.policy.cfg)
            self.ranker_state = "ready"
        except Exception as exc:  # reported by /healthz and every /v1/rank, never a crash of the service
            self.ranker_state = f"failed: {type(exc).__name__}: {exc}"

    def _personalize(self, requests: list[UserRequest]) -> list:
        t0 = time.perf_counter()
        prompts = self.policy.personalize_many(requests)
        ms = 1000 * (time.perf_counter() - t0)
        return [(p, ms) for p in prompts]

    def _rank(self, requests: list) -> list:
        t0 = time.perf_counter()
        rankings = self.ranker.rank(requests)
        ms = 1000 * (time.perf_counter() - t0)
        return [(r, ms) for r in rankings]

    def run_info(self) -> dict:
        p = self.policy
        return {
            "run": p.cfg.name, "run_dir": self.run_dir.name, "checkpoint": p.checkpoint,
            "config_digest": p.config_digest, "policy_version": p.version, "served": p.source,
            "gate": p.gate, "dataset": p.dataset.name,
            "action_set": {pat: [a.id for a in p.action_set.actions[pat]] for pat in PATTERNS},
            "policy_candidates": p.n_candidates, "max_candidates": self.options.max_candidates,
            "ranker": {"backend": p.cfg.llm.backend, "model": p.cfg.llm.model, "mode": p.cfg.llm.mode,
                       "state": self.ranker_state},
        }

    def close(self) -> None:
        self._policy_pool.shutdown(wait=False, cancel_futures=True)
        self._ranker_pool.shutdown(wait=False, cancel_futures=True)
        if self.ranker is not None:
            self.ranker.close()


def create_app(service: Service):
    """The FastAPI app over a Service."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        service.personalizer.start()
        service.ranking.start()
        if service.options.rank:
            threading.Thread(target=service.load_ranker, name="rpp-ranker-load", daemon=True).start()
        yield
        await service.personalizer.stop()
        await service.ranking.stop()
        service.close()

    app = FastAPI(title="rpp prompt policy", version=service.policy.version, lifespan=lifespan,
                  description="Personalized prompts from a trained rpp run (docs/serving.md).")

    def error(status: int, message: str, counter: Optional[str] = "bad_requests") -> JSONResponse:
        if counter:
            setattr(service.counters, counter, getattr(service.counters, counter) + 1)
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        service.counters.requests += 1
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            ctx = next(p for p in problems if p.get("type") == "json_invalid").get("ctx", {})
            return error(400, f"the request body is not valid JSON ({ctx.get('error', 'parse error')}); send a "
                              "JSON object such as {\"history\": [1, 50, 181], \"candidates\": [100, 258]}")
        lines = []
        for p in problems:
            where = ".".join(str(x) for x in p.get("loc", ()) if x != "body") or "body"
            hint = {"missing": "add it", "list_type": "send a JSON list",
                    "too_short": "send at least one"}.get(p.get("type", ""), "")
            lines.append(f"{where}: {p.get('msg')}" + (f" ({hint})" if hint else ""))
        return error(422, "; ".join(lines))

    async def personalize(body: PersonalizeBody):
        """(response dict, or an error JSONResponse), UserRequest checked, policy ms."""
        service.counters.requests += 1
        try:
            checked = service.policy.check(UserRequest(tuple(body.history), tuple(body.ratings) if body.ratings
                                                       is not None else None, tuple(body.candidates)),
                                           service.options.max_candidates)
        except ServingInputError as exc:
            return error(422, str(exc)), None
        t0 = time.perf_counter()
        (prompt, batch_ms), batch_size = await service.personalizer.submit(checked)
        service.counters.personalized += 1
        return {
            "user": body.user, "source": service.policy.source, "policy_version": service.policy.version,
            "actions": dict(prompt.action_ids), "messages": [dict(m) for m in prompt.rendered_messages],
            "batch_size": batch_size,
            "timings": {"policy_ms": round(batch_ms, 3), "wait_ms": round(1000 * (time.perf_counter() - t0), 3)},
            "_prompt": prompt,
        }, checked

    @app.post("/v1/personalize")
    async def post_personalize(body: PersonalizeBody):
        """The prompt the run serves this user."""
        out, _ = await personalize(body)
        if isinstance(out, JSONResponse):
            return out
        out.pop("_prompt")
        return out

    @app.post("/v1/rank")
    async def post_rank(body: RankBody):
        """The prompt the run serves this user, and the ranker's ranking of the candidates under it."""
        out, checked = await personalize(body)
        if isinstance(out, JSONResponse):
            return out
        prompt = out.pop("_prompt")
        if service.ranker_state != "ready":
            return error(503, f"the ranker is {service.ranker_state}" + (
                "; retry in a few seconds" if service.ranker_state == "loading" else
                "; start `rpp serve` without --no-rank" if service.ranker_state == "off" else
                "; fix the run's llm config (or --set llm.*) and restart"), "rank_unavailable")
        from rpp.llm.base import RankRequest

        request = RankRequest(messages=prompt.messages, candidates=checked.candidates)
        try:
            (ranking, ranker_ms), _ = await asyncio.wait_for(asyncio.shield(service.ranking.submit(request)),
                                                             service.options.rank_timeout_s)
        except asyncio.TimeoutError:
            return error(504, f"the ranker did not answer within {service.options.rank_timeout_s:g} s "
                              "(rpp serve --rank-timeout-s); the prompt is in /v1/personalize", "rank_timeouts")
        except Exception as exc:  # the ranker raised (e.g. a server that cannot score): a counted 502, not a 500
            return error(502, f"the ranker failed: {type(exc).__name__}: {exc}", "rank_failures")
        if ranking.failed:
            status = 504 if "Timeout" in (ranking.error or "") else 502
            return error(status, f"the ranker failed: {ranking.error}", "rank_failures")
        service.counters.ranked += 1
        out["ranking"] = [checked.candidates[i] for i in ranking.order]
        out["order"] = list(ranking.order)
        out["scores"] = ranking.scores
        out["cached"] = ranking.cached
        out["timings"]["ranker_ms"] = round(ranker_ms, 3)
        return out

    @app.get("/healthz")
    async def healthz():
        """Liveness, ranker state and counters."""
        return {"status": "ok", "served": service.policy.source, "ranker": service.ranker_state,
                "counters": asdict(service.counters),
                "batches": {"policy": dict(sorted(service.personalizer.sizes.items())),
                            "ranker": dict(sorted(service.ranking.sizes.items()))}}

    @app.get("/v1/run")
    async def run_info():
        """The served run: config digest, checkpoint, action set, the gate's decision."""
        return service.run_info()

    return app


def serve(run_dir: str | Path, options: ServeOptions, overrides: Optional[list[str]] = None) -> None:
    """Load the run and serve it until interrupted (uvicorn)."""
    import uvicorn

    service = Service(run_dir, options, overrides)
    print(f"rpp serve: {service.policy.version} on http://{options.host}:{options.port} "
          f"(docs: /docs; ranker {'loading' if options.rank else 'off'})", flush=True)
    uvicorn.run(create_app(service), host=options.host, port=options.port, log_level="warning")
