"""The local transformers backend on the REAL SmolLM2-135M-Instruct (fp32 for exact comparisons)."""
from __future__ import annotations

import pytest

from rpp.llm import CANDIDATES_PLACEHOLDER, BootstrapRanker, RankRequest

pytestmark = pytest.mark.llm

SYSTEM = {"role": "system", "content": "You are a movie recommender."}
CANDS = ("Fargo (1996)", "Return of the Jedi (1983)", "Heat (1995)", "Toy Story 2 (1999)",
         "Lion King, The (1994)", "Schindler's List (1993)", "Se7en (1995)")


def request(history: str, cands=CANDS, show_list: bool = False) -> RankRequest:
    text = f"The user watched: {history}. Which movie will the user watch next? Answer with its title."
    if show_list:
        text += f"\nCandidates:\n{CANDIDATES_PLACEHOLDER}"
    return RankRequest((SYSTEM, {"role": "user", "content": text}), cands)


REQUESTS = [
    request("Toy Story (1995), Aladdin (1992), Star Wars (1977)"),
    request("Pulp Fiction (1994)"),  # a shorter prefix: exercises the left padding
    request("Casablanca (1942), Vertigo (1958), Rear Window (1954), Psycho (1960)", CANDS[:4]),
]


@pytest.fixture(scope="module")
def ranker():
    from rpp.llm.local import LocalRanker

    return LocalRanker(mode="score", dtype="float32", batch_size=16, threads=1)


def test_title_tokens_join_the_prefix_cleanly_for_every_ml100k_title(ranker, ml100k):
    """The scored sequence is tokenize(prefix) + tokenize(title); it must equal tokenize(prefix + title)."""
    from rpp.llm.local import encode, prompt_text

    prefix = prompt_text(ranker.loaded, REQUESTS[0].messages)
    p = encode(ranker.loaded, prefix)
    titles = list(ml100k.items["title"])
    assert len(titles) > 1600
    bad = [t for t in titles if encode(ranker.loaded, prefix + t) != p + encode(ranker.loaded, t)]
    assert bad == []


def test_shared_prefix_batched_scores_equal_naive_full_sequence(ranker):
    from rpp.llm.local import score_candidates, score_naive

    batched = score_candidates(ranker.loaded, REQUESTS)
    for req, got in zip(REQUESTS, batched):
        want = score_naive(ranker.loaded, req)
        assert [len(x) for x in got] == [len(x) for x in want]
        for g, w in zip(got, want):
            assert sum(g) == pytest.approx(sum(w), abs=1e-3)
            assert g == pytest.approx(w, abs=1e-3)


def test_batched_over_requests_equals_one_by_one(ranker):
    together = ranker.rank(REQUESTS)
    for req, r in zip(REQUESTS, together):
        alone = ranker.rank([req])[0]
        assert alone.scores == pytest.approx(r.scores, abs=1e-3)
        assert alone.order == r.order
        assert sorted(r.order) == list(range(len(req.candidates)))
        assert r.scores[r.order[0]] == max(r.scores) and not r.failed and r.prompt_tokens > 0


def test_mean_reduction_is_sum_over_token_count(ranker):
    from rpp.llm.local import LocalRanker, encode

    mean = LocalRanker(mode="score", score_reduction="mean", dtype="float32", threads=1)
    assert mean.loaded is ranker.loaded  # one load per process, shared
    assert mean.identity != ranker.identity
    s, m = ranker.rank(REQUESTS[:1])[0], mean.rank(REQUESTS[:1])[0]
    for title, ss, mm in zip(CANDS, s.scores, m.scores):
        assert mm == pytest.approx(ss / len(encode(ranker.loaded, title)), abs=1e-4)


def test_generate_mode_gives_a_parsed_permutation():
    from rpp.llm.local import LocalRanker

    gen = LocalRanker(mode="generate", dtype="float32", max_new_tokens=40, threads=1)
    rankings = gen.rank([request("Toy Story (1995)", show_list=True), request("Heat (1995)", show_list=True)])
    for r in rankings:
        assert sorted(r.order) == list(range(len(CANDS)))
        assert r.raw is not None and r.completion_tokens > 0 and 0.0 <= r.coverage <= 1.0 and not r.failed
    assert gen.usage.batches == 1 and gen.usage.snapshot().calls == 2


