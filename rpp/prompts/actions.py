"""Action sets: the four patterns' candidate sentences, loaded from YAML and validated strictly.

A file maps each pattern of PATTERNS to an ordered list of actions ``{id, text, params}``. The order matters: an
agent's action is an index into its pattern's list, and the first action is the task-wise default. Users plug their
own file with ``prompt.action_spaces: path``; because a typo in a sentence set would silently change what the agents
can say, every problem is rejected with an ``ActionSetError`` naming the file, the pattern and the entry.

Structured choices live in ``params`` (only the history pattern has any: window, ratings, note_last), so the prompt
builder never has to parse sentences. Texts may use the placeholders in PLACEHOLDERS, filled per user at build time.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rpp.config import read_yaml_file

PATTERNS = ("role", "history", "reasoning", "format")
"""The four prompt patterns, in the order of the MultiDiscrete action vector."""

PLACEHOLDERS = {
    "item_noun": "what an item is called (data.item_noun), e.g. 'movie'",
    "item_noun_plural": "its plural, e.g. 'movies'",
    "n_history": "how many history items the prompt actually shows",
    "last_item": "the title of the user's most recent history item",
}
"""Placeholders an action text may use; anything else in braces is rejected (write {{ and }} for literal braces)."""

HISTORY_PARAMS: dict[str, tuple[type, Any]] = {
    "window": (int, None),  # required: how many of the most recent history items are shown
    "ratings": (bool, False),  # show the user's rating next to each title
    "note_last": (bool, False),  # add a line naming the most recent item
}
"""Params of a history action: name -> (type, default); a default of None means required."""

PATTERN_PURPOSES: dict[str, str] = {
    "role": "it tells the assistant which role to take when recommending {item_noun_plural} to this user",
    "history": "it introduces the list of {item_noun_plural} this user chose before, which follows it",
    "reasoning": "it tells the assistant how to reason about this user's taste before ranking the {item_noun_plural}",
    "format": "it tells the assistant how to write down the ranked list of candidate {item_noun_plural}",
}
"""What each pattern's sentence is for (templates over {item_noun_plural}): shown by `rpp actions show` and to the
RPP+ refiner, so a rewrite keeps the sentence's job."""


def pattern_purpose(pattern: str, item_noun: str = "item") -> str:
    """PATTERN_PURPOSES[pattern] for items called ``item_noun``."""
    from rpp.prompts.builder import pluralize

    if pattern not in PATTERN_PURPOSES:
        raise ValueError(f"unknown pattern '{pattern}' (patterns: {', '.join(PATTERNS)})")
    return PATTERN_PURPOSES[pattern].format(item_noun_plural=pluralize(item_noun))


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ENTRY_KEYS = {"id", "text", "params"}
_TOP_LEVEL_META = {"description"}


class ActionSetError(ValueError):
    """An unusable action-set file; the message names the file, and where it applies the pattern and the entry.
    ``problems`` lists every problem found in the file (the message holds them all, one per line)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


@dataclass(frozen=True)
class Action:
    """One candidate sentence of a pattern. ``params`` holds structured choices (see HISTORY_PARAMS)."""

    id: str
    text: str
    params: dict = field(default_factory=dict, hash=False)

    @property
    def window(self) -> int:
        """History actions only: how many of the most recent items to show."""
        return int(self.params["window"])


@dataclass
class ActionSet:
    """The four patterns' ordered action lists, and where they came from (for messages)."""

    actions: dict[str, list[Action]]
    source: str = "(in memory)"
    description: str = ""

    def sizes(self) -> list[int]:
        """Number of actions per pattern, in PATTERNS order: the MultiDiscrete nvec."""
        return [len(self.actions[p]) for p in PATTERNS]

    def action(self, pattern: str, index: int) -> Action:
        acts = self._list(pattern)
        if not 0 <= int(index) < len(acts):
            raise IndexError(f"{self.source}: pattern '{pattern}' has {len(acts)} actions; index {index} is out of range")
        return acts[int(index)]

    def index(self, pattern: str, action_id: str) -> int:
        for i, a in enumerate(self._list(pattern)):
            if a.id == action_id:
                return i
        known = ", ".join(a.id for a in self._list(pattern))
        raise ActionSetError(f"{self.source}: pattern '{pattern}' has no action '{action_id}' (known: {known})")

    def _list(self, pattern: str) -> list[Action]:
        if pattern not in self.actions:
            raise ActionSetError(f"{self.source}: unknown pattern '{pattern}' (patterns: {', '.join(PATTERNS)})")
        return self.actions[pattern]


