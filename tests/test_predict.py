"""``bnn-distill predict``: images and arrays through an export folder, with only onnxruntime, numpy, Pillow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnn_distill import predict as pr
from bnn_distill.cli import main
from bnn_distill.data import FMNIST_SUBSET_INFO, build_datasets
from bnn_distill.export import EXPORT_FORMAT, INPUT_NAME, MANIFEST, OUTPUT_NAME, ExportInfo, export_models, ort_session
from bnn_distill.models import create_model

N_TEST = 100
ROOT = Path(__file__).resolve().parents[1]


def _fmnist_student(n_train: int = 600) -> torch.nn.Module:
    """A W1A1 Fashion-MNIST student in seconds, no training loop: Bi-Real blocks whose binary convs
    have small BatchNorm weights (0.05) carry the stem's features through their shortcuts, and the
    head (head_bn statistics, fc) is fitted in closed form (ridge regression onto one-hot labels) on
    ``n_train`` training images. About 50% test top-1 on the subset (chance: 10%)."""
    train, _, _ = build_datasets("fmnist_subset", None, False, False, n_train, 1, seed=0)
    torch.manual_seed(0)
    m = create_model(
        "cifar_resnet20", 10, in_chans=1, quant="W1A1", width_mult=0.5, weight_scale="learned", recu=True
    ).eval()
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([train[i][1] for i in range(len(train))])
    feats = {}
    hook = m.head_bn.register_forward_hook(lambda mod, i, o: feats.__setitem__("f", i[0]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, mod in m.named_modules():
            if name.startswith("layer") and isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(0.05)  # BatchNorm shifts off 0: no pre-activation sits on an exact tie
                mod.running_mean.copy_(0.5 + torch.rand(mod.num_features, generator=g))
        m(x)
        f = feats["f"]
        hb = m.head_bn
        mu, var = f.mean(0), f.var(0, unbiased=False)
        hb.running_mean.copy_(mu)
        hb.running_var.copy_(var)
        z = torch.cat([(f - mu) / torch.sqrt(var + hb.eps), torch.ones(len(f), 1)], 1).double()
        t = torch.nn.functional.one_hot(y, 10).double()
        wt = torch.linalg.solve(z.T @ z + 0.1 * torch.eye(z.shape[1], dtype=torch.float64), z.T @ t)
        m.fc.weight.copy_(wt[:-1].T.float())
        m.fc.bias.copy_(wt[-1].float())
    hook.remove()
    return m


SPEC = dict(
    name="cifar_resnet20", num_classes=10, in_chans=1, quant="W1A1", width_mult=0.5, weight_scale="learned", recu=True
)


def _info(limit: int = N_TEST) -> ExportInfo:
    i = FMNIST_SUBSET_INFO
    return ExportInfo(
        input_shape=(1, 28, 28),
        mean=tuple(i.mean),
        std=tuple(i.std),
        classes=tuple(i.classes),
        run="fm",
        fingerprint="fm-ridge",
        stage="stage2",
        quant="W1A1",
        dataset={"name": "fmnist_subset", "root": None, "limit_test": limit, "seed": 0, "test_images": limit},
    )


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """(export folder, student, test split): the student above exported with the first 100 test images."""
    student = _fmnist_student()
    _, test, _ = build_datasets("fmnist_subset", None, False, False, 1, N_TEST, seed=0)
    out = tmp_path_factory.mktemp("predict") / "fm"
    export_models(student, SPEC, out, _info(), data=test)
    return out, student, test


@pytest.fixture(scope="module")
def pngs(fm, tmp_path_factory):
    """The export's 100 test images (the balanced first 100) as 8-bit grayscale PNGs, with their labels."""
    _, _, test = fm
    d = tmp_path_factory.mktemp("png")
    paths = []
    for i in range(N_TEST):
        p = d / f"test_{i:03d}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(p)
        paths.append(p)
    return paths, test.targets.numpy().astype(int)


