"""PAP-REC on a tiny transformers model built here (no download), with a planted trigger.

The model is a one-layer Llama whose weights are set by hand: attention is uniform (zero queries and keys) and
carries only hidden dimension 0 forward; every ordinary token has 0 there. One whole-word token, " zebra", has a
large dimension 0, and the LM head turns that dimension into the first token of the "Zeta ..." titles. So " zebra"
anywhere in the prompt puts the Zeta titles first, and nothing else does: a trigger search that works must find it.
A special token has an even larger dimension 0 (the gradient's favourite): it must never be tried. Every user's
history holds Zeta titles only, so the history-derived validation and training targets are Zeta titles and their
negatives are the other titles.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rpp.benchmark import BenchmarkError
from rpp.benchmark.methods import BenchContext
from rpp.benchmark.papprec import (
    PapRecSearch, Sample, SuffixScorer, local_model, papprec_methods, split_at_trigger, trigger_vocabulary,
)
from rpp.config import load_config
from rpp.data import Dataset, UserSample
from rpp.llm.base import Ranker, RankRequest

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|extra|>"]
PLANTED = " zebra"
ZETA_WORDS = ["Kilo", "Lima", "Mike", "Nova", "Oscar", "Papa", "Quebec", "Romeo", "Sierra"]
OTHER_WORDS = [a + b + c for a in ("B", "C", "D", "F", "G") for b in ("o", "a", "e", "u") for c in
               ("lt", "rm", "sk", "np", "vy", "dz", "xo", "qi", "mb", "ff")]
"""200 one-token words: with this many unseen items, a history sample's negatives rarely include the 9th Zeta item."""


def _dataset() -> Dataset:
    titles = [f"Zeta {w} (19{60 + i})" for i, w in enumerate(ZETA_WORDS)]
    titles += [f"Omega {w} (19{70 + i % 20})" for i, w in enumerate(OTHER_WORDS)]
    items = pd.DataFrame({"item": list(range(len(titles))), "title": titles, "genres": ["Drama"] * len(titles)})
    rows = []
    for u in range(12):
        order = np.random.default_rng(u).permutation(8).tolist()  # 8 of the 9 Zeta items, in a per-user order
        for t, item in enumerate(order + [8]):  # the 9th Zeta item is every user's held-out (test) target
            rows.append({"user": u, "item": item, "timestamp": t, "rating": 4.0})
    return Dataset(name="tiny", interactions=pd.DataFrame(rows), items=items, item_noun="movie")


def _samples(dataset: Dataset) -> list[UserSample]:
    inter = dataset.interactions
    out = []
    for u, g in inter.groupby("user"):
        items = g.sort_values("timestamp")["item"].tolist()
        negatives = [9 + (u * 7 + k) % len(OTHER_WORDS) for k in range(9)]
        slot = u % 10
        cands = negatives[:slot] + [items[-1]] + negatives[slot:]
        out.append(UserSample(user=u, history=tuple(items[:-1]), history_ratings=(4.0,) * 8, target=items[-1],
                              candidates=tuple(cands), target_index=slot))
    return out


