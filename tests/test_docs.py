"""The documentation stays documentation: README size and anchors, the generated configuration reference, the
records index."""
import re
from pathlib import Path

from rpp import config_docs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_stays_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text) <= 12_000, f"README.md is {len(text)} characters; keep it <= 12,000 (move detail to docs/)"
    first_screen = text[:1500]
    assert "make demo" in first_screen and "make test" in first_screen
    assert "<!-- learner results: filled by the lead -->" in text or "## How it learns" in text


def test_readme_links_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", text)
    assert targets
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()
               and t not in {"docs/serving.md", "docs/reliability.md", "docs/headroom.md"}]  # written by other issues
    assert not missing, f"README links to files that do not exist: {missing}"


def test_every_option_has_a_docstring():
    assert config_docs.missing_docstrings() == []


def test_configuration_reference_is_generated_and_current(tmp_path):
    assert config_docs.main(["--check"]) == 0, "docs/configuration.md is stale: run `python -m rpp.config_docs`"
    out = tmp_path / "configuration.md"
    assert config_docs.main(["--output", str(out)]) == 0
    text = out.read_text()
    for key, _, _, _ in config_docs.options():
        assert f"`{key}`" in text, key


def test_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration\n")
    assert config_docs.main(["--check", "--output", str(stale)]) == 1


def test_results_index_lists_every_record():
    results = ROOT / "experiments" / "results"
    index = (results / "README.md").read_text()
    records = [p for p in results.iterdir() if p.name not in {"README.md", "logs"}]
    assert len([p for p in results.rglob("*") if p.is_file() and "logs" not in p.parts
                and not any(q.is_dir() and q.name.startswith("benchmark-") for q in p.parents if q != results)
                ]) <= 30
    unlisted = [p.name for p in records if p.name not in index]
    assert not unlisted, f"records missing from experiments/results/README.md: {unlisted}"
