"""Writing an export folder: the models lowered and parity-checked, then the files and the manifest;
and :func:`export_run`, the export of a trained run folder."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from .. import native
from ..checkpoint import atomic_write_bytes, load_checkpoint, load_model_state, state_dict_of
from ..data import build_datasets
from ..errors import UserError
from ..manifest import EXPORT_FORMAT, INPUT_NAME, MANIFEST, OUTPUT_NAME
from ..models import create_model
from ..onnxrt import fused_integer_matmuls, optimized_op_counts
from ..rundir import RunDir, model_from_checkpoint
from ..summary import summarize
from .graph import IR_VERSION, OPSET, ExportError, _version
from .parity import check_parity, compare_graphs, parity_inputs, parity_message
from .targets import lower
from .weights import is_w1a1

log = logging.getLogger("bnn_distill.export")

PARITY = "parity.json"
STALE_FILES = ("bench.json", "bench.md", "bench.png")
MODEL_FILES = {
    "teacher": "teacher_fp32.onnx",
    "student_fp32": "student_fp32.onnx",
    "student_binary": "student_binary.onnx",
    "student_native": "student_binary_native.onnx",
}
RUNTIMES = ("standard", "native")


# ---------------------------------------------------------------- export of models


def student_fp32(student: nn.Module, spec: Dict[str, Any]) -> nn.Module:
    """The same student with quantisation off: its real-valued weights, plain convs, no sign."""
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


def export_models(
    student: nn.Module,
    student_spec: Dict[str, Any],
    out_dir,
    info: ExportInfo,
    teacher: Optional[nn.Module] = None,
    data=None,
    force: bool = False,
    runtime: str = "standard",
    strict_top1: bool = False,
    progress: bool = False,
) -> Dict[str, Any]:
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
    out = Path(out_dir)
    if runtime not in RUNTIMES:  # checked first: nothing is written for a bad choice
        raise ExportError(f"--runtime '{runtime}' is not one of: {', '.join(RUNTIMES)}")
    guard_out_dir(out, info.fingerprint, force)
    native_info = None
    if runtime == "native":
        native_info = native.info(native.library_path())  # fails here, before any work, when unavailable
    models = _models_to_export(student, student_spec, teacher, runtime)
    if data is None:
        data = parity_inputs(info.input_shape)
    protos, results = {}, {}
    for role, mdl in models.items():
        protos[role], results[role] = _lower_and_check(role, mdl, info, data, strict_top1, progress)
    parity = _parity_report(student, info, data, protos, results, progress)
    _write_parity(out, parity, results)
    # Until the new manifest lands last, the folder is not a finished export: an interrupted
    # rewrite must not leave an old manifest vouching for a mix of old and new model files.
    for name in (MANIFEST, *STALE_FILES, *(f for r, f in MODEL_FILES.items() if r not in protos)):
        (out / name).unlink(missing_ok=True)
    files = {role: _write_model(out, role, proto, results[role], info) for role, proto in protos.items()}
    manifest = _manifest(student, info, protos, files, runtime, native_info)
    for stale in STALE_FILES:  # a benchmark of the models this export replaced
        (out / stale).unlink(missing_ok=True)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _models_to_export(
    student: nn.Module, student_spec: Dict[str, Any], teacher: Optional[nn.Module], runtime: str
) -> Dict[str, nn.Module]:
    """The models by role, in the order they are lowered and written."""
    student.eval()
    models: Dict[str, nn.Module] = {"student_binary": student, "student_fp32": student_fp32(student, student_spec)}
    if teacher is not None:
        models["teacher"] = teacher.eval()
    if runtime == "native":
        models["student_native"] = student
    return models


def _lower_and_check(role: str, mdl: nn.Module, info: ExportInfo, data, strict_top1: bool, progress: bool):
    """One model lowered to ONNX, checked, and its parity with PyTorch measured (and logged)."""
    proto, probes = lower(mdl, info.input_shape, name=f"{info.run}_{role}", native=role == "student_native")
    onnx.checker.check_model(proto, full_check=True)
    if role != "student_native":
        check_default_domain(proto)
    res = check_parity(role, mdl, proto, probes, data, strict_top1=strict_top1, progress=progress)
    log.info(
        "parity %s: top-1 %d/%d, max |logit diff| %.3g (tol %.3g)%s",
        role,
        res.top1_agree,
        res.n,
        res.max_abs_diff,
        res.atol,
        "" if res.passed else " FAILED",
    )
    if res.passed and res.top1_changed_by_flips:
        log.warning(
            "%s: %d image(s) change top-1 through a sign taken of a value within float32 rounding of 0 "
            "(PyTorch's float conv vs the exact integer sum; listed in parity.json); --strict-top1 "
            "makes this fail the export",
            role,
            len(res.top1_changed_by_flips),
        )
    return proto, res


def _parity_report(
    student: nn.Module, info: ExportInfo, data, protos: Dict[str, Any], results: Dict[str, Any], progress: bool
) -> Dict[str, Any]:
    """The content of ``parity.json``: each model's parity, the binary convs onnxruntime fused, and
    (native) the native graph against the standard one."""
    counts = optimized_op_counts(protos["student_binary"])
    n_binary = sum(1 for _, m_ in student.named_modules() if isinstance(m_, nn.Conv2d) and is_w1a1(m_))
    fused = fused_integer_matmuls(counts)
    if n_binary and fused < n_binary:
        log.warning(
            "onnxruntime fused %d of %d binary convs into MatMulIntegerToFloat; the rest run in float", fused, n_binary
        )
    parity = {
        "format": EXPORT_FORMAT,
        "run": info.run,
        "stage": info.stage,
        "images": int(len(data)),
        "source": "random inputs" if isinstance(data, torch.Tensor) else "test split",
        "passed": all(r.passed for r in results.values()),
        "models": {role: r.to_dict() for role, r in results.items()},
        "binary_convs": n_binary,
        "fused_matmul_integer_to_float": fused,
        "optimized_ops": counts,
    }
    if "student_native" in protos:
        parity["native_vs_standard"] = compare_graphs(
            protos["student_native"], protos["student_binary"], data, progress=progress
        )
        log.info(
            "native vs standard integer graph: top-1 identical on %d/%d images, max |logit diff| %.3g",
            parity["native_vs_standard"]["top1_agree"],
            parity["native_vs_standard"]["n"],
            parity["native_vs_standard"]["max_abs_diff"],
        )
    return parity


def _write_parity(out: Path, parity: Dict[str, Any], results: Dict[str, Any]) -> None:
    """Write ``parity.json``; when a model failed, first remove the export it was to replace, then raise."""
    failed = [r for r in results.values() if not r.passed]
    if failed:  # the folder no longer holds a finished export: only the report of why
        for name in (MANIFEST, *MODEL_FILES.values(), *STALE_FILES):
            (out / name).unlink(missing_ok=True)
    atomic_write_bytes(out / PARITY, (json.dumps(parity, indent=2) + "\n").encode())
    if failed:
        raise ExportError(parity_message(failed[0]) + f"; see {out / PARITY}")


def _write_model(out: Path, role: str, proto, r, info: ExportInfo) -> Dict[str, Any]:
    """Write one model with its metadata; returns its entry in the manifest's ``models``."""
    meta = {
        "bnn_distill.role": role,
        "bnn_distill.run": info.run,
        "bnn_distill.stage": info.stage,
        "bnn_distill.quant": info.quant if role in ("student_binary", "student_native") else "FP",
        "bnn_distill.runtime": "native" if role == "student_native" else "standard",
        "bnn_distill.recipe": info.recipe_yaml,
        "bnn_distill.test_top1": "" if r.onnx_top1 is None else f"{r.onnx_top1:.4f}",
        "bnn_distill.parity": json.dumps({"top1_agree": r.top1_agree, "n": r.n, "max_abs_diff": r.max_abs_diff}),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    blob = proto.SerializeToString()
    atomic_write_bytes(out / MODEL_FILES[role], blob)
    return {
        "file": MODEL_FILES[role],
        "bytes": len(blob),
        "sha256": _sha256(blob),
        "test_top1": r.onnx_top1,
        "torch_test_top1": None if r.onnx_top1 is None else r.torch_top1,
    }


def _manifest(
    student: nn.Module,
    info: ExportInfo,
    protos: Dict[str, Any],
    files: Dict[str, Dict[str, Any]],
    runtime: str,
    native_info,
) -> Dict[str, Any]:
    """The content of ``manifest.json``."""
    c, h, w = info.input_shape
    n_classes = protos["student_binary"].graph.output[0].type.tensor_type.shape.dim[1].dim_value
    return {
        "format": EXPORT_FORMAT,
        "run": info.run,
        "run_dir": info.run_dir,
        "fingerprint": info.fingerprint,
        "stage": info.stage,
        "quant": info.quant,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", n_classes]},
        "normalization": {
            "formula": "(pixel / 255 - mean[c]) / std[c]",
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "classes": list(info.classes),
        "dataset": info.dataset,
        "models": files,
        "files": sorted([MODEL_FILES[r] for r in protos] + [PARITY, MANIFEST]),
        "runtime": runtime,
        "native": native_info,
        "sizes": file_sizes(student, info.input_shape, files),
        "parity_passed": True,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def file_sizes(student: nn.Module, input_shape: Sequence[int], files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The binary student's deployed size (1 bit per binary weight, fp32 for the rest; see
    :mod:`bnn_distill.summary`) next to each ONNX file's size, and each file over it."""
    deployed = int(round(summarize(student, tuple(input_shape)).memory_bytes))
    out: Dict[str, Any] = {
        "deployed_bytes": deployed,
        "files": {f["file"]: f["bytes"] for f in files.values()},
        "over_deployed": {f["file"]: round(f["bytes"] / deployed, 2) for f in files.values() if deployed},
    }
    if "student_native" in files:
        out["standard_over_native"] = round(files["student_binary"]["bytes"] / files["student_native"]["bytes"], 3)
    return out


def _versions() -> Dict[str, str]:
    return {
        "bnn_distill": _version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }


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
        raise ExportError(
            f"'{out}' holds an export of another run ('{old.get('run')}', fingerprint "
            f"{old.get('fingerprint')}); choose another --out or pass --force to overwrite it"
        )


# ---------------------------------------------------------------- export of a run


def export_run(
    run_dir,
    out: Optional[str] = None,
    stage: Optional[str] = None,
    force: bool = False,
    data_root: Optional[str] = None,
    limit_test: Optional[int] = None,
    runtime: str = "standard",
    strict_top1: bool = False,
    progress: bool = False,
) -> Dict[str, Any]:
    """Export a trained run folder (``runs/NAME``): see :mod:`bnn_distill.export`. Returns the manifest."""
    run = RunDir(run_dir).require()
    recipe = run.recipe()
    st = _binary_stage(run, recipe, stage)
    ck_path = run.last(st.name)
    if not ck_path.is_file():
        raise UserError(f"stage '{st.name}' of {run} has no checkpoint ({ck_path}); train it first")
    student, ck = model_from_checkpoint(ck_path)
    spec = ck["model_spec"]
    teacher = _load_teacher(run, recipe, spec)
    d = recipe.data
    root = data_root or d.root
    limit = limit_test or d.limit_test
    _, test_set, dinfo = build_datasets(d.dataset, root, False, False, d.limit_train, limit, seed=recipe.seed)
    if len(test_set) == 0:
        raise UserError(f"data: the test split of '{dinfo.name}' is empty; parity needs images")
    info = _export_info(run, recipe, st, test_set, dinfo, root, limit)
    out_dir = Path(out) if out else Path("export") / recipe.name
    return export_models(
        student,
        spec,
        out_dir,
        info,
        teacher=teacher,
        data=test_set,
        force=force,
        runtime=runtime,
        strict_top1=strict_top1,
        progress=progress,
    )


def _binary_stage(run: RunDir, recipe, stage: Optional[str]):
    """The run's stage ``stage`` (default: see :meth:`RunDir.stage`); a UserError unless it is a binary student."""
    st = run.stage(recipe, stage)
    if st.kind != "student" or st.quant == "FP":
        valid = ", ".join(s.name for s in recipe.stages if s.kind == "student" and s.quant != "FP") or "none"
        raise UserError(f"stage '{st.name}' is {st.kind} {st.quant}, not a binary student; binary stages: {valid}")
    return st


def _load_teacher(run: RunDir, recipe, spec: Dict[str, Any]) -> Optional[nn.Module]:
    """The run's teacher: its teacher stage's checkpoint, else ``teacher.checkpoint``, else None."""
    teacher = None
    teacher_stage = next((s for s in recipe.stages if s.kind == "teacher"), None)
    if teacher_stage is not None:
        tpath = run.last(teacher_stage.name)
        if not tpath.is_file():
            raise UserError(f"the teacher stage of {run} has no checkpoint ({tpath})")
        teacher, _ = model_from_checkpoint(tpath)
    elif recipe.teacher.checkpoint is not None:
        from ..trainer import model_spec_dict  # the teacher's spec as training builds it (trainer is heavy)

        teacher = create_model(**model_spec_dict(recipe, recipe.teacher, "FP", spec["num_classes"], spec["in_chans"]))
        load_model_state(
            teacher,
            state_dict_of(load_checkpoint(recipe.teacher.checkpoint)),
            f"teacher.checkpoint '{recipe.teacher.checkpoint}'",
        )
    return teacher


def _export_info(run: RunDir, recipe, st, test_set, dinfo, root, limit) -> ExportInfo:
    """What the manifest records of the run, its stage and the test data."""
    return ExportInfo(
        input_shape=tuple(test_set[0][0].shape),
        mean=tuple(dinfo.mean),
        std=tuple(dinfo.std),
        classes=tuple(dinfo.classes),
        run=recipe.name,
        fingerprint=recipe.fingerprint(),
        stage=st.name,
        quant=st.quant,
        recipe_yaml=run.recipe_file.read_text(),
        run_dir=str(run),
        dataset={
            "name": dinfo.name,
            "root": root,
            "limit_test": limit,
            "seed": recipe.seed,
            "test_images": len(test_set),
        },
    )
