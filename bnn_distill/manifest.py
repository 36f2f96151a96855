"""The export folder's contract: its manifest's name and format, the graphs' input and output
names, and reading ``manifest.json``. Torch-free: :mod:`bnn_distill.predict` runs without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Type

from .errors import UserError

EXPORT_FORMAT = "bnn-distill-export/1"
MANIFEST = "manifest.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def read_manifest(export_dir, error: Type[UserError] = UserError) -> Any:
    """The parsed ``manifest.json`` of an export folder (any JSON value: the caller checks its shape);
    ``error`` (a :class:`UserError`) says in one line that the folder, the file or its JSON is missing."""
    d = Path(export_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise error(f"'{d}' is not a folder; give an export folder (bnn-distill export writes export/<run>/)")
    if not path.is_file():
        raise error(f"'{d}' holds no {MANIFEST}: not a finished export; run 'bnn-distill export RUN --out {d}'")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        raise error(f"'{path}' is not valid JSON; re-run the export") from None
