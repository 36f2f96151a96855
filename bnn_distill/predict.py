"""Classify images with an exported model: ``bnn-distill predict EXPORT_DIR IMAGE...``.

Needs only onnxruntime, numpy and Pillow (no torch): this module imports nothing else, and the
modules it uses (:mod:`bnn_distill.manifest`, the native library's loader :mod:`bnn_distill.native`)
only the standard library.

* Images are PNG/JPEG (anything Pillow reads), converted to the model's channels (``L`` or
  ``RGB``), resized so that the shorter side fits and centre-cropped to the model's height and
  width (exports of ImageFolder data take the eval transform's 256 -> 224 ratio: resize the shorter
  side to 256/224 of the crop, then crop), then normalised from ``manifest.json`` exactly as
  training does (``pixel * (1 / (255 * std)) + (-mean / std)`` in float32, so a test image saved
  as PNG gives bit-identical logits to the test split's tensor).
* ``.npy`` arrays: ``uint8`` pixels, ``(H, W)`` (one channel), ``(H, W, C)`` or ``(C, H, W)`` at the
  model's size, normalised like an image; a float array is taken as the already-normalised input,
  ``(C, H, W)`` (or ``(H, W)`` for one channel). Arrays are never resized: a wrong size is an error.
* The graph: ``student_binary_native.onnx`` when the export has it and the native library loads
  (``runtime="auto"``), else ``student_binary.onnx``; ``runtime="native"`` or ``"standard"`` chooses.

Every input a user can get wrong (a folder that is not a finished export, a file that is not an
image, an array of the wrong shape) raises :class:`PredictError`: one line, exit status 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from . import native
from .errors import UserError, choices
from .manifest import EXPORT_FORMAT, INPUT_NAME, MANIFEST, OUTPUT_NAME, read_manifest

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "standard", "native")
ROLES = ("student_binary", "student_fp32", "teacher")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: ImageFolder exports were evaluated with Resize(256) + CenterCrop(224).
CROP_RATIO = {"imagefolder": 224 / 256}
BATCH = 64


class PredictError(UserError):
    """An export folder, image or array that ``predict`` cannot use."""


# ---------------------------------------------------------------- the export folder


def load_export(export_dir) -> Dict[str, Any]:
    """The manifest of a finished export folder, checked: format, input, normalisation, model files."""
    d = Path(export_dir)
    path = d / MANIFEST
    m = read_manifest(d, PredictError)
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise PredictError(
            f"'{path}' is not a bnn-distill export manifest (format {got!r}, expected {EXPORT_FORMAT!r})"
        )
    try:
        shape = m["input"]["shape"]
        c, h, w = (int(v) for v in shape[1:])
        mean = [float(v) for v in m["normalization"]["mean"]]
        std = [float(v) for v in m["normalization"]["std"]]
        models = dict(m["models"])
    except (KeyError, TypeError, ValueError):
        raise PredictError(f"'{path}' lacks the input shape, normalisation or model list; re-run the export") from None
    if len(shape) != 4 or min(c, h, w) < 1:
        raise PredictError(f"'{path}': input shape {shape} is not [batch, C, H, W]; re-run the export")
    if len(mean) != c or len(std) != c or not all(s > 0 for s in std):
        raise PredictError(
            f"'{path}': normalisation mean {mean} / std {std} does not fit {c} channel(s); "
            "predict needs the dataset's statistics (export from a run)"
        )
    for role, entry in models.items():
        f = d / entry["file"]
        if not f.is_file():
            raise PredictError(
                f"'{d}' lacks {entry['file']} listed in its manifest: an incomplete export; re-run the export"
            )
        if entry.get("bytes") is not None and f.stat().st_size != int(entry["bytes"]):
            raise PredictError(
                f"'{f}' is {f.stat().st_size} bytes, its manifest says {entry['bytes']}: a partial or "
                "replaced file; re-run the export"
            )
    if "student_binary" not in models:
        raise PredictError(f"'{path}' lists no binary student (student_binary); re-run the export")
    return m


def class_names(manifest: Dict[str, Any], n: int) -> List[str]:
    names = [str(v) for v in manifest.get("classes") or []]
    return names if len(names) == n else [str(i) for i in range(n)]


# ---------------------------------------------------------------- images


def _resample():
    return Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR


def fit_image(img, h: int, w: int, crop_ratio: float = 1.0):
    """Resize a PIL image so that it covers ``(h / crop_ratio, w / crop_ratio)`` keeping its aspect
    ratio, then centre-crop ``(h, w)``. An image already ``(h, w)`` (and ratio 1) is returned as is."""
    if img.size == (w, h) and crop_ratio == 1.0:
        return img
    tw, th = w / crop_ratio, h / crop_ratio
    s = max(tw / img.width, th / img.height)
    nw, nh = max(w, round(img.width * s)), max(h, round(img.height * s))
    img = img.resize((nw, nh), _resample())
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def read_pixels(path, c: int, h: int, w: int, crop_ratio: float = 1.0) -> np.ndarray:
    """A PNG/JPEG (anything Pillow opens) as uint8 ``(C, H, W)``: converted, resized, cropped."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            if c not in (1, 3):
                raise PredictError(
                    f"'{p}': the model takes {c} channels; give a .npy array (C, H, W) instead of an image"
                )
            img = img.convert("L" if c == 1 else "RGB")
            img = fit_image(img, h, w, crop_ratio)
            arr = np.asarray(img, dtype=np.uint8)
    except PredictError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PredictError(f"cannot read '{p}' as an image ({why}); give a PNG/JPEG file or a .npy array") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``(..., C, H, W)`` -> float32, as training does: ``x * (1 / (255 * std)) + (-mean / std)``."""
    c = pixels.shape[-3]
    std32 = np.asarray(std, dtype=np.float32).reshape(c, 1, 1)
    scale = np.float32(1.0) / (np.float32(255.0) * std32)
    shift = -np.asarray(mean, dtype=np.float32).reshape(c, 1, 1) / std32
    return pixels.astype(np.float32) * scale + shift


def read_array(path, c: int, h: int, w: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A ``.npy`` file as normalised float32 ``(C, H, W)`` (see the module docstring for the layouts)."""
    p = Path(path)
    try:
        a = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PredictError(f"cannot read '{p}' as a .npy array ({why})") from None
    want = (
        f"uint8 pixels (H, W{', C' if c > 1 else ''}) or (C, H, W), or a normalised float array (C, H, W), with "
        f"C={c}, H={h}, W={w}"
    )
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "uif" or a.dtype.kind == "f" and not np.isfinite(a).all():
        raise PredictError(f"'{p}' holds {getattr(a, 'dtype', type(a).__name__)} data; this model takes {want}")
    given = tuple(a.shape)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2 and c == 1:
        a = a[None]
    if a.ndim == 3 and a.shape == (h, w, c) and a.shape != (c, h, w):
        a = a.transpose(2, 0, 1)
    if a.shape != (c, h, w):
        raise PredictError(f"'{p}' is an array of shape {given}; this model takes {want}")
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    if a.min() < 0 or a.max() > 255:
        raise PredictError(
            f"'{p}' holds integers in [{a.min()}, {a.max()}]; pixels are 0..255 (or give a normalised float array)"
        )
    return normalize(a.astype(np.uint8), mean, std)


