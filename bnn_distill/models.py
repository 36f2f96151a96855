"""One ResNet family for teachers and binary students.

Teacher and student are the same class; they differ only by the conv layer type injected for the
body convolutions (``nn.Conv2d`` or a Brevitas ``QuantConv2d``, see :mod:`bnn_distill.quant`).
The stem conv, every BatchNorm, the downsampling 1x1 convs, the pre-classifier BatchNorm1d
(``head_bn``) and the final ``fc`` stay full precision.

Layer names follow torchvision (``conv1``, ``bn1``, ``layer1..4``, blocks with ``conv1/bn1/
conv2/bn2/downsample``, ``fc``) so torchvision ResNet state dicts load into the ImageNet teachers.
``forward(x)`` always returns logits; features are read with forward hooks (``head_bn`` is the
pooled pre-classifier feature ITRD distils).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import RecipeError, choices, closest
from .quant import conv_factory, init_binary_scales

ACTS: Dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "hardtanh": lambda: nn.Hardtanh(),
    "prelu": lambda: nn.PReLU(),
    "identity": lambda: nn.Identity(),
}
SHORTCUTS = ("param_free", "conv")


class PadShortcut(nn.Module):
    """Parameter-free shortcut: 2x2 average pool when striding, then zero-pad new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        assert out_ch >= in_ch, "param-free shortcut cannot reduce channels"
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True, count_include_pad=False)
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (B, C + extra, H, W)
        return x


