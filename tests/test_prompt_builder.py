"""The prompt builder: pure, deterministic, and every chosen action visibly shapes the prompt."""
from __future__ import annotations

import math

import pytest

from rpp.config import PromptConfig
from rpp.data import UserSample
from rpp.llm import (
    CANDIDATES_PLACEHOLDER, BootstrapRanker, Ranker, Ranking, RankRequest, format_candidate_list, parse_ranking,
    render_candidates,
)
from rpp.prompts import PATTERNS, ActionSetError, PromptBuilder, UserContext, load_action_set, pluralize
from rpp.prompts.builder import fill_placeholders

HISTORY = tuple(f"Title {i} (19{i:02d})" for i in range(30))
RATINGS = tuple(float(1 + i % 5) for i in range(30))


@pytest.fixture(scope="module")
def actions():
    return load_action_set(None)


@pytest.fixture()
def ctx():
    return UserContext(user=7, history_titles=HISTORY, history_ratings=RATINGS,
                       history_genres=tuple(("Drama",) for _ in HISTORY),
                       candidate_titles=("Cand A", "Cand B", "Cand C"))


def pick(actions, **ids):
    return {p: actions.action(p, actions.index(p, ids[p])) if p in ids else actions.action(p, 0) for p in PATTERNS}


def test_build_is_deterministic_and_holds_the_four_sentences(actions, ctx):
    builder = PromptBuilder(actions, PromptConfig(), "book")
    chosen = pick(actions, role="expert", history="recent_15", reasoning="recency", format="with_year")
    first, second = builder.build(ctx, chosen), builder.build(ctx, chosen)
    assert first == second
    system, user = first.messages
    assert system["role"] == "system" and user["role"] == "user"
    assert "You are an expert on books" in system["content"]
    assert "These are the 15 books this user chose most recently" in user["content"]
    assert "give the last few books the most weight" in user["content"]
    assert "including the year in parentheses" in user["content"]
    assert first.action_ids == {"role": "expert", "history": "recent_15", "reasoning": "recency",
                                "format": "with_year"}
    # score mode: the question closes the user turn so that one title is the natural answer
    assert user["content"].endswith("Which book will this user choose next? Answer with the title only.")


def test_history_window_follows_params_not_sentences(actions, ctx):
    builder = PromptBuilder(actions, PromptConfig(), "movie")
    five = builder.build(ctx, pick(actions, history="recent_5")).messages[1]["content"]
    assert "1. Title 25 (1925)\n" in five and "5. Title 29 (1929)" in five and "Title 24" not in five
    assert "Here are the last 5 movies" in five
    rated = builder.build(ctx, pick(actions, history="recent_30_rated")).messages[1]["content"]
    assert "1. Title 0 (1900) (rating: 1)" in rated and "30. Title 29 (1929) (rating: 5)" in rated
    assert "rating" not in five
    noted = builder.build(ctx, pick(actions, history="recent_10_note_last")).messages[1]["content"]
    assert "The most recent movie is Title 29 (1929)." in noted
    # a window larger than the history shows all of it and says how many
    longest = builder.build(ctx, pick(actions, history="recent_50"))
    assert longest.history_shown == 30 and "the last 30 movies" in longest.messages[1]["content"]


def test_missing_ratings_are_left_out(actions):
    ctx = UserContext(user=1, history_titles=("A", "B"), history_ratings=(math.nan, 4.5), history_genres=((), ()),
                      candidate_titles=("C",))
    text = PromptBuilder(actions, PromptConfig(), "game").build(
        ctx, pick(actions, history="recent_30_rated")).messages[1]["content"]
    assert "1. A\n2. B (rating: 4.5)" in text


def test_candidate_list_only_when_asked_or_in_generate_mode(actions, ctx):
    chosen = pick(actions)
    hidden = PromptBuilder(actions, PromptConfig(), "movie").build(ctx, chosen)
    assert "Cand A" not in hidden.text and CANDIDATES_PLACEHOLDER not in hidden.messages[1]["content"]
    assert hidden.rendered_messages == hidden.messages
    shown = PromptBuilder(actions, PromptConfig(show_candidates=True), "movie").build(ctx, chosen)
    # the ranker gets the marker (it writes the list in the order it presents the candidates) ...
    assert f"Candidate movies:\n{CANDIDATES_PLACEHOLDER}" in shown.messages[1]["content"]
    assert "Cand A" not in shown.messages[1]["content"]
    # ... and the prompt read by people (or sent to an LLM by hand) has it written out in presented order
    assert "Candidate movies:\n1. Cand A\n2. Cand B\n3. Cand C" in shown.rendered_messages[1]["content"]
    assert "Candidate movies:\n1. Cand A\n2. Cand B\n3. Cand C" in shown.text
    generate = PromptBuilder(actions, PromptConfig(), "movie", mode="generate").build(ctx, chosen)
    content = generate.rendered_messages[1]["content"]
    assert "1. Cand A" in content and content.endswith("one per line, and nothing else.")
    assert "Rank all 3 candidate movies" in content
    assert CANDIDATES_PLACEHOLDER in generate.messages[1]["content"]


