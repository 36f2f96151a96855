"""onnxruntime benchmark of an export folder: teacher FP32, student FP32 and binary student side by side.

Latency is measured interleaved: after a warm-up, every measurement round runs each model once,
in an order that rotates from round to round, so load from other processes and frequency changes
hit every model alike. Intra-op threads do not spin-wait (with spinning, the idle pool of one
session keeps a core busy while the next session runs: 2-3x slower multi-thread numbers here).
Reported per (batch size, thread count): p50 and p90 in ms, and each model's p50 speed-up over the
teacher. Also: which nodes onnxruntime fused (op counts of its optimized
graph), the machine (CPU model and the SIMD flags that matter for integer kernels), and the
top-1 accuracy of every exported model on the test split, run through onnxruntime.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` into the export folder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from . import native, openvino_rt
from .bench_report import (  # noqa: F401 - the report's names stay importable from here
    LABELS,
    OPENVINO_ROLE,
    ROLES,
    bench_figure,
    markdown,
    plot,
    plot_png,
)
from .checkpoint import atomic_write_bytes
from .data import build_datasets
from .errors import UserError
from .manifest import EXPORT_FORMAT, INPUT_NAME, MANIFEST, OUTPUT_NAME, read_manifest
from .onnxrt import fused_integer_matmuls, iter_batches, optimized_op_counts, ort_session

log = logging.getLogger(__name__)

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_vpopcntdq", "avx_vnni", "amx_int8")
BENCH_JSON, BENCH_MD, BENCH_PNG = "bench.json", "bench.md", "bench.png"


def machine() -> Dict[str, Any]:
    """CPU model, core count, the SIMD flags integer kernels use, onnxruntime version, load."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in FLAGS},
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def load_manifest(export_dir: Path) -> Dict[str, Any]:
    path = export_dir / MANIFEST
    manifest = read_manifest(export_dir)
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"'{path}' is not a bnn-distill export manifest (format {found!r})")
    models = manifest.get("models", {})
    if not isinstance(models, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("file"), str) for e in models.values()
    ):
        raise UserError(f"'{path}': 'models' must map each model to an entry with its 'file'; re-run the export")
    shape = manifest.get("input", {}).get("shape") if isinstance(manifest.get("input"), dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, (int, str)) for d in shape):
        raise UserError(f"'{path}': 'input.shape' must be a list of dimensions, got {shape!r}; re-run the export")
    for role, entry in models.items():
        if not (export_dir / entry["file"]).is_file():
            raise UserError(f"'{export_dir}' lacks {entry['file']} listed in its manifest; re-run the export")
    return manifest


def _check_files(export_dir: Path, files: Sequence[str]) -> None:
    """Every listed model file parses as ONNX, else one line naming it (a truncated or foreign file)."""
    for name in files:
        try:
            model = onnx.load(str(export_dir / name), load_external_data=False)
            why = "" if model.graph.node else "no graph in it"  # an empty file parses as an empty model
        except Exception as e:  # protobuf's DecodeError and friends
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        if why:
            raise UserError(f"'{export_dir / name}' is not a readable ONNX file ({why}); re-run the export")


def _session(path: Path, **kw):
    """:func:`ort_session` of an exported file, with onnxruntime's error for a damaged one as one line."""
    try:
        return ort_session(path, **kw)
    except UserError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise UserError(f"onnxruntime cannot load '{path}' ({first}); re-run the export") from None


def _percentiles(ms: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "n": int(a.size),
    }


def time_interleaved(
    sessions: Dict[str, Any], x: np.ndarray, repeats: Optional[int], warmup: int, budget_s: float, burst: int = 1
) -> Dict[str, List[float]]:
    """Run every session ``burst`` times back to back per round, rotating the order of the models
    from round to round; returns milliseconds per model (every call).

    ``repeats=None`` picks the number of rounds from ``budget_s`` and the warm-up time (10..200).
    See :func:`split_burst` for the first (cold) and later (warm) calls of each burst.
    """
    names = list(sessions)
    feed = {INPUT_NAME: x}
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        for name in names:
            sessions[name].run(None, feed)
    per_round = burst * (time.perf_counter() - t0) / max(1, warmup)
    rounds = repeats if repeats is not None else int(min(200, max(10, budget_s / max(per_round, 1e-6))))
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            for _ in range(burst):
                t = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(1e3 * (time.perf_counter() - t))
    return times