def test_bootstrap_through_the_builder_scores_each_shown_order(ranker):
    """llm.bootstrap on a prompt from the real PromptBuilder (score mode, list shown): the model sees each shuffled
    list, so the orders give different scores, and the result is their sum mapped back to the candidates."""
    from rpp.config import PromptConfig
    from rpp.prompts import PATTERNS, PromptBuilder, UserContext, load_action_set

    actions = load_action_set(None)
    history = ("Toy Story (1995)", "Aladdin (1992)", "Lion King, The (1994)")
    ctx = UserContext(user=1, history_titles=history, history_ratings=(5.0, 4.0, 5.0),
                      history_genres=((),) * 3, candidate_titles=CANDS)
    builder = PromptBuilder(actions, PromptConfig(show_candidates=True), "movie", mode="score")
    prompt = builder.build(ctx, {p: actions.action(p, 0) for p in PATTERNS})
    req = RankRequest(prompt.messages, CANDS)

    boot = BootstrapRanker(ranker, bootstrap=3, seed=7)
    perms = boot.permutations(req)
    assert perms[0] == list(range(len(CANDS))) and len({tuple(p) for p in perms}) == 3
    assert perms == boot.permutations(req)  # seeded by (seed, request)
    before = ranker.usage.batches
    r = boot.rank([req])[0]
    assert ranker.usage.batches == before + 1  # the B orders go to the inner ranker in ONE call
    assert sorted(r.order) == list(range(len(CANDS)))

    per_order = []
    for p in perms:
        scores = ranker.rank([RankRequest(prompt.messages, tuple(CANDS[i] for i in p))])[0].scores
        back = [0.0] * len(CANDS)
        for j, s in enumerate(scores):
            back[p[j]] = s
        per_order.append(back)
    # the shown order changes what the model scores (it would not if the shuffles never reached the prompt)
    assert max(abs(a - b) for a, b in zip(per_order[0], per_order[1])) > 1e-3
    assert max(abs(a - b) for a, b in zip(per_order[0], per_order[2])) > 1e-3
    assert r.scores == pytest.approx([sum(col) for col in zip(*per_order)], abs=1e-3)


def test_score_mode_templates_and_tokenises_each_prompt_once(ranker, monkeypatch):
    from rpp.llm import local

    templated = []
    real = local.prompt_text
    monkeypatch.setattr(local, "prompt_text", lambda loaded, messages: templated.append(1) or real(loaded, messages))
    rankings = ranker.rank(REQUESTS)
    assert len(templated) == len(REQUESTS)
    for req, r in zip(REQUESTS, rankings):  # prompt tokens still count the whole prefix plus the scored titles
        assert r.prompt_tokens > len(local.encode(ranker.loaded, real(ranker.loaded, req.messages)))


def test_no_deprecated_transformers_api(ranker, monkeypatch):
    """transformers 5 renamed past_key_values to cache; the old name logs a deprecation warning (once per process,
    which is why the logger itself is patched) on every demo run. Both modes must run without it."""
    import warnings

    from transformers.utils import generic

    from rpp.llm.local import LocalRanker

    def deprecated(message, *args, **kwargs):
        raise AssertionError(f"transformers deprecation warning: {message}")

    monkeypatch.setattr(generic.logger, "warning_once", deprecated)
    gen = LocalRanker(mode="generate", dtype="float32", max_new_tokens=4, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        scored = ranker.rank(REQUESTS[:2])
        generated = gen.rank([request("Heat (1995)", show_list=True)])
    assert not any(r.failed for r in scored + generated), [r.error for r in scored + generated]


def test_local_generator_shares_the_weights_and_writes_text(ranker):
    from rpp.config import RefinerConfig
    from rpp.llm import make_generator
    from rpp.llm.local import LocalGenerator

    gen = LocalGenerator(dtype="float32", threads=1)
    assert gen.loaded is ranker.loaded
    out = gen.generate([({"role": "user", "content": "Say hello in one word."},)], max_new_tokens=8)
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
    assert gen.usage.snapshot().calls == 1 and gen.usage.batches == 1
    assert make_generator(RefinerConfig()).identity.startswith("local|smollm2-135m-instruct|")


def test_converted_folder_is_complete_and_no_partial_folder_is_left(ranker):
    folder = ranker.loaded.folder
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    assert not list(folder.parent.glob(f".{folder.name}-*"))  # no leftover temporary folder


def test_a_model_that_is_neither_asset_nor_folder_is_a_clear_error(tmp_path):
    from rpp.llm.local import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="neither an embedded model"):
        load_model(str(tmp_path / "nope"), "float32")
