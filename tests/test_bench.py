"""The onnxruntime benchmark of an export folder (files and structure; timings are never asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnn_distill.bench import split_burst, machine, run_bench, time_interleaved
from bnn_distill.cli import main
from bnn_distill.export import ExportInfo, export_models
from bnn_distill.models import create_model

from test_export import _randomize


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A small export made without a run (random weights, no dataset)."""
    torch.manual_seed(0)
    # BatchNorm statistics drawn at random: a freshly initialised binary net has sums that cancel to
    # exactly 0, whose sign PyTorch's rounded float conv then decides at random (parity would flag it)
    student = _randomize(create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25, weight_scale="learned",
                                      recu=True))
    spec = dict(name="cifar_resnet20", num_classes=10, in_chans=3, quant="W1A1", width_mult=0.25,
                weight_scale="learned", recu=True)
    teacher = _randomize(create_model("cifar_resnet20", 10, width_mult=0.25))
    out = tmp_path_factory.mktemp("bench") / "exp"
    export_models(student, spec, out, ExportInfo(input_shape=(3, 16, 16), run="rand", fingerprint="x"),
                  teacher=teacher)
    return out


def test_bench_writes_json_markdown_and_plot(export_dir):
    r = run_bench(export_dir, batches=[1, 2], threads=[1], repeats=2, warmup=1)
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (export_dir / name).stat().st_size > 0
    assert (export_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((export_dir / "bench.json").read_text())
    assert on_disk["latency"] == json.loads(json.dumps(r["latency"]))
    assert [(row["batch"], row["threads"]) for row in r["latency"]] == [(1, 1), (2, 1)]
    for row in r["latency"]:
        assert set(row["models"]) == {"teacher", "student_fp32", "student_binary"}
        for s in row["models"].values():
            assert s["n"] == 2 * 2 and 0 < s["p50_ms"] <= s["p90_ms"] and s["speedup_vs_teacher"] > 0  # 2 rounds x 2 warm calls
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
    times = time_interleaved(_fakes("abc", calls), np.zeros(1), repeats=3, warmup=1,
                             budget_s=0)
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
    assert main(["bench", str(export_dir), "--batch", "1", "--threads", "1", "--repeats", "2", "--warmup", "1",
                 "--no-accuracy"]) == 0
    out = capsys.readouterr().out
    assert "binary student" in out and "speed-up" in out
    assert "accuracy" not in json.loads((export_dir / "bench.json").read_text())


@pytest.mark.parametrize("args,expect", [
    ([], "not a finished export"),
    (["--batch", "0"], None),
])
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