class BasicBlock(nn.Module):
    """ResNet basic block with injectable conv and activation types.

    ``bireal=True`` (Bi-Real / ReCU): a shortcut around each conv,
    ``h = act(bn1(conv1(x)) + sc(x)); y = act(bn2(conv2(h)) + h)``.
    ``bireal=False`` (He et al.): ``y = act(bn2(conv2(act(bn1(conv1(x))))) + sc(x))``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, conv_layer, act_layer, shortcut: str, bireal: bool):
        super().__init__()
        self.bireal = bireal
        self.conv1 = conv_layer(in_ch, out_ch, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = act_layer()
        self.conv2 = conv_layer(out_ch, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = act_layer()
        self.downsample: Optional[nn.Module] = None
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            if shortcut == "conv":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
                )
            else:
                self.shortcut = PadShortcut(in_ch, out_ch, stride)

    def _sc(self, x: Tensor) -> Tensor:
        return self.downsample(x) if self.downsample is not None else self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.bireal:
            h = self.act1(self.bn1(self.conv1(x)) + self._sc(x))
            return self.act2(self.bn2(self.conv2(h)) + h)
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + self._sc(x))


class ResNet(nn.Module):
    """ResNet with a CIFAR (3x3, no max-pool) or ImageNet (7x7 stride 2 + max-pool) stem."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_chans: int = 3,
        stem: str = "cifar",
        conv_layer: Optional[Callable[..., nn.Module]] = None,
        act: str = "relu",
        shortcut: str = "param_free",
        bireal: bool = False,
        head_norm: bool = False,
    ):
        super().__init__()
        conv_layer = conv_layer or conv_factory("FP")
        act_layer = ACTS[act]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = act_layer()
        in_ch = widths[0]
        self.stage_names: List[str] = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(in_ch, w, stride if j == 0 else 1, conv_layer, act_layer, shortcut, bireal))
                in_ch = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            self.stage_names.append(f"layer{i + 1}")
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head_bn: nn.Module = nn.BatchNorm1d(in_ch) if head_norm else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # (B, C0, H, W)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # (B, C, h, w)

    def forward_head(self, x: Tensor) -> Tensor:
        z = self.head_bn(self.flatten(self.global_pool(x)))  # (B, C): the distilled feature
        return self.fc(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@dataclass(frozen=True)
class ModelSpec:
    """Architecture defaults of a registered model name (overridable from the recipe)."""

    blocks: tuple
    widths: tuple
    stem: str
    act: str
    shortcut: str
    bireal: bool
    head_norm: bool
    feature_layer: str
    doc: str


MODELS: Dict[str, ModelSpec] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    assert name not in MODELS, f"model {name} registered twice"
    MODELS[name] = spec


register_model(
    "cifar_resnet18",
    ModelSpec(
        (2, 2, 2, 2),
        (64, 128, 256, 512),
        "cifar",
        "hardtanh",
        "param_free",
        True,
        True,
        "head_bn",
        "ReCU-style CIFAR ResNet-18: 3x3 stem, Bi-Real shortcuts, avg-pool+pad shortcuts, BN1d head",
    ),
)
register_model(
    "cifar_resnet20",
    ModelSpec(
        (3, 3, 3),
        (16, 32, 64),
        "cifar",
        "hardtanh",
        "param_free",
        True,
        True,
        "head_bn",
        "CIFAR ResNet-20 (3 stages of 3 blocks, 16/32/64), same binary-friendly choices",
    ),
)
register_model(
    "resnet18",
    ModelSpec(
        (2, 2, 2, 2),
        (64, 128, 256, 512),
        "imagenet",
        "relu",
        "conv",
        False,
        False,
        "flatten",
        "ImageNet ResNet-18 with torchvision layer names",
    ),
)
register_model(
    "resnet34",
    ModelSpec(
        (3, 4, 6, 3),
        (64, 128, 256, 512),
        "imagenet",
        "relu",
        "conv",
        False,
        False,
        "flatten",
        "ImageNet ResNet-34 with torchvision layer names",
    ),
)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    quant: str = "FP",
    width_mult: float = 1.0,
    weight_scale: str = "mean_abs",
    recu: bool = False,
    weight_gradient: str = "identity",
    act_gradient: str = "approx_sign",
    **overrides,
) -> ResNet:
    """The one door to the model family.

    ``quant`` picks the body conv type (``FP``, ``W32A1``, ``W1A1``); ``overrides`` may set
    ``act``, ``shortcut``, ``bireal`` and ``head_norm`` against the registered defaults.
    A ``SOURCE:ARCH`` name builds a full-precision teacher from torchvision or timm instead
    (:func:`create_external_model`; ``overrides`` may then hold only ``pretrained``).
    """
    if is_external(name):
        pretrained = bool(overrides.pop("pretrained", False))
        rest = {k: v for k, v in overrides.items() if v is not None}
        if quant != "FP" or width_mult != 1.0 or rest:
            what = (
                f"quant {quant}"
                if quant != "FP"
                else f"width_mult {width_mult}"
                if width_mult != 1.0
                else choices(rest)
            )
            raise RecipeError(
                f"model '{name}': a torchvision or timm model is a full-precision teacher as it is; "
                f"{what} applies to our own models only"
            )
        return create_external_model(name, num_classes, in_chans, pretrained)  # type: ignore[return-value]
    overrides.pop("pretrained", None)
    if name not in MODELS:
        raise RecipeError(f"model '{name}' is not registered{closest(name, MODELS)}; valid: {choices(MODELS)}")
    spec = MODELS[name]
    args = dict(act=spec.act, shortcut=spec.shortcut, bireal=spec.bireal, head_norm=spec.head_norm)
    for key, val in overrides.items():
        if key not in args:
            raise RecipeError(f"model option '{key}' is unknown{closest(key, args)}; valid: {choices(args)}")
        if val is not None:
            args[key] = val
    if args["act"] not in ACTS:
        raise RecipeError(
            f"model.act: unknown activation '{args['act']}'{closest(args['act'], ACTS)}; valid: {choices(ACTS)}"
        )
    if args["shortcut"] not in SHORTCUTS:
        raise RecipeError(f"model.shortcut: unknown '{args['shortcut']}'; valid: {choices(SHORTCUTS)}")
    if not (0 < width_mult <= 16):
        raise RecipeError(f"model.width_mult: {width_mult} is out of range; valid: 0 < width_mult <= 16")
    widths = tuple(max(1, int(round(w * width_mult))) for w in spec.widths)
    conv = conv_factory(quant, weight_scale, recu, weight_gradient, act_gradient)
    model = ResNet(spec.blocks, widths, num_classes, in_chans, spec.stem, conv, **args)
    init_binary_scales(model)
    return model


