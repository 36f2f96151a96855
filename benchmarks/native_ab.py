"""Side-by-side latency of onnxruntime sessions: native kernel variants, libraries and the FP32 teacher.

Each ``--variant`` is ``NAME=MODEL.onnx`` optionally followed by ``,lib=PATH`` (a custom-op library to
register; default: none) and any number of ``,env:KEY=VALUE`` (environment set while that session is
created, e.g. ``env:BNN_DISTILL_NATIVE_ISA=avx2``; the kernels read it at session creation). Rounds are
interleaved: every round runs each variant ``--burst`` times back to back, in a rotating order, and
the first call of each burst is dropped (warm numbers, as ``bnn-distill bench`` reports them).

    python benchmarks/native_ab.py --threads 1 2 --rounds 200 \\
        --variant teacher=export/r18/teacher_fp32.onnx \\
        --variant old=export/r18/student_binary_native.onnx,lib=/tmp/old/libold.so \\
        --variant new=export/r18/student_binary_native.onnx,lib=$(python -c \\
            'from bnn_distill import native; print(native.library_path())')

Prints p50 / p90 per (variant, threads) and every variant's p50 ratio to the first one; ``--json``
writes the numbers. Pause anything else that runs on the machine first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def parse_variant(text: str) -> dict:
    name, rest = text.split("=", 1)
    parts = rest.split(",")
    v = {"name": name, "model": parts[0], "lib": None, "env": {}}
    for p in parts[1:]:
        if p.startswith("lib="):
            v["lib"] = p[4:]
        elif p.startswith("env:"):
            k, val = p[4:].split("=", 1)
            v["env"][k] = val
        else:
            raise SystemExit(f"variant part '{p}' is neither lib=PATH nor env:KEY=VALUE")
    return v


def session(v: dict, threads: int, spin: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    if v["lib"]:
        so.register_custom_ops_library(v["lib"])
    saved = {k: os.environ.get(k) for k in v["env"]}
    os.environ.update(v["env"])
    try:
        return ort.InferenceSession(v["model"], so, providers=["CPUExecutionProvider"])
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--burst", type=int, default=3)
    ap.add_argument("--spin", action="store_true", help="let onnxruntime's intra-op threads spin (default: not)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the calling thread's CPU clock (1 thread only: robust on a busy machine)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    variants = [parse_variant(t) for t in args.variant]
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "batch": args.batch,
        "rounds": args.rounds,
        "spin": args.spin,
        "results": [],
    }
    print(
        f"CPU: {report['cpu']}, {report['cores']} cores; batch {args.batch}, {args.rounds} rounds x burst "
        f"{args.burst}, ORT spinning {'on' if args.spin else 'off'}"
    )
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.cpu_time and args.threads != [1]:
        raise SystemExit("--cpu-time measures the calling thread only: use it with --threads 1")
    report["clock"] = "thread_cpu" if args.cpu_time else "wall"
    for t in args.threads:
        sessions, inputs = [], []
        for v in variants:
            s = session(v, t, args.spin)
            i0 = s.get_inputs()[0]
            shape = [args.batch] + [d if isinstance(d, int) else 1 for d in i0.shape[1:]]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            sessions.append(s)
            inputs.append({i0.name: x})
        times = [[] for _ in variants]
        for r in range(args.rounds + 3):
            order = list(range(len(variants)))
            k = r % len(order)
            order = order[k:] + order[:k]
            for i in order:
                for b in range(args.burst):
                    t0 = clock()
                    sessions[i].run(None, inputs[i])
                    dt = clock() - t0
                    if r >= 3 and b > 0:
                        times[i].append(dt * 1e3)
        base = None
        for v, ts in zip(variants, times):
            p50, p90 = float(np.percentile(ts, 50)), float(np.percentile(ts, 90))
            base = base or p50
            report["results"].append(
                {
                    "variant": v["name"],
                    "threads": t,
                    "p50_ms": p50,
                    "p90_ms": p90,
                    "ratio_to_first": base / p50,
                    "env": v["env"],
                    "lib": v["lib"],
                    "model": v["model"],
                }
            )
            print(f"threads {t}  {v['name']:<24} p50 {p50:8.3f} ms  p90 {p90:8.3f} ms  first/this {base / p50:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
