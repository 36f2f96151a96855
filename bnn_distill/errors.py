"""Errors a user can cause.

Everything a user can get wrong (a recipe, a path, a checkpoint) raises :class:`UserError`
with one line naming the bad value and what would be valid. The CLI prints that line and
exits with status 2; internal invariants use ``assert`` and show a traceback.
"""

from __future__ import annotations

import difflib
import errno as _errno
from pathlib import Path
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


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped training after saving its progress; ``--resume`` continues.

    Defined here (and re-exported by :mod:`bnn_distill.train`) so the CLI can tell it apart
    without importing torch."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class FolderInUse(UserError):
    """A run or export folder that another process is writing (one writer per folder)."""


class WriteError(UserError):
    """A file that could not be written: full disk, quota, read-only or forbidden folder."""


# errors of the disk or its permissions, not of the program: one line with the path, no traceback

WRITE_ERRNOS = frozenset(
    e
    for e in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None), _errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.EFBIG)
    if e is not None
)


def write_error(e: OSError, path=None, kept: bool = False) -> WriteError:
    """One-line :class:`WriteError` for ``e``, naming the path and the errno (``ENOSPC``, ``EACCES``...)."""
    where = path if path is not None else (e.filename if e.filename is not None else "a file")
    name = _errno.errorcode.get(e.errno, str(e.errno))
    reason = e.strerror or str(e)
    tail = f"; the previous {Path(str(where)).name} is kept" if kept else ""
    hint = {"ENOSPC": "free some space", "EDQUOT": "free some space", "EFBIG": "free some space"}.get(
        name, "make the folder writable or choose another"
    )
    return WriteError(one_line(f"cannot write {where}: {reason} ({name}, errno {e.errno}){tail}; {hint} and run again"))


def one_line(text: str) -> str:
    """``text`` with line breaks (every character ``str.splitlines`` breaks on) shown escaped."""
    if len(text.splitlines()) <= 1 and not text.endswith(("\n", "\r")):
        return text
    out = []
    for ch in text:
        breaks = ("a" + ch + "b").splitlines() != ["a" + ch + "b"]
        out.append(ch.encode("unicode_escape").decode("ascii") if breaks else ch)
    return "".join(out)
