"""Per-layer summary of a (binary) model: bits, parameters, MACs, memory and warnings.

The idea follows larq's ``summary``: one row per layer, a totals block that separates binary from
full-precision work, and warnings for settings that quietly hurt binary training.

Counting conventions (all per single input sample):

* A row is a conv, linear, BatchNorm or PReLU layer, or any other module owning parameters that
  is not inside such a layer. Quantiser parameters (a learned weight scale ``alpha``) belong to
  the row of the conv that owns the quantiser.
* MACs: conv ``H_out * W_out * C_out * (C_in / groups) * kh * kw``; linear ``in * out`` (times
  any extra leading output dims). BatchNorm and PReLU are element-wise and counted as 0 MACs
  (at deployment BatchNorm folds into a threshold or the previous layer).
* A MAC is *XNOR* when both weight and input are 1 bit (XNOR-popcount), *binary-input* when only
  the input is 1 bit (W32A1: additions/subtractions), *binary-weight* when only the weight is.
* Memory as deployed: 1-bit weights take 1 bit each plus one fp32 scale per output channel
  (a ``mean_abs`` scale is computed once and stored; a ``learned`` scale is the ``alpha``
  parameter; ``none`` stores nothing); every other parameter takes 32 bits; BatchNorm stores its
  running mean and variance, 2 x 32 bits per channel, on top of its affine parameters.
* FP32-equivalent memory: every counted parameter and BatchNorm statistic at 32 bits.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .quant import BinaryWeightTensorQuant, binary_weight_quants, layer_bits

logger = logging.getLogger(__name__)

NON_NEGATIVE_ACTS = (nn.ReLU, nn.ReLU6)
LINE_WIDTH = 108


@dataclass
class LayerRow:
    """One layer of the summary; ``weight_bits``/``act_bits`` are ``None`` for non-conv/linear rows."""

    name: str
    kind: str
    weight_bits: Optional[int]
    act_bits: Optional[int]
    params: int
    macs: int
    memory_bytes: float
    output_shape: tuple
    binary_params: int = 0
    fp32_memory_bytes: float = 0.0


@dataclass
class ModelSummary:
    """Rows, input shape ``(C, H, W)`` and warnings; totals are derived from the rows."""

    rows: List[LayerRow]
    input_shape: tuple
    warnings: List[str] = field(default_factory=list)

    def _macs(self, weight_bits: int, act_bits: int) -> int:
        return sum(r.macs for r in self.rows if (r.weight_bits, r.act_bits) == (weight_bits, act_bits))

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def binary_params(self) -> int:
        """Parameters stored with 1 bit (binary conv weights)."""
        return sum(r.binary_params for r in self.rows)

    @property
    def fp_params(self) -> int:
        """Parameters stored in 32 bits (everything else, learned scales included)."""
        return self.total_params - self.binary_params

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def xnor_macs(self) -> int:
        """MACs with 1-bit weights and 1-bit inputs (XNOR-popcount)."""
        return self._macs(1, 1)

    @property
    def binary_input_macs(self) -> int:
        """MACs with full-precision weights and 1-bit inputs (W32A1)."""
        return self._macs(32, 1)

    @property
    def binary_weight_macs(self) -> int:
        """MACs with 1-bit weights and full-precision inputs (W1A32)."""
        return self._macs(1, 32)

    @property
    def fp_macs(self) -> int:
        return self.total_macs - self.xnor_macs - self.binary_input_macs - self.binary_weight_macs

    @property
    def binary_mac_share(self) -> float:
        """Share of MACs with at least one 1-bit operand (0 for a full-precision model)."""
        total = self.total_macs
        return (total - self.fp_macs) / total if total else 0.0

    @property
    def memory_bytes(self) -> float:
        return sum(r.memory_bytes for r in self.rows)

    @property
    def fp32_memory_bytes(self) -> float:
        return sum(r.fp32_memory_bytes for r in self.rows)

    @property
    def compression_ratio(self) -> float:
        """FP32-equivalent memory over memory as deployed."""
        return self.fp32_memory_bytes / self.memory_bytes if self.memory_bytes else 1.0

    def totals(self) -> Dict[str, Any]:
        """All totals as a flat dict."""
        keys = (
            "total_params",
            "binary_params",
            "fp_params",
            "total_macs",
            "xnor_macs",
            "binary_input_macs",
            "binary_weight_macs",
            "fp_macs",
            "binary_mac_share",
            "memory_bytes",
            "fp32_memory_bytes",
            "compression_ratio",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict: ``input_shape``, ``rows``, ``totals`` and ``warnings``."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["output_shape"] = list(r.output_shape)
            rows.append(d)
        return {
            "input_shape": list(self.input_shape),
            "rows": rows,
            "totals": self.totals(),
            "warnings": list(self.warnings),
        }

    def format(self) -> str:
        """A fixed-width text table of the rows, then the totals and the warnings."""
        cols = (
            ("Layer", 32, "<"),
            ("Kind", 13, "<"),
            ("Bits w/a", 8, "<"),
            ("Output", 14, "<"),
            ("Params", 10, ">"),
            ("MACs", 9, ">"),
            ("Memory", 10, ">"),
        )

        def line(values: Sequence[str]) -> str:
            return "  ".join(f"{v:{align}{w}}" for v, (_, w, align) in zip(values, cols)).rstrip()

        rule = "-" * LINE_WIDTH
        out = [f"Model summary, input {_shape(self.input_shape)}", rule, line([c[0] for c in cols]), rule]
        for r in self.rows:
            bits = f"{r.weight_bits}/{r.act_bits}" if r.weight_bits is not None else "-"
            name = _ellipsize(r.name or "(model)", cols[0][1])
            out.append(
                line(
                    [
                        name,
                        r.kind[: cols[1][1]],
                        bits,
                        _shape(r.output_shape),
                        f"{r.params:,}",
                        _count(r.macs),
                        _bytes(r.memory_bytes),
                    ]
                )
            )
        out.append(rule)
        total = self.total_macs

        def share(n: int) -> str:
            return f"{_count(n)} ({100.0 * n / total:.1f}%)" if total else _count(n)

        out += [
            f"Total params:        {self.total_params:,}",
            f"  binary (1 bit):    {self.binary_params:,}",
            f"  full precision:    {self.fp_params:,}",
            f"Total MACs:          {_count(total)}",
            f"  XNOR (1x1 bit):    {share(self.xnor_macs)}",
            f"  binary input only: {share(self.binary_input_macs)}",
        ]
        if self.binary_weight_macs:
            out.append(f"  binary weight only:{share(self.binary_weight_macs)}")
        out += [
            f"  full precision:    {share(self.fp_macs)}",
            f"Memory as deployed:  {_bytes(self.memory_bytes)}",
            f"FP32 equivalent:     {_bytes(self.fp32_memory_bytes)}",
            f"Compression ratio:   {self.compression_ratio:.2f}x",
        ]
        if self.warnings:
            out.append(rule)
            out += [textwrap.fill(f"Warning: {w}", LINE_WIDTH, subsequent_indent="  ") for w in self.warnings]
        return "\n".join(out)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _ellipsize(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _count(n: float) -> str:
    """``1234 -> '1.23k'``, ``5_600_000 -> '5.60M'``; small numbers as they are."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{int(n)}"


