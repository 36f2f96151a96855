"""Features read by forward hooks on named modules (never by flags on ``forward``)."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from .errors import RecipeError, closest


def get_module(model: nn.Module, path: str, what: str = "feature_layer") -> nn.Module:
    """``model.get_submodule(path)`` with a clear error listing near names."""
    names = [n for n, _ in model.named_modules() if n]
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise RecipeError(f"{what}: the model has no module '{path}'{closest(path, names)}; e.g. 'head_bn', 'flatten' or 'layer4'") from None


class FeatureHook:
    """Keeps the latest output of ``model.<path>``, flattened to (n, d)."""

    def __init__(self, model: nn.Module, path: str):
        self.path = path
        self.output: Optional[Tensor] = None
        self._handle = get_module(model, path).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output: Tensor) -> None:
        self.output = output

    def pop(self) -> Tensor:
        out = self.output
        assert out is not None, f"hooked module '{self.path}' did not run in the forward pass"
        self.output = None
        return out.flatten(1)  # (n, d)

    def remove(self) -> None:
        self._handle.remove()
