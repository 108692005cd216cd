"""AGP and profile_fixed with a scripted generator and a ranker stub that places each training user's target by
the profile in the prompt: the verify step, rejected rewrites, malformed answers, and no test target read."""
from __future__ import annotations

import pytest

from rpp.benchmark import BenchmarkError
from rpp.benchmark.agp import AGPMethod, ProfileFixedMethod, check_prompt, fixed_profile, profile_sentences
from rpp.benchmark.methods import BenchContext
from rpp.config import load_config
from rpp.llm.base import Ranker, Ranking, TextGenerator


class ScriptedGenerator(TextGenerator):
    """Profiles say GOOD or BAD when the profile prompt does; summaries are fixed; rewrites come from a script."""

    identity = "scripted"

    def __init__(self, rewrites) -> None:
        super().__init__()
        self.rewrites = list(rewrites)
        self.asked: list[str] = []

    def generate(self, prompts, max_new_tokens):
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            self.asked.append(text)
            if text.startswith("Improve this prompt"):
                out.append(self.rewrites.pop(0))
            elif text.startswith("A prompt wrote"):
                out.append("The profiles should name the genres.")
            else:
                out.append("GOODPROFILE likes comedies" if "GOOD" in text else
                           "BADPROFILE dislikes everything" if "BAD" in text else "likes films")
        return out


class ProfileOracleRanker(Ranker):
    """Knows the training users' targets (a test device): puts the target 1st after a GOODPROFILE, last after a
    BADPROFILE, 5th otherwise. Records every candidate list it is asked about."""

    identity = "oracle"

    def __init__(self, dataset, users) -> None:
        super().__init__()
        self.target_slot = {tuple(dataset.title(i) for i in u.candidates): u.target_index for u in users}
        self.seen: list[tuple] = []

    def rank(self, requests):
        out = []
        for r in requests:
            self.seen.append(tuple(r.candidates))
            text = " ".join(m["content"] for m in r.messages)
            n = len(r.candidates)
            slot = self.target_slot.get(tuple(r.candidates))
            if slot is None:  # not a training user: presented order
                out.append(Ranking(order=list(range(n))))
                continue
            pos = 0 if "GOODPROFILE" in text else n - 1 if "BADPROFILE" in text else 4
            rest = [i for i in range(n) if i != slot]
            out.append(Ranking(order=rest[:pos] + [slot] + rest[pos:]))
        return out


class Sealed:
    def __init__(self, sample) -> None:
        object.__setattr__(self, "_sample", sample)

    def __getattr__(self, name):
        if name in ("target", "target_index"):
            raise AssertionError(f"a method read the test target ({name})")
        return getattr(self._sample, name)


def _setup(ml100k, ml100k_split, rewrites, *overrides):
    cfg = load_config(None, ["llm.cache=false", "agp.batch_size=4", *overrides])
    ranker = ProfileOracleRanker(ml100k, ml100k_split.train)
    ctx = BenchContext(cfg=cfg, dataset=ml100k, fit_users=ml100k_split.val,
                       train_interactions=ml100k_split.train_interactions, ranker_factory=lambda: ranker,
                       train_users=ml100k_split.train)
    gen = ScriptedGenerator(rewrites)
    return AGPMethod(ctx, generator=gen), ranker, gen


def test_verify_step_rejects_a_rewrite_that_lowers_ndcg_and_keeps_one_that_raises_it(ml100k, ml100k_split):
    bad = "Write a BAD profile of this user from these movies:\n{history}"
    good = "Write a GOOD profile of this user from these movies:\n{history}"
    method, ranker, gen = _setup(ml100k, ml100k_split, [bad, good])
    method.fit()
    assert [b["outcome"] for b in method.batches] == ["no_improvement", "accepted"]
    first, second = method.batches
    assert first["rewrite_ndcg10"] < first["ndcg10"]  # BAD profiles put the target last: rejected
    assert second["rewrite_ndcg10"] > second["ndcg10"]
    assert method.prompt == good and method.accepted == 1 and method.rejected["no_improvement"] == 1
    # 8 training users: per batch of 4, 4 profiles + summary + rewrite + 4 verification profiles
    assert method.cost()["train_generations"] == 2 * (4 + 1 + 1 + 4) and method.cost()["train_users"] == 8