class SpyRanker(Ranker):
    """Records every request it is sent; answers like a model that puts the FIRST item of the shown list first
    (in generate mode: the numbered answer "1." parsed against the list the model saw)."""

    identity = "spy"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[RankRequest] = []

    def rank(self, requests):
        out = []
        for req in requests:
            req = render_candidates(req)  # what every real backend does first
            self.received.append(req)
            parsed = parse_ranking("1.", req.candidates)
            out.append(Ranking(order=parsed.order, coverage=parsed.coverage))
        return out


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_bootstrap_shows_the_model_each_shuffled_list(actions, ctx, mode):
    """llm.bootstrap through the real builder: every shuffled order of the candidates is the list the model SEES,
    and a numbered answer is mapped back through the list it answered about."""
    titles = tuple(f"Cand {c}" for c in "ABCDEFGH")
    ctx = UserContext(user=ctx.user, history_titles=ctx.history_titles, history_ratings=ctx.history_ratings,
                      history_genres=ctx.history_genres, candidate_titles=titles)
    builder = PromptBuilder(actions, PromptConfig(show_candidates=(mode == "score")), "movie", mode=mode)
    prompt = builder.build(ctx, pick(actions))
    spy = SpyRanker()
    boot = BootstrapRanker(spy, bootstrap=4, seed=3)
    request = RankRequest(prompt.messages, titles)
    ranking = boot.rank([request])[0]

    assert len(spy.received) == 4
    shown_lists = []
    for sent in spy.received:
        content = sent.messages[1]["content"]
        assert CANDIDATES_PLACEHOLDER not in content
        listing = format_candidate_list(sent.candidates)
        assert f"Candidate movies:\n{listing}\n" in content  # the model sees the order it is scored in
        assert content.replace(listing, "<list>") == prompt.text.split("[user]\n", 1)[1].replace(
            format_candidate_list(titles), "<list>")  # nothing else of the prompt changes
        shown_lists.append(sent.candidates)
    assert shown_lists[0] == titles and len(set(shown_lists)) == 4
    # each "1." answer credits the candidate shown first in that list (Borda: n - 1 points)
    firsts = [lst[0] for lst in shown_lists]
    assert ranking.scores is not None
    for title in set(firsts):
        assert ranking.scores[titles.index(title)] >= (len(titles) - 1) * firsts.count(title)


def test_bootstrap_refuses_a_prompt_that_shows_no_list(actions, ctx):
    prompt = PromptBuilder(actions, PromptConfig(), "movie", mode="score").build(ctx, pick(actions))
    boot = BootstrapRanker(SpyRanker(), bootstrap=3)
    with pytest.raises(ValueError, match="show_candidates"):
        boot.rank([RankRequest(prompt.messages, ctx.candidate_titles)])


def test_bootstrap_in_score_mode_needs_the_list_shown_config_error():
    from rpp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="llm.bootstrap=3 .*prompt.show_candidates"):
        load_config(None, ["llm.bootstrap=3"])
    assert load_config(None, ["llm.bootstrap=3", "prompt.show_candidates=true"]).llm.bootstrap == 3
    assert load_config(None, ["llm.bootstrap=3", "llm.mode=generate"]).llm.bootstrap == 3


def test_none_actions_leave_no_trace(actions, ctx):
    builder = PromptBuilder(actions, PromptConfig(system="Be brief."), "movie")
    prompt = builder.build(ctx, pick(actions, role="none", reasoning="none", format="none"))
    assert prompt.messages[0]["content"] == "Be brief."
    assert "\n\n\n" not in prompt.messages[1]["content"]
    assert prompt.sentences["reasoning"] == "" and prompt.sentences["format"] == ""


def test_refined_texts_replace_sentences_but_not_params(actions, ctx):
    builder = PromptBuilder(actions, PromptConfig(), "movie")
    chosen = pick(actions, history="recent_5")
    prompt = builder.build(ctx, chosen, refined={"reasoning": "This reader loves {item_noun_plural} {odd}.",
                                                 "history": "Lately ({n_history}):"})
    content = prompt.messages[1]["content"]
    assert "This reader loves movies {odd}." in content  # unknown braces from an LLM stay literal
    assert "Lately (5):" in content and "5. Title 29 (1929)" in content and "Title 24" not in content
    assert "Infer the user's taste" not in content


def test_taskwise_defaults_and_overrides(actions):
    assert PromptBuilder(actions, PromptConfig(), "movie").taskwise() == pick(actions)
    cfg = PromptConfig(taskwise={"role": "recommender", "format": "no_explanation"})
    assert PromptBuilder(actions, cfg, "movie").taskwise() == pick(actions, role="recommender",
                                                                    format="no_explanation")
    with pytest.raises(ActionSetError, match="no action 'wizard'"):
        PromptBuilder(actions, PromptConfig(taskwise={"role": "wizard"}), "movie")
    with pytest.raises(ActionSetError, match="unknown pattern 'tone'"):
        PromptBuilder(actions, PromptConfig(taskwise={"tone": "calm"}), "movie")


def test_user_context_from_sample(ml100k, ml100k_split):
    sample: UserSample = ml100k_split.train[0]
    ctx = UserContext.from_sample(sample, ml100k)
    assert ctx.history_titles[-1] == ml100k.title(sample.history[-1])
    assert len(ctx.history_titles) == len(ctx.history_ratings) == len(ctx.history_genres) == len(sample.history)
    assert ctx.candidate_titles[sample.target_index] == ml100k.title(sample.target)
    assert ctx.history_genres[0] == tuple(ml100k.genres(sample.history[0]))


def test_helpers():
    assert [pluralize(w) for w in ("movie", "story", "game", "box", "day")] == \
        ["movies", "stories", "games", "boxes", "days"]
    assert fill_placeholders("{{x}} {a} {b}", {"a": "1"}) == "{x} 1 {b}"
    with pytest.raises(ValueError, match="no action chosen for pattern"):
        PromptBuilder(load_action_set(None), PromptConfig(), "movie").sentences(
            UserContext(1, ("A",), (1.0,), ((),), ("B",)), {"role": load_action_set(None).action("role", 0)})
