"""benchmarks/gpu_check.py: the CPU smoke run through its wrapper, and the orchestration and report logic.

The GPU-only parts of the script (bf16 step timings, CUDA sync counts, NCCL, torch.compile with
inductor) run on the lent GPU machine; here the smoke mode runs every section that has a CPU path
(the torchrun one with gloo), and the report code is fed GPU-shaped results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load():
    return load_script("benchmarks/gpu_check.py")


gc = _load()


def test_smoke_run_through_the_wrapper(tmp_path):
    """`bash benchmarks/gpu_check.sh --smoke`: every smoke section passes on CPU and the three files land in $OUT."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    sec = report["sections"]
    assert list(sec) == list(gc.SMOKE_SECTIONS)
    assert {k: v["status"] for k, v in sec.items()} == {k: "ok" for k in gc.SMOKE_SECTIONS}, {
        k: v.get("error") for k, v in sec.items() if v["status"] != "ok"
    }
    assert report["meta"]["wall_s"] <= report["meta"]["budget_s"] + 30 and wall < 900

    rows = sec["steps"]["rows"]
    assert set(rows) == {label for label in rows} and len(rows) == 8
    for label, r in rows.items():
        assert r["finite"] and r["images_per_s"] > 0, label
        assert all(dt == "torch.float32" for k, dt in r["term_dtypes"].items() if k != "logits"), (
            label,
            r["term_dtypes"],
        )
    assert rows["W1A1 ITRD, tau without host sync (diagnostic)"]["quantisers_patched"] == 16
    assert set(rows["W1A1 ITRD (stage2)"]["terms_last"]) == {"ce", "itrd_corr", "itrd_mi", "loss"}
    assert set(sec["steps"]["eval_images_per_s"]) == {"W1A1 student", "FP teacher"}

    run = sec["itrd_run"]
    assert run["complete"] and [s["name"] for s in run["summary_stages"]] == ["teacher", "stage1", "stage2"]
    for name, m in run["metrics"].items():
        assert m["every_term_logged"] and m["finite"] and len(m["epochs"]) == 2, name
    assert run["metrics"]["stage2"]["terms_expected"] == ["ce", "itrd_corr", "itrd_mi", "loss"]

    tr = sec["torchrun"]["variants"]["nccl_ddp"]
    assert tr["passed"], tr
    assert "backend=gloo" in tr["first"]["process_group"][0]
    assert tr["first"]["rc"] not in (0, None) and tr["first"]["interrupted_line"].startswith(
        "interrupted: stopped by SIGTERM"
    )
    assert tr["resume"]["rc"] == 0 and tr["resume"]["epochs_logged"] == {"teacher": [1], "stage1": [1], "stage2": [1]}

    ex = sec["export"]
    assert ex["rc"] == 0 and ex["parity_passed"] is True
    assert set(ex["models"]) == {"student_binary", "student_fp32", "teacher"}

    est = report["estimate"]
    assert est["single_stage_600_w1a1_h"] > 0 and est["two_stage_300_300_h"] > 0
    md = (out / "gpu_check.md").read_text()
    for heading in ("## One optimiser step", "## ITRD pipeline", "## torchrun", "## Export on CPU", "## Estimate"):
        assert heading in md
    assert "[gpu_check.sh] exit 0" in (out / "gpu_check.log").read_text()


def _cfg(tmp_path, sections, **kw):
    args = gc.build_parser().parse_args(["--smoke", "--sections", ",".join(sections)])
    cfg = gc.make_cfg(args)
    cfg.update(out=str(tmp_path / "out"), work=str(tmp_path / "work"), **kw)
    return cfg


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path):
    calls = []

    def boom(cfg, rec):
        rec.data["partial"] = 1
        rec.save()
        raise ValueError("broken on purpose")

    def fine(cfg, rec):
        calls.append("fine")
        rec.data["value"] = 42

    registry = {"a": boom, "b": fine, "c": fine}
    cfg = _cfg(tmp_path, ["a", "b", "c", "nope"], inject_failure="c")
    report = gc.orchestrate(cfg, registry)
    s = report["sections"]
    assert s["a"]["status"] == "error" and s["a"]["partial"] == 1
    assert s["a"]["error"]["type"] == "ValueError" and "broken on purpose" in s["a"]["error"]["message"]
    assert s["b"]["status"] == "ok" and s["b"]["value"] == 42
    assert s["c"]["status"] == "error" and "injected" in s["c"]["error"]["message"] and calls == ["fine"]
    assert s["nope"]["status"] == "error"
    assert report["estimate"]["error"]
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["sections"]["b"]["value"] == 42
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| a | error: ValueError: broken on purpose" in md


def test_an_isolated_section_is_killed_at_its_cap_and_keeps_its_partial_results(tmp_path):
    cfg = _cfg(tmp_path, ["_sleep"], isolate=True)
    t0 = time.monotonic()
    report = gc.orchestrate(cfg)
    r = report["sections"]["_sleep"]
    assert r["status"] == "timeout" and r["slept"] is True
    assert time.monotonic() - t0 < 30


def test_the_budget_skips_sections_it_cannot_fit(tmp_path):
    cfg = _cfg(tmp_path, ["a", "b"], budget_s=1.0)
    report = gc.orchestrate(cfg, {"a": lambda c, r: None, "b": lambda c, r: None})
    assert {k: v["status"] for k, v in report["sections"].items()} == {"a": "skipped", "b": "skipped"}


