"""One distillation optimiser step outside the Trainer, for timing configurations side by side.

``benchmarks/train_cost.py`` and ``benchmarks/itrd_grid.py`` build a :class:`TimedStep` per
configuration (quantisation, loss terms, teacher forward or not) and time them with
:func:`interleaved_times`, round after round in rotating order, so machine noise hits every
configuration alike.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import quant as quant_mod
from .hooks import FeatureHook
from .losses import Criterion, LossInputs, Term
from .models import create_model


class TimedStep:
    """One optimiser step (forward, loss, backward, SGD) of a fresh student on a fixed batch ``x``, ``y``.

    ``with_teacher``: the frozen teacher's forward runs in every step (else its outputs are computed
    once, which isolates the loss's own cost). ``sign`` / ``sign_backward``: the binary sign and the
    ApproxSign backward the step uses (default: the library's). ``compile_student``: the step runs
    ``torch.compile(student)``. The student's and teacher's features are hooked at ``head_bn``.
    """

    def __init__(
        self,
        name: str,
        quant: str,
        terms: Sequence[Term],
        with_teacher: bool,
        arch: str,
        width_mult: float,
        teacher: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        channels_last: bool = False,
        sign: Optional[Callable] = None,
        sign_backward: Optional[Callable] = None,
        compile_student: bool = False,
    ):
        self.name = name
        torch.manual_seed(0)
        self.student = create_model(
            arch, 10, in_chans=x.shape[1], quant=quant, width_mult=width_mult, weight_scale="learned", recu=True
        )
        self.sign = sign or quant_mod.binary_sign
        self.sign_backward = sign_backward or quant_mod.approx_sign_backward
        if channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.feat = FeatureHook(self.student, "head_bn")  # hooks the module, so before compiling
        self.forward = torch.compile(self.student) if compile_student else self.student
        d = self.student.num_features
        self.criterion = Criterion(list(terms), d, d)
        self.teacher = teacher
        self.t_feat = FeatureHook(teacher, "head_bn")
        self.with_teacher = with_teacher
        self.needs_teacher = self.criterion.needs_teacher
        params = list(self.student.parameters()) + list(self.criterion.parameters())
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        self.x, self.y = x, y
        with torch.no_grad():
            self.cached = (teacher(x), self.t_feat.pop()) if self.needs_teacher else (None, None)

    def step(self) -> None:
        saved = quant_mod.binary_sign, quant_mod.approx_sign_backward
        quant_mod.binary_sign = self.sign  # _Sign looks both up at call time
        quant_mod.approx_sign_backward = self.sign_backward
        try:
            t_logits, t_feat = self.cached
            if self.needs_teacher and self.with_teacher:
                with torch.no_grad():
                    t_logits = self.teacher(self.x)
                    t_feat = self.t_feat.pop()
            logits = self.forward(self.x)
            feat = self.feat.pop()
            out = self.criterion(LossInputs(logits, self.y, t_logits, feat, t_feat))
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.opt.step()
        finally:
            quant_mod.binary_sign, quant_mod.approx_sign_backward = saved


def interleaved_times(
    steps: Dict[str, Callable[[], None]], rounds: int, warmup: int, on_round: Optional[Callable[[int], None]] = None
) -> Dict[str, List[float]]:
    """Seconds of each call of every step: ``warmup`` untimed calls of each, then ``rounds`` rounds
    of one timed call of each, in an order rotated by one every round (no fixed neighbour).
    ``on_round(r)`` is called after round ``r`` (0-based)."""
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for step in steps.values():
        for _ in range(warmup):
            step()
    for r in range(rounds):
        order = list(steps)[r % len(steps) :] + list(steps)[: r % len(steps)]
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
        if on_round is not None:
            on_round(r)
    return times
