"""rpp's OpenAI-compatible backend against a REAL vLLM server (marker `vllm`; `make vllm` builds its virtualenv).

One server for the whole session, serving the embedded SmolLM2 in float32 (tests/vllm_server.py); a handful of
requests. These are vLLM's own expectations: its echo log-probs are direct (not shifted like llama-cpp-python's
plain-text echo, see tests/test_llm_openai.py), and it rejects requests it cannot serve with HTTP 400.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_server import VLLM_PYTHON, VllmServer, smollm2_float32_folder, taskwise_requests  # noqa: E402

from rpp.llm import RankRequest  # noqa: E402
from rpp.llm import openai_backend  # noqa: E402
from rpp.llm.openai_backend import OpenAIRanker  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.llm]

SCORE_TOLERANCE = 1e-2
"""Per-title log-prob sums, vLLM vs the local backend, both float32 on the same weights: the same arithmetic up to
kernel order (measured differences are ~1e-4); 1e-2 nats is far below any gap that decides an order."""


@pytest.fixture(scope="session")
def vllm_server():
    if not VLLM_PYTHON.is_file():
        pytest.skip("no vLLM virtualenv (make vllm builds .venv-vllm; make test does it too)")
    server = VllmServer(smollm2_float32_folder()).start(timeout_s=420)
    yield server
    server.stop()
    assert not server.alive_processes(), "a process of the vLLM server outlived its teardown"
    assert not server.scratch.exists(), "the vLLM server's scratch folder outlived its teardown"


@pytest.fixture
def ranker(vllm_server):
    """Makes OpenAIRankers for the session's server (score mode unless told) and closes them after the test."""
    made = []

    def make(**kw) -> OpenAIRanker:
        args = dict(model=vllm_server.served_name, base_url=vllm_server.base_url, mode="score", concurrency=8,
                    timeout_s=300, max_retries=1, backoff_base_s=0.01, backoff_max_s=0.05)
        args.update(kw)
        made.append(OpenAIRanker(**args))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_probe_reads_vllm_echo_directly(vllm_server, ranker):
    """vLLM pairs each prompt token with its OWN log-prob (the first token has none): the echo of the probe text
    equals, token by token, what the local float32 model computes on the same token ids, and the probe says
    "direct"."""
    import openai
    import torch

    from rpp.llm.local import load_model

    remote = ranker()
    text = remote.template(openai_backend.PROBE_MESSAGES) + openai_backend.PROBE_PROMPT + openai_backend.PROBE_ANSWER
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key="no-key-needed", max_retries=0, timeout=120)
    resp = client.completions.create(model=vllm_server.served_name, prompt=text, echo=True, logprobs=1,
                                     max_tokens=1, temperature=0.0)
    loaded = load_model(vllm_server.served_name, "float32")
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    echo = resp.choices[0].logprobs
    assert len(echo.tokens) == len(ids) + 1  # the prompt, then the one generated token
    assert echo.token_logprobs[0] is None
    assert max(abs(g - w) for g, w in zip(echo.token_logprobs[1:len(ids)], want)) < 1e-3
    assert openai_backend.classify_echo(resp) == "direct"
    assert remote.probe() == "direct"


def test_score_mode_orders_equal_the_local_backend(ranker, smollm_ranker):
    """Task-wise prompts of 3 ML-100K test users, 20 candidates each: the same orders as the local float32 backend,
    per-title scores within SCORE_TOLERANCE."""
    requests = taskwise_requests(3)
    remote = ranker()
    got = remote.rank(requests)
    want = smollm_ranker.rank(requests)
    assert remote.echo_mode == "direct"
    for g, w in zip(got, want):
        assert not g.failed, g.error
        assert max(abs(a - b) for a, b in zip(g.scores, w.scores)) < SCORE_TOLERANCE
        assert g.order == w.order
    usage = remote.usage.snapshot()
    assert usage.failures == 0 and usage.calls == len(requests) and usage.prompt_tokens > 0


def test_generate_mode(ranker):
    gen = ranker(mode="generate", max_new_tokens=60)
    requests = taskwise_requests(2, mode="generate")
    first, second = gen.rank(requests), gen.rank(requests)
    for a, b in zip(first, second):
        assert not a.failed and a.raw and sorted(a.order) == list(range(len(requests[0].candidates)))
        assert a.order == b.order  # temperature 0: deterministic
    assert gen.usage.snapshot().completion_tokens > 0


def test_requests_vllm_rejects_are_clear_counted_failures(ranker, monkeypatch):
    """A prompt past the context length and a logprobs count above vLLM's limit (20) are rejected with HTTP 400:
    each comes back at once (no retries) as a failed ranking in presented order, with vLLM's reason, and counted."""
    remote = ranker(max_retries=3)
    too_long = RankRequest(({"role": "user", "content": "Toy Story (1995), " * 1200},),  # ~8,000 tokens > 2,048
                           ("Fargo (1996)", "Heat (1995)"))
    ok = taskwise_requests(1)[0]
    out = remote.rank([too_long, ok])
    assert out[0].failed and out[0].order == [0, 1] and out[0].retries == 0
    assert "BadRequest" in out[0].error and re.search(r"maximum (context|model) length", out[0].error)
    assert not out[1].failed
    usage = remote.usage.snapshot()
    assert usage.failures == 1 and usage.calls == 2

    monkeypatch.setattr(openai_backend, "TOP_LOGPROBS", 21)  # what the shifted-echo correction would ask for
    remote.echo_mode = "shifted"
    r = remote.rank([ok])[0]
    assert r.failed and r.retries == 0 and r.order == list(range(len(ok.candidates)))
    assert "BadRequest" in r.error and "logprobs" in r.error.lower()
    assert remote.usage.snapshot().failures == 2
