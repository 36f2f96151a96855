"""Features read by forward hooks on named modules (never by flags on ``forward``)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .errors import RecipeError, closest


def get_module(model: nn.Module, path: str, what: str = "feature_layer") -> nn.Module:
    """``model.get_submodule(path)`` with a clear error listing near names."""
    names = [n for n, _ in model.named_modules() if n]
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise RecipeError(
            f"{what}: the model has no module '{path}'{closest(path, names)}; e.g. 'head_bn', 'flatten' or 'layer4'"
        ) from None


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


def forward_features(model: nn.Module, x: Tensor, path: str, batch: int) -> Tuple[Tensor, Tensor]:
    """(logits (N, classes), hooked features (N, d)) of ``model`` in eval mode, in batches, as float32."""
    import torch

    model.eval()
    hook = FeatureHook(model, path)
    logits, feats = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                logits.append(model(x[i : i + batch]).float())
                feats.append(hook.pop().float())
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(feats)
