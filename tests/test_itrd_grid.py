"""The evidence-grid script: every row's recipe is valid, and the grid runs, caches and reports."""

from __future__ import annotations

import json
import re

import pytest
from conftest import load_script

from bnn_distill.recipe import recipe_from_dict


def _grid():
    return load_script("benchmarks/itrd_grid.py")


def _recipe_args(tmp_path):
    import argparse

    return argparse.Namespace(
        dataset="fmnist_subset",
        root=None,
        arch="cifar_resnet20",
        width_mult=1.0,
        limit_train=None,
        limit_test=None,
        runs=str(tmp_path),
        batch_size=128,
        lr=2e-3,
        teacher_epochs=3,
        stage_epochs=4,
        regime="teacher_init",
        warmup_epochs=1.0,
        val_size=500,
        out=str(tmp_path / "grid"),
        device="auto",
        teacher_forward="eager",
        parallel_worker=False,
    )


def _args(grid, tmp_path, *extra):
    return [
        "--dataset",
        "synthetic",
        "--limit-train",
        "64",
        "--limit-test",
        "32",
        "--width-mult",
        "0.25",
        "--teacher-epochs",
        "1",
        "--stage-epochs",
        "1",
        "--batch-size",
        "16",
        "--seeds",
        "0",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "grid"),
        *extra,
    ]


def test_every_row_is_a_valid_recipe_with_the_same_budget(tmp_path):
    grid = _grid()
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"")
    args = _recipe_args(tmp_path)
    recipe_from_dict(grid.teacher_recipe(args))
    budgets = {}
    for row in grid.ROWS:
        r = recipe_from_dict(grid.student_recipe(args, row, 1, str(ckpt)))
        budgets[row] = sum(st.epochs for st in r.stages)
        assert all(st.init_from for st in r.stages) and r.seed == 1
        assert r.teacher_forward == "eager"  # the committed grids trained so; their remaining runs too
        names = [t.name for t in r.stages[-1].losses]
        assert names[0] == "ce"
    assert set(budgets.values()) == {8}  # same total student epochs in every row
    for row in ("kd_single", "itrd_kd_single"):  # any method in one W1A1 stage, named explicitly
        single = recipe_from_dict(grid.student_recipe(args, row, 0, str(ckpt)))
        assert [(st.quant, st.epochs) for st in single.stages] == [("W1A1", 8)]
        assert [t.name for t in single.stages[0].losses] == [d["name"] for d in grid.METHODS[row[: -len("_single")]]]
    assert "itrd_kd_single" in grid.ROWS and "itrd_kd_single" not in grid.DEFAULT_ROWS
    two_stage = recipe_from_dict(grid.student_recipe(args, "itrd", 0, str(ckpt)))
    assert [st.quant for st in two_stage.stages] == ["W32A1", "W1A1"]
    assert [t.name for t in two_stage.stages[0].losses] == ["ce", "itrd_corr", "itrd_mi"]


def test_scratch_rows_start_from_random_weights_with_the_papers_optimiser(tmp_path):
    grid = _grid()
    args = _recipe_args(tmp_path)
    args.regime, args.lr, args.limit_train = "scratch", 0.1, 2000
    teacher = recipe_from_dict(grid.teacher_recipe(args))
    assert teacher.data.val_size is None and teacher.data.limit_train is None  # all training images
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"")
    for row in ("ce", "kd", "itrd", "itrd_kd", "itrd_single"):
        r = recipe_from_dict(grid.student_recipe(args, row, 2, str(ckpt)))
        assert r.data.val_size == 500 and r.data.limit_train == 2000 and r.data.val_seed == 0
        assert r.stages[0].init_from is None and sum(st.epochs for st in r.stages) == 8
        for st in r.stages:
            assert (st.optimizer.name, st.optimizer.lr, st.optimizer.momentum, st.optimizer.weight_decay) == (
                "sgd",
                0.1,
                0.9,
                5e-4,
            )
            assert st.schedule.name == "cosine" and st.schedule.warmup_epochs == 1.0
        if row != "itrd_single":
            assert [st.init_from for st in r.stages] == [None, "stage1"]
    both = recipe_from_dict(grid.student_recipe(args, "itrd_kd", 0, str(ckpt)))
    assert [t.name for t in both.stages[1].losses] == ["ce", "kd", "itrd_corr", "itrd_mi"]


