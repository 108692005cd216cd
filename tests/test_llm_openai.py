"""The OpenAI-compatible backend: faults against a misbehaving local endpoint, and the REAL llama.cpp server."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import FakeEndpoint, LlamaServer  # noqa: E402

from rpp.llm import RankRequest, ScoreModeUnsupported  # noqa: E402
from rpp.llm.openai_backend import OpenAIRanker  # noqa: E402

CANDS = ("Fargo (1996)", "Heat (1995)", "Se7en (1995)")


def gen_request(tag: str) -> RankRequest:
    listing = "\n".join(f"{i}. {t}" for i, t in enumerate(CANDS, start=1))
    return RankRequest(({"role": "user", "content": f"{tag}\nRank these:\n{listing}"},), CANDS)


@pytest.fixture(scope="module")
def fake():
    with FakeEndpoint(sleep_s=6.0) as endpoint:
        yield endpoint


def make(fake, **kw) -> OpenAIRanker:
    args = dict(model="fake", base_url=fake.base_url, mode="generate", timeout_s=2.0, max_retries=2,
                backoff_base_s=0.01, backoff_max_s=0.05, concurrency=8)
    args.update(kw)
    return OpenAIRanker(**args)


@pytest.mark.slow
def test_faults_are_retried_boundedly_counted_and_do_not_spoil_the_batch(fake):
    ranker = make(fake)
    tags = ["ok-1", "FAULT=500", "FAULT=429", "FAULT=SLEEP", "FAULT=DROP", "FAULT=GARBAGE", "FAULT=NOCHOICES",
            "FAULT=FLAKY", "ok-2"]
    fake.hits.clear()
    out = ranker.rank([gen_request(t) for t in tags])
    ranker.close()
    assert len(out) == len(tags)
    by_tag = dict(zip(tags, out))
    for tag in ("ok-1", "ok-2", "FAULT=FLAKY"):  # FLAKY: two 500s, then it answers
        r = by_tag[tag]
        assert not r.failed and r.order == [2, 1, 0] and r.coverage == 1.0
    assert by_tag["FAULT=FLAKY"].retries == 2
    typed = {"FAULT=500": "ServerError", "FAULT=429": "RateLimitError", "FAULT=SLEEP": "LLMTimeoutError",
             "FAULT=DROP": "ServerError"}
    for tag, error in typed.items():  # transport and server errors: retried, then a counted failure
        r = by_tag[tag]
        assert r.failed and not r.unparseable and r.order == [0, 1, 2] and r.retries == 2
        assert r.error.startswith(error + ":"), r.error
        assert fake.hits[tag] == 3  # first attempt + max_retries, never more
    for tag in ("FAULT=GARBAGE", "FAULT=NOCHOICES"):  # a malformed answer: the same request gets it again
        r = by_tag[tag]
        assert r.failed and r.unparseable and r.order == [0, 1, 2] and r.retries == 0
        assert r.error.startswith("UnparseableResponse:"), r.error
        assert fake.hits[tag] == 1
    usage = ranker.usage.snapshot()
    assert usage.failures == 6 and usage.unparseable == 2 and usage.retries == 4 * 2 + 2
    assert usage.calls == len(tags) and ranker.usage.batches == 1


def test_a_server_error_is_retried_exactly_max_retries_times(fake):
    for max_retries in (0, 1, 3):
        ranker = make(fake, max_retries=max_retries)
        fake.hits.clear()
        r = ranker.rank([gen_request(f"FAULT=500 #{max_retries}")])[0]
        ranker.close()
        assert fake.hits["FAULT=500"] == max_retries + 1
        assert r.failed and r.retries == max_retries and r.error.startswith("ServerError:")
        assert ranker.usage.snapshot().retries == max_retries


def test_a_timeout_is_a_counted_failure_after_its_retries():
    with FakeEndpoint(sleep_s=3.0) as slow:
        ranker = make(slow, timeout_s=0.3, max_retries=1)
        r = ranker.rank([gen_request("FAULT=SLEEP"), gen_request("fine")])
        ranker.close()
        assert slow.hits["FAULT=SLEEP"] == 2 and slow.hits["OK"] == 1
    assert r[0].failed and r[0].retries == 1 and r[0].error.startswith("LLMTimeoutError:")
    assert not r[1].failed and r[1].order == [2, 1, 0]
    usage = ranker.usage.snapshot()
    assert usage.failures == 1 and usage.unparseable == 0 and usage.retries == 1 and usage.calls == 2


def test_a_bug_of_ours_while_reading_an_answer_is_raised_not_retried_nor_counted(fake, monkeypatch):
    from rpp.llm import openai_backend

    ranker = make(fake, mode="score", template=lambda msgs: "Question: " + msgs[-1]["content"] + "\nAnswer:")
    req = RankRequest(({"role": "user", "content": "pick"},), CANDS)
    assert not ranker.rank([req])[0].failed  # the probe and a normal scoring work

    def broken(resp, title, echo_mode):
        raise TypeError("a bug in our reading of the echo")

    monkeypatch.setattr(openai_backend, "title_logprobs", broken)
    fake.hits.clear()
    with pytest.raises(TypeError, match="a bug in our reading"):
        ranker.rank([req])
    ranker.close()
    assert fake.hits["OK"] == len(CANDS)  # one call per candidate, none retried
    assert ranker.usage.snapshot().failures == 0


def test_one_client_and_one_connection_for_the_backends_lifetime():
    """rank() after rank(), from plain code and from inside a running event loop, reuses the backend's one
    AsyncOpenAI client, so the server sees one keep-alive connection, not one per call."""
    import asyncio

    with FakeEndpoint() as server:
        ranker = make(server, concurrency=1)
        for i in range(3):
            assert ranker.rank([gen_request(f"call {i}")])[0].order == [2, 1, 0]

        async def inside_a_loop():
            return ranker.rank([gen_request("from a coroutine")])

        assert asyncio.run(inside_a_loop())[0].order == [2, 1, 0]
        assert server.hits["OK"] == 4 and server.connections == 1
        assert ranker.client.sdk_clients_created == 1
        ranker.close()
        ranker.rank([gen_request("after close")])  # a closed backend starts a new client when used again
        assert ranker.client.sdk_clients_created == 2 and server.connections == 2
        ranker.close()


def test_generator_counts_malformed_answers_apart(fake):
    from rpp.llm.openai_backend import OpenAIGenerator

    gen = OpenAIGenerator(model="fake", base_url=fake.base_url, timeout_s=2.0, max_retries=2, backoff_base_s=0.01,
                          backoff_max_s=0.05)
    fake.hits.clear()
    out = gen.generate([({"role": "user", "content": "FAULT=GARBAGE"},), ({"role": "user", "content": "1. a"},)],
                       max_new_tokens=8)
    gen.close()
    assert out == [None, "1. [1]"] and fake.hits["FAULT=GARBAGE"] == 1
    usage = gen.usage.snapshot()
    assert usage.failures == 1 and usage.unparseable == 1 and usage.retries == 0


def test_non_retryable_client_error_fails_at_once(fake):
    ranker = make(fake)
    fake.hits.clear()
    r = ranker.rank([gen_request("FAULT=400")])[0]
    ranker.close()
    assert r.failed and r.retries == 0 and "BadRequest" in r.error and fake.hits["FAULT=400"] == 1
    assert r.error.startswith("LLMCallError:") and not r.unparseable
    assert ranker.usage.snapshot().failures == 1


def test_score_mode_refused_when_the_server_gives_no_logprobs(fake):
    ranker = make(fake, mode="score", template=lambda msgs: "ECHO=NONE " + msgs[-1]["content"] + "\n")
    with pytest.raises(ScoreModeUnsupported, match="no prompt log-probs"):
        ranker.rank([gen_request("x")])


def test_score_mode_reads_a_correct_echo_directly(fake):
    # The fake's echo is correct: -0.2 for " Paris" after the probe prompt, -1 for every other token.
    ranker = make(fake, mode="score", template=lambda msgs: "Question: " + msgs[-1]["content"] + "\nAnswer:")
    cands = ("Heat (1995)", "The Usual Suspects (1995)", "Se7en (1995)")
    r = ranker.rank([RankRequest(({"role": "user", "content": "pick"},), cands)])[0]
    assert ranker.echo_mode == "direct"
    # Whitespace tokens of the fake: "(1995)" glued to the previous word, so Heat = 2 tokens, Usual Suspects = 4.
    assert r.scores == [-2.0, -4.0, -2.0] and r.order == [0, 2, 1]


# ------------------------------------------------------------------------------------- the real llama.cpp server

@pytest.fixture(scope="session")
def llama_server():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test installs llama-cpp-python[server]==0.3.36)")
    from rpp.llm.local import gguf_path

    server = LlamaServer(gguf_path("smollm2-135m-instruct"), alias="smollm2-135m-instruct").start(timeout_s=120)
    yield server
    server.stop()


@pytest.fixture
def live_server(llama_server):
    """The session's server, checked before and after each test: a crashed server fails with its exit code and
    log, not as a bare connection error."""
    llama_server.assert_alive()
    yield llama_server
    llama_server.assert_alive()


SHORT = RankRequest(
    ({"role": "user", "content": "I loved Toy Story (1995) and Aladdin (1992). Which movie next? Title only."},),
    ("Fargo (1996)", "Toy Story 2 (1999)", "Lion King, The (1994)", "Schindler's List (1993)"))


@pytest.mark.llm
@pytest.mark.server
def test_real_server_score_mode_agrees_with_the_local_backend(live_server):
    """Same prompt, same candidates: llama.cpp on the Q4_1 weights vs torch on their fp32 dequantization.
    The two differ in arithmetic (llama.cpp quantizes activations for its Q4_1 matmuls) and, for some titles,
    in tokenization ("Toy" vs "T"+"oy"), so per-title sums may differ by up to ~1 nat; we require the same top
    item and Kendall tau >= 0.6 over the 4 candidates (at most one swapped pair), and |diff| < 1.5 per title."""
    from scipy.stats import kendalltau

    from rpp.llm.local import LocalRanker

    remote = OpenAIRanker(model="smollm2-135m-instruct", base_url=live_server.base_url, mode="score",
                          concurrency=2, timeout_s=120, max_retries=1)
    r = remote.rank([SHORT])[0]
    assert remote.echo_mode == "direct"  # chat prompts start with BOS, which realigns llama-cpp-python's echo
    local = LocalRanker(mode="score", dtype="float32", threads=1).rank([SHORT])[0]
    assert not r.failed and sorted(r.order) == [0, 1, 2, 3]
    assert r.order[0] == local.order[0]
    assert kendalltau(r.scores, local.scores).statistic >= 0.6
    assert max(abs(a - b) for a, b in zip(r.scores, local.scores)) < 1.5


@pytest.mark.server
def test_real_server_plain_text_echo_is_detected_as_shifted_and_corrected(live_server):
    """Without a leading BOS, llama-cpp-python pairs each token with the NEXT distribution; the probe must see it,
    and the corrected log-prob of an obvious continuation must be high."""
    plain = OpenAIRanker(model="smollm2-135m-instruct", base_url=live_server.base_url, mode="score",
                         concurrency=2, timeout_s=120, max_retries=1,
                         template=lambda msgs: "Q: " + msgs[-1]["content"] + "\nA: The capital of France is")
    r = plain.rank([RankRequest(({"role": "user", "content": "What is the capital of France?"},),
                                (" Paris", " Banana"))])[0]
    assert plain.echo_mode == "shifted"
    assert r.order == [0, 1] and r.scores[0] > -3.0 and r.scores[1] < r.scores[0] - 3.0


@pytest.mark.server
def test_real_server_generate_mode(live_server):
    ranker = OpenAIRanker(model="smollm2-135m-instruct", base_url=live_server.base_url, mode="generate",
                          max_new_tokens=40, timeout_s=120, max_retries=1, concurrency=2)
    listing = "\n".join(f"{i}. {t}" for i, t in enumerate(SHORT.candidates, start=1))
    req = RankRequest(({"role": "user", "content": f"Rank these movies for a Disney fan:\n{listing}"},),
                      SHORT.candidates)
    r = ranker.rank([req, req])
    assert all(not x.failed and sorted(x.order) == [0, 1, 2, 3] and x.raw for x in r)
    assert r[0].order == r[1].order  # temperature 0: deterministic
    assert ranker.usage.snapshot().completion_tokens > 0