def _one_line_error(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expect in err, err
    return err


# ---------------------------------------------------------------- the target: labels from the CLI


def test_cli_predict_labels_exported_fashion_mnist_images(fm, pngs, capsys):
    out, _, test = fm
    paths, labels = pngs
    manifest = json.loads((out / MANIFEST).read_text())
    capsys.readouterr()
    assert main(["predict", str(out), *map(str, paths), "--json", "--top-k", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["file"] == "student_binary.onnx" and res["runtime"] == "standard" and res["model"] == "student_binary"
    classes = list(FMNIST_SUBSET_INFO.classes)
    got = [p["top"][0]["index"] for p in res["predictions"]]
    right = [g == y for g, y in zip(got, labels)]
    # the PNG path gives exactly the export's own onnxruntime accuracy on the same 100 images
    assert 100.0 * sum(right) / N_TEST == manifest["models"]["student_binary"]["test_top1"]
    assert sum(right) >= 35  # well above chance (10%)
    for p, y in zip(res["predictions"], labels):
        assert [t["class"] for t in p["top"]] == [classes[t["index"]] for t in p["top"]] and len(p["top"]) == 3
        probs = [t["probability"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-12
    # bit-identical to the test split's tensors (normalised by the dataset code) through onnxruntime
    sess = ort_session(out / "student_binary.onnx")
    x = torch.stack([test[i][0] for i in range(N_TEST)]).numpy()
    ref = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    assert np.array_equal(np.array([p["logits"] for p in res["predictions"]], dtype=np.float32), ref)
    # text output for one image the model gets right: its true class comes first
    k = right.index(True)
    assert main(["predict", str(out), str(paths[k])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{paths[k]}: {classes[labels[k]]} ") and line.count("%") == 5


def test_probabilities_are_the_softmax_of_the_logits(fm, pngs):
    out, _, _ = fm
    paths, _ = pngs
    res = pr.predict(out, paths[:2], top_k=10)
    for p in res["predictions"]:
        lg = np.array(p["logits"], dtype=np.float64)
        e = np.exp(lg - lg.max())
        want = e / e.sum()
        assert [t["index"] for t in p["top"]] == list(np.argsort(-want, kind="stable"))
        assert np.allclose([t["probability"] for t in p["top"]], np.sort(want)[::-1], rtol=1e-12, atol=0)
    assert len(pr.predict(out, paths[:1], top_k=50)["predictions"][0]["top"]) == 10  # capped at the classes


# ---------------------------------------------------------------- preprocessing, by hand


def test_normalize_by_hand_and_as_the_dataset_does():
    x = pr.normalize(np.array([[[0, 255, 51]]], dtype=np.uint8), [0.2], [0.4])
    assert x.dtype == np.float32 and np.allclose(x[0, 0], [-0.5, 2.0, 0.0], atol=1e-6)  # (0.2 - 0.2) / 0.4 = 0
    from bnn_distill.data import TensorImageDataset

    img = torch.arange(0, 256, dtype=torch.int64).to(torch.uint8).view(1, 1, 16, 16)
    ds = TensorImageDataset(img, torch.zeros(1), FMNIST_SUBSET_INFO.mean, FMNIST_SUBSET_INFO.std)
    mine = pr.normalize(img[0].numpy(), FMNIST_SUBSET_INFO.mean, FMNIST_SUBSET_INFO.std)
    assert np.array_equal(mine, ds[0][0].numpy())  # bit for bit


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre():
    # 20 wide x 10 high: columns 0-1 black, 2-17 grey 128, 18-19 white
    a = np.zeros((10, 20), dtype=np.uint8)
    a[:, 2:18], a[:, 18:] = 128, 255
    got = np.asarray(pr.fit_image(Image.fromarray(a), 5, 5))
    # scale max(5/20, 5/10) = 0.5 -> 10 x 5, centre crop: columns 2..6, whose (antialiased, 2-pixel
    # radius) bilinear taps fall on source columns 2.5..14.5, all grey
    assert got.shape == (5, 5) and (got == 128).all()
    same = Image.fromarray(a)
    assert pr.fit_image(same, 10, 20) is same  # already the model's size: untouched
    # an ImageFolder-style ratio: cover 4 / (224/256) = 4.57 -> 5 x 5, then crop 4 x 4
    solid = Image.fromarray(np.full((9, 9), 7, np.uint8))
    assert np.asarray(pr.fit_image(solid, 4, 4, 224 / 256)).shape == (4, 4)


def test_colour_image_for_a_grey_model_and_grey_for_a_colour_model(tmp_path):
    p = tmp_path / "red.jpg"
    Image.fromarray(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1))).save(p, quality=100)
    grey = pr.read_pixels(p, 1, 8, 8)
    assert grey.shape == (1, 8, 8) and abs(int(grey.mean()) - 76) <= 2  # L = 0.299 R (JPEG rounding aside)
    q = tmp_path / "grey.png"
    Image.fromarray(np.full((4, 6), 9, np.uint8)).save(q)
    rgb = pr.read_pixels(q, 3, 4, 4)
    assert rgb.shape == (3, 4, 4) and (rgb == 9).all()


def test_npy_layouts_give_the_image_logits(fm, pngs, tmp_path):
    out, _, test = fm
    paths, _ = pngs
    pix = np.asarray(Image.open(paths[0]))  # (28, 28) uint8
    files = {
        "hw": pix,
        "hw1": pix[:, :, None],
        "chw": pix[None],
        "nchw": pix[None, None],
        "float": test[0][0].numpy(),
    }  # already normalised
    for name, arr in files.items():
        np.save(tmp_path / f"{name}.npy", arr)
    res = pr.predict(out, [paths[0]] + [tmp_path / f"{n}.npy" for n in files], top_k=1)
    logits = [p["logits"] for p in res["predictions"]]
    assert all(lg == logits[0] for lg in logits[1:])


# ---------------------------------------------------------------- one-line errors, exit status 2


def test_a_bad_image_is_one_line(fm, tmp_path, capsys):
    out, _, _ = fm
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _one_line_error(capsys, ["predict", str(out), str(bad)], f"cannot read '{bad}' as an image")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    _one_line_error(capsys, ["predict", str(out), str(txt)], "as an image")
    _one_line_error(capsys, ["predict", str(out), str(tmp_path / "missing.png")], "is not a file")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x93NUMPY garbage")
    _one_line_error(capsys, ["predict", str(out), str(junk)], "as a .npy array")


@pytest.mark.parametrize(
    "arr,expect",
    [
        (np.zeros((27, 28), np.uint8), "shape (27, 28)"),
        (np.zeros((3, 28, 28), np.uint8), "shape (3, 28, 28)"),
        (np.zeros((2, 1, 28, 28), np.float32), "shape (2, 1, 28, 28)"),
        (np.full((28, 28), 300, np.int32), "0..255"),
        (np.zeros((28, 28), bool), "holds bool"),
        (np.full((1, 28, 28), np.nan, np.float32), "holds float32"),
    ],
)
def test_a_wrong_array_is_one_line(fm, tmp_path, capsys, arr, expect):
    out, _, _ = fm
    p = tmp_path / "a.npy"
    np.save(p, arr)
    err = _one_line_error(capsys, ["predict", str(out), str(p)], expect)
    assert "C=1, H=28, W=28" in err or "0..255" in err


def test_a_foreign_or_incomplete_export_folder_is_one_line(fm, pngs, tmp_path, capsys):
    out, _, _ = fm
    img = str(pngs[0][0])
    _one_line_error(capsys, ["predict", str(tmp_path), img], "not a finished export")
    _one_line_error(capsys, ["predict", str(tmp_path / "nowhere"), img], "is not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST).write_text(json.dumps({"format": "someone-else/2", "models": {}}))
    _one_line_error(capsys, ["predict", str(foreign), img], "not a bnn-distill export manifest")
    (foreign / MANIFEST).write_text("{not json")
    _one_line_error(capsys, ["predict", str(foreign), img], "not valid JSON")
    part = tmp_path / "part"
    shutil.copytree(out, part)
    (part / "student_binary.onnx").unlink()
    _one_line_error(capsys, ["predict", str(part), img], "lacks student_binary.onnx")
    torn = tmp_path / "torn"
    shutil.copytree(out, torn)
    data = (torn / "student_binary.onnx").read_bytes()
    (torn / "student_binary.onnx").write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, ["predict", str(torn), img], "a partial or replaced file")
    nostat = tmp_path / "nostat"
    shutil.copytree(out, nostat)
    m = json.loads((nostat / MANIFEST).read_text())
    m["normalization"] = {"mean": [], "std": []}
    (nostat / MANIFEST).write_text(json.dumps(m))
    _one_line_error(capsys, ["predict", str(nostat), img], "does not fit 1 channel")


def test_option_errors_are_one_line(fm, pngs, capsys):
    out, _, _ = fm
    img = str(pngs[0][0])
    _one_line_error(capsys, ["predict", str(out), img, "--top-k", "0"], "--top-k")
    _one_line_error(capsys, ["predict", str(out), img, "--runtime", "native"], "has no native graph")
    _one_line_error(capsys, ["predict", str(out), img, "--threads", "0"], "--threads")


def test_other_models_of_the_export(fm, pngs, capsys):
    out, _, _ = fm
    res = pr.predict(out, pngs[0][:3], model="student_fp32")
    assert res["file"] == "student_fp32.onnx" and res["runtime"] == "standard"
    _one_line_error(capsys, ["predict", str(out), str(pngs[0][0]), "--model", "teacher"], "holds no teacher model")


def test_the_manifest_constants_match_the_exporter():
    assert (pr.EXPORT_FORMAT, pr.MANIFEST, pr.INPUT_NAME, pr.OUTPUT_NAME) == (
        EXPORT_FORMAT,
        MANIFEST,
        INPUT_NAME,
        OUTPUT_NAME,
    )


# ---------------------------------------------------------------- no torch in the core


def test_the_core_runs_without_torch(fm, pngs):
    """predict.py imported with torch made unimportable (the package's own __init__ is bypassed:
    it imports the training stack)."""
    out, _, _ = fm
    code = f"""
import importlib.abc, sys, types
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'brevitas', 'onnx', 'matplotlib'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType('bnn_distill'); pkg.__path__ = [{str(ROOT / "bnn_distill")!r}]
sys.modules['bnn_distill'] = pkg
from bnn_distill import predict
r = predict.predict({str(out)!r}, [{str(pngs[0][0])!r}], top_k=1)
assert 'torch' not in sys.modules and 'onnx' not in sys.modules
print(r['predictions'][0]['top'][0]['class'])
"""
    env = {**os.environ, "BNN_DISTILL_NATIVE_LIB": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in FMNIST_SUBSET_INFO.classes


def test_manifest_and_onnxrt_import_without_torch():
    """bnn_distill.manifest and bnn_distill.onnxrt import with torch unimportable. The package's own
    __init__ imports torch (the losses and models), so it is bypassed as above; the modules' sources
    are also checked for a module-level torch import."""
    import ast

    for name in ("manifest", "onnxrt"):
        tree = ast.parse((ROOT / "bnn_distill" / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m.split(".")[0] == "torch"], (name, mods)
    code = f"""
import importlib.abc, sys, types
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'brevitas'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType('bnn_distill'); pkg.__path__ = [{str(ROOT / "bnn_distill")!r}]
sys.modules['bnn_distill'] = pkg
import bnn_distill.manifest, bnn_distill.onnxrt
assert 'torch' not in sys.modules
print(bnn_distill.manifest.EXPORT_FORMAT, bnn_distill.onnxrt.ort_session.__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [EXPORT_FORMAT, "ort_session"]


# ---------------------------------------------------------------- native graph when the library loads


@pytest.fixture(scope="module")
def fm_native(fm, tmp_path_factory):
    from bnn_distill import native

    try:
        native.library_path()
    except native.NativeUnavailable as e:
        if os.environ.get("BNN_DISTILL_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native library required but unavailable: {e}")
        pytest.skip(f"native library unavailable: {e}")
    _, student, test = fm
    out = tmp_path_factory.mktemp("predict") / "fm_native"
    export_models(student, SPEC, out, _info(), data=test, runtime="native")
    return out


def test_auto_runs_the_native_graph_and_falls_back(fm_native, pngs, tmp_path, monkeypatch, capsys):
    paths, labels = pngs
    nat = pr.predict(fm_native, paths[:20], top_k=1)
    std = pr.predict(fm_native, paths[:20], top_k=1, runtime="standard")
    assert (nat["runtime"], nat["file"]) == ("native", "student_binary_native.onnx")
    assert (std["runtime"], std["file"]) == ("standard", "student_binary.onnx")
    assert [p["logits"] for p in nat["predictions"]] == [p["logits"] for p in std["predictions"]]
    assert pr.predict(fm_native, paths[:1], runtime="native")["runtime"] == "native"
    # the library does not load: auto falls back to the standard graph; --runtime native says why
    monkeypatch.setenv("BNN_DISTILL_NATIVE_LIB", str(tmp_path / "missing.so"))
    assert pr.predict(fm_native, paths[:1])["runtime"] == "standard"
    _one_line_error(capsys, ["predict", str(fm_native), str(paths[0]), "--runtime", "native"], "--runtime native:")
