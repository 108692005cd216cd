"""RPP+ refiner: the guards, batching, every-k scheduling, the refinement cache, and a real SmolLM2 episode.

Most tests drive the Refiner with ScriptedGenerator, a real TextGenerator whose answers are chosen by the test
(so each guard can be hit on purpose); the `llm` test runs the real SmolLM2 generator inside a StepCore episode.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from rpp.config import load_config
from rpp.llm.base import Ranker, Ranking, TextGenerator
from rpp.prompts import PATTERNS, Action, UserContext
from rpp.prompts.refiner import (
    REJECTION_REASONS, CandidateMatcher, RefinementCache, Refiner, clean_rewrite, judge_rewrite, make_refiner,
    placeholders, refinement_cache_path, templatize, title_variants, top_genres, user_summary,
)


class ScriptedGenerator(TextGenerator):
    """Answers each prompt with ``answer(sentence, prompt_text)``; records every generate() call."""

    identity = "scripted"

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer
        self.batches: list[int] = []

    def generate(self, prompts, max_new_tokens):
        self.batches.append(len(prompts))
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            sentence = re.search(r"Sentence: (.*)\n", text).group(1)
            out.append(self.answer(sentence, text))
        self.usage.record_calls(calls=len(prompts))
        return out


CANDIDATES = ("Shawshank Redemption, The (1994)", "Toy Story (1995)", "Heat (1995)",
              "City of Lost Children, The (Cité des enfants perdus, La) (1995)", "Godfather: Part II, The (1974)")

CTX = UserContext(
    user=1,
    history_titles=("Fargo (1996)", "Alien (1979)", "Psycho (1960)", "Vertigo (1958)"),
    history_ratings=(5.0, 4.0, 5.0, 3.0),
    history_genres=(("Crime", "Drama", "Thriller"), ("Horror", "Sci-Fi"), ("Horror", "Thriller"), ("Thriller",)),
    candidate_titles=CANDIDATES,
)

GENRES = ("Action", "Comedy", "Crime", "Drama", "Horror", "Sci-Fi", "Thriller")
"""The genre vocabulary a Refiner is made with (make_refiner takes the dataset's)."""

ORIGINAL = "Infer the user's taste from these {item_noun_plural} and choose the {item_noun} that fits it best."
GOOD = "Infer this thriller fan's taste from these {item_noun_plural} and choose the {item_noun} that fits it best."
INSTRUCTION_PARTS = ("Rewrite one sentence of a movie recommendation prompt so that it suits this user better.",
                     "\nSentence: ", "\nAnswer:")


def judge(raw, original=ORIGINAL, max_chars=300):
    return judge_rewrite(raw, original, max_chars=max_chars, candidates=CANDIDATES, instruction=INSTRUCTION_PARTS,
                         user_summary=user_summary(CTX), known_genres=("Comedy", "Crime", "Horror", "Thriller"),
                         user_genres=top_genres(CTX))


def cfg_with(*overrides):
    return load_config(None, ["refiner.enabled=true", "data.n_train_users=8", "data.n_val_users=2",
                              "data.n_test_users=2", *overrides])


def actions(**texts) -> dict:
    base = {"role": Action("expert", "You are an expert on {item_noun_plural}."),
            "history": Action("recent_5", "Here are the last {n_history} {item_noun_plural} this user chose:",
                              {"window": 5, "ratings": False, "note_last": False}),
            "reasoning": Action("taste", ORIGINAL),
            "format": Action("none", "")}
    base.update({p: Action(f"custom_{p}", t) for p, t in texts.items()})
    return base


# ---------------------------------------------------------------------------------------------- guards

BAD_REWRITES = [
    (None, "generator_failed"),
    ("", "empty"),
    ('  ""  ', "empty"),
    ("Rewritten sentence:   ", "empty"),
    ("I'm sorry, but I cannot rewrite this sentence.", "refusal"),
    ("As an AI language model, I do not know this user.", "refusal"),
    ("I'm ready to help you with your {item_noun} recommendation from these {item_noun_plural}.", "refusal"),
    ("Rewrite one sentence of a movie recommendation prompt so that it suits this user better.", "copies_instruction"),
    ("The user likes Thriller, Horror, Crime; recently watched Vertigo, Psycho, Alien.", "copies_instruction"),
    ("Infer the user's taste from these {item_noun_plural} and choose the {item_noun}. Answer:", "copies_instruction"),
    ("Choose the {item_noun} that fits it best. " * 12, "too_long"),
    ("Infer the user's taste and choose the movie that fits it best.", "lost_placeholder"),
    ("Infer the user's taste from these {item_noun_plural} and pick the {item_noun} for {user_name}.",
     "new_placeholder"),
    ("Infer the user's taste from these {item_noun_plural} and choose the {item_noun} that fits it { best.",
     "new_placeholder"),
    ("Infer the user's taste from these {item_noun_plural} and choose the 3 {item_noun} picks that fit best.",
     "adds_number"),
    ("Infer the user's taste from these {item_noun_plural}; the {item_noun} for them is Toy Story.",
     "names_candidate"),
    ("Given these {item_noun_plural}, the {item_noun} that fits best is THE SHAWSHANK-REDEMPTION!",
     "names_candidate"),
    ("From these {item_noun_plural}, choose the {item_noun} they like, such as the city of lost children.",
     "names_candidate"),
    ("From these {item_noun_plural}, a {item_noun} like The Godfather fits this crime fan best.", "names_candidate"),
    ("From these {item_noun_plural}, the {item_noun} that fits best is surely Heat.", "names_candidate"),
    ("Infer this fan of dark comedies' taste from these {item_noun_plural} and choose the {item_noun} that fits.",
     "wrong_genre"),
]


@pytest.mark.parametrize("raw,reason", BAD_REWRITES)
def test_guard_rejects_bad_rewrite_and_keeps_original(raw, reason):
    verdict = judge(raw)
    assert (verdict.accepted, verdict.reason) == (False, reason), verdict
    assert verdict.text == ORIGINAL


def test_guard_accepts_good_rewrite_after_stripping_wrappers():
    for raw in (GOOD, f'"{GOOD}"', f"Rewritten sentence: {GOOD}", f"Sure! Here is the rewritten sentence:\n\n“{GOOD}”",
                f"{GOOD}\n\nThis version mentions the user's love of thrillers."):
        verdict = judge(raw)
        assert verdict.accepted and verdict.reason is None, (raw, verdict)
        assert verdict.text == GOOD


def test_guard_accepts_genre_mentions_and_history_titles():
    """Naming liked genres or a history title is personalisation, not an echo or a leak."""
    raw = "Since this user loved Vertigo and Psycho, infer their taste for thrillers and crime from these " \
          "{item_noun_plural} and choose the {item_noun} that fits it best."
    assert judge(raw).accepted


def test_everyday_word_titles_are_only_matched_as_names():
    matcher = CandidateMatcher(["Heat (1995)", "Big (1988)", "Kids (1995)"])
    assert matcher.find("Heat up the ranking: rank big names first for kids at heart.") is None
    assert matcher.find("You will love Heat.") == "Heat (1995)"
    assert matcher.find("A film like Big fits.") == "Big (1988)"


def test_title_variants_cover_year_article_and_subtitle():
    variants = title_variants("Godfather: Part II, The (1974)")
    assert {"the godfather part ii", "godfather part ii", "godfather"} <= variants
    assert "shawshank redemption" in title_variants("Shawshank Redemption, The (1994)")


def test_clean_rewrite_strips_labels_quotes_and_trailing_explanations():
    assert clean_rewrite('Sure, here is the new sentence:\n"You are a film buff."\n\nI kept it short.') == \
        "You are a film buff."
    assert clean_rewrite("Answer: `Rank by mood.`") == "Rank by mood."


def test_templatize_restores_filled_placeholders():
    template = "Here are the last {n_history} {item_noun_plural} this user chose:"
    values = {"n_history": "5", "item_noun_plural": "movies", "item_noun": "movie"}
    assert templatize("These 5 Movies are what this thriller fan chose last:", template, values) == \
        "These {n_history} {item_noun_plural} are what this thriller fan chose last:"


def test_user_summary_has_genres_recent_titles_and_no_candidate():
    ctx = UserContext(user=2, history_titles=("Fargo (1996)", "Toy Story (1995)", "Alien (1979)"),
                      history_ratings=(5.0, 4.0, 3.0), history_genres=(("Crime",), ("Animation",), ("Horror",)),
                      candidate_titles=("Toy Story (1995)", "Heat (1995)"))
    summary = user_summary(ctx)
    assert summary == "likes Animation, Crime, Horror; recently watched Alien, Fargo"


# ---------------------------------------------------------------------------------------------- the Refiner

def test_refiner_counts_each_rejection_by_reason_and_falls_back():
    bad = {r: raw for raw, r in BAD_REWRITES}  # one bad answer per reason
    reasons = list(bad)
    gen = ScriptedGenerator(lambda sentence, text: bad[reasons[int(re.search(r"#(\d+)", sentence).group(1))]])
    refiner = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie")
    chosen = [actions(reasoning=ORIGINAL + f" #{i}") for i in range(len(reasons))]
    out = refiner.refine([CTX] * len(reasons), [dict(c, role=Action("none", ""), history=Action(
        "h", "", {"window": 5})) for c in chosen], step=0)
    for i, reason in enumerate(reasons):
        assert out[i]["reasoning"] == ORIGINAL + f" #{i}"
        assert refiner.last_verdicts[i]["reasoning"].reason == reason
    stats = refiner.stats()
    assert stats["accepted"] == 0 and stats["sentences"] == len(reasons) == stats["rejected"]
    assert {r: stats["rejected_by_reason"][r] for r in reasons} == {r: 1 for r in reasons}
    assert set(stats["rejected_by_reason"]) == set(REJECTION_REASONS)
    assert stats["skipped_empty"] == 2 * len(reasons) + len(reasons)  # role, history and format are empty


def test_refiner_batches_one_call_skips_empty_and_roundtrips_placeholders():
    def answer(sentence, text):
        if sentence.startswith("Here are the last"):
            return '"Here are the last 4 movies this thriller fan chose:"'
        if sentence.startswith("Infer"):
            return GOOD.replace("{item_noun_plural}", "movies").replace("{item_noun}", "movie")
        return "You are an expert on movies and on suspense."

    gen = ScriptedGenerator(answer)
    refiner = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie")
    ctx2 = UserContext(user=2, history_titles=CTX.history_titles[:2], history_ratings=(4.0, 4.0),
                       history_genres=CTX.history_genres[:2], candidate_titles=CANDIDATES)
    out = refiner.refine([CTX, ctx2], [actions(), actions()], step=0)
    assert gen.batches == [6], "all users x non-empty patterns in ONE generate call"
    assert out[0] == {"role": "You are an expert on {item_noun_plural} and on suspense.",
                      "history": "Here are the last {n_history} {item_noun_plural} this thriller fan chose:",
                      "reasoning": GOOD, "format": ""}
    # ctx2 has only 2 history items ("the last 2 movies"): an answer saying 4 loses {n_history} and is rejected
    assert out[1]["history"] == actions()["history"].text
    verdict = refiner.last_verdicts[1]["history"]
    assert (verdict.reason, verdict.detail) == ("lost_placeholder", "n_history")
    # ctx2's top genres (the summary's) are Crime, Drama, Horror: calling them a "thriller fan" is rejected
    assert refiner.last_verdicts[1]["reasoning"].reason == "wrong_genre"
    stats = refiner.stats()
    assert (stats["calls"], stats["requests"], stats["accepted"], stats["skipped_empty"]) == (1, 6, 4, 2)


def test_genre_verdict_does_not_depend_on_order_or_batch():
    """The wrong_genre guard's vocabulary is the dataset's, fixed when the refiner is made: the same cached rewrite
    gets the same verdict whether its user is refined alone, after a user who likes the genre, or in one batch."""
    comedy_fan = UserContext(user=7, history_titles=("Airplane! (1980)",), history_ratings=(5.0,),
                             history_genres=(("Comedy",),), candidate_titles=CANDIDATES)
    rewrite = "Infer this fan of comedies' taste from these movies and choose the movie that fits it best."
    gen = ScriptedGenerator(lambda s, t: rewrite if s.startswith("Infer") else s)

    def verdict_for_ctx(*batches):
        refiner = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie")
        for batch in batches:
            refiner.refine(batch, [actions() for _ in batch], step=0)
        return refiner.last_verdicts[-1]["reasoning"]

    alone = verdict_for_ctx([CTX])
    after_fan = verdict_for_ctx([comedy_fan], [CTX])
    one_batch = verdict_for_ctx([comedy_fan, CTX])
    assert (alone.reason, alone.detail) == ("wrong_genre", "Comedy")  # CTX likes Thriller, Horror, Crime
    assert after_fan == alone == one_batch
    assert verdict_for_ctx([CTX], [comedy_fan]).accepted  # the comedy fan may be called one


def test_make_refiner_takes_the_genre_vocabulary_from_the_dataset(ml100k):
    refiner = make_refiner(cfg_with("llm.cache=false"), generator=ScriptedGenerator(lambda s, t: GOOD))
    expected = {g for item in ml100k.items["item"] for g in ml100k.genres(item)}
    assert refiner.known_genres == expected and {"Film-Noir", "Western", "Sci-Fi"} <= expected
    assert make_refiner(cfg_with("llm.cache=false"), generator=ScriptedGenerator(lambda s, t: GOOD),
                        dataset=ml100k).known_genres == expected


def test_every_k_steps_refines_at_0_k_2k_only():
    gen = ScriptedGenerator(lambda s, t: GOOD)
    refiner = Refiner(cfg_with("refiner.every_k_steps=2").refiner, gen, genres=GENRES, item_noun="movie")
    got = [refiner.refine([CTX], [actions()], step) for step in range(5)]
    assert [g[0] is not None for g in got] == [True, False, True, False, True]
    assert len(gen.batches) == 3 and refiner.stats()["skipped_steps"] == 2


def test_cached_refinements_are_reused_without_calling_the_model(tmp_path):
    path = tmp_path / "refinements.sqlite"
    gen = ScriptedGenerator(lambda s, t: GOOD)
    first = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie", cache=RefinementCache(path))
    out1 = first.refine([CTX], [actions()], 0)
    assert len(gen.batches) == 1

    again = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie", cache=RefinementCache(path))
    out2 = again.refine([CTX], [actions()], 0)
    assert out2 == out1
    assert len(gen.batches) == 1, "a cached refinement must not call the model"
    assert again.stats()["cache_hits"] == 3 and again.stats()["calls"] == 0

    # the instruction and the sampling params are part of the key
    other = Refiner(cfg_with("refiner.temperature=0.7").refiner, gen, genres=GENRES, item_noun="movie",
                    cache=RefinementCache(path))
    other.refine([CTX], [actions()], 0)
    assert len(gen.batches) == 2


def test_failed_generations_are_not_cached(tmp_path):
    gen = ScriptedGenerator(lambda s, t: None)
    cache = RefinementCache(tmp_path / "r.sqlite")
    refiner = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie", cache=cache)
    refiner.refine([CTX], [actions()], 0)
    assert len(cache) == 0 and refiner.stats()["rejected_by_reason"]["generator_failed"] == 3


def test_guards_run_again_on_cached_answers(tmp_path):
    """Leakage depends on the user's candidates, which are not in the cache key: a cached answer that names a
    candidate of THIS user is still rejected."""
    answer = "Infer the user's taste from these {item_noun_plural} and choose the {item_noun} like Jumanji."
    filled = answer.replace("{item_noun_plural}", "movies").replace("{item_noun}", "movie")
    gen = ScriptedGenerator(lambda s, t: filled if s.startswith("Infer") else s)
    path = tmp_path / "r.sqlite"
    refiner = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie", cache=RefinementCache(path))
    assert refiner.refine([CTX], [actions()], 0)[0]["reasoning"] == answer
    leaky = UserContext(**{**CTX.__dict__, "candidate_titles": CANDIDATES + ("Jumanji (1995)",)})
    again = Refiner(cfg_with().refiner, gen, genres=GENRES, item_noun="movie", cache=RefinementCache(path))
    assert again.refine([leaky], [actions()], 0)[0]["reasoning"] == ORIGINAL
    assert again.stats()["rejected_by_reason"]["names_candidate"] == 1 and len(gen.batches) == 1


def test_bad_instruction_is_a_clear_error():
    gen = ScriptedGenerator(lambda s, t: GOOD)
    with pytest.raises(ValueError, match="unknown placeholder"):
        Refiner(cfg_with("refiner.instruction='Rewrite {sentence} for {user_name}'").refiner, gen, genres=GENRES)
    with pytest.raises(ValueError, match="must contain"):
        Refiner(cfg_with("refiner.instruction='Rewrite it for {user_summary}'").refiner, gen, genres=GENRES)


def test_make_refiner(tmp_path):
    assert make_refiner(load_config(None, [])) is None
    cfg = cfg_with(f"llm.cache_path={tmp_path / 'responses.sqlite'}")
    refiner = make_refiner(cfg, generator=ScriptedGenerator(lambda s, t: GOOD))
    assert isinstance(refiner, Refiner) and refiner.cache.path == tmp_path / "refinements.sqlite"
    assert refinement_cache_path(cfg) == tmp_path / "refinements.sqlite"
    assert make_refiner(cfg_with("llm.cache=false"), generator=ScriptedGenerator(lambda s, t: GOOD)).cache is None


# ---------------------------------------------------------------------------------------------- inside an episode

class FirstSlotRanker(Ranker):
    """Deterministic stand-in ranker (presented order) for the fast episode test."""

    identity = "first-slot"

    def __init__(self) -> None:
        super().__init__()
        self.requests = []

    def rank(self, requests):
        self.requests.extend(requests)
        out = [Ranking(order=list(range(len(r.candidates)))) for r in requests]
        self.usage.record(out)
        return out


def test_refined_texts_reach_the_prompt_and_info(tmp_path):
    from rpp.envs import make_core

    cfg = cfg_with(f"llm.cache_path={tmp_path / 'responses.sqlite'}", "env.steps_per_episode=2",
                   "refiner.every_k_steps=2")
    gen = ScriptedGenerator(lambda s, t: s.rstrip(".:") + ", for this particular viewer.")
    ranker = FirstSlotRanker()
    core = make_core(cfg, "train", ranker=ranker, refiner=make_refiner(cfg, generator=gen))
    states, _ = core.reset(core.samples[:2])
    acts = np.array([[1, 0, 0, 0]] * 2)  # recommender role, recent_15 history, taste reasoning, exact_title format
    _, _, infos = core.step(states, acts)
    for info in infos:
        assert info["refined"]["role"].endswith(", for this particular viewer.")
        assert "for this particular viewer" in info["prompt"]
    _, _, infos2 = core.step(states, acts)  # step 1: no refinement, the step-0 texts are kept
    assert [i["refined"] for i in infos2] == [i["refined"] for i in infos]
    assert len(gen.batches) == 1


@pytest.mark.llm
@pytest.mark.slow
def test_real_smollm2_refiner_inside_an_episode(smollm_ranker, tmp_path):
    """2 users, T=2, the REAL SmolLM2 as refiner (greedy) and ranker; refine at step 0 only (every_k_steps=2)."""
    from rpp.envs import make_core

    cfg = cfg_with(f"llm.cache_path={tmp_path / 'responses.sqlite'}", "env.steps_per_episode=2",
                   "refiner.every_k_steps=2", "refiner.max_new_tokens=40")
    refiner = make_refiner(cfg)
    core = make_core(cfg, "train", ranker=smollm_ranker, refiner=refiner)
    states, _ = core.reset(core.samples[:2])
    # four non-empty sentences (CPU generation is slow): user 0 history recent_5 + format no_explanation,
    # user 1 role friend + history recent_10_note_last; the "none" role/reasoning/format actions stay empty
    acts = np.array([[0, 1, 1, 3], [4, 3, 1, 1]])
    _, rewards, infos = core.step(states, acts)
    stats = refiner.stats()
    assert stats["calls"] == 1 and stats["requests"] == stats["sentences"] == 4 and stats["skipped_empty"] == 4
    judged = [v for verdicts in refiner.last_verdicts for v in verdicts.values()]
    assert len(judged) == 4 and all(v.cleaned is not None for v in judged), "the model answered every request"
    # the counts are the verdicts' (by reason), not just any split of 4
    assert stats["accepted"] == sum(v.accepted for v in judged)
    assert {r: n for r, n in stats["rejected_by_reason"].items() if n} == dict(Counter(
        v.reason for v in judged if not v.accepted))
    for user, info, verdicts in zip(core.samples[:2], infos, refiner.last_verdicts):
        assert set(info["refined"]) == set(PATTERNS)
        titles = [core.dataset.title(c) for c in user.candidates]
        for pattern, verdict in verdicts.items():
            original = core.action_set.action(pattern, info["action_indices"][PATTERNS.index(pattern)]).text
            assert info["refined"][pattern] == verdict.text
            if verdict.accepted:  # what reaches the prompt passed the guards: placeholders kept, no candidate
                assert verdict.text == verdict.cleaned
                assert placeholders(verdict.text) == placeholders(original)
                assert CandidateMatcher(titles).find(verdict.text) is None
            else:  # a rejected rewrite falls back to the original sentence, with a known reason
                assert verdict.text == original and verdict.reason in REJECTION_REASONS
    assert np.all(np.isfinite(rewards))
    _, _, infos2 = core.step(states, acts)
    assert refiner.stats()["calls"] == 1 and [i["refined"] for i in infos2] == [i["refined"] for i in infos]
