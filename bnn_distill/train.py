"""Training: one :class:`Trainer` for every stage, and :func:`run_recipe` for the whole pipeline.

A run folder (``output_dir/name``, laid out by :class:`~bnn_distill.rundir.RunDir`) holds the
resolved recipe, the metrics of every epoch (with every loss term), each stage's last and best
checkpoints, the curves and, at the end, the summary. The last checkpoint is written atomically
after every epoch with everything needed to continue: resuming re-seeds every epoch from
(seed, stage, epoch), so a resumed CPU run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import platform
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as ddp
from .checkpoint import (
    FORMAT,
    atomic_save,
    atomic_write_bytes,
    keep_quantizers,
    load_checkpoint,
    load_model_state,
    state_dict_of,
)
from .errors import CheckpointError, Interrupted, UserError
from .evaluate import evaluate
from .hooks import FeatureHook, get_module
from .losses import Criterion, LossInputs, Term
from .models import create_model, default_feature_layer
from .quant import init_binary_scales, set_tau, tau_at
from .recipe import ModelConfig, Recipe, StageConfig
from .rundir import CURVES_FILE, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, RunDir  # noqa: F401 - re-exported
from .schedule import lr_at

log = logging.getLogger(__name__)

# RECIPE_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE, read_metrics and write_metrics stay importable
# from here for older callers; the run folder's layout lives in :class:`~bnn_distill.rundir.RunDir`.
# Interrupted lives in :mod:`bnn_distill.errors` (the CLI checks for it without importing torch).


class TrainingDiverged(UserError):
    """A loss became NaN or Inf; the stage stops, the last good checkpoint stays."""


class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop saves and stops at the next step.

    A second SIGINT falls back to Python's default (immediate ``KeyboardInterrupt``).
    """

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self.exit_code = 130
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = name
        self.exit_code = 128 + signum
        log.warning("%s received: saving progress at the next step (Ctrl-C again to abort at once)", name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------- execution: device, AMP, DDP


@dataclass
class Execution:
    """Where and how a run executes: device, mixed precision (AMP), process group (DDP), memory
    layout, progress bars. (Not the CLI's ``--runtime``, which chooses an exported ONNX graph.)"""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    dist: ddp.DistInfo
    progress: bool = True
    # channels_last on CPU: oneDNN's convolutions run the ResNet-20 W1A1 step ~20% faster and the
    # teacher's forward ~20% faster than in NCHW (benchmarks/results/train_cost.md); the values
    # agree within float rounding. CUDA keeps NCHW until it is measured there (benchmarks/gpu_check.py).
    memory_format: torch.memory_format = torch.contiguous_format

    @staticmethod
    def create(recipe: Recipe, progress: bool = True) -> "Execution":
        want = recipe.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device: '{recipe.device}' asked for CUDA but no GPU is visible; use device: auto or cpu")
        use_cuda = want.startswith("cuda")
        info = ddp.init_distributed(use_cuda)
        device = torch.device(f"cuda:{info.local_rank}" if use_cuda and info.enabled else want)
        amp_dtype = None
        if use_cuda and recipe.amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if use_cuda:
            torch.backends.cudnn.benchmark = True
        fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        return Execution(device, amp_dtype, info, progress and info.is_main, fmt)

    def layout(self, module: nn.Module) -> nn.Module:
        """``module`` on this device, its 4-d parameters and buffers in :attr:`memory_format`."""
        return module.to(self.device, memory_format=self.memory_format)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A batch of images (B, C, H, W) in :attr:`memory_format` and labels (B,), on this device."""
        return (
            x.to(self.device, non_blocking=True, memory_format=self.memory_format),
            y.to(self.device, non_blocking=True),
        )

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for float16 autocast; a pass-through otherwise (bfloat16 and float32 need none)."""
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel under torchrun, else ``module`` itself."""
        if not self.dist.enabled:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def all_agree(self, *flags: bool) -> Tuple[bool, ...]:
        """Each flag true on every process (one collective under torchrun; as given otherwise)."""
        if not self.dist.enabled:
            return tuple(flags)
        t = torch.tensor([int(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return tuple(bool(v) for v in t)


# ---------------------------------------------------------------- models from the recipe


def model_spec_dict(recipe: Recipe, cfg: ModelConfig, quant: str, num_classes: int, in_chans: int) -> Dict[str, Any]:
    """The keyword arguments of :func:`create_model` for one model of the recipe, as the plain dict
    stored under ``"model_spec"`` in checkpoints (so they can be rebuilt). Not a
    :class:`bnn_distill.models.ModelSpec`."""
    b = recipe.binary
    spec: Dict[str, Any] = dict(
        name=cfg.arch, num_classes=num_classes, in_chans=in_chans, quant=quant, width_mult=cfg.width_mult
    )
    if quant != "FP":
        spec.update(
            weight_scale=b.weight_scale, recu=b.recu, weight_gradient=b.weight_gradient, act_gradient=b.act_gradient
        )
    spec.update({k: v for k, v in cfg.model_kwargs().items() if v is not None})
    return spec


#: The former name of :func:`model_spec_dict` (still imported by callers outside this module).
model_spec = model_spec_dict


def build_model(spec: Dict[str, Any]) -> nn.Module:
    return create_model(**spec)


def feature_layer(cfg: ModelConfig) -> str:
    return cfg.feature_layer or default_feature_layer(cfg.arch, cfg.head_norm)


def init_from_state(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Load real-valued weights (a teacher's or an earlier stage's) into ``model``; binary scales the
    weights do not have start at mean |w| per output channel (what ``init_from`` does)."""
    missing_q = load_model_state(model, state, what, allow_quant_missing=True)
    convs = {k.split(".weight_quant.")[0] for k in missing_q if ".alpha" in k}
    init_binary_scales(model, only_missing=convs)


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


# ---------------------------------------------------------------- one stage


@dataclass
class StageResult:
    name: str
    kind: str
    quant: str
    epochs: int
    final: Dict[str, float] = field(default_factory=dict)  # the last epoch's weights: test (and val) metrics
    best_top1: float = float("nan")  # best validation top-1 (nan without a validation split)
    best_epoch: int = 0  # its epoch: the weights in best.pt (0: no best.pt)
    best_test_top1: float = float("nan")  # test top-1 of the best-on-validation weights
    wall_s: float = 0.0
    images_per_s: float = float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _seed_for(seed: int, stage_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % (2**63 - 1)


class Trainer:
    """Trains one stage of a recipe: a model (teacher or student), with a frozen teacher if needed."""

    def __init__(
        self,
        recipe: Recipe,
        stage_index: int,
        model: nn.Module,
        spec: Dict[str, Any],
        teacher: Optional[nn.Module],
        train_set: Dataset,
        test_set: Dataset,
        run_dir: Union[Path, RunDir],
        ex: Execution,
        history: List[Dict[str, Any]],
        stop: Optional["StopFlag"] = None,
        val_set: Optional[Dataset] = None,
    ):
        self.recipe = recipe
        self.stage_index = stage_index
        self.stage: StageConfig = recipe.stages[stage_index]
        st = self.stage
        self.spec = spec
        self.ex = ex
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.run_dir = self.run.path
        self.ckpt_dir = self.run.checkpoint_dir(st.name)
        self.prior_history = history  # metrics of earlier stages, for metrics.jsonl
        self.model = ex.layout(model)
        self.student_feature = feature_layer(recipe.student if st.kind == "student" else recipe.teacher)
        self.teacher_feature = feature_layer(recipe.teacher)
        self.criterion = self._make_criterion(teacher, train_set)
        self.teacher = teacher
        self.teacher_hook: Optional[FeatureHook] = None
        if self.criterion.needs_teacher:
            assert teacher is not None, "recipe validation guarantees a teacher"
            self.teacher = ex.layout(teacher).eval().requires_grad_(False)
            if self.criterion.needs_features:
                self.teacher_hook = FeatureHook(self.teacher, self.teacher_feature)
        self.step_module = DistillStep(self.model, self.criterion, self.student_feature)
        self.train_module: nn.Module = ex.data_parallel(self.step_module)
        self.optimizer = _make_optimizer(st, self.step_module)
        self.scaler = ex.grad_scaler()
        self.optimise = OptimiserStep(self.optimizer, self.scaler, self.step_module, st.grad_clip)
        self.local_batch = self._local_batch(len(train_set))
        self.train_set, self.test_set = train_set, test_set
        self.steps_per_epoch = len(train_set) // st.batch_size  # drop_last: every step a full batch
        self.total_steps = self.steps_per_epoch * st.epochs
        self.schedule = StepSchedule(recipe, st, self.steps_per_epoch)
        self.test_loader = self._eval_loader(test_set)
        # best.pt is chosen on the validation split; the test split is evaluated once, at the end of the stage
        self.val_loader = self._eval_loader(val_set) if val_set is not None else None
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps completed
        self.history: List[Dict[str, Any]] = []
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.wall_s = 0.0
        # progress inside an unfinished epoch (set when a signal stops training mid-epoch)
        self.partial: Optional[Dict[str, Any]] = None
        self.stop = stop or StopFlag()
        self._stop_after_epoch = False
        self.tb = _tensorboard(self.run) if ex.dist.is_main else None

    def _make_criterion(self, teacher: Optional[nn.Module], train_set: Dataset) -> Criterion:
        """The stage's loss terms; ITRD's projection is sized from one forward pass of each model."""
        terms = [Term(t.name, t.weight, dict(t.params)) for t in self.stage.losses]
        s_dim = t_dim = None
        device = self.ex.device
        if any(t.name.startswith("itrd") for t in terms):
            s_dim = _feature_dim(self.model, self.student_feature, train_set, device)
            t_dim = _feature_dim(teacher, self.teacher_feature, train_set, device) if teacher is not None else None
        # the projection's initialisation, whatever ran before
        torch.manual_seed(_seed_for(self.recipe.seed, self.stage_index, 10**6 + 1))
        return Criterion(terms, s_dim, t_dim).to(device)

    def _local_batch(self, n_train: int) -> int:
        """This process's share of the stage's batch, after checking the batch fits the data and the processes."""
        st, i, world = self.stage, self.stage_index, self.ex.dist.world_size
        if st.batch_size % world:
            raise UserError(f"stages[{i}].batch_size: {st.batch_size} is not divisible by the {world} processes")
        if n_train < st.batch_size:
            raise UserError(
                f"stages[{i}].batch_size: {st.batch_size} is larger than the {n_train} training images; lower it"
            )
        return st.batch_size // world

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=max(self.local_batch, 256),
            shuffle=False,
            num_workers=self.recipe.data.num_workers,
            pin_memory=self.ex.device.type == "cuda",
        )

    def _evaluate(self, loader: DataLoader, split: str, model: Optional[nn.Module] = None) -> Dict[str, float]:
        ev = evaluate(model or self.model, loader, self.ex.device, self.ex.amp_dtype)
        return {f"{split}_top1": ev["top1"], f"{split}_top5": ev["top5"], f"{split}_loss": ev["loss"]}

    # -- state

    def state(self, complete: bool) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "last",
            "stage": self.stage.name,
            "stage_index": self.stage_index,
            "recipe": self.recipe.to_dict(),
            "fingerprint": self.recipe.fingerprint(),
            "model_spec": self.spec,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "wall_s": self.wall_s,
            "complete": complete,
            "partial": self.partial,
        }

    def load_state(self, ck: Dict[str, Any]) -> None:
        load_model_state(self.model, ck["model"], f"checkpoint of stage '{self.stage.name}'")
        with keep_quantizers():
            self.criterion.load_state_dict(ck["criterion"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.history = list(ck["history"])
        self.best_top1, self.best_epoch = float(ck["best_top1"]), int(ck["best_epoch"])
        self.wall_s = float(ck["wall_s"])
        self.partial = ck.get("partial")

    # -- loop

    def fit(self) -> StageResult:
        """Train the stage's remaining epochs: train, evaluate, keep the best, save, log."""
        st = self.stage
        trained = {id(p) for p in self.step_module.parameters() if p.requires_grad}
        stepped = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        assert trained == stepped, "optimiser parameters are not the model's (a load replaced parameters)"
        if self.epoch >= st.epochs:
            return self.result()
        if self.epoch or self.partial:
            at = f", step {self.partial['batch']} of epoch {self.epoch + 1}" if self.partial else ""
            log.info("[%s] resuming after epoch %d/%d%s", st.name, self.epoch, st.epochs, at)
        while self.epoch < st.epochs:
            t0 = time.perf_counter()
            train_metrics = self._train_epoch()
            t0 -= train_metrics.pop("resumed_elapsed")
            epoch = self.epoch + 1
            last = epoch == st.epochs
            record: Dict[str, Any] = {"stage": st.name, "epoch": epoch, "step": self.step + 0, **train_metrics}
            record = self._evaluate_epoch(record, epoch, last)
            self.wall_s += time.perf_counter() - t0
            record["wall_s"] = round(self.wall_s, 3)
            self.epoch = epoch
            improved = "val_top1" in record and record["val_top1"] > self.best_top1
            if improved:
                self.best_top1, self.best_epoch = record["val_top1"], epoch
            if last and self.best_epoch:  # and the best-on-validation weights
                record = self._with_best_test(record, improved)
            self.history.append(record)
            if self.ex.dist.is_main:
                self._save(complete=last, best=improved)
                self._log(record)
            ddp.barrier(self.ex.dist)
            if self._stop_after_epoch and not last:
                self._interrupt(f"after epoch {epoch}", save=False)
        return self.result()

    def _evaluate_epoch(self, record: Dict[str, Any], epoch: int, last: bool) -> Dict[str, Any]:
        """``record`` with the validation metrics (every ``eval_every`` epochs) and, at the last
        epoch, the test metrics; evaluated by the main process, the same on every process."""
        if last or (self.val_loader is not None and epoch % self.stage.eval_every == 0):
            if self.ex.dist.is_main:
                if self.val_loader is not None:
                    record.update(self._evaluate(self.val_loader, "val"))
                if last:  # the test split, once: the final weights
                    record.update(self._evaluate(self.test_loader, "test"))
            record = ddp.broadcast_object(record, self.ex.dist)
        return record

    def _with_best_test(self, record: Dict[str, Any], improved: bool) -> Dict[str, Any]:
        """``record`` with ``best_test_top1``: the test top-1 of the best-on-validation weights
        (the last epoch's own when they are the best, else best.pt's)."""
        if self.ex.dist.is_main:
            # best_epoch == epoch only when this epoch improved: no separate check for it
            record["best_test_top1"] = record["test_top1"] if improved else self._best_test_top1()
        return ddp.broadcast_object(record, self.ex.dist)

    def _best_test_top1(self) -> float:
        """Test top-1 of the weights in best.pt (chosen on the validation split)."""
        path = self.run.best(self.stage.name)
        best = load_checkpoint(path, map_location=self.ex.device)
        model = build_model(self.spec).to(self.ex.device)
        load_model_state(model, best["model"], f"checkpoint '{path}'")
        return self._evaluate(self.test_loader, "test", model)["test_top1"]

    def result(self) -> StageResult:
        last = self.history[-1] if self.history else {}
        ips = [h["images_per_s"] for h in self.history if "images_per_s" in h]
        keys = ("test_top1", "test_top5", "test_loss", "val_top1", "val_top5", "val_loss")
        return StageResult(
            self.stage.name,
            self.stage.kind,
            self.stage.quant,
            self.stage.epochs,
            {k: last[k] for k in keys if k in last},
            self.best_top1 if self.best_epoch else float("nan"),
            self.best_epoch,
            float(last.get("best_test_top1", float("nan"))),
            round(self.wall_s, 3),
            float(sum(ips) / len(ips)) if ips else float("nan"),
        )

    def _loader(self, start_batch: int = 0) -> DataLoader:
        """This epoch's batches from ``start_batch`` on, in an order fixed by (seed, stage, epoch)."""
        seed = _seed_for(self.recipe.seed, self.stage_index, self.epoch)
        g = torch.Generator().manual_seed(seed)
        dist = self.ex.dist
        if dist.enabled:
            sampler = DistributedSampler(
                self.train_set, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True
            )
            sampler.set_epoch(0)
            order = list(sampler)
        else:
            order = torch.randperm(len(self.train_set), generator=g).tolist()
        order = order[start_batch * self.local_batch : self.steps_per_epoch * self.local_batch]
        set_seed = getattr(self.train_set, "set_epoch_seed", None)
        if set_seed is not None:  # per-sample augmentation seeds: exact mid-epoch resume
            set_seed(seed)
        return DataLoader(
            self.train_set,
            batch_size=self.local_batch,
            sampler=order,
            drop_last=True,
            num_workers=self.recipe.data.num_workers,
            generator=g,
            pin_memory=self.ex.device.type == "cuda",
            persistent_workers=False,
        )

    def _train_epoch(self) -> Dict[str, Any]:
        """One epoch (or the rest of a stopped one): for each batch, teacher outputs, the student's
        step, the finite/stop checks, the tally; returns the epoch's train metrics."""
        st = self.stage
        # Every epoch starts from RNG state (seed, stage, epoch): resume-exact without saving RNG.
        torch.manual_seed(_seed_for(self.recipe.seed, self.stage_index, self.epoch) + 1)
        self.model.train()
        self.criterion.train()
        tally = EpochTally(self.partial, self.ex.device)
        self.partial = None
        bar = ProgressBar(
            self._loader(tally.start),
            self.ex.progress,
            f"{st.name} {self.epoch + 1}/{st.epochs}",
            self.steps_per_epoch,
            tally.start,
        )
        tally.start_clock()
        lr = self.schedule.lr(self.step)
        stop = False
        for i, (x, y) in enumerate(bar, start=tally.start):
            if stop:  # every process agreed to stop after the previous step: save before this one
                self.partial = tally.partial(i)
                bar.close()
                self._interrupt(f"epoch {self.epoch + 1}, step {i}")
            x, y = self.ex.batch(x, y)
            lr = self.schedule.apply(self.step, self.optimizer, self.model)
            out = self._forward(x, y)
            # the forward pass has updated BatchNorm statistics, so a stop request is honoured only
            # after this step completes (saving now and redoing the batch would count it twice)
            finite, stop = self._step_checks(out)
            if not finite:
                self._diverged(out)
            self.optimise(out["loss"])
            self.step += 1
            tally.add(out, y)
            bar.show(i, out["loss"], lr)
        bar.close()
        metrics = tally.metrics(lr, self.steps_per_epoch, self.ex)
        self._stop_after_epoch = stop
        if self.schedule.recu:
            metrics["tau"] = self.schedule.tau(self.step)
        return metrics

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The frozen teacher's outputs (if the losses need them), then the student and its losses."""
        t_logits = t_feat = None
        with self.ex.autocast():
            if self.criterion.needs_teacher:
                t_logits, t_feat = self._teacher_outputs(x)
            return self.train_module(x, y, t_logits, t_feat)

    def _teacher_outputs(self, x: torch.Tensor):
        """The frozen teacher's (logits (B, classes), hooked feature (B, d_t) or None), computed
        under ``inference_mode`` (no autograd bookkeeping at all) and cloned out of it, so the
        losses may save them for the student's backward pass."""
        assert self.teacher is not None
        with torch.inference_mode():
            logits = self.teacher(x)
            feat = self.teacher_hook.pop() if self.teacher_hook is not None else None
        return logits.clone(), (feat.clone() if feat is not None else None)

    def _step_checks(self, out: Dict[str, torch.Tensor]):
        """(loss finite on every process, stop requested on any process): one collective per step."""
        finite, go_on = self.ex.all_agree(bool(torch.isfinite(out["loss"]).item()), self.stop.signal is None)
        return finite, not go_on

    def _interrupt(self, where: str, save: bool = True) -> None:
        last = self.run.last(self.stage.name)
        if save and self.ex.dist.is_main:
            atomic_save(self.state(complete=False), last)
        ddp.barrier(self.ex.dist)
        raise Interrupted(
            f"stopped by {self.stop.signal or 'a signal'} in stage '{self.stage.name}', {where}; "
            f"progress saved to {last}",
            self.stop.exit_code,
        )

    def _diverged(self, out: Dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in out.items() if k not in ("logits", "loss") and not torch.isfinite(v).all()]
        where = f"term '{bad[0]}'" if bad else "the total"
        last = self.run.last(self.stage.name)
        keep = f"; the last good checkpoint is {last}" if last.exists() else ""
        raise TrainingDiverged(
            f"stage '{self.stage.name}': the loss became non-finite at step {self.step + 1} (epoch {self.epoch + 1}) "
            f"in {where}{keep}; lower the learning rate or that term's weight, or set grad_clip"
        )

    def _save(self, complete: bool, best: bool) -> None:
        state = self.state(complete)
        if best:  # before last.pt: a last.pt that names a best epoch always has its best.pt on disk
            atomic_save(
                {
                    k: state[k]
                    for k in (
                        "format",
                        "stage",
                        "stage_index",
                        "recipe",
                        "fingerprint",
                        "model_spec",
                        "model",
                        "epoch",
                        "best_top1",
                    )
                }
                | {"kind": "best"},
                self.run.best(self.stage.name),
            )
        atomic_save(state, self.run.last(self.stage.name))
        self.run.write_metrics(self.prior_history + self.history)

    def _log(self, r: Dict[str, Any]) -> None:
        terms = " ".join(f"{k}={v:.4f}" for k, v in r["train"].items())
        test = f" test_top1={r['test_top1']:.2f}%" if "test_top1" in r else ""
        log.info(
            "[%s] epoch %d/%d %s train_top1=%.2f%%%s lr=%.4g %.0f img/s",
            r["stage"],
            r["epoch"],
            self.stage.epochs,
            terms,
            r["train_top1"],
            test,
            r["lr"],
            r["images_per_s"],
        )
        if self.tb is not None:
            g = self.step
            for k, v in r["train"].items():
                self.tb.add_scalar(f"{r['stage']}/train/{k}", v, g)
            if "test_top1" in r:
                self.tb.add_scalar(f"{r['stage']}/test/top1", r["test_top1"], g)
            self.tb.flush()


def _feature_dim(model: nn.Module, path: str, dataset: Dataset, device: torch.device) -> int:
    """Width of the hooked feature, from one forward pass on two real samples."""
    hook = FeatureHook(model, path)
    was = model.training
    model.eval()
    try:
        x = torch.stack([dataset[0][0], dataset[1][0]]).to(device)
        with torch.no_grad():
            model.to(device)(x)
        return int(hook.pop().shape[1])
    finally:
        hook.remove()
        model.train(was)


def _make_optimizer(st: StageConfig, module: nn.Module) -> torch.optim.Optimizer:
    o = st.optimizer
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # no weight decay on BatchNorm, biases and binary scales (decaying them only shrinks outputs)
        (no_decay if p.dim() <= 1 or name.endswith(".alpha") else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)


def _tensorboard(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run.tensorboard_dir))


def write_metrics(run_dir: Union[Path, RunDir], records: List[Dict[str, Any]]) -> None:
    """See :meth:`RunDir.write_metrics`."""
    RunDir(run_dir).write_metrics(records)


def read_metrics(run_dir: Union[Path, RunDir]) -> List[Dict[str, Any]]:
    """See :meth:`RunDir.read_metrics`."""
    return RunDir(run_dir).read_metrics()


# ---------------------------------------------------------------- the pipeline


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> Path:
    """Create the run folder, or check that ``--resume`` continues the same recipe there."""
    run = RunDir.of(recipe)
    run_dir = run.path
    if resume:
        if not run.recipe_file.exists():
            raise UserError(
                f"--resume: '{run_dir}' holds no run to resume (no {RECIPE_FILE}); start it without --resume"
            )
        from .recipe import load_recipe

        try:
            old = load_recipe(run.recipe_file)
        except UserError as e:
            raise UserError(
                f"--resume: the saved recipe cannot be read ({e}); start a new run with another name"
            ) from None
        if old.fingerprint() != recipe.fingerprint() and not force:
            raise UserError(
                f"--resume: the recipe differs from the one '{run_dir}' was started with; "
                "resume with the same recipe, or pass --force to continue with the new one"
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"run folder '{run_dir}' already holds a run; pass --resume to continue it, "
            f"or choose another name (--set name=NEW) or output_dir"
        )
    return run_dir


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Run every stage of ``recipe``; return the contents of ``summary.json``."""
    ex = Execution.create(recipe, progress)
    t_start = time.perf_counter()
    stop = StopFlag()
    stop.install()
    try:
        splits = _setup_run(recipe, ex, resume, force)
        stages = _Stages(recipe, ex, splits, stop)
        for i in range(len(recipe.stages)):
            stages.run_stage(i, resume)
        summary = _summary(recipe, ex, stages, splits.info.name, t_start)
        if ex.dist.is_main:
            _write_results(RunDir.of(recipe), recipe, summary, stages.history)
        return summary
    finally:
        stop.restore()
        ddp.cleanup(ex.dist)


def _setup_run(recipe: Recipe, ex: Execution, resume: bool, force: bool):
    """Check the run folder, load the data splits, then save the resolved recipe; returns the splits."""
    from .data import build_splits

    run = RunDir.of(recipe)
    if ex.dist.is_main:
        prepare_run_dir(recipe, resume, force)  # checks only: nothing is written before the data loads
    torch.manual_seed(recipe.seed)
    d = recipe.data
    splits = build_splits(
        d.dataset,
        d.root,
        d.download,
        d.augment,
        d.limit_train,
        d.limit_test,
        seed=recipe.seed,
        val_size=d.val_size,
        val_fraction=d.val_fraction,
        val_seed=d.val_seed,
    )
    if splits.val is None and ex.dist.is_main:
        log.info("no validation split (data.val_size): best.pt is not kept, the last epoch's weights are the result")
    if ex.dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if not resume or force:
            atomic_write_bytes(run.recipe_file, recipe.to_yaml().encode())
    ddp.barrier(ex.dist)
    info = splits.info
    log.info(
        "data: %s, %d train / %s validation / %d test images, %d classes, device %s%s",
        info.name,
        len(splits.train),
        len(splits.val) if splits.val is not None else "no",
        len(splits.test),
        info.num_classes,
        ex.device,
        f", {ex.dist.world_size} processes" if ex.dist.enabled else "",
    )
    return splits


class _Stages:
    """The stages of a run, one after the other, and what passes between them: the teacher, each
    stage's final weights (for ``init_from``), the metrics so far and the stage results."""

    def __init__(self, recipe: Recipe, ex: Execution, splits, stop: StopFlag):
        self.recipe, self.ex, self.splits, self.stop = recipe, ex, splits, stop
        self.run = RunDir.of(recipe)
        self.history: List[Dict[str, Any]] = []
        self.results: List[StageResult] = []
        self.teacher: Optional[nn.Module] = None
        self.teacher_eval: Optional[Dict[str, float]] = None
        self.final_states: Dict[str, Dict[str, Any]] = {}
        if recipe.teacher.checkpoint is not None or recipe.teacher.pretrained:
            self.teacher = load_teacher(recipe, self._spec(recipe.teacher, "FP"))

    def _spec(self, cfg: ModelConfig, quant: str) -> Dict[str, Any]:
        info = self.splits.info
        return model_spec_dict(self.recipe, cfg, quant, info.num_classes, info.in_chans)

    def run_stage(self, i: int, resume: bool) -> None:
        """Set up stage ``i``, resume or initialise it, train it, keep its result."""
        st = self.recipe.stages[i]
        trainer = self._trainer(i)
        self._resume_or_init(trainer, resume)
        result = trainer.fit()
        if trainer._stop_after_epoch and i + 1 < len(self.recipe.stages):  # agreed by every process
            raise Interrupted(
                f"stopped by {self.stop.signal or 'a signal'} after stage '{st.name}'; its checkpoint is complete",
                self.stop.exit_code,
            )
        self._keep(trainer, result)

    def _trainer(self, i: int) -> Trainer:
        """Stage ``i``'s model, built from a seed of its own, in its :class:`Trainer`."""
        st = self.recipe.stages[i]
        cfg = self.recipe.teacher if st.kind == "teacher" else self.recipe.student
        spec = self._spec(cfg, st.quant)
        torch.manual_seed(_seed_for(self.recipe.seed, i, 10**6))
        model = build_model(spec)
        get_module(model, feature_layer(cfg), f"{'teacher' if st.kind == 'teacher' else 'student'}.feature_layer")
        s = self.splits
        return Trainer(
            self.recipe,
            i,
            model,
            spec,
            self.teacher if st.kind == "student" else None,
            s.train,
            s.test,
            self.run,
            self.ex,
            self.history,
            self.stop,
            val_set=s.val,
        )

    def _resume_or_init(self, trainer: Trainer, resume: bool) -> None:
        """Continue from the stage's last checkpoint (``--resume``) or initialise it (``init_from``)."""
        st = trainer.stage
        last = self.run.last(st.name)
        if self.ex.dist.is_main and last.parent.is_dir():
            for stale in last.parent.glob(".*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
        if resume and last.exists():
            ck = load_checkpoint(last, map_location=self.ex.device)
            if ck.get("model_spec") != trainer.spec:
                raise CheckpointError(
                    f"checkpoint '{last}' was written for another model "
                    f"({ck.get('model_spec', {}).get('name')}); resume with the recipe that wrote it"
                )
            trainer.load_state(ck)
        else:
            _init_stage(trainer, st, self.teacher, self.final_states, self.ex)

    def _keep(self, trainer: Trainer, result: StageResult) -> None:
        """Bookkeeping after a stage: its result, metrics and final weights; a teacher stage's
        model becomes the teacher of the stages after it."""
        st = trainer.stage
        self.results.append(result)
        self.history = self.history + trainer.history
        self.final_states[st.name] = {
            "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "criterion": trainer.criterion.state_dict(),
        }
        if st.kind == "teacher":
            self.teacher = trainer.model
            self.teacher_eval = result.final
        if self.ex.dist.is_main:
            best = (
                (
                    f" (best on validation: {result.best_top1:.2f}% at epoch {result.best_epoch}, "
                    f"test {result.best_test_top1:.2f}%)"
                )
                if result.best_epoch
                else ""
            )
            log.info(
                "[%s] done: test top-1 %.2f%%%s, %.0f s",
                st.name,
                result.final.get("test_top1", float("nan")),
                best,
                result.wall_s,
            )

    def teacher_metrics(self) -> Optional[Dict[str, float]]:
        """The teacher's test metrics: its stage's, else (a loaded teacher) evaluated now by the main process."""
        if self.teacher is not None and self.teacher_eval is None and self.ex.dist.is_main:
            loader = DataLoader(self.splits.test, batch_size=256, num_workers=self.recipe.data.num_workers)
            ev = evaluate(self.teacher.to(self.ex.device), loader, self.ex.device, self.ex.amp_dtype)
            self.teacher_eval = {"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]}
        return self.teacher_eval


def _summary(recipe: Recipe, ex: Execution, stages: _Stages, dataset: str, t_start: float) -> Dict[str, Any]:
    """The contents of ``summary.json``."""
    results = stages.results
    teacher_eval = stages.teacher_metrics()
    return {
        "run": recipe.name,
        "fingerprint": recipe.fingerprint(),
        "dataset": dataset,
        "teacher": {
            "arch": recipe.teacher.arch,
            "source": recipe.teacher.checkpoint or "trained",
            **(teacher_eval or {}),
        },
        "stages": [r.to_dict() for r in results],
        # training time of every stage, summed across interruptions and resumes
        "wall_s": round(sum(r.wall_s for r in results), 1),
        "process_wall_s": round(time.perf_counter() - t_start, 1),  # this process only (data loading included)
        "machine": machine_info(ex),
    }


def _write_results(run: RunDir, recipe: Recipe, summary: Dict[str, Any], history: List[Dict[str, Any]]) -> None:
    """``summary.json``, then the curves (skipped with a warning without matplotlib)."""
    atomic_write_bytes(run.summary_file, (json.dumps(summary, indent=2) + "\n").encode())
    try:
        from .plots import plot_curves

        plot_curves(history, run.curves_file, title=recipe.name)
    except ImportError as e:  # matplotlib missing: the numbers are in metrics.jsonl
        log.warning("no curves plot: %s", e)


def load_teacher(recipe: Recipe, spec: Dict[str, Any]) -> nn.Module:
    """The recipe's teacher from ``teacher.checkpoint`` (ours, or a torchvision/timm state dict) or,
    for a ``torchvision:``/``timm:`` arch with ``pretrained``, from the hub. ``head: reinit``
    re-initialises a classifier built for another number of classes (and says so in the log)."""
    from .models import classifier_keys, create_external_model

    cfg = recipe.teacher
    reinit = cfg.head == "reinit"
    if cfg.pretrained:  # recipe validation: only for torchvision:/timm: names
        teacher = create_external_model(spec["name"], spec["num_classes"], spec["in_chans"], True, reinit)
    else:
        teacher = build_model(spec)
    if cfg.checkpoint is None:
        return teacher
    what = f"teacher.checkpoint '{cfg.checkpoint}'"
    ck = load_checkpoint(cfg.checkpoint)
    if "model_spec" in ck and ck["model_spec"].get("name") != spec["name"]:
        raise CheckpointError(f"{what} is a '{ck['model_spec'].get('name')}', the recipe's teacher is '{spec['name']}'")
    state = dict(state_dict_of(ck))
    own = teacher.state_dict()
    head = classifier_keys(teacher)
    other = [k for k in head if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    body_fits = all(k in state and tuple(state[k].shape) == tuple(own[k].shape) for k in own if k not in head)
    if not body_fits:  # another architecture, not another head: load_model_state names what differs
        other = []
    if other and not reinit:
        raise CheckpointError(
            f"{what}: its classifier '{other[0]}' has shape {tuple(state[other[0]].shape)}, "
            f"this data needs {tuple(own[other[0]].shape)}; set teacher.head: reinit to "
            "re-initialise it (a teacher stage then fine-tunes it)"
        )
    if other:
        log.info(
            "teacher.head: reinit: the checkpoint's classifier has %d classes, the data %d; '%s' re-initialised",
            state[other[0]].shape[0],
            own[other[0]].shape[0],
            other[0].rpartition(".")[0],
        )
        state.update({k: own[k] for k in head})
    load_model_state(teacher, state, what)
    return teacher


def _init_stage(
    trainer: Trainer,
    st: StageConfig,
    teacher: Optional[nn.Module],
    final_states: Dict[str, Dict[str, Any]],
    ex: Execution,
) -> None:
    """Initialise a fresh stage from the teacher or an earlier stage (``init_from``); a teacher
    stage after a loaded teacher (checkpoint or hub weights) fine-tunes those weights."""
    if st.kind == "teacher" and teacher is not None:
        load_model_state(trainer.model, teacher.state_dict(), "the loaded teacher")
        log.info("[%s] fine-tuning the loaded teacher", st.name)
        return
    if st.init_from is None:
        return
    if st.init_from == "teacher":
        assert teacher is not None
        source = {k: v for k, v in teacher.state_dict().items()}
        criterion_state = None
    else:
        source = final_states[st.init_from]["model"]
        criterion_state = final_states[st.init_from]["criterion"]
    init_from_state(trainer.model, source, f"stage '{st.init_from}' weights")
    if criterion_state:
        own = trainer.criterion.state_dict()
        if own.keys() == criterion_state.keys() and all(own[k].shape == criterion_state[k].shape for k in own):
            trainer.criterion.load_state_dict(criterion_state)
    log.info("[%s] initialised from '%s'", st.name, st.init_from)


def machine_info(ex: Optional[Execution] = None) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if ex is not None:
        info["device"] = str(ex.device)
        info["world_size"] = ex.dist.world_size
        if ex.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(ex.device)
    return info
