"""The run folder's layout, in one place.

A run folder (``output_dir/name``, e.g. ``runs/quick_fmnist``) holds::

    recipe.yaml                      the resolved recipe, every value explicit
    metrics.jsonl                    one JSON line per epoch of every stage
    summary.json                     written when the last stage ends
    curves.png                       loss and accuracy curves (with matplotlib)
    tensorboard/                     event files (with tensorboard)
    checkpoints/<stage>/last.pt      everything needed to resume or export the stage
    checkpoints/<stage>/best.pt      the best epoch on the validation split (only with one)

Only this module spells those names; train, eval, export, bench, the CLI and the benchmark
scripts ask a :class:`RunDir` for paths and for the models it holds. Importing it is cheap:
torch is imported only by the methods that build models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from .errors import CheckpointError, UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from .recipe import Recipe, StageConfig

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


class RunDir:
    """A run folder: the paths inside it and the recipe, metrics and models it holds."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, recipe: "Recipe") -> "RunDir":
        """The folder a recipe trains into: ``output_dir/name``."""
        return cls(Path(recipe.output_dir) / recipe.name)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def finished_in(cls, folder: Union[str, os.PathLike]) -> List["RunDir"]:
        """The run folders directly inside ``folder`` whose last stage has ended (a summary), by path."""
        return [cls(p.parent) for p in sorted(Path(folder).glob(f"*/{SUMMARY_FILE}"))]

    # ------------------------------------------------------------ paths

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def curves_file(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint_dir(self, stage: str) -> Path:
        return self.checkpoints_dir / stage

    def last(self, stage: str) -> Path:
        """``checkpoints/<stage>/last.pt``: written after every epoch."""
        return self.checkpoint_dir(stage) / LAST

    def best(self, stage: str) -> Path:
        """``checkpoints/<stage>/best.pt``: the best epoch on the validation split."""
        return self.checkpoint_dir(stage) / BEST

    def stages_with_checkpoints(self) -> List[str]:
        """Names of the stages that have a ``last.pt``, sorted."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.checkpoints_dir.glob(f"*/{LAST}"))

    # ------------------------------------------------------------ contents

    def is_run(self) -> bool:
        """Whether the folder holds a run (its ``recipe.yaml``)."""
        return self.recipe_file.is_file()

    def require(self, hint: str = "give runs/NAME") -> "RunDir":
        """``self``, or a one-line :class:`UserError` when the folder holds no run."""
        if not self.is_run():
            raise UserError(f"'{self.path}' is not a run folder (no {RECIPE_FILE}); {hint}")
        return self

    def recipe(self) -> "Recipe":
        """The recipe the run was started with (``recipe.yaml``)."""
        from .recipe import load_recipe

        self.require()
        return load_recipe(self.recipe_file)

    def stage(self, recipe: "Recipe", name: Optional[str] = None) -> "StageConfig":
        """The stage called ``name`` (default: the last), or a one-line error listing the names."""
        names = [s.name for s in recipe.stages]
        if name is None:
            return recipe.stages[-1]
        if name not in names:
            raise UserError(f"--stage: no stage named '{name}' in {self.path}; valid: {', '.join(names)}")
        return recipe.stage(name)

    def checkpoint(self, stage: str, what: str = "stage") -> Path:
        """``last.pt`` of ``stage``, or a one-line :class:`CheckpointError` when it is missing."""
        path = self.last(stage)
        if not path.is_file():
            raise CheckpointError(f"{what} '{stage}' of {self.path} has no checkpoint yet ({path}); train it first")
        return path

    def read_metrics(self) -> List[Dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (empty when there is none yet)."""
        if not self.metrics_file.exists():
            return []
        text = self.metrics_file.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_metrics(self, records: List[Dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` atomically."""
        from .checkpoint import atomic_write_bytes

        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_bytes(self.metrics_file, text.encode())

    def read_summary(self) -> Optional[Dict[str, Any]]:
        """``summary.json``, or ``None`` before the last stage has ended."""
        if not self.summary_file.is_file():
            return None
        return json.loads(self.summary_file.read_text())

    def load_model(self, stage: str, what: str = "stage") -> Tuple["nn.Module", Dict[str, Any]]:
        """The model saved in ``stage``'s ``last.pt`` and the checkpoint itself."""
        return model_from_checkpoint(self.checkpoint(stage, what))


def model_from_checkpoint(
    path: Union[str, os.PathLike], ck: Optional[Dict[str, Any]] = None
) -> Tuple["nn.Module", Dict[str, Any]]:
    """Build the model a bnn-distill checkpoint describes and load its weights (strictly).

    ``ck`` is the already-loaded checkpoint, if the caller has it. Returns ``(model, ck)``.
    """
    from .checkpoint import is_bnn_checkpoint, load_checkpoint, load_model_state
    from .models import create_model

    path = Path(path)
    if ck is None:
        ck = load_checkpoint(path)
    if not is_bnn_checkpoint(ck):
        raise CheckpointError(
            f"'{path}' is not a bnn-distill checkpoint (no model spec); "
            "plain state dicts load as teacher.checkpoint in a recipe"
        )
    model = create_model(**ck["model_spec"])
    load_model_state(model, ck["model"], f"checkpoint '{path}'")
    return model, ck
