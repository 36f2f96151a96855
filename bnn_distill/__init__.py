"""bnn-distill: binary ResNet students distilled with ITRD, exported to ONNX, benchmarked.

Public API (everything else is internal):

* :func:`load_recipe`, :class:`Recipe` - validated YAML recipes
* :func:`run_recipe` - the whole training pipeline
* :func:`create_model` - the ResNet family (FP teacher or binary student)
* :func:`itrd_correlation`, :func:`itrd_mutual_information`, :class:`Criterion` - the losses
* :func:`summarize` - per-layer bit-widths, MACs and memory
* :class:`UserError` - what every user-caused error raises
"""

__version__ = "0.1.0"

import logging as _logging

# Brevitas imports torch.utils.cpp_extension, which warns on every CPU-only machine that it found
# no CUDA runtime; that line is noise for users of this package.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)


from .errors import UserError
from .losses import Criterion, itrd_correlation, itrd_mutual_information, kd_loss
from .models import create_model
from .recipe import Recipe, load_recipe


def run_recipe(*args, **kwargs):
    """See :func:`bnn_distill.train.run_recipe` (imported lazily: it pulls in the data stack)."""
    from .train import run_recipe as _run

    return _run(*args, **kwargs)


def summarize(*args, **kwargs):
    """See :func:`bnn_distill.summary.summarize`."""
    from .summary import summarize as _summarize

    return _summarize(*args, **kwargs)


__all__ = [
    "UserError", "Criterion", "itrd_correlation", "itrd_mutual_information", "kd_loss", "create_model",
    "Recipe", "load_recipe", "run_recipe", "summarize", "__version__",
]
