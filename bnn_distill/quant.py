"""Binary quantisers, declared for Brevitas.

Each quantiser is a small function with its forward maths and gradient in the docstring, a
tensor-quant module that Brevitas calls (returning ``(value, scale, zero_point, bit_width)``),
and an injector class that Brevitas layers take as ``weight_quant`` / ``input_quant``.

Conventions shared with training, evaluation and export:

* ``sign(0) = +1`` (Brevitas ``binary_sign``), everywhere.
* Weights are binarised per output channel: ``w_b = alpha_c * sign(w~)`` where ``w~`` is the
  weight, optionally ReCU-standardised, and ``alpha_c`` is ``mean(|w_c|)`` or a learned scale.
* Activations are binarised to ``{-1, +1}`` with no scale (the BatchNorm that follows absorbs it).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import brevitas.nn as qnn
import torch
import torch.nn as nn
from brevitas.inject import ExtendedInjector, value
from brevitas.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector
from torch import Tensor

from .errors import RecipeError, choices, closest

QUANT_MODES = ("FP", "W32A1", "W1A1")
WEIGHT_SCALES = ("mean_abs", "learned", "none")
GRADIENTS = ("identity", "ste", "approx_sign")


def binary_sign(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) = +1``: returns ``+1`` where ``x >= 0`` and ``-1`` elsewhere.

    Written as ``2 * (x >= 0) - 1`` with the comparison stored straight into an ``x``-typed
    tensor: three vectorised passes, about 10x faster on CPU than ``torch.where`` with scalar
    branches (which took a slow broadcasting path), and the same values.
    """
    out = torch.empty_like(x)
    torch.ge(x.detach(), 0, out=out)  # 1.0 / 0.0; -0.0 >= 0 holds, so sign(-0) = +1 too
    return out.mul_(2.0).sub_(1.0)


def sign_grad(x: Tensor, kind: str) -> Tensor:
    """The surrogate derivative d sign(x)/dx used in the backward pass.

    * ``identity``:    1                          (plain straight-through, ReCU weights)
    * ``ste``:         1 if |x| <= 1 else 0       (clipped straight-through, BNN/XNOR-Net)
    * ``approx_sign``: max(0, 2 - 2|x|)           (Bi-Real Net's piecewise-quadratic sign)
    """
    if kind == "identity":
        return torch.ones_like(x)
    if kind == "ste":
        return (x.abs() <= 1).to(x.dtype)
    if kind == "approx_sign":
        return (2 - 2 * x.abs()).clamp(min=0)
    raise ValueError(f"unknown sign gradient {kind!r}")


def approx_sign_backward(x: Tensor, grad: Tensor) -> Tensor:
    """``grad * max(0, 2 - 2|x|)``: the ApproxSign backward, in four in-place passes after ``|x|``.

    :class:`_Sign` looks this name up at call time, so a benchmark can time another form of it
    (``benchmarks/train_cost.py --compile`` times a fused ``torch.compile`` kernel)."""
    return x.abs().mul_(-2.0).add_(2.0).clamp_(min=0.0).mul_(grad)


class _Sign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kind: str) -> Tensor:  # type: ignore[override]
        ctx.kind = kind
        if kind != "identity":
            ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.kind == "identity":
            return grad, None
        (x,) = ctx.saved_tensors
        if ctx.kind == "approx_sign":  # in place: this runs on every activation of every step
            return approx_sign_backward(x, grad), None
        return grad * sign_grad(x, ctx.kind), None


def sign_with_grad(x: Tensor, gradient: str = "identity") -> Tensor:
    """Forward: :func:`binary_sign`. Backward: ``grad * sign_grad(x, gradient)``."""
    return _Sign.apply(x, gradient)


def mean_abs_scale(w: Tensor) -> Tensor:
    """Per-output-channel XNOR-Net scale ``alpha_c = mean(|w[c]|)``, shape ``(C, 1, ..., 1)``."""
    dims = tuple(range(1, w.dim()))
    return w.abs().mean(dim=dims, keepdim=True)


