"""Training: one :class:`Trainer` for every stage, and :func:`run_recipe` for the whole pipeline.

A run folder (``output_dir/name``) holds the resolved recipe, ``metrics.jsonl`` (one line per
epoch with every loss term), ``checkpoints/<stage>/{last,best}.pt``, ``curves.png`` and, at the
end, ``summary.json``. ``last.pt`` is written atomically after every epoch with everything needed
to continue: resuming re-seeds every epoch from (seed, stage, epoch), so a resumed CPU run ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as ddp
from .checkpoint import (FORMAT, atomic_save, atomic_write_bytes, keep_quantizers, load_checkpoint, load_model_state,
                         state_dict_of)
from .errors import CheckpointError, UserError
from .evaluate import evaluate
from .hooks import FeatureHook, get_module
from .losses import Criterion, LossInputs, Term
from .models import create_model, default_feature_layer
from .quant import init_binary_scales, set_tau, tau_at
from .recipe import ModelConfig, Recipe, StageConfig
from .schedule import lr_at

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"


class TrainingDiverged(UserError):
    """A loss became NaN or Inf; the stage stops, the last good checkpoint stays."""


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped training after saving its progress; ``--resume`` continues."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


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


# ---------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where and how a run executes: device, mixed precision, process group, progress bars."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    dist: ddp.DistInfo
    progress: bool = True
    # channels_last on CPU: oneDNN's convolutions run the ResNet-20 W1A1 step ~20% faster and the
    # teacher's forward ~20% faster than in NCHW (benchmarks/results/train_cost.md); the values
    # agree within float rounding. CUDA keeps NCHW until it is measured there (benchmarks/gpu_check.py).
    memory_format: torch.memory_format = torch.contiguous_format

    @staticmethod
    def create(recipe: Recipe, progress: bool = True) -> "Runtime":
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
        return Runtime(device, amp_dtype, info, progress and info.is_main, fmt)

    def layout(self, module: nn.Module) -> nn.Module:
        """``module`` on this device, its 4-d parameters and buffers in :attr:`memory_format`."""
        return module.to(self.device, memory_format=self.memory_format)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


# ---------------------------------------------------------------- models from the recipe


def model_spec(recipe: Recipe, cfg: ModelConfig, quant: str, num_classes: int, in_chans: int) -> Dict[str, Any]:
    """Everything :func:`create_model` needs; stored in checkpoints so they can be rebuilt."""
    b = recipe.binary
    spec: Dict[str, Any] = dict(name=cfg.arch, num_classes=num_classes, in_chans=in_chans, quant=quant,
                                width_mult=cfg.width_mult)
    if quant != "FP":
        spec.update(weight_scale=b.weight_scale, recu=b.recu, weight_gradient=b.weight_gradient,
                    act_gradient=b.act_gradient)
    spec.update({k: v for k, v in cfg.model_kwargs().items() if v is not None})
    return spec


def build_model(spec: Dict[str, Any]) -> nn.Module:
    return create_model(**spec)


def feature_layer(cfg: ModelConfig) -> str:
    return cfg.feature_layer or default_feature_layer(cfg.arch, cfg.head_norm)


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

    def __init__(self, recipe: Recipe, stage_index: int, model: nn.Module, spec: Dict[str, Any],
                 teacher: Optional[nn.Module], train_set: Dataset, test_set: Dataset,
                 run_dir: Path, rt: Runtime, history: List[Dict[str, Any]], stop: Optional["StopFlag"] = None,
                 val_set: Optional[Dataset] = None):
        self.recipe = recipe
        self.stage_index = stage_index
        self.stage: StageConfig = recipe.stages[stage_index]
        self.spec = spec
        self.rt = rt
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints" / self.stage.name
        self.prior_history = history  # metrics of earlier stages, for metrics.jsonl
        self.model = rt.layout(model)
        st = self.stage
        terms = [Term(t.name, t.weight, dict(t.params)) for t in st.losses]
        s_dim = t_dim = None
        self.student_feature = feature_layer(recipe.student if st.kind == "student" else recipe.teacher)
        self.teacher_feature = feature_layer(recipe.teacher)
        if any(t.name.startswith("itrd") for t in terms):
            s_dim = _feature_dim(model, self.student_feature, train_set, rt.device)
            t_dim = _feature_dim(teacher, self.teacher_feature, train_set, rt.device) if teacher is not None else None
        torch.manual_seed(_seed_for(recipe.seed, stage_index, 10**6 + 1))  # projection init, whatever ran before
        self.criterion = Criterion(terms, s_dim, t_dim).to(rt.device)
        self.teacher = teacher
        self.teacher_hook: Optional[FeatureHook] = None
        if self.criterion.needs_teacher:
            assert teacher is not None, "recipe validation guarantees a teacher"
            self.teacher = rt.layout(teacher).eval().requires_grad_(False)
            if self.criterion.needs_features:
                self.teacher_hook = FeatureHook(self.teacher, self.teacher_feature)
        self.step_module = DistillStep(self.model, self.criterion, self.student_feature)
        self.train_module: nn.Module = self.step_module
        if rt.dist.enabled:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        self.optimizer = _make_optimizer(st, self.step_module)
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
        if st.batch_size % rt.dist.world_size:
            raise UserError(f"stages[{stage_index}].batch_size: {st.batch_size} is not divisible by the {rt.dist.world_size} processes")
        self.local_batch = st.batch_size // rt.dist.world_size
        self.train_set, self.test_set = train_set, test_set
        if len(train_set) < st.batch_size:
            raise UserError(f"stages[{stage_index}].batch_size: {st.batch_size} is larger than the {len(train_set)} training images; lower it")
        self.steps_per_epoch = len(train_set) // st.batch_size  # drop_last: every step a full batch
        self.total_steps = self.steps_per_epoch * st.epochs
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
        self.tb = _tensorboard(run_dir) if rt.dist.is_main else None

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=max(self.local_batch, 256), shuffle=False,
                          num_workers=self.recipe.data.num_workers, pin_memory=self.rt.device.type == "cuda")

    def _evaluate(self, loader: DataLoader, split: str, model: Optional[nn.Module] = None) -> Dict[str, float]:
        ev = evaluate(model or self.model, loader, self.rt.device, self.rt.amp_dtype)
        return {f"{split}_top1": ev["top1"], f"{split}_top5": ev["top5"], f"{split}_loss": ev["loss"]}

    # -- state

    def state(self, complete: bool) -> Dict[str, Any]:
        return {
            "format": FORMAT, "kind": "last", "stage": self.stage.name, "stage_index": self.stage_index,
            "recipe": self.recipe.to_dict(), "fingerprint": self.recipe.fingerprint(), "model_spec": self.spec,
            "model": self.model.state_dict(), "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "history": self.history,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "wall_s": self.wall_s,
            "complete": complete, "partial": self.partial,
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
            record: Dict[str, Any] = {"stage": st.name, "epoch": epoch, "step": self.step + 0, **train_metrics}
            last = epoch == st.epochs
            if last or (self.val_loader is not None and epoch % st.eval_every == 0):
                if self.rt.dist.is_main:
                    if self.val_loader is not None:
                        record.update(self._evaluate(self.val_loader, "val"))
                    if last:  # the test split, once: the final weights
                        record.update(self._evaluate(self.test_loader, "test"))
                record = ddp.broadcast_object(record, self.rt.dist)
            self.wall_s += time.perf_counter() - t0
            record["wall_s"] = round(self.wall_s, 3)
            self.epoch = epoch
            improved = "val_top1" in record and record["val_top1"] > self.best_top1
            if improved:
                self.best_top1, self.best_epoch = record["val_top1"], epoch
            if last and self.best_epoch and self.rt.dist.is_main:  # and the best-on-validation weights
                record["best_test_top1"] = record["test_top1"] if improved or self.best_epoch == epoch \
                    else self._best_test_top1()
            record = ddp.broadcast_object(record, self.rt.dist) if last and self.best_epoch else record
            self.history.append(record)
            if self.rt.dist.is_main:
                self._save(complete=epoch == st.epochs, best=improved)
                self._log(record)
            ddp.barrier(self.rt.dist)
            if self._stop_after_epoch and epoch < st.epochs:
                self._interrupt(f"after epoch {epoch}", save=False)
        return self.result()

    def _best_test_top1(self) -> float:
        """Test top-1 of the weights in best.pt (chosen on the validation split)."""
        best = load_checkpoint(self.ckpt_dir / "best.pt", map_location=self.rt.device)
        model = build_model(self.spec).to(self.rt.device)
        load_model_state(model, best["model"], f"checkpoint '{self.ckpt_dir / 'best.pt'}'")
        return self._evaluate(self.test_loader, "test", model)["test_top1"]

    def result(self) -> StageResult:
        last = self.history[-1] if self.history else {}
        ips = [h["images_per_s"] for h in self.history if "images_per_s" in h]
        keys = ("test_top1", "test_top5", "test_loss", "val_top1", "val_top5", "val_loss")
        return StageResult(self.stage.name, self.stage.kind, self.stage.quant, self.stage.epochs,
                           {k: last[k] for k in keys if k in last},
                           self.best_top1 if self.best_epoch else float("nan"), self.best_epoch,
                           float(last.get("best_test_top1", float("nan"))), round(self.wall_s, 3),
                           float(sum(ips) / len(ips)) if ips else float("nan"))

    def _loader(self, start_batch: int = 0) -> DataLoader:
        """This epoch's batches from ``start_batch`` on, in an order fixed by (seed, stage, epoch)."""
        seed = _seed_for(self.recipe.seed, self.stage_index, self.epoch)
        g = torch.Generator().manual_seed(seed)
        if self.rt.dist.enabled:
            sampler = DistributedSampler(self.train_set, self.rt.dist.world_size, self.rt.dist.rank,
                                         shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(0)
            order = list(sampler)
        else:
            order = torch.randperm(len(self.train_set), generator=g).tolist()
        order = order[start_batch * self.local_batch: self.steps_per_epoch * self.local_batch]
        set_seed = getattr(self.train_set, "set_epoch_seed", None)
        if set_seed is not None:  # per-sample augmentation seeds: exact mid-epoch resume
            set_seed(seed)
        return DataLoader(self.train_set, batch_size=self.local_batch, sampler=order, drop_last=True,
                          num_workers=self.recipe.data.num_workers, generator=g,
                          pin_memory=self.rt.device.type == "cuda", persistent_workers=False)

    def _train_epoch(self) -> Dict[str, Any]:
        st, rt = self.stage, self.rt
        # Every epoch starts from RNG state (seed, stage, epoch): resume-exact without saving RNG.
        torch.manual_seed(_seed_for(self.recipe.seed, self.stage_index, self.epoch) + 1)
        self.model.train()
        self.criterion.train()
        part = self.partial or {"batch": 0, "sums": {}, "correct": 0.0, "seen": 0, "elapsed": 0.0}
        self.partial = None
        start = int(part["batch"])
        loader = self._loader(start)
        sums: Dict[str, torch.Tensor] = {k: torch.tensor(float(v), device=rt.device) for k, v in part["sums"].items()}
        correct = torch.tensor(float(part["correct"]), device=rt.device)
        seen = int(part["seen"])
        recu = st.quant == "W1A1" and self.recipe.binary.recu and st.kind == "student"
        it = loader
        bar = None
        if rt.progress:
            from tqdm.auto import tqdm

            bar = tqdm(loader, desc=f"{st.name} {self.epoch + 1}/{st.epochs}", leave=False, dynamic_ncols=True,
                       total=self.steps_per_epoch, initial=start)
            it = bar
        t0 = time.perf_counter() - float(part["elapsed"])
        lr = lr_at(self.step, self.steps_per_epoch, st.epochs, st.optimizer.lr, st.schedule)
        stop = False
        for i, (x, y) in enumerate(it, start=start):
            if stop:  # every process agreed to stop after the previous step: save before this one
                self.partial = {"batch": i, "sums": {k: float(v) for k, v in sums.items()}, "correct": float(correct),
                                "seen": seen, "elapsed": time.perf_counter() - t0}
                if bar is not None:
                    bar.close()
                self._interrupt(f"epoch {self.epoch + 1}, step {i}")
            x = x.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
            y = y.to(rt.device, non_blocking=True)
            lr = lr_at(self.step, self.steps_per_epoch, st.epochs, st.optimizer.lr, st.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if recu:
                set_tau(self.model, tau_at(self.step / max(1, self.total_steps - 1),
                                           self.recipe.binary.tau_start, self.recipe.binary.tau_end))
            t_logits = t_feat = None
            with rt.autocast():
                if self.criterion.needs_teacher:
                    t_logits, t_feat = self._teacher_outputs(x)
                out = self.train_module(x, y, t_logits, t_feat)
            loss = out["loss"]
            # the forward pass has updated BatchNorm statistics, so a stop request is honoured only
            # after this step completes (saving now and redoing the batch would count it twice)
            finite, stop = self._step_checks(out)
            if not finite:
                self._diverged(out)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if st.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.step_module.parameters(), st.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            with torch.no_grad():
                for k, v in out.items():
                    if k != "logits":
                        sums[k] = sums.get(k, torch.zeros((), device=rt.device)) + v.detach().float()
                correct += (out["logits"].argmax(1) == y).sum()
            seen += y.numel()
            if bar is not None and i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys] + [correct.float(), torch.tensor(float(seen), device=rt.device)])
        ddp.all_reduce_sum(packed, rt.dist)
        total_seen = packed[-1].item()
        steps_all = float(self.steps_per_epoch * rt.dist.world_size)
        metrics: Dict[str, Any] = {"lr": lr, "train": {k: packed[j].item() / steps_all for j, k in enumerate(keys)}}
        metrics["train_top1"] = 100.0 * packed[-2].item() / max(1.0, total_seen)
        metrics["images_per_s"] = total_seen / max(elapsed, 1e-9)
        metrics["resumed_elapsed"] = float(part["elapsed"])
        self._stop_after_epoch = stop
        if recu:
            metrics["tau"] = tau_at(self.step / max(1, self.total_steps - 1), self.recipe.binary.tau_start, self.recipe.binary.tau_end)
        return metrics

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
        finite = bool(torch.isfinite(out["loss"]).item())
        go_on = self.stop.signal is None
        if self.rt.dist.enabled:
            t = torch.tensor([int(finite), int(go_on)], device=self.rt.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            finite, go_on = bool(t[0]), bool(t[1])
        return finite, not go_on

    def _interrupt(self, where: str, save: bool = True) -> None:
        if save and self.rt.dist.is_main:
            atomic_save(self.state(complete=False), self.ckpt_dir / "last.pt")
        ddp.barrier(self.rt.dist)
        raise Interrupted(f"stopped by {self.stop.signal or 'a signal'} in stage '{self.stage.name}', {where}; "
                          f"progress saved to {self.ckpt_dir / 'last.pt'}", self.stop.exit_code)

    def _diverged(self, out: Dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in out.items() if k not in ("logits", "loss") and not torch.isfinite(v).all()]
        where = f"term '{bad[0]}'" if bad else "the total"
        last = self.ckpt_dir / "last.pt"
        keep = f"; the last good checkpoint is {last}" if last.exists() else ""
        raise TrainingDiverged(
            f"stage '{self.stage.name}': the loss became non-finite at step {self.step + 1} (epoch {self.epoch + 1}) in {where}"
            f"{keep}; lower the learning rate or that term's weight, or set grad_clip")

    def _save(self, complete: bool, best: bool) -> None:
        state = self.state(complete)
        if best:  # before last.pt: a last.pt that names a best epoch always has its best.pt on disk
            atomic_save({k: state[k] for k in ("format", "stage", "stage_index", "recipe", "fingerprint", "model_spec",
                                               "model", "epoch", "best_top1")} | {"kind": "best"},
                        self.ckpt_dir / "best.pt")
        atomic_save(state, self.ckpt_dir / "last.pt")
        write_metrics(self.run_dir, self.prior_history + self.history)

    def _log(self, r: Dict[str, Any]) -> None:
        terms = " ".join(f"{k}={v:.4f}" for k, v in r["train"].items())
        test = f" test_top1={r['test_top1']:.2f}%" if "test_top1" in r else ""
        log.info("[%s] epoch %d/%d %s train_top1=%.2f%%%s lr=%.4g %.0f img/s", r["stage"], r["epoch"],
                 self.stage.epochs, terms, r["train_top1"], test, r["lr"], r["images_per_s"])
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


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def write_metrics(run_dir: Path, records: List[Dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_bytes(run_dir / METRICS_FILE, text.encode())


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    p = Path(run_dir) / METRICS_FILE
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the pipeline


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> Path:
    """Create the run folder, or check that ``--resume`` continues the same recipe there."""
    run_dir = recipe.run_dir
    saved = run_dir / RECIPE_FILE
    if resume:
        if not saved.exists():
            raise UserError(f"--resume: '{run_dir}' holds no run to resume (no {RECIPE_FILE}); start it without --resume")
        from .recipe import load_recipe

        try:
            old = load_recipe(saved)
        except UserError as e:
            raise UserError(f"--resume: the saved recipe cannot be read ({e}); start a new run with another name") from None
        if old.fingerprint() != recipe.fingerprint() and not force:
            raise UserError(f"--resume: the recipe differs from the one '{run_dir}' was started with; "
                            "resume with the same recipe, or pass --force to continue with the new one")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder '{run_dir}' already holds a run; pass --resume to continue it, "
                        f"or choose another name (--set name=NEW) or output_dir")
    return run_dir


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Run every stage of ``recipe``; return the contents of ``summary.json``."""
    from .data import build_splits

    rt = Runtime.create(recipe, progress)
    t_start = time.perf_counter()
    run_dir = recipe.run_dir
    stop = StopFlag()
    stop.install()
    try:
        if rt.dist.is_main:
            prepare_run_dir(recipe, resume, force)  # checks only: nothing is written before the data loads
        torch.manual_seed(recipe.seed)
        d = recipe.data
        splits = build_splits(d.dataset, d.root, d.download, d.augment, d.limit_train, d.limit_test, seed=recipe.seed,
                              val_size=d.val_size, val_fraction=d.val_fraction, val_seed=d.val_seed)
        train_set, val_set, test_set, info = splits.train, splits.val, splits.test, splits.info
        if val_set is None and rt.dist.is_main:
            log.info("no validation split (data.val_size): best.pt is not kept, the last epoch's weights are the result")
        if rt.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume or force:
                atomic_write_bytes(run_dir / RECIPE_FILE, recipe.to_yaml().encode())
        ddp.barrier(rt.dist)
        log.info("data: %s, %d train / %s validation / %d test images, %d classes, device %s%s", info.name, len(train_set),
                 len(val_set) if val_set is not None else "no", len(test_set), info.num_classes, rt.device, f", {rt.dist.world_size} processes" if rt.dist.enabled else "")
        history: List[Dict[str, Any]] = []
        results: List[StageResult] = []
        teacher: Optional[nn.Module] = None
        teacher_eval: Optional[Dict[str, float]] = None
        final_states: Dict[str, Dict[str, Any]] = {}
        if recipe.teacher.checkpoint is not None or recipe.teacher.pretrained:
            teacher = load_teacher(recipe, model_spec(recipe, recipe.teacher, "FP", info.num_classes, info.in_chans))
        for i, st in enumerate(recipe.stages):
            cfg = recipe.teacher if st.kind == "teacher" else recipe.student
            spec = model_spec(recipe, cfg, st.quant, info.num_classes, info.in_chans)
            torch.manual_seed(_seed_for(recipe.seed, i, 10**6))
            model = build_model(spec)
            get_module(model, feature_layer(cfg), f"{'teacher' if st.kind == 'teacher' else 'student'}.feature_layer")
            trainer = Trainer(recipe, i, model, spec, teacher if st.kind == "student" else None, train_set, test_set,
                              run_dir, rt, history, stop, val_set=val_set)
            last = run_dir / "checkpoints" / st.name / "last.pt"
            if rt.dist.is_main and last.parent.is_dir():
                for stale in last.parent.glob(".*.tmp"):  # left by a process killed mid-write
                    stale.unlink(missing_ok=True)
            if resume and last.exists():
                ck = load_checkpoint(last, map_location=rt.device)
                if ck.get("model_spec") != spec:
                    raise CheckpointError(f"checkpoint '{last}' was written for another model ({ck.get('model_spec', {}).get('name')}); "
                                          "resume with the recipe that wrote it")
                trainer.load_state(ck)
            else:
                _init_stage(trainer, st, teacher, final_states, rt)
            result = trainer.fit()
            if trainer._stop_after_epoch and i + 1 < len(recipe.stages):  # agreed by every process
                raise Interrupted(f"stopped by {stop.signal or 'a signal'} after stage '{st.name}'; its checkpoint is complete",
                                  stop.exit_code)
            results.append(result)
            history = history + trainer.history
            final_states[st.name] = {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                                     "criterion": trainer.criterion.state_dict()}
            if st.kind == "teacher":
                teacher = trainer.model
                teacher_eval = result.final
            if rt.dist.is_main:
                best = (f" (best on validation: {result.best_top1:.2f}% at epoch {result.best_epoch}, "
                        f"test {result.best_test_top1:.2f}%)") if result.best_epoch else ""
                log.info("[%s] done: test top-1 %.2f%%%s, %.0f s", st.name,
                         result.final.get("test_top1", float("nan")), best, result.wall_s)
        if teacher is not None and teacher_eval is None and rt.dist.is_main:
            loader = DataLoader(test_set, batch_size=256, num_workers=d.num_workers)
            ev = evaluate(teacher.to(rt.device), loader, rt.device, rt.amp_dtype)
            teacher_eval = {"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]}
        summary = {
            "run": recipe.name, "fingerprint": recipe.fingerprint(), "dataset": info.name,
            "teacher": {"arch": recipe.teacher.arch, "source": recipe.teacher.checkpoint or "trained", **(teacher_eval or {})},
            "stages": [r.to_dict() for r in results],
            # training time of every stage, summed across interruptions and resumes
            "wall_s": round(sum(r.wall_s for r in results), 1),
            "process_wall_s": round(time.perf_counter() - t_start, 1),  # this process only (data loading included)
            "machine": machine_info(rt),
        }
        if rt.dist.is_main:
            atomic_write_bytes(run_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
            try:
                from .plots import plot_curves

                plot_curves(history, run_dir / CURVES_FILE, title=recipe.name)
            except ImportError as e:  # matplotlib missing: the numbers are in metrics.jsonl
                log.warning("no curves plot: %s", e)
        return summary
    finally:
        stop.restore()
        ddp.cleanup(rt.dist)


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
        raise CheckpointError(f"{what}: its classifier '{other[0]}' has shape {tuple(state[other[0]].shape)}, this data "
                              f"needs {tuple(own[other[0]].shape)}; set teacher.head: reinit to re-initialise it "
                              "(a teacher stage then fine-tunes it)")
    if other:
        log.info("teacher.head: reinit: the checkpoint's classifier has %d classes, the data %d; '%s' re-initialised",
                 state[other[0]].shape[0], own[other[0]].shape[0], other[0].rpartition(".")[0])
        state.update({k: own[k] for k in head})
    load_model_state(teacher, state, what)
    return teacher


def _init_stage(trainer: Trainer, st: StageConfig, teacher: Optional[nn.Module],
                final_states: Dict[str, Dict[str, Any]], rt: Runtime) -> None:
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
    missing_q = load_model_state(trainer.model, source, f"stage '{st.init_from}' weights", allow_quant_missing=True)
    convs = {k.split(".weight_quant.")[0] for k in missing_q if ".alpha" in k}
    init_binary_scales(trainer.model, only_missing=convs)
    if criterion_state:
        own = trainer.criterion.state_dict()
        if own.keys() == criterion_state.keys() and all(own[k].shape == criterion_state[k].shape for k in own):
            trainer.criterion.load_state_dict(criterion_state)
    log.info("[%s] initialised from '%s'", st.name, st.init_from)


def machine_info(rt: Optional[Runtime] = None) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, Any] = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": sys.version.split()[0], "platform": platform.platform()}
    if rt is not None:
        info["device"] = str(rt.device)
        info["world_size"] = rt.dist.world_size
        if rt.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(rt.device)
    return info
