"""Run directories and resumable checkpoints.

Layout of ``<train.runs_dir>/<name>/``::

    config.yaml            the resolved config (cfg.save: secret-looking values redacted)
    actions.yaml           a copy of the action set the agents were trained on (the run is self-contained)
    ranker_check.json      the pre-training ranker sanity check
    metrics.jsonl          one line per rollout
    usage.json             LLM usage totals over every session of the run
    learning_curve.png
    tb/                    TensorBoard events (SB3 logger)
    checkpoints/rollout-000004/{model.zip, state.pkl}
    checkpoints/latest     name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is replaced atomically, so a
crash (even SIGKILL) at any moment leaves the previous checkpoint intact and ``latest`` pointing to a complete one.
``model.zip`` is SB3's own save (policy, optimizer, num_timesteps, ...); ``state.pkl`` holds what SB3 does not save:
the RNG states of torch / numpy / random, the VecEnv's user-stream state and the usage so far.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml

from rpp.config import Config, ConfigError, _apply_override, _format_validation_error, redact

CHECKPOINTS = "checkpoints"
LATEST = "latest"
KEEP_CHECKPOINTS = 3
"""Older checkpoints are deleted once a newer one is complete (the final one is always kept)."""

RESUME_MAY_CHANGE = ("name", "train.total_steps", "train.checkpoint_every", "train.runs_dir", "train.check_users",
                     "train.gate_users", "train.gate_alpha", "train.gate_search_users",
                     "train.device", "llm.cache", "llm.cache_path", "llm.threads", "llm.concurrency",
                     "llm.timeout_s", "llm.max_retries", "llm.base_url", "eval", "benchmark")
"""Config keys (or sections) a resumed run may change; anything else would make the continuation another run."""


# ------------------------------------------------------------------------------------------------ run config

def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run was trained with (its config.yaml), with optional ``section.key=value`` overrides.

    The action set is read from the run's own copy (actions.yaml), so a run stays usable when the original
    action-set file moves. Values redacted when the config was saved ('***') fall back to their defaults with a
    warning (rpp configs hold no secrets, only the NAMES of environment variables that do)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml); train one with `rpp train`")
    data = yaml.safe_load(path.read_text()) or {}
    redacted = _drop_redacted(data)
    if redacted:
        warnings.warn(f"{path}: redacted value(s) of {', '.join(redacted)} replaced by their defaults",
                      stacklevel=2)
    for ov in overrides or []:
        _apply_override(data, ov)
    try:
        cfg = Config.model_validate(data)
    except Exception as err:  # pydantic ValidationError -> the same message style as load_config
        if hasattr(err, "errors"):
            raise ConfigError(_format_validation_error(err, str(path))) from None
        raise
    actions = Path(run_dir) / "actions.yaml"
    if actions.is_file():
        cfg.prompt.action_spaces = str(actions)
    return cfg


def _drop_redacted(node: Any, prefix: str = "") -> list[str]:
    dropped = []
    if isinstance(node, dict):
        for key in list(node):
            if node[key] == "***":
                del node[key]
                dropped.append(prefix + str(key))
            else:
                dropped += _drop_redacted(node[key], f"{prefix}{key}.")
    return dropped


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (redacted) config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = prefix + str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, name + ".")
        elif a != b:
            diffs.append(name)
    return diffs


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume with a config that would make the continuation a different run."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    current = redact(cfg.to_dict())
    if (run_dir / "actions.yaml").is_file():  # the saved path is the original file; compare the sets themselves
        saved.get("prompt", {}).pop("action_spaces", None)
        current.get("prompt", {}).pop("action_spaces", None)
        from rpp.prompts import load_action_set

        if load_action_set(cfg.prompt.action_spaces).actions != load_action_set(run_dir / "actions.yaml").actions:
            raise ConfigError(f"cannot resume {run_dir}: prompt.action_spaces differs from the action set the run "
                              "was trained on (actions.yaml)")
    diffs = [d for d in config_differences(saved, current)
             if not any(d == k or d.startswith(k + ".") for k in RESUME_MAY_CHANGE)]
    if diffs:
        raise ConfigError(f"cannot resume {run_dir} with a different config; changed: {', '.join(diffs)}. "
                          f"Only {', '.join(RESUME_MAY_CHANGE)} may change (e.g. raise train.total_steps to "
                          "train longer); start a new run (another name) for anything else")


# ------------------------------------------------------------------------------------------------ RNG states

def rng_states() -> dict:
    return {"torch": th.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}


def set_rng_states(states: dict) -> None:
    th.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_name(rollouts: int) -> str:
    return f"rollout-{rollouts:06d}"


def save_checkpoint(run_dir: Path, model, state: dict, rollouts: int) -> Path:
    """Write model.zip + state.pkl atomically as checkpoints/rollout-NNNNNN and point `latest` at it."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(rollouts)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save(tmp / "model.zip")
    with open(tmp / "state.pkl", "wb") as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    final = root / name
    if final.exists():  # left by a session killed after this point; identical content by construction
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep=name)
    return final


def _prune(root: Path, keep: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("rollout-"))
    for old in done[:-KEEP_CHECKPOINTS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # half-written folders of killed sessions
        if stale.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "model.zip").is_file() or not (path / "state.pkl").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_state(checkpoint: Path) -> dict:
    with open(checkpoint / "state.pkl", "rb") as fh:  # our own file, written by save_checkpoint
        return pickle.load(fh)


# ------------------------------------------------------------------------------------------------ small files

def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def jsonable(obj: Any) -> Any:
    """json.dumps default: numpy scalars/arrays, dataclasses with to_dict, paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything before it is intact
    return rows