def recu_tau_clamp(w: Tensor, tau: float | Tensor, eps: float = 1e-5) -> Tensor:
    """ReCU weight standardisation and quantile clamp (Xu et al., ICCV 2021).

    Per filter: ``w1 = (w - mean(w)) / sqrt(var(w) + eps)``; then, with ``E = mean(|w1|)`` over the
    whole tensor (the Laplace scale), clamp to ``[-Q, Q]`` with ``Q = -E * ln(2 - 2 * tau)``, the
    ``tau`` quantile of a Laplace(0, E) distribution. ``tau`` in [0.5, 1) moves from 0.85 to 0.99
    during training. Gradients flow through the standardisation; the clamp zeroes them outside.
    ``tau`` may be a 0-dim tensor on ``w``'s device (the module's buffer): reading it as a Python
    float would stop a GPU at every binary conv of every step to copy it to the host.
    """
    dims = tuple(range(1, w.dim()))
    w0 = w - w.mean(dim=dims, keepdim=True)
    w1 = w0 / torch.sqrt(w0.var(dim=dims, keepdim=True) + eps)
    if isinstance(tau, Tensor):  # ln(2 - 2 tau) in float64, as math.log does, then w's dtype
        log_term = torch.log(2.0 - 2.0 * tau.detach().double()).to(w1.dtype)
    else:
        log_term = math.log(2.0 - 2.0 * tau)
    q = (-w1.abs().mean() * log_term).detach()
    return torch.maximum(torch.minimum(w1, q), -q)


def tau_at(progress: float, start: float = 0.85, end: float = 0.99) -> float:
    """The ReCU tau schedule: linear from ``start`` to ``end`` as training ``progress`` goes 0 -> 1."""
    p = min(max(progress, 0.0), 1.0)
    return start + (end - start) * p


