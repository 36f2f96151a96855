"""Which lowering a model gets: :func:`lower` picks the target's class once per model."""

from __future__ import annotations

from typing import Sequence, Type

import torch.nn as nn

from .lower import FloatLowering, Lowering, conv_kinds
from .lower_int import IntLowering


def lowering_class(model: nn.Module, native: bool = False) -> Type[Lowering]:
    """Float unless ``model`` has W1A1 convs; then the exact integer graph, or ``native``'s custom ops."""
    if "W1A1" not in conv_kinds(model):
        return FloatLowering
    if native:
        # imported on use: bnn_distill.native.lower subclasses IntLowering, so it imports this package
        from ..native.lower import NativeLowering

        return NativeLowering
    return IntLowering


def lower(model: nn.Module, input_shape: Sequence[int], name: str = "model", native: bool = False):
    """Lower a ResNet to ONNX; returns ``(ModelProto, probes)``. ``native``: binary blocks become
    ``ai.bnn_distill::BinaryConv2d`` nodes (see :mod:`bnn_distill.native`)."""
    low = lowering_class(model, native)(model, input_shape, name)
    return low.build(), low.probes
