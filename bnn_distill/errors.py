"""Errors a user can cause.

Everything a user can get wrong (a recipe, a path, a checkpoint) raises :class:`UserError`
with one line naming the bad value and what would be valid. The CLI prints that line and
exits with status 2; internal invariants use ``assert`` and show a traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe that cannot be loaded: bad YAML, unknown key, wrong type, impossible value."""


class DataError(UserError):
    """A dataset that is missing or unreadable."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupted, unsafe or of another model."""


def closest(name: str, valid: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the nearest valid name, or ``""`` if none is close."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def choices(valid: Iterable[str]) -> str:
    """Format valid names for a message: ``'a', 'b' or 'c'``."""
    items = [f"'{v}'" for v in sorted(valid)]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]
