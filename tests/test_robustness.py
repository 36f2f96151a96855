"""Crash safety as a user meets it: signals and SIGKILL against a real `bnn-distill train` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe_dict

from bnn_distill.checkpoint import load_checkpoint
from bnn_distill.errors import CheckpointError
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe

STAGES = ("teacher", "stage1", "stage2")


def _recipe(out: Path, name: str = "r") -> dict:
    d = tiny_recipe_dict(out, epochs=3, name=name)
    d["data"]["limit_train"] = 256  # 16 steps per epoch: kills land mid-epoch
    return d


def _start(path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "bnn_distill", "train", str(path), "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def _weights(run: Path):
    return {st: load_checkpoint(run / "checkpoints" / st / "last.pt")["model"] for st in STAGES}


def _assert_same(a, b) -> None:
    for st in STAGES:
        assert a[st].keys() == b[st].keys()
        for k in a[st]:
            assert torch.equal(a[st][k], b[st][k]), f"{st}: {k} differs from the uninterrupted run"


@pytest.fixture
def reference(tmp_path):
    recipe = recipe_from_dict(_recipe(tmp_path / "ref"))
    run_recipe(recipe, progress=False)
    return _weights(recipe.run_dir)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_progress_and_resume_is_exact(tmp_path, reference, sig, code):
    d = _recipe(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    run = Path(d["output_dir"]) / "r"
    proc = _start(path)
    _wait_for(run / "checkpoints" / "stage1" / "last.pt", proc)  # stage 1, epoch 2 under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: stopped by " + sig.name) and f"train {path} --resume" in last
    assert "Traceback" not in err
    ck = load_checkpoint(run / "checkpoints" / "stage1" / "last.pt")
    assert not ck["complete"]
    res = _start(path, "--resume")
    out, err = res.communicate(timeout=600)
    assert res.returncode == 0, err[-2000:]
    _assert_same(reference, _weights(run))


@pytest.mark.slow
def test_sigkill_at_many_points_then_resume_is_exact(tmp_path, reference):
    """SIGKILL (no chance to save) during each stage, at varying moments, then resume each time."""
    d = _recipe(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    run = Path(d["output_dir"]) / "r"
    kills = 0
    delays = [0.0, 0.7, 1.9]
    for i, stage in enumerate(STAGES):
        proc = _start(path, *(["--resume"] if kills else []))
        _wait_for(run / "checkpoints" / stage / "last.pt", proc)
        time.sleep(delays[i])  # somewhere mid-epoch, mid-evaluation or mid-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            kills += 1
        else:
            proc.communicate(timeout=60)
        for ck in (run / "checkpoints").rglob("last.pt"):
            load_checkpoint(ck)  # never half-written under its final name
    res = _start(path, "--resume")
    _, err = res.communicate(timeout=900)
    assert res.returncode == 0, err[-2000:]
    assert kills >= 2
    _assert_same(reference, _weights(run))


_WRITER = r"""
import sys, torch
from bnn_distill.checkpoint import atomic_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_save({"i": i, "w": torch.full((256, 256, 16), float(i))}, path)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "last.pt"
    seen = []
    for delay in (0.0, 0.05, 0.13, 0.31, 0.7):
        target.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)])
        _wait_for(target, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        ck = load_checkpoint(target)  # complete, never torn
        assert torch.equal(ck["w"], torch.full((256, 256, 16), float(ck["i"])))
        seen.append(ck["i"])
    assert max(seen) > 1, "no kill landed after the first write; the test did not exercise rewrites"
    # a truncated copy under another name is refused with one clear line
    torn = tmp_path / "torn.pt"
    torn.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(torn)
