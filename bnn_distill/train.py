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
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import distributed as ddp
from .checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    load_model_state,
    state_dict_of,
)
from .errors import CheckpointError, Interrupted, UserError
from .evaluate import evaluate
from .execution import Execution, StopFlag, machine_info  # noqa: F401 - re-exported
from .hooks import get_module
from .recipe import ModelConfig, Recipe, StageConfig
from .rundir import CURVES_FILE, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, RunDir  # noqa: F401 - re-exported
from .steps import DistillStep, EpochTally, OptimiserStep, ProgressBar, StepSchedule  # noqa: F401
from .trainer import (  # noqa: F401 - re-exported: train stays the entry point
    StageResult,
    Trainer,
    TrainingDiverged,
    _make_optimizer,
    _seed_for,
    build_model,
    feature_layer,
    init_from_state,
    model_spec_dict,
    read_metrics,
    write_metrics,
)

log = logging.getLogger(__name__)

# RECIPE_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE, read_metrics and write_metrics stay importable
# from here for older callers; the run folder's layout lives in :class:`~bnn_distill.rundir.RunDir`.
# Interrupted lives in :mod:`bnn_distill.errors` (the CLI checks for it without importing torch).


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


def recipe_splits(recipe: Recipe, download: Optional[bool] = None):
    """The train / validation / test splits a recipe trains on (``download``: override the recipe's)."""
    from .data import build_splits

    d = recipe.data
    return build_splits(
        d.dataset,
        d.root,
        d.download if download is None else download,
        d.augment,
        d.limit_train,
        d.limit_test,
        seed=recipe.seed,
        val_size=d.val_size,
        val_fraction=d.val_fraction,
        val_seed=d.val_seed,
    )


def _setup_run(recipe: Recipe, ex: Execution, resume: bool, force: bool):
    """Check the run folder, load the data splits, then save the resolved recipe; returns the splits."""

    run = RunDir.of(recipe)
    if ex.dist.is_main:
        prepare_run_dir(recipe, resume, force)  # checks only: nothing is written before the data loads
    torch.manual_seed(recipe.seed)
    splits = recipe_splits(recipe)
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
