"""The generate-mode parser on messy answers, score ordering, candidate-list rendering. No model needed."""
from __future__ import annotations

import pytest

from rpp.llm import CANDIDATES_PLACEHOLDER, RankRequest, order_from_scores, parse_ranking, render_candidates

CANDS = ("Toy Story (1995)", "Godfather, The (1972)", "Fargo (1996)", "Heat (1995)",
         "Star Wars (1977)", "Twelve Monkeys (1995)")

# (answer, the picks the parser must find, in order)
MESSY = [
    ("3\n1\n2", [2, 0, 1]),                                                      # bare indices
    ("3.\n1.\n5.", [2, 0, 4]),                                                   # indices with dots
    ("[4] [2] [6]", [3, 1, 5]),                                                  # bracketed on one line
    ("1. Fargo (1996)\n2. Toy Story (1995)", [2, 0]),                            # rank markers + exact titles
    ("1. fargo (1996)\n2. STAR WARS (1977)", [2, 4]),                            # other case
    ("1. The Godfather\n2. Twelve Monkeys", [1, 5]),                             # article moved, no year
    ("Sure! Here is my ranking:\n1. Fargo\n2. Heat (1995)\nHope that helps.", [2, 3]),  # prose around a list
    ("I think they'd love Star Wars (1977) most, then Fargo (1996).", [4, 2]),   # titles inside prose
    ("1. Fargo (1996)\n2. Fargo (1996)\n3. Heat (1995)", [2, 3]),                # repeated item
    ("1. Titanic (1997)\n2. Heat (1995)", [3]),                                  # item not among candidates
    ("", []),                                                                    # empty answer
    ("I cannot recommend movies.", []),                                          # refusal
    ("3, 1, 2", [2, 0, 1]),                                                      # comma-separated numbers
    ("6 > 5 > 4", [5, 4, 3]),                                                    # arrows
    ("1. Toy Storry (1995)\n2. Twelve Monkies", [0, 5]),                         # typos (fuzzy)
    ("**Fargo (1996)**\n- *Heat (1995)*", [2, 3]),                               # markdown decoration
    ("Candidate 2 is best, then candidate 4.", [1, 3]),                          # labelled references
    ("1. 42\n2. 3", [2]),                                                        # out-of-range index ignored
    ("1. Fargo (1996) - a dark comedy\n2. Toy Story (1995) - animated", [2, 0]), # titles with commentary
]


@pytest.mark.parametrize("answer,expected", MESSY)
def test_parser_on_messy_answers(answer, expected):
    result = parse_ranking(answer, CANDS)
    assert result.placed == expected
    assert sorted(result.order) == list(range(len(CANDS)))
    assert result.order[:len(expected)] == expected
    rest = [i for i in range(len(CANDS)) if i not in expected]
    assert result.order[len(expected):] == rest  # unmentioned: presented order
    assert result.coverage == pytest.approx(len(expected) / len(CANDS))


def test_unknown_items_are_reported_not_mapped():
    result = parse_ranking("1. Titanic (1997)\n2. Casablanca (1942)", CANDS)
    assert result.placed == [] and len(result.unmatched) == 2 and result.coverage == 0.0


def test_short_title_only_matches_whole_line():
    cands = ("Heat (1995)", "Heat Wave (2002)")
    assert parse_ranking("Heat Wave (2002)\nHeat", cands).placed == [1, 0]
    assert parse_ranking("the heat of summer", cands).placed == []


def test_order_from_scores_breaks_ties_by_presented_order():
    assert order_from_scores([1.0, 3.0, 1.0, float("nan"), 3.0]) == [1, 4, 0, 2, 3]


def test_render_candidates_replaces_the_placeholder_only():
    req = RankRequest(({"role": "user", "content": f"Pick one:\n{CANDIDATES_PLACEHOLDER}\nAnswer:"},), CANDS[:2])
    rendered = render_candidates(req)
    assert rendered.messages[0]["content"] == "Pick one:\n1. Toy Story (1995)\n2. Godfather, The (1972)\nAnswer:"
    plain = RankRequest(({"role": "user", "content": "no list"},), CANDS[:2])
    assert render_candidates(plain) is plain
