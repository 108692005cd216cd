"""Family-wise p-value corrections (rpp.metrics.adjust_p_values) and the script that applies them to a run record."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rpp.metrics import adjust_p_values

ROOT = Path(__file__).resolve().parents[1]


def test_holm_and_bonferroni_on_a_worked_example():
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert adjust_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust_p_values([0.5, 0.9], "bonferroni").tolist() == [1.0, 1.0]


def test_holm_is_never_stricter_than_bonferroni_and_never_below_the_raw_p():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.random(rng.integers(1, 20)) ** 3
        holm, bonf = adjust_p_values(p, "holm"), adjust_p_values(p, "bonferroni")
        assert np.all(p <= holm + 1e-12) and np.all(holm <= bonf + 1e-12)
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(holm[order]) >= -1e-12)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        adjust_p_values([0.1, 1.5])
    with pytest.raises(ValueError, match="unknown correction"):
        adjust_p_values([0.1], "fdr")


def test_script_corrects_every_table_row_of_a_record(tmp_path):
    record = tmp_path / "run.md"
    rows = "\n".join(f"| {m} | a | b | +0.01 | +1% | {p} |" for m, p in
                     [("ndcg@1", 0.004), ("ndcg@5", 0.02), ("ndcg@10", 0.3)])
    record.write_text(f"### test split, one-shot\n\n| metric | x | y | diff | rel | p |\n|---|---|---|---|---|---|\n"
                      f"{rows}\n\n### test split, 2 steps\n\n{rows}\n")
    out = tmp_path / "corrected.md"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "correct_p_values.py"), str(record), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "6 paired tests" in text and "Holm 2, Bonferroni 2" in text  # 0.004 x 6 = 0.024 < 0.05
    assert text.count("| ndcg@5 | +0.01 | 0.02 | 0.08 | 0.12 |") == 2  # 4th/3rd smallest: x4 (Holm), x6
