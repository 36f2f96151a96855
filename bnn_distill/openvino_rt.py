"""OpenVINO as a second FP32 runtime for ``bnn-distill bench`` (the optional ``[peers]`` extra).

Users compare a binary student against the fastest FP32 runtime they could deploy the teacher
with, not only onnxruntime. :func:`openvino_session` compiles an exported ONNX file for the CPU
with a fixed input shape, the latency hint, one stream, a given number of threads and FP32
arithmetic (without the precision hint OpenVINO runs bf16 on CPUs that have it, which would not
be an FP32 teacher), and wraps it in the ``run(None, feed)`` call onnxruntime sessions have, so
the benchmark's interleaved timing loop treats both alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import UserError


class OpenVinoUnavailable(UserError):
    """OpenVINO is not installed, or cannot compile the model here."""


def available() -> bool:
    """Whether ``import openvino`` works."""
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def version() -> Optional[str]:
    try:
        import openvino as ov
    except Exception:
        return None
    return str(ov.__version__)


#: The compile settings; ``INFERENCE_NUM_THREADS`` is added per session.
CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
REPORTED = (
    "INFERENCE_NUM_THREADS",
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "INFERENCE_PRECISION_HINT",
    "ENABLE_CPU_PINNING",
)


class OpenVinoSession:
    """A compiled OpenVINO model with onnxruntime's ``run(output_names, feed)`` call (one input)."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()

    def run(self, output_names: Optional[Sequence[str]], feed: Dict[str, Any]) -> List[Any]:
        (x,) = feed.values()
        self._request.infer({0: x})
        return [self._request.get_output_tensor(0).data.copy()]

    def properties(self) -> Dict[str, str]:
        """The settings OpenVINO compiled with (threads, hint, streams, precision, pinning)."""
        out = {}
        for key in REPORTED:
            try:
                value = self._compiled.get_property(key)
            except Exception:  # a property this version does not report
                continue
            name = getattr(value, "get_type_name", None)  # an element type (precision): 'f32', not its repr
            out[key] = str(name() if callable(name) else value)
        return out


def openvino_session(path: Path, input_shape: Sequence[int], threads: int) -> OpenVinoSession:
    """Compile ``path`` (ONNX) for the CPU at the fixed ``input_shape`` (N, C, H, W)."""
    try:
        import openvino as ov
    except Exception as e:
        raise OpenVinoUnavailable(
            f"OpenVINO is not importable ({type(e).__name__}); pip install 'bnn-distill[peers]' for its row"
        ) from None
    try:
        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): list(int(d) for d in input_shape)})
        compiled = core.compile_model(model, "CPU", {**CONFIG, "INFERENCE_NUM_THREADS": int(threads)})
    except Exception as e:  # OpenVINO's own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise OpenVinoUnavailable(f"OpenVINO cannot compile '{path}' ({first})") from None
    return OpenVinoSession(compiled)
