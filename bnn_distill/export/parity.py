"""Parity of an exported graph with its PyTorch model: logits on a set of images, and where and
why they differ (the first diverging layer, or a sign taken of a value within rounding of 0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper
from tqdm import tqdm

from ..manifest import INPUT_NAME, OUTPUT_NAME
from ..native import unpack_signs
from ..onnxrt import iter_batches, ort_session
from .graph import _T, Probe
from .weights import conv_kind

#: Logit tolerance, relative to ``max(1, max |logit|)`` of the PyTorch model. FP32 graphs differ by
#: summation order only; the binary graph's products are exact where PyTorch's float conv rounds,
#: so a pre-sign value within rounding of 0 can flip a sign (rare; top-1 must still agree).
RTOL = {"teacher": 1e-4, "student_fp32": 1e-4, "student_binary": 1e-3, "student_native": 1e-3}


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


def _take(data, idx: Sequence[int]) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(np.asarray(idx, dtype=np.int64))].float()
    return torch.stack([torch.as_tensor(data[int(i)][0]) for i in idx]).float()


def parity_batch(image_shape: Sequence[int], budget: int = 256 * 3 * 32 * 32) -> int:
    """Images per parity batch: 256 CIFAR-sized images' worth of pixels, at least 1.

    A failing batch is diagnosed whole, with every lowered layer's output kept, so the batch is
    bounded by pixels: 256 at 32x32 RGB, 5 at 224x224 RGB."""
    return max(1, min(256, budget // max(1, int(np.prod(image_shape)))))


def check_parity(
    role: str,
    model: nn.Module,
    onnx_model,
    probes: List[Probe],
    data,
    labels: Optional[torch.Tensor] = None,
    rtol: Optional[float] = None,
    strict_top1: bool = False,
    progress: bool = False,
    batch: Optional[int] = None,
) -> ParityResult:
    """PyTorch vs onnxruntime on ``data``: an image tensor (N, C, H, W) or a dataset of (image, label).

    Passes when top-1 agrees on every image and every image's logits agree within ``atol``, except
    images whose difference is explained: every lowered layer matches PyTorch on its own graph
    inputs (:func:`diagnose`), and the first sign that differs was taken of a value within float32
    rounding of 0 (PyTorch's float conv rounds its sums; the integer graph's are exact, so such a
    value can land on the other side of 0). Otherwise names the first diverging layer.

    Such a flip can also change a near-tied prediction (about 1 image in 10,000 on a trained
    Fashion-MNIST ResNet-20). Those images are listed in ``top1_changed_by_flips``; they fail the
    check only with ``strict_top1``.

    Images are run ``batch`` at a time (default :func:`parity_batch`), and an image that differs is
    diagnosed inside the very batch it was run in: PyTorch's and onnxruntime's float kernels may
    round differently at another batch size, so a near-zero sign seen in the batch need not recur
    when the image is run alone.
    """
    rtol = RTOL[role] if rtol is None else rtol
    if batch is None:
        batch = _default_batch(data)
    sess = ort_session(onnx_model)
    model.eval()
    have_labels = labels is not None or not isinstance(data, torch.Tensor)
    run = _run_batches(sess, model, data, labels, have_labels, role, progress, batch)
    res, ok = _result(role, run, rtol, have_labels)
    diff, agree, finite, seen = run["diff"], run["agree"], run["finite"], run["seen"]
    bad = np.nonzero(~ok | ~agree | ~finite)[0]
    explained = _explain_batches(res, model, onnx_model, probes, data, rtol, batch, seen, bad, diff, finite)
    res.strict_top1 = strict_top1
    if explained:
        res.top1_changed_by_flips = [int(j) for j in np.nonzero(~agree)[0]]
    res.passed = bool(finite.all()) and explained and (bool(agree.all()) or not strict_top1)
    if not res.passed and res.first_divergence is None and len(bad) and not res.top1_changed_by_flips:
        res.first_divergence = diagnose(model, onnx_model, probes, _take(data, bad[:8]), rtol)["drift"]
    return res


def _result(role: str, run: Dict[str, Any], rtol: float, have_labels: bool):
    """The :class:`ParityResult` of a :func:`_run_batches` run (not yet judged), and which images
    agree within ``atol``."""
    diff, agree, seen, max_logit = run["diff"], run["agree"], run["seen"], run["max_logit"]
    atol = rtol * max(1.0, max_logit)
    ok = diff <= atol
    torch_top1 = 100.0 * run["right_torch"] / seen if have_labels and seen else None
    onnx_top1 = 100.0 * run["right_onnx"] / seen if have_labels and seen else None
    res = ParityResult(
        role,
        seen,
        int(agree.sum()),
        float(diff.max()) if seen else 0.0,
        max_logit,
        atol,
        rtol,
        int(ok.sum()),
        float(diff[ok].max()) if ok.any() else 0.0,
        [],
        torch_top1,
        onnx_top1,
        False,
    )
    return res, ok


def _default_batch(data) -> int:
    """:func:`parity_batch` for the images of ``data`` (256 when it is empty)."""
    shape = () if len(data) == 0 else tuple(data.shape[1:] if isinstance(data, torch.Tensor) else data[0][0].shape)
    return parity_batch(shape) if shape else 256


def _run_batches(sess, model, data, labels, have_labels: bool, role: str, progress: bool, batch: int) -> Dict[str, Any]:
    """Run ``data`` through onnxruntime and PyTorch ``batch`` images at a time: per image the max
    |logit diff|, top-1 agreement and finiteness; the largest |PyTorch logit|; correct counts."""
    diffs, peaks, agrees, finites = [], [], [], []
    right_torch = right_onnx = seen = 0
    for i, (x, y) in enumerate(_bar(iter_batches(data, batch), data, f"parity {role}", progress, batch)):
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).float().numpy()
        fin = np.isfinite(got)
        diffs.append(np.where(fin, np.abs(got - ref), np.inf).max(1))
        peaks.append(np.abs(ref).max(1))
        agrees.append(got.argmax(1) == ref.argmax(1))
        finites.append(fin.all(1))
        if have_labels:
            yy = (labels[seen : seen + len(x)] if y is None else y).numpy()
            right_torch += int((ref.argmax(1) == yy).sum())
            right_onnx += int((got.argmax(1) == yy).sum())
        seen += len(x)
    return {
        "diff": np.concatenate(diffs),
        "agree": np.concatenate(agrees),
        "finite": np.concatenate(finites),
        "max_logit": float(np.concatenate(peaks).max()) if seen else 0.0,
        "right_torch": right_torch,
        "right_onnx": right_onnx,
        "seen": seen,
    }


def _explain_batches(res: ParityResult, model, onnx_model, probes, data, rtol, batch, seen, bad, diff, finite) -> bool:
    """Diagnose each batch holding a ``bad`` image, in the batch it was run in: record the sign
    flips that explain them in ``res``, or the first divergence; True when all are explained."""
    for start in sorted({int(j) // batch * batch for j in bad}):
        idx = bad[(bad >= start) & (bad < start + batch)]
        diag = diagnose(model, onnx_model, probes, _take(data, range(start, min(seen, start + batch))), rtol)
        if diag["local"] is not None:
            res.first_divergence = diag["local"]
            return False
        for j, flip in zip(idx, [diag["flips"][int(j) - start] for j in idx]):
            if flip is None or flip["rel"] > FLIP_RTOL or not finite[j]:
                res.first_divergence = diag["drift"] or {"layer": None, "check": "unexplained"}
                return False
            res.sign_flips.append({"image": int(j), "max_abs_logit_diff": float(diff[j]), **flip})
    return True


def _bar(batches, data, desc: str, progress: bool, batch: int = 256):
    """``batches`` with a tqdm bar (on stderr, removed when done) when ``progress``."""
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
    head = (
        f"parity failed for {r.model}: top-1 agrees on {r.top1_agree}/{r.n} images, "
        f"{r.within_tol}/{r.n} within |logit diff| {r.atol:.3g} (max {r.max_abs_diff:.3g})"
    )
    where = r.first_divergence or {}
    if where.get("layer"):
        how = "on its own inputs" if where.get("check") == "local" else "accumulated"
        return head + f"; first diverging layer '{where['layer']}' ({how}, max rel diff {where['max_rel_diff']:.3g})"
    if r.top1_agree < r.n and r.top1_changed_by_flips:
        return head + (
            f"; every layer agrees on its inputs: a sign of a value within float32 rounding of 0 changed "
            f"{len(r.top1_changed_by_flips)} near-tied prediction(s); without --strict-top1 this passes"
        )
    return head


def _as_nchw(arr: np.ndarray, t: _T) -> torch.Tensor:
    if t.layout == "bits":  # packed signs (the native lowering's) -> +-1
        arr = unpack_signs(arr, t.c).reshape(arr.shape[0], t.h, t.w, t.c).transpose(0, 3, 1, 2)
    elif t.layout == "flat":
        arr = arr.reshape(arr.shape[0], t.h, t.w, t.c).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def probe_outputs(
    onnx_model, tensors: Sequence[_T], images: torch.Tensor, level: str = "basic"
) -> Dict[str, np.ndarray]:
    """Run the graph with ``tensors`` as extra outputs; returns name -> array (plus input and logits)."""
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    names: List[str] = []
    for t in tensors:
        if t.name not in names and t.name not in (INPUT_NAME, OUTPUT_NAME):
            names.append(t.name)
            m.graph.output.append(
                helper.make_tensor_value_info(
                    t.name, TensorProto.UINT64 if t.layout == "bits" else TensorProto.FLOAT, None
                )
            )
    sess = ort_session(m, level=level)
    outs = dict(zip([OUTPUT_NAME] + names, sess.run([OUTPUT_NAME] + names, {INPUT_NAME: images.numpy()})))
    outs[INPUT_NAME] = images.numpy()
    return outs


def _sign_input(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and conv_kind(m) in ("W32A1", "W1A1")


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
    local = _local_divergence(probes, mods, outs, graph_out, rtol)
    seen_in, seen_out = _full_pass(model, mods, probes, images)
    drift = None
    for p in probes:
        if p.out_path in seen_out:
            d = _rel_diff(graph_out[id(p.module)], seen_out[p.out_path].float())
            if not d <= rtol:
                drift = {"layer": p.name, "check": "accumulated", "max_rel_diff": d}
                break
    flips = _sign_flips(onnx_model, probes, mods, seen_in, images)
    return {"local": local, "flips": flips, "drift": drift}


def _local_divergence(probes: List[Probe], mods, outs, graph_out, rtol: float) -> Optional[Dict[str, Any]]:
    """The first lowered layer whose graph output differs from its PyTorch module run on the same
    graph inputs (inner convs' outputs replaced by the graph's), or ``None``."""
    replace = {}  # module -> graph output, for convs (and a conv lowered with its BatchNorm)
    for p in probes:
        if isinstance(p.module, nn.Conv2d) or p.in_path != p.out_path:
            replace[id(mods.get(p.out_path, p.module))] = graph_out[id(p.module)]
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
            return {"layer": p.name, "check": "local", "max_rel_diff": d}
    return None


def _full_pass(model: nn.Module, mods, probes: List[Probe], images: torch.Tensor):
    """A full PyTorch pass over ``images``: the input and output of each probed module, by path."""
    seen_in: Dict[str, torch.Tensor] = {}
    seen_out: Dict[str, torch.Tensor] = {}

    def record(key: str):
        def hook(mod, inputs, output) -> None:
            seen_in[key], seen_out[key] = inputs[0].detach(), output.detach()

        return hook

    hooks = [
        mods[path].register_forward_hook(record(path))
        for path in dict.fromkeys(q for p in probes for q in (p.in_path, p.out_path))
        if path in mods
    ]
    try:
        model(images)
    finally:
        for hk in hooks:
            hk.remove()
    return seen_in, seen_out


def _sign_flips(onnx_model, probes: List[Probe], mods, seen_in, images: torch.Tensor) -> List[Optional[Dict[str, Any]]]:
    """Per image, the first binary conv whose input signs differ between PyTorch and the graph."""
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
                flips[i] = {
                    "layer": p.in_path,
                    "signs_differing": int(differ[i].sum()),
                    "value": v,
                    "rel": v / max(float(x_ref[i].abs().max()), 1e-30),
                }
    return flips


def parity_inputs(input_shape: Sequence[int], n: int = 16, seed: int = 0) -> torch.Tensor:
    """Random normal inputs with exact zeros: whole zero images and zeroed pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(input_shape), generator=g)
    x[0] = 0.0
    x[1, :, ::2, ::3] = 0.0
    return x
