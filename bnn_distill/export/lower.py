"""Lowering a :class:`~bnn_distill.models.ResNet` to ONNX: the traversal every target shares, and
the float lowering (FP and W32A1 models, NCHW with standard ``Conv``/``BatchNormalization``).
:func:`bnn_distill.export.targets.lower` picks the subclass for a model.

A target is a subclass of :class:`Lowering`: the stem (before the body) is NCHW for every target;
the body's layout, convs, BatchNorms, shortcut pooling and blocks are the subclass's. The integer
lowering of binary models is :class:`~bnn_distill.export.lower_int.IntLowering`; the native
runtime's is :class:`bnn_distill.native.lower.NativeLowering`, beside its kernels.
"""

from __future__ import annotations

from typing import List, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from ..manifest import INPUT_NAME, OUTPUT_NAME
from ..models import BasicBlock, PadShortcut, ResNet
from .graph import _T, IR_VERSION, OPSET, ExportError, Probe, _Graph, _pool_out, _version
from .weights import bn_affine, conv_kind, float_weight


def conv_kinds(model: nn.Module) -> Set[str]:
    """The kinds (``FP``, ``W32A1``, ``W1A1``) of the model's convs; raises naming a layer that cannot lower."""
    if not isinstance(model, ResNet):
        raise ExportError(f"cannot lower a {type(model).__name__}: only bnn_distill ResNet models export")
    kinds = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            try:
                kinds.add(conv_kind(m))
            except ExportError as e:
                raise ExportError(f"cannot lower layer '{mname}': {e}") from None
    return kinds


