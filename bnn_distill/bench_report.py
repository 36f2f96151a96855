"""The report of ``bnn-distill bench``: bench.md (tables) and bench.png (grouped bars), from the
JSON :func:`bnn_distill.bench.run_bench` returns; the models' names and labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .checkpoint import atomic_write_bytes

ROLES = ("teacher", "student_fp32", "student_binary", "student_native")
#: The teacher's FP32 file again, run by OpenVINO (with the [peers] extra): the latency rows only.
OPENVINO_ROLE = "teacher_openvino"
LABELS = {
    "teacher": "teacher FP32",
    "student_fp32": "student FP32",
    "student_binary": "binary student",
    "student_native": "binary student, native",
    OPENVINO_ROLE: "teacher FP32, OpenVINO",
}


def markdown(r: Dict[str, Any]) -> str:
    lines = _md_latency(r) + _md_fusion(r) + _md_native(r) + _md_openvino(r) + _md_accuracy(r)
    return "\n".join(lines) + "\n"


def _md_latency(r: Dict[str, Any]) -> List[str]:
    """The title, the machine and method, and the latency table."""
    m = r["machine"]
    flags = ", ".join(f for f, on in m["flags"].items() if on) or "none of " + ", ".join(m["flags"])
    lines = [
        f"# onnxruntime benchmark: {r.get('run') or r['export']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; flags: {flags}; onnxruntime {m['onnxruntime']}; "
        f"load average {m.get('load_average')} at start, {m.get('load_average_end')} at end.",
        f"Input {r['input']['shape']} ({r['input']['layout']}). Interleaved rounds after "
        f"{r['method']['warmup_rounds']} warm-up rounds, each running every model "
        f"{r['method'].get('burst', 1)} times back to back, the models' order rotating from round to round; "
        f"p50/p90 over the calls after the first of each burst (warm: the model's weights still cached, "
        f"as in a process serving one model); 'cold' is the first call of each burst, right after the other "
        f"models ran. {r['method']['graph_optimization']}; intra-op threads do not spin.",
        "",
        "| batch | threads | model | p50 ms | p90 ms | images/s | speed-up vs teacher (p50) | cold p50 ms "
        "| cold speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["latency"]:
        for role, s in row["models"].items():
            sp, csp = s.get("speedup_vs_teacher"), s.get("cold_speedup_vs_teacher")
            cold = s.get("cold_p50_ms")
            lines.append(
                f"| {row['batch']} | {row['threads']} | {LABELS[role]} | {s['p50_ms']:.3f} "
                f"| {s['p90_ms']:.3f} | {1e3 * row['batch'] / s['p50_ms']:.0f} "
                f"| {'' if sp is None else f'{sp:.2f}x'} | "
                f"{'' if cold is None else f'{cold:.3f}'} | {'' if csp is None else f'{csp:.2f}x'} |"
            )
    return lines


def _md_fusion(r: Dict[str, Any]) -> List[str]:
    """The fused nodes of each model's optimized graph."""
    lines = ["", "## Fused nodes in onnxruntime's optimized graph", ""]
    for role, f in r["fusion"].items():
        fused = ", ".join(f"{k} x{v}" for k, v in f["fused_ops"].items()) or "none"
        lines.append(f"- {LABELS[role]}: {fused}")
    b = r["fusion"].get("student_binary")
    if b is not None and not b["MatMulIntegerToFloat"]:
        lines.append("- WARNING: no MatMulIntegerToFloat in the binary student: its convs run in float")
    return lines


def _md_native(r: Dict[str, Any]) -> List[str]:
    """The native library, and the native rows against their instruction-throughput floor."""
    nat = r.get("native")
    if not nat:
        return []
    if "skipped" in nat:
        return ["", f"Native row skipped: {nat['skipped']}"]
    forced = f", forced by BNN_DISTILL_NATIVE_ISA={nat['isa_override']}" if nat.get("isa_override") else ""
    lines = ["", f"Native library: {nat['library']} ({nat['isa']} kernels{forced})."]
    if nat.get("floor_ms_per_image"):
        lines += [
            "",
            f"Instruction-throughput floor of the native convs: {nat['vector_steps_per_image']:,} "
            f"steps (8 output channels x 64 input bits) per image x {nat['peak_ns_per_step']:.3f} ns "
            f"(the {nat.get('isa', '?')} kernel's register tile on L1-resident data, best of 6) = "
            f"{nat['floor_ms_per_image']:.3f} ms per image on one thread.",
            "",
        ]
        for row in r["latency"]:
            s = row["models"].get("student_native", {})
            if "fraction_of_floor" in s:
                lines.append(
                    f"- batch {row['batch']}, {row['threads']} thread(s): p50 {s['p50_ms']:.3f} "
                    f"ms against a floor of {s['floor_ms']:.3f} ms: "
                    f"{100 * s['fraction_of_floor']:.0f}% of the floor"
                )
    return lines


