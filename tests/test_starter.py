"""The shipped starter config (experiments/starter.yaml: a CSV dataset + an OpenAI-compatible endpoint) trains with
`rpp train` against a REAL llama.cpp server on 127.0.0.1, with only the paths, the endpoint and the budget changed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LlamaServer  # noqa: E402

from rpp.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTER = ROOT / "experiments" / "starter.yaml"
GENRES = ["Fantasy", "Mystery", "Romance", "Science", "History"]


def write_books(folder: Path, n_users: int = 12, n_items: int = 40) -> tuple[Path, Path]:
    """A small, seeded book dataset in the starter's column names."""
    import numpy as np

    rng = np.random.default_rng(0)
    items = folder / "items.csv"
    items.write_text("item_id,title,genres\n" + "".join(
        f"b{i},Book {i} of the {GENRES[i % 5]} shelf,{GENRES[i % 5]}\n" for i in range(n_items)))
    rows = ["user_id,item_id,timestamp,rating"]
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, size=8, replace=False)):
            rows.append(f"u{u},b{i},{1000 + t},{int(rng.integers(1, 6))}")
    inter = folder / "interactions.csv"
    inter.write_text("\n".join(rows) + "\n")
    return inter, items


def test_starter_config_loads_and_points_at_an_endpoint():
    cfg = load_config(STARTER)
    assert cfg.data.dataset == "csv" and cfg.llm.backend == "openai" and cfg.llm.base_url
    assert cfg.refiner.base_url == cfg.llm.base_url          # one place to point at a server


@pytest.mark.llm
@pytest.mark.server
@pytest.mark.slow
def test_rpp_train_with_the_starter_config_against_a_real_server(tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test installs llama-cpp-python[server]==0.3.36)")
    from rpp.llm.local import gguf_path

    inter, items = write_books(tmp_path)
    server = LlamaServer(gguf_path("smollm2-135m-instruct"), alias="smollm2-135m-instruct").start(timeout_s=120)
    try:
        overrides = {
            "data.interactions_file": inter, "data.items_file": items, "data.n_train_users": 4,
            "data.n_val_users": 2, "data.n_test_users": 2, "data.n_candidates": 4, "data.min_history": 3,
            "llm.base_url": server.base_url, "llm.model": "smollm2-135m-instruct", "llm.max_new_tokens": 24,
            "llm.concurrency": 1, "llm.timeout_s": 120, "llm.cache_path": tmp_path / "responses.sqlite",
            "env.n_envs": 2, "train.total_steps": 8, "train.n_steps": 2, "train.batch_size": 4,
            "train.n_epochs": 1, "train.check_users": 2, "train.gate_users": 1,
            "train.runs_dir": tmp_path / "runs",
        }
        args = [sys.executable, "-m", "rpp.cli", "train", "--config", str(STARTER)]
        for key, value in overrides.items():
            args += ["--set", f"{key}={value}"]
        env = {**os.environ, "OPENAI_API_KEY": "unused-by-llama-cpp", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        server.assert_alive()
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "starter"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert metrics, "no rollout was recorded"
    assert json.loads((run / "gate.json").read_text())["served"] in ("policy", "fixed")
    resolved = load_config(run / "config.yaml")
    assert resolved.llm.backend == "openai" and resolved.llm.base_url == server.base_url
