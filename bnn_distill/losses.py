"""Distillation losses: ITRD (correlation and mutual information), Hinton KD, cross-entropy.

The losses are pure functions with shapes and formulas in their docstrings. :class:`Criterion`
is the one ``nn.Module``: it owns the ITRD projection head ``embed`` and combines the terms a
recipe names (by registry name, with weights), returning a dict of every term plus the total.

Reference: Miles, Lopez-Rodriguez, Mikolajczyk, "Information Theoretic Representation
Distillation", BMVC 2022 (arXiv 2112.00459).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import RecipeError, choices, closest

__all__ = [
    "itrd_correlation",
    "itrd_mutual_information",
    "kd_loss",
    "LOSSES",
    "Criterion",
]


def standardise(z: Tensor, eps: float) -> Tensor:
    """Per-column ``(z - mean) / sqrt(var_unbiased + eps)`` over the batch. ``z``: (n, d)."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=True, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def dimension_correlations(z_s: Tensor, z_t: Tensor, eps: float = 1e-5) -> Tensor:
    """``v_i = (1/n) sum_b zs~[b, i] * zt~[b, i]`` of :func:`itrd_correlation`, with ``z~`` from
    :func:`standardise`: the per-dimension correlation of two (n, d) feature batches, (d,)."""
    return (standardise(z_s, eps) * standardise(z_t, eps)).sum(dim=0) / z_s.shape[0]


def itrd_correlation(z_s: Tensor, z_t: Tensor, alpha: float = 1.01, eps: float = 1e-5) -> Tensor:
    """ITRD correlation loss on already-projected features.

    ``z_s``, ``z_t``: (n, d). Each column is standardised over the batch with the unbiased
    variance, ``z~ = (z - mean) / sqrt(var + eps)``; then

        v_i    = (1/n) * sum_b zs~[b, i] * zt~[b, i]        (diagonal cross-correlation, (d,))
        L_corr = log2( sum_i |v_i - 1| ** (2 * alpha) )

    With ``eps=0`` this is the official definition (which divides by n after an unbiased std, so
    ``v_i <= (n-1)/n``, and gives NaN for a column that is constant over the batch). The default
    ``eps=1e-5`` keeps constant columns (common in binary students) finite: they standardise to 0,
    so ``v_i = 0`` and the term contributes 1 to the sum, with finite gradients.
    """
    if z_s.dim() != 2 or z_s.shape != z_t.shape:
        raise ValueError(
            f"itrd_correlation needs two (n, d) tensors of one shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}"
        )
    v = dimension_correlations(z_s.float(), z_t.float(), eps)  # (d,)
    return torch.log2((v - 1).abs().pow(2 * alpha).sum())