def _md_openvino(r: Dict[str, Any]) -> List[str]:
    """What the OpenVINO row ran, and how it was compiled."""
    ov = r.get("openvino")
    if not ov:
        return []
    comp = "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in ov.get("compiled", {}).items())
    return [
        "",
        f"OpenVINO {ov['version']} ran the teacher's {ov['file']} on the CPU, compiled per batch size "
        f"with a fixed shape ({comp or ov['config']}).",
    ]


def _md_accuracy(r: Dict[str, Any]) -> List[str]:
    """The test accuracy table (onnxruntime and PyTorch at export), or why it was skipped."""
    acc = r.get("accuracy")
    if not acc:
        return []
    lines = ["", "## Test accuracy through onnxruntime", ""]
    if "skipped" in acc:
        lines.append(f"Skipped: {acc['skipped']}.")
        return lines
    lines += [
        f"{acc['images']} test images.",
        "",
        "| model | top-1 % (onnxruntime) | top-1 % (PyTorch, at export) |",
        "|---|---:|---:|",
    ]
    for role in ROLES:
        if role in acc:
            t = acc[role].get("torch_top1")
            lines.append(f"| {LABELS[role]} | {acc[role]['top1']:.2f} | {'' if t is None else f'{t:.2f}'} |")
    return lines


def bench_figure(r: Dict[str, Any]):
    """Grouped bars: p50 latency per (batch, threads), one bar per model, p90 as a whisker; each
    model's speed-up over the teacher written vertically just above its whisker (so labels meet
    neither the whiskers nor each other). Returns ``(fig, ax)``."""
    from .plots import pyplot

    plt = pyplot()
    rows = r["latency"]
    roles = [role for role in ROLES + (OPENVINO_ROLE,) if rows and role in rows[0]["models"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 2), 4.2))
    width = 0.8 / max(1, len(roles))
    xs = np.arange(len(rows))
    top = 0.0
    for k, role in enumerate(roles):
        p50 = np.array([row["models"][role]["p50_ms"] for row in rows])
        p90 = np.array([row["models"][role]["p90_ms"] for row in rows])
        top = max(top, float(p90.max()))
        bars = ax.bar(
            xs + (k - (len(roles) - 1) / 2) * width,
            p50,
            width,
            label=LABELS[role],
            yerr=[np.zeros_like(p50), p90 - p50],
            capsize=3,
        )
        for bar, row, whisker in zip(bars, rows, p90):
            sp = row["models"][role].get("speedup_vs_teacher")
            if sp is not None and role != "teacher":  # the OpenVINO teacher too: its ratio to onnxruntime
                ax.annotate(
                    f"{sp:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, float(whisker)),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                    xytext=(0, 3),
                    textcoords="offset points",
                )
    ax.set_xticks(xs, [f"batch {row['batch']}\n{row['threads']} thr" for row in rows])
    ax.set_yscale("log")
    if top > 0:
        ax.set_ylim(top=top * 4)  # room for the vertical labels above the tallest whisker
    ax.set_ylabel("latency p50 (ms, log), whisker p90")
    ax.set_title(f"onnxruntime {r['machine']['onnxruntime']} on {r['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: clear of bars and labels
    fig.tight_layout()
    return fig, ax


def plot_png(r: Dict[str, Any]) -> bytes:
    """bench.png's bytes; raises :class:`~bnn_distill.plots.PlotsUnavailable` without matplotlib."""
    import io

    from .plots import pyplot

    fig, _ = bench_figure(r)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    pyplot().close(fig)
    return buf.getvalue()


def plot(r: Dict[str, Any], path: Path) -> None:
    """Write :func:`plot_png` to ``path`` atomically."""
    atomic_write_bytes(path, plot_png(r))
