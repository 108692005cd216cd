"""The opt-in Gemma-3-270M base model: its plain-text prompt rule (fast, no model), and the REAL model ranking in
score mode (marked llm; skipped unless `rpp assets fetch gemma3-270m` has put it in the cache)."""
from __future__ import annotations

import math

import pytest

from rpp.llm import RankRequest

SYSTEM = {"role": "system", "content": "You are a movie recommender."}
CANDS = ("Fargo (1996)", "Return of the Jedi (1983)", "Heat (1995)", "Toy Story 2 (1999)", "Se7en (1995)")


def request(history: str, cands=CANDS) -> RankRequest:
    text = f"The user watched: {history}. Which movie will the user watch next? Answer with its title."
    return RankRequest((SYSTEM, {"role": "user", "content": text}), cands)


class FakeTokenizer:
    bos_token = "<bos>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<chat>" + "|".join(m["content"] for m in messages) + "<assistant>"


def test_a_base_model_gets_role_labelled_paragraphs_and_an_instruct_model_its_chat_template():
    from rpp.llm.local import render_prompt

    msgs = request("Heat (1995)").messages
    assert render_prompt(FakeTokenizer(), msgs, base_model=True) == (
        "<bos>System: You are a movie recommender.\n\n"
        "User: The user watched: Heat (1995). Which movie will the user watch next? Answer with its title.\n\n"
        "Assistant:\n")
    assert render_prompt(FakeTokenizer(), msgs, base_model=False).startswith("<chat>You are a movie recommender.|")


def test_the_openai_backend_renders_the_base_asset_as_plain_text_too(monkeypatch):
    """The rule is chosen by the asset's base_model flag, for either backend."""
    from rpp.llm import local
    from rpp.llm.openai_backend import chat_template_for

    monkeypatch.setattr(local, "load_tokenizer", lambda name: FakeTokenizer())
    msgs = request("Heat (1995)").messages
    assert chat_template_for("gemma3-270m")(msgs).startswith("<bos>System: You are a movie recommender.\n\nUser: ")
    assert chat_template_for("smollm2-135m-instruct")(msgs).startswith("<chat>")


# ------------------------------------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def gemma():
    from rpp.assets import ASSETS, _verified

    if not _verified(ASSETS["gemma3-270m"]):
        pytest.skip("the opt-in Gemma-3-270M asset is not in the cache: `rpp assets fetch gemma3-270m`")
    from rpp.llm.local import LocalRanker

    return LocalRanker("gemma3-270m", mode="score", dtype="float32", batch_size=16, threads=1)


@pytest.mark.llm
def test_gemma_ranks_a_five_candidate_request(gemma):
    from rpp.llm.local import prompt_text

    assert gemma.loaded.base_model and gemma.identity.startswith("local|gemma3-270m|sha256=a5fd3b62")
    assert "|prompt=plain" in gemma.identity
    req = request("Toy Story (1995), Aladdin (1992), Star Wars (1977)")
    assert prompt_text(gemma.loaded, req.messages).startswith("<bos>System: You are a movie recommender.")
    r = gemma.rank([req])[0]
    assert not r.failed, r.error
    assert sorted(r.order) == list(range(5)) and all(math.isfinite(s) and s < 0 for s in r.scores)
    assert r.scores[r.order[0]] == max(r.scores)


@pytest.mark.llm
def test_gemma_batched_scores_equal_naive_past_the_sliding_window(gemma, ml100k):
    """Gemma 3 has sliding-window layers: the shared-prefix KV cache must keep the whole prefix in them, so a prefix
    longer than the window still scores like the naive full-sequence forward (next to a short, left-padded one)."""
    from rpp.llm.local import encode_prompt, score_candidates, score_naive

    long = request(", ".join(ml100k.items["title"].iloc[:90]), CANDS[:3])
    short = request("Pulp Fiction (1994)", CANDS[:3])
    window = gemma.loaded.model.config.sliding_window
    assert len(encode_prompt(gemma.loaded, long.messages)) > window > len(encode_prompt(gemma.loaded, short.messages))
    for req, got in zip((long, short), score_candidates(gemma.loaded, [long, short])):
        want = score_naive(gemma.loaded, req)
        assert [len(x) for x in got] == [len(x) for x in want]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=2e-3)


@pytest.mark.llm
def test_gemma_title_tokens_join_the_plain_prefix_cleanly(gemma, ml100k):
    """The plain prompt ends with a newline, so tokenize(prefix + title) == tokenize(prefix) + tokenize(title)."""
    from rpp.llm.local import encode, prompt_text

    prefix = prompt_text(gemma.loaded, request("Heat (1995)").messages)
    p = encode(gemma.loaded, prefix)
    bad = [t for t in ml100k.items["title"] if encode(gemma.loaded, prefix + t) != p + encode(gemma.loaded, t)]
    assert bad == []
