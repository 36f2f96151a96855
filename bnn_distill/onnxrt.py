"""onnxruntime helpers: CPU sessions (with the native op library when a graph needs it), the op
counts of the graph onnxruntime optimizes, and input batches. Torch-free at import."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Optional

import onnx
import onnxruntime as ort

from . import native

LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def ort_session(
    model,
    threads: Optional[int] = None,
    optimized_path: Optional[Path] = None,
    level: str = "all",
    spin: bool = True,
    native_lib: Optional[str] = None,
):
    """An onnxruntime CPU session for a ``ModelProto``, serialized bytes or a path.

    ``spin=False`` stops idle intra-op threads from spin-waiting: several sessions used in turn
    (an interleaved benchmark) otherwise steal each other's cores. A model with native
    (``ai.bnn_distill``) nodes gets the native library registered (``native_lib``, else the built one)."""
    so = ort.SessionOptions()
    proto = model if hasattr(model, "graph") else None
    if proto is None and isinstance(model, (str, Path)) and native_lib is None:
        proto = onnx.load(str(model), load_external_data=False)
    if native_lib is None and proto is not None and native.uses_native(proto):
        native_lib = str(native.library_path())
    if native_lib is not None:
        so.register_custom_ops_library(str(native_lib))
    so.log_severity_level = 3
    so.graph_optimization_level = LEVELS[level]
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if hasattr(model, "SerializeToString"):
        src = model.SerializeToString()
    else:
        src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def optimized_op_counts(model, threads: int = 1, level: str = "all") -> Dict[str, int]:
    """Op types (``domain:op`` outside the default domain) of the graph onnxruntime runs after its
    optimizations (at ``level="all"`` including this CPU's NCHWc layout ops)."""
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


def iter_batches(data, batch: int = 256):
    """Yield ``(x, y)``: float image batches (N, C, H, W) from a tensor (``y`` is None) or from a
    dataset of ``(image, label)`` pairs, without holding the whole split in memory."""
    import torch  # only a caller holding torch data gets here: this module stays importable without torch
    from torch.utils.data import DataLoader

    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch):
            yield data[i : i + batch].float(), None
        return
    for x, y in DataLoader(data, batch_size=batch, shuffle=False, num_workers=0):
        yield x.float(), torch.as_tensor(y)
