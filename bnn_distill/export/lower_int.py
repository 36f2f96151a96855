"""The integer lowering of a binary model: the exact standard graph (default ONNX domain only).

Activations stay channels-last and spatially flattened, ``(B, H*W, C)``, through the whole binary
body. A W1A1 conv is ``code = Where(x >= 0, 2, 0)`` (uint8, zero point 1), im2col by ``Pad`` +
``Gather``, and ``DequantizeLinear`` of codes and int8 +-1 weights into ``MatMul``: onnxruntime
fuses the three into ``MatMulIntegerToFloat`` (see :mod:`bnn_distill.export`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch.nn as nn

from .graph import _T, _pool_out, im2col_indices
from .lower import Lowering
from .weights import binary_weight_matrix, bn_affine, float_weight, is_w1a1

#: Per-channel constants of flat maps up to this size are stored tiled over positions (speed).
TILE_BYTES = 64 * 1024


class IntLowering(Lowering):
    """Binary models: the body channels-last (``flat``), W1A1 convs as exact integer products,
    every BatchNorm as a per-channel multiply and add (folded into the product after a W1A1 conv)."""

    layout = "flat"
    pool_axes = (1,)

    def _per_channel(self, name: str, values: np.ndarray, t: _T) -> str:
        """A constant broadcast over ``t``'s positions: (C,) or (H*W, 1). A small flat map gets it tiled
        to (H*W, C): onnxruntime broadcasts a short last axis element-row by row."""
        stored = super()._per_channel(name, values, t)
        if t.layout == "flat" and t.h * t.w * t.c * 4 <= TILE_BYTES:  # a vec (the head's) is never tiled
            # the file keeps (C,); the tiling is a constant Expand that onnxruntime folds at load time
            return self.g.op("Expand", [stored, self.g.const([t.h * t.w, t.c], np.int64)], f"{name}/tiled")
        return stored

    def enter_body(self, x: _T) -> _T:
        g = self.g
        t = g.op("Transpose", [x.name], "to_channels_last", perm=[0, 2, 3, 1])
        r = g.op("Reshape", [t, g.const([0, x.h * x.w, x.c], np.int64)], "to_flat")
        return _T(r, "flat", x.c, x.h, x.w)

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
        index = g.indices(
            f"im2col_index_{x.h}x{x.w}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}",
            idx,
            ("im2col", x.h, x.w, kh, kw, sh, sw, ph, pw),
        )  # shared by the layers of one geometry
        cols = g.op("Gather", [src, index], f"{name}/im2col", axis=1)
        if kh * kw == 1:
            return cols
        return g.op("Reshape", [cols, g.const([0, idx.shape[0], kh * kw * x.c], np.int64)], f"{name}/cols")

    def conv(self, name: str, m: nn.Module, x: _T, bn_scale: Optional[np.ndarray] = None, probe: bool = True) -> _T:
        """im2col and a ``MatMul``: integer for a W1A1 conv (``bn_scale`` folded into its weight scale),
        float for an FP or W32A1 one (e.g. a full-precision downsample conv)."""
        kind = self._check_conv(name, m)
        kh, kw = m.kernel_size
        sh, sw = m.stride
        ph, pw = m.padding
        geom = (kh, kw, sh, sw, ph, pw)
        n = m.out_channels
        g = self.g
        if kind == "W1A1":
            code = self._sign(name, x, 2, 0, np.uint8)  # +1 -> 2, -1 -> 0; zero point 1
            cols = self._im2col(name, code, x, geom, g.const(1, np.uint8))
            a = g.op("DequantizeLinear", [cols, g.const(1.0, np.float32), g.const(1, np.uint8)], f"{name}/dq_input")
            wq, scale = binary_weight_matrix(m, bn_scale)
            # no weight zero point (it is 0): onnxruntime then runs the int8 product without a
            # per-column zero-point correction
            wdq = g.op(
                "DequantizeLinear",
                [g.sign_matrix(f"{name}.weight_int8", wq), g.init(f"{name}.weight_scale", scale)],
                f"{name}/dq_weight",
                axis=1,
            )
            y = g.op("MatMul", [a, wdq], name)
        else:
            inp = self._sign(name, x, 1.0, -1.0, np.float32) if kind == "W32A1" else x.name
            cols = self._im2col(name, inp, x, geom, g.const(0.0, np.float32))
            wmat = m.weight.detach().float().permute(2, 3, 1, 0).reshape(-1, n).numpy()
            y = g.op("MatMul", [cols, g.init(f"{name}.weight_matrix", wmat)], name)
            if m.bias is not None:
                y = g.op("Add", [y, g.init(f"{name}.bias", float_weight(m.bias))], f"{name}/bias")
        out = _T(y, "flat", n, *self._conv_out(m, x))
        assert bn_scale is None or kind == "W1A1"
        if probe:
            self._probe(name, m, [x], out)
        return out

    def bn(self, name: str, m: nn.Module, x: _T) -> _T:
        return self._bn_channels_last(name, m, x)

    def conv_bn(self, conv_name: str, conv: nn.Module, bn_name: str, bn: nn.Module, x: _T) -> _T:
        """A W1A1 conv takes the BatchNorm's multiplier into its per-channel weight scale (free inside
        ``MatMulIntegerToFloat``); the BatchNorm's shift stays an ``Add`` after the product."""
        if not is_w1a1(conv):
            return super().conv_bn(conv_name, conv, bn_name, bn, x)
        self._check_bn(bn_name, bn, conv.out_channels)
        a, b = bn_affine(bn)
        y = self.conv(conv_name, conv, x, bn_scale=a, probe=False)
        shifted = self.g.op("Add", [y.name, self._per_channel(f"{bn_name}.shift", b, y)], bn_name)
        out = _T(shifted, y.layout, y.c, y.h, y.w)
        short = bn_name.rsplit(".", 1)[-1]
        self._probe(f"{conv_name}+{short}", nn.Sequential(conv, bn), [x], out, in_path=conv_name, out_path=bn_name)
        return out

    def _shortcut_pool(self, name: str, y: str, x: _T, s: int) -> Tuple[str, int, int]:
        # (B, H*W, C) viewed as a one-channel 3-D map (B, 1, H, W, C): an s x s x 1 average pool
        # is PyTorch's s x s pool of every channel (same taps, divisor and summation order)
        g = self.g
        ho, wo = _pool_out(x.h, s, s), _pool_out(x.w, s, s)
        v = g.op("Reshape", [y, g.const([0, 1, x.h, x.w, x.c], np.int64)], f"{name}/as_3d")
        v = g.op(
            "AveragePool",
            [v],
            f"{name}/avgpool3d",
            kernel_shape=[s, s, 1],
            strides=[s, s, 1],
            ceil_mode=1,
            count_include_pad=0,
        )
        return g.op("Reshape", [v, g.const([0, ho * wo, x.c], np.int64)], f"{name}/avgpool"), ho, wo

    def _channel_pads(self, extra: int) -> List[int]:
        return [0, 0, 0, 0, 0, extra]
