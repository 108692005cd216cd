"""Shared fixtures. Tests that need the real SmolLM2 or ML-100K use the cached assets (fetched by `make test`)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_cfg():
    """The default config shrunk to a few users, for fast tests."""
    from rpp.config import load_config

    return load_config(None, [
        "data.n_train_users=8", "data.n_val_users=4", "data.n_test_users=4",
        "env.n_envs=4", "env.steps_per_episode=2", "train.check_users=0",
    ])


@pytest.fixture(scope="session")
def ml100k():
    from rpp.data import load_ml100k

    return load_ml100k()


@pytest.fixture(scope="session")
def ml100k_split(ml100k, small_cfg):
    from rpp.data import split_users

    return split_users(ml100k, small_cfg.data, small_cfg.seed)


@pytest.fixture(scope="session")
def smollm_ranker(tmp_path_factory, small_cfg):
    """The REAL SmolLM2-135M-Instruct local ranker in score mode, fp32, with a throwaway response cache."""
    from rpp.llm import make_ranker

    cfg = small_cfg.model_copy(deep=True)
    cfg.llm.dtype = "float32"
    cfg.llm.cache_path = str(tmp_path_factory.mktemp("llmcache") / "responses.sqlite")
    ranker = make_ranker(cfg)
    yield ranker
    ranker.close()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the small GRU agents train much faster single-threaded than fighting
    over the machine's few shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