def _tokenizer_and_model(folder, corpus):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces = set()
    for text in corpus + [PLANTED, " the", " river", " stone", "\n"]:
        for part in text.replace("<|im_start|>", "\u0001").replace("<|im_end|>", "\u0001").split("\u0001"):
            pieces.update(p for p, _ in pre.pre_tokenize_str(part))
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pieces - set(SPECIALS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|extra|>"])
    tok.chat_template = CHAT_TEMPLATE

    d, n = 8, len(vocab)
    cfg = LlamaConfig(vocab_size=n, hidden_size=d, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=d, max_position_embeddings=4096, tie_word_embeddings=False,
                      rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=vocab["<|im_end|>"], bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    planted, extra, zeta, omega = vocab["Ġzebra"], vocab["<|extra|>"], vocab["Zeta"], vocab["Omega"]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 1)
        emb[:, 0] = 0
        emb[planted] = 0
        emb[planted, 0] = 1.0
        emb[extra] = 0
        emb[extra, 0] = 3.0  # the largest -e.grad of all: only the special-token filter keeps it out
        layer = model.model.layers[0]
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(torch.eye(d))
        layer.self_attn.o_proj.weight.zero_()
        layer.self_attn.o_proj.weight[0, 0] = 1000.0
        layer.mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.normal_(0, 0.3)
        head[:, 0] = 0
        # without the trigger, the answer's first word is "Omega" rather than "Zeta" (by |n|^2 = 8 nats after the
        # template's last token "\n", whose normalised embedding is n), so no target starts at the top
        newline = emb[vocab["Ċ"]]
        head[zeta] = head[omega] - newline / newline.pow(2).mean().sqrt()
        head[zeta, 0] = 10.0
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return vocab


def _corpus(dataset, samples, builder) -> list[str]:
    """Every text the tiny tokenizer must know: all prompts the tests render, and every title."""
    from rpp.prompts import UserContext

    texts = [dataset.title(i) for i in dataset.items["item"]]
    for s in samples:
        for n in range(1, len(s.history) + 1):
            ctx = UserContext(user=s.user, history_titles=tuple(dataset.title(i) for i in s.history[:n]),
                              history_ratings=s.history_ratings[:n], history_genres=(("Drama",),) * n,
                              candidate_titles=())
            for m in builder.build(ctx, builder.taskwise()).messages:
                texts += [m["role"], m["content"]]
    return texts + ["assistant"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dataset, samples, LocalRanker on the planted tiny model, its vocabulary)."""
    from rpp.benchmark.methods import BenchContext as Ctx
    from rpp.llm.local import LocalRanker

    dataset = _dataset()
    samples = _samples(dataset)
    cfg = load_config(None, ["data.n_candidates=10"])
    builder = Ctx(cfg=cfg, dataset=dataset, fit_users=[], train_interactions=dataset.interactions).builder
    folder = tmp_path_factory.mktemp("tiny-llm")
    vocab = _tokenizer_and_model(folder, _corpus(dataset, samples, builder))
    ranker = LocalRanker(str(folder), mode="score", dtype="float32", threads=1)
    return dataset, samples, ranker, vocab


class Sealed:
    """A test user whose target cannot be read: any access to it fails the test."""

    def __init__(self, sample: UserSample) -> None:
        object.__setattr__(self, "_sample", sample)

    def __getattr__(self, name):
        if name in ("target", "target_index"):
            raise AssertionError(f"a method read the test target ({name}) of user {self._sample.user}")
        return getattr(self._sample, name)


def _ctx(tiny, *overrides) -> BenchContext:
    dataset, samples, ranker, _ = tiny
    cfg = load_config(None, ["data.n_candidates=10", "papprec.train_users=6", "papprec.train_positions=1",
                             "papprec.top_k=3", "papprec.max_rounds=4", "papprec.kv_cache_samples=8", *overrides])
    return BenchContext(cfg=cfg, dataset=dataset, fit_users=[], train_interactions=dataset.interactions,
                        ranker_factory=lambda: ranker, train_users=samples[:6])


def test_trigger_search_finds_the_planted_trigger_and_never_special_tokens(tiny):
    dataset, samples, ranker, vocab = tiny
    search = PapRecSearch(_ctx(tiny, "papprec.n_shared=2"))
    search.fit()
    start, end = search.train_surrogate
    assert start < 0.5 and end == pytest.approx(2.0)  # HR@5 + NDCG@5: every validation target first after
    assert vocab["Ġzebra"] in search.shared
    assert search.rounds[0]["accepted"] and vocab["Ġzebra"] in search.rounds[0]["tried"]
    special = set(search.scorer.loaded.tokenizer.all_special_ids)
    tried = {t for r in search.rounds for t in r["tried"]}
    assert vocab["<|extra|>"] in special and not (tried | set(search.shared)) & special
    # the test users' own candidates, ranked with the shared tokens: their (Zeta) target is first for everyone
    test = samples[6:]
    rankings, _ = search.rank([Sealed(s) for s in test], personal=False)
    assert [r.order[0] for r in rankings] == [s.target_index for s in test]
    # and the same search again gives the same tokens (seeded position choice, deterministic model)
    again = PapRecSearch(_ctx(tiny, "papprec.n_shared=2"))
    again.fit()
    assert again.shared == search.shared and again.rounds == search.rounds


def test_trigger_vocabulary_is_whole_alphabetic_words_without_special_tokens(tiny):
    tok = tiny[2].loaded.tokenizer
    mask = trigger_vocabulary(tok)
    allowed = {tok.decode([i]) for i in np.flatnonzero(mask)}
    assert " zebra" in allowed and " the" in allowed
    assert all(w[0] == " " and w[1:].isalpha() and w[1:].isascii() for w in allowed)
    assert not mask[tok.all_special_ids].any()
    assert "Zeta" not in allowed and " (" not in allowed  # no leading space / not letters


def test_personal_token_is_searched_on_each_test_users_history_without_reading_targets(tiny):
    dataset, samples, ranker, vocab = tiny
    ctx = _ctx(tiny, "papprec.n_shared=0", "papprec.personal_rounds=2")
    shared_row, personal_row = papprec_methods(ctx)
    for m in (shared_row, personal_row):
        m.fit()
    test = samples[6:]
    plain = shared_row.rank([Sealed(s) for s in test])
    personal = personal_row.rank([Sealed(s) for s in test])
    assert personal_row._tokens == [vocab["Ġzebra"]] * len(test)
    assert [r.order[0] for r in personal] == [s.target_index for s in test]
    assert not any(r.order[0] == s.target_index for r, s in zip(plain, test))  # no trigger: no boost
    cost = personal_row.cost()
    assert cost["infer_backward_passes"] > 0 and cost["infer_requests"] >= 2 * len(test)
    assert shared_row.cost()["infer_backward_passes"] == 0 and shared_row.cost()["infer_requests"] == len(test)
    assert "moved off the initial token" in personal_row.notes()


def test_the_scorer_scores_exactly_the_prompt_the_ranker_scores(tiny):
    """Cut at the trigger slot with no trigger, the prompt is the ranker's own: same tokens, same title scores."""
    dataset, samples, ranker, _ = tiny
    ctx = _ctx(tiny)
    s = samples[7]
    uctx = ctx.user_context(s)
    messages = ctx.builder.build(uctx, ctx.builder.taskwise()).messages
    before, after = split_at_trigger(ranker.loaded, messages)
    from rpp.llm.local import encode

    titles = [encode(ranker.loaded, t) for t in uctx.candidate_titles]
    ours = SuffixScorer(ranker.loaded).scores(Sample(before=before, after=after, titles=titles), [[]])[0]
    theirs = ranker.rank([RankRequest(messages=messages, candidates=uctx.candidate_titles)])[0].scores
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_papprec_refuses_a_ranker_without_gradients():
    class Remote(Ranker):
        identity = "openai|some-model"

        def rank(self, requests):  # pragma: no cover - never called
            return []

    with pytest.raises(BenchmarkError, match="llm.backend: local"):
        local_model(Remote())


def test_a_methods_own_cost_reaches_the_tables():
    """Requests a method scores itself (PAP-REC bypasses the metered ranker) count in the request columns, and the
    cost section lists its passes and generations."""
    from rpp.benchmark.report import Meter, MethodResult, cost_markdown, results_table

    ranks = np.array([0, 3, 12, 1])
    res = MethodResult(name="papprec_personal", family="policy", notes="", ranks=ranks,
                       failed=np.zeros(4, bool), fit_usage=Meter(requests=5), infer_usage=Meter(), fit_s=1.0,
                       rank_s=8.0, cost={"train_requests": 60, "infer_requests": 20, "train_users": 12,
                                         "forward_passes": 90, "backward_passes": 30, "infer_forward_passes": 40,
                                         "infer_backward_passes": 12, "train_tokens": 6000, "infer_tokens": 2000})
    plain = MethodResult(name="taskwise", family="taskwise", notes="", ranks=ranks, failed=np.zeros(4, bool),
                         fit_usage=Meter(requests=5), infer_usage=Meter(requests=4), fit_s=1.0, rank_s=2.0)
    table = results_table([res, plain], "taskwise", n_boot=100, seed=0, n_fit_users=5).set_index("method")
    assert table.loc["papprec_personal", "train_requests"] == 65
    assert table.loc["papprec_personal", "infer_requests_per_user"] == 5.0
    assert table.loc["papprec_personal", "infer_tokens_per_user"] == 500.0
    assert table.loc["papprec_personal", "cost_backward_passes"] == 30 and np.isnan(table.loc["taskwise",
                                                                                              "cost_forward_passes"])
    lines = cost_markdown([res, plain])
    row = next(line for line in lines if line.startswith("| papprec_personal"))
    assert "| 65 (65 + 0) | 12 | 5.00 (5.00 + 0.00) | 90 (10.0/user) | 30 (3.0/user) |" in row
    assert not any(line.startswith("| taskwise") for line in lines)


def test_token_id_requests_go_through_the_response_cache(tiny, tmp_path):
    """A rerun replays PAP-REC's scored requests from the response cache: the second scorer runs no forward pass,
    returns the same scores, and the requests still count (what the method costs on a cold cache)."""
    from rpp.benchmark.papprec import response_cache
    from rpp.llm import CachedRanker, ResponseCache
    from rpp.llm.local import encode

    dataset, samples, ranker, vocab = tiny
    ctx = _ctx(tiny)
    uctx = ctx.user_context(samples[7])
    before, after = split_at_trigger(ranker.loaded, ctx.builder.build(uctx, ctx.builder.taskwise()).messages)
    sample = Sample(before=before, after=after, titles=[encode(ranker.loaded, t) for t in uctx.candidate_titles])
    suffixes = [[vocab["Zeta"]], [vocab["Omega"]]] if "Zeta" in vocab else [[before[-1]], [before[-2]]]

    cached = CachedRanker(ranker, ResponseCache(tmp_path / "responses.sqlite"))
    identity, cache = response_cache(cached)
    assert identity == ranker.identity and cache is cached.cache
    first = SuffixScorer(ranker.loaded, cache=cache, identity=identity)
    cold = first.scores(sample, suffixes)
    assert first.counters.forward > 0 and cache.misses == 2
    second = SuffixScorer(ranker.loaded, cache=cache, identity=identity)
    warm = second.scores(sample, suffixes)
    assert second.counters.forward == 0 and cache.hits == 2
    assert second.counters.requests == 2                      # counted like a cold request
    assert np.allclose(warm, cold)
    assert response_cache(ranker) == (None, None)             # --no-cache: computed every time