class BinaryWeightTensorQuant(nn.Module):
    """Brevitas tensor quant for weights: ``y = alpha_c * sign(w~)``.

    ``w~`` is ``recu_tau_clamp(w, tau)`` when ``recu`` is on, else ``w``. ``alpha_c`` is
    ``mean(|w[c]|)`` (``mean_abs``, differentiable), a learned per-channel parameter (``learned``,
    initialised to ``mean(|w[c]|)`` by :func:`init_binary_scales`) or 1 (``none``).
    """

    def __init__(self, out_channels: int, scale_mode: str, recu: bool, gradient: str):
        super().__init__()
        self.scale_mode = scale_mode
        self.recu = recu
        self.gradient = gradient
        self.register_buffer("tau", torch.tensor(0.85))
        self.register_buffer("zero_point", torch.tensor(0.0), persistent=False)
        self.register_buffer("bit_width", torch.tensor(1.0), persistent=False)
        if scale_mode == "learned":
            self.alpha = nn.Parameter(torch.ones(out_channels, 1, 1, 1))

    def scale(self, w: Tensor) -> Tensor:
        if self.scale_mode == "mean_abs":
            return mean_abs_scale(w)
        if self.scale_mode == "learned":
            return self.alpha.view((-1,) + (1,) * (w.dim() - 1))
        return torch.ones((w.shape[0],) + (1,) * (w.dim() - 1), dtype=w.dtype, device=w.device)

    @torch.no_grad()
    def init_scale(self, w: Tensor) -> None:
        if self.scale_mode == "learned":
            self.alpha.copy_(mean_abs_scale(w).view_as(self.alpha).clamp(min=1e-8))

    def forward(self, w: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        wt = recu_tau_clamp(w, self.tau) if self.recu else w
        scale = self.scale(w)
        return sign_with_grad(wt, self.gradient) * scale, scale, self.zero_point, self.bit_width


class BinaryActTensorQuant(nn.Module):
    """Brevitas tensor quant for activations: ``y = sign(x)`` in {-1, +1}, surrogate gradient."""

    def __init__(self, gradient: str):
        super().__init__()
        self.gradient = gradient
        self.register_buffer("one", torch.tensor(1.0), persistent=False)
        self.register_buffer("zero_point", torch.tensor(0.0), persistent=False)
        self.register_buffer("bit_width", torch.tensor(1.0), persistent=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return sign_with_grad(x, self.gradient), self.one, self.zero_point, self.bit_width


class BinaryWeightQuant(ExtendedInjector):
    """Injector: per-output-channel binary weights (``QuantConv2d(weight_quant=...)``)."""

    tensor_quant = BinaryWeightTensorQuant
    proxy_class = WeightQuantProxyFromInjector
    scale_mode = "mean_abs"
    recu = False
    gradient = "identity"
    signed = True
    narrow_range = True
    bit_width = 1

    @value
    def out_channels(module):  # noqa: N805 - resolved by Brevitas' injector
        return module.out_channels


class BinaryActQuant(ExtendedInjector):
    """Injector: binary input activations (``QuantConv2d(input_quant=...)``)."""

    tensor_quant = BinaryActTensorQuant
    proxy_class = ActQuantProxyFromInjector
    gradient = "approx_sign"
    signed = True
    narrow_range = True
    bit_width = 1


def _check(name: str, value_: str, valid) -> None:
    if value_ not in valid:
        raise RecipeError(f"{name}: unknown value '{value_}'{closest(value_, valid)}; valid: {choices(valid)}")


def conv_factory(
    mode: str,
    weight_scale: str = "mean_abs",
    recu: bool = False,
    weight_gradient: str = "identity",
    act_gradient: str = "approx_sign",
) -> Callable[..., nn.Module]:
    """Return ``make(in_ch, out_ch, kernel_size, stride, padding)`` building the body convs.

    ``FP``: ``nn.Conv2d``. ``W32A1``: Brevitas ``QuantConv2d`` with binary input activations and
    full-precision weights. ``W1A1``: binary input activations and binary weights.
    """
    _check("quant", mode, QUANT_MODES)
    _check("weight_scale", weight_scale, WEIGHT_SCALES)
    _check("weight_gradient", weight_gradient, GRADIENTS)
    _check("act_gradient", act_gradient, GRADIENTS)
    wq = BinaryWeightQuant.let(scale_mode=weight_scale, recu=recu, gradient=weight_gradient)
    aq = BinaryActQuant.let(gradient=act_gradient)

    def make(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Module:
        if mode == "FP":
            return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        return qnn.QuantConv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=False,
            weight_quant=wq if mode == "W1A1" else None,
            input_quant=aq,
            return_quant_tensor=False,
        )

    return make


def _weight_tq(module: nn.Module) -> Optional[BinaryWeightTensorQuant]:
    wq = getattr(module, "weight_quant", None)
    tq = getattr(wq, "tensor_quant", None)
    return tq if isinstance(tq, BinaryWeightTensorQuant) else None


def _act_tq(module: nn.Module) -> Optional[BinaryActTensorQuant]:
    iq = getattr(module, "input_quant", None)
    fused = getattr(iq, "fused_activation_quant_proxy", None)
    tq = getattr(fused, "tensor_quant", None)
    return tq if isinstance(tq, BinaryActTensorQuant) else None


def layer_bits(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(weight_bits, input_act_bits)`` of a conv/linear layer, or ``None`` for other modules."""
    if isinstance(module, qnn.QuantConv2d):
        return (1 if _weight_tq(module) is not None else 32, 1 if _act_tq(module) is not None else 32)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return (32, 32)
    return None


def binary_weight_quants(model: nn.Module):
    """Yield ``(conv_name, conv, tensor_quant)`` for every conv with binary weights."""
    for name, m in model.named_modules():
        tq = _weight_tq(m)
        if tq is not None:
            yield name, m, tq


def init_binary_scales(model: nn.Module, only_missing: Optional[set] = None) -> None:
    """Initialise learned weight scales to ``mean(|w_c|)`` from the current weights.

    Called after building a student and after loading real-valued weights from an earlier stage
    (``only_missing``: names of convs whose scales were not in the loaded state).
    """
    for name, conv, tq in binary_weight_quants(model):
        if only_missing is None or name in only_missing:
            tq.init_scale(conv.weight)


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the ReCU clamp quantile on every binary-weight conv."""
    for _, _, tq in binary_weight_quants(model):
        tq.tau.fill_(tau)


def is_quant_param(key: str) -> bool:
    """State-dict keys that belong to quantisers (absent in FP or W32A1 models)."""
    return ".weight_quant." in key or ".input_quant." in key or key.startswith(("weight_quant.", "input_quant."))
