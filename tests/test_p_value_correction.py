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


def test_paired_per_user_keeps_an_upper_bound_out_of_the_holm_family(tmp_path):
    """experiments/paired_per_user.py: the label oracle (family upper_bound) is listed with its raw p, not counted in
    the methods' Holm family, so its tiny p-values neither count as findings nor make the methods' correction
    stricter."""
    import pandas as pd

    rng = np.random.default_rng(0)
    users = np.arange(60)
    base = rng.random(60) * 0.5
    shifts = {"taskwise": 0.0, "policy": 0.02, "label_oracle": 0.3}
    rows = [{"method": m, "user": u, **{metric: base[u] + shift + (0.05 * rng.standard_normal() if m != "taskwise"
                                                                     else 0.0)
                                        for metric in ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr")}}
            for m, shift in shifts.items() for u in users]
    pd.DataFrame(rows).to_csv(tmp_path / "per_user.csv", index=False)
    pd.DataFrame({"method": list(shifts), "family": ["taskwise", "policy", "upper_bound"]}).to_csv(
        tmp_path / "results.csv", index=False)
    subprocess.run([sys.executable, str(ROOT / "experiments/paired_per_user.py"), str(tmp_path)], check=True,
                   capture_output=True)
    text = (tmp_path / "paired.md").read_text()
    assert text.count("upper bound, not tested") == 7 and "7 paired tests" in text, text
    policy = [line.split("|") for line in text.splitlines() if line.startswith("| policy |")]
    raw = np.array([float(r[5]) for r in policy])
    # Holm over the policy's 7 tests alone: the smallest raw p is multiplied by 7 (by 14 with the oracle inside)
    assert float(min(policy, key=lambda r: float(r[5]))[6]) == pytest.approx(min(1.0, 7 * raw.min()), rel=0.01)