def default_action_set_path() -> Path:
    """The curated set shipped with rpp (package data, so it works from an installed wheel too)."""
    return Path(str(resources.files("rpp.action_spaces").joinpath("default.yaml")))


def load_action_set(path: str | Path | None = None) -> ActionSet:
    """Load and validate an action-set file; None loads the curated default."""
    p = Path(path) if path is not None else default_action_set_path()
    return parse_action_set(read_yaml_file(p, ActionSetError, "action-set"), str(p))


def parse_action_set(data: Any, source: str = "(in memory)") -> ActionSet:
    """Validate an already-parsed mapping (e.g. from a config) into an ActionSet; see the module docstring.
    Every problem of the file is reported at once (one ActionSetError listing them all)."""
    if data is None:
        raise ActionSetError(f"{source}: empty file; expected a mapping with the patterns {', '.join(PATTERNS)}")
    if not isinstance(data, dict):
        raise ActionSetError(f"{source}: the top level must be a mapping of patterns ({', '.join(PATTERNS)}), "
                             f"got {type(data).__name__}")
    problems: list[str] = []
    for k in data:
        if k not in PATTERNS and k not in _TOP_LEVEL_META:
            problems.append(f"{source}: pattern '{k}': unknown pattern (patterns: {', '.join(PATTERNS)}; "
                            f"other allowed keys: {', '.join(sorted(_TOP_LEVEL_META))})")
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{source}: 'description' must be a string, got {type(description).__name__}")
    actions = {}
    for pattern in PATTERNS:
        if pattern not in data:
            problems.append(f"{source}: pattern '{pattern}' is missing (every file needs {', '.join(PATTERNS)})")
            continue
        entries = data[pattern]
        if not isinstance(entries, list):
            problems.append(f"{source}: pattern '{pattern}' must be a list of actions, got {type(entries).__name__}")
        elif not entries:
            problems.append(f"{source}: pattern '{pattern}' has an empty list; it needs at least one action")
        else:
            actions[pattern] = _parse_entries(entries, pattern, source, problems)
    if problems:
        head = f"{source}: {len(problems)} problem(s)\n" if len(problems) > 1 else ""
        raise ActionSetError(head + "\n".join(problems), problems)
    return ActionSet(actions=actions, source=source, description=description)


def _check_id(action_id: Any, where: str) -> None:
    if not isinstance(action_id, str) or not action_id:
        raise ActionSetError(f"{where}: id {action_id!r} must be a non-empty string")
    if not action_id.isascii():
        raise ActionSetError(f"{where}: id {action_id!r} must be ASCII (letters a-z and A-Z, digits, '_', '-', '.'); "
                             "non-ASCII letters are not allowed in ids, only in text")
    if not _ID_RE.match(action_id):
        raise ActionSetError(f"{where}: id {action_id!r} must be a string of ASCII letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit")