class Lowering:
    """Lowers one ResNet (eval mode) to an ONNX graph; every lowered module is recorded as a
    :class:`Probe` for the parity diagnosis. Subclasses give the body's layout and ops."""

    #: the layout of the body's activations (``nchw`` or ``flat``)
    layout = "nchw"
    #: the axes of the body's spatial positions, averaged by the global pool
    pool_axes: Tuple[int, ...] = (2, 3)

    def __init__(self, model: nn.Module, input_shape: Sequence[int], name: str = "model"):
        self.kinds = conv_kinds(model)
        self.model = model.eval()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.name = name
        self.g = _Graph()
        self.probes: List[Probe] = []
        self.num_classes = int(model.fc.out_features)

    # -- helpers

    def _fail(self, name: str, what: str):
        raise ExportError(f"cannot lower layer '{name}': {what}")

    def _probe(
        self, name: str, module: nn.Module, inputs: List[_T], out: _T, in_path: str = "", out_path: str = ""
    ) -> None:
        self.probes.append(Probe(name, module, inputs, out, in_path, out_path))

    def _per_channel(self, name: str, values: np.ndarray, t: _T) -> str:
        """A per-channel constant broadcast over ``t``'s positions (stored as (C,))."""
        return self.g.init(name, np.ascontiguousarray(np.asarray(values, dtype=np.float32)))

    def _sign(self, name: str, x: _T, pos, neg, dtype) -> str:
        """``Where(x >= 0, pos, neg)``: the sign with ``sign(0) = +1``, exactly as in training."""
        g = self.g
        ge = g.op("GreaterOrEqual", [x.name, g.const(0.0, np.float32)], f"{name}/sign_ge")
        return g.op("Where", [ge, g.const(pos, dtype), g.const(neg, dtype)], f"{name}/sign")

    def _check_conv(self, name: str, m: nn.Module) -> str:
        """The conv's kind, or a one-line error for a conv no target lowers."""
        if not isinstance(m, nn.Conv2d):
            self._fail(name, f"{type(m).__name__} is not a Conv2d")
        try:
            kind = conv_kind(m)
        except ExportError as e:
            self._fail(name, str(e))
        if m.groups != 1 or tuple(m.dilation) != (1, 1):
            self._fail(name, f"groups={m.groups}, dilation={tuple(m.dilation)} (only groups=1, dilation=1 lower)")
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            self._fail(
                name, f"padding={m.padding!r}, padding_mode={m.padding_mode!r} (only explicit zero padding lowers)"
            )
        if kind != "FP" and m.bias is not None:
            self._fail(name, "a quantised conv with a bias")
        return kind

    @staticmethod
    def _conv_out(m: nn.Conv2d, x: _T) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
        return (x.h + 2 * ph - kh) // sh + 1, (x.w + 2 * pw - kw) // sw + 1

    def _check_bn(self, name: str, m: nn.Module, c: int) -> None:
        if type(m) not in (nn.BatchNorm2d, nn.BatchNorm1d):
            self._fail(name, f"{type(m).__name__} is not a BatchNorm")
        if m.num_features != c:
            self._fail(name, f"{m.num_features} features for {c} channels")
        if m.running_mean is None or m.running_var is None:
            self._fail(name, "BatchNorm without running statistics")

    # -- NCHW ops: the stem of every target

    def _conv_nchw(self, name: str, m: nn.Module, x: _T) -> _T:
        """A standard ``Conv`` (W32A1: after an exact ``Where(x >= 0, 1, -1)``)."""
        kind = self._check_conv(name, m)
        if kind == "W1A1":
            self._fail(name, "a W1A1 conv before the binary body (e.g. a binary stem)")
        (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
        g = self.g
        inp = self._sign(name, x, 1.0, -1.0, np.float32) if kind == "W32A1" else x.name
        ins = [inp, g.init(f"{name}.weight", float_weight(m.weight))]
        if m.bias is not None:
            ins.append(g.init(f"{name}.bias", float_weight(m.bias)))
        y = g.op("Conv", ins, name, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw])
        out = _T(y, "nchw", m.out_channels, *self._conv_out(m, x))
        self._probe(name, m, [x], out)
        return out

    def _bn_nchw(self, name: str, m: nn.Module, x: _T) -> _T:
        """A standard ``BatchNormalization``."""
        self._check_bn(name, m, x.c)
        g = self.g
        with torch.no_grad():
            ins = [x.name] + [
                g.init(f"{name}.{k}", float_weight(t))
                for k, t in (
                    ("weight", m.weight if m.weight is not None else torch.ones(x.c)),
                    ("bias", m.bias if m.bias is not None else torch.zeros(x.c)),
                    ("running_mean", m.running_mean),
                    ("running_var", m.running_var),
                )
            ]
        out = _T(g.op("BatchNormalization", ins, name, epsilon=float(m.eps)), x.layout, x.c, x.h, x.w)
        self._probe(name, m, [x], out)
        return out

    def _bn_channels_last(self, name: str, m: nn.Module, x: _T) -> _T:
        """A BatchNorm on the last axis of ``flat`` (B, HW, C) or ``vec`` (B, C): ``x * a + b``."""
        self._check_bn(name, m, x.c)
        a, b = bn_affine(m)
        g = self.g
        mul = g.op("Mul", [x.name, self._per_channel(f"{name}.scale", a, x)], f"{name}/mul")
        out = _T(g.op("Add", [mul, self._per_channel(f"{name}.shift", b, x)], name), x.layout, x.c, x.h, x.w)
        self._probe(name, m, [x], out)
        return out

    def act(self, name: str, m: nn.Module, x: _T) -> _T:
        g = self.g
        if type(m) is nn.Identity:
            return x
        if type(m) is nn.ReLU:
            y = g.op("Relu", [x.name], name)
        elif type(m) is nn.Hardtanh:
            lo, hi = g.const(float(m.min_val), np.float32), g.const(float(m.max_val), np.float32)
            y = g.op("Clip", [x.name, lo, hi], name)
        elif type(m) is nn.PReLU:
            slope = float_weight(m.weight)
            if slope.size not in (1, x.c):
                self._fail(name, f"PReLU with {slope.size} slopes for {x.c} channels")
            if slope.size > 1 and x.layout == "nchw":  # the stem's, or a float body's
                slope = slope.reshape(-1, 1, 1)
            y = g.op("PRelu", [x.name, g.init(f"{name}.weight", slope)], name)
        else:
            self._fail(
                name, f"activation {type(m).__name__} has no lowering (supported: ReLU, Hardtanh, PReLU, Identity)"
            )
        out = _T(y, x.layout, x.c, x.h, x.w)
        self._probe(name, m, [x], out)
        return out

    def maxpool(self, name: str, mp: nn.Module, x: _T) -> _T:
        if type(mp) is nn.Identity:
            return x
        if type(mp) is not nn.MaxPool2d:
            self._fail(name, f"{type(mp).__name__} has no lowering")
        k, s, p = (v if isinstance(v, int) else v[0] for v in (mp.kernel_size, mp.stride, mp.padding))
        if mp.dilation not in (1, (1, 1)):
            self._fail(name, "dilation")
        y = self.g.op(
            "MaxPool",
            [x.name],
            name,
            kernel_shape=[k, k],
            strides=[s, s],
            pads=[p, p, p, p],
            ceil_mode=int(mp.ceil_mode),
        )
        return _T(y, "nchw", x.c, _pool_out(x.h, k, s, p, mp.ceil_mode), _pool_out(x.w, k, s, p, mp.ceil_mode))

    # -- the body: the target's

    def enter_body(self, x: _T) -> _T:
        """The stem's NCHW output in the body's layout."""
        return x

    def conv(self, name: str, m: nn.Module, x: _T) -> _T:
        raise NotImplementedError

    def bn(self, name: str, m: nn.Module, x: _T) -> _T:
        raise NotImplementedError

    def _shortcut_pool(self, name: str, y: str, x: _T, s: int) -> Tuple[str, int, int]:
        """``(tensor, h, w)``: an s x s, stride-s, ceil-mode average pool of ``x`` (``y``)."""
        raise NotImplementedError

    def _channel_pads(self, extra: int) -> List[int]:
        """``Pad``'s pads appending ``extra`` zero channels."""
        raise NotImplementedError

    def conv_bn(self, conv_name: str, conv: nn.Module, bn_name: str, bn: nn.Module, x: _T) -> _T:
        """A conv and its BatchNorm."""
        return self.bn(bn_name, bn, self.conv(conv_name, conv, x))

    def pad_shortcut(self, name: str, m: nn.Module, x: _T) -> _T:
        if type(m) is nn.Identity:
            return x
        if type(m) is not PadShortcut:
            self._fail(name, f"shortcut {type(m).__name__} has no lowering")
        g = self.g
        y, h, w = x.name, x.h, x.w
        s = int(m.stride)
        if s > 1:
            y, h, w = self._shortcut_pool(name, y, x, s)
        if m.extra:
            y = g.op(
                "Pad",
                [y, g.const(self._channel_pads(m.extra), np.int64), g.const(0.0, np.float32)],
                f"{name}/pad_channels",
            )
        out = _T(y, x.layout, x.c + m.extra, h, w)
        self._probe(name, m, [x], out)
        return out

    def downsample(self, name: str, m: nn.Module, x: _T) -> _T:
        if type(m) is not nn.Sequential or len(m) != 2:
            self._fail(name, f"downsample {type(m).__name__} is not Sequential(conv, bn)")
        y = self.conv_bn(f"{name}.0", m[0], f"{name}.1", m[1], x)
        self._probe(name, m, [x], y)
        return y

    def shortcut(self, name: str, b: nn.Module, x: _T) -> _T:
        """The block's shortcut branch: its downsample (conv, bn) or its parameter-free shortcut."""
        if b.downsample is not None:
            return self.downsample(f"{name}.downsample", b.downsample, x)
        return self.pad_shortcut(f"{name}.shortcut", b.shortcut, x)

    def add(self, name: str, a: _T, b: _T) -> _T:
        if (a.layout, a.c, a.h, a.w) != (b.layout, b.c, b.h, b.w):
            self._fail(name, f"residual shapes differ: {a} vs {b}")
        return _T(self.g.op("Add", [a.name, b.name], name), a.layout, a.c, a.h, a.w)

    def _check_block(self, name: str, b: nn.Module) -> None:
        if type(b) is not BasicBlock:
            self._fail(name, f"block {type(b).__name__} has no lowering (only BasicBlock)")

    def block(self, name: str, b: nn.Module, x: _T) -> _T:
        self._check_block(name, b)
        sc = self.shortcut(name, b, x)
        c1 = self.conv_bn(f"{name}.conv1", b.conv1, f"{name}.bn1", b.bn1, x)
        if b.bireal:
            h = self.act(f"{name}.act1", b.act1, self.add(f"{name}/add1", c1, sc))
            c2 = self.conv_bn(f"{name}.conv2", b.conv2, f"{name}.bn2", b.bn2, h)
            y = self.act(f"{name}.act2", b.act2, self.add(f"{name}/add2", c2, h))
        else:
            h = self.act(f"{name}.act1", b.act1, c1)
            c2 = self.conv_bn(f"{name}.conv2", b.conv2, f"{name}.bn2", b.bn2, h)
            y = self.act(f"{name}.act2", b.act2, self.add(f"{name}/add2", c2, sc))
        self._probe(name, b, [x], y)
        return y

    # -- the whole network

    def opsets(self) -> list:
        return [helper.make_opsetid("", OPSET)]

    def head(self, x: _T) -> str:
        """Global pool, head BatchNorm and fc: the logits."""
        m, g = self.model, self.g
        gp = m.global_pool
        if type(gp) is not nn.AdaptiveAvgPool2d or gp.output_size not in (1, (1, 1)):
            self._fail("global_pool", f"{gp} (only AdaptiveAvgPool2d(1) lowers)")
        v = _T(g.op("ReduceMean", [x.name], "global_pool", axes=list(self.pool_axes), keepdims=0), "vec", x.c)
        if type(m.flatten) is not nn.Flatten or m.flatten.start_dim != 1:
            self._fail("flatten", f"{m.flatten} (only Flatten(1) lowers)")
        if type(m.head_bn) is not nn.Identity:
            v = self._bn_channels_last("head_bn", m.head_bn, v)
        fc = m.fc
        if type(fc) is not nn.Linear:
            self._fail("fc", f"{type(fc).__name__} is not Linear")
        ins = [v.name, g.init("fc.weight", float_weight(fc.weight))]
        if fc.bias is not None:
            ins.append(g.init("fc.bias", float_weight(fc.bias)))
        logits = g.op("Gemm", ins, "fc", transB=1)
        self._probe("fc", fc, [v], _T(logits, "vec", self.num_classes))
        return logits

    def build(self):
        """Return the ONNX ``ModelProto`` (no metadata yet)."""
        m, g = self.model, self.g
        c, h, w = self.input_shape
        x = _T(INPUT_NAME, "nchw", c, h, w)
        x = self._conv_nchw("conv1", m.conv1, x)
        x = self._bn_nchw("bn1", m.bn1, x)
        x = self.act("act1", m.act1, x)
        x = self.maxpool("maxpool", m.maxpool, x)
        x = self.enter_body(x)
        for stage in m.stage_names:
            for i, blk in enumerate(getattr(m, stage)):
                x = self.block(f"{stage}.{i}", blk, x)
        final = g.op("Identity", [self.head(x)], OUTPUT_NAME)
        assert final == OUTPUT_NAME
        graph = helper.make_graph(
            g.nodes,
            self.name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", self.num_classes])],
            g.inits,
        )
        model = helper.make_model(
            graph, opset_imports=self.opsets(), producer_name="bnn-distill", producer_version=_version()
        )
        model.ir_version = IR_VERSION
        return model


class FloatLowering(Lowering):
    """FP and W32A1 models: NCHW throughout, standard ``Conv`` and ``BatchNormalization``."""

    def conv(self, name: str, m: nn.Module, x: _T) -> _T:
        return self._conv_nchw(name, m, x)

    def bn(self, name: str, m: nn.Module, x: _T) -> _T:
        return self._bn_nchw(name, m, x)

    def _shortcut_pool(self, name: str, y: str, x: _T, s: int) -> Tuple[str, int, int]:
        y = self.g.op(
            "AveragePool", [y], f"{name}/avgpool", kernel_shape=[s, s], strides=[s, s], ceil_mode=1, count_include_pad=0
        )
        return y, _pool_out(x.h, s, s), _pool_out(x.w, s, s)

    def _channel_pads(self, extra: int) -> List[int]:
        return [0, 0, 0, 0, 0, extra, 0, 0]