def test_scratch_grid_keeps_its_runs_and_reports_from_them_alone(tmp_path):
    """A finished run is copied (summary, metrics, test predictions; the teacher's weights) to
    <out>_runs/, and the report is rebuilt from that copy when runs/ is gone (another machine)."""
    import shutil

    grid = _grid()
    argv = _args(grid, tmp_path, "--regime", "scratch", "--val-size", "16", "--rows", "ce", "itrd", "--no-cost")
    assert grid.main(argv) == 0
    kept = tmp_path / "grid_runs"
    assert {p.name for p in kept.iterdir()} == {"teacher", "ce_s0", "itrd_s0"}
    assert (kept / "teacher" / "teacher.pt").is_file()
    first = json.loads((tmp_path / "grid.json").read_text())
    run = json.loads((kept / "ce_s0" / "run.json").read_text())
    right = sum(p == y for p, y in zip(run["test_predictions"], run["test_labels"]))
    assert 100.0 * right / len(run["test_labels"]) == pytest.approx(first["rows"]["ce"]["top1"][0])
    assert first["rows"]["ce"]["mcnemar_vs_itrd"][0]["seed"] == 0 and first["regime"] == "scratch"
    assert len(first["rows"]["ce"]["best_on_val_top1"]) == 1
    shutil.rmtree(tmp_path / "runs")
    assert grid.main(argv + ["--report-only"]) == 0
    again = json.loads((tmp_path / "grid.json").read_text())
    assert again["rows"] == first["rows"]
    assert not (tmp_path / "runs" / "ce_s0").exists()


def test_worker_command_line_drops_parallel():
    grid = _grid()
    assert grid._worker_argv(["--seeds", "0", "--parallel", "2", "--rows", "ce"]) == [
        "--seeds",
        "0",
        "--rows",
        "ce",
        "--parallel-worker",
    ]
    assert grid._worker_argv(["--parallel=3", "--no-cost"]) == ["--no-cost", "--parallel-worker"]


def test_a_run_another_process_writes_is_skipped_by_a_worker_and_refused_otherwise(tmp_path):
    """--parallel's workers share one runs folder: a run whose folder lock is held elsewhere is left
    to its holder (None), and outside a worker the usual one-line 'in use' error stands."""
    from bnn_distill.errors import FolderInUse
    from bnn_distill.runlock import FolderLock

    grid = _grid()
    args = _recipe_args(tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"")  # never read: nothing trains
    raw = grid.student_recipe(args, "ce", 0, str(tmp_path / "teacher.pt"))
    recipe = recipe_from_dict(raw)
    with FolderLock(recipe.run_dir, "run folder", "test"):
        args.parallel_worker = True
        assert grid.run_cached(args, raw) is None
        args.parallel_worker = False
        with pytest.raises(FolderInUse):
            grid.run_cached(args, raw)
    assert not (tmp_path / "ce_s0" / "summary.json").exists()  # nothing was trained


def test_parallel_workers_share_the_grid(tmp_path, capsys, caplog):
    """Two worker processes train the two student runs between them; the parent reports both, and
    refreshes the report while they train."""
    grid = _grid()
    grid.PROGRESS_S = 0.5
    argv = _args(grid, tmp_path, "--regime", "scratch", "--val-size", "16", "--rows", "ce", "itrd", "--no-cost")
    with caplog.at_level("INFO", logger="itrd_grid"):
        assert grid.main(argv + ["--parallel", "2", "--device", "cpu"]) == 0
    seen = [int(n) for n in re.findall(r"(\d+) of 2 student runs finished", caplog.text)]
    assert seen and seen[0] == 0 and max(seen) >= 1  # said at the start, and again once a run was kept
    assert "report refreshed" in caplog.text
    kept = tmp_path / "grid_runs"
    assert {p.name for p in kept.iterdir()} == {"teacher", "ce_s0", "itrd_s0"}
    out = json.loads((tmp_path / "grid.json").read_text())
    assert len(out["rows"]["ce"]["top1"]) == 1 and len(out["rows"]["itrd"]["top1"]) == 1
    assert grid.main(argv + ["--parallel", "2"]) == 0  # all kept: the workers train nothing
    assert json.loads((tmp_path / "grid.json").read_text())["rows"] == out["rows"]


@pytest.mark.slow
def test_grid_runs_caches_and_reports(tmp_path, capsys):
    grid = _grid()
    assert grid.main(_args(grid, tmp_path, "--rows", "ce", "itrd")) == 0
    out = json.loads((tmp_path / "grid.json").read_text())
    assert set(out["rows"]) == {"ce", "itrd"} and len(out["rows"]["itrd"]["top1"]) == 1
    assert (tmp_path / "grid.md").read_text().count("| ce |") == 1 and (tmp_path / "grid.png").stat().st_size > 0
    assert out["step_cost"]["vs_ce"]["ce"] == 1.0 and "step images/s side by side" in (tmp_path / "grid.md").read_text()
    assert out["rows"]["itrd"]["seeds"] == [0]
    before = (tmp_path / "runs" / "itrd_s0" / "summary.json").read_bytes()
    # --report-only trains nothing: a row that never ran is reported with no seeds
    assert grid.main(_args(grid, tmp_path, "--rows", "ce", "kd", "--report-only", "--no-cost")) == 0
    rep = json.loads((tmp_path / "grid.json").read_text())
    assert rep["rows"]["kd"]["top1"] == [] and rep["rows"]["ce"]["seeds"] == [0]
    assert not (tmp_path / "runs" / "kd_s0").exists()
    assert grid.main(_args(grid, tmp_path, "--rows", "ce", "itrd")) == 0  # all cached: nothing retrains
    assert (tmp_path / "runs" / "itrd_s0" / "summary.json").read_bytes() == before


