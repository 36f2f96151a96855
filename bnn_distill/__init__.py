"""bnn-distill: binary ResNet students distilled with ITRD, exported to ONNX, benchmarked.

Public API (everything else is internal):

* :func:`load_recipe`, :class:`Recipe` - validated YAML recipes
* :func:`run_recipe` - the whole training pipeline
* :func:`create_model` - the ResNet family (FP teacher or binary student)
* :func:`itrd_correlation`, :func:`itrd_mutual_information`, :class:`Criterion` - the losses
* :func:`summarize` - per-layer bit-widths, MACs and memory
* :class:`UserError` - what every user-caused error raises

The names are imported on first use (PEP 562), so that ``import bnn_distill`` - and with it the
command line's ``--help`` - does not import torch and Brevitas.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib as _importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

# Brevitas imports torch.utils.cpp_extension, which warns on every CPU-only machine that it found
# no CUDA runtime; that line is noise for users of this package.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

from .errors import UserError  # noqa: E402 - light: no torch

#: public name -> the submodule that defines it
_LAZY = {
    "Criterion": "losses",
    "itrd_correlation": "losses",
    "itrd_mutual_information": "losses",
    "kd_loss": "losses",
    "create_model": "models",
    "Recipe": "recipe",
    "load_recipe": "recipe",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .losses import Criterion, itrd_correlation, itrd_mutual_information, kd_loss
    from .models import create_model
    from .recipe import Recipe, load_recipe


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def run_recipe(*args, **kwargs):
    """See :func:`bnn_distill.train.run_recipe` (imported lazily: it pulls in the data stack)."""
    from .train import run_recipe as _run

    return _run(*args, **kwargs)


def summarize(*args, **kwargs):
    """See :func:`bnn_distill.summary.summarize`."""
    from .summary import summarize as _summarize

    return _summarize(*args, **kwargs)


__all__ = [
    "UserError",
    "Criterion",
    "itrd_correlation",
    "itrd_mutual_information",
    "kd_loss",
    "create_model",
    "Recipe",
    "load_recipe",
    "run_recipe",
    "summarize",
    "__version__",
]