def _parse_entries(entries: list, pattern: str, source: str, problems: list[str]) -> list[Action]:
    """The pattern's actions; every problem found is appended to ``problems`` (an entry's checks run
    independently, so one entry can report several)."""
    out: list[Action] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: pattern '{pattern}', entry {i + 1}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with keys id, text (and params), "
                            f"got {type(entry).__name__} {entry!r}")
            continue
        n_before = len(problems)

        def check(fn, *args):
            try:
                return fn(*args)
            except ActionSetError as exc:
                problems.extend(exc.problems)
                return None

        action_id = entry.get("id")
        if "id" not in entry:
            problems.append(f"{where}: missing 'id'")
        elif check(_check_id, action_id, where) is None and len(problems) == n_before:
            where = f"{where} (id '{action_id}')"
            if action_id in seen:
                problems.append(f"{where}: duplicate id '{action_id}' (also entry {seen[action_id] + 1})")
            else:
                seen[action_id] = i
        extra = sorted(set(entry) - _ENTRY_KEYS)
        if extra:
            problems.append(f"{where}: unknown key(s) {', '.join(map(repr, extra))} (allowed: id, text, params)")
        text = entry.get("text")
        if "text" not in entry:
            problems.append(f"{where}: missing 'text' (use text: \"\" for a 'none' action)")
            text = ""
        if text is None:
            text = ""
        if not isinstance(text, str):
            problems.append(f"{where}: text must be a string, got {type(text).__name__} {text!r}")
            text = ""
        check(_check_placeholders, text, where)
        params = check(_check_params, entry.get("params"), pattern, where)
        if len(problems) == n_before:
            out.append(Action(id=action_id, text=text.strip(), params=params))
    return out


def _check_placeholders(text: str, where: str) -> None:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ActionSetError(f"{where}: malformed braces in text ({exc}); write {{{{ and }}}} for literal braces") \
            from None
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS:
            shown = "{" + name + "}"
            raise ActionSetError(f"{where}: unknown placeholder {shown} in text; allowed: "
                                 + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
        if spec or conv:
            raise ActionSetError(f"{where}: placeholder {{{name}}} takes no conversion or format spec "
                                 f"(found {'!' + conv if conv else ''}{':' + spec if spec else ''})")


def _check_params(params: Any, pattern: str, where: str) -> dict:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ActionSetError(f"{where}: params must be a mapping, got {type(params).__name__}")
    if pattern != "history":
        if params:
            raise ActionSetError(f"{where}: unknown params key(s) {', '.join(map(repr, params))}: "
                                 f"only history actions take params")
        return {}
    unknown = [k for k in params if k not in HISTORY_PARAMS]
    if unknown:
        raise ActionSetError(f"{where}: unknown params key {unknown[0]!r} (history params: "
                             f"{', '.join(HISTORY_PARAMS)})")
    out = {}
    for name, (kind, default) in HISTORY_PARAMS.items():
        if name not in params:
            if default is None:
                raise ActionSetError(f"{where}: params.{name} is required for history actions")
            out[name] = default
            continue
        value = params[name]
        # bool is a subclass of int in Python: `window: true` must not pass as 1
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ActionSetError(f"{where}: params.{name} must be {kind.__name__}, got {type(value).__name__} "
                                 f"{value!r}")
        out[name] = value
    if out["window"] <= 0:
        raise ActionSetError(f"{where}: params.window must be > 0, got {out['window']}")
    return out


def format_action_set(action_set: ActionSet) -> str:
    """A readable listing for `rpp actions show`: per pattern, index, id, params and text."""
    lines = [f"action set: {action_set.source}"]
    if action_set.description:
        lines.append(action_set.description)
    lines.append("sizes (role, history, reasoning, format): " + " x ".join(map(str, action_set.sizes())))
    for pattern in PATTERNS:
        lines.append("")
        lines.append(f"{pattern}: {len(action_set.actions[pattern])} actions; {pattern_purpose(pattern)}")
        for i, a in enumerate(action_set.actions[pattern]):
            params = ""
            if a.params:
                params = " {" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                                          for k, v in a.params.items()) + "}"
            text = a.text if a.text else "(no sentence)"
            lines.append(f"  {i}. {a.id}{params}: {text}")
    return "\n".join(lines)