def load_input(path, manifest: Dict[str, Any]) -> np.ndarray:
    """One image or array as the model's normalised float32 input ``(C, H, W)``."""
    p = Path(path)
    c, h, w = (int(v) for v in manifest["input"]["shape"][1:])
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    if not p.is_file():
        raise PredictError(f"'{p}' is not a file; give PNG/JPEG images or .npy arrays")
    if p.suffix.lower() == ".npy":
        return read_array(p, c, h, w, mean, std)
    ratio = CROP_RATIO.get(str((manifest.get("dataset") or {}).get("name")), 1.0)
    return normalize(read_pixels(p, c, h, w, ratio), mean, std)


# ---------------------------------------------------------------- the session


def _native_library(required: bool) -> Optional[str]:
    """The native library's path if it loads here, else ``None`` (``required``: raise why).

    Unless required, nothing is downloaded: without cached headers or ``BNN_DISTILL_NATIVE_LIB``
    the standard graph is used."""
    try:
        if not required and not os.environ.get("BNN_DISTILL_NATIVE_LIB"):
            native.find_headers(download=False)
        lib = native.library_path()
        native.info(lib)  # loads it
        return str(lib)
    except native.NativeUnavailable as e:
        if required:
            raise PredictError(f"--runtime native: {e}") from None
        log.info("native library unavailable (%s); using the standard graph", e)
        return None


