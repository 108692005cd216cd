"""The `rpp` command end to end, as a user runs it (subprocesses)."""
import subprocess
import sys


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


def test_assets_status():
    out = rpp("assets", "status")
    assert out.returncode == 0 and "verified" in out.stdout
