"""Weight preparation for the lowerings: conv kinds, binary weight matrices, BatchNorm affines,
and the PyTorch reference of a fused conv node."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..quant import layer_bits
from .graph import ExportError


def conv_kind(m: nn.Module) -> str:
    """``FP``, ``W32A1`` or ``W1A1`` for a conv layer; raises for anything else."""
    bits = layer_bits(m)
    if bits == (32, 32) and type(m) is nn.Conv2d:
        return "FP"
    if bits == (32, 1):
        return "W32A1"
    if bits == (1, 1):
        return "W1A1"
    raise ExportError(f"cannot lower {type(m).__name__} with (weight, activation) bits {bits}")


def is_w1a1(m: nn.Module) -> bool:
    try:
        return conv_kind(m) == "W1A1"
    except ExportError:
        return False


def binary_weight_matrix(conv: nn.Module, bn_scale: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The conv's binary weights from its own quantiser: ``(int8 ±1 matrix (K, N), scale (N,))``.

    ``K`` is ordered (kh, kw, Cin) to match the im2col taps. The quantiser's ``alpha_c * (±1)`` is
    checked to reproduce the module's ``quant_weight()`` exactly. The returned scale is
    ``|alpha_c * bn_scale_c|`` (``bn_scale`` folds the following BatchNorm's multiplier in, in float32),
    with the sign of a negative product moved into the ±1 weights.
    """
    with torch.no_grad():
        qw = conv.quant_weight()
        value = qw.value.detach().float()  # (N, Cin, kh, kw) = alpha_c * sign(w~)
        scale = qw.scale.detach().float().reshape(-1)  # (N,)
    n = value.shape[0]
    s = scale.view(n, 1, 1, 1)
    nonzero = (s != 0).expand_as(value)
    q = torch.where(nonzero, value / torch.where(s != 0, s, torch.ones_like(s)), torch.ones_like(value))
    if not bool((q.abs() == 1).all()) or not torch.equal(q * s, value):
        raise ExportError("binary weights are not alpha_c * (+-1) per output channel")
    if bn_scale is not None:
        scale = scale * torch.from_numpy(np.asarray(bn_scale, dtype=np.float32))
    flip = (scale < 0).view(n, 1, 1, 1)  # s_c * q == |s_c| * (-q) when s_c < 0
    q = torch.where(flip, -q, q)
    scale = scale.abs()
    mat = q.permute(2, 3, 1, 0).reshape(-1, n)  # (kh*kw*Cin, N)
    return mat.numpy().astype(np.int8), scale.numpy().astype(np.float32)


def bn_affine(bn: nn.Module) -> Tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm as ``y = x * a + b``, computed as PyTorch's CPU kernel does (float32)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError("BatchNorm without running statistics")
    with torch.no_grad():
        var, mean = bn.running_var.float(), bn.running_mean.float()
        w = bn.weight.float() if bn.weight is not None else torch.ones_like(var)
        b = bn.bias.float() if bn.bias is not None else torch.zeros_like(var)
        invstd = 1.0 / torch.sqrt(var + bn.eps)
        a = invstd * w
        return a.numpy(), (b - mean * a).numpy()


def float_weight(t: Tensor) -> np.ndarray:
    """A parameter as a float32 array (no autograd)."""
    return t.detach().float().numpy()


class _FusedConv(nn.Module):
    """PyTorch reference of a fused native node: ``act(bn(conv(x)) [+ residual])``."""

    def __init__(
        self,
        conv: nn.Module,
        bn: nn.Module,
        act: nn.Module,
        shortcut: Optional[nn.Module] = None,
        sign_out: bool = False,
    ):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.sign_out = sign_out  # a ...ToBits node: the sign (+-1) of the result, as the next conv takes it

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = self.bn(self.conv(x))
        y = self.act(y if residual is None else y + self.shortcut(residual))
        return torch.where(y >= 0, 1.0, -1.0).to(y.dtype) if self.sign_out else y
