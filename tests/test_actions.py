"""Action sets: the curated default, custom files, and strict rejection of malformed files."""
from __future__ import annotations

import textwrap

import pytest

from rpp.prompts import PATTERNS, ActionSetError, format_action_set, load_action_set

GOOD = """
role:
  - {id: none, text: ""}
  - {id: expert, text: "You are an expert on {item_noun_plural}."}
history:
  - {id: h10, text: "The last {n_history} {item_noun_plural}:", params: {window: 10}}
reasoning:
  - {id: none, text: ""}
format:
  - {id: none, text: ""}
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_default_set_meets_the_minimum_sizes_and_loads_cleanly():
    actions = load_action_set(None)
    sizes = dict(zip(PATTERNS, actions.sizes()))
    assert sizes["role"] >= 5 and sizes["history"] >= 4 and sizes["reasoning"] >= 6 and sizes["format"] >= 4
    assert actions.action("role", actions.index("role", "none")).text == ""
    windows = {a.params["window"] for a in actions.actions["history"]}
    assert len(windows) >= 3, "history actions must differ in how much history they show"
    assert any(a.params["ratings"] for a in actions.actions["history"])
    assert any(a.params["note_last"] for a in actions.actions["history"])
    # domain-neutral: no sentence names the movie domain outright
    for p in PATTERNS:
        for a in actions.actions[p]:
            assert "movie" not in a.text.lower() and "watch" not in a.text.lower(), (p, a.id)


def test_format_action_set_lists_every_action(tmp_path):
    actions = load_action_set(write(tmp_path, "good.yaml", GOOD))
    shown = format_action_set(actions)
    assert "good.yaml" in shown
    assert "1. expert: You are an expert on {item_noun_plural}." in shown
    assert "h10 {window: 10, ratings: false, note_last: false}" in shown
    assert "0. none: (no sentence)" in shown


def test_custom_set_sizes_follow_the_file(tmp_path):
    roles = "\n".join(f"  - {{id: r{i}, text: 'Role {i} for {{item_noun}}.'}}" for i in range(7))
    fmts = "\n".join(f"  - {{id: f{i}, text: 'Format {i}.'}}" for i in range(3))
    text = f"role:\n{roles}\nhistory:\n  - {{id: h, text: '', params: {{window: 3}}}}\n" \
           f"reasoning:\n  - {{id: n, text: ''}}\nformat:\n{fmts}\n"
    actions = load_action_set(write(tmp_path, "custom.yaml", text))
    assert actions.sizes() == [7, 1, 1, 3]
    assert actions.index("format", "f2") == 2


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


# (file name, content, pattern the message must name, entry the message must name)
ENTRY_CASES = [
    ("duplicate_id", _replace('{id: expert,', '{id: none,'), "role", "entry 2"),
    ("unknown_placeholder", _replace("{item_noun_plural}.", "{genre}."), "role", "entry 2"),
    ("positional_placeholder", _replace("{item_noun_plural}.", "{}."), "role", "entry 2"),
    ("format_spec_on_placeholder", _replace("{item_noun_plural}.", "{item_noun_plural:>9}."), "role", "entry 2"),
    ("unbalanced_brace", _replace("{item_noun_plural}.", "{item_noun."), "role", "entry 2"),
    ("unknown_params_key", _replace("{window: 10}", "{window: 10, size: 3}"), "history", "entry 1"),
    ("window_wrong_type", _replace("{window: 10}", "{window: ten}"), "history", "entry 1"),
    ("window_bool", _replace("{window: 10}", "{window: true}"), "history", "entry 1"),
    ("window_float", _replace("{window: 10}", "{window: 2.5}"), "history", "entry 1"),
    ("window_zero", _replace("{window: 10}", "{window: 0}"), "history", "entry 1"),
    ("window_negative", _replace("{window: 10}", "{window: -5}"), "history", "entry 1"),
    ("window_missing", _replace("{window: 10}", "{ratings: true}"), "history", "entry 1"),
    ("ratings_not_bool", _replace("{window: 10}", "{window: 10, ratings: 'yes'}"), "history", "entry 1"),
    ("params_not_mapping", _replace("{window: 10}", "[10]"), "history", "entry 1"),
    ("params_on_role", _replace('text: ""}\n  - {id: expert', 'text: "", params: {window: 3}}\n  - {id: expert'),
     "role", "entry 1"),
    ("non_string_text", _replace('{id: none, text: ""}\nformat', '{id: none, text: 42}\nformat'),
     "reasoning", "entry 1"),
    ("text_is_a_list", _replace('{id: none, text: ""}\nformat', '{id: none, text: [a, b]}\nformat'),
     "reasoning", "entry 1"),
    ("missing_id", _replace('  - {id: none, text: ""}\n  - {id: expert', '  - {text: ""}\n  - {id: expert'),
     "role", "entry 1"),
    ("empty_id", _replace('{id: expert,', '{id: "",'), "role", "entry 2"),
    ("id_not_string", _replace('{id: expert,', '{id: 7,'), "role", "entry 2"),
    ("id_with_spaces", _replace('{id: expert,', '{id: "an expert",'), "role", "entry 2"),
    ("missing_text", _replace('{id: none, text: ""}\nformat', '{id: none}\nformat'), "reasoning", "entry 1"),
    ("unknown_entry_key", _replace('{id: none, text: ""}\nformat', '{id: none, txt: ""}\nformat'),
     "reasoning", "entry 1"),
    ("entry_not_mapping", _replace('  - {id: none, text: ""}\nformat', '  - just a sentence\nformat'),
     "reasoning", "entry 1"),
]


PATTERN_CASES = [
    ("missing_pattern", GOOD.split("format:")[0], "format", "missing"),
    ("empty_list", GOOD.replace('format:\n  - {id: none, text: ""}', "format: []"), "format", "empty list"),
    ("pattern_not_list", GOOD.replace('format:\n  - {id: none, text: ""}', "format: {id: none}"), "format",
     "must be a list"),
    ("pattern_null", GOOD.replace('format:\n  - {id: none, text: ""}', "format:"), "format", "must be a list"),
    ("unknown_pattern", GOOD + "tone:\n  - {id: calm, text: Calm.}\n", "tone", "unknown pattern"),
]


@pytest.mark.parametrize("name,content,pattern,problem", ENTRY_CASES + PATTERN_CASES,
                         ids=[c[0] for c in ENTRY_CASES + PATTERN_CASES])
def test_malformed_action_sets_are_rejected_naming_file_pattern_and_problem(tmp_path, name, content, pattern,
                                                                              problem):
    """Entry-level problems name the entry ("entry 1"); pattern-level ones say what is wrong with the pattern."""
    path = write(tmp_path, f"{name}.yaml", content)
    with pytest.raises(ActionSetError) as err:
        load_action_set(path)
    msg = str(err.value)
    assert str(path) in msg and f"pattern '{pattern}'" in msg and problem in msg, msg


FILE_CASES = [
    ("not_yaml", "role: [unclosed\n  - {id: x", "not valid YAML"),
    ("top_level_list", "- role\n- history\n", "top level must be a mapping"),
    ("top_level_scalar", "just words\n", "top level must be a mapping"),
    ("empty_file", "", "empty file"),
]


@pytest.mark.parametrize("name,content,problem", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unusable_files_are_rejected_naming_the_file(tmp_path, name, content, problem):
    path = write(tmp_path, f"{name}.yaml", content)
    with pytest.raises(ActionSetError) as err:
        load_action_set(path)
    assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


def test_missing_file_and_binary_file_are_rejected(tmp_path):
    with pytest.raises(ActionSetError, match="not found"):
        load_action_set(tmp_path / "nope.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ActionSetError, match="binary.yaml"):
        load_action_set(binary)


def test_action_set_error_is_a_value_error_and_lookups_fail_clearly(tmp_path):
    assert issubclass(ActionSetError, ValueError)
    actions = load_action_set(write(tmp_path, "good.yaml", GOOD))
    with pytest.raises(ActionSetError, match="no action 'critic'.*known: none, expert"):
        actions.index("role", "critic")
    with pytest.raises(IndexError, match="pattern 'role' has 2 actions"):
        actions.action("role", 2)


def test_validate_reports_every_problem_of_a_file_at_once(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "role:\n"
        "  - {id: cinéphile, text: You love films.}\n"          # non-ASCII id
        "  - {id: ok, text: 'Use {nope}.'}\n"                    # unknown placeholder
        "history:\n"
        "  - {id: h, text: Recent., params: {window: 0}}\n"      # window must be > 0
        "reasoning:\n"
        "  - {id: r, text: Think., colour: red}\n"               # unknown key
    )                                                            # format: missing
    from rpp.prompts import ActionSetError, load_action_set

    with pytest.raises(ActionSetError) as err:
        load_action_set(bad)
    problems = err.value.problems
    assert len(problems) == 5, problems
    assert "ASCII" in problems[0] and "cinéphile" in problems[0]
    text = str(err.value)
    for needle in ("{nope}", "window must be > 0", "'colour'", "pattern 'format' is missing"):
        assert needle in text
    done = subprocess.run([sys.executable, "-m", "rpp.cli", "actions", "validate", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "5 problem(s)" in done.stderr + done.stdout and "ASCII" in done.stderr + done.stdout