def test_step_cost_is_measured_side_by_side_and_cached(tmp_path):
    import argparse

    grid = _grid()
    args = argparse.Namespace(
        dataset="synthetic",
        root=None,
        arch="cifar_resnet20",
        width_mult=0.25,
        batch_size=8,
        runs=str(tmp_path),
        remeasure_cost=False,
    )
    cost = grid.step_cost(args, rounds=2, warmup=1)
    assert set(cost["images_per_s"]) == set(grid.METHODS) and cost["vs_ce"]["ce"] == 1.0
    assert all(v > 0 for v in cost["images_per_s"].values())
    assert cost["key"] == {"arch": "cifar_resnet20", "width_mult": 0.25, "batch": 8, "shape": [3, 32, 32]}
    assert grid.step_cost(args, rounds=2, warmup=1) == cost  # cached: not measured again
    args.batch_size = 4
    assert grid.step_cost(args, rounds=1, warmup=1)["key"]["batch"] == 4  # another setting: measured


def test_every_variant_is_a_valid_recipe_with_one_change(tmp_path):
    grid = _grid()
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"")
    args = _recipe_args(tmp_path)
    base = grid.student_recipe(args, "itrd", 0, str(ckpt))
    for name in grid.VARIANTS:
        d = grid.student_recipe(args, f"itrd-{name}", 0, str(ckpt))
        r = recipe_from_dict(d)
        assert r.name == f"itrd-{name}_s0" and sum(st.epochs for st in r.stages) == 8
        assert d != dict(base, name=d["name"]), name  # something changed
    flat = recipe_from_dict(grid.student_recipe(args, "itrd-feat_flatten", 0, str(ckpt)))
    assert flat.student.feature_layer == flat.teacher.feature_layer == "flatten"
    eps0 = recipe_from_dict(grid.student_recipe(args, "itrd-eps_0", 0, str(ckpt)))
    assert [t.params.get("eps") for t in eps0.stages[1].losses if t.name == "itrd_corr"] == [0.0]
    lr = recipe_from_dict(grid.student_recipe(args, "itrd-s2_lr_0.1x", 0, str(ckpt)))
    assert [st.optimizer.lr for st in lr.stages] == pytest.approx([2e-3, 2e-4])
    split = recipe_from_dict(grid.student_recipe(args, "itrd-split_1_3", 0, str(ckpt)))
    assert [(st.quant, st.epochs) for st in split.stages] == [("W32A1", 2), ("W1A1", 6)]
    assert all(st.schedule.warmup_epochs <= st.epochs / 2 for st in split.stages)


def test_report_cells_by_hand():
    grid = _grid()
    assert grid._mean_std([]) == "-"
    assert grid._mean_std([91.2]) == "91.20 (1 seed)"  # one seed shows no made-up spread
    assert grid._mean_std([91.0, 92.0]) == "91.50 ± 0.71"  # sample std: sqrt(0.5)
    itrd = {"seeds": [0, 1], "top1": [91.0, 92.0]}
    # paired over shared seeds only: seed 2 has no itrd partner and is left out
    vs = grid._vs_itrd({"seeds": [1, 2], "top1": [92.5, 80.0]}, itrd)
    assert vs["mean"] == pytest.approx(0.5) and (vs["above"], vs["n"]) == (1, 1)
    vs = grid._vs_itrd({"seeds": [0, 1], "top1": [90.0, 93.0]}, itrd)  # -1 then +1: mean 0, above once
    assert vs["mean"] == pytest.approx(0.0) and (vs["above"], vs["n"]) == (1, 2)
    assert grid._vs_cell(vs) == "+0.00 (above on 1/2)"
    assert grid._vs_cell(grid._vs_itrd({"seeds": [0, 1], "top1": [91.0, 91.5]}, itrd)) == "-0.25 (above on 0/2)"
    assert grid._vs_cell(None) == "-"
    assert grid._vs_itrd({"seeds": [3], "top1": [90.0]}, itrd) is None
    assert grid._vs_itrd({"seeds": [0], "top1": [90.0]}, None) is None


