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
an exact ``Where(x >= 0, 1, -1)``). Anything this package does not know how to lower stops the
export with a :class:`UserError` naming the layer.

The package, by job:

* :mod:`.graph`: the ONNX graph builder, tensors and probes, im2col and pool index tables;
* :mod:`.weights`: conv kinds, binary weight matrices, BatchNorm affines;
* :mod:`.lower`: the traversal every target shares, and the float lowering (FP, W32A1);
* :mod:`.lower_int`: the integer lowering of binary models (the exact standard graph);
* :mod:`.targets`: :func:`lower`, which picks the lowering for a model (the native runtime's is
  :mod:`bnn_distill.native.lower`, beside its kernels);
* :mod:`.parity`: PyTorch vs onnxruntime, and where they diverge;
* :mod:`.write`: the export folder (models, ``parity.json``, ``manifest.json``) and :func:`export_run`.

onnxruntime sessions and op counts are :mod:`bnn_distill.onnxrt`; the manifest's names and its
reader are :mod:`bnn_distill.manifest`.
"""

from ..manifest import EXPORT_FORMAT, INPUT_NAME, MANIFEST, OUTPUT_NAME
from ..onnxrt import fused_integer_matmuls, iter_batches, optimized_op_counts, ort_session
from .graph import IR_VERSION, OPSET, ExportError, Probe, avgpool_indices, im2col_indices
from .lower import FloatLowering, Lowering, conv_kinds
from .lower_int import TILE_BYTES, IntLowering
from .parity import (
    FLIP_RTOL,
    RTOL,
    ParityResult,
    check_parity,
    compare_graphs,
    diagnose,
    parity_inputs,
    parity_message,
    probe_outputs,
)
from .targets import lower, lowering_class
from .weights import binary_weight_matrix, bn_affine, conv_kind
from .write import (
    MODEL_FILES,
    PARITY,
    RUNTIMES,
    STALE_FILES,
    ExportInfo,
    check_default_domain,
    export_models,
    export_run,
    file_sizes,
    guard_out_dir,
    student_fp32,
)

__all__ = [
    "EXPORT_FORMAT",
    "INPUT_NAME",
    "MANIFEST",
    "OUTPUT_NAME",
    "fused_integer_matmuls",
    "iter_batches",
    "optimized_op_counts",
    "ort_session",
    "IR_VERSION",
    "OPSET",
    "ExportError",
    "Probe",
    "avgpool_indices",
    "im2col_indices",
    "FloatLowering",
    "Lowering",
    "conv_kinds",
    "TILE_BYTES",
    "IntLowering",
    "FLIP_RTOL",
    "RTOL",
    "ParityResult",
    "check_parity",
    "compare_graphs",
    "diagnose",
    "parity_inputs",
    "parity_message",
    "probe_outputs",
    "lower",
    "lowering_class",
    "binary_weight_matrix",
    "bn_affine",
    "conv_kind",
    "MODEL_FILES",
    "PARITY",
    "RUNTIMES",
    "STALE_FILES",
    "ExportInfo",
    "check_default_domain",
    "export_models",
    "export_run",
    "file_sizes",
    "guard_out_dir",
    "student_fp32",
]
