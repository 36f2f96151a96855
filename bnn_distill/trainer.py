"""One stage of training: :class:`Trainer` (the epoch loop, validation, checkpoints, resume) and
the models a recipe describes (:func:`model_spec_dict`, :func:`build_model`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as ddp
from .checkpoint import (
    FORMAT,
    atomic_save,
    keep_quantizers,
    load_checkpoint,
    load_model_state,
)
from .errors import Interrupted, UserError
from .evaluate import evaluate
from .execution import Execution, StopFlag
from .frozen import FrozenTeacher
from .hooks import FeatureHook
from .losses import Criterion, Term
from .models import create_model, default_feature_layer
from .quant import init_binary_scales
from .recipe import ModelConfig, Recipe, StageConfig
from .rundir import CURVES_FILE, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, RunDir  # noqa: F401 - re-exported
from .steps import DistillStep, EpochTally, OptimiserStep, ProgressBar, StepSchedule

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """A loss became NaN or Inf; the stage stops, the last good checkpoint stays."""


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
    teacher_forward: str = ""  # the frozen teacher's forward form in use (see .frozen); "" without one

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
        self.teacher: Optional[FrozenTeacher] = None
        if self.criterion.needs_teacher:
            assert teacher is not None, "recipe validation guarantees a teacher"
            self.teacher = FrozenTeacher(
                ex.layout(teacher),
                self.teacher_feature if self.criterion.needs_features else None,
                recipe.teacher_forward,
            )
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
            (self.teacher.form or self.teacher.requested) if self.teacher is not None else "",
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
        under ``inference_mode`` in the recipe's ``teacher_forward`` form (see :mod:`.frozen`)."""
        assert self.teacher is not None
        return self.teacher(x)

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
