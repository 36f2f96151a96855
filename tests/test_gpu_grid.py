"""The GPU evidence-grid driver (benchmarks/gpu_grid.py): its sizing by hand, the data unpacking, a CPU smoke."""

from __future__ import annotations

import gzip
import json
import tarfile

import pytest
from conftest import load_script


def _mod():
    return load_script("benchmarks/gpu_grid.py")


def test_sizing_by_hand():
    g = _mod()
    cfg = dict(rows=["a"] * 5, seeds=["0", "1", "2"], parallel=8, epoch_images=55000, budget_s=390.0, max_epochs=100)
    # 15 runs in waves of 8: 2 waves; an epoch at 2000 img/s: 1.15 * 55000 / 2000 = 31.625 s;
    # 390 / (2 waves * 2 stages * 31.625) = 3.08 -> 3 epochs per stage
    assert g.size(cfg, 2000.0) == {"runs": 15, "waves": 2, "epoch_s": 31.62, "stage_epochs": 3}
    assert g.size(cfg, 10.0)["stage_epochs"] == 1  # at least one
    assert g.size(dict(cfg, parallel=15), 1e6)["stage_epochs"] == 100  # at most max_epochs
    # two variants of the itrd row: 21 runs, 3 waves of 8: 390 / (3 * 2 * 31.625) = 2.06 -> 2
    assert g.size(dict(cfg, variants=["s2_lr_0.1x", "split_1_3"]), 2000.0)["runs"] == 21
    assert g.size(dict(cfg, variants=["s2_lr_0.1x", "split_1_3"]), 2000.0)["stage_epochs"] == 2
    cmd = g.grid_args(
        dict(
            cfg,
            variants=["split_1_3"],
            dataset="d",
            teacher_epochs=1,
            val_size=5,
            batch_size=8,
            device="cpu",
            grid_extra=[],
        ),
        "o",
        "r",
        2,
        ["ce"],
        ["0"],
    )
    assert cmd[cmd.index("--variants") + 1] == "split_1_3" and "--variants" not in g.grid_args(
        dict(cfg, dataset="d", teacher_epochs=1, val_size=5, batch_size=8, device="cpu", grid_extra=[]),
        "o",
        "r",
        2,
        ["ce"],
        ["0"],
    )


def test_fmnist_unpacking(tmp_path):
    g = _mod()
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(g.FMNIST_FILES):
        with gzip.open(src / f"{name}.gz", "wb") as f:
            f.write(bytes([i]) * 10)
    dest = tmp_path / "data" / "FashionMNIST" / "raw"
    g.unpack_fmnist(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(g.FMNIST_FILES)
    assert (dest / g.FMNIST_FILES[2]).read_bytes() == bytes([2]) * 10
    (src / f"{g.FMNIST_FILES[0]}.gz").unlink()
    g.unpack_fmnist(src, dest)  # already unpacked: nothing to read
    with pytest.raises(SystemExit, match="gpu_check.sh --prepare"):
        g.unpack_fmnist(src, tmp_path / "elsewhere")


@pytest.mark.slow
def test_smoke_runs_probe_sizing_and_grid(tmp_path):
    g = _mod()
    out = tmp_path / "out"
    rc = g.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--parallel", "2", "--probe", "120"])
    assert rc == 0
    rep = json.loads((out / "gpu_grid.json").read_text())
    assert rep["probe"]["workers_reporting"] == 2 and rep["sizing"]["stage_epochs"] >= 1
    assert rep["grid"]["exit"] == 0
    grid = json.loads((out / "itrd_grid_scratch_gpu.json").read_text())
    assert set(grid["rows"]) == {"ce", "itrd"} and len(grid["rows"]["ce"]["top1"]) == 1
    with tarfile.open(out / "itrd_grid_scratch_gpu_runs.tar.gz") as tar:
        names = tar.getnames()
    assert "itrd_grid_scratch_gpu_runs/ce_s0/run.json" in names
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