def itrd_mutual_information(z_s: Tensor, z_t: Tensor) -> Tensor:
    """ITRD mutual-information loss (order-2 matrix entropy, logs dropped).

    ``z_s``: (n, d_s), ``z_t``: (n, d_t) (already projected when the widths differ). Rows are
    L2-normalised; with ``G_s = Zs^ Zs^T``, ``G_t = Zt^ Zt^T`` (n, n) and ``G_st = G_s * G_t``:

        A = G_s / tr(G_s),   B = G_st / tr(G_st),   L_gram = ||A||_F^2 - ||B||_F^2

    With unit rows both traces are n, so ``L_gram = (1/n^2) sum_ij G_s[i,j]^2 (1 - G_t[i,j]^2) >= 0``.
    """
    if z_s.dim() != 2 or z_t.dim() != 2 or z_s.shape[0] != z_t.shape[0]:
        raise ValueError(
            f"itrd_mutual_information needs (n, d_s) and (n, d_t), got {tuple(z_s.shape)} and {tuple(z_t.shape)}"
        )
    zs = F.normalize(z_s.float(), dim=1)
    zt = F.normalize(z_t.float(), dim=1)
    g_s = zs @ zs.t()  # (n, n)
    g_t = zt @ zt.t()  # (n, n)
    g_st = g_s * g_t
    a = g_s / torch.trace(g_s)
    b = g_st / torch.trace(g_st)
    return a.pow(2).sum() - b.pow(2).sum()


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean. Logits: (n, classes)."""
    t = temperature
    log_p_s = F.log_softmax(logits_s.float() / t, dim=1)
    log_p_t = F.log_softmax(logits_t.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@dataclass
class LossInputs:
    """What a training step hands the criterion. Features are the hooked (n, d) tensors."""

    logits: Tensor
    labels: Tensor
    teacher_logits: Optional[Tensor] = None
    feat: Optional[Tensor] = None
    teacher_feat: Optional[Tensor] = None


@dataclass(frozen=True)
class LossSpec:
    """A registered loss term: ``fn(inputs, embed, **params) -> scalar``."""

    fn: Callable[..., Tensor]
    params: Mapping[str, float]
    needs_teacher: bool
    needs_features: bool
    doc: str


# Valid ranges of loss parameters: (low, high, low inclusive, high inclusive).
PARAM_RANGES: Dict[str, tuple] = {
    "label_smoothing": (0.0, 1.0, True, False),
    "temperature": (0.0, 100.0, False, True),
    "alpha": (0.0, 100.0, False, True),  # Renyi order; the paper uses 1.01 (same arch) and 1.5
    "eps": (0.0, 1.0, True, True),  # 0 reproduces the official (NaN-prone) standardisation
}


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


LOSSES: Dict[str, LossSpec] = {}


def register_loss(name: str, params: Mapping[str, float], needs_teacher: bool, needs_features: bool, doc: str):
    def deco(fn):
        assert name not in LOSSES, f"loss {name} registered twice"
        LOSSES[name] = LossSpec(fn, dict(params), needs_teacher, needs_features, doc)
        return fn

    return deco


@register_loss("ce", {"label_smoothing": 0.0}, False, False, "cross-entropy with the labels")
def _ce(x: LossInputs, embed: Optional[nn.Module], label_smoothing: float) -> Tensor:
    return F.cross_entropy(x.logits.float(), x.labels, label_smoothing=label_smoothing)


@register_loss("kd", {"temperature": 4.0}, True, False, "Hinton KD on the logits")
def _kd(x: LossInputs, embed: Optional[nn.Module], temperature: float) -> Tensor:
    return kd_loss(x.logits, x.teacher_logits, temperature)


@register_loss("itrd_corr", {"alpha": 1.01, "eps": 1e-5}, True, True, "ITRD correlation loss (projected student)")
def _itrd_corr(x: LossInputs, embed: Optional[nn.Module], alpha: float, eps: float) -> Tensor:
    return itrd_correlation(embed(x.feat.float()), x.teacher_feat.float(), alpha=alpha, eps=eps)


@register_loss("itrd_mi", {}, True, True, "ITRD mutual-information (Gram) loss")
def _itrd_mi(x: LossInputs, embed: Optional[nn.Module]) -> Tensor:
    z_s = x.feat.float()
    if z_s.shape[1] != x.teacher_feat.shape[1]:
        z_s = embed(z_s)
    return itrd_mutual_information(z_s, x.teacher_feat.float())


def validate_loss_term(name: str, params: Mapping[str, object], path: str) -> None:
    """Raise :class:`RecipeError` for an unknown loss or parameter, naming the recipe path."""
    if name not in LOSSES:
        raise RecipeError(f"{path}.name: unknown loss '{name}'{closest(name, LOSSES)}; valid: {choices(LOSSES)}")
    spec = LOSSES[name]
    for key, val in params.items():
        if key not in spec.params:
            valid = choices(spec.params) if spec.params else "none"
            raise RecipeError(
                f"{path}.{key}: loss '{name}' has no parameter '{key}'{closest(key, spec.params)}; valid: {valid}"
            )
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise RecipeError(f"{path}.{key}: expected a number, got {val!r}")
        if key in PARAM_RANGES:
            lo, hi, lo_in, hi_in = PARAM_RANGES[key]
            ok = (lo <= val if lo_in else lo < val) and (val <= hi if hi_in else val < hi)
            if not ok:  # NaN fails every comparison
                raise RecipeError(f"{path}.{key}: {val} is out of range; valid: {_range_text(lo, hi, lo_in, hi_in)}")


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    params: Mapping[str, float]


class Criterion(nn.Module):
    """Weighted sum of registered loss terms; owns the ITRD projection ``embed`` (Linear d_s -> d_t).

    ``forward`` returns ``{term: unweighted value, ..., "loss": sum_k weight_k * term_k}``. Every
    term is computed in fp32 with autocast off, as ITRD requires under AMP.
    """

    def __init__(self, terms: Sequence[Term], student_dim: Optional[int] = None, teacher_dim: Optional[int] = None):
        super().__init__()
        for i, t in enumerate(terms):
            validate_loss_term(t.name, t.params, f"losses[{i}]")
        self.terms: List[Term] = list(terms)
        self.embed: Optional[nn.Module] = None
        if self.needs_features:
            assert student_dim and teacher_dim, "feature losses need both feature widths"
            self.embed = nn.Linear(student_dim, teacher_dim)

    @classmethod
    def itrd(
        cls,
        student_dim: int,
        teacher_dim: int,
        beta_corr: float = 2.0,
        beta_gram: float = 1.0,
        alpha: float = 1.01,
        eps: float = 1e-5,
    ) -> "Criterion":
        """The paper's loss: ``CE + beta_corr * L_corr + beta_gram * L_gram`` (2.0 and 1.0 in every ITRD run)."""
        return cls(
            [
                Term("ce", 1.0, {}),
                Term("itrd_corr", beta_corr, {"alpha": alpha, "eps": eps}),
                Term("itrd_mi", beta_gram, {}),
            ],
            student_dim,
            teacher_dim,
        )

    @property
    def needs_teacher(self) -> bool:
        return any(LOSSES[t.name].needs_teacher for t in self.terms)

    @property
    def needs_features(self) -> bool:
        return any(LOSSES[t.name].needs_features for t in self.terms)

    def forward(self, inputs: LossInputs) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        device_type = inputs.logits.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            total = inputs.logits.new_zeros((), dtype=torch.float32)
            for t in self.terms:
                spec = LOSSES[t.name]
                kwargs = {**spec.params, **t.params}
                value = spec.fn(inputs, self.embed, **kwargs)
                out[t.name] = value
                total = total + t.weight * value
        out["loss"] = total
        return out
