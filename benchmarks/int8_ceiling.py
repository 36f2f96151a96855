"""How fast can the standard (default-domain ONNX) binary graph be on this CPU? The int8 product's ceiling.

The standard graph runs every W1A1 conv as onnxruntime's ``MatMulIntegerToFloat`` (uint8 sign codes x
int8 +-1 weights, fused from ``DequantizeLinear`` + ``MatMul``). This script measures two things:

1. **In the network, per layer**: onnxruntime's profile of the FP32 teacher and of the standard binary
   student of one export, side by side. Each teacher conv (fused with its BatchNorm) against the integer
   product of the same layer; then the end-to-end bound if every other node of the student cost nothing.
2. **The exact forms a standard graph can take**, per layer shape (one op each, interleaved rounds):
   the shipped form (uint8 codes x int8 weights), uint8 x uint8, int8 x int8, ``ConvInteger``, and an
   FP32 ``MatMul`` / ``Conv`` of the same +-1 values. Each result is checked against the exact product.

    python benchmarks/onnx_resnet18.py --out export/cifar_resnet18_random --budget 1 --force
    python benchmarks/int8_ceiling.py export/cifar_resnet18_random --out benchmarks/results/int8_ceiling_avx2

Pause anything else that runs on the machine first. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from native_profile import profile
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from bnn_distill import native
from bnn_distill.bench import load_manifest, machine
from bnn_distill.onnxrt import ort_session

#: (name, channels, height) of the CIFAR ResNet-18 stages: 3x3 convs, stride 1, padding 1
SHAPES = [("layer1", 64, 32), ("layer2", 128, 16), ("layer3", 256, 8), ("layer4", 512, 4)]


def _model(nodes, inputs, inits, out_elem=TP.FLOAT):
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", out_elem, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])


def _matmul_form(m: int, k: int, n: int, w: np.ndarray, a_type: str, w_type: str):
    """DequantizeLinear(codes) x DequantizeLinear(+-1 weights) -> MatMul (onnxruntime fuses it)."""
    inits = [nh.from_array(np.array(1.0, np.float32), "a_scale"), nh.from_array(np.ones(n, np.float32), "w_scale")]
    if a_type == "u8":  # +1 -> 2, -1 -> 0, zero point 1
        inits.append(nh.from_array(np.array(1, np.uint8), "a_zp"))
        dq_a = oh.make_node("DequantizeLinear", ["a", "a_scale", "a_zp"], ["ad"])
    else:
        dq_a = oh.make_node("DequantizeLinear", ["a", "a_scale"], ["ad"])
    if w_type == "s8":
        inits.append(nh.from_array(w.astype(np.int8), "w"))
        dq_w = oh.make_node("DequantizeLinear", ["w", "w_scale"], ["wd"], axis=1)
    else:
        inits += [nh.from_array((w + 1).astype(np.uint8), "w"), nh.from_array(np.ones(n, np.uint8), "w_zp")]
        dq_w = oh.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=1)
    a_elem = TP.UINT8 if a_type == "u8" else TP.INT8
    inp = [oh.make_tensor_value_info("a", a_elem, [1, m, k])]
    return _model([dq_a, dq_w, oh.make_node("MatMul", ["ad", "wd"], ["y"])], inp, inits)


def _conv_form(c: int, hw: int, w: np.ndarray, integer: bool):
    """ConvInteger on uint8 codes (zero point 1, so padding is 0), or an FP32 Conv, NCHW."""
    elem = TP.UINT8 if integer else TP.FLOAT
    inp = [oh.make_tensor_value_info("x", elem, [1, c, hw, hw])]
    if integer:
        inits = [nh.from_array(w.astype(np.int8), "w"), nh.from_array(np.array(1, np.uint8), "x_zp")]
        node = oh.make_node("ConvInteger", ["x", "w", "x_zp"], ["y"], pads=[1, 1, 1, 1])
    else:
        inits = [nh.from_array(w.astype(np.float32), "w")]
        node = oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    return _model([node], inp, inits, TP.INT32 if integer else TP.FLOAT)


def forms(rounds: int, threads: int) -> list:
    """Per layer shape: p50 us of each exact form, interleaved, and whether it matched the exact product."""
    out = []
    rng = np.random.default_rng(0)
    for name, c, hw in SHAPES:
        m, k, n = hw * hw, 9 * c, c
        w_conv = rng.choice([-1, 1], size=(n, c, 3, 3))
        w_mat = w_conv.transpose(2, 3, 1, 0).reshape(k, n)  # rows in (kh, kw, c) order, as the lowering's
        signs = rng.choice([-1, 1], size=(1, c, hw, hw))
        cols = np.zeros((1, m, k), np.int64)  # im2col with zero padding, (kh, kw, c) order
        padded = np.pad(signs[0], ((0, 0), (1, 1), (1, 1)))
        for i in range(3):
            for j in range(3):
                patch = padded[:, i : i + hw, j : j + hw].reshape(c, m).T
                cols[0, :, (i * 3 + j) * c : (i * 3 + j + 1) * c] = patch
        exact = (cols[0] @ w_mat).astype(np.float64)
        codes = (cols + 1).astype(np.uint8)  # padding: code 1 = the zero point = 0
        variants = {
            "int8 matmul, u8 codes x s8 weights (shipped)": (_matmul_form(m, k, n, w_mat, "u8", "s8"), {"a": codes}),
            "int8 matmul, u8 x u8": (_matmul_form(m, k, n, w_mat, "u8", "u8"), {"a": codes}),
            "int8 matmul, s8 x s8": (_matmul_form(m, k, n, w_mat, "s8", "s8"), {"a": cols.astype(np.int8)}),
            "ConvInteger, u8 x s8": (_conv_form(c, hw, w_conv, True), {"x": (signs + 1).astype(np.uint8)}),
            "FP32 MatMul of the same columns": (_matmul_form_fp(m, k, n, w_mat), {"a": cols.astype(np.float32)}),
            "FP32 Conv": (_conv_form(c, hw, w_conv, False), {"x": signs.astype(np.float32)}),
        }
        sessions, ok = {}, {}
        for key, (model, feed) in variants.items():
            s = ort_session(model, threads=threads, spin=False)
            y = np.asarray(s.run(None, feed)[0], np.float64)
            y = y.reshape(n, m).T if y.ndim == 4 else y.reshape(m, n)
            ok[key] = bool(np.array_equal(y, exact))
            sessions[key] = (s, feed)
        times = {key: [] for key in variants}
        keys = list(variants)
        for r in range(rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                s, feed = sessions[key]
                t0 = time.perf_counter()
                s.run(None, feed)
                times[key].append(time.perf_counter() - t0)
        out.append(
            {
                "layer": name,
                "m_k_n": [m, k, n],
                "p50_us": {key: 1e6 * float(np.median(v)) for key, v in times.items()},
                "exact": ok,
            }
        )
    return out


def _matmul_form_fp(m: int, k: int, n: int, w: np.ndarray):
    inp = [oh.make_tensor_value_info("a", TP.FLOAT, [1, m, k])]
    return _model([oh.make_node("MatMul", ["a", "w"], ["y"])], inp, [nh.from_array(w.astype(np.float32), "w")])


def _layer_of(node: str, op: str) -> str | None:
    """'layer1.0.conv1' (student product) or 'layer1.0.bn1_nchwc' (teacher conv fused with its BN) -> 'layer1.0.1'."""
    if op == "MatMulIntegerToFloat":
        hit = re.fullmatch(r"(layer\d+\.\d+)\.conv(\d)", node)
    elif op == "Conv":
        hit = re.fullmatch(r"(layer\d+\.\d+)\.bn(\d)(_nchwc)?", node)
    else:
        return None
    return f"{hit.group(1)}.conv{hit.group(2)}" if hit else None


def in_network(export_dir: Path, runs: int, repeats: int) -> dict:
    """Per-layer kernel time of the teacher's conv and the student's product (profiles alternated, means)."""
    manifest = load_manifest(export_dir)
    lib = str(native.library_path())
    per = {"teacher": [], "student_binary": []}
    for _ in range(repeats):
        for role in per:
            nodes, ops = profile(export_dir / manifest["models"][role]["file"], 1, 1, runs, lib)
            per[role].append((nodes, ops))
    result = {}
    for role, profiles in per.items():
        ops = profiles[0][1]
        mean = {k: float(np.mean([p[0].get(k, 0.0) for p in profiles])) for k in profiles[0][0]}
        layers = {}
        for k, v in mean.items():
            layer = _layer_of(k, ops[k])
            if layer:
                layers[layer] = v
        result[role] = {"total_us": sum(mean.values()), "layers_us": layers}
    return result


def report(net: dict, table: list, info: dict) -> str:
    t, s = net["teacher"], net["student_binary"]
    lines = [
        "# The standard binary graph's ceiling: onnxruntime's int8 product against the FP32 conv",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, flags "
        + ", ".join(f for f, on in info["flags"].items() if on)
        + f"; onnxruntime {info['onnxruntime']}; batch 1, 1 thread. Written by `python benchmarks/int8_ceiling.py`.",
        "",
        "## In the network (onnxruntime profile, mean kernel time per run)",
        "",
        "| layer | teacher conv + BN (FP32) us | student int8 product us | ratio |",
        "|---|---:|---:|---:|",
    ]
    for layer in sorted(s["layers_us"]):
        a, b = t["layers_us"].get(layer, float("nan")), s["layers_us"][layer]
        lines.append(f"| {layer} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    prod = sum(s["layers_us"].values())
    convs = sum(t["layers_us"].get(k, 0.0) for k in s["layers_us"])
    lines += [
        "",
        f"- The 16 binary convs: teacher {convs / 1e3:.2f} ms, student products {prod / 1e3:.2f} ms: "
        f"**{convs / prod:.2f}x**.",
        f"- Whole graphs in nodes: teacher {t['total_us'] / 1e3:.2f} ms, student {s['total_us'] / 1e3:.2f} ms "
        f"({t['total_us'] / s['total_us']:.2f}x); the student's nodes other than the products cost "
        f"{(s['total_us'] - prod) / 1e3:.2f} ms.",
        f"- If every other node of the student were free: at most **{t['total_us'] / prod:.2f}x** the teacher.",
        "",
        "## The exact forms, one op per layer shape (p50 us, interleaved)",
        "",
    ]
    keys = list(table[0]["p50_us"])
    lines += ["| form | " + " | ".join(f"{r['layer']} (M,K,N={tuple(r['m_k_n'])})" for r in table) + " |"]
    lines += ["|---|" + "---:|" * len(table)]
    for key in keys:
        cells = [f"{r['p50_us'][key]:.0f}" + ("" if r["exact"][key] else " (not exact)") for r in table]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir", type=Path, help="an export folder with teacher and student_binary models")
    ap.add_argument("--runs", type=int, default=40, help="profiled runs per model and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="alternations of the two profiles")
    ap.add_argument("--rounds", type=int, default=60, help="interleaved rounds per layer shape of the forms")
    ap.add_argument("--out", default="benchmarks/results/int8_ceiling")
    args = ap.parse_args()
    info = machine()
    net = in_network(args.export_dir, args.runs, args.repeats)
    table = forms(args.rounds, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "in_network": net, "forms": table}, indent=1))
    text = report(net, table, info)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
