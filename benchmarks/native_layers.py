"""Per-layer cost of the native binary conv against its instruction-throughput floor, one op at a time.

For each distinct BinaryConv2d of the CIFAR ResNet-18 student at 32x32 (Bi-Real blocks: float input,
clip activation, a float residual added; the stride-2 convs pool the block's input as the shortcut),
builds a one-node model with random +-1 weights and times it on 1 thread with the calling thread's
CPU clock (robust on a shared machine). The library's phase timers (``BNN_DISTILL_NATIVE_PHASES=1``)
split each call into packing (signs of the float input, and the pooled shortcut) and the conv
(popcounts and epilogue). The floor is the kernel's register tile on L1-resident data
(``native.peak_ns_per_step_isa``) times the layer's steps.

    python benchmarks/native_layers.py --isa avx2 --out benchmarks/results/native_layers_avx2

``--forms float signs`` times each layer in both forms the exported network uses, interleaved:
``float`` (``BinaryConv2d``: packs its float input's signs) and ``signs`` (``BinaryConv2dFromBits``
reading the packed signs the previous node wrote, and writing its own output's signs, output 1).

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bnn_distill import native
from bnn_distill.bench import machine

# (name, H, Cin, Cout, stride, count in the network)
LAYERS = [
    ("layer1 (32x32, 64->64)", 32, 64, 64, 1, 4),
    ("layer2.0.conv1 (32->16, 64->128, s2)", 32, 64, 128, 2, 1),
    ("layer2 (16x16, 128->128)", 16, 128, 128, 1, 3),
    ("layer3.0.conv1 (16->8, 128->256, s2)", 16, 128, 256, 2, 1),
    ("layer3 (8x8, 256->256)", 8, 256, 256, 1, 3),
    ("layer4.0.conv1 (8->4, 256->512, s2)", 8, 256, 512, 2, 1),
    ("layer4 (4x4, 512->512)", 4, 512, 512, 1, 3),
]


def op_model(h, c, n, s, form="float"):
    """One node of a layer shape; ``form="signs"``: packed signs in (x's, as ``xb``) and out."""
    rng = np.random.default_rng(h * 1000 + c + n + s)
    q = np.where(rng.random((n, c, 3, 3)) < 0.5, -1.0, 1.0)
    pooled = s != 1
    inits = [
        numpy_helper.from_array(native.pack_weights(q), "w"),
        numpy_helper.from_array(native.border_corrections(q, 1), "corr"),
        numpy_helper.from_array(rng.uniform(0.5, 1, n).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.uniform(-1, 1, n).astype(np.float32), "shift"),
    ]
    signs = form == "signs"
    node = helper.make_node(
        native.OP_FROM_BITS if signs else native.OP,
        ["xb" if signs else "x", "w", "corr", "scale", "shift", "x" if pooled else "r"],
        ["y", "ys"] if signs else ["y"],
        domain=native.DOMAIN,
        in_h=h,
        in_w=h,
        in_c=c,
        out_c=n,
        kernel=3,
        stride=s,
        pad=1,
        act=1,
        act_min=-1.0,
        act_max=1.0,
        residual=int(pooled),
    )
    gin = []
    if signs:
        gin.append(helper.make_tensor_value_info("xb", TensorProto.UINT64, [1, h * h, (c + 63) // 64]))
    if pooled or not signs:
        gin.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h * h, c]))
    if not pooled:
        gin.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    gout = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if signs:
        gout.append(helper.make_tensor_value_info("ys", TensorProto.UINT64, None))
    g = helper.make_graph([node], "op", gin, gout, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    m.ir_version = 8
    return m


def packed_signs(x: np.ndarray) -> np.ndarray:
    """(B, P, C) floats -> (B, P, ceil(C/64)) uint64: bit c % 64 of word c // 64 set where x < 0."""
    b, p, c = x.shape
    neg = np.zeros((b, p, (c + 63) // 64 * 64), bool)
    neg[..., :c] = x < 0
    return np.packbits(neg, axis=-1, bitorder="little").view("<u8")


def run_layer(lib, h, c, n, s, reps, form="float"):
    """(median us, min us, phase dict) on 1 thread, CPU clock of the calling thread."""
    ho = (h - 1) // s + 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, h * h, c)).astype(np.float32)
    feeds = {"xb": packed_signs(x)} if form == "signs" else {}
    if form == "float" or s != 1:
        feeds["x"] = x
    if s == 1:
        feeds["r"] = rng.standard_normal((1, ho * ho, n)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.register_custom_ops_library(lib)
    with tempfile.TemporaryFile(mode="w+") as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        os.environ["BNN_DISTILL_NATIVE_PHASES"] = "1"
        try:
            sess = ort.InferenceSession(
                op_model(h, c, n, s, form).SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            ts = []
            for i in range(reps + 10):
                t0 = time.thread_time()
                sess.run(None, feeds)
                if i >= 10:
                    ts.append(time.thread_time() - t0)
            del sess
        finally:
            os.environ.pop("BNN_DISTILL_NATIVE_PHASES", None)
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read()
    m = re.search(r"prep_us min ([0-9.]+) mean ([0-9.]+) conv_us min ([0-9.]+) mean ([0-9.]+)", text)
    phases = dict(zip(("prep_min", "prep_mean", "conv_min", "conv_mean"), map(float, m.groups()))) if m else {}
    return float(np.median(ts)) * 1e6, float(min(ts)) * 1e6, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--isa", choices=("auto", "avx512", "avx2", "portable"), default="auto")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--forms", nargs="+", choices=("float", "signs"), default=["float"], help="node forms (see above)")
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the forms per layer (minimum kept)")
    ap.add_argument("--out", default="benchmarks/results/native_layers")
    args = ap.parse_args()
    if args.isa != "auto":
        os.environ["BNN_DISTILL_NATIVE_ISA"] = args.isa
    lib = str(native.library_path())
    best = native.info(Path(lib))["isa"]
    kind = args.isa if args.isa in ("avx2", "avx512") else {"avx512_vpopcntdq": "avx512", "avx2": "avx2"}.get(best)
    peak = min(
        (p for p in (native.peak_ns_per_step_isa(lib, kind, 4_000_000) if kind else None for _ in range(7)) if p),
        default=0.0,
    )
    rows, totals = [], {f: {"steps": 0, "floor": 0.0, "min": 0.0, "prep": 0.0, "conv": 0.0} for f in args.forms}
    for name, h, c, n, s, count in LAYERS:
        ho = (h - 1) // s + 1
        steps = ho * ho * ((n + 7) // 8) * 9 * ((c + 63) // 64)
        floor = steps * peak / 1e3
        runs = {f: [] for f in args.forms}
        for _ in range(args.repeats):
            for f in args.forms:
                runs[f].append(run_layer(lib, h, c, n, s, args.reps, f))
        for f in args.forms:
            med = min(r[0] for r in runs[f])
            mn = min(r[1] for r in runs[f])
            ph = {k: min(r[2].get(k, 0.0) for r in runs[f]) for k in runs[f][0][2]}
            rows.append(
                dict(layer=name, form=f, count=count, steps=steps, median_us=med, min_us=mn, floor_us=floor, **ph)
            )
            tot = totals[f]
            for k, v in (
                ("steps", steps),
                ("floor", floor),
                ("min", mn),
                ("prep", ph.get("prep_min", 0.0)),
                ("conv", ph.get("conv_min", 0.0)),
            ):
                tot[k] += v * count
    m = machine()
    lines = [
        f"# Native conv per layer ({kind or best} kernels)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}; kernels {kind or best}"
        f"{' (forced with BNN_DISTILL_NATIVE_ISA)' if args.isa != 'auto' else ''}. One BinaryConv2d node per "
        f"layer shape of the CIFAR ResNet-18 student (32x32, batch 1, 1 thread), random weights; CPU time of "
        f"the calling thread over {args.reps} runs (min and median; the min includes ~15-25 us of "
        "onnxruntime/Python call overhead). Phases from the library's timers (min per call): prep = sign "
        "packing (+ the pooled shortcut on stride-2 convs), conv = popcounts + epilogue. Floor = steps x "
        f"{peak:.3f} ns (the register tile on L1-resident data, the minimum of 7 runs).",
        "",
        "| layer | form | x in net | steps | floor us | prep us | conv us | conv % of floor | op min us "
        "| op median us |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        conv = r.get("conv_min", 0.0)
        lines.append(
            f"| {r['layer']} | {r['form']} | {r['count']} | {r['steps']:,} | {r['floor_us']:.1f} | "
            f"{r.get('prep_min', 0):.1f} | {conv:.1f} | {100 * r['floor_us'] / conv if conv else 0:.0f}% | "
            f"{r['min_us']:.1f} | {r['median_us']:.1f} |"
        )
    lines.append("")
    for f, tot in totals.items():
        lines.append(
            f"Network (16 convs), form {f}: {tot['steps']:,} steps, floor {tot['floor'] / 1e3:.3f} ms; prep "
            f"{tot['prep'] / 1e3:.3f} ms + conv {tot['conv'] / 1e3:.3f} ms = "
            f"{(tot['prep'] + tot['conv']) / 1e3:.3f} ms ({100 * tot['floor'] / (tot['prep'] + tot['conv']):.0f}% "
            f"of the floor; conv alone {100 * tot['floor'] / tot['conv']:.0f}%)."
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(dict(machine=m, kernels=kind or best, peak_ns_per_step=peak, layers=rows, totals=totals), indent=2)
        + "\n"
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
