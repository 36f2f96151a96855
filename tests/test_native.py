"""The native custom-op library: bit packing, border corrections, the XNOR-popcount conv against
the float convolution of +-1 tensors on every kernel family, whole networks against PyTorch,
the export and bench commands with ``--runtime native``, and the build's error messages."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe_dict
from onnx import TensorProto, helper, numpy_helper
from test_export import _randomize

from bnn_distill import native
from bnn_distill.cli import main
from bnn_distill.export import check_parity, lower, optimized_op_counts, ort_session, parity_inputs
from bnn_distill.models import create_model
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe


@pytest.fixture(scope="session")
def native_lib():
    """The built library; skipped (or failed, with BNN_DISTILL_REQUIRE_NATIVE=1 as CI sets) when it cannot be built."""
    try:
        return str(native.library_path())
    except native.NativeUnavailable as e:
        if os.environ.get("BNN_DISTILL_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native library required but unavailable: {e}")
        pytest.skip(f"native library unavailable: {e}")


def _isas():
    best = native.info(native.library_path())["isa"]
    order = ["portable", "avx2", "avx512"]
    have = {"portable": True, "avx2": best in ("avx2", "avx512_vpopcntdq"), "avx512": best == "avx512_vpopcntdq"}
    return [i for i in order if have[i]]


# ---------------------------------------------------------------- constant inputs, by definition


def test_pack_weights_layout_by_definition():
    rng = np.random.default_rng(0)
    q = np.where(rng.random((11, 70, 3, 3)) < 0.5, -1, 1)
    bits = native.pack_weights(q)
    assert bits.dtype == np.uint64 and bits.shape == (2, 9, 2, 8)
    for oc in range(16):
        for tap in range(9):
            for c in range(128):
                bit = (int(bits[oc // 8, tap, c // 64, oc % 8]) >> (c % 64)) & 1
                want = 1 if oc < 11 and c < 70 and q[oc, c, tap // 3, tap % 3] < 0 else 0
                assert bit == want, (oc, tap, c)


def test_border_corrections_hand_computed():
    # one output channel, one input channel; weights (rows) [+1 -1 +1], [-1 -1 +1], [+1 +1 -1]
    q = np.array([[[[1, -1, 1], [-1, -1, 1], [1, 1, -1]]]])
    corr = native.border_corrections(q, pad=1)
    assert corr.shape == (16, 8) and (corr[:, 1:] == 0).all()
    c = corr[:, 0]
    assert c[0] == 0  # interior
    assert c[4 * 1 + 0] == 1 - 1 + 1  # top row outside
    assert c[4 * 2 + 0] == 1 + 1 - 1  # bottom row
    assert c[1] == 1 - 1 + 1  # left column
    assert c[2] == 1 + 1 - 1  # right column
    assert c[4 * 1 + 1] == (1 - 1 + 1) + (-1 + 1)  # top-left corner: top row + rest of left column
    assert c[4 * 3 + 3] == int(q.sum()) - q[0, 0, 1, 1]  # 1x1 map: every tap but the centre outside
    assert (native.border_corrections(np.ones((3, 5, 1, 1)), pad=0) == 0).all()


# ---------------------------------------------------------------- the op against the float conv


def _op_model(shape, q, stride, scale, shift, residual=False, act=None, pooled=False, signs_out=False, bits_in=False):
    """One float-output node; ``signs_out``: with output 1 (``ys``, y's packed signs); ``bits_in``: the
    ``...FromBits`` op, ``x`` being packed signs."""
    b, c, h, w = shape
    n, _, k, _ = q.shape
    pad = k // 2
    inits = [
        numpy_helper.from_array(native.pack_weights(q), "w"),
        numpy_helper.from_array(native.border_corrections(q, pad), "corr"),
        numpy_helper.from_array(scale.astype(np.float32), "scale"),
        numpy_helper.from_array(shift.astype(np.float32), "shift"),
    ]
    ins = ["x", "w", "corr", "scale", "shift"] + (["r"] if residual else [])
    lo, hi = act if act else (0.0, 0.0)
    node = helper.make_node(
        native.OP_FROM_BITS if bits_in else native.OP,
        ins,
        ["y", "ys"] if signs_out else ["y"],
        domain=native.DOMAIN,
        in_h=h,
        in_w=w,
        in_c=c,
        out_c=n,
        kernel=k,
        stride=stride,
        pad=pad,
        act=int(act is not None),
        act_min=lo,
        act_max=hi,
        residual=int(pooled),
    )
    x_info = (TensorProto.UINT64, ["b", h * w, (c + 63) // 64]) if bits_in else (TensorProto.FLOAT, ["b", h * w, c])
    graph_in = [helper.make_tensor_value_info("x", *x_info)]
    if residual:
        graph_in.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph_out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if signs_out:
        graph_out.append(helper.make_tensor_value_info("ys", TensorProto.UINT64, None))
    g = helper.make_graph([node], "op", graph_in, graph_out, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    m.ir_version = 8
    return m


def _bits_models(shape, q, stride, thresholds):
    """A ``BinaryConv2dToBits`` model (float in, thresholds) and a ``BinaryConv2dFromBits`` model (bits in)."""
    b, c, h, w = shape
    n, _, k, _ = q.shape
    pad = k // 2
    common = dict(domain=native.DOMAIN, in_h=h, in_w=w, in_c=c, out_c=n, kernel=k, stride=stride, pad=pad)
    w_init = [
        numpy_helper.from_array(native.pack_weights(q), "w"),
        numpy_helper.from_array(native.border_corrections(q, pad), "corr"),
    ]
    models = []
    for op, extra, x_type, y_type in (
        (native.OP_TO_BITS, [numpy_helper.from_array(thresholds, "t")], TensorProto.FLOAT, TensorProto.UINT64),
        (
            native.OP_FROM_BITS,
            [
                numpy_helper.from_array(np.ones(n, np.float32), "scale"),
                numpy_helper.from_array(np.zeros(n, np.float32), "shift"),
            ],
            TensorProto.UINT64,
            TensorProto.FLOAT,
        ),
    ):
        ins = ["x", "w", "corr"] + [t.name for t in extra]
        attrs = common if op == native.OP_TO_BITS else dict(common, act=0, act_min=0.0, act_max=0.0)
        node = helper.make_node(op, ins, ["y"], **attrs)
        g = helper.make_graph(
            [node],
            "op",
            [helper.make_tensor_value_info("x", x_type, None)],
            [helper.make_tensor_value_info("y", y_type, None)],
            w_init + extra,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
        m.ir_version = 8
        models.append(m)
    return models


SHAPES = [  # (batch, Cin, H, W, Cout, kernel, stride)
    (1, 64, 8, 8, 64, 3, 1),
    (2, 3, 5, 7, 13, 3, 2),
    (1, 65, 1, 1, 9, 3, 1),  # 1x1 map: every border tap outside
    (3, 130, 6, 5, 33, 3, 2),
    (1, 1, 4, 4, 1, 1, 1),
    (2, 70, 7, 7, 20, 1, 2),
    (1, 200, 3, 9, 40, 3, 1),
    (2, 128, 9, 10, 72, 3, 1),  # rows longer than a register tile, odd remainder
    (2, 40, 7, 9, 72, 3, 2),  # a stage transition over an odd map: pooled shortcut with a partial window
    (1, 64, 8, 8, 128, 3, 2),
]


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_equals_float_conv_of_signs(native_lib, monkeypatch, isa, shape):
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    monkeypatch.setenv("BNN_DISTILL_NATIVE_ISA", isa)
    b, c, h, w, n, k, s = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = 0.0  # exact zeros: sign(0) = +1
    x[0, :, 0, 0] = -0.0  # negative zero is +1 too (x >= 0)
    q = np.where(rng.random((n, c, k, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    signs = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
    dot = F.conv2d(torch.from_numpy(signs), torch.from_numpy(q), stride=s, padding=k // 2).numpy()  # exact integers
    ho, wo = dot.shape[2:]
    flat = x.transpose(0, 2, 3, 1).reshape(b, h * w, c)
    sess = ort_session(_op_model(x.shape, q, s, np.ones(n), np.zeros(n)), threads=2, native_lib=native_lib)
    got = sess.run(None, {"x": flat})[0].reshape(b, ho, wo, n).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, dot)

    # the epilogue: clip(dot * scale + shift + residual), float32, in that order
    scale = rng.uniform(-2, 2, n).astype(np.float32)
    shift = rng.uniform(-3, 3, n).astype(np.float32)
    r = rng.standard_normal((b, ho * wo, n)).astype(np.float32)
    sess = ort_session(
        _op_model(x.shape, q, s, scale, shift, residual=True, act=(-1.0, 1.0)), threads=1, native_lib=native_lib
    )
    got = sess.run(None, {"x": flat, "r": r})[0]
    d = dot.transpose(0, 2, 3, 1).reshape(b, ho * wo, n)
    want = np.clip(d * scale + shift + r, np.float32(-1), np.float32(1))
    np.testing.assert_array_equal(got, want)

    # output 1: the output's signs packed as the next conv takes them (bit 1 where y < 0), by definition
    sess = ort_session(
        _op_model(x.shape, q, s, scale, shift, residual=True, act=(-1.0, 1.0), signs_out=True),
        threads=2,
        native_lib=native_lib,
    )
    got, ys = sess.run(None, {"x": flat, "r": r})
    np.testing.assert_array_equal(got, want)
    assert ys.dtype == np.uint64 and ys.shape == (b, ho * wo, (n + 63) // 64)
    np.testing.assert_array_equal(native.unpack_signs(ys, n), np.where(want < 0, -1.0, 1.0))
    assert (native.unpack_signs(ys, 64 * ys.shape[-1])[..., n:] == 1).all()  # padding bits stay 0

    # packed signs out through integer thresholds (bit 1 = -1 where dot < T), and packed signs in
    thresholds = rng.integers(-6, 7, n).astype(np.int32)
    to_bits, from_bits = _bits_models(x.shape, q, s, thresholds)
    words = ort_session(to_bits, threads=2, native_lib=native_lib).run(None, {"x": flat})[0]
    assert words.dtype == np.uint64 and words.shape == (b, ho * wo, (n + 63) // 64)
    d = dot.transpose(0, 2, 3, 1).reshape(b, ho * wo, n)
    np.testing.assert_array_equal(native.unpack_signs(words, n), np.where(d < thresholds, -1.0, 1.0))
    assert (native.unpack_signs(words, 64 * words.shape[-1])[..., n:] == 1).all()  # padding bits stay 0 (+1)
    x_words = native.pack_weights(signs.transpose(0, 2, 3, 1).reshape(b * h * w, c, 1, 1))  # (.., 1, CW, 8)
    x_words = x_words.transpose(0, 3, 1, 2).reshape(-1, (c + 63) // 64)[: b * h * w].reshape(b, h * w, -1)
    got = ort_session(from_bits, threads=2, native_lib=native_lib).run(None, {"x": np.ascontiguousarray(x_words)})[0]
    np.testing.assert_array_equal(got, d)

    # the parameter-free shortcut inside the op: the input itself, s x s average-pooled (ceil mode,
    # in-image divisor) and zero-padded to the output's channels, as PyTorch's PadShortcut computes it
    if c <= n:
        from bnn_distill.models import PadShortcut

        sc = PadShortcut(c, n, s)(torch.from_numpy(x)).numpy()  # (b, n, ho, wo)
        sess = ort_session(
            _op_model(x.shape, q, s, scale, shift, residual=True, act=(-1.0, 1.0), pooled=True),
            threads=2,
            native_lib=native_lib,
        )
        got = sess.run(None, {"x": flat, "r": flat})[0]
        want = np.clip(
            d * scale + shift + sc.transpose(0, 2, 3, 1).reshape(b, ho * wo, n), np.float32(-1), np.float32(1)
        )
        np.testing.assert_array_equal(got, want)
        # the same with the input's packed signs as X: the shortcut is pooled from R, the float input
        sess = ort_session(
            _op_model(x.shape, q, s, scale, shift, residual=True, act=(-1.0, 1.0), pooled=True, bits_in=True),
            threads=2,
            native_lib=native_lib,
        )
        got = sess.run(None, {"x": np.ascontiguousarray(x_words), "r": flat})[0]
        np.testing.assert_array_equal(got, want)


def test_every_kernel_family_gives_the_same_network_output(native_lib, monkeypatch):
    model = _randomize(
        create_model("cifar_resnet18", 10, quant="W1A1", width_mult=0.25, weight_scale="learned", recu=True)
    )
    proto, _ = lower(model, (3, 20, 20), native=True)
    x = parity_inputs((3, 20, 20), n=3).numpy()
    outs = {}
    for isa in _isas():
        monkeypatch.setenv("BNN_DISTILL_NATIVE_ISA", isa)
        outs[isa] = ort_session(proto, threads=2, native_lib=native_lib).run(None, {"input": x})[0]
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        np.testing.assert_array_equal(out, first, err_msg=isa)


def test_a_bad_isa_override_is_refused(native_lib, monkeypatch):
    q = np.ones((8, 8, 3, 3), dtype=np.float32)
    monkeypatch.setenv("BNN_DISTILL_NATIVE_ISA", "sse9")
    with pytest.raises(Exception, match="BNN_DISTILL_NATIVE_ISA='sse9' is not one of"):
        ort_session(_op_model((1, 8, 4, 4), q, 1, np.ones(8), np.zeros(8)), native_lib=native_lib)


def test_op_rejects_a_mismatched_input(native_lib):
    q = np.ones((8, 8, 3, 3), dtype=np.float32)
    m = _op_model((1, 8, 4, 4), q, 1, np.ones(8), np.zeros(8))
    m.graph.input[0].type.tensor_type.ClearField("shape")  # so the op itself sees the wrong shape
    sess = ort_session(m, native_lib=native_lib)
    with pytest.raises(Exception, match=r"input must be \(batch, 16, 8\)"):
        sess.run(None, {"x": np.zeros((1, 15, 8), np.float32)})


# ---------------------------------------------------------------- whole networks against PyTorch


@pytest.mark.parametrize(
    "kw,ops",
    [
        # Bi-Real blocks, hardtanh fused, avg-pool + zero-pad shortcuts; every conv after the first reads
        # the packed signs its predecessor wrote (output 1)
        (dict(), {native.OP: 1, native.OP_FROM_BITS: 17}),
        # He et al. blocks: conv1's BatchNorm, activation and the next sign fold into integer thresholds
        (dict(bireal=False, shortcut="conv", act="relu"), {native.OP_TO_BITS: 9, native.OP_FROM_BITS: 9}),
        (dict(bireal=False, shortcut="conv", act="hardtanh"), {native.OP_TO_BITS: 9, native.OP_FROM_BITS: 9}),
        (dict(act="prelu", head_norm=False), {native.OP: 18}),  # an activation the op does not fuse: it runs after
    ],
)
def test_native_parity_random_weights(native_lib, kw, ops):
    # width 0.3: 5, 10 and 19 channels; 28 -> 14 -> 7 (odd) maps
    model = _randomize(
        create_model(
            "cifar_resnet20", 10, in_chans=1, quant="W1A1", width_mult=0.3, weight_scale="learned", recu=True, **kw
        )
    )
    proto, probes = lower(model, (1, 28, 28), native=True)
    onnx.checker.check_model(proto, full_check=True)
    got = {}
    for n in proto.graph.node:
        if n.domain == native.DOMAIN:
            got[n.op_type] = got.get(n.op_type, 0) + 1
    assert got == ops
    read = {i for n in proto.graph.node for i in n.input}
    for n in proto.graph.node:  # packed signs out only where a node reads them
        if n.domain == native.DOMAIN and len(n.output) > 1:
            assert n.output[1] in read, n.name
    last = [n for n in proto.graph.node if n.domain == native.DOMAIN][-1]
    assert len(last.output) == 1  # the last conv feeds the head: no signs
    assert not any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    res = check_parity("student_native", model, proto, probes, parity_inputs((1, 28, 28), 16))
    assert res.passed and res.top1_agree == res.n, res.to_dict()
    assert "com.microsoft:MatMulIntegerToFloat" not in optimized_op_counts(proto)


def test_prelu_with_a_negative_slope_folds_to_constant_signs(native_lib):
    model = _randomize(
        create_model(
            "cifar_resnet20", 10, in_chans=1, quant="W1A1", width_mult=0.3, bireal=False, shortcut="conv", act="prelu"
        )
    )
    with torch.no_grad():
        model.layer1[0].act1.weight.fill_(-0.5)  # prelu(y) >= 0 for every y: the next signs are all +1
    proto, probes = lower(model, (1, 28, 28), native=True)
    kinds = [n.op_type for n in proto.graph.node if n.domain == native.DOMAIN]
    assert kinds.count(native.OP_TO_BITS) == 9
    res = check_parity("student_native", model, proto, probes, parity_inputs((1, 28, 28), 8))
    assert res.passed, res.to_dict()


def test_sign_thresholds_by_definition():
    rng = np.random.default_rng(0)
    n_bits, oc = 45, 12
    scale = np.abs(rng.standard_normal(oc)).astype(np.float32)
    scale[0] = 0.0  # a dead channel: the sign of its shift
    shift = (rng.standard_normal(oc) * 5).astype(np.float32)
    shift[1] = np.float32(3.0) * scale[1]  # y = 0 exactly at dot = -3: sign(0) = +1, so T = -3
    act = torch.nn.Hardtanh()
    t = native.sign_thresholds(scale, shift, act, n_bits)
    assert t.dtype == np.int32 and t.shape == (oc,) and t[1] == -3
    for c in range(oc):
        for dot in range(-n_bits, n_bits + 1):
            y = np.float32(np.float32(dot) * scale[c]) + shift[c]
            assert (dot < t[c]) == bool(np.clip(y, -1, 1) < 0), (c, dot)
    assert (native.sign_thresholds(scale, shift, torch.nn.PReLU(oc, init=-0.5), n_bits) == -n_bits).all()  # never < 0
    assert native.sign_thresholds(scale, shift, lambda y: 0.5 - y.abs(), n_bits) is None  # not monotone: no threshold


def test_unpack_signs_inverts_packing():
    rng = np.random.default_rng(1)
    q = np.where(rng.random((1, 70, 1, 1)) < 0.5, -1.0, 1.0)
    words = native.pack_weights(q)[0, 0, :, 0]  # one output channel's 70 signs in 2 words
    np.testing.assert_array_equal(native.unpack_signs(words, 70), q.reshape(70))


def test_native_parity_four_stages_mean_abs_scale(native_lib):
    # 28 -> 14 -> 7 -> 4: a ceil-mode avg-pool shortcut over an odd map; 7 channels (not a multiple of 8)
    model = _randomize(create_model("cifar_resnet18", 10, quant="W1A1", width_mult=0.11, weight_scale="mean_abs"))
    proto, probes = lower(model, (3, 28, 28), native=True)
    res = check_parity("student_native", model, proto, probes, parity_inputs((3, 28, 28), 16))
    assert res.passed, res.to_dict()


def test_native_lowering_names_a_conv_it_cannot_run(native_lib):
    from bnn_distill.export import ExportError

    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25))
    model.layer2[1].conv2.padding = (2, 2)
    with pytest.raises(ExportError, match=r"cannot lower layer 'layer2.1.conv2'.*--runtime standard"):
        lower(model, (3, 16, 16), native=True)


@pytest.mark.slow
def test_native_parity_cifar_resnet18_full_width(native_lib):
    model = _randomize(create_model("cifar_resnet18", 10, quant="W1A1", weight_scale="learned", recu=True))
    proto, probes = lower(model, (3, 32, 32), native=True)
    res = check_parity("student_native", model, proto, probes, parity_inputs((3, 32, 32), 32))
    assert res.passed, res.to_dict()


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def native_export(native_lib, tmp_path_factory):
    d = tiny_recipe_dict(tmp_path_factory.mktemp("runs"), name="tiny_native")
    recipe = recipe_from_dict(d)
    run_recipe(recipe, progress=False)
    out = tmp_path_factory.mktemp("export") / "native"
    assert main(["export", str(recipe.run_dir), "--out", str(out), "--runtime", "native"]) == 0
    return out


def test_cli_export_runtime_native(native_export, capsys):
    out = native_export
    m = json.loads((out / "manifest.json").read_text())
    assert m["runtime"] == "native" and m["native"]["isa"] in ("avx512_vpopcntdq", "avx2", "portable")
    assert "student_binary_native.onnx" in m["files"] and (out / "student_binary_native.onnx").is_file()
    parity = json.loads((out / "parity.json").read_text())
    r = parity["models"]["student_native"]
    assert r["passed"] and r["top1_agree"] == r["n"] == 32
    assert r["onnx_top1"] == parity["models"]["student_binary"]["onnx_top1"]
    c = parity["native_vs_standard"]
    assert c["n"] == 32 and c["top1_agree"] == 32 and c["max_abs_diff"] < 1e-4
    proto = onnx.load(str(out / "student_binary_native.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bnn_distill.runtime"] == "native" and meta["bnn_distill.quant"] == "W1A1"
    assert {o.domain for o in proto.opset_import} == {"", native.DOMAIN}


def test_standard_export_over_a_native_one_removes_the_native_file(native_export, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(native_export, out)
    run_dir = json.loads((out / "manifest.json").read_text())["run_dir"]
    assert main(["export", run_dir, "--out", str(out), "--limit-test", "8"]) == 0
    assert not (out / "student_binary_native.onnx").exists()
    assert "student_native" not in json.loads((out / "manifest.json").read_text())["models"]


def test_cli_bench_adds_the_native_row(native_export, capsys):
    assert main(["bench", str(native_export), "--batch", "1", "2", "--threads", "1", "--repeats", "3"]) == 0
    text = capsys.readouterr().out
    assert "binary student, native" in text and "ai.bnn_distill:BinaryConv2d" in text
    rep = json.loads((native_export / "bench.json").read_text())
    assert all("student_native" in row["models"] for row in rep["latency"])
    assert rep["accuracy"]["student_native"]["top1"] == rep["accuracy"]["student_binary"]["top1"]
    assert rep["native"]["isa"]
    if rep["native"]["isa"] in ("avx512_vpopcntdq", "avx2"):  # both measure their floor (the portable kernels do not)
        steps = native.vector_steps(onnx.load(str(native_export / "student_binary_native.onnx")))
        assert rep["native"]["vector_steps_per_image"] == steps > 0 and rep["native"]["peak_ns_per_step"] > 0
        assert 0 < rep["latency"][0]["models"]["student_native"]["fraction_of_floor"]
        assert "of the floor" in text


def test_vector_steps_count_by_hand():
    # cifar_resnet18 at 32x32: layer1 4 convs of 32x32 x 64/8 x 9 x 1 word; each later stage one
    # stride-2 conv of half that and three convs of 32x32*64*9/8 steps... all 73,728 or 36,864
    model = create_model("cifar_resnet18", 10, quant="W1A1", weight_scale="learned", recu=True).eval()
    proto, _ = lower(model, (3, 32, 32), native=True)
    full, half = 32 * 32 * 8 * 9 * 1, 16 * 16 * 16 * 9 * 1
    assert full == 73_728 and half == 36_864
    assert native.vector_steps(proto) == 4 * full + 3 * (half + 3 * full) == 1_069_056


def test_bench_without_the_library_skips_only_the_native_row(native_export, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(native_export, out)
    monkeypatch.setenv("BNN_DISTILL_NATIVE_LIB", str(tmp_path / "missing.so"))
    assert main(["bench", str(out), "--batch", "1", "--threads", "1", "--repeats", "2", "--no-accuracy"]) == 0
    rep = json.loads((out / "bench.json").read_text())
    assert "student_native" not in rep["latency"][0]["models"] and "teacher" in rep["latency"][0]["models"]
    assert "BNN_DISTILL_NATIVE_LIB" in rep["native"]["skipped"]
    assert "Native row skipped" in (out / "bench.md").read_text()


# ---------------------------------------------------------------- building: clear errors


def test_build_native_with_headers_that_are_not_there(tmp_path, capsys):
    assert main(["build-native", "--headers", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no onnxruntime_cxx_api.h in" in err[0] and "Traceback" not in err[0]


def test_build_native_with_a_missing_compiler(native_lib, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CXX", "/no/such/compiler")
    assert main(["build-native", "--out", str(tmp_path / "lib.so"), "--force"]) == 2
    assert "CXX='/no/such/compiler' is not an executable compiler" in capsys.readouterr().err


def test_export_native_without_the_library_is_one_clear_error(tmp_path, monkeypatch, capsys):
    d = tiny_recipe_dict(tmp_path / "runs", name="no_lib")
    d["stages"] = d["stages"][:1] + [dict(d["stages"][2], init_from="teacher")]
    recipe = recipe_from_dict(d)
    run_recipe(recipe, progress=False)
    monkeypatch.setenv("BNN_DISTILL_NATIVE_LIB", str(tmp_path / "missing.so"))
    out = tmp_path / "exp"
    assert main(["export", str(recipe.run_dir), "--out", str(out), "--runtime", "native"]) == 2
    err = capsys.readouterr().err
    assert "BNN_DISTILL_NATIVE_LIB" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_build_native_cli_reports_the_library(native_lib, capsys):
    assert main(["build-native"]) == 0
    out = capsys.readouterr().out
    assert "built " in out and "register_custom_ops_library" in out


@pytest.mark.slow
def test_fetch_headers_from_debian(tmp_path):
    hdr = native.fetch_headers(tmp_path / "headers")
    assert (hdr / "onnxruntime_cxx_api.h").is_file() and native._api_version(hdr) >= 17
    assert "libonnxruntime-dev" in (hdr / "SOURCE").read_text()


def test_export_readme_native_snippet_runs(native_export, native_lib):
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "export" / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    first, snippet = blocks[0], blocks[1]
    assert "register_custom_ops_library" in snippet and "student_binary_native.onnx" in snippet
    scope: dict = {}
    exec(
        compile(
            first.replace('export_dir = "export/quick_fmnist"', f'export_dir = "{native_export}"'), str(readme), "exec"
        ),
        scope,
    )  # noqa: S102 - our own documentation
    snippet = re.sub(r'register_custom_ops_library\("[^"]*"\)', f'register_custom_ops_library("{native_lib}")', snippet)
    exec(compile(snippet, str(readme), "exec"), scope)  # noqa: S102
    x = scope["x"]
    got = scope["sess"].run(["logits"], {"input": x})[0]
    want = ort_session(native_export / "student_binary.onnx").run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
