"""ONNX export: exact lowering of binary students, parity with PyTorch, the export command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_recipe_dict

from bnn_distill.cli import main
from bnn_distill.export import (
    ExportError,
    ExportInfo,
    avgpool_indices,
    binary_weight_matrix,
    check_parity,
    export_models,
    im2col_indices,
    lower,
    optimized_op_counts,
    ort_session,
    parity_inputs,
    probe_outputs,
)
from bnn_distill.models import create_model
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe

README = Path(__file__).resolve().parents[1] / "export" / "README.md"


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine terms away from identity, so signs of every kind occur."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
            if hasattr(m, "alpha") and isinstance(m.alpha, nn.Parameter):
                m.alpha.mul_(1 + 0.2 * torch.randn(m.alpha.shape, generator=g))
                m.alpha.view(-1)[0] *= -1  # a negative learned scale: the sign moves into the weights
    return model.eval()


def _parity(model, shape, n=16, role="student_binary"):
    proto, probes = lower(model, shape)
    onnx.checker.check_model(proto, full_check=True)
    res = check_parity(role, model, proto, probes, parity_inputs(shape, n))
    assert res.passed, res.to_dict()
    assert res.top1_agree == res.n
    return proto, probes, res


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize("h,w,k,s,p", [(7, 7, 3, 1, 1), (7, 6, 3, 2, 1), (5, 8, 1, 2, 0), (4, 4, 3, 1, 0)])
def test_im2col_indices_match_unfold(h, w, k, s, p):
    x = torch.randn(2, 3, h, w)
    idx = im2col_indices(h, w, k, k, s, s, p, p)  # (M, k*k)
    flat = torch.cat([x.flatten(2), torch.zeros(2, 3, 1)], 2)  # (B, C, HW + 1): the zero row
    cols = flat[:, :, torch.from_numpy(idx.astype(np.int64))]  # (B, C, M, k*k)
    ref = F.unfold(x, k, padding=p, stride=s).view(2, 3, k * k, -1).permute(0, 1, 3, 2)
    assert torch.equal(cols, ref)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 7), (5, 4), (1, 1)])
def test_avgpool_indices_match_pytorch_ceil_mode(h, w):
    x = torch.randn(1, 3, h, w)
    idx, count, ho, wo = avgpool_indices(h, w, 2)
    flat = torch.cat([x.flatten(2), torch.zeros(1, 3, 1)], 2)
    acc = sum(flat[:, :, torch.from_numpy(idx[t].astype(np.int64))] for t in range(idx.shape[0]))
    got = (acc / torch.from_numpy(count[:, 0])).view(1, 3, ho, wo)
    ref = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
    assert torch.allclose(got, ref, atol=1e-6)


def test_binary_weights_come_from_the_quantiser_exactly():
    model = _randomize(
        create_model("cifar_resnet20", 10, quant="W1A1", weight_scale="learned", recu=True, width_mult=0.25)
    )
    conv = model.layer2[0].conv1
    wq, scale = binary_weight_matrix(conv)
    assert wq.dtype == np.int8 and set(np.unique(wq)) <= {-1, 1} and (scale >= 0).all()
    n, c, kh, kw = conv.weight.shape
    rebuilt = torch.from_numpy(wq.astype(np.float32) * scale).view(kh, kw, c, n).permute(3, 2, 0, 1)
    assert torch.equal(rebuilt, conv.quant_weight().value.detach())


# ---------------------------------------------------------------- parity of lowered models


@pytest.mark.parametrize("quant", ["W1A1", "W32A1", "FP"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # Bi-Real blocks, hardtanh, avg-pool + zero-pad shortcuts
        dict(bireal=False, shortcut="conv", act="relu"),  # He et al. blocks, 1x1 conv shortcuts, exact zeros from ReLU
        dict(act="prelu", head_norm=False),
    ],
)
def test_parity_random_weights(quant, kw):
    # width 0.3: 5, 10 and 19 channels; 28x28 input: 28, 14, 7 (odd) after the stride-2 stages
    model = _randomize(
        create_model(
            "cifar_resnet20", 10, in_chans=1, quant=quant, width_mult=0.3, weight_scale="learned", recu=True, **kw
        )
    )
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [5, 10]
    proto, _, res = _parity(model, (1, 28, 28), role="student_binary" if quant != "FP" else "teacher")
    ops = {n.op_type for n in proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert [o.domain for o in proto.opset_import] == [""] and proto.opset_import[0].version >= 17
    if quant == "W1A1":
        assert {"DequantizeLinear", "MatMul", "Gather"} <= ops and "Conv" in ops  # only the FP stem is a Conv
        counts = optimized_op_counts(proto)
        n_bin = sum(1 for n in proto.graph.node if n.op_type == "MatMul")
        fp_1x1 = 2 if kw.get("shortcut") == "conv" else 0  # FP downsample convs stay float MatMuls
        assert counts.get("com.microsoft:MatMulIntegerToFloat") == n_bin - fp_1x1 == 18
    else:
        assert "DequantizeLinear" not in ops


def test_parity_four_stages_odd_sizes_mean_abs_scale():
    # 28 -> 14 -> 7 -> 4: a ceil-mode avg-pool shortcut over an odd map; 7-channel first stage
    model = _randomize(create_model("cifar_resnet18", 10, quant="W1A1", width_mult=0.11, weight_scale="mean_abs"))
    assert model.layer1[0].conv1.out_channels == 7
    _parity(model, (3, 28, 28))


def test_parity_imagenet_stem_maxpool():
    model = _randomize(create_model("resnet18", 7, quant="W1A1", width_mult=0.125, weight_scale="none"))
    _parity(model, (3, 40, 40), n=4)


def test_sign_of_zero_is_plus_one_in_the_graph():
    """A block input that is exactly 0 everywhere must binarise to +1, as in training."""
    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25, weight_scale="learned"))
    with torch.no_grad():
        model.bn1.weight.zero_()
        model.bn1.bias.zero_()  # stem output == 0 exactly, for every input
    proto, probes, _ = _parity(model, (3, 16, 16), n=4)
    conv = next(p for p in probes if p.in_path == "layer1.0.conv1")  # lowered with its BatchNorm
    x = torch.randn(2, 3, 16, 16)
    outs = probe_outputs(proto, [conv.inputs[0], conv.output], x)
    assert not outs[conv.inputs[0].name].any()  # the conv's input is exactly zero ...
    got = outs[conv.output.name].reshape(2, 16, 16, -1)[:, 8, 8]  # an interior position: every tap is 0
    blk = model.layer1[0]
    with torch.no_grad():

        def bn_conv(v):
            return blk.bn1(F.conv2d(torch.full((1, 4, 16, 16), v), blk.conv1.quant_weight().value, padding=1))[
                0, :, 8, 8
            ]

        plus, minus = bn_conv(1.0).numpy(), bn_conv(-1.0).numpy()
    assert np.allclose(got, plus, rtol=1e-5, atol=1e-6)  # ... and every tap counts as +1
    assert not np.allclose(got, minus, rtol=1e-3)


def test_dynamic_batch():
    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25))
    proto, _ = lower(model, (3, 16, 16))
    sess = ort_session(proto)
    x = torch.randn(5, 3, 16, 16)
    full = sess.run(["logits"], {"input": x.numpy()})[0]
    one = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1].numpy()})[0] for i in range(5)])
    with torch.no_grad():
        ref = model(x).numpy()
    assert full.shape == (5, 10) and np.allclose(full, one, atol=1e-5) and np.allclose(full, ref, atol=1e-4)


def test_a_layer_that_cannot_be_lowered_is_named():
    model = create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25)
    model.layer2[1].act1 = nn.GELU()
    with pytest.raises(ExportError) as e:
        lower(model, (3, 16, 16))
    msg = str(e.value)
    assert "layer2.1.act1" in msg and "GELU" in msg and "\n" not in msg
    model = create_model("cifar_resnet20", 10, quant="FP", width_mult=0.25)
    model.layer1[0].conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ExportError, match="layer1.0.conv2.*groups=2"):
        lower(model, (3, 16, 16))


def test_parity_failure_names_the_first_diverging_layer():
    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25))
    proto, probes = lower(model, (3, 16, 16))
    for init in proto.graph.initializer:  # sabotage one BatchNorm shift in the graph
        if init.name == "layer2.0.bn2.shift":
            arr = onnx.numpy_helper.to_array(init) + 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    res = check_parity("student_binary", model, proto, probes, parity_inputs((3, 16, 16), 8))
    assert not res.passed
    assert res.first_divergence["layer"] == "layer2.0.conv2+bn2" and res.first_divergence["check"] == "local"


def test_parity_failure_in_the_residual_wiring_names_the_block():
    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25))
    proto, probes = lower(model, (3, 16, 16))
    add = next(n for n in proto.graph.node if n.name == "layer2.1/add2")
    add.input[1] = add.input[0]  # bn2(conv2(h)) + itself instead of + h
    res = check_parity("student_binary", model, proto, probes, parity_inputs((3, 16, 16), 8))
    assert not res.passed
    assert res.first_divergence["layer"] == "layer2.1" and res.first_divergence["check"] == "local"


# ---------------------------------------------------------------- a trained run, end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny trained run (teacher, W32A1, W1A1) on synthetic data, trained once for this module."""
    d = tiny_recipe_dict(tmp_path_factory.mktemp("runs"))
    recipe = recipe_from_dict(d)
    run_recipe(recipe, progress=False)
    return recipe.run_dir


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    return out


