"""The native runtime's lowering: binary blocks as ``ai.bnn_distill`` custom ops (see ``bnn_ops.cc``).

:class:`NativeLowering` is the integer lowering with each W1A1 conv + BatchNorm (+ residual) +
activation of a block fused into one node of this package's op domain: a bit-packed
XNOR-popcount conv, the BatchNorm folded into a per-channel scale and shift, the residual add and
a clip activation fused. Where a block's first conv only feeds the second's sign, its BatchNorm and
that sign become integer thresholds and the node hands packed sign bits (layout ``bits``) on.
Every other node also writes its output's packed signs (output 1, :attr:`_T.signs`), and a native
conv that reads that output takes those signs instead (``BinaryConv2dFromBits``, the float output
as its residual), so it packs nothing itself; outputs nobody reads are dropped at the end.
This module alone writes the op's domain, names and attributes.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch.nn as nn
from onnx import helper

from ..export.graph import _T
from ..export.lower_int import IntLowering
from ..export.weights import _FusedConv, binary_weight_matrix, bn_affine, is_w1a1
from ..models import PadShortcut
from . import DOMAIN, OP, OP_FROM_BITS, OP_TO_BITS, border_corrections, pack_weights, sign_thresholds

#: ``(kernel, pad)`` of the square binary convs the kernels run (stride is free)
GEOMETRIES = ((3, 1), (1, 0))
#: The op's opset version in :data:`DOMAIN`.
DOMAIN_VERSION = 1
FLOAT_MAX = float(np.finfo(np.float32).max)


def _attrs(x: _T, cin: int, n: int, kernel: int, stride: int, pad: int) -> Dict[str, int]:
    """The geometry attributes every op of the domain takes."""
    return dict(in_h=x.h, in_w=x.w, in_c=cin, out_c=n, kernel=kernel, stride=stride, pad=pad)


def _fused_activation(act: nn.Module) -> Tuple[float, float, int]:
    """``(act_min, act_max, fused)``: the clip the op applies; ``fused=0``: the activation runs after it."""
    if type(act) is nn.Hardtanh:
        return float(act.min_val), float(act.max_val), 1
    if type(act) is nn.ReLU:
        return 0.0, FLOAT_MAX, 1
    if type(act) is nn.Identity:
        return 0.0, 0.0, 1  # nothing to apply
    return 0.0, 0.0, 0


class NativeLowering(IntLowering):
    """The integer graph with binary blocks as ``ai.bnn_distill::BinaryConv2d*`` nodes."""

    def build(self):
        """The graph, without the packed-sign outputs (output 1) that no node reads."""
        model = super().build()
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        for n in model.graph.node:
            if n.domain == DOMAIN and len(n.output) > 1 and n.output[1] not in used:
                del n.output[1]
        return model

    def opsets(self) -> list:
        opsets = super().opsets()
        if any(n.domain == DOMAIN for n in self.g.nodes):
            opsets.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        return opsets

    @staticmethod
    def _pools_inside(b: nn.Module) -> bool:
        """Whether the op can apply the block's parameter-free shortcut (pool + zero channels) itself,
        on the conv's input: a Bi-Real block whose PadShortcut pools by the conv's stride."""
        return bool(
            b.bireal
            and b.downsample is None
            and type(b.shortcut) is PadShortcut
            and b.shortcut.stride == b.conv1.stride[0] == b.conv1.stride[1]
        )

    def block(self, name: str, b: nn.Module, x: _T) -> _T:
        self._check_block(name, b)
        if not (is_w1a1(b.conv1) and is_w1a1(b.conv2)):
            return super().block(name, b, x)
        if self._pools_inside(b):
            h = self.native_conv(name, "1", b, x, residual=x, pooled=b.shortcut)
            y = self.native_conv(name, "2", b, h, residual=h)
        else:
            sc = self.shortcut(name, b, x)
            if b.bireal:
                h = self.native_conv(name, "1", b, x, residual=sc)
                y = self.native_conv(name, "2", b, h, residual=h)
            else:  # conv1's output only feeds conv2's sign: BatchNorm + sign as integer thresholds
                h = self.native_conv(name, "1", b, x, residual=None, to_bits=True)
                y = self.native_conv(name, "2", b, h, residual=sc)
        self._probe(name, b, [x], y)
        return y

    def _check_native_conv(self, name: str, conv: nn.Module) -> Tuple[int, int, int]:
        """``(kernel, stride, pad)`` of a binary conv the kernels run, else a one-line error."""
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        ph, pw = conv.padding if not isinstance(conv.padding, str) else (-1, -1)
        if kh != kw or sh != sw or ph != pw or (kh, ph) not in GEOMETRIES:
            self._fail(
                name,
                f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}: the native "
                "runtime runs square 3x3/pad 1 and 1x1/pad 0 binary convs; use --runtime standard",
            )
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or conv.bias is not None:
            self._fail(
                name,
                "groups, dilation, a padding mode or a bias the native runtime does not run; use --runtime standard",
            )
        return kh, sh, ph

    def native_conv(
        self,
        block: str,
        i: str,
        b: nn.Module,
        x: _T,
        residual: Optional[_T],
        pooled: Optional[nn.Module] = None,
        to_bits: bool = False,
    ) -> _T:
        """conv{i} + bn{i} (+ residual) + act{i} of a block as one node (any activation the op does not
        clip runs after it). ``pooled``: the block's parameter-free shortcut, applied by the op to
        ``residual`` (the conv's input): average pool by the conv's stride, then zero channels.
        ``to_bits`` (no residual): packed signs out where the BatchNorm and sign fold to thresholds."""
        conv, bn, act = getattr(b, f"conv{i}"), getattr(b, f"bn{i}"), getattr(b, f"act{i}")
        cname, bname = f"{block}.conv{i}", f"{block}.bn{i}"
        k, s, p = self._check_native_conv(cname, conv)
        self._check_bn(bname, bn, conv.out_channels)
        a, shift = bn_affine(bn)
        wq, scale = binary_weight_matrix(conv, a)  # (k*k*Cin, N), taps ordered (kh, kw, Cin)
        n, cin = conv.out_channels, conv.in_channels
        q = wq.reshape(k, k, cin, n).transpose(3, 2, 0, 1)  # (N, Cin, kh, kw)
        thresholds = sign_thresholds(scale, shift, act, k * k * cin) if to_bits and residual is None else None
        g = self.g
        ins = [
            x.signs if x.signs and thresholds is None else x.name,  # ...ToBits has no packed-sign input
            g.init(f"{cname}.weight_bits", pack_weights(q)),
            g.init(f"{cname}.border_correction", border_corrections(q, p)),
        ]
        if thresholds is not None:  # packed signs out: the next binary conv reads them directly
            return self._to_bits(block, i, b, x, ins, thresholds, _attrs(x, cin, n, k, s, p))
        ins += [g.init(f"{cname}.scale", scale), g.init(f"{bname}.shift", np.asarray(shift, dtype=np.float32))]
        return self._to_float(block, i, b, x, ins, residual, pooled, _attrs(x, cin, n, k, s, p))

    @staticmethod
    def _out_hw(x: _T, attrs: Dict[str, int]) -> Tuple[int, int]:
        k, s, p = attrs["kernel"], attrs["stride"], attrs["pad"]
        return (x.h + 2 * p - k) // s + 1, (x.w + 2 * p - k) // s + 1

    def _to_bits(
        self, block: str, i: str, b: nn.Module, x: _T, ins: List[str], thresholds: np.ndarray, attrs: Dict[str, int]
    ) -> _T:
        conv, bn, act = getattr(b, f"conv{i}"), getattr(b, f"bn{i}"), getattr(b, f"act{i}")
        cname, bname, aname = f"{block}.conv{i}", f"{block}.bn{i}", f"{block}.act{i}"
        ins = ins + [self.g.init(f"{bname}.sign_threshold", thresholds)]
        out = self.g.op(OP_TO_BITS, ins, f"{aname}/sign_bits", domain=DOMAIN, **attrs)
        y = _T(out, "bits", attrs["out_c"], *self._out_hw(x, attrs))
        self._probe(
            f"{cname}+bn{i}+act+sign", _FusedConv(conv, bn, act, sign_out=True), [x], y, in_path=cname, out_path=aname
        )
        return y

    def _to_float(
        self,
        block: str,
        i: str,
        b: nn.Module,
        x: _T,
        ins: List[str],
        residual: Optional[_T],
        pooled: Optional[nn.Module],
        attrs: Dict[str, int],
    ) -> _T:
        conv, bn, act = getattr(b, f"conv{i}"), getattr(b, f"bn{i}"), getattr(b, f"act{i}")
        cname, bname, aname = f"{block}.conv{i}", f"{block}.bn{i}", f"{block}.act{i}"
        n, (ho, wo) = attrs["out_c"], self._out_hw(x, attrs)
        if residual is not None:
            want = (x.c, x.h, x.w) if pooled is not None else (n, ho, wo)
            if (residual.layout, residual.c, residual.h, residual.w) != ("flat",) + want or (
                pooled and attrs["in_c"] > attrs["out_c"]
            ):
                self._fail(f"{block}/add{i}", f"residual shapes differ: {residual} vs {want}")
            ins = ins + [residual.name]
        lo, hi, fused = _fused_activation(act)
        op = OP_FROM_BITS if x.layout == "bits" or x.signs else OP  # the previous node handed packed signs on
        out = self.g.op(
            op,
            ins,
            aname if fused else bname,
            domain=DOMAIN,
            **attrs,
            act=int(fused and type(act) is not nn.Identity),
            act_min=lo,
            act_max=hi,
            residual=int(pooled is not None),
        )
        y = _T(out, "flat", n, ho, wo)
        if fused:  # the output is the block's: the next native conv may take its signs (see build)
            y = dataclasses.replace(y, signs=self.g.add_output(out, f"{aname}/signs"))
        ref = _FusedConv(conv, bn, act if fused else nn.Identity(), pooled)
        self._probe(
            f"{cname}+bn{i}" + ("+add" if residual is not None else "") + ("+act" if fused else ""),
            ref,
            [x] + ([residual] if residual is not None else []),
            y,
            in_path=cname,
            out_path=aname if fused else bname,
        )
        return y if fused else self.act(aname, act, y)