#: Teachers from other libraries, named ``SOURCE:ARCH`` (e.g. ``torchvision:resnet18``), and the
#: module whose (flattened) output is their pooled pre-classifier feature.
EXTERNAL_SOURCES: Dict[str, str] = {"torchvision": "avgpool", "timm": "global_pool"}


def is_external(name: str) -> bool:
    """True for a ``SOURCE:ARCH`` model name (a teacher built by torchvision or timm)."""
    return ":" in name


def check_external_name(name: str, path: str = "teacher.arch") -> None:
    """Raise a one-line RecipeError unless ``name`` is a buildable ``torchvision:``/``timm:`` model."""
    source, _, arch = name.partition(":")
    if source not in EXTERNAL_SOURCES:
        raise RecipeError(
            f"{path}: '{name}' names no known model source{closest(source, EXTERNAL_SOURCES)}; "
            f"valid: {choices(EXTERNAL_SOURCES)} (as in torchvision:resnet18), or one of {choices(MODELS)}"
        )
    known = _external_names(source, path)
    if arch not in known:
        raise RecipeError(f"{path}: {source} has no model '{arch}'{closest(arch, known)}")


def _external_names(source: str, path: str) -> List[str]:
    if source == "torchvision":
        import torchvision.models as tvm

        return list(tvm.list_models(module=tvm))
    try:
        import timm
    except ImportError:
        raise RecipeError(f"{path}: timm models need the timm package; pip install timm") from None
    return list(timm.list_models())


def create_external_model(
    name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False, reinit_head: bool = False
) -> nn.Module:
    """A full-precision teacher built by torchvision or timm (``SOURCE:ARCH``), randomly initialised
    unless ``pretrained`` (the library's hub weights: needs a network). Hub weights whose classifier
    has another number of classes are refused unless ``reinit_head`` (then the classifier is a new,
    randomly initialised layer; timm does that by itself)."""
    check_external_name(name)
    source, _, arch = name.partition(":")
    try:
        if source == "timm":
            import timm

            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
        import torchvision.models as tvm

        if in_chans != 3:
            raise RecipeError(
                f"teacher.arch: torchvision's {arch} takes 3 input channels and the data has {in_chans}; "
                "use a timm teacher (it adapts the stem) or one of ours"
            )
        if not pretrained:
            return tvm.get_model(arch, weights=None, num_classes=num_classes)
        model = tvm.get_model(arch, weights="DEFAULT")
    except (OSError, RuntimeError) as e:  # URLError is an OSError: no network for the hub weights
        if not pretrained:
            raise
        text = " ".join(str(e).split())[:160]
        raise RecipeError(
            f"teacher.pretrained: cannot fetch {name}'s weights ({text}); on a machine without a "
            "network give teacher.checkpoint: a local state dict instead"
        ) from None
    head = _classifier_name(model)
    fc = model.get_submodule(head)
    if fc.out_features != num_classes and reinit_head:
        parent, _, leaf = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Linear(fc.in_features, num_classes))
    elif fc.out_features != num_classes:
        raise RecipeError(
            f"teacher.pretrained: {name}'s weights have {fc.out_features} classes and the data "
            f"{num_classes}; set teacher.head: reinit (the classifier is re-initialised and the "
            "teacher stage fine-tunes it), or give a checkpoint with the right head"
        )
    return model


def _classifier_name(model: nn.Module) -> str:
    """Path of the model's final classifier: its last ``nn.Linear`` module."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names, f"{type(model).__name__} has no Linear classifier"
    return names[-1]


def classifier_keys(model: nn.Module) -> List[str]:
    """State-dict keys of the model's final classifier (weight and bias)."""
    head = _classifier_name(model)
    return [f"{head}.{k}" for k in model.get_submodule(head).state_dict()]


def default_feature_layer(name: str, head_norm: Optional[bool] = None) -> str:
    """The module whose output ITRD distils: ``head_bn`` when the model has one, else ``flatten``
    (for a torchvision or timm teacher: its global pool)."""
    if is_external(name):
        return EXTERNAL_SOURCES[name.partition(":")[0]]
    spec = MODELS[name]
    has_bn = spec.head_norm if head_norm is None else head_norm
    return "head_bn" if has_bn else "flatten"