def test_cli_export_writes_everything(tiny_run, tiny_export, capsys):
    out = tiny_export
    names = {"student_binary.onnx", "student_fp32.onnx", "teacher_fp32.onnx", "parity.json", "manifest.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["source"] == "test split" and parity["images"] == 32
    for role in ("student_binary", "student_fp32", "teacher"):
        r = parity["models"][role]
        assert r["passed"] and r["top1_agree"] == r["n"] == 32 and r["max_abs_diff"] >= 0
    assert parity["fused_matmul_integer_to_float"] == parity["binary_convs"] == 18
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW"}
    assert m["output"]["name"] == "logits" and m["opset"] >= 17 and m["stage"] == "stage2" and m["quant"] == "W1A1"
    assert len(m["normalization"]["mean"]) == 3 and len(m["classes"]) == 10
    assert set(m["files"]) == names
    model = onnx.load(str(out / "student_binary.onnx"))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["bnn_distill.recipe"] == (tiny_run / "recipe.yaml").read_text()
    assert float(meta["bnn_distill.test_top1"]) == m["models"]["student_binary"]["test_top1"]
    inp = model.graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param == "batch" and [d.dim_value for d in inp[1:]] == [3, 32, 32]


def test_cli_export_w32a1_stage(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "s1"), "--stage", "stage1", "--limit-test", "8"]) == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "s1" / "student_binary.onnx")).graph.node}
    assert "Where" in ops and "Conv" in ops and "MatMul" not in ops
    parity = json.loads((tmp_path / "s1" / "parity.json").read_text())
    assert parity["passed"] and parity["images"] == 8 and parity["stage"] == "stage1"