def test_finished_runs_reads_only_this_grids_kept_copies(tmp_path):
    """The parent's progress report reads kept copies only: no run folder, no lock (a worker may
    hold one), and a kept copy of another recipe is left out."""
    from bnn_distill.runlock import FolderLock

    grid = _grid()
    args = _recipe_args(tmp_path)
    args.seeds = [0, 1]
    ckpt = str(tmp_path / "teacher.pt")
    (tmp_path / "teacher.pt").write_bytes(b"")  # never read: nothing trains

    def keep(row, seed, fingerprint=None):
        recipe = recipe_from_dict(grid.student_recipe(args, row, seed, ckpt))
        dest = grid.kept_dir(args) / recipe.name
        dest.mkdir(parents=True)
        summary = {"fingerprint": fingerprint or recipe.fingerprint(), "name": recipe.name}
        run = {"summary": summary, "metrics": [], "test_predictions": [1, 2], "test_labels": [1, 0]}
        (dest / "run.json").write_text(json.dumps(run))
        return recipe

    keep("ce", 0)
    keep("itrd", 1, fingerprint="someone-else")
    busy = recipe_from_dict(grid.student_recipe(args, "itrd", 0, ckpt))
    with FolderLock(busy.run_dir, "run folder", "test"):  # a worker writing itrd_s0
        done = grid.finished_runs(args, ["ce", "itrd"], ckpt)
    assert [r["_seed"] for r in done["ce"]] == [0] and done["itrd"] == []
    assert done["ce"][0]["_predictions"] == [1, 2] and done["ce"][0]["_labels"] == [1, 0]


def test_run_workers_reports_progress_while_the_workers_run(tmp_path, monkeypatch):
    grid = _grid()
    polls = {"n": 0}

    class FakeProc:
        def __init__(self, cmd, env):
            self.cmd, self.env = cmd, env

        def poll(self):
            polls["n"] += 1
            return None if polls["n"] < 12 else 0

        def wait(self, timeout=None):
            return 0

        def send_signal(self, sig):
            pass

    monkeypatch.setattr(grid.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    ticks = []
    args = _recipe_args(tmp_path)
    args.parallel = 2
    assert grid.run_workers(args, ["--parallel", "2"], on_tick=lambda: ticks.append(1), tick_s=0.0) == 0
    assert len(ticks) >= 2  # called while the fake workers were still running


def test_the_committed_scratch_grid_command_reports_without_training(tmp_path):
    """benchmarks/itrd_grid_scratch.sh is the committed grid's command: --report-only through it reads
    the kept runs (the teacher is committed) and trains nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [
            "bash",
            "-x",
            str(repo / "benchmarks" / "itrd_grid_scratch.sh"),
            "--report-only",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "g"),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # --runs and --out given twice: the last wins, so the test reads and writes only its own folders
    assert "--no-cost" in proc.stderr and "--rows ce kd itrd itrd_kd itrd_single" in proc.stderr
    assert proc.returncode == 2 and f"the teacher in {tmp_path / 'runs'} has not finished" in proc.stderr
    assert not (tmp_path / "g.json").exists()


def test_targets_are_computed_from_paired_seeds_and_wait_for_every_seed():
    grid = _grid()

    def row(top1, seeds):
        return {"top1": top1, "seeds": seeds, "mean": sum(top1) / len(top1)}

    rows = {
        "kd": row([89.0, 89.4, 89.1], [0, 1, 2]),
        "itrd": row([89.5, 89.9], [0, 1]),  # above kd on both seeds so far: not decided
        "itrd_kd": row([90.6, 90.0, 89.0], [0, 1, 2]),  # below kd on seed 2
        "itrd_single": row([89.6, 89.8], [0, 1]),
    }
    kd_t, stage_t, best_t = grid.targets(rows, 92.0, 3)
    assert kd_t["met"] is None and kd_t["evidence"]["itrd"] == [{"seed": 0, "diff": 0.5}, {"seed": 1, "diff": 0.5}]
    assert kd_t["evidence"]["itrd_kd"][2] == {"seed": 2, "diff": -0.1}
    assert stage_t["met"] is False  # itrd below itrd_single on seed 0: "on every seed" cannot hold
    assert stage_t["evidence"]["itrd - itrd_single"] == [{"seed": 0, "diff": -0.1}, {"seed": 1, "diff": 0.1}]
    assert best_t["met"] is False and best_t["evidence"]["best"] == "itrd_kd"  # 3 seeds, mean 89.87: 2.13 below
    rows["itrd"] = row([89.5, 90.3, 89.2], [0, 1, 2])
    assert grid.targets(rows, 92.0, 3)[0]["met"] is True  # itrd above kd on 3/3
    lines = "\n".join(grid._targets_lines(grid.targets(rows, 92.0, 3)))
    assert "**met**" in lines and "**not met**" in lines and "s2 -0.10" in lines
