"""Where the native binary student's time goes: onnxruntime's per-node profile, per layer.

Runs a model of an export folder (default: the native student) with onnxruntime's profiler for
each (batch, threads) setting and sums the kernel time of every node over the runs. Writes
``<out>.md`` (per-node table per setting, with each binary conv's work in inner-loop steps of 512
binary MACs and its fraction of the measured instruction-throughput floor of the kernels that ran:
AVX-512 or AVX2, ``BNN_DISTILL_NATIVE_ISA`` respected) and ``<out>.json``.

    python benchmarks/onnx_resnet18.py --out export/cifar_resnet18_random --force
    python benchmarks/native_profile.py export/cifar_resnet18_random --batch 1 32 --threads 1 2 \\
        --out benchmarks/results/native_profile

Profiling adds a little time per node; compare the total with the bench's p50 for the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from bnn_distill import native
from bnn_distill.bench import load_manifest, machine


def node_steps(model) -> dict:
    """Inner-loop steps (8 output channels x 64 input bits) per image of each BinaryConv2d node, by name."""
    out = {}
    for n in model.graph.node:
        if n.domain == native.DOMAIN:
            single = onnx.ModelProto()
            single.graph.node.append(n)
            out[n.name] = native.vector_steps(single)
    return out


def profile(path: Path, batch: int, threads: int, runs: int, lib: str, warmup: int = 5):
    """Mean kernel time (us) per node over ``runs`` profiled runs after ``warmup`` runs; and node -> op."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    x = np.random.default_rng(0).standard_normal([batch] + [d.dim_value for d in dims[1:]]).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            sess.run(None, {"input": x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_node = defaultdict(float)
    op_of = {}
    seen = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        seen[name] += 1
        if seen[name] <= warmup:
            continue
        per_node[name] += e["dur"]
        op_of[name] = e["args"].get("op_name", "")
    return {k: v / runs for k, v in per_node.items()}, op_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("--role", default="student_native", help="model of the export to profile")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/native_profile")
    args = ap.parse_args()

    export_dir = Path(args.export_dir)
    manifest = load_manifest(export_dir)
    path = export_dir / manifest["models"][args.role]["file"]
    lib = str(native.library_path())
    steps = node_steps(onnx.load(str(path)))
    isa = native.info(Path(lib))["isa"]
    forced = os.environ.get("BNN_DISTILL_NATIVE_ISA", "")
    kind = forced if forced in ("avx2", "avx512") else {"avx512_vpopcntdq": "avx512", "avx2": "avx2"}.get(isa)
    peaks = [native.peak_ns_per_step_isa(lib, kind) if kind else None for _ in range(5)]
    peak = min((p for p in peaks if p), default=0.0)  # the wall-clock minimum: a busy machine inflates some
    report = {
        "export": str(export_dir),
        "model": path.name,
        "machine": machine(),
        "peak_ns_per_step": peak,
        "settings": [],
    }
    lines = [
        f"# Per-node profile: {path.name} of {export_dir}",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, onnxruntime "
        f"{report['machine']['onnxruntime']}; kernels {kind or isa}; step (512 binary MACs) "
        f"{peak:.3f} ns (measured floor of the {kind or isa} register tile). "
        f"Mean kernel time per run over {args.runs} profiled runs "
        "(onnxruntime profiler, intra-op threads not spinning).",
        "",
    ]
    for t in args.threads:
        for b in args.batch:
            per_node, op_of = profile(path, b, t, args.runs, lib)
            total = sum(per_node.values())
            rows = sorted(per_node.items(), key=lambda kv: -kv[1])
            by_op = defaultdict(float)
            for k, v in per_node.items():
                by_op[op_of[k]] += v
            report["settings"].append(
                {"batch": b, "threads": t, "total_us": total, "nodes": per_node, "ops": op_of, "by_op": dict(by_op)}
            )
            lines += [
                f"## batch {b}, {t} thread(s): {total / 1e3:.3f} ms in nodes",
                "",
                "| op type | us | share |",
                "|---|---:|---:|",
            ]
            for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {op} | {v:.1f} | {100 * v / total:.1f}% |")
            lines += [
                "",
                "| node | op | us | share | steps | floor us | % of floor |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for name, v in rows:
                st = steps.get(name)
                floor = st * b * peak / 1e3 / t if st and peak else None
                lines.append(
                    f"| {name} | {op_of[name]} | {v:.1f} | {100 * v / total:.1f}% | "
                    f"{'' if st is None else f'{st * b:,}'} | {'' if floor is None else f'{floor:.1f}'} | "
                    f"{'' if floor is None else f'{100 * floor / v:.0f}%'} |"
                )
            lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