def _gpu_like_results():
    """Results shaped as the CUDA run writes them (numbers invented), for the report code."""

    def row(ms, syncs=None, **kw):
        return {
            "median_ms": ms,
            "images_per_s": 256 / (ms / 1000),
            "finite": True,
            "term_dtypes": {"ce": "torch.float32", "loss": "torch.float32", "logits": "torch.bfloat16"},
            "feature_dtype": "torch.bfloat16",
            "step_transient_mib": 900.0,
            "static_mib": 180.0,
            "syncs_per_step": syncs,
            "loss_first": 3.0,
            "loss_last": 2.0,
            **kw,
        }

    return {
        "env": {
            "status": "ok",
            "gpu": "NVIDIA H200",
            "gpu_memory_gib": 139.8,
            "capability": "9.0",
            "bf16_supported": True,
        },
        "steps": {
            "status": "ok",
            "batch": 256,
            "amp_dtype": "torch.bfloat16",
            "device": "cuda",
            "rounds": 12,
            "steps_per_round": 5,
            "rows": {
                "teacher FP, CE (teacher stage)": row(10.0),
                "W32A1 ITRD (stage1)": row(20.0),
                "W1A1 ITRD (stage2)": row(25.0, {"count": 17, "sources": {"quant.py:138": 16, "gpu_check.py:1": 1}}),
                "FP student, ITRD (same network and loss in FP)": row(12.0),
                "W1A1 ITRD, tau without host sync (diagnostic)": row(20.0, {"count": 1, "sources": {}}),
            },
            "eval_images_per_s": {"W1A1 student": 40000.0, "FP teacher": 60000.0},
        },
        "itrd_run": {
            "status": "ok",
            "summary_stages": [{"name": "stage2", "images_per_s": 5000.0}],
            "metrics": {
                "stage2": {
                    "quant": "W1A1",
                    "terms_expected": ["ce", "loss"],
                    "every_term_logged": True,
                    "finite": True,
                    "loss_first": 3.0,
                    "loss_last": 3.5,
                    "loss_down": False,
                    "epochs": [{"epoch": 1, "ce": 3.0, "loss": 3.0}],
                }
            },
        },
        "torchrun": {
            "status": "ok",
            "variants": {
                "nccl_ddp": {
                    "passed": True,
                    "sigterm_after_s": 3.0,
                    "first": {"rc": 1, "process_group": ["GPU_CHECK_SHIM backend=nccl"]},
                    "resume": {"rc": 0, "epochs_logged": {"teacher": [1]}},
                },
                "cli": {"passed": False, "first": {"rc": 1, "process_group": []}, "resume": {"rc": 2}},
            },
        },
        "export": {
            "status": "error",
            "command": "bnn-distill export x",
            "rc": 2,
            "parity_passed": False,
            "checkpoint_plain_load_without_map_location": (
                "RuntimeError: Attempting to deserialize object on a CUDA device"
            ),
            "failed_images_probe": {
                "batch": 256,
                "atol": 0.003,
                "batch_dependent": True,
                "images": [{"image": 14, "torch_batch_vs_alone": 0.29, "onnx_vs_torch_alone": 0.0}],
            },
        },
        "compile": {
            "status": "ok",
            "backend": "inductor",
            "models": {
                "W1A1": {
                    "status": "ok",
                    "first_step_s": 60.0,
                    "eager_ms": 25.0,
                    "compiled_ms": 12.5,
                    "speedup": 2.0,
                    "compiled_images_per_s": 20480.0,
                    "graph_breaks": {"Tensor.item()": 36},
                },
                "FP": {"status": "error", "error": {"type": "BackendCompilerFailed", "message": "boom", "where": []}},
            },
        },
    }


def test_estimate_findings_and_report_from_gpu_shaped_results():
    res = _gpu_like_results()
    est = gc.estimate(res)
    per_epoch = 50_000 / (256 / 0.025) + 10_000 / 40_000.0
    assert est["single_stage_600_w1a1_h"] == round(600 * per_epoch / 3600, 2)
    assert est["single_stage_600_w1a1_compiled_h"] < est["single_stage_600_w1a1_h"]
    assert est["resnet18_binary_yaml_total_h"] == round(est["teacher_200_h"] + est["two_stage_300_300_h"], 2)
    f = gc.findings(res)
    text = "\n".join(f)
    assert "OK every loss term is float32" in text
    assert "ISSUE W1A1 step: 17 host syncs per step (1 with tau" in text and "1.250x" in text
    assert "NOTE itrd_run stage stage2: train loss did not go down" in text
    assert "ISSUE torchrun cli" in text and "joins no process group" in text
    assert "ISSUE bnn_distill/export.py check_parity" in text
    assert "OK checkpoints written on CUDA hold CUDA tensors" in text
    assert "NOTE torch.compile of the FP student failed: BackendCompilerFailed" in text
    report = {
        "meta": {
            "smoke": False,
            "started": "now",
            "wall_s": 400.0,
            "budget_s": 450.0,
            "device": "cuda",
            "width_mult": 1.0,
            "sections": list(res),
        },
        "sections": res,
        "estimate": est,
        "findings": f,
    }
    md = gc.render_md(report)
    assert "GPU: **NVIDIA H200**" in md and "| W1A1 ITRD (stage2) | 25.00 | 10240 |" in md
    assert "| W1A1 | ok | 60.0 | 25.00 | 12.50 | 2.000 |" in md and "error: BackendCompilerFailed: boom" in md


@pytest.mark.slow
def test_compile_section_on_cpu_with_the_eager_backend(tmp_path):
    """Dynamo traces the Brevitas student (graph breaks recorded); about a minute on 2 cores."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--sections",
            "compile",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "gpu_check.json").read_text())["sections"]["compile"]["models"]["W1A1"]
    assert (
        m["status"] == "ok"
        and m["compiled_ms"] > 0
        and m["first_step_loss"]["compiled"] == pytest.approx(m["first_step_loss"]["eager"], rel=1e-4)
    )