def test_cli_export_refuses_another_runs_folder(tiny_run, tiny_export, tmp_path, capsys):
    import shutil

    out = tmp_path / "exp"
    shutil.copytree(tiny_export, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"], manifest["run"] = "0123456789abcdef", "other"
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "another run ('other'" in err and "--force" in err and "\n" not in err
    (out / "bench.json").write_text("{}")  # a benchmark of the models about to be replaced
    assert main(["export", str(tiny_run), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["run"] == "tiny"
    assert not (out / "bench.json").exists()


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--stage", "teacher"], "not a binary student"),
        (["--stage", "nope"], "no stage named 'nope'"),
    ],
)
def test_cli_export_user_errors(tiny_run, tmp_path, capsys, args, expect):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err


def test_cli_export_of_a_non_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_failed_parity_stops_the_export(tiny_run, tiny_export, tmp_path, monkeypatch):
    """A lowering bug: the error names the layer; the folder keeps nothing but parity.json."""
    import shutil

    import bnn_distill.export.lower_int as ex  # where the integer lowering looks bn_affine up

    real = ex.bn_affine

    def broken(bn):
        a, b = real(bn)
        return (a * 1.5, b) if bn is broken.target else (a, b)

    from bnn_distill.checkpoint import load_checkpoint, load_model_state
    from bnn_distill.train import build_model

    ck = load_checkpoint(tiny_run / "checkpoints" / "stage2" / "last.pt")
    student = build_model(ck["model_spec"])
    load_model_state(student, ck["model"], "test")
    broken.target = student.layer3[1].bn1
    monkeypatch.setattr(ex, "bn_affine", broken)
    out = tmp_path / "bad"
    shutil.copytree(tiny_export, out)  # an earlier export there, to be replaced (--force)
    with pytest.raises(ExportError) as e:
        export_models(
            student, ck["model_spec"], out, ExportInfo(input_shape=(3, 32, 32), run="t", fingerprint="f"), force=True
        )
    assert "first diverging layer 'layer3.1.conv1+bn1'" in str(e.value) and "student_binary" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["parity.json"]
    assert not json.loads((out / "parity.json").read_text())["passed"]


def test_bench_on_a_run_export_measures_accuracy(tiny_export):
    """The bench of a run's export: accuracy through onnxruntime matches what export measured."""
    from bnn_distill.bench import run_bench

    r = run_bench(tiny_export, batches=[1], threads=[1], repeats=1, warmup=1)
    acc = r["accuracy"]
    assert acc["images"] == 32
    for role in ("teacher", "student_fp32", "student_binary"):
        assert acc[role]["top1"] == pytest.approx(acc[role]["export_top1"])
    assert r["fusion"]["student_binary"]["MatMulIntegerToFloat"] == 18


def test_readme_snippet_runs_with_onnxruntime_and_numpy(tiny_export):
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'export_dir = "export/quick_fmnist"' in code
    for name in (
        "student_binary.onnx",
        "student_fp32.onnx",
        "teacher_fp32.onnx",
        "parity.json",
        "manifest.json",
        "bench.json",
        "bench.md",
        "bench.png",
    ):
        assert name in text, name
    code = code.replace('export_dir = "export/quick_fmnist"', f'export_dir = "{tiny_export}"')
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["logits"].shape == (1, 10)
    assert scope["label"] in json.loads((tiny_export / "manifest.json").read_text())["classes"]


@pytest.mark.slow
def test_parity_cifar_resnet18_full_width():
    torch.manual_seed(0)  # random weights can put a pre-activation within rounding of 0 (see parity.json)
    model = _randomize(create_model("cifar_resnet18", 10, quant="W1A1", weight_scale="learned", recu=True))
    proto, _, _ = _parity(model, (3, 32, 32), n=8)
    assert optimized_op_counts(proto).get("com.microsoft:MatMulIntegerToFloat") == 16


def test_interrupted_export_leaves_no_partial_file(tiny_run, tiny_export, tmp_path, monkeypatch):
    """Killed while writing the teacher: no torn file, no temp file, no manifest (so not 'an export')."""
    import shutil

    import bnn_distill.export.write as export_mod  # export_run and the atomic_write_bytes it calls
    from bnn_distill.checkpoint import atomic_write_bytes

    out = tmp_path / "again"
    shutil.copytree(tiny_export, out)  # an earlier complete export of the same run is being redone
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def write_or_die(path, data):
        if Path(path).name == "teacher_fp32.onnx":
            atomic_write_bytes(path.with_name("scratch"), data[: len(data) // 2])  # as far as it got
            raise KeyboardInterrupt
        atomic_write_bytes(path, data)

    monkeypatch.setattr(export_mod, "atomic_write_bytes", write_or_die)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_run(tiny_run, out=str(out))
    names = {p.name for p in out.iterdir()}
    assert "manifest.json" not in names  # the folder no longer claims to be a finished export
    assert not [n for n in names if n.endswith(".tmp")]
    assert (out / "teacher_fp32.onnx").read_bytes() == before["teacher_fp32.onnx"]  # old file, untouched
    for name in names & {"student_binary.onnx", "student_fp32.onnx", "teacher_fp32.onnx"}:
        onnx.checker.check_model(onnx.load(str(out / name)), full_check=True)  # complete, never torn
    assert before.keys() >= names - {"scratch"}


def test_a_top1_change_explained_by_a_near_zero_flip_passes_unless_strict(monkeypatch):
    """On a trained model and 10,000 images, a sign taken of a value within float32 rounding of 0
    can change a near-tied prediction; such images pass (listed) unless strict_top1."""
    import bnn_distill.export.parity as ex  # check_parity calls diagnose there
    from bnn_distill.export import parity_message

    shape = (3, 16, 16)
    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25), seed=0)
    other = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25), seed=7)
    proto, probes = lower(other, shape)  # a graph whose predictions differ from the model's
    x = parity_inputs(shape, 16)
    with torch.no_grad():
        differ = (model(x).argmax(1) != other(x).argmax(1)).nonzero().flatten().tolist()
    assert differ
    flip = {"layer": "layer1.0.conv1", "signs_differing": 1, "value": 3e-8, "rel": 3e-8}
    monkeypatch.setattr(
        ex, "diagnose", lambda m, o, p, imgs, rtol: {"local": None, "flips": [flip] * len(imgs), "drift": None}
    )
    res = check_parity("student_binary", model, proto, probes, x)
    assert res.passed and res.top1_changed_by_flips == differ and res.top1_agree == 16 - len(differ)
    strict = check_parity("student_binary", model, proto, probes, x, strict_top1=True)
    assert not strict.passed and "near-tied prediction" in parity_message(strict)
    # an unexplained difference still fails either way
    monkeypatch.setattr(
        ex,
        "diagnose",
        lambda m, o, p, imgs, rtol: {
            "local": {"layer": "layer1.0", "check": "local", "max_rel_diff": 0.5},
            "flips": [None] * len(imgs),
            "drift": None,
        },
    )
    assert not check_parity("student_binary", model, proto, probes, x).passed