def test_a_rewrite_that_only_lowers_ndcg_leaves_the_initial_prompt(ml100k, ml100k_split):
    bad = "Write a BAD profile of this user from these movies:\n{history}"
    method, _, _ = _setup(ml100k, ml100k_split, [bad, bad])
    method.fit()
    assert method.prompt == method.initial_prompt and method.rejected["no_improvement"] == 2
    assert "initial prompt" in method.notes()


def test_malformed_generator_answers_are_counted_not_fatal(ml100k, ml100k_split):
    answers = [None, "", "A prompt without the history field.", "Profile {history} of {someone}",
               "Sure! Here is the improved prompt:\nWrite a GOOD profile from {history}"]
    from rpp.data import split_users

    split = split_users(ml100k, load_config(None, ["data.n_train_users=20", "data.n_val_users=4",
                                                   "data.n_test_users=4"]).data, 0)
    method, _, _ = _setup(ml100k, split, answers)
    method.fit()
    assert [b["outcome"] for b in method.batches] == ["generator_failed", "empty", "missing_history", "malformed",
                                                      "accepted"]
    assert method.prompt == "Write a GOOD profile from {history}"  # the preamble line is stripped
    assert check_prompt("x" * 50 + " {history}", "", 40) == (None, "too_long")
    assert check_prompt("Same {history}", "Same  {history}", 100) == (None, "unchanged")
    assert check_prompt("{}{history}", "", 100) == (None, "malformed")


def test_no_test_target_is_read_and_no_test_user_is_ranked_while_fitting(ml100k, ml100k_split):
    good = "Write a GOOD profile of this user from these movies:\n{history}"
    method, ranker, gen = _setup(ml100k, ml100k_split, [good, good])
    method.fit()
    test_lists = {tuple(ml100k.title(i) for i in u.candidates) for u in ml100k_split.test}
    assert ranker.seen and not set(ranker.seen) & test_lists
    n_fit = len(ranker.seen)
    rankings = method.rank([Sealed(u) for u in ml100k_split.test])
    assert set(ranker.seen[n_fit:]) == test_lists and len(rankings) == len(ml100k_split.test)
    assert method.cost()["infer_generations"] == len(ml100k_split.test)
    fixed = ProfileFixedMethod(method.ctx, "profile_fixed")
    assert len(fixed.rank([Sealed(u) for u in ml100k_split.test])) == len(ml100k_split.test)
    # at test time the generator is asked for profiles only, one per test user, from the user's history
    asked_at_test = gen.asked[-len(ml100k_split.test):]
    for u, text in zip(ml100k_split.test, asked_at_test):
        assert ml100k.title(u.history[-1]) in text and ml100k.title(u.history[-6]) not in text


def test_profile_fixed_describes_the_recent_history(ml100k, ml100k_split):
    u = ml100k_split.test[0]
    text = fixed_profile(ml100k, u, 5, "movies")
    assert text.startswith("In their last 5 movies this user chose mostly ")
    from rpp.prompts.refiner import top_genres

    top = top_genres({"history_genres": [tuple(ml100k.genres(i)) for i in u.history[-5:]]}, 3)
    assert all(g in text for g in top) and "released 19" in text
    ctx = BenchContext(cfg=load_config(), dataset=ml100k, fit_users=[], train_interactions=None)
    prompt = ctx.builder.build(ctx.user_context(u), ctx.builder.taskwise(), profile_sentences(ctx.builder, text))
    assert f"Profile of this user: {text}" in prompt.messages[-1]["content"]


def test_bad_agp_templates_are_refused(ml100k, ml100k_split):
    with pytest.raises(BenchmarkError, match="history"):
        _setup(ml100k, ml100k_split, [], "agp.profile_prompt=Describe the user.")
    with pytest.raises(BenchmarkError, match="optimizer_instruction"):
        _setup(ml100k, ml100k_split, [], "agp.optimizer_instruction=Improve it.")


def test_seed_methods_are_registered_and_load_nothing_until_used(ml100k, ml100k_split):
    from rpp.benchmark import build_methods

    ctx = BenchContext(cfg=load_config(), dataset=ml100k, fit_users=ml100k_split.val, train_interactions=None,
                       ranker_factory=lambda: pytest.fail("a model was loaded while building the methods"))
    rows = build_methods(ctx, ["papprec", "profile_fixed", "agp"])
    assert [m.name for m in rows] == ["papprec_shared", "papprec_personal", "profile_fixed", "agp"]
    assert rows[0].search is rows[1].search  # one shared-token search serves both PAP-REC rows
