"""The pieces of one training step: the student-plus-criterion module DDP wraps, the optimiser
step, the per-step learning rate and tau, the epoch's running sums (saved mid-epoch for resume)
and the progress bar. :class:`~bnn_distill.trainer.Trainer` composes them."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import distributed as ddp
from .execution import Execution
from .hooks import FeatureHook
from .losses import Criterion, LossInputs
from .quant import set_tau, tau_at
from .recipe import Recipe, StageConfig
from .rundir import CURVES_FILE, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, RunDir  # noqa: F401 - re-exported
from .schedule import lr_at

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the training step module


class DistillStep(nn.Module):
    """Student plus criterion as one module, so DDP sees every trained parameter in ``forward``.

    ``forward(x, labels, teacher_logits, teacher_feat)`` returns the criterion's dict of terms
    (``"loss"`` is the weighted total) plus ``"logits"``.
    """

    def __init__(self, student: nn.Module, criterion: Criterion, feature_path: Optional[str]):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.hook = FeatureHook(student, feature_path) if criterion.needs_features else None

    def forward(self, x, labels, teacher_logits=None, teacher_feat=None):
        logits = self.student(x)  # (B, classes)
        feat = self.hook.pop() if self.hook is not None else None  # (B, d_s)
        out = self.criterion(LossInputs(logits, labels, teacher_logits, feat, teacher_feat))
        out["logits"] = logits
        return out


class OptimiserStep:
    """Backward pass, optional gradient clipping and the update, through the AMP loss scaler."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        module: nn.Module,
        grad_clip: Optional[float],
    ):
        self.optimizer, self.scaler, self.module, self.grad_clip = optimizer, scaler, module, grad_clip

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


class StepSchedule:
    """The learning rate of every optimiser step and, for a ReCU W1A1 student, the tau of its
    weight quantiser (from ``binary.tau_start`` to ``tau_end`` over the stage's steps)."""

    def __init__(self, recipe: Recipe, st: StageConfig, steps_per_epoch: int):
        self.stage = st
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * st.epochs
        self.tau_start, self.tau_end = recipe.binary.tau_start, recipe.binary.tau_end
        self.recu = st.quant == "W1A1" and recipe.binary.recu and st.kind == "student"

    def lr(self, step: int) -> float:
        st = self.stage
        return lr_at(step, self.steps_per_epoch, st.epochs, st.optimizer.lr, st.schedule)

    def tau(self, step: int) -> float:
        return tau_at(step / max(1, self.total_steps - 1), self.tau_start, self.tau_end)

    def apply(self, step: int, optimizer: torch.optim.Optimizer, model: nn.Module) -> float:
        """Set step ``step``'s learning rate (and tau) before it; returns the learning rate."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.recu:
            set_tau(model, self.tau(step))
        return lr


class EpochTally:
    """One epoch's running sums (loss terms, correct, seen) and where it started: the resume
    bookkeeping. A stop mid-epoch saves :meth:`partial` in the checkpoint; :meth:`resume` continues
    from it with the same sums, so the epoch's metrics come out as if it had not stopped."""

    def __init__(self, partial: Optional[Dict[str, Any]], device: torch.device):
        part = partial or {"batch": 0, "sums": {}, "correct": 0.0, "seen": 0, "elapsed": 0.0}
        self.device = device
        self.start = int(part["batch"])  # the first batch of the epoch still to train
        self.sums: Dict[str, torch.Tensor] = {k: torch.tensor(float(v), device=device) for k, v in part["sums"].items()}
        self.correct = torch.tensor(float(part["correct"]), device=device)
        self.seen = int(part["seen"])
        self.resumed_elapsed = float(part["elapsed"])  # seconds the epoch ran before it was stopped
        self.t0 = time.perf_counter() - self.resumed_elapsed

    def start_clock(self) -> None:
        self.t0 = time.perf_counter() - self.resumed_elapsed

    def add(self, out: Dict[str, torch.Tensor], y: torch.Tensor) -> None:
        """Count one step's loss terms and correct predictions (no host sync)."""
        with torch.no_grad():
            for k, v in out.items():
                if k != "logits":
                    self.sums[k] = self.sums.get(k, torch.zeros((), device=self.device)) + v.detach().float()
            self.correct += (out["logits"].argmax(1) == y).sum()
        self.seen += y.numel()

    def partial(self, batch: int) -> Dict[str, Any]:
        """What a checkpoint saved before batch ``batch`` needs to continue the epoch."""
        return {
            "batch": batch,
            "sums": {k: float(v) for k, v in self.sums.items()},
            "correct": float(self.correct),
            "seen": self.seen,
            "elapsed": time.perf_counter() - self.t0,
        }

    def metrics(self, lr: float, steps_per_epoch: int, ex: Execution) -> Dict[str, Any]:
        """The epoch's train metrics, summed over every process (one collective)."""
        elapsed = time.perf_counter() - self.t0
        keys = sorted(self.sums)
        packed = torch.stack(
            [self.sums[k] for k in keys] + [self.correct.float(), torch.tensor(float(self.seen), device=self.device)]
        )
        ddp.all_reduce_sum(packed, ex.dist)
        total_seen = packed[-1].item()
        steps_all = float(steps_per_epoch * ex.dist.world_size)
        metrics: Dict[str, Any] = {"lr": lr, "train": {k: packed[j].item() / steps_all for j, k in enumerate(keys)}}
        metrics["train_top1"] = 100.0 * packed[-2].item() / max(1.0, total_seen)
        metrics["images_per_s"] = total_seen / max(elapsed, 1e-9)
        metrics["resumed_elapsed"] = self.resumed_elapsed
        return metrics


class ProgressBar:
    """tqdm over an epoch's batches when progress bars are on; otherwise the batches themselves."""

    def __init__(self, loader: DataLoader, enabled: bool, desc: str, total: int, initial: int):
        self.bar = None
        self.batches: Any = loader
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, total=total, initial=initial)
            self.batches = self.bar

    def __iter__(self):
        return iter(self.batches)

    def show(self, i: int, loss: torch.Tensor, lr: float) -> None:
        if self.bar is not None and i % 10 == 0:
            self.bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
