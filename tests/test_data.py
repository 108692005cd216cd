"""Loaders on small real files, malformed inputs, the split and candidate sampling."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rpp.config import DataConfig
from rpp.data import DataError, Dataset, load_csv, load_dataset, load_ml1m, split_users


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def toy_csv(tmp_path, n_users=12, n_items=40, per_user=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        for t, i in enumerate(items):
            rows.append((f"u{u}", int(i), 1000 + 10 * t + u, int(rng.integers(1, 6))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    items = pd.DataFrame({"item_id": range(n_items), "title": [f"Item {i} (2001)" for i in range(n_items)],
                          "genres": ["Drama|Comedy" if i % 2 else "Action" for i in range(n_items)]})
    inter_path, items_path = tmp_path / "inter.csv", tmp_path / "items.csv"
    inter.to_csv(inter_path, index=False)
    items.to_csv(items_path, index=False)
    return DataConfig(dataset="csv", interactions_file=str(inter_path), items_file=str(items_path),
                      n_train_users=4, n_val_users=3, n_test_users=3, n_candidates=10, min_history=3,
                      item_noun="item")


def test_csv_loader(tmp_path):
    cfg = toy_csv(tmp_path)
    ds = load_csv(cfg)
    assert ds.n_users == 12 and ds.n_items == 40 and len(ds.interactions) == 96
    assert ds.title(3) == "Item 3 (2001)"
    assert ds.genres(1) == ["Drama", "Comedy"]
    assert list(ds.interactions.columns) == ["user", "item", "timestamp", "rating"]


def test_csv_without_ratings_and_custom_columns(tmp_path):
    write(tmp_path / "i.csv", "who,what,when\na,1,5\na,2,6\nb,1,7\n")
    write(tmp_path / "t.csv", "what,name\n1,One\n2,Two\n")
    cfg = DataConfig(dataset="csv", interactions_file=str(tmp_path / "i.csv"), items_file=str(tmp_path / "t.csv"),
                     columns={"user": "who", "item": "what", "timestamp": "when", "rating": None, "title": "name"})
    ds = load_dataset(cfg)
    assert ds.interactions["rating"].isna().all()
    assert ds.title(2) == "Two"


def test_ml1m_loader(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::20::3::978300761\n2::10::4::978300762\n")
    write(tmp_path / "movies.dat", "10::Heat (1995)::Action|Crime\n20::Fargo (1996)::Crime|Drama\n")
    ds = load_ml1m(tmp_path)
    assert ds.name == "ml-1m" and ds.n_users == 2 and ds.title(20) == "Fargo (1996)"
    assert ds.genres(10) == ["Action", "Crime"]


def test_ml100k_embedded(ml100k):
    assert ml100k.n_users == 943 and ml100k.n_items == 1682 and len(ml100k.interactions) == 100_000
    assert ml100k.title(1) == "Toy Story (1995)"
    assert "Animation" in ml100k.genres(1)


# Each case: (interactions text, items text, words that must appear in the error)
MALFORMED = {
    "empty interactions": ("", "item_id,title\n1,A\n", ["inter.csv", "empty"]),
    "empty items": ("user_id,item_id,timestamp,rating\nu,1,1,3\n", "", ["items.csv", "empty"]),
    "header only": ("user_id,item_id,timestamp,rating\n", "item_id,title\n1,A\n", ["inter.csv"]),
    "no title column": ("user_id,item_id,timestamp,rating\nu,1,1,3\n", "item_id,name\n1,A\n", ["items.csv", "title"]),
    "no timestamp column": ("user_id,item_id,rating\nu,1,3\n", "item_id,title\n1,A\n", ["inter.csv", "timestamp"]),
    "no user column": ("uid,item_id,timestamp,rating\nu,1,1,3\n", "item_id,title\n1,A\n", ["inter.csv", "user_id"]),
    "text timestamp": ("user_id,item_id,timestamp,rating\nu,1,yesterday,3\n", "item_id,title\n1,A\n",
                       ["inter.csv", "timestamp", "yesterday"]),
    "text rating": ("user_id,item_id,timestamp,rating\nu,1,5,great\n", "item_id,title\n1,A\n",
                    ["inter.csv", "rating", "great"]),
    "duplicate item ids": ("user_id,item_id,timestamp,rating\nu,1,1,3\n", "item_id,title\n1,A\n1,B\n",
                           ["items.csv", "duplicate", "1"]),
    "empty title": ("user_id,item_id,timestamp,rating\nu,1,1,3\n", "item_id,title\n1,\n", ["items.csv", "title"]),
    "unknown item": ("user_id,item_id,timestamp,rating\nu,7,1,3\n", "item_id,title\n1,A\n",
                     ["inter.csv", "items.csv", "7"]),
    "missing user value": ("user_id,item_id,timestamp,rating\n,1,1,3\n", "item_id,title\n1,A\n",
                           ["inter.csv", "user"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_csv_is_rejected_with_file_and_field(tmp_path, case):
    inter_text, items_text, words = MALFORMED[case]
    write(tmp_path / "inter.csv", inter_text)
    write(tmp_path / "items.csv", items_text)
    cfg = DataConfig(dataset="csv", interactions_file=str(tmp_path / "inter.csv"),
                     items_file=str(tmp_path / "items.csv"))
    with pytest.raises(DataError) as err:
        load_csv(cfg)
    for word in words:
        assert word in str(err.value), f"{case}: {word!r} not in {err.value}"


def test_malformed_ml1m(tmp_path):
    with pytest.raises(DataError, match="ratings.dat"):
        load_ml1m(tmp_path)
    write(tmp_path / "ratings.dat", "1::10::5\n")
    write(tmp_path / "movies.dat", "10::Heat (1995)::Action\n")
    with pytest.raises(DataError, match="ratings.dat.*4"):
        load_ml1m(tmp_path)
    write(tmp_path / "ratings.dat", "x::10::5::978300760\n")
    with pytest.raises(DataError, match="ratings.dat.*'user'"):
        load_ml1m(tmp_path)
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(dataset="ml-1m"))
    with pytest.raises(DataError, match="interactions_file"):
        load_dataset(DataConfig(dataset="csv"))


def _all_users(split):
    return [s.user for s in split.train + split.val + split.test]


def test_split_disjoint_deterministic_and_leave_last_out(tmp_path):
    cfg = toy_csv(tmp_path)
    ds = load_csv(cfg)
    a, b = split_users(ds, cfg, seed=7), split_users(ds, cfg, seed=7)
    users = _all_users(a)
    assert len(users) == len(set(users)) == 10
    assert {s.user for s in a.train}.isdisjoint({s.user for s in a.test})
    assert {s.user for s in a.val}.isdisjoint({s.user for s in a.test} | {s.user for s in a.train})
    assert a.train == b.train and a.val == b.val and a.test == b.test
    assert _all_users(split_users(ds, cfg, seed=8)) != users
    for s in a.train + a.val + a.test:
        rows = ds.interactions[ds.interactions.user == s.user].sort_values("timestamp")
        assert s.target == rows.item.iloc[-1]
        assert list(s.history) == rows.item.iloc[:-1].tolist()
        assert s.candidates[s.target_index] == s.target
        assert len(s.candidates) == len(set(s.candidates)) == cfg.n_candidates
        assert not set(s.candidates) & set(s.history), "a candidate is in the user's history"
    # the held-out targets are not in the training interactions
    held = a.train_interactions.groupby("user").size().sum()
    assert held == len(ds.interactions) - ds.n_users


def test_split_independent_of_user_order(tmp_path):
    cfg = toy_csv(tmp_path)
    ds = load_csv(cfg)
    shuffled = Dataset(ds.name, ds.interactions.sample(frac=1.0, random_state=3).reset_index(drop=True),
                       ds.items.sample(frac=1.0, random_state=4).reset_index(drop=True), ds.item_noun)
    a, b = split_users(ds, cfg, seed=1), split_users(shuffled, cfg, seed=1)
    by_user_a = {s.user: s for s in a.train + a.val + a.test}
    by_user_b = {s.user: s for s in b.train + b.val + b.test}
    assert by_user_a == by_user_b


def test_target_slots_are_spread(ml100k):
    cfg = DataConfig(n_train_users=200, n_val_users=100, n_test_users=300)
    split = split_users(ml100k, cfg, seed=0)
    slots = np.bincount([s.target_index for s in split.test], minlength=20)
    assert slots.min() >= 3, f"target slots not spread over the list: {slots}"


def test_popularity_negatives_favor_popular_items(ml100k):
    uni = split_users(ml100k, DataConfig(n_train_users=0, n_val_users=0, n_test_users=200), seed=0)
    pop = split_users(ml100k, DataConfig(n_train_users=0, n_val_users=0, n_test_users=200,
                                         negatives="popularity"), seed=0)
    counts = uni.train_interactions["item"].value_counts()

    def mean_pop(split):
        return np.mean([counts.get(c, 0) for s in split.test for i, c in enumerate(s.candidates)
                        if i != s.target_index])

    assert mean_pop(pop) > 2 * mean_pop(uni)


def test_min_history_drops_and_counts(ml100k):
    cfg = DataConfig(min_history=30, n_train_users=10, n_val_users=10, n_test_users=10)
    split = split_users(ml100k, cfg, seed=0)
    per_user = ml100k.interactions.groupby("user").size()
    assert split.dropped_users == int((per_user - 1 < 30).sum()) > 0
    assert split.eligible_users == ml100k.n_users - split.dropped_users
    assert all(len(s.history) >= 30 for s in split.train + split.val + split.test)


def test_too_many_users_requested(tmp_path):
    cfg = toy_csv(tmp_path).model_copy(update={"n_train_users": 100})
    with pytest.raises(DataError, match="n_train_users"):
        split_users(load_csv(cfg), cfg, seed=0)