# ---------------------------------------------------------------- a compact standard file


def test_the_standard_file_is_at_most_twice_the_native_one():
    """quick_fmnist's student shape (CIFAR ResNet-20, 1x28x28): packed weights, shared indices, no tiles."""
    model = _randomize(create_model("cifar_resnet20", 10, in_chans=1, quant="W1A1", weight_scale="learned", recu=True))
    std, _ = lower(model, (1, 28, 28))
    nat, _ = lower(model, (1, 28, 28), native=True)  # building the graph needs no library
    assert len(std.SerializeToString()) <= 2 * len(nat.SerializeToString())
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in std.graph.initializer}
    # the binary weights as bits: 9 * Cin * Cout / 8 bytes per conv, by hand for 16/32/64 channels
    bits = sum(a.size for n, a in inits.items() if n.endswith(".weight_int8_bits"))
    assert (
        bits == 6 * 9 * 16 * 16 // 8 + 9 * 16 * 32 // 8 + 5 * 9 * 32 * 32 // 8 + 9 * 32 * 64 // 8 + 5 * 9 * 64 * 64 // 8
    )
    # one index tensor per geometry: 28x28 s1, 28->14 s2, 14x14 s1, 14->7 s2, 7x7 s1; the smallest type
    idx = {n: a for n, a in inits.items() if n.startswith("im2col_index")}
    assert (
        len(idx) == 5 and sum(1 for n in std.graph.node if n.op_type == "Gather" and n.name.endswith("/im2col")) == 18
    )
    for n, a in idx.items():
        assert a.dtype == (np.uint8 if a.max() <= 255 else np.uint16), n
    # per-channel constants are stored per channel (the graph tiles them; onnxruntime folds that)
    assert all(a.ndim <= 1 for n, a in inits.items() if n.endswith((".shift", ".scale")))
    assert optimized_op_counts(std).get("com.microsoft:MatMulIntegerToFloat") == 18
    counts = optimized_op_counts(std)
    assert "Cast" not in counts and "Expand" not in counts and counts["Gather"] == 18  # all folded at load