def _session(path: Path, threads: Optional[int], lib: Optional[str]):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if lib is not None:
        so.register_custom_ops_library(lib)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise PredictError(f"onnxruntime cannot load '{path}' ({first}); re-run the export") from None


def open_model(
    export_dir,
    manifest: Dict[str, Any],
    runtime: str = "auto",
    model: str = "student_binary",
    threads: Optional[int] = None,
) -> Tuple[Any, str, str]:
    """``(session, file, runtime used)`` for ``model`` of the export (``runtime`` applies to the binary student)."""
    d = Path(export_dir)
    if runtime not in RUNTIMES:
        raise PredictError(f"--runtime '{runtime}' is not one of {choices(RUNTIMES)}")
    models = manifest["models"]
    if model not in ROLES:
        raise PredictError(f"--model '{model}' is not one of {choices(ROLES)}")
    if model not in models:
        raise PredictError(f"'{d}' holds no {model} model; it has {choices(r for r in models if r in ROLES)}")
    if model != "student_binary" and runtime == "native":
        raise PredictError("--runtime native applies to the binary student only")
    if model == "student_binary" and runtime != "standard":
        if "student_native" not in models:
            if runtime == "native":
                raise PredictError(
                    f"'{d}' has no native graph; export it with 'bnn-distill export RUN --runtime "
                    "native', or use --runtime standard"
                )
        else:
            lib = _native_library(required=runtime == "native")
            if lib is not None:
                f = models["student_native"]["file"]
                try:
                    return _session(d / f, threads, lib), f, "native"
                except PredictError as e:
                    if runtime == "native":
                        raise
                    log.info("%s; using the standard graph", e)
    f = models[model]["file"]
    return _session(d / f, threads, None), f, "standard"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def predict(
    export_dir,
    images: Sequence,
    top_k: int = 5,
    runtime: str = "auto",
    model: str = "student_binary",
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Top-``top_k`` classes with softmax probabilities for every image; returns a JSON-ready dict.

    ``{"export", "model", "file", "runtime", "predictions": [{"image", "top": [{"class", "index",
    "probability"}], "logits"}]}``. Every image is read and checked before any is run."""
    if top_k < 1:
        raise PredictError(f"--top-k: {top_k} must be >= 1")
    if not images:
        raise PredictError("give at least one image")
    manifest = load_export(export_dir)
    xs = [load_input(p, manifest) for p in images]  # all checked first: one bad file, one line, nothing printed
    sess, fname, used = open_model(export_dir, manifest, runtime, model, threads)
    logits = np.concatenate(
        [sess.run([OUTPUT_NAME], {INPUT_NAME: np.stack(xs[i : i + BATCH])})[0] for i in range(0, len(xs), BATCH)]
    )
    probs = softmax(logits)
    names = class_names(manifest, logits.shape[1])
    k = min(top_k, logits.shape[1])
    preds = []
    for path, lg, pr in zip(images, logits, probs):
        order = np.argsort(-pr, kind="stable")[:k]
        preds.append(
            {
                "image": str(path),
                "top": [{"class": names[i], "index": int(i), "probability": float(pr[i])} for i in order],
                "logits": [float(v) for v in lg],
            }
        )
    return {
        "export": str(export_dir),
        "run": manifest.get("run"),
        "stage": manifest.get("stage"),
        "model": model,
        "file": fname,
        "runtime": used,
        "predictions": preds,
    }


def format_text(result: Dict[str, Any]) -> str:
    """One line per image: ``path: class 97.3%, class 1.2%, ...``."""
    lines = []
    for p in result["predictions"]:
        lines.append(f"{p['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in p["top"]))
    return "\n".join(lines)