def split_burst(ms: Sequence[float], burst: int):
    """(warm, cold): the calls after the first of each burst (the model's weights and buffers still in
    cache from its previous call, as when a process serves one model) and the first calls (right after
    the other models ran and evicted them)."""
    if burst <= 1:
        return list(ms), list(ms)
    warm = [v for i, v in enumerate(ms) if i % burst]
    cold = [v for i, v in enumerate(ms) if not i % burst]
    return warm, cold


def onnx_accuracy(
    export_dir: Path,
    manifest: Dict[str, Any],
    data_root: Optional[str],
    roles: Optional[Sequence[str]] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Top-1 of every exported model on the manifest's test split, through onnxruntime."""
    ds = manifest.get("dataset") or {}
    if not ds.get("name"):
        return {"skipped": "the export records no dataset (exported without a run)"}
    try:
        _, test_set, _ = build_datasets(
            ds["name"],
            data_root or ds.get("root"),
            False,
            False,
            1,
            ds.get("limit_test"),
            seed=int(ds.get("seed") or 0),
        )
    except UserError as e:  # the latency numbers are still worth writing
        log.warning("no accuracy: %s (pass --data-root)", e)
        return {"skipped": f"test split unavailable: {e}"}
    models = {role: entry for role, entry in manifest["models"].items() if roles is None or role in roles}
    sessions = {role: _session(export_dir / entry["file"]) for role, entry in models.items()}
    right = {role: 0 for role in sessions}
    n = 0
    for x, y in tqdm(
        iter_batches(test_set),
        total=-(-len(test_set) // 256),
        desc="bench accuracy",
        unit="batch",
        leave=False,
        disable=not progress,
    ):
        for role, sess in sessions.items():
            logits = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            right[role] += int((logits.argmax(1) == y.numpy()).sum())
        n += len(x)
    out: Dict[str, Any] = {"images": n}
    for role, entry in models.items():
        out[role] = {
            "top1": 100.0 * right[role] / max(n, 1),
            "export_top1": entry.get("test_top1"),
            "torch_top1": entry.get("torch_test_top1"),
        }
    return out


def run_bench(
    export_dir,
    batches: Sequence[int] = (1, 32),
    threads: Optional[Sequence[int]] = None,
    repeats: Optional[int] = None,
    warmup: int = 3,
    budget_s: float = 3.0,
    accuracy: bool = True,
    data_root: Optional[str] = None,
    seed: int = 0,
    burst: int = 3,
    progress: bool = False,
    openvino: Optional[bool] = None,
) -> Dict[str, Any]:
    """Benchmark an export folder; writes bench.json, bench.md and bench.png there (the plot is skipped,
    with a one-line note, without matplotlib). ``progress``: a tqdm bar over the settings.

    ``openvino``: also time the teacher's FP32 file in OpenVINO, interleaved with the rest (latency
    rows only); ``None`` does so when OpenVINO is installed, ``True`` requires it. Returns the JSON."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    roles = [r for r in ROLES if r in manifest["models"]]
    if not roles:
        raise UserError(f"'{export_dir}' lists no models in its manifest")
    _check_files(export_dir, [manifest["models"][r]["file"] for r in roles])
    native_info = _native_info(export_dir, manifest, roles)
    ov_info = _openvino_info(export_dir, manifest, roles, openvino)
    threads = list(dict.fromkeys(threads or [1, os.cpu_count() or 1]))
    batches = list(dict.fromkeys(batches))
    _check_settings(batches, threads, repeats, burst)
    c, h, w = manifest["input"]["shape"][1:]
    rng = np.random.default_rng(seed)
    mach = machine()
    log.info("bench %s on %s (%s cores), load %s", export_dir, mach["cpu"], mach["cores"], mach.get("load_average"))
    fused = {role: _fusion(export_dir / manifest["models"][role]["file"]) for role in roles}
    results = _time_settings(
        export_dir,
        manifest,
        roles,
        threads,
        batches,
        (c, h, w),
        rng,
        native_info,
        ov_info,
        repeats=repeats,
        warmup=warmup,
        budget_s=budget_s,
        burst=burst,
        progress=progress,
    )
    report = _report(export_dir, manifest, mach, warmup, repeats, budget_s, burst, results, fused, native_info, ov_info)
    if accuracy:
        report["accuracy"] = onnx_accuracy(export_dir, manifest, data_root, roles, progress=progress)
    _write_report(export_dir, report)
    return report


def _time_settings(
    export_dir: Path,
    manifest: Dict[str, Any],
    roles: List[str],
    threads: List[int],
    batches: List[int],
    chw: Tuple[int, int, int],
    rng: np.random.Generator,
    native_info: Dict[str, Any],
    ov_info: Dict[str, Any],
    repeats: Optional[int],
    warmup: int,
    budget_s: float,
    burst: int,
    progress: bool,
) -> List[Dict[str, Any]]:
    """One :func:`_setting_row` per (threads, batch), the models timed interleaved on random inputs."""
    c, h, w = chw
    results: List[Dict[str, Any]] = []
    bar = tqdm(total=len(threads) * len(batches), desc="bench", unit="setting", leave=False, disable=not progress)
    for t in threads:
        sessions = {
            role: _session(export_dir / manifest["models"][role]["file"], threads=int(t), spin=False) for role in roles
        }
        for b in batches:
            bar.set_postfix_str(f"batch {b}, {t} thread(s)")
            x = rng.standard_normal((int(b), c, h, w)).astype(np.float32)
            timed = dict(sessions)
            if ov_info:
                ov_sess = openvino_rt.openvino_session(export_dir / ov_info["file"], x.shape, int(t))
                ov_info.setdefault("compiled", {})[f"{t} threads"] = ov_sess.properties()
                timed[OPENVINO_ROLE] = ov_sess
            times = time_interleaved(timed, x, repeats, warmup, budget_s, burst=burst)
            row = _setting_row(times, int(b), int(t), burst, native_info)
            results.append(row)
            bar.update(1)
            latencies = ", ".join(f"{role} {s['p50_ms']:.2f} ms" for role, s in row["models"].items())
            log.info("batch %d, %d threads: %s", b, t, latencies)
    bar.close()
    return results


def _report(
    export_dir: Path,
    manifest: Dict[str, Any],
    mach: Dict[str, Any],
    warmup: int,
    repeats: Optional[int],
    budget_s: float,
    burst: int,
    results: List[Dict[str, Any]],
    fused: Dict[str, Any],
    native_info: Dict[str, Any],
    ov_info: Dict[str, Any],
) -> Dict[str, Any]:
    """bench.json's body but the accuracy: the export, the machine (load average now as its end),
    method, rows, fusion, and the native library and OpenVINO where they ran."""
    report: Dict[str, Any] = {
        "export": str(export_dir),
        "run": manifest.get("run"),
        "stage": manifest.get("stage"),
        "input": manifest["input"],
        "machine": {**mach, "load_average_end": machine().get("load_average")},
        "method": {
            "interleaved": True,
            "warmup_rounds": warmup,
            "repeats": repeats,
            "budget_s": budget_s,
            "burst": burst,
            "graph_optimization": "ORT_ENABLE_ALL",
            "execution_mode": "sequential",
            "inter_op_threads": 1,
            "intra_op_spinning": False,
        },
        "latency": results,
        "fusion": fused,
    }
    if native_info:
        report["native"] = native_info
    if ov_info:
        report["openvino"] = ov_info
    return report


def _native_info(export_dir: Path, manifest: Dict[str, Any], roles: List[str]) -> Dict[str, Any]:
    """The native library and its instruction-throughput floor; drops the native row from ``roles``
    (with a note) when the library cannot load here."""
    if "student_native" not in roles:
        return {}
    try:
        lib = native.library_path()
        info = native.info(lib)
        family = {"avx512_vpopcntdq": "avx512", "avx2": "avx2"}.get(info.get("isa", ""))
        peak = native.peak_ns_per_step_isa(lib, family) if family else None  # the kernels this session runs
        if peak is not None:
            steps = native.vector_steps(onnx.load(str(export_dir / manifest["models"]["student_native"]["file"])))
            # the minimum of several runs: on a shared machine single readings vary by 2x
            peak = min([peak] + [native.peak_ns_per_step_isa(lib, family) for _ in range(5)])
            info.update(vector_steps_per_image=steps, peak_ns_per_step=peak, floor_ms_per_image=steps * peak * 1e-6)
        return info
    except native.NativeUnavailable as e:  # the other rows are still worth measuring
        roles.remove("student_native")
        log.warning("native row skipped: %s", e)
        return {"skipped": str(e)}


def _openvino_info(
    export_dir: Path, manifest: Dict[str, Any], roles: List[str], openvino: Optional[bool]
) -> Dict[str, Any]:
    """What the OpenVINO row runs (empty: no row); ``openvino=True`` without it is a one-line error."""
    want = openvino_rt.available() if openvino is None else bool(openvino)
    if want and "teacher" not in roles:
        if openvino:
            raise UserError(f"--openvino: '{export_dir}' has no teacher file to run in OpenVINO")
        return {}
    if not want:
        return {}
    if not openvino_rt.available():
        raise UserError("--openvino: OpenVINO is not installed; pip install 'bnn-distill[peers]'")
    file = manifest["models"]["teacher"]["file"]
    return {"version": openvino_rt.version(), "file": file, "config": dict(openvino_rt.CONFIG)}


def _check_settings(batches: List[int], threads: List[int], repeats: Optional[int], burst: int) -> None:
    for name, vals in (("--batch", batches), ("--threads", threads)):
        if any(int(v) < 1 for v in vals):
            raise UserError(f"{name}: {vals} must all be >= 1")
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats: {repeats} must be >= 1")
    if burst < 1:
        raise UserError(f"--burst: {burst} must be >= 1")


def _fusion(path: Path) -> Dict[str, Any]:
    """The node counts of onnxruntime's optimized graph, and which ops it fused."""
    counts = optimized_op_counts(path)
    return {
        "op_counts": counts,
        "MatMulIntegerToFloat": fused_integer_matmuls(counts),
        "fused_ops": {k: v for k, v in counts.items() if ":" in k},
    }


def _setting_row(
    times: Dict[str, List[float]], batch: int, threads: int, burst: int, native_info: Dict[str, Any]
) -> Dict[str, Any]:
    """One (batch, threads) row: warm and cold percentiles per model, ratios to the onnxruntime
    teacher, and the native model's fraction of its floor."""
    row: Dict[str, Any] = {"batch": batch, "threads": threads, "models": {}}
    for role, ms in times.items():
        warm, cold = split_burst(ms, burst)
        row["models"][role] = {**_percentiles(warm), "cold_p50_ms": _percentiles(cold)["p50_ms"]}
    models = row["models"]
    if "teacher" in models:
        base, cold_base = models["teacher"]["p50_ms"], models["teacher"]["cold_p50_ms"]
        for s in models.values():
            s["speedup_vs_teacher"] = base / s["p50_ms"]
            s["cold_speedup_vs_teacher"] = cold_base / s["cold_p50_ms"]
    if "student_native" in models and native_info.get("floor_ms_per_image"):
        nat = models["student_native"]
        nat["floor_ms"] = native_info["floor_ms_per_image"] * batch / threads
        nat["fraction_of_floor"] = nat["floor_ms"] / nat["p50_ms"]
    return row


def _write_report(export_dir: Path, report: Dict[str, Any]) -> None:
    """bench.json, bench.md and (with matplotlib) bench.png, each atomically; never an old plot."""
    from .plots import PlotsUnavailable

    try:
        png = plot_png(report)
    except PlotsUnavailable as e:  # the numbers are all in bench.json / bench.md
        log.warning("no %s: %s", BENCH_PNG, e)
        report["plot"] = f"skipped: {e}"
        png = None
    (export_dir / BENCH_PNG).unlink(missing_ok=True)  # never an old plot beside new numbers
    atomic_write_bytes(export_dir / BENCH_JSON, (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(export_dir / BENCH_MD, markdown(report).encode())
    if png is not None:
        atomic_write_bytes(export_dir / BENCH_PNG, png)