def _bytes(n: float) -> str:
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:g} B"


def _is_layer(module: nn.Module) -> bool:
    return layer_bits(module) is not None or isinstance(module, (_ConvNd, nn.Linear, _BatchNorm, nn.PReLU))


def _row_modules(model: nn.Module) -> List[Tuple[str, nn.Module, bool]]:
    """``(name, module, whole)`` in definition order.

    Layers are rows with all their parameters (``whole``), and modules nested inside a layer (its
    quantisers) are skipped. Any other module owning parameters directly is a row for those only.
    """
    rows: List[Tuple[str, nn.Module, bool]] = []
    layers: List[str] = []
    for name, module in model.named_modules():
        if any(parent == "" or name.startswith(parent + ".") for parent in layers):
            continue
        if _is_layer(module):
            rows.append((name, module, True))
            layers.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            rows.append((name, module, False))
    return rows


def _first_tensor(output: Any) -> Optional[Tensor]:
    """The output tensor of a layer (a Brevitas ``QuantTensor``'s ``value``; first of a tuple)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    output = getattr(output, "value", output)
    return output if isinstance(output, Tensor) else None


def _macs(module: nn.Module, out: Tensor) -> int:
    """MACs of one call for a batch-1 output ``out``; element-wise layers are 0."""
    if isinstance(module, _ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        return out[0].numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


def _memory(
    module: nn.Module,
    whole: bool,
    bits: Optional[Tuple[int, int]],
    tq: Optional[BinaryWeightTensorQuant],
    seen: Set[int],
) -> Tuple[int, int, float, float]:
    """``(params, binary_params, memory_bytes, fp32_memory_bytes)`` of one row (unseen params only)."""
    params = binary = 0
    mem_bits = 0
    weight = getattr(module, "weight", None)
    for p in module.parameters(recurse=whole):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        params += n
        if bits is not None and bits[0] == 1 and p is weight:
            binary += n
            mem_bits += n
        else:
            mem_bits += 32 * n
    stat_bits = 0
    if isinstance(module, _BatchNorm) and module.track_running_stats:
        stat_bits = 2 * 32 * module.num_features
    if tq is not None and tq.scale_mode == "mean_abs" and isinstance(weight, Tensor):
        mem_bits += 32 * weight.shape[0]  # the per-channel scale, computed once and stored
    return params, binary, (mem_bits + stat_bits) / 8, (32 * params + stat_bits) / 8


def _relu_warning(model: nn.Module, binary_act: Set[str]) -> Optional[str]:
    """Blocks that hold a binary-activation conv and a non-negative activation (ReLU)."""
    blocks = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        has_binary = any((f"{name}.{c}" if name else c) in binary_act for c in children)
        if has_binary and any(isinstance(c, NON_NEGATIVE_ACTS) for c in children.values()):
            blocks.append(name or "<model>")
    if not blocks:
        return None
    shown = ", ".join(blocks[:4]) + (f" and {len(blocks) - 4} more" if len(blocks) > 4 else "")
    return (
        f"{len(blocks)} block(s) with binary-activation convs use a ReLU activation ({shown}): sign() of "
        "a non-negative input is always +1, so those convs see a constant input; use hardtanh or PReLU"
    )


def summarize(model: nn.Module, input_shape: Tuple[int, ...]) -> ModelSummary:
    """Summarise ``model`` on one dummy sample of shape ``input_shape`` (``(C, H, W)``).

    Runs a single zero batch of size 1 in eval mode without gradients, with forward hooks on
    every layer to read output shapes, then restores each module's training flag. See the module
    docstring for how parameters, MACs (BatchNorm and PReLU count 0) and memory are counted.
    """
    rows_modules = _row_modules(model)
    quants = {name: tq for name, _, tq in binary_weight_quants(model)}
    outputs, order = _trace(model, rows_modules, input_shape)
    rows: List[LayerRow] = []
    warnings: List[str] = []
    seen: Set[int] = set()
    binary_act: Set[str] = set()
    by_name = {name: module for name, module, _ in rows_modules}
    for name, module, whole in rows_modules:
        bits = layer_bits(module)
        if bits is None and isinstance(module, (_ConvNd, nn.Linear)):
            bits = (32, 32)
        tq = quants.get(name)
        rows.append(_layer_row(name, module, whole, bits, tq, seen, outputs[name], warnings))
        if bits is not None and 1 in bits and getattr(module, "bias", None) is not None:
            warnings.append(f"{name}: binary conv with a bias; a BatchNorm after it makes the bias redundant")
        if bits is not None and bits[1] == 1:
            binary_act.add(name)
        if tq is not None and tq.scale_mode == "none" and name in order:
            nxt = order.index(name) + 1
            nxt_module = by_name.get(order[nxt]) if nxt < len(order) else None
            if not isinstance(nxt_module, _BatchNorm):
                warnings.append(
                    f"{name}: binary weights without a scale (weight_scale 'none') and no "
                    "BatchNorm after it; outputs are not rescaled"
                )
    relu = _relu_warning(model, binary_act)
    if relu:
        warnings.insert(0, relu)
    for w in warnings:
        logger.warning("summary: %s", w)
    return ModelSummary(rows=rows, input_shape=tuple(input_shape), warnings=warnings)


def _trace(model: nn.Module, rows_modules, input_shape: Tuple[int, ...]) -> Tuple[Dict[str, List[Tensor]], List[str]]:
    """One zero sample through ``model`` in eval mode without gradients: each row module's outputs,
    and the order the row modules were called in. Restores every module's training flag."""
    outputs: Dict[str, List[Tensor]] = {name: [] for name, _, _ in rows_modules}
    order: List[str] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = _first_tensor(output)
            if out is not None:
                outputs[name].append(out)
                order.append(name)

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(hook_for(name)) for name, m, _ in rows_modules]
    try:
        ref = next(iter(model.parameters()), None)
        x = torch.zeros(
            (1, *input_shape),
            dtype=ref.dtype if ref is not None else torch.float32,
            device=ref.device if ref is not None else None,
        )
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return outputs, order


def _layer_row(
    name: str, module: nn.Module, whole: bool, bits, tq, seen: Set[int], outs: List[Tensor], warnings: List[str]
) -> LayerRow:
    """The row of one layer; warns (into ``warnings``) when it was never called."""
    params, binary, mem, fp32_mem = _memory(module, whole, bits, tq, seen)
    if not outs:
        warnings.append(f"{name}: not called in the forward pass; its MACs are not counted")
    macs = sum(_macs(module, o) for o in outs)
    return LayerRow(
        name=name,
        kind=type(module).__name__,
        weight_bits=bits[0] if bits else None,
        act_bits=bits[1] if bits else None,
        params=params,
        macs=macs,
        memory_bytes=mem,
        output_shape=tuple(outs[-1].shape[1:]) if outs else (),
        binary_params=binary,
        fp32_memory_bytes=fp32_mem,
    )
