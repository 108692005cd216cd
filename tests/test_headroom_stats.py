"""rpp.benchmark.headroom on synthetic NDCG arrays whose answer is known by construction."""
import numpy as np
import pytest

from rpp.benchmark import headroom as H


def _array(n_users=200, n_prompts=6, n_items=4, user_sd=0.15, prompt=None, inter_sd=0.0, noise_sd=0.1, seed=0,
           groups=None, group_best=None, effect=0.0):
    rng = np.random.default_rng(seed)
    x = 0.35 + user_sd * rng.standard_normal((n_users, 1, 1))
    if prompt is not None:
        x = x + np.asarray(prompt)[None, :, None]
    x = x + inter_sd * rng.standard_normal((n_users, n_prompts, 1))
    if groups is not None:
        bonus = np.zeros((n_users, n_prompts, 1))
        bonus[np.arange(n_users), np.asarray(group_best)[groups], 0] = effect
        x = x + bonus
    return x + noise_sd * rng.standard_normal((n_users, n_prompts, n_items))


def test_decompose_recovers_the_planted_components():
    x = _array(n_users=2000, user_sd=0.2, prompt=[0, 0.1, -0.1, 0, 0, 0], inter_sd=0.05, noise_sd=0.1)
    v = H.decompose(x)
    assert v["user"] == pytest.approx(0.04, rel=0.1)
    assert v["prompt"] == pytest.approx(np.var([0, 0.1, -0.1, 0, 0, 0]), rel=0.05)
    assert v["within"] == pytest.approx(0.01, rel=0.05)
    # the interaction of cell means holds the planted 0.05^2 plus the item noise within/J, each less 1/K (removed
    # with the user means); the corrected part removes the noise
    assert v["interaction"] == pytest.approx((0.0025 + 0.01 / 4) * 5 / 6, rel=0.1)
    assert v["interaction_corrected"] == pytest.approx(0.0025 * 5 / 6, rel=0.15)
    assert sum(v["shares"].values()) == pytest.approx(1.0)


def test_pure_item_noise_is_unreliable_and_gives_keep():
    x = _array(inter_sd=0.0, noise_sd=0.2, seed=1)
    res = H.analyse(x, n_boot=300)
    rel = res["reliability"]["user_prompt"]
    assert abs(rel["r"]["value"]) < 0.1 and rel["spearman_brown"]["low"] < 0
    g = res["gains"]
    assert g.per_user["low"] < 0 < g.per_user["high"]  # selection on noise gains nothing on the other half
    assert g.oracle["low"] > 0.1  # while the label oracle "finds" a lot
    assert res["verdict"] == H.KEEP


def test_stable_interaction_is_reliable_and_gives_train():
    x = _array(inter_sd=0.15, noise_sd=0.1, seed=2)
    res = H.analyse(x, n_boot=300)
    sb = res["reliability"]["user_prompt"]["spearman_brown"]
    assert sb["value"] > 0.6 and sb["low"] > 0.4
    assert res["gains"].per_user["low"] > 0.02
    assert res["verdict"] == H.TRAIN


def test_better_fixed_prompt_is_found_and_measured_honestly():
    x = _array(prompt=[0, 0, 0.08, 0, 0, 0], noise_sd=0.15, seed=3)
    res = H.analyse(x, n_boot=300)
    g = res["gains"]
    assert g.fixed_pick == 2
    assert g.fixed["low"] > 0.04 and g.fixed["value"] == pytest.approx(0.08, abs=0.03)
    assert res["reliability"]["prompt"]["r"]["value"] > 0.8
    assert res["verdict"] == H.FIXED


def test_state_rule_separates_observable_from_hidden_groups():
    rng = np.random.default_rng(4)
    n = 300
    hidden = rng.integers(0, 3, n)
    kw = dict(n_users=n, groups=hidden, group_best=[1, 3, 5], effect=0.2, noise_sd=0.1, seed=4)
    x = _array(**kw)
    observed = {"genre": hidden.copy(), "history_length": rng.integers(0, 4, n)}
    res = H.analyse(x, labels=observed, n_boot=300)
    assert res["gains"].state["low"] > 0.05 and res["gains"].state_features == ["genre", "genre"]
    assert res["verdict"] == H.TRAIN
    # same array, groups no observable feature reveals: per-user effects still repeat, but no policy can read them
    unrelated = {"genre": rng.integers(0, 3, n), "history_length": rng.integers(0, 4, n)}
    res = H.analyse(x, labels=unrelated, n_boot=300)
    assert res["reliability"]["user_prompt"]["spearman_brown"]["low"] > 0.5
    g = res["gains"]
    assert g.state_vs_fixed["low"] < 0 < g.state_vs_fixed["high"]  # groups it cannot see: no better than fixed
    # each of prompts 1, 3, 5 is the best for a third of the users: any of them beats the task-wise prompt
    assert g.fixed_pick in (1, 3, 5) and g.fixed["low"] > 0.03
    assert res["verdict"] == H.FIXED


def test_split_half_and_spearman_brown():
    assert list(H.halves(4)[0]) == [0, 2] and list(H.halves(4)[1]) == [1, 3]
    assert H.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert H.spearman_brown(0.0) == 0.0


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="users x prompts x items"):
        H.analyse(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        H.analyse(np.zeros((3, 3, 1)))
    x = np.zeros((3, 3, 2))
    x[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="missing"):
        H.analyse(x)