@pytest.mark.parametrize("shape", [(9, 5), (3, 3, 7), (16,), (1, 1)])
def test_packed_sign_matrix_unpacks_exactly(shape):
    from onnx import TensorProto, helper

    from bnn_distill.export.graph import _Graph

    q = np.where(np.random.default_rng(len(shape)).random(shape) < 0.5, -1, 1).astype(np.int8)
    g = _Graph()
    out = g.sign_matrix("w", q)
    graph = helper.make_graph(g.nodes, "t", [], [helper.make_tensor_value_info(out, TensorProto.INT8, None)], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for level in ("none", "all"):
        assert np.array_equal(ort_session(proto, level=level).run(None, {})[0], q)
    packed = onnx.numpy_helper.to_array(next(t for t in g.inits if t.name == "w_bits"))
    assert packed.dtype == np.uint8 and packed.size == -(-q.size // 8)
    assert (packed[0] >> 0) & 1 == (q.reshape(-1)[0] < 0)  # bit j of byte i: entry 8 i + j, 1 for -1


def test_index_type_is_the_smallest_that_holds_them():
    from bnn_distill.export.graph import _Graph

    g = _Graph()
    for top, want in ((255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.int32)):
        g.indices(f"i{top}", np.array([0, top]), ("t", top))
        stored = next(t for t in g.inits if t.name == f"i{top}")
        assert onnx.numpy_helper.to_array(stored).dtype == want
    first = g.indices("again", np.array([0, 255]), ("t", 255))  # same key: the same tensor, nothing new
    assert not any(t.name == "again" for t in g.inits) and first == g.indices("x", np.array([1]), ("t", 255))


def test_manifest_and_summary_report_file_sizes(tiny_run, tiny_export, capsys, monkeypatch):
    from bnn_distill.checkpoint import load_checkpoint, load_model_state
    from bnn_distill.summary import summarize
    from bnn_distill.train import build_model

    m = json.loads((tiny_export / "manifest.json").read_text())
    ck = load_checkpoint(tiny_run / "checkpoints" / "stage2" / "last.pt")
    student = build_model(ck["model_spec"])
    load_model_state(student, ck["model"], "test")
    sz = m["sizes"]
    assert sz["deployed_bytes"] == round(summarize(student, (3, 32, 32)).memory_bytes)
    for entry in m["models"].values():
        assert sz["files"][entry["file"]] == entry["bytes"] == (tiny_export / entry["file"]).stat().st_size
        assert sz["over_deployed"][entry["file"]] == round(entry["bytes"] / sz["deployed_bytes"], 2)
    capsys.readouterr()
    assert main(["summary", str(tiny_export)]) == 0
    out = capsys.readouterr().out
    assert f"binary student deployed: {sz['deployed_bytes']:,} bytes" in out
    assert f"{m['models']['student_binary']['bytes']:,} bytes" in out
    # a run's summary adds its export in export/<name> when that export is of this run
    monkeypatch.chdir(tiny_export.parent.parent)
    (Path("export")).mkdir(exist_ok=True)
    import shutil

    shutil.copytree(tiny_export, Path("export") / "tiny", dirs_exist_ok=True)
    assert main(["summary", str(tiny_run)]) == 0
    assert "== ONNX files in export/tiny" in capsys.readouterr().out


def test_a_differing_image_is_diagnosed_inside_the_batch_it_was_run_in(monkeypatch):
    """Float kernels may round differently at another batch size, so a near-zero sign flip seen in
    a parity batch need not recur when the image is rerun alone: diagnose gets the whole batch."""
    import bnn_distill.export.parity as ex

    shape = (3, 16, 16)
    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25), seed=0)
    other = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25), seed=7)
    proto, probes = lower(other, shape)
    x = parity_inputs(shape, 10, seed=1)
    with torch.no_grad():
        differ = set((model(x) - other(x)).abs().amax(1).gt(1e-3).nonzero().flatten().tolist())
    assert differ
    calls = []

    def fake(m, o, p, imgs, rtol):
        calls.append(imgs.clone())
        # a flip only for the rows that really differ: the row index must map back to the image
        return {
            "local": None,
            "drift": None,
            "flips": [{"layer": "l", "signs_differing": 1, "value": 1e-8, "rel": 1e-8} for _ in imgs],
        }

    monkeypatch.setattr(ex, "diagnose", fake)
    res = ex.check_parity("student_binary", model, proto, probes, x, batch=4)
    assert res.passed and sorted(f["image"] for f in res.sign_flips) == sorted(differ)
    starts = sorted({j // 4 * 4 for j in differ})
    assert len(calls) == len(starts)
    for start, imgs in zip(starts, calls):
        assert torch.equal(imgs, x[start : start + 4])  # the parity batch itself, last one short
    assert ex.parity_batch((3, 32, 32)) == 256 and ex.parity_batch((3, 224, 224)) == 5
    assert ex.parity_batch((1, 28, 28)) == 256 and ex.parity_batch((3, 4096, 4096)) == 1
