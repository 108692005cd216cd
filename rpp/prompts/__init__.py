"""Prompts: action sets (load, validate, show), the prompt builder and the per-user context it reads.

The RPP+ refiner lives in rpp.prompts.refiner and is imported from there (it pulls in the LLM layer).
"""
from rpp.prompts.actions import (
    HISTORY_PARAMS, PATTERNS, PLACEHOLDERS, Action, ActionSet, ActionSetError, default_action_set_path,
    format_action_set, load_action_set, parse_action_set,
)
from rpp.prompts.builder import Prompt, PromptBuilder, UserContext, fill_placeholders, pluralize

__all__ = ["HISTORY_PARAMS", "PATTERNS", "PLACEHOLDERS", "Action", "ActionSet", "ActionSetError", "Prompt",
           "PromptBuilder", "UserContext", "default_action_set_path", "fill_placeholders", "format_action_set",
           "load_action_set", "parse_action_set", "pluralize"]
