"""ONNX export of a trained run: the binary student in exact integer form, FP32 references, parity.

``bnn-distill export RUN`` writes, into ``export/<run-name>/``:

* ``student_binary.onnx``: the binary student as stock onnxruntime runs it exactly and fast;
* ``student_fp32.onnx``: the same student with quantisation off (its real-valued weights, no sign);
* ``teacher_fp32.onnx``: the full-precision teacher;
* ``parity.json``: PyTorch vs onnxruntime on the whole test split, per model;
* ``manifest.json``: files, opset, input and output, normalisation, classes, the run's fingerprint.

How a W1A1 convolution is lowered (only standard ONNX ops, default domain). Activations stay
channels-last and spatially flattened, ``(B, H*W, C)``, through the whole binary body:

1. ``code = Where(x >= 0, 2, 0)`` as uint8: ``sign(x)`` with ``sign(0) = +1``, encoded with zero
   point 1, so ``code - 1`` is exactly -1 or +1;
2. im2col: ``Pad`` appends one row of code 1 (``1 - 1 = 0``: the conv's zero padding), then
   ``Gather`` on precomputed flat indices gives ``(B, Ho*Wo, kh*kw*Cin)``;
3. ``DequantizeLinear`` (scale 1, zero point 1) on the codes and ``DequantizeLinear`` (zero point
   0, one float scale per output channel) on the int8 ±1 weight matrix, into ``MatMul``.
   onnxruntime fuses the three into ``MatMulIntegerToFloat``: int32 accumulation, then one float
   multiply per output. The weights come from the layer's own quantiser (``alpha_c * sign(w~)``);
   the per-channel scale is ``alpha_c`` times the following BatchNorm's multiplier, so that
   multiply is free (a negative product flips the channel's ±1 weights instead).
4. The BatchNorm's shift is a per-channel ``Add`` after the product, then the residual ``Add``
   and the activation.

The file stays small (for the quick recipe's student, below the native file): the int8 weights
are stored as packed bits expanded by a ``Gather`` on a shared 256 x 8 table of +-1 rows, the
im2col indices once per geometry in uint8/uint16 with a ``Cast``, and per-channel constants once
per channel with an ``Expand`` where they are tiled. Those subgraphs take only constants, so
onnxruntime folds them when the session loads: the graph it runs is the same as with everything
expanded in the file.

FP and W32A1 models are lowered in NCHW with standard ``Conv``/``BatchNormalization`` (W32A1 after
an exact ``Where(x >= 0, 1, -1)``). Anything this module does not know how to lower stops the
export with a :class:`UserError` naming the layer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint import atomic_write_bytes
from .errors import UserError

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; readable by every onnxruntime since 1.11
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORT_FORMAT = "bnn-distill-export/1"
#: Per-channel constants of flat maps up to this size are stored tiled over positions (speed).
TILE_BYTES = 64 * 1024
MANIFEST = "manifest.json"
PARITY = "parity.json"
STALE_FILES = ("bench.json", "bench.md", "bench.png")
MODEL_FILES = {"teacher": "teacher_fp32.onnx", "student_fp32": "student_fp32.onnx",
               "student_binary": "student_binary.onnx", "student_native": "student_binary_native.onnx"}
RUNTIMES = ("standard", "native")
#: Logit tolerance, relative to ``max(1, max |logit|)`` of the PyTorch model. FP32 graphs differ by
#: summation order only; the binary graph's products are exact where PyTorch's float conv rounds,
#: so a pre-sign value within rounding of 0 can flip a sign (rare; top-1 must still agree).
RTOL = {"teacher": 1e-4, "student_fp32": 1e-4, "student_binary": 1e-3, "student_native": 1e-3}


class ExportError(UserError):
    """A model that cannot be lowered, or an export whose parity check failed."""


# ---------------------------------------------------------------- graph building


@dataclass(frozen=True)
class _T:
    """A tensor in the graph: ``nchw`` is (B, C, H, W), ``flat`` is (B, H*W, C), ``vec`` is (B, C),
    ``bits`` is packed signs (B, H*W, ceil(C/64)) uint64 between native nodes."""

    name: str
    layout: str
    c: int
    h: int = 1
    w: int = 1


@dataclass
class Probe:
    """A lowered module: its graph inputs and output, to compare with PyTorch layer by layer.

    ``in_path``/``out_path``: the model's modules whose input and output these tensors are (they
    differ for a binary conv lowered together with its BatchNorm).
    """

    name: str
    module: nn.Module
    inputs: List[_T]
    output: _T
    in_path: str = ""
    out_path: str = ""

    def __post_init__(self):
        self.in_path = self.in_path or self.name
        self.out_path = self.out_path or self.name


class _Graph:
    """Nodes and initializers, with unique names derived from module paths."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._used: set = set()
        self._consts: Dict[Tuple, str] = {}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name

    def init(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype) -> str:
        """A shared scalar or small constant (``Pad`` values, ``Where`` branches, shapes)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{arr.dtype.name}_{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.fresh(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def shared(self, key: Tuple, make) -> str:
        """A tensor built once per ``key`` by ``make()`` (e.g. the im2col indices of one geometry)."""
        if key not in self._consts:
            self._consts[key] = make()
        return self._consts[key]

    def indices(self, base: str, idx: np.ndarray, key: Tuple) -> str:
        """Gather indices, one copy per ``key``: stored in the smallest unsigned type that holds them
        and cast to int32 in the graph (a constant subgraph: onnxruntime folds it when the session loads)."""
        def make() -> str:
            top = int(idx.max()) if idx.size else 0
            small = next((t for t in (np.uint8, np.uint16) if top <= np.iinfo(t).max), None)
            if small is None:
                return self.init(base, idx.astype(np.int32))
            return self.op("Cast", [self.init(base, idx.astype(small))], f"{base}/int32", to=_onnx_dtype(np.int32))
        return self.shared(("indices",) + key, make)

    def sign_matrix(self, base: str, q: np.ndarray) -> str:
        """An int8 +-1 matrix stored as packed bits (bit j of byte i is entry ``8 i + j`` in row-major
        order, 1 for -1), expanded in the graph by a ``Gather`` on a shared (256, 8) table of +-1 rows:
        a constant subgraph that onnxruntime folds back into the int8 initializer when the session loads."""
        flat = np.asarray(q).reshape(-1)
        pad = (-flat.size) % 8
        bits = np.packbits(np.concatenate([flat < 0, np.zeros(pad, bool)]), bitorder="little")
        table = self.shared(("sign_table",), lambda: self.init(
            "const_sign_table", np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                                                       bitorder="little") == 1, -1, 1).astype(np.int8)))
        idx = self.op("Cast", [self.init(f"{base}_bits", bits)], f"{base}/index", to=_onnx_dtype(np.int32))
        rows = self.op("Gather", [table, idx], f"{base}/unpack", axis=0)  # (bytes, 8)
        if pad:
            rows = self.op("Reshape", [rows, self.const([-1], np.int64)], f"{base}/flat")
            rows = self.op("Slice", [rows, self.const([0], np.int64), self.const([flat.size], np.int64)], f"{base}/trim")
        return self.op("Reshape", [rows, self.const(list(q.shape), np.int64)], base)


def _onnx_dtype(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def im2col_indices(h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> np.ndarray:
    """Flat source index of every (output position, kernel tap): shape (Ho*Wo, kh*kw), int32.

    Source positions outside the input map to ``h * w``: the extra row that ``Pad`` appends, which
    holds the padding value. Taps are ordered (kh, kw), matching the weight matrix's K order.
    """
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    i = (np.arange(ho) * sh - ph)[:, None, None, None] + np.arange(kh)[None, None, :, None]  # (Ho,1,kh,1)
    j = (np.arange(wo) * sw - pw)[None, :, None, None] + np.arange(kw)[None, None, None, :]  # (1,Wo,1,kw)
    valid = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    idx = np.where(valid, i * w + j, h * w)  # (Ho, Wo, kh, kw)
    return idx.reshape(ho * wo, kh * kw).astype(np.int32)


def _pool_out(size: int, k: int, s: int, p: int = 0, ceil: bool = True) -> int:
    """Output size of a pool (PyTorch's rule: a ceil-mode window must start inside input or left padding)."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def avgpool_indices(h: int, w: int, k: int) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """Taps of a k x k, stride-k, ceil-mode average pool without padding, as for :class:`PadShortcut`.

    Returns ``(idx, count, ho, wo)``: ``idx`` (k*k, Ho*Wo) int32 with ``h*w`` for taps outside the
    input (a zero row), and ``count`` (Ho*Wo, 1) float32 of in-bounds taps (PyTorch's divisor with
    ``count_include_pad=False``).
    """
    ho, wo = _pool_out(h, k, k), _pool_out(w, k, k)
    oh = np.arange(ho)[:, None, None, None] * k + np.arange(k)[None, None, :, None]
    ow = np.arange(wo)[None, :, None, None] * k + np.arange(k)[None, None, None, :]
    valid = (oh < h) & (ow < w)
    idx = np.where(valid, oh * w + ow, h * w).reshape(ho * wo, k * k)
    count = valid.reshape(ho * wo, k * k).sum(1, keepdims=True).astype(np.float32)
    return idx.T.astype(np.int32).copy(), count, ho, wo


def _conv_kind(m: nn.Module) -> str:
    """``FP``, ``W32A1`` or ``W1A1`` for a conv layer; raises for anything else."""
    from .quant import layer_bits

    bits = layer_bits(m)
    if bits == (32, 32) and type(m) is nn.Conv2d:
        return "FP"
    if bits == (32, 1):
        return "W32A1"
    if bits == (1, 1):
        return "W1A1"
    raise ExportError(f"cannot lower {type(m).__name__} with (weight, activation) bits {bits}")


def binary_weight_matrix(conv: nn.Module, bn_scale: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The conv's binary weights from its own quantiser: ``(int8 ±1 matrix (K, N), scale (N,))``.

    ``K`` is ordered (kh, kw, Cin) to match the im2col taps. The quantiser's ``alpha_c * (±1)`` is
    checked to reproduce the module's ``quant_weight()`` exactly. The returned scale is
    ``|alpha_c * bn_scale_c|`` (``bn_scale`` folds the following BatchNorm's multiplier in, in float32),
    with the sign of a negative product moved into the ±1 weights.
    """
    with torch.no_grad():
        qw = conv.quant_weight()
        value = qw.value.detach().float()  # (N, Cin, kh, kw) = alpha_c * sign(w~)
        scale = qw.scale.detach().float().reshape(-1)  # (N,)
    n = value.shape[0]
    s = scale.view(n, 1, 1, 1)
    nonzero = (s != 0).expand_as(value)
    q = torch.where(nonzero, value / torch.where(s != 0, s, torch.ones_like(s)), torch.ones_like(value))
    if not bool((q.abs() == 1).all()) or not torch.equal(q * s, value):
        raise ExportError("binary weights are not alpha_c * (+-1) per output channel")
    if bn_scale is not None:
        scale = scale * torch.from_numpy(np.asarray(bn_scale, dtype=np.float32))
    flip = (scale < 0).view(n, 1, 1, 1)  # s_c * q == |s_c| * (-q) when s_c < 0
    q = torch.where(flip, -q, q)
    scale = scale.abs()
    mat = q.permute(2, 3, 1, 0).reshape(-1, n)  # (kh*kw*Cin, N)
    return mat.numpy().astype(np.int8), scale.numpy().astype(np.float32)


def bn_affine(bn: nn.Module) -> Tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm as ``y = x * a + b``, computed as PyTorch's CPU kernel does (float32)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError("BatchNorm without running statistics")
    with torch.no_grad():
        var, mean = bn.running_var.float(), bn.running_mean.float()
        w = bn.weight.float() if bn.weight is not None else torch.ones_like(var)
        b = bn.bias.float() if bn.bias is not None else torch.zeros_like(var)
        invstd = 1.0 / torch.sqrt(var + bn.eps)
        a = invstd * w
        return a.numpy(), (b - mean * a).numpy()


class _FusedConv(nn.Module):
    """PyTorch reference of a fused native node: ``act(bn(conv(x)) [+ residual])``."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module, shortcut: Optional[nn.Module] = None,
                 sign_out: bool = False):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.sign_out = sign_out  # a ...ToBits node: the sign (+-1) of the result, as the next conv takes it

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = self.bn(self.conv(x))
        y = self.act(y if residual is None else y + self.shortcut(residual))
        return torch.where(y >= 0, 1.0, -1.0).to(y.dtype) if self.sign_out else y


class Lowering:
    """Lowers one :class:`~bnn_distill.models.ResNet` (eval mode) to an ONNX graph.

    A model with W1A1 convs gets the ``flat`` (channels-last) body and the integer form; FP and
    W32A1 models stay NCHW with standard ``Conv``. Every lowered module is recorded as a
    :class:`Probe` for the parity diagnosis.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], name: str = "model", native: bool = False):
        from .models import ResNet

        if not isinstance(model, ResNet):
            raise ExportError(f"cannot lower a {type(model).__name__}: only bnn_distill ResNet models export")
        self.model = model.eval()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.name = name
        self.g = _Graph()
        self.probes: List[Probe] = []
        kinds = set()
        for mname, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                try:
                    kinds.add(_conv_kind(m))
                except ExportError as e:
                    raise ExportError(f"cannot lower layer '{mname}': {e}") from None
        self.binary = "W1A1" in kinds
        self.layout = "flat" if self.binary else "nchw"
        self.native = native and self.binary
        self.num_classes = int(model.fc.out_features)

    # -- helpers

    def _fail(self, name: str, what: str):
        raise ExportError(f"cannot lower layer '{name}': {what}")

    def _probe(self, name: str, module: nn.Module, inputs: List[_T], out: _T, in_path: str = "",
               out_path: str = "") -> None:
        self.probes.append(Probe(name, module, inputs, out, in_path, out_path))

    def _per_channel(self, name: str, values: np.ndarray, t: _T) -> str:
        """A constant broadcast over ``t``'s positions: (C,) or (H*W, 1). In the flat layout a small map
        gets it tiled to (H*W, C): onnxruntime broadcasts a short last axis element-row by row."""
        values = np.asarray(values, dtype=np.float32)
        stored = self.g.init(name, np.ascontiguousarray(values))
        if t.layout == "flat" and t.h * t.w * t.c * 4 <= TILE_BYTES:
            # the file keeps (C,); the tiling is a constant Expand that onnxruntime folds at load time
            return self.g.op("Expand", [stored, self.g.const([t.h * t.w, t.c], np.int64)], f"{name}/tiled")
        return stored

    def _to_flat(self, x: _T) -> _T:
        g = self.g
        t = g.op("Transpose", [x.name], "to_channels_last", perm=[0, 2, 3, 1])
        r = g.op("Reshape", [t, g.const([0, x.h * x.w, x.c], np.int64)], "to_flat")
        return _T(r, "flat", x.c, x.h, x.w)

    # -- modules

    def conv_bn(self, conv_name: str, conv: nn.Module, bn_name: str, bn: nn.Module, x: _T) -> _T:
        """A conv and its BatchNorm. A W1A1 conv in the binary body takes the BatchNorm's multiplier
        into its per-channel weight scale (free inside ``MatMulIntegerToFloat``); the BatchNorm's
        shift stays an ``Add`` after the product. Anything else: conv, then BatchNorm."""
        if x.layout != "flat" or not _is_w1a1(conv):
            return self.bn(bn_name, bn, self.conv(conv_name, conv, x))
        self._check_bn(bn_name, bn, conv.out_channels)
        a, b = bn_affine(bn)
        y = self.conv(conv_name, conv, x, bn_scale=a, probe=False)
        out = _T(self.g.op("Add", [y.name, self._per_channel(f"{bn_name}.shift", b, y)], bn_name), y.layout, y.c, y.h, y.w)
        pair = nn.Sequential(conv, bn)
        short = bn_name.rsplit(".", 1)[-1]
        self._probe(f"{conv_name}+{short}", pair, [x], out, in_path=conv_name, out_path=bn_name)
        return out

    def conv(self, name: str, m: nn.Module, x: _T, bn_scale: Optional[np.ndarray] = None, probe: bool = True) -> _T:
        if not isinstance(m, nn.Conv2d):
            self._fail(name, f"{type(m).__name__} is not a Conv2d")
        try:
            kind = _conv_kind(m)
        except ExportError as e:
            self._fail(name, str(e))
        if m.groups != 1 or tuple(m.dilation) != (1, 1):
            self._fail(name, f"groups={m.groups}, dilation={tuple(m.dilation)} (only groups=1, dilation=1 lower)")
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            self._fail(name, f"padding={m.padding!r}, padding_mode={m.padding_mode!r} (only explicit zero padding lowers)")
        if kind != "FP" and m.bias is not None:
            self._fail(name, "a quantised conv with a bias")
        kh, kw = m.kernel_size
        sh, sw = m.stride
        ph, pw = m.padding
        ho, wo = (x.h + 2 * ph - kh) // sh + 1, (x.w + 2 * pw - kw) // sw + 1
        n = m.out_channels
        g = self.g
        if x.layout == "nchw":
            if kind == "W1A1":
                self._fail(name, "a W1A1 conv before the binary body (e.g. a binary stem)")
            inp = self._sign(name, x, 1.0, -1.0, np.float32) if kind == "W32A1" else x.name
            wname = g.init(f"{name}.weight", m.weight.detach().float().numpy())
            ins = [inp, wname] + ([g.init(f"{name}.bias", m.bias.detach().float().numpy())] if m.bias is not None else [])
            y = g.op("Conv", ins, name, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw])
            out = _T(y, "nchw", n, ho, wo)
        else:
            if kind == "W1A1":
                code = self._sign(name, x, 2, 0, np.uint8)  # +1 -> 2, -1 -> 0; zero point 1
                cols = self._im2col(name, code, x, (kh, kw, sh, sw, ph, pw), g.const(1, np.uint8))
                a = g.op("DequantizeLinear", [cols, g.const(1.0, np.float32), g.const(1, np.uint8)], f"{name}/dq_input")
                wq, scale = binary_weight_matrix(m, bn_scale)
                # no weight zero point (it is 0): onnxruntime then runs the int8 product without a
                # per-column zero-point correction
                wdq = g.op("DequantizeLinear", [g.sign_matrix(f"{name}.weight_int8", wq), g.init(f"{name}.weight_scale", scale)],
                           f"{name}/dq_weight", axis=1)
                y = g.op("MatMul", [a, wdq], name)
            else:
                inp = self._sign(name, x, 1.0, -1.0, np.float32) if kind == "W32A1" else x.name
                cols = self._im2col(name, inp, x, (kh, kw, sh, sw, ph, pw), g.const(0.0, np.float32))
                wmat = m.weight.detach().float().permute(2, 3, 1, 0).reshape(-1, n).numpy()
                y = g.op("MatMul", [cols, g.init(f"{name}.weight_matrix", wmat)], name)
                if m.bias is not None:
                    y = g.op("Add", [y, g.init(f"{name}.bias", m.bias.detach().float().numpy())], f"{name}/bias")
            out = _T(y, "flat", n, ho, wo)
        assert bn_scale is None or kind == "W1A1"
        if probe:
            self._probe(name, m, [x], out)
        return out

    def _sign(self, name: str, x: _T, pos, neg, dtype) -> str:
        """``Where(x >= 0, pos, neg)``: the sign with ``sign(0) = +1``, exactly as in training."""
        g = self.g
        ge = g.op("GreaterOrEqual", [x.name, g.const(0.0, np.float32)], f"{name}/sign_ge")
        return g.op("Where", [ge, g.const(pos, dtype), g.const(neg, dtype)], f"{name}/sign")

    def _im2col(self, name: str, src: str, x: _T, geom, pad_value: str) -> str:
        """(B, H*W, C) -> (B, Ho*Wo, kh*kw*C) by Pad (one extra row of ``pad_value``) and Gather."""
        kh, kw, sh, sw, ph, pw = geom
        g = self.g
        if (kh, kw, ph, pw) == (1, 1, 0, 0) and (sh, sw) == (1, 1):
            return src
        idx = im2col_indices(x.h, x.w, kh, kw, sh, sw, ph, pw)  # (M, kh*kw)
        if kh * kw == 1:
            idx = idx[:, 0]
        if (idx == x.h * x.w).any():
            src = g.op("Pad", [src, g.const([0, 0, 0, 0, 1, 0], np.int64), pad_value], f"{name}/pad")
        index = g.indices(f"im2col_index_{x.h}x{x.w}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}", idx,
                          ("im2col", x.h, x.w, kh, kw, sh, sw, ph, pw))  # shared by the layers of one geometry
        cols = g.op("Gather", [src, index], f"{name}/im2col", axis=1)
        if kh * kw == 1:
            return cols
        return g.op("Reshape", [cols, g.const([0, idx.shape[0], kh * kw * x.c], np.int64)], f"{name}/cols")

    def _check_bn(self, name: str, m: nn.Module, c: int) -> None:
        if type(m) not in (nn.BatchNorm2d, nn.BatchNorm1d):
            self._fail(name, f"{type(m).__name__} is not a BatchNorm")
        if m.num_features != c:
            self._fail(name, f"{m.num_features} features for {c} channels")
        if m.running_mean is None or m.running_var is None:
            self._fail(name, "BatchNorm without running statistics")

    def bn(self, name: str, m: nn.Module, x: _T) -> _T:
        self._check_bn(name, m, x.c)
        a, b = bn_affine(m)
        g = self.g
        if x.layout == "nchw":
            with torch.no_grad():
                ins = [x.name] + [g.init(f"{name}.{k}", t.detach().float().numpy()) for k, t in (
                    ("weight", m.weight if m.weight is not None else torch.ones(x.c)),
                    ("bias", m.bias if m.bias is not None else torch.zeros(x.c)),
                    ("running_mean", m.running_mean), ("running_var", m.running_var))]
            y = g.op("BatchNormalization", ins, name, epsilon=float(m.eps))
        else:  # flat (B, HW, C) or vec (B, C): per-channel scale on the last axis
            mul = g.op("Mul", [x.name, self._per_channel(f"{name}.scale", a, x)], f"{name}/mul")
            y = g.op("Add", [mul, self._per_channel(f"{name}.shift", b, x)], name)
        out = _T(y, x.layout, x.c, x.h, x.w)
        self._probe(name, m, [x], out)
        return out

    def act(self, name: str, m: nn.Module, x: _T) -> _T:
        g = self.g
        if type(m) is nn.Identity:
            return x
        if type(m) is nn.ReLU:
            y = g.op("Relu", [x.name], name)
        elif type(m) is nn.Hardtanh:
            y = g.op("Clip", [x.name, g.const(float(m.min_val), np.float32), g.const(float(m.max_val), np.float32)], name)
        elif type(m) is nn.PReLU:
            slope = m.weight.detach().float().numpy()
            if slope.size not in (1, x.c):
                self._fail(name, f"PReLU with {slope.size} slopes for {x.c} channels")
            if slope.size > 1 and x.layout == "nchw":
                slope = slope.reshape(-1, 1, 1)
            y = g.op("PRelu", [x.name, g.init(f"{name}.weight", slope)], name)
        else:
            self._fail(name, f"activation {type(m).__name__} has no lowering (supported: ReLU, Hardtanh, PReLU, Identity)")
        out = _T(y, x.layout, x.c, x.h, x.w)
        self._probe(name, m, [x], out)
        return out

    def pad_shortcut(self, name: str, m: nn.Module, x: _T) -> _T:
        from .models import PadShortcut

        if type(m) is nn.Identity:
            return x
        if type(m) is not PadShortcut:
            self._fail(name, f"shortcut {type(m).__name__} has no lowering")
        g = self.g
        y, h, w = x.name, x.h, x.w
        s = int(m.stride)
        if s > 1:
            if x.layout == "nchw":
                y = g.op("AveragePool", [y], f"{name}/avgpool", kernel_shape=[s, s], strides=[s, s], ceil_mode=1,
                         count_include_pad=0)
                h, w = _pool_out(h, s, s), _pool_out(w, s, s)
            else:
                # (B, H*W, C) viewed as a one-channel 3-D map (B, 1, H, W, C): an s x s x 1 average pool
                # is PyTorch's s x s pool of every channel (same taps, divisor and summation order)
                ho, wo = _pool_out(h, s, s), _pool_out(w, s, s)
                v = g.op("Reshape", [y, g.const([0, 1, h, w, x.c], np.int64)], f"{name}/as_3d")
                v = g.op("AveragePool", [v], f"{name}/avgpool3d", kernel_shape=[s, s, 1], strides=[s, s, 1],
                         ceil_mode=1, count_include_pad=0)
                y = g.op("Reshape", [v, g.const([0, ho * wo, x.c], np.int64)], f"{name}/avgpool")
                h, w = ho, wo
        if m.extra:
            pads = [0, 0, 0, 0, 0, m.extra, 0, 0] if x.layout == "nchw" else [0, 0, 0, 0, 0, m.extra]
            y = g.op("Pad", [y, g.const(pads, np.int64), g.const(0.0, np.float32)], f"{name}/pad_channels")
        out = _T(y, x.layout, x.c + m.extra, h, w)
        self._probe(name, m, [x], out)
        return out

    def downsample(self, name: str, m: nn.Module, x: _T) -> _T:
        if type(m) is not nn.Sequential or len(m) != 2:
            self._fail(name, f"downsample {type(m).__name__} is not Sequential(conv, bn)")
        y = self.conv_bn(f"{name}.0", m[0], f"{name}.1", m[1], x)
        self._probe(name, m, [x], y)
        return y

    def add(self, name: str, a: _T, b: _T) -> _T:
        if (a.layout, a.c, a.h, a.w) != (b.layout, b.c, b.h, b.w):
            self._fail(name, f"residual shapes differ: {a} vs {b}")
        return _T(self.g.op("Add", [a.name, b.name], name), a.layout, a.c, a.h, a.w)

    def block(self, name: str, b: nn.Module, x: _T) -> _T:
        from .models import BasicBlock

        if type(b) is not BasicBlock:
            self._fail(name, f"block {type(b).__name__} has no lowering (only BasicBlock)")
        from .models import PadShortcut

        native = self.native and x.layout == "flat" and _is_w1a1(b.conv1) and _is_w1a1(b.conv2)
        if native and b.bireal and b.downsample is None and type(b.shortcut) is PadShortcut \
                and b.shortcut.stride == b.conv1.stride[0] == b.conv1.stride[1]:
            # the parameter-free shortcut (pool + zero channels) runs inside the op, on the conv's input
            h = self.native_conv(name, "1", b, x, residual=x, pooled=b.shortcut)
            y = self.native_conv(name, "2", b, h, residual=h)
            self._probe(name, b, [x], y)
            return y
        sc = self.downsample(f"{name}.downsample", b.downsample, x) if b.downsample is not None \
            else self.pad_shortcut(f"{name}.shortcut", b.shortcut, x)
        if native:
            if b.bireal:
                h = self.native_conv(name, "1", b, x, residual=sc)
                y = self.native_conv(name, "2", b, h, residual=h)
            else:  # conv1's output only feeds conv2's sign: BatchNorm + sign as integer thresholds
                h = self.native_conv(name, "1", b, x, residual=None, to_bits=True)
                y = self.native_conv(name, "2", b, h, residual=sc)
            self._probe(name, b, [x], y)
            return y
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

    def native_conv(self, block: str, i: str, b: nn.Module, x: _T, residual: Optional[_T],
                    pooled: Optional[nn.Module] = None, to_bits: bool = False) -> _T:
        """conv{i} + bn{i} (+ residual) + act{i} of a block as one ``ai.bnn_distill::BinaryConv2d``:
        bit-packed XNOR-popcount conv, the BatchNorm folded into a per-channel scale and shift,
        the residual add and a clip activation fused (any other activation runs after it).
        ``pooled``: the block's parameter-free shortcut, applied by the op to ``residual`` (the
        conv's input): average pool by the conv's stride, then zero channels."""
        from . import native as nat

        conv, bn, act = getattr(b, f"conv{i}"), getattr(b, f"bn{i}"), getattr(b, f"act{i}")
        cname, bname, aname = f"{block}.conv{i}", f"{block}.bn{i}", f"{block}.act{i}"
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        ph, pw = conv.padding if not isinstance(conv.padding, str) else (-1, -1)
        if kh != kw or sh != sw or ph != pw or (kh, ph) not in ((3, 1), (1, 0)):
            self._fail(cname, f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}: the native "
                       "runtime runs square 3x3/pad 1 and 1x1/pad 0 binary convs; use --runtime standard")
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or conv.bias is not None:
            self._fail(cname, "groups, dilation, a padding mode or a bias the native runtime does not run; "
                       "use --runtime standard")
        self._check_bn(bname, bn, conv.out_channels)
        a, shift = bn_affine(bn)
        wq, scale = binary_weight_matrix(conv, a)  # (k*k*Cin, N), taps ordered (kh, kw, Cin)
        n, cin = conv.out_channels, conv.in_channels
        q = wq.reshape(kh, kw, cin, n).transpose(3, 2, 0, 1)  # (N, Cin, kh, kw)
        ho, wo = (x.h + 2 * ph - kh) // sh + 1, (x.w + 2 * pw - kw) // sw + 1
        lo, hi, fused = 0.0, 0.0, 0
        if type(act) is nn.Hardtanh:
            lo, hi, fused = float(act.min_val), float(act.max_val), 1
        elif type(act) is nn.ReLU:
            lo, hi, fused = 0.0, float(np.finfo(np.float32).max), 1
        elif type(act) is nn.Identity:
            fused = 1  # nothing to apply
        g = self.g
        from onnx import helper

        op = nat.OP_FROM_BITS if x.layout == "bits" else nat.OP
        thresholds = nat.sign_thresholds(scale, shift, act, kh * kw * cin) if to_bits and residual is None else None
        if thresholds is not None:  # packed signs out: the next binary conv reads them directly
            ins = [x.name, g.init(f"{cname}.weight_bits", nat.pack_weights(q)),
                   g.init(f"{cname}.border_correction", nat.border_corrections(q, ph)),
                   g.init(f"{bname}.sign_threshold", thresholds)]
            out = g.fresh(f"{aname}/sign_bits")
            g.nodes.append(helper.make_node(nat.OP_TO_BITS, ins, [out], name=out, domain=nat.DOMAIN, in_h=x.h, in_w=x.w,
                                            in_c=cin, out_c=n, kernel=kh, stride=sh, pad=ph))
            y = _T(out, "bits", n, ho, wo)
            self._probe(f"{cname}+bn{i}+act+sign", _FusedConv(conv, bn, act, sign_out=True), [x], y, in_path=cname,
                        out_path=aname)
            return y
        ins = [x.name, g.init(f"{cname}.weight_bits", nat.pack_weights(q)),
               g.init(f"{cname}.border_correction", nat.border_corrections(q, ph)),
               g.init(f"{cname}.scale", scale), g.init(f"{bname}.shift", np.asarray(shift, dtype=np.float32))]
        if residual is not None:
            want = (x.c, x.h, x.w) if pooled is not None else (n, ho, wo)
            if (residual.layout, residual.c, residual.h, residual.w) != ("flat",) + want or (pooled and cin > n):
                self._fail(f"{block}/add{i}", f"residual shapes differ: {residual} vs {want}")
            ins.append(residual.name)
        out = g.fresh(aname if fused else bname)
        g.nodes.append(helper.make_node(
            op, ins, [out], name=out, domain=nat.DOMAIN, in_h=x.h, in_w=x.w, in_c=cin, out_c=n, kernel=kh,
            stride=sh, pad=ph, act=int(fused and type(act) is not nn.Identity), act_min=lo, act_max=hi,
            residual=int(pooled is not None)))
        y = _T(out, "flat", n, ho, wo)
        ref = _FusedConv(conv, bn, act if fused else nn.Identity(), pooled)
        self._probe(f"{cname}+bn{i}" + ("+add" if residual is not None else "") + ("+act" if fused else ""),
                    ref, [x] + ([residual] if residual is not None else []), y, in_path=cname,
                    out_path=aname if fused else bname)
        return y if fused else self.act(aname, act, y)

    # -- the whole network

    def build(self):
        """Return the ONNX ``ModelProto`` (no metadata yet)."""
        from onnx import TensorProto, helper

        m, g = self.model, self.g
        c, h, w = self.input_shape
        x = _T(INPUT_NAME, "nchw", c, h, w)
        x = self.conv("conv1", m.conv1, x)
        x = self.bn("bn1", m.bn1, x)
        x = self.act("act1", m.act1, x)
        if type(m.maxpool) is nn.MaxPool2d:
            mp = m.maxpool
            k, s, p = (mp.kernel_size, mp.stride, mp.padding)
            k, s, p = (v if isinstance(v, int) else v[0] for v in (k, s, p))
            if mp.dilation not in (1, (1, 1)):
                self._fail("maxpool", "dilation")
            y = g.op("MaxPool", [x.name], "maxpool", kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p],
                     ceil_mode=int(mp.ceil_mode))
            x = _T(y, "nchw", x.c, _pool_out(x.h, k, s, p, mp.ceil_mode), _pool_out(x.w, k, s, p, mp.ceil_mode))
        elif type(m.maxpool) is not nn.Identity:
            self._fail("maxpool", f"{type(m.maxpool).__name__} has no lowering")
        if self.layout == "flat":
            x = self._to_flat(x)
        for stage in m.stage_names:
            for i, blk in enumerate(getattr(m, stage)):
                x = self.block(f"{stage}.{i}", blk, x)
        gp = m.global_pool
        if type(gp) is not nn.AdaptiveAvgPool2d or gp.output_size not in (1, (1, 1)):
            self._fail("global_pool", f"{gp} (only AdaptiveAvgPool2d(1) lowers)")
        pooled = g.op("ReduceMean", [x.name], "global_pool", axes=[2, 3] if x.layout == "nchw" else [1], keepdims=0)
        v = _T(pooled, "vec", x.c)
        if type(m.flatten) is not nn.Flatten or m.flatten.start_dim != 1:
            self._fail("flatten", f"{m.flatten} (only Flatten(1) lowers)")
        if type(m.head_bn) is not nn.Identity:
            v = self.bn("head_bn", m.head_bn, v)
        fc = m.fc
        if type(fc) is not nn.Linear:
            self._fail("fc", f"{type(fc).__name__} is not Linear")
        ins = [v.name, g.init("fc.weight", fc.weight.detach().float().numpy())]
        if fc.bias is not None:
            ins.append(g.init("fc.bias", fc.bias.detach().float().numpy()))
        logits = g.op("Gemm", ins, "fc", transB=1)
        self._probe("fc", fc, [v], _T(logits, "vec", self.num_classes))
        final = g.op("Identity", [logits], OUTPUT_NAME)
        assert final == OUTPUT_NAME
        graph = helper.make_graph(
            g.nodes, self.name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", self.num_classes])],
            g.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain for n in g.nodes):
            from .native import DOMAIN

            opsets.append(helper.make_opsetid(DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets,
                                  producer_name="bnn-distill", producer_version=_version())
        model.ir_version = IR_VERSION
        return model


def lower(model: nn.Module, input_shape: Sequence[int], name: str = "model", native: bool = False):
    """Lower a ResNet to ONNX; returns ``(ModelProto, probes)``. ``native``: binary blocks become
    ``ai.bnn_distill::BinaryConv2d`` nodes (see :mod:`bnn_distill.native`)."""
    low = Lowering(model, input_shape, name, native=native)
    return low.build(), low.probes


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- onnxruntime helpers


def ort_session(model, threads: Optional[int] = None, optimized_path: Optional[Path] = None,
                level: str = "all", spin: bool = True, native_lib: Optional[str] = None):
    """An onnxruntime CPU session for a ``ModelProto``, serialized bytes or a path.

    ``spin=False`` stops idle intra-op threads from spin-waiting: several sessions used in turn
    (an interleaved benchmark) otherwise steal each other's cores. A model with native
    (``ai.bnn_distill``) nodes gets the native library registered (``native_lib``, else the built one)."""
    import onnx
    import onnxruntime as ort

    from . import native

    so = ort.SessionOptions()
    proto = model if hasattr(model, "graph") else None
    if proto is None and isinstance(model, (str, Path)) and native_lib is None:
        proto = onnx.load(str(model), load_external_data=False)
    if native_lib is None and proto is not None and native.uses_native(proto):
        native_lib = str(native.library_path())
    if native_lib is not None:
        so.register_custom_ops_library(str(native_lib))
    so.log_severity_level = 3
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else (str(model) if isinstance(model, Path) else model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def optimized_op_counts(model, threads: int = 1, level: str = "all") -> Dict[str, int]:
    """Op types (``domain:op`` outside the default domain) of the graph onnxruntime runs after its
    optimizations (at ``level="all"`` including this CPU's NCHWc layout ops)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        ort_session(model, threads=threads, optimized_path=path, level=level)
        opt = onnx.load(str(path))
    counts: Dict[str, int] = {}
    for node in opt.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def fused_integer_matmuls(counts: Dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.endswith("MatMulIntegerToFloat"))


# ---------------------------------------------------------------- parity


@dataclass
class ParityResult:
    """PyTorch (eval mode) vs onnxruntime for one model over a set of images."""

    model: str
    n: int
    top1_agree: int
    max_abs_diff: float  # over every image
    max_abs_logit: float
    atol: float  # rtol * max(1, max |PyTorch logit|)
    rtol: float
    within_tol: int  # images whose logits all agree within atol
    max_abs_diff_within_tol: float
    sign_flips: List[Dict[str, Any]]  # images beyond atol, each explained by a near-zero sign
    torch_top1: Optional[float]
    onnx_top1: Optional[float]
    passed: bool
    first_divergence: Optional[Dict[str, Any]] = None
    #: images whose top-1 differs, each explained by a near-zero sign flip (allowed unless strict)
    top1_changed_by_flips: List[int] = field(default_factory=list)
    strict_top1: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


#: A sign decision may differ between PyTorch and onnxruntime only on a value this close to 0,
#: relative to the largest magnitude in that tensor (float32 rounding of a conv sum is ~1e-6).
FLIP_RTOL = 1e-4


def iter_batches(data, batch: int = 256):
    """Yield ``(x, y)``: float image batches (N, C, H, W) from a tensor (``y`` is None) or from a
    dataset of ``(image, label)`` pairs, without holding the whole split in memory."""
    from torch.utils.data import DataLoader

    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch):
            yield data[i:i + batch].float(), None
        return
    for x, y in DataLoader(data, batch_size=batch, shuffle=False, num_workers=0):
        yield x.float(), torch.as_tensor(y)


def _take(data, idx: Sequence[int]) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(np.asarray(idx, dtype=np.int64))].float()
    return torch.stack([torch.as_tensor(data[int(i)][0]) for i in idx]).float()


def check_parity(role: str, model: nn.Module, onnx_model, probes: List[Probe], data,
                 labels: Optional[torch.Tensor] = None, rtol: Optional[float] = None,
                 strict_top1: bool = False, progress: bool = False) -> ParityResult:
    """PyTorch vs onnxruntime on ``data``: an image tensor (N, C, H, W) or a dataset of (image, label).

    Passes when top-1 agrees on every image and every image's logits agree within ``atol``, except
    images whose difference is explained: every lowered layer matches PyTorch on its own graph
    inputs (:func:`diagnose`), and the first sign that differs was taken of a value within float32
    rounding of 0 (PyTorch's float conv rounds its sums; the integer graph's are exact, so such a
    value can land on the other side of 0). Otherwise names the first diverging layer.

    Such a flip can also change a near-tied prediction (about 1 image in 10,000 on a trained
    Fashion-MNIST ResNet-20). Those images are listed in ``top1_changed_by_flips``; they fail the
    check only with ``strict_top1``.
    """
    rtol = RTOL[role] if rtol is None else rtol
    sess = ort_session(onnx_model)
    model.eval()
    diffs, peaks, agrees, finites = [], [], [], []
    right_torch = right_onnx = seen = 0
    have_labels = labels is not None or not isinstance(data, torch.Tensor)
    for i, (x, y) in enumerate(_bar(iter_batches(data), data, f"parity {role}", progress)):
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).float().numpy()
        fin = np.isfinite(got)
        diffs.append(np.where(fin, np.abs(got - ref), np.inf).max(1))
        peaks.append(np.abs(ref).max(1))
        agrees.append(got.argmax(1) == ref.argmax(1))
        finites.append(fin.all(1))
        if have_labels:
            yy = (labels[seen:seen + len(x)] if y is None else y).numpy()
            right_torch += int((ref.argmax(1) == yy).sum())
            right_onnx += int((got.argmax(1) == yy).sum())
        seen += len(x)
    diff, agree, finite = np.concatenate(diffs), np.concatenate(agrees), np.concatenate(finites)
    max_logit = float(np.concatenate(peaks).max()) if seen else 0.0
    atol = rtol * max(1.0, max_logit)
    ok = diff <= atol
    torch_top1 = 100.0 * right_torch / seen if have_labels and seen else None
    onnx_top1 = 100.0 * right_onnx / seen if have_labels and seen else None
    res = ParityResult(role, seen, int(agree.sum()), float(diff.max()) if seen else 0.0, max_logit, atol, rtol,
                       int(ok.sum()), float(diff[ok].max()) if ok.any() else 0.0, [], torch_top1, onnx_top1, False)
    bad = np.nonzero(~ok | ~agree | ~finite)[0]
    explained = True
    for i in range(0, len(bad), 64):
        idx = bad[i:i + 64]
        diag = diagnose(model, onnx_model, probes, _take(data, idx), rtol)
        if diag["local"] is not None:
            res.first_divergence = diag["local"]
            explained = False
            break
        for j, flip in zip(idx, diag["flips"]):
            if flip is None or flip["rel"] > FLIP_RTOL or not finite[j]:
                res.first_divergence = diag["drift"] or {"layer": None, "check": "unexplained"}
                explained = False
                break
            res.sign_flips.append({"image": int(j), "max_abs_logit_diff": float(diff[j]), **flip})
        if not explained:
            break
    res.strict_top1 = strict_top1
    if explained:
        res.top1_changed_by_flips = [int(j) for j in np.nonzero(~agree)[0]]
    res.passed = bool(finite.all()) and explained and (bool(agree.all()) or not strict_top1)
    if not res.passed and res.first_divergence is None and len(bad) and not res.top1_changed_by_flips:
        res.first_divergence = diagnose(model, onnx_model, probes, _take(data, bad[:8]), rtol)["drift"]
    return res


def _bar(batches, data, desc: str, progress: bool, batch: int = 256):
    """``batches`` with a tqdm bar (on stderr, removed when done) when ``progress``."""
    from tqdm import tqdm

    return tqdm(batches, total=-(-len(data) // batch), desc=desc, unit="batch", leave=False, disable=not progress)


def compare_graphs(a, b, data, progress: bool = False) -> Dict[str, Any]:
    """Two ONNX graphs of the same model (the native and the standard integer student) on ``data``:
    both compute the binary convolutions exactly, so their predictions should be identical."""
    sa, sb = ort_session(a), ort_session(b)
    n = agree = 0
    worst = 0.0
    for x, _ in _bar(iter_batches(data), data, "native vs standard", progress):
        la = sa.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        lb = sb.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        agree += int((la.argmax(1) == lb.argmax(1)).sum())
        worst = max(worst, float(np.abs(la - lb).max()))
        n += len(x)
    return {"n": n, "top1_agree": agree, "max_abs_diff": worst}


def parity_message(r: ParityResult) -> str:
    """One line saying why ``r`` failed and where the graph first diverges."""
    head = (f"parity failed for {r.model}: top-1 agrees on {r.top1_agree}/{r.n} images, "
            f"{r.within_tol}/{r.n} within |logit diff| {r.atol:.3g} (max {r.max_abs_diff:.3g})")
    where = r.first_divergence or {}
    if where.get("layer"):
        how = "on its own inputs" if where.get("check") == "local" else "accumulated"
        return head + f"; first diverging layer '{where['layer']}' ({how}, max rel diff {where['max_rel_diff']:.3g})"
    if r.top1_agree < r.n and r.top1_changed_by_flips:
        return head + (f"; every layer agrees on its inputs: a sign of a value within float32 rounding of 0 changed "
                       f"{len(r.top1_changed_by_flips)} near-tied prediction(s); without --strict-top1 this passes")
    return head


def _as_nchw(arr: np.ndarray, t: _T) -> torch.Tensor:
    if t.layout == "bits":  # packed signs -> +-1
        from .native import unpack_signs

        arr = unpack_signs(arr, t.c).reshape(arr.shape[0], t.h, t.w, t.c).transpose(0, 3, 1, 2)
    elif t.layout == "flat":
        arr = arr.reshape(arr.shape[0], t.h, t.w, t.c).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def probe_outputs(onnx_model, tensors: Sequence[_T], images: torch.Tensor, level: str = "basic") -> Dict[str, np.ndarray]:
    """Run the graph with ``tensors`` as extra outputs; returns name -> array (plus input and logits)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    names: List[str] = []
    for t in tensors:
        if t.name not in names and t.name not in (INPUT_NAME, OUTPUT_NAME):
            names.append(t.name)
            m.graph.output.append(helper.make_tensor_value_info(
                t.name, TensorProto.UINT64 if t.layout == "bits" else TensorProto.FLOAT, None))
    sess = ort_session(m, level=level)
    outs = dict(zip([OUTPUT_NAME] + names, sess.run([OUTPUT_NAME] + names, {INPUT_NAME: images.numpy()})))
    outs[INPUT_NAME] = images.numpy()
    return outs


def _sign_input(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and _conv_kind(m) in ("W32A1", "W1A1")


@torch.no_grad()
def diagnose(model: nn.Module, onnx_model, probes: List[Probe], images: torch.Tensor, rtol: float) -> Dict[str, Any]:
    """Where and why the graph and PyTorch differ on ``images``.

    * ``local``: the first lowered layer whose graph output differs from its PyTorch module run on
      the same graph inputs, or ``None``. Inside a block, the convs' outputs are replaced by the
      graph's (a sign taken twice could differ), so the block's BatchNorms, activations, shortcut
      and residual wiring are what its check covers;
    * ``flips``: per image, the first binary conv whose input signs differ between a full PyTorch
      pass and the graph, with the largest PyTorch magnitude among the flipped values (``value``) and
      that relative to the tensor's largest magnitude (``rel``), or ``None`` when no sign differs;
    * ``drift``: the first layer whose output drifts beyond tolerance from a full PyTorch pass.
    """
    outs = probe_outputs(onnx_model, [t for p in probes for t in p.inputs + [p.output]], images)
    model.eval()
    mods = dict(model.named_modules())
    graph_out = {id(p.module): _as_nchw(outs[p.output.name], p.output) for p in probes}
    replace = {}  # module -> graph output, for convs (and a conv lowered with its BatchNorm)
    for p in probes:
        if isinstance(p.module, nn.Conv2d) or p.in_path != p.out_path:
            replace[id(mods.get(p.out_path, p.module))] = graph_out[id(p.module)]
    local = None
    for p in probes:
        own = mods.get(p.out_path)
        inner = [m for m in p.module.modules() if m is not p.module and m is not own and id(m) in replace]
        hooks = [m.register_forward_hook(lambda mod, i, o: replace[id(mod)]) for m in inner]
        try:
            ref = p.module(*[_as_nchw(outs[t.name], t) for t in p.inputs]).float()
        finally:
            for hk in hooks:
                hk.remove()
        d = _rel_diff(graph_out[id(p.module)], ref)
        if not d <= rtol:
            local = {"layer": p.name, "check": "local", "max_rel_diff": d}
            break
    seen_in: Dict[str, torch.Tensor] = {}
    seen_out: Dict[str, torch.Tensor] = {}

    def record(key: str):
        def hook(mod, inputs, output) -> None:
            seen_in[key], seen_out[key] = inputs[0].detach(), output.detach()
        return hook

    hooks = [mods[path].register_forward_hook(record(path)) for path in
             dict.fromkeys(q for p in probes for q in (p.in_path, p.out_path)) if path in mods]
    try:
        model(images)
    finally:
        for hk in hooks:
            hk.remove()
    drift = None
    for p in probes:
        if p.out_path in seen_out:
            d = _rel_diff(graph_out[id(p.module)], seen_out[p.out_path].float())
            if not d <= rtol:
                drift = {"layer": p.name, "check": "accumulated", "max_rel_diff": d}
                break
    # signs as the optimized session takes them: expose only the pre-sign tensors, which no fusion
    # consumes, so onnxruntime's fused (differently rounded) FP parts stay as in the parity run
    sign_probes = [p for p in probes if _sign_input(mods.get(p.in_path)) and p.in_path in seen_in]
    pre = probe_outputs(onnx_model, [p.inputs[0] for p in sign_probes], images, level="all")
    flips: List[Optional[Dict[str, Any]]] = [None] * len(images)
    for p in sign_probes:
        x_ref = seen_in[p.in_path].float()
        x_got = _as_nchw(pre[p.inputs[0].name], p.inputs[0])
        differ = (x_ref >= 0) != (x_got >= 0)
        for i in range(len(images)):
            if flips[i] is None and bool(differ[i].any()):
                v = float(x_ref[i][differ[i]].abs().max())
                flips[i] = {"layer": p.in_path, "signs_differing": int(differ[i].sum()), "value": v,
                            "rel": v / max(float(x_ref[i].abs().max()), 1e-30)}
    return {"local": local, "flips": flips, "drift": drift}


# ---------------------------------------------------------------- export of models


def student_fp32(student: nn.Module, spec: Dict[str, Any]) -> nn.Module:
    """The same student with quantisation off: its real-valued weights, plain convs, no sign."""
    from .checkpoint import load_model_state
    from .models import create_model

    fp_spec = {k: v for k, v in spec.items() if k not in ("weight_scale", "recu", "weight_gradient", "act_gradient")}
    fp_spec["quant"] = "FP"
    fp = create_model(**fp_spec)
    load_model_state(fp, student.state_dict(), "student weights", allow_quant_missing=True)
    return fp.eval()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_default_domain(model) -> None:
    bad = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    assert not bad, f"non-standard ops in the exported graph: {bad}"


@dataclass
class ExportInfo:
    """What :func:`export_models` needs to know beyond the models themselves."""

    input_shape: Tuple[int, int, int]
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    classes: Tuple[str, ...] = ()
    run: str = "model"
    fingerprint: str = ""
    stage: str = ""
    quant: str = ""
    recipe_yaml: str = ""
    dataset: Dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""


def export_models(student: nn.Module, student_spec: Dict[str, Any], out_dir, info: ExportInfo,
                  teacher: Optional[nn.Module] = None, data=None, force: bool = False,
                  runtime: str = "standard", strict_top1: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Export the binary student, its FP32 version and the teacher, check parity, write the folder.
    ``progress``: tqdm bars over the parity batches (the CLI sets it on a TTY).

    ``runtime="native"`` also writes ``student_binary_native.onnx``: the binary student with its
    binary blocks as ``ai.bnn_distill::BinaryConv2d`` nodes for the native library (built here first
    if needed; see :mod:`bnn_distill.native`), parity-checked like the others.

    ``data``: the test split (a dataset of normalised NCHW images and labels) for parity and
    accuracy; without it parity runs on a fixed batch of random inputs with exact zeros (a tensor
    works too). Returns the manifest.
    Raises :class:`ExportError` when parity fails: ``parity.json`` says why, and the folder holds no
    manifest or models (an earlier export there, which this one was to replace, is removed).
    """
    import onnx

    out = Path(out_dir)
    if runtime not in RUNTIMES:  # checked first: nothing is written for a bad choice
        raise ExportError(f"--runtime '{runtime}' is not one of: {', '.join(RUNTIMES)}")
    guard_out_dir(out, info.fingerprint, force)
    native_info = None
    if runtime == "native":
        from . import native

        native_info = native.info(native.library_path())  # fails here, before any work, when unavailable
    student.eval()
    models: Dict[str, nn.Module] = {"student_binary": student, "student_fp32": student_fp32(student, student_spec)}
    if teacher is not None:
        models["teacher"] = teacher.eval()
    if runtime == "native":
        models["student_native"] = student
    if data is None:
        data = parity_inputs(info.input_shape)
    protos, results = {}, {}
    for role, mdl in models.items():
        proto, probes = lower(mdl, info.input_shape, name=f"{info.run}_{role}", native=role == "student_native")
        onnx.checker.check_model(proto, full_check=True)
        if role != "student_native":
            check_default_domain(proto)
        res = check_parity(role, mdl, proto, probes, data, strict_top1=strict_top1, progress=progress)
        results[role] = res
        protos[role] = proto
        log.info("parity %s: top-1 %d/%d, max |logit diff| %.3g (tol %.3g)%s", role, res.top1_agree, res.n,
                 res.max_abs_diff, res.atol, "" if res.passed else " FAILED")
        if res.passed and res.top1_changed_by_flips:
            log.warning("%s: %d image(s) change top-1 through a sign taken of a value within float32 rounding of 0 "
                        "(PyTorch's float conv vs the exact integer sum; listed in parity.json); --strict-top1 "
                        "makes this fail the export", role, len(res.top1_changed_by_flips))
    counts = optimized_op_counts(protos["student_binary"])
    n_binary = sum(1 for _, m_ in student.named_modules() if isinstance(m_, nn.Conv2d) and _is_w1a1(m_))
    fused = fused_integer_matmuls(counts)
    if n_binary and fused < n_binary:
        log.warning("onnxruntime fused %d of %d binary convs into MatMulIntegerToFloat; the rest run in float",
                    fused, n_binary)
    parity = {
        "format": EXPORT_FORMAT, "run": info.run, "stage": info.stage,
        "images": int(len(data)), "source": "random inputs" if isinstance(data, torch.Tensor) else "test split",
        "passed": all(r.passed for r in results.values()),
        "models": {role: r.to_dict() for role, r in results.items()},
        "binary_convs": n_binary, "fused_matmul_integer_to_float": fused, "optimized_ops": counts,
    }
    if "student_native" in protos:
        parity["native_vs_standard"] = compare_graphs(protos["student_native"], protos["student_binary"], data,
                                                      progress=progress)
        log.info("native vs standard integer graph: top-1 identical on %d/%d images, max |logit diff| %.3g",
                 parity["native_vs_standard"]["top1_agree"], parity["native_vs_standard"]["n"],
                 parity["native_vs_standard"]["max_abs_diff"])
    failed = [r for r in results.values() if not r.passed]
    if failed:  # the folder no longer holds a finished export: only the report of why
        for name in (MANIFEST, *MODEL_FILES.values(), *STALE_FILES):
            (out / name).unlink(missing_ok=True)
    atomic_write_bytes(out / PARITY, (json.dumps(parity, indent=2) + "\n").encode())
    if failed:
        raise ExportError(parity_message(failed[0]) + f"; see {out / PARITY}")
    # Until the new manifest lands last, the folder is not a finished export: an interrupted
    # rewrite must not leave an old manifest vouching for a mix of old and new model files.
    for name in (MANIFEST, *STALE_FILES, *(f for r, f in MODEL_FILES.items() if r not in protos)):
        (out / name).unlink(missing_ok=True)
    files = {}
    for role, proto in protos.items():
        r = results[role]
        meta = {"bnn_distill.role": role, "bnn_distill.run": info.run, "bnn_distill.stage": info.stage,
                "bnn_distill.quant": info.quant if role in ("student_binary", "student_native") else "FP",
                "bnn_distill.runtime": "native" if role == "student_native" else "standard",
                "bnn_distill.recipe": info.recipe_yaml,
                "bnn_distill.test_top1": "" if r.onnx_top1 is None else f"{r.onnx_top1:.4f}",
                "bnn_distill.parity": json.dumps({"top1_agree": r.top1_agree, "n": r.n, "max_abs_diff": r.max_abs_diff})}
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        blob = proto.SerializeToString()
        atomic_write_bytes(out / MODEL_FILES[role], blob)
        files[role] = {"file": MODEL_FILES[role], "bytes": len(blob), "sha256": _sha256(blob),
                       "test_top1": r.onnx_top1, "torch_test_top1": None if r.onnx_top1 is None else r.torch_top1}
    c, h, w = info.input_shape
    manifest = {
        "format": EXPORT_FORMAT, "run": info.run, "run_dir": info.run_dir, "fingerprint": info.fingerprint,
        "stage": info.stage, "quant": info.quant, "opset": OPSET, "ir_version": IR_VERSION,
        "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", protos["student_binary"].graph.output[0].type.tensor_type.shape.dim[1].dim_value]},
        "normalization": {"formula": "(pixel / 255 - mean[c]) / std[c]", "mean": list(info.mean), "std": list(info.std)},
        "classes": list(info.classes), "dataset": info.dataset,
        "models": files, "files": sorted([MODEL_FILES[r] for r in protos] + [PARITY, MANIFEST]),
        "runtime": runtime, "native": native_info, "sizes": file_sizes(student, info.input_shape, files),
        "parity_passed": True, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    for stale in STALE_FILES:  # a benchmark of the models this export replaced
        (out / stale).unlink(missing_ok=True)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def file_sizes(student: nn.Module, input_shape: Sequence[int], files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The binary student's deployed size (1 bit per binary weight, fp32 for the rest; see
    :mod:`bnn_distill.summary`) next to each ONNX file's size, and each file over it."""
    from .summary import summarize

    deployed = int(round(summarize(student, tuple(input_shape)).memory_bytes))
    out: Dict[str, Any] = {"deployed_bytes": deployed,
                           "files": {f["file"]: f["bytes"] for f in files.values()},
                           "over_deployed": {f["file"]: round(f["bytes"] / deployed, 2) for f in files.values()
                                             if deployed}}
    if "student_native" in files:
        out["standard_over_native"] = round(files["student_binary"]["bytes"] / files["student_native"]["bytes"], 3)
    return out


def _is_w1a1(m: nn.Module) -> bool:
    try:
        return _conv_kind(m) == "W1A1"
    except ExportError:
        return False


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"bnn_distill": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def parity_inputs(input_shape: Sequence[int], n: int = 16, seed: int = 0) -> torch.Tensor:
    """Random normal inputs with exact zeros: whole zero images and zeroed pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(input_shape), generator=g)
    x[0] = 0.0
    x[1, :, ::2, ::3] = 0.0
    return x


def guard_out_dir(out: Path, fingerprint: str, force: bool) -> None:
    """Refuse to overwrite an export folder that holds an export of a different run."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out '{out}' is a file; give a folder")
    if not path.exists() or force:
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ExportError(f"'{out}' holds an unreadable {MANIFEST}; choose another --out or pass --force") from None
    if old.get("fingerprint") != fingerprint:
        raise ExportError(f"'{out}' holds an export of another run ('{old.get('run')}', fingerprint "
                          f"{old.get('fingerprint')}); choose another --out or pass --force to overwrite it")


# ---------------------------------------------------------------- export of a run


def export_run(run_dir, out: Optional[str] = None, stage: Optional[str] = None, force: bool = False,
               data_root: Optional[str] = None, limit_test: Optional[int] = None,
               runtime: str = "standard", strict_top1: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Export a trained run folder (``runs/NAME``): see the module docstring. Returns the manifest."""
    from .checkpoint import load_checkpoint, load_model_state
    from .data import build_datasets
    from .recipe import load_recipe
    from .train import RECIPE_FILE, build_model, model_spec

    run = Path(run_dir)
    if not (run / RECIPE_FILE).is_file():
        raise UserError(f"'{run}' is not a run folder (no {RECIPE_FILE}); give runs/NAME")
    recipe = load_recipe(run / RECIPE_FILE)
    students = [s for s in recipe.stages if s.kind == "student" and s.quant != "FP"]
    names = [s.name for s in recipe.stages]
    if stage is None:
        st = recipe.stages[-1]
    elif stage not in names:
        raise UserError(f"--stage: no stage named '{stage}' in {run}; valid: {', '.join(names)}")
    else:
        st = recipe.stage(stage)
    if st.kind != "student" or st.quant == "FP":
        valid = ", ".join(s.name for s in students) or "none"
        raise UserError(f"stage '{st.name}' is {st.kind} {st.quant}, not a binary student; binary stages: {valid}")
    ck_path = run / "checkpoints" / st.name / "last.pt"
    if not ck_path.is_file():
        raise UserError(f"stage '{st.name}' of {run} has no checkpoint ({ck_path}); train it first")
    ck = load_checkpoint(ck_path)
    spec = ck["model_spec"]
    student = build_model(spec)
    load_model_state(student, ck["model"], f"checkpoint '{ck_path}'")
    teacher = None
    teacher_stage = next((s for s in recipe.stages if s.kind == "teacher"), None)
    if teacher_stage is not None:
        tpath = run / "checkpoints" / teacher_stage.name / "last.pt"
        if not tpath.is_file():
            raise UserError(f"the teacher stage of {run} has no checkpoint ({tpath})")
        tck = load_checkpoint(tpath)
        teacher = build_model(tck["model_spec"])
        load_model_state(teacher, tck["model"], f"checkpoint '{tpath}'")
    elif recipe.teacher.checkpoint is not None:
        from .checkpoint import state_dict_of

        teacher = build_model(model_spec(recipe, recipe.teacher, "FP", spec["num_classes"], spec["in_chans"]))
        load_model_state(teacher, state_dict_of(load_checkpoint(recipe.teacher.checkpoint)),
                         f"teacher.checkpoint '{recipe.teacher.checkpoint}'")
    d = recipe.data
    root = data_root or d.root
    limit = limit_test or d.limit_test
    _, test_set, dinfo = build_datasets(d.dataset, root, False, False, d.limit_train, limit, seed=recipe.seed)
    if len(test_set) == 0:
        raise UserError(f"data: the test split of '{dinfo.name}' is empty; parity needs images")
    info = ExportInfo(
        input_shape=tuple(test_set[0][0].shape), mean=tuple(dinfo.mean), std=tuple(dinfo.std), classes=tuple(dinfo.classes),
        run=recipe.name, fingerprint=recipe.fingerprint(), stage=st.name, quant=st.quant,
        recipe_yaml=(run / RECIPE_FILE).read_text(), run_dir=str(run),
        dataset={"name": dinfo.name, "root": root, "limit_test": limit, "seed": recipe.seed, "test_images": len(test_set)})
    out_dir = Path(out) if out else Path("export") / recipe.name
    return export_models(student, spec, out_dir, info, teacher=teacher, data=test_set, force=force, runtime=runtime,
                         strict_top1=strict_top1, progress=progress)
