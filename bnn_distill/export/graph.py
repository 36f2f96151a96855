"""The ONNX graph builder the lowerings write into, and the index tables they share.

:class:`_Graph` holds nodes and initializers with unique names; :class:`_T` is a tensor of the
graph with its layout; :class:`Probe` records a lowered module for the parity diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.nn as nn
from onnx import helper, numpy_helper

from .. import __version__
from ..errors import UserError

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; readable by every onnxruntime since 1.11


class ExportError(UserError):
    """A model that cannot be lowered, or an export whose parity check failed."""


@dataclass(frozen=True)
class _T:
    """A tensor in the graph: ``nchw`` is (B, C, H, W), ``flat`` is (B, H*W, C), ``vec`` is (B, C),
    ``bits`` is packed signs (B, H*W, ceil(C/64)) uint64 between native nodes. ``signs``: a ``flat``
    tensor's packed signs too, when the native node that wrote it also wrote them."""

    name: str
    layout: str
    c: int
    h: int = 1
    w: int = 1
    signs: Optional[str] = None


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


def _version() -> str:
    return __version__


def _onnx_dtype(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


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

    def op(self, op_type: str, inputs: Sequence[str], base: str, domain: str = "", **attrs) -> str:
        """One node with a fresh output name (also the node's name); ``domain``: a custom op's."""
        out = self.fresh(base)
        if domain:
            node = helper.make_node(op_type, list(inputs), [out], name=out, domain=domain, **attrs)
        else:
            node = helper.make_node(op_type, list(inputs), [out], name=out, **attrs)
        self.nodes.append(node)
        return out

    def add_output(self, out: str, base: str) -> str:
        """A second output (a fresh name) of the node whose first output is ``out``."""
        node = next(n for n in reversed(self.nodes) if n.output and n.output[0] == out)
        name = self.fresh(base)
        node.output.append(name)
        return name

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
        table = self.shared(("sign_table",), lambda: self.init("const_sign_table", _SIGN_TABLE))
        idx = self.op("Cast", [self.init(f"{base}_bits", bits)], f"{base}/index", to=_onnx_dtype(np.int32))
        rows = self.op("Gather", [table, idx], f"{base}/unpack", axis=0)  # (bytes, 8)
        if pad:
            rows = self.op("Reshape", [rows, self.const([-1], np.int64)], f"{base}/flat")
            rows = self.op(
                "Slice", [rows, self.const([0], np.int64), self.const([flat.size], np.int64)], f"{base}/trim"
            )
        return self.op("Reshape", [rows, self.const(list(q.shape), np.int64)], base)


#: Row ``b`` holds the 8 bits of byte ``b`` (least significant first) as +-1 (1 for a set bit's -1).
_SIGN_TABLE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1, -1, 1
).astype(np.int8)


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
