"""Recipes: YAML files loaded with ``yaml.safe_load`` into frozen, validated dataclasses.

A recipe never runs code. Unknown keys, wrong types and impossible values fail at load with the
dotted path of the bad key and, for typos, the nearest valid name. ``--set a.b=value`` overrides
are applied to the raw mapping before validation, so they are checked the same way.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .errors import RecipeError, choices, closest
from .overrides import _yaml_problem, apply_override, parse_overrides  # noqa: F401 - re-exported

QUANT_MODES = ("FP", "W32A1", "W1A1")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
STAGE_KINDS = ("teacher", "student")


def _one_of(path: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        hint = closest(value, valid)
        if value.strip() in valid:
            hint = " (it has stray whitespace)"
        raise RecipeError(f"{path}: {value!r} is not valid{hint}; valid: {choices(valid)}")


def _positive(path: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{path}: {value} is not valid; it must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fmnist_subset"  # registry name, see bnn_distill.data
    root: Optional[str] = None  # local folder; None: ./data (or the package, for embedded data)
    download: bool = False  # only when asked: dev and CI machines have no network
    augment: bool = True  # crop-with-padding + flip as standard for the dataset
    num_workers: int = 0  # 0 keeps a 2-core CPU for compute; raise on GPU machines
    limit_train: Optional[int] = None  # first-N balanced subset, for smoke runs
    limit_test: Optional[int] = None
    # held out of the training split for choosing best.pt (the test split is used once, at the end)
    val_size: Optional[int] = None  # validation images; None with val_fraction None: no validation split
    val_fraction: Optional[float] = None  # or this share of the training split, in (0, 0.5]
    val_seed: int = 0  # which images are held out; fixed across run seeds so seeds share one split

    def check(self, path: str) -> None:
        from .data import dataset_names

        _one_of(f"{path}.dataset", self.dataset, dataset_names())
        _positive(f"{path}.num_workers", self.num_workers, allow_zero=True)
        if self.num_workers > 64:
            raise RecipeError(f"{path}.num_workers: {self.num_workers} is absurd; valid: 0..64")
        for key in ("limit_train", "limit_test", "val_size"):
            v = getattr(self, key)
            if v is not None:
                _positive(f"{path}.{key}", v)
        if self.val_size is not None and self.val_fraction is not None:
            raise RecipeError(f"{path}: give val_size or val_fraction, not both")
        if self.val_fraction is not None and not 0 < self.val_fraction <= 0.5:
            raise RecipeError(f"{path}.val_fraction: {self.val_fraction} is not valid; it must be in (0, 0.5]")
        _positive(f"{path}.val_seed", self.val_seed, allow_zero=True)
        if self.root is not None and not Path(self.root).expanduser().exists() and not self.download:
            raise RecipeError(
                f"{path}.root: folder '{self.root}' does not exist; "
                f"give an existing folder or set {path}.download: true"
            )


@dataclass(frozen=True)
class BinaryConfig:
    weight_scale: str = "learned"  # per-output-channel scale: learned (ReCU), mean_abs (XNOR-Net) or none
    recu: bool = True  # ReCU standardise + tau-quantile clamp of the weights before sign
    tau_start: float = 0.85  # ReCU's clamp quantile at the start of a W1A1 stage ...
    tau_end: float = 0.99  # ... and at its end (linear per step)
    weight_gradient: str = "identity"  # straight-through for weights, as ReCU
    act_gradient: str = "approx_sign"  # Bi-Real's ApproxSign for activations

    def check(self, path: str) -> None:
        from .quant import GRADIENTS, WEIGHT_SCALES

        _one_of(f"{path}.weight_scale", self.weight_scale, WEIGHT_SCALES)
        _one_of(f"{path}.weight_gradient", self.weight_gradient, GRADIENTS)
        _one_of(f"{path}.act_gradient", self.act_gradient, GRADIENTS)
        for key in ("tau_start", "tau_end"):
            v = getattr(self, key)
            if not 0.5 <= v < 1.0:
                raise RecipeError(f"{path}.{key}: {v} is not valid; a clamp quantile must be in [0.5, 1)")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cifar_resnet20"  # registry name, see bnn_distill.models
    width_mult: float = 1.0  # scales every stage width
    act: Optional[str] = None  # None: the architecture's default (hardtanh for binary CIFAR nets)
    shortcut: Optional[str] = None  # param_free | conv; None: architecture default
    bireal: Optional[bool] = None  # a shortcut around every conv (Bi-Real); None: default
    head_norm: Optional[bool] = None  # BatchNorm1d before fc; None: default
    feature_layer: Optional[str] = None  # module whose output ITRD distils; None: head_bn or flatten
    checkpoint: Optional[str] = None  # teacher only: load these weights (a teacher stage then fine-tunes them)
    pretrained: bool = False  # teacher only, torchvision:/timm: arch: the hub's weights (needs a network)
    head: str = "keep"  # teacher only: keep | reinit (a checkpoint classifier of another class count)

    def check(self, path: str) -> None:
        from .models import ACTS, MODELS, SHORTCUTS, check_external_name, is_external

        if is_external(self.arch):
            if path != "teacher":
                raise RecipeError(
                    f"{path}.arch: '{self.arch}' is a torchvision/timm model; only the teacher can be "
                    f"one (the student is ours, binary): valid: {choices(MODELS)}"
                )
            check_external_name(self.arch, f"{path}.arch")
            options = {k: v for k, v in self.model_kwargs().items() if v is not None}
            if options or self.width_mult != 1.0:
                key = next(iter(options), "width_mult")
                raise RecipeError(f"{path}.{key}: applies to our own models only, not to '{self.arch}'; remove it")
        else:
            _one_of(f"{path}.arch", self.arch, list(MODELS))
            if self.pretrained:
                raise RecipeError(
                    f"{path}.pretrained: hub weights exist for torchvision:/timm: teachers only; "
                    f"give {path}.checkpoint for '{self.arch}'"
                )
        _one_of(f"{path}.head", self.head, ("keep", "reinit"))
        if path != "teacher" and (self.pretrained or self.head != "keep"):
            raise RecipeError(f"{path}: pretrained and head are teacher options")
        if not (0 < self.width_mult <= 16):
            raise RecipeError(f"{path}.width_mult: {self.width_mult} is not valid; it must be in (0, 16]")
        if self.act is not None:
            _one_of(f"{path}.act", self.act, list(ACTS))
        if self.shortcut is not None:
            _one_of(f"{path}.shortcut", self.shortcut, SHORTCUTS)
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            raise RecipeError(
                f"{path}.checkpoint: file '{self.checkpoint}' does not exist; "
                "give a checkpoint written by bnn-distill or a torchvision state dict"
            )

    def model_kwargs(self) -> Dict[str, Any]:
        return dict(act=self.act, shortcut=self.shortcut, bireal=self.bireal, head_norm=self.head_norm)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    nesterov: bool = False  # sgd only
    betas: Tuple[float, float] = (0.9, 0.999)  # adam / adamw only

    def check(self, path: str) -> None:
        _one_of(f"{path}.name", self.name, OPTIMIZERS)
        if not (0 < self.lr <= 10):
            raise RecipeError(f"{path}.lr: {self.lr} is not valid; it must be in (0, 10]")
        if not (0 <= self.momentum < 1):
            raise RecipeError(f"{path}.momentum: {self.momentum} is not valid; it must be in [0, 1)")
        _positive(f"{path}.weight_decay", self.weight_decay, allow_zero=True)
        if not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(f"{path}.betas: {list(self.betas)} is not valid; each must be in [0, 1)")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"  # cosine (with linear warm-up), step, constant
    warmup_epochs: float = 0.0  # linear warm-up from 0, counted in epochs (fractions allowed)
    min_lr: float = 0.0  # cosine floor
    milestones: Tuple[int, ...] = ()  # step: epochs where lr is multiplied by gamma
    gamma: float = 0.1

    def check(self, path: str, epochs: int) -> None:
        _one_of(f"{path}.name", self.name, SCHEDULES)
        _positive(f"{path}.warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.warmup_epochs > epochs:
            raise RecipeError(f"{path}.warmup_epochs: {self.warmup_epochs} exceeds the stage's {epochs} epochs")
        _positive(f"{path}.min_lr", self.min_lr, allow_zero=True)
        if list(self.milestones) != sorted(set(self.milestones)) or any(m <= 0 or m > epochs for m in self.milestones):
            raise RecipeError(
                f"{path}.milestones: {list(self.milestones)} is not valid; increasing epochs in 1..{epochs}"
            )
        if not (0 < self.gamma <= 1):
            raise RecipeError(f"{path}.gamma: {self.gamma} is not valid; it must be in (0, 1]")


@dataclass(frozen=True)
class LossTermConfig:
    name: str  # registry name: ce, kd, itrd_corr, itrd_mi
    weight: float = 1.0
    params: Mapping[str, float] = field(default_factory=dict)  # e.g. alpha, eps, temperature

    def check(self, path: str) -> None:
        from .losses import validate_loss_term

        validate_loss_term(self.name, self.params, path)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise RecipeError(f"{path}.weight: {self.weight} is not valid; it must be finite and >= 0")


@dataclass(frozen=True)
class StageConfig:
    name: str
    kind: str = "student"  # teacher: trains the FP teacher; student: trains the student
    quant: str = "W1A1"  # FP | W32A1 (binary activations) | W1A1 (binary weights and activations)
    init_from: Optional[str] = None  # an earlier stage's name, 'teacher', or None (from scratch)
    epochs: int = 1
    batch_size: int = 256  # global batch size (divided over DDP processes)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    losses: Tuple[LossTermConfig, ...] = (LossTermConfig("ce"),)
    grad_clip: Optional[float] = None  # max global grad norm; None: off
    eval_every: int = 1  # evaluate on the validation split every N epochs (and always at the end)

    def check(self, path: str) -> None:
        _one_of(f"{path}.kind", self.kind, STAGE_KINDS)
        _one_of(f"{path}.quant", self.quant, QUANT_MODES)
        if self.kind == "teacher" and self.quant != "FP":
            raise RecipeError(f"{path}.quant: a teacher stage trains a full-precision network; set quant: FP")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise RecipeError(f"{path}.name: '{self.name}' is not valid; use letters, digits, '_', '-' or '.'")
        _positive(f"{path}.epochs", self.epochs)
        if self.epochs > 100_000:
            raise RecipeError(f"{path}.epochs: {self.epochs} is absurd; valid: 1..100000")
        _positive(f"{path}.batch_size", self.batch_size)
        if self.batch_size > 1_000_000:
            raise RecipeError(f"{path}.batch_size: {self.batch_size} is absurd; valid: 1..1000000")
        _positive(f"{path}.eval_every", self.eval_every)
        if self.grad_clip is not None:
            _positive(f"{path}.grad_clip", self.grad_clip)
        self.optimizer.check(f"{path}.optimizer")
        self.schedule.check(f"{path}.schedule", self.epochs)
        if not self.losses:
            raise RecipeError(f"{path}.losses: empty; name at least one loss term, e.g. [{{name: ce}}]")
        names = [t.name for t in self.losses]
        for i, t in enumerate(self.losses):
            t.check(f"{path}.losses[{i}]")
            if t.name in names[:i]:
                raise RecipeError(
                    f"{path}.losses[{i}].name: '{t.name}' is already listed at losses[{names.index(t.name)}]; "
                    "list each term once"
                )
        if self.kind == "teacher":
            from .losses import LOSSES

            for i, t in enumerate(self.losses):
                if LOSSES[t.name].needs_teacher:
                    raise RecipeError(f"{path}.losses[{i}].name: a teacher stage cannot use '{t.name}'; use ce")


@dataclass(frozen=True)
class Recipe:
    name: str  # run name: the run folder is output_dir/name
    stages: Tuple[StageConfig, ...]
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    binary: BinaryConfig = field(default_factory=BinaryConfig)
    seed: int = 0
    output_dir: str = "runs"
    device: str = "auto"  # auto: cuda when present, else cpu
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on CPU
    # the frozen teacher's forward in student stages: folded (BatchNorms folded into the convs),
    # compiled (folded, then torch.compile), eager (as trained); each checked against eager first
    teacher_forward: str = "folded"
    description: str = ""

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise RecipeError(f"name: '{self.name}' is not valid; use letters, digits, '_', '-' or '.'")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise RecipeError(f"device: '{self.device}' is not valid; valid: 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.seed < 0:
            raise RecipeError(f"seed: {self.seed} is not valid; it must be >= 0")
        from .frozen import FORMS

        _one_of("teacher_forward", self.teacher_forward, FORMS)
        self.data.check("data")
        self.teacher.check("teacher")
        self.student.check("student")
        if self.student.checkpoint is not None:
            raise RecipeError(
                "student.checkpoint: students are trained by stages; use a stage's init_from to start from weights"
            )
        self.binary.check("binary")
        if not self.stages:
            raise RecipeError("stages: empty; list at least one stage")
        has_teacher_stage = self._check_stages()
        self._check_teacher_source(has_teacher_stage)
        self._check_init_from_teacher()
        self._check_feature_layers()

    def _check_stages(self) -> bool:
        """Each stage, unique names, at most one teacher stage (the first), init_from naming an
        earlier stage; returns whether there is a teacher stage."""
        seen: List[str] = []
        has_teacher_stage = False
        for i, st in enumerate(self.stages):
            path = f"stages[{i}]"
            st.check(path)
            if st.name in seen:
                raise RecipeError(f"{path}.name: '{st.name}' is used by an earlier stage; stage names must be unique")
            if st.kind == "teacher":
                if has_teacher_stage or i != 0:
                    raise RecipeError(f"{path}.kind: a teacher stage must be the first and only one")
                has_teacher_stage = True  # with teacher.checkpoint or pretrained: fine-tunes those weights
            if st.kind == "teacher" and st.init_from is not None:
                raise RecipeError(
                    f"{path}.init_from: a teacher stage starts from scratch; remove init_from (students use it)"
                )
            elif st.init_from is not None and st.init_from != "teacher":
                if st.init_from not in seen:
                    valid = [s for s in seen if s != "teacher"] + ["teacher"]
                    raise RecipeError(
                        f"{path}.init_from: no earlier stage named '{st.init_from}'{closest(st.init_from, valid)}; "
                        f"valid: {choices(valid)} or null"
                    )
            seen.append(st.name)
        return has_teacher_stage

    def _check_teacher_source(self, has_teacher_stage: bool) -> None:
        """A teacher to distil from where a stage needs one; a reinit head only with a teacher stage."""
        needs_teacher = any(self._stage_needs_teacher(st) for st in self.stages)
        loaded = self.teacher.checkpoint is not None or self.teacher.pretrained
        if needs_teacher and not has_teacher_stage and not loaded:
            raise RecipeError(
                "teacher: a stage distils from a teacher but there is none; "
                "add a first stage with kind: teacher or set teacher.checkpoint"
            )
        if self.teacher.head == "reinit" and not has_teacher_stage:
            raise RecipeError(
                "teacher.head: reinit leaves the teacher's classifier untrained; add a first stage with "
                "kind: teacher to fine-tune it"
            )

    def _check_init_from_teacher(self) -> None:
        """A student stage starting from the teacher's weights needs the student built like the teacher."""
        for i, st in enumerate(self.stages):
            if st.init_from == "teacher":
                t, s = self.teacher, self.student
                diff = [
                    k
                    for k in ("arch", "width_mult", "act", "shortcut", "bireal", "head_norm")
                    if getattr(t, k) != getattr(s, k)
                ]
                if diff:
                    raise RecipeError(
                        f"stages[{i}].init_from: 'teacher' needs the student built like the teacher, but "
                        f"student.{diff[0]} ({getattr(s, diff[0])!r}) "
                        f"differs from teacher.{diff[0]} ({getattr(t, diff[0])!r})"
                    )

    def _check_feature_layers(self) -> None:
        """A feature layer must name a module of its model (checked on the model's structure)."""
        from .models import create_model

        uses_features = any(_needs_features(st) for st in self.stages)
        for role, cfg in (("teacher", self.teacher), ("student", self.student)):
            if cfg.feature_layer is None or not uses_features:
                continue
            model = create_model(cfg.arch, 10, 3, "FP", cfg.width_mult, **cfg.model_kwargs())
            names = [n for n, _ in model.named_modules() if n]
            if cfg.feature_layer not in names:
                raise RecipeError(
                    f"{role}.feature_layer: the model has no module {cfg.feature_layer!r}"
                    f"{closest(cfg.feature_layer, names)}; e.g. 'head_bn', 'flatten' or 'layer4'"
                )

    @staticmethod
    def _stage_needs_teacher(st: StageConfig) -> bool:
        from .losses import LOSSES

        return st.kind == "student" and (
            st.init_from == "teacher" or any(LOSSES[t.name].needs_teacher for t in st.losses)
        )

    def stage(self, name: str) -> StageConfig:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> Dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def fingerprint(self, ignore: Sequence[str] = ("output_dir", "device", "description", "teacher_forward")) -> str:
        """Hash of what determines training results (used to refuse resuming a changed recipe).

        Fields at their default are left out, so a field added to the recipe later (with a
        default that keeps the old behaviour) leaves the fingerprints of earlier runs unchanged;
        a saved run's recipe.yaml holds every value explicitly, so a changed default still shows.
        ``device`` and ``teacher_forward`` change results by float rounding only: a run may resume
        with another.
        """
        d = {k: v for k, v in _non_default(self).items() if k not in ignore}
        d["data"] = {k: v for k, v in d.get("data", {}).items() if k not in ("root", "download", "num_workers")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _needs_features(st: StageConfig) -> bool:
    from .losses import LOSSES

    return any(LOSSES[t.name].needs_features for t in st.losses)


def _non_default(obj: Any) -> Any:
    """Like :func:`_to_plain`, but a dataclass keeps only the fields that differ from their default."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
                continue
            out[f.name] = _non_default(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_non_default(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _non_default(v) for k, v in obj.items()}
    return obj


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- typed conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list, Tuple, List):
        return "a list"
    if origin in (dict, Mapping, collections.abc.Mapping) or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, path)
        raise AssertionError(f"unsupported union {tp}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {_describe(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{path}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str):
                try:
                    hint = f" (YAML reads {value} as text; write it with a dot, e.g. {float(value):.1e})"
                except ValueError:
                    pass
            raise RecipeError(f"{path}: expected a number, got {_describe(value)}{hint}")
        try:
            number = float(value)
        except OverflowError:  # a YAML integer has no bound; a float has
            raise RecipeError(
                f"{path}: {str(value)[:12]}... ({len(str(value))} digits) is too large for a number"
            ) from None
        if not math.isfinite(number):
            raise RecipeError(f"{path}: {value} is not a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise AssertionError(f"unsupported type {tp} at {path}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "the recipe"
    if cls is LossTermConfig and isinstance(raw, str):
        raise RecipeError(f"{where}: expected a mapping of keys, got {_describe(raw)}; write {{name: {raw}}}")
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # loss terms: every key other than name/weight is a loss parameter
    if cls is LossTermConfig:
        raw = dict(raw)
        params = {k: raw.pop(k) for k in list(raw) if k not in ("name", "weight", "params")}
        raw.setdefault("params", {})
        if not isinstance(raw["params"], dict):
            raise RecipeError(f"{path}.params: expected a mapping, got {_describe(raw['params'])}")
        raw["params"] = {**raw["params"], **params}
        for k, v in raw["params"].items():
            if isinstance(v, int) and not isinstance(v, bool):
                try:
                    raw["params"][k] = float(v)  # alpha: 2 and alpha: 2.0 are the same recipe
                except OverflowError:
                    raise RecipeError(
                        f"{path}.{k}: {str(v)[:12]}... ({len(str(v))} digits) is too large for a number"
                    ) from None
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise RecipeError(f"{sub}: unknown key{closest(key, fields)}; valid keys here: {choices(fields)}")
        kwargs[key] = _convert(hints[key], value, sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise RecipeError(f"{path + '.' if path else ''}{name}: missing; this key is required")
    return cls(**kwargs)


# ---------------------------------------------------------------- loading


def recipe_from_dict(raw: Any, overrides: Sequence[str] = ()) -> Recipe:
    """Validate a raw mapping (as from YAML) plus overrides into a :class:`Recipe`."""
    if raw is None:
        raise RecipeError("the recipe is empty; it needs at least 'name' and 'stages'")
    if not isinstance(raw, dict):
        raise RecipeError(f"the recipe must be a mapping of keys at the top level, got {_describe(raw)}")
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides):
        apply_override(raw, key, value)
    recipe = _build(Recipe, raw, "")
    recipe.check()
    return recipe


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Load and validate a YAML recipe file. Raises :class:`RecipeError` with the bad key's path."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError(
            f"recipe '{path}' is a folder; give the path of a YAML recipe file, e.g. recipes/quick_fmnist.yaml"
        )
    if not p.is_file():
        raise RecipeError(
            f"recipe '{path}' does not exist; give the path of a YAML recipe, e.g. recipes/quick_fmnist.yaml"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe '{path}' cannot be read: {e}; it must be a UTF-8 YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {_yaml_problem(e)}") from None
    try:
        return recipe_from_dict(raw, overrides)
    except RecipeError as e:
        raise RecipeError(f"recipe '{path}': {e}") from None
