"""The frozen teacher's forward pass in a student stage, in the fastest form that computes the
same function.

A student stage runs the teacher on every batch and never trains it, so its BatchNorms are fixed
affine maps that can be folded into the convolutions before them (one pass fewer per conv), and
the result can be handed to ``torch.compile``. Neither is trusted blindly: on the first batch the
fast form is run beside the teacher as trained, and if they disagree beyond float rounding (a
model whose BatchNorm does not follow the conv it is named after, a compiler that fails) the
stage falls back to the next safer form and says so in the log.

Forms (``teacher_forward`` in a recipe): ``eager`` (the module as trained), ``folded`` (the
default: BatchNorms folded), ``compiled`` (folded, then ``torch.compile``).
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .hooks import FeatureHook

log = logging.getLogger(__name__)

FORMS = ("eager", "folded", "compiled")
# largest |fast - eager| accepted, relative to max(1, largest |eager| value): float rounding is ~1e-6
TOLERANCE = 1e-3


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm2d folded into the Conv2d it follows.

    Pairs are found by name, the way this library's ResNets (and torchvision's) are written:
    ``convK`` -> ``bnK`` inside a module, and consecutive children of a ``Sequential`` (a
    shortcut's conv, then its BatchNorm). A folded BatchNorm becomes ``nn.Identity`` under the same
    name, so a hook on it still sees the same values. A model whose forward does not apply ``bnK``
    right after ``convK`` is folded wrongly; :class:`FrozenTeacher` checks the result against the
    original before using it.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def walk(mod: nn.Module) -> None:
        names = list(mod._modules)
        if isinstance(mod, nn.Sequential):
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(n, "bn" + n[4:]) for n in names if n.startswith("conv") and "bn" + n[4:] in mod._modules]
        for conv_name, bn_name in pairs:
            conv, bn = mod._modules[conv_name], mod._modules[bn_name]
            if (
                type(conv) is nn.Conv2d  # not a subclass (a quantised conv has its own forward)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.num_features == conv.out_channels
                and bn.track_running_stats
                and bn.running_mean is not None
            ):
                mod._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                mod._modules[bn_name] = nn.Identity()
        for child in mod._modules.values():
            if child is not None:
                walk(child)

    walk(model)
    return model.requires_grad_(False)


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class FrozenTeacher:
    """``(logits, hooked feature or None)`` of a frozen teacher per batch, under ``inference_mode``.

    ``model``: the teacher as trained (left untouched: folding works on a copy). ``feature_path``:
    the module whose output the losses distil, or None. ``form``: one of :data:`FORMS`, the
    fastest one tried; the form in use is settled on the first call (``self.form`` afterwards) and
    ``self.check`` holds what was measured.
    """

    def __init__(self, model: nn.Module, feature_path: Optional[str], form: str = "folded"):
        if form not in FORMS:
            raise ValueError(f"teacher_forward: '{form}' is not valid; valid: {', '.join(FORMS)}")
        self.eager = model.eval().requires_grad_(False)
        self.feature_path = feature_path
        self.requested = form
        self.form: Optional[str] = None  # settled on the first batch
        self.check: dict = {}
        self._run: Optional[Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]] = None

    def __call__(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self._run is None:
            self._settle(x)
        assert self._run is not None
        with torch.inference_mode():
            logits, feat = self._run(x)
        # cloned out of inference mode, so the losses may save them for the student's backward
        return logits.clone(), (feat.clone() if feat is not None else None)

    # ------------------------------------------------------------ choosing the form

    def _runner(self, model: Callable[[Tensor], Tensor], hooked: nn.Module):
        """(run(x) -> (logits, feature), remove()) for ``model``, its feature hooked on ``hooked``."""
        hook = FeatureHook(hooked, self.feature_path) if self.feature_path else None

        def run(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            logits = model(x)
            return logits, (hook.pop() if hook is not None else None)

        def remove() -> None:
            if hook is not None:
                hook.remove()

        return run, remove

    def _settle(self, x: Tensor) -> None:
        eager, remove_eager = self._runner(self.eager, self.eager)
        self._run, self.form = eager, "eager"
        if self.requested == "eager":
            return
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            ref = eager(x)
        candidates = ["folded"] if self.requested == "folded" else ["compiled", "folded"]
        folded: Optional[nn.Module] = None
        for form in candidates:
            try:
                if folded is None:
                    folded = fold_batchnorm(self.eager)
                if count_batchnorms(folded) == count_batchnorms(self.eager):
                    self.check = {"form": "eager", "why": "no BatchNorm follows a plain conv"}
                    log.info("teacher forward: eager (no BatchNorm to fold)")
                    return
                model = torch.compile(folded) if form == "compiled" else folded
                run, remove = self._runner(model, folded)
                try:
                    with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
                        got = run(x)
                except Exception:
                    remove()
                    raise
            except Exception as exc:  # noqa: BLE001 - a compiler or fold failure: fall back
                log.warning(
                    "teacher forward: %s failed (%s: %s); trying a safer form",
                    form,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                continue
            err = _max_rel_err(ref, got)
            if err <= TOLERANCE:
                remove_eager()  # the teacher as trained is left without this stage's hook
                self._run, self.form = run, form
                self.check = {
                    "form": form,
                    "max_rel_err": err,
                    "batchnorms_folded": count_batchnorms(self.eager) - count_batchnorms(folded),
                }
                log.info(
                    "teacher forward: %s (%d BatchNorms folded; max difference to eager %.1e of the "
                    "largest output, on the first batch)",
                    form,
                    self.check["batchnorms_folded"],
                    err,
                )
                return
            remove()
            log.warning(
                "teacher forward: %s differs from the teacher as trained (%.1e of the largest output, "
                "more than %.0e); trying a safer form",
                form,
                err,
                TOLERANCE,
            )
        self.check = {"form": "eager", "why": "no faster form matched the teacher as trained"}
        log.warning("teacher forward: eager (no faster form matched the teacher as trained)")


def _max_rel_err(ref: Tuple[Tensor, Optional[Tensor]], got: Tuple[Tensor, Optional[Tensor]]) -> float:
    """Largest |got - ref| over the logits and the feature, each relative to max(1, max |ref|)."""
    err = 0.0
    for a, b in zip(ref, got):
        if a is None or b is None:
            if (a is None) != (b is None):
                return float("inf")
            continue
        if a.shape != b.shape:
            return float("inf")
        a, b = a.float(), b.float()
        if not torch.isfinite(b).all():
            return float("inf")
        scale = max(1.0, float(a.abs().max()))
        err = max(err, float((a - b).abs().max()) / scale)
    return err
