"""The onnxruntime benchmark of an export folder (files and structure; timings are never asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_export import _randomize

from bnn_distill.bench import machine, run_bench, split_burst, time_interleaved
from bnn_distill.cli import main
from bnn_distill.errors import UserError
from bnn_distill.export import ExportInfo, export_models
from bnn_distill.models import create_model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A small export made without a run (random weights, no dataset)."""
    torch.manual_seed(0)
    # BatchNorm statistics drawn at random: a freshly initialised binary net has sums that cancel to
    # exactly 0, whose sign PyTorch's rounded float conv then decides at random (parity would flag it)
    student = _randomize(
        create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25, weight_scale="learned", recu=True)
    )
    spec = dict(
        name="cifar_resnet20",
        num_classes=10,
        in_chans=3,
        quant="W1A1",
        width_mult=0.25,
        weight_scale="learned",
        recu=True,
    )
    teacher = _randomize(create_model("cifar_resnet20", 10, width_mult=0.25))
    out = tmp_path_factory.mktemp("bench") / "exp"
    export_models(student, spec, out, ExportInfo(input_shape=(3, 16, 16), run="rand", fingerprint="x"), teacher=teacher)
    return out


def test_bench_writes_json_markdown_and_plot(export_dir):
    r = run_bench(export_dir, batches=[1, 2], threads=[1], repeats=2, warmup=1, openvino=False)
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (export_dir / name).stat().st_size > 0
    assert (export_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((export_dir / "bench.json").read_text())
    assert on_disk["latency"] == json.loads(json.dumps(r["latency"]))
    assert [(row["batch"], row["threads"]) for row in r["latency"]] == [(1, 1), (2, 1)]
    for row in r["latency"]:
        assert set(row["models"]) == {"teacher", "student_fp32", "student_binary"}
        for s in row["models"].values():
            assert (
                s["n"] == 2 * 2 and 0 < s["p50_ms"] <= s["p90_ms"] and s["speedup_vs_teacher"] > 0
            )  # 2 rounds x 2 warm calls
            assert s["cold_p50_ms"] > 0 and s["cold_speedup_vs_teacher"] > 0
        assert row["models"]["teacher"]["speedup_vs_teacher"] == 1.0
    assert r["fusion"]["student_binary"]["MatMulIntegerToFloat"] == 18
    assert r["fusion"]["teacher"]["MatMulIntegerToFloat"] == 0
    assert set(r["machine"]["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_vpopcntdq"}
    assert r["machine"]["onnxruntime"] and r["machine"]["cpu"]
    assert "skipped" in r["accuracy"]  # exported without a dataset
    md = (export_dir / "bench.md").read_text()
    assert "| 2 | 1 | binary student |" in md and "MatMulIntegerToFloat x18" in md


class _Recorder:
    """Stands in for an onnxruntime session: records the order of calls."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def run(self, outputs, feed):
        self.calls.append(self.name)


def _fakes(names, calls):
    return {n: _Recorder(n, calls) for n in names}


def test_interleaved_rounds_rotate_the_order():
    calls = []
    times = time_interleaved(_fakes("abc", calls), np.zeros(1), repeats=3, warmup=1, budget_s=0)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_bursts_repeat_each_model_and_split_cold_from_warm():
    calls = []
    times = time_interleaved(_fakes("ab", calls), np.zeros(1), repeats=2, warmup=1, budget_s=0, burst=3)
    assert calls[2:] == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}
    warm, cold = split_burst([10.0, 1.0, 2.0, 11.0, 3.0, 4.0], 3)
    assert warm == [1.0, 2.0, 3.0, 4.0] and cold == [10.0, 11.0]
    assert split_burst([1.0, 2.0], 1) == ([1.0, 2.0], [1.0, 2.0])


def test_cli_bench(export_dir, capsys):
    assert (
        main(
            [
                "bench",
                str(export_dir),
                "--batch",
                "1",
                "--threads",
                "1",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--no-accuracy",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "binary student" in out and "speed-up" in out
    assert "accuracy" not in json.loads((export_dir / "bench.json").read_text())
    assert (
        main(
            [
                "bench",
                str(export_dir),
                "--batch",
                "1",
                "--threads",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--no-accuracy",
                "--no-openvino",
            ]
        )
        == 0
    )
    assert "OpenVINO" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,expect",
    [
        ([], "not a finished export"),
        (["--batch", "0"], None),
    ],
)
def test_cli_bench_user_errors(export_dir, tmp_path, capsys, args, expect):
    target = tmp_path if expect else export_dir
    assert main(["bench", str(target), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert (expect or "--batch") in err and "\n" not in err


def test_machine_reports_cpu_flags():
    m = machine()
    assert m["cores"] >= 1 and isinstance(m["flags"]["avx2"], bool)


def test_bench_without_the_test_split_still_writes_latency(export_dir, tmp_path):
    import shutil

    out = tmp_path / "moved"
    shutil.copytree(export_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["dataset"] = {"name": "mnist", "root": str(tmp_path / "nowhere"), "limit_test": None, "seed": 0}
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = run_bench(out, batches=[1], threads=[1], repeats=1, warmup=1)
    assert "unavailable" in r["accuracy"]["skipped"] and (out / "bench.json").is_file()


def _report():
    """A hand-made bench report: two settings, three models, whiskers far above the bars."""

    def s(p50, p90, sp):
        return {"p50_ms": p50, "p90_ms": p90, "speedup_vs_teacher": sp}

    rows = [
        {
            "batch": 1,
            "threads": 1,
            "models": {
                "teacher": s(10.0, 30.0, 1.0),
                "student_fp32": s(8.0, 9.0, 1.25),
                "student_binary": s(2.0, 6.0, 5.0),
            },
        },
        {
            "batch": 32,
            "threads": 2,
            "models": {
                "teacher": s(100.0, 110.0, 1.0),
                "student_fp32": s(90.0, 400.0, 1.11),
                "student_binary": s(20.0, 25.0, 5.0),
            },
        },
    ]
    return {"latency": rows, "machine": {"onnxruntime": "1.x", "cpu": "test cpu"}}


def test_bench_png_labels_sit_above_the_whiskers():
    from bnn_distill.bench import bench_figure
    from bnn_distill.plots import pyplot

    fig, ax = bench_figure(_report())
    fig.canvas.draw()
    texts = ax.texts
    assert sorted(t.get_text() for t in texts) == ["1.11x", "1.25x", "5.00x", "5.00x"]  # not the teacher's 1.00x
    whiskers = {
        ("student_fp32", 0): 9.0,
        ("student_fp32", 1): 400.0,
        ("student_binary", 0): 6.0,
        ("student_binary", 1): 25.0,
    }
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    for t, box in zip(texts, boxes):
        x, y = t.xy
        assert t.get_rotation() == 90 and y in whiskers.values()  # anchored at its own p90 ...
        top_px = ax.transData.transform((x, y))[1]
        assert box.y0 >= top_px  # ... and drawn above it
        assert box.y1 <= ax.get_window_extent(renderer).y1  # inside the axes (room was made)
    for i in range(len(boxes)):  # no two labels overlap
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j])
    pyplot().close(fig)


def test_bench_without_matplotlib_writes_the_numbers_and_a_note(export_dir, tmp_path, monkeypatch, caplog):
    import shutil
    import sys

    out = tmp_path / "noplot"
    shutil.copytree(export_dir, out)
    (out / "bench.png").write_bytes(b"old")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_bench(out, batches=[1], threads=[1], repeats=1, warmup=1, accuracy=False)
    assert "bnn-distill[plots]" in r["plot"] and (out / "bench.json").is_file() and (out / "bench.md").is_file()
    assert not (out / "bench.png").exists()  # no stale plot beside new numbers
    notes = [rec.getMessage() for rec in caplog.records if "bench.png" in rec.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]


def test_progress_bars_only_when_asked(export_dir, capsys):
    run_bench(export_dir, batches=[1], threads=[1], repeats=1, warmup=1, accuracy=False, progress=True)
    assert "bench" in capsys.readouterr().err
    run_bench(export_dir, batches=[1], threads=[1], repeats=1, warmup=1, accuracy=False, progress=False)
    assert "bench:" not in capsys.readouterr().err
    # the CLI: a bar on a terminal only, never with --no-progress (capsys is not a terminal)
    assert (
        main(
            [
                "bench",
                str(export_dir),
                "--batch",
                "1",
                "--threads",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--no-accuracy",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "setting/s" not in capsys.readouterr().err


def test_parity_progress_bar(capsys):
    from bnn_distill.export import check_parity, lower, parity_inputs

    model = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25))
    proto, probes = lower(model, (3, 16, 16))
    assert check_parity("student_binary", model, proto, probes, parity_inputs((3, 16, 16), 4), progress=True).passed
    assert "parity student_binary" in capsys.readouterr().err


# ---------------------------------------------------------------- the OpenVINO teacher row


def test_openvino_row_runs_the_teacher_file_interleaved(export_dir):
    """With OpenVINO installed: a fourth row, the teacher's own FP32 file compiled by OpenVINO in FP32."""
    ov = pytest.importorskip("openvino")
    import onnxruntime as ort

    from bnn_distill import openvino_rt

    r = run_bench(export_dir, batches=[1, 3], threads=[1], repeats=2, warmup=1, accuracy=False, openvino=True)
    for row in r["latency"]:
        s = row["models"]["teacher_openvino"]
        assert s["n"] == 2 * 2 and 0 < s["p50_ms"] <= s["p90_ms"] and s["speedup_vs_teacher"] > 0
    assert r["openvino"]["version"] == ov.__version__ and r["openvino"]["file"] == "teacher_fp32.onnx"
    compiled = r["openvino"]["compiled"]["1 threads"]
    assert compiled["INFERENCE_NUM_THREADS"] == "1" and compiled["INFERENCE_PRECISION_HINT"] == "f32"
    md = (export_dir / "bench.md").read_text()
    assert "| 3 | 1 | teacher FP32, OpenVINO |" in md and f"OpenVINO {ov.__version__}" in md
    # the same model: OpenVINO's logits are onnxruntime's within FP32 summation-order rounding
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(export_dir / "teacher_fp32.onnx")).run(None, {"input": x})[0]
    got = openvino_rt.openvino_session(export_dir / "teacher_fp32.onnx", x.shape, 1).run(None, {"input": x})[0]
    assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_openvino_row_wiring_without_openvino(export_dir, tmp_path, monkeypatch):
    """The row's place in the interleaved loop, the ratio to onnxruntime and the report, with a stand-in."""
    import shutil

    from bnn_distill import openvino_rt

    class Fake:
        def __init__(self, path, shape, threads):
            self.shape, self.threads = tuple(shape), threads
            made.append(self)

        def run(self, names, feed):
            (x,) = feed.values()
            assert x.shape == self.shape  # compiled for the batch it is fed
            return [np.zeros((x.shape[0], 10), np.float32)]

        def properties(self):
            return {"INFERENCE_NUM_THREADS": str(self.threads)}

    made = []
    out = tmp_path / "e"
    shutil.copytree(export_dir, out)
    monkeypatch.setattr(openvino_rt, "available", lambda: True)
    monkeypatch.setattr(openvino_rt, "version", lambda: "0.test")
    monkeypatch.setattr(openvino_rt, "openvino_session", Fake)
    r = run_bench(out, batches=[1, 2], threads=[1, 2], repeats=1, warmup=1, accuracy=False, burst=2)
    assert [(m.shape[0], m.threads) for m in made] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    for row in r["latency"]:
        s, t = row["models"]["teacher_openvino"], row["models"]["teacher"]
        assert s["n"] == 1 and abs(s["speedup_vs_teacher"] - t["p50_ms"] / s["p50_ms"]) < 1e-12
    assert r["openvino"]["compiled"] == {
        "1 threads": {"INFERENCE_NUM_THREADS": "1"},
        "2 threads": {"INFERENCE_NUM_THREADS": "2"},
    }
    assert "teacher_openvino" not in r["fusion"]  # onnxruntime's op counts are for onnxruntime's sessions
    # asked for but absent: one line naming the extra
    monkeypatch.setattr(openvino_rt, "available", lambda: False)
    with pytest.raises(UserError, match=r"OpenVINO is not installed; pip install 'bnn-distill\[peers\]'"):
        run_bench(out, batches=[1], threads=[1], repeats=1, warmup=1, accuracy=False, openvino=True)
    r = run_bench(out, batches=[1], threads=[1], repeats=1, warmup=1, accuracy=False)  # auto: no row
    assert "teacher_openvino" not in r["latency"][0]["models"] and "openvino" not in r
