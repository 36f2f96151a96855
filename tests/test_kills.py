"""Random SIGKILLs over a whole run (issue 16): resume each time, end bit-identical.

The quick recipe, shrunk (quarter-width ResNet-20, 512 training images, 3 epochs per stage), is
trained by a real ``bnn-distill train`` process that is killed with SIGKILL at 10 moments drawn
from a fixed seed: each moment is a stage (teacher, stage1, stage2 in turn) and a delay after
that stage's first checkpoint appears, so the kills land in every stage: mid-step, mid-evaluation,
mid-checkpoint-write, between stages, at start-up. After each kill the run is resumed
(``--resume``); the final weights of every stage and every metric (timing excluded) must equal
those of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
import yaml

from bnn_distill.checkpoint import load_checkpoint
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe

REPO = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "stage1", "stage2")
SEED = 16
KILLS = 10
TIMING = re.compile(r"(wall|elapsed|per_s|time|seconds|_s$|^machine$)")


def shrunk_quick(out: Path) -> Dict[str, Any]:
    raw = yaml.safe_load((REPO / "recipes" / "quick_fmnist_two_stage.yaml").read_text())
    raw["output_dir"] = str(out)
    raw["data"].update(limit_train=512, limit_test=64)
    raw["data"].pop("val_size", None)
    raw["data"].pop("val_fraction", None)
    for role in ("teacher", "student"):
        raw[role]["width_mult"] = 0.25
    for st in raw["stages"]:
        st.update(epochs=3, batch_size=64)
        st.setdefault("schedule", {})["warmup_epochs"] = 0.5
    return raw


def _untimed(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not TIMING.search(str(k))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _result(run: Path):
    weights = {st: load_checkpoint(run / "checkpoints" / st / "last.pt")["model"] for st in STAGES}
    metrics = [_untimed(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = _untimed(json.loads((run / "summary.json").read_text()))
    return weights, metrics, summary


def _in_progress(run: Path) -> str:
    """The stage a kill interrupted: the first without a complete last.pt ('done' after all)."""
    for st in STAGES:
        p = run / "checkpoints" / st / "last.pt"
        if not p.exists() or not load_checkpoint(p).get("complete"):
            return st
    return "done"


def _start(path: Path, resume: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "bnn_distill", "train", str(path), "--no-progress", *(["--resume"] if resume else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _kill_at(proc: subprocess.Popen, run: Path, stage: str, delay: float, timeout: float = 900.0) -> Optional[str]:
    """SIGKILL ``proc`` ``delay`` s after ``stage``'s first checkpoint exists; the stage hit, or None if it ended."""
    first = run / "checkpoints" / stage / "last.pt"
    t0 = time.monotonic()
    while not first.exists():
        if proc.poll() is not None:
            break
        assert time.monotonic() - t0 < timeout, f"{first} did not appear"
        time.sleep(0.02)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    if proc.poll() is not None:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        return None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return _in_progress(run)


@pytest.mark.slow
def test_ten_seeded_sigkills_over_all_stages_then_resume_is_bit_exact(tmp_path):
    raw = shrunk_quick(tmp_path / "runs")
    path = tmp_path / "quick_shrunk.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "runs" / raw["name"]

    ref = recipe_from_dict({**raw, "output_dir": str(tmp_path / "ref")})
    run_recipe(ref, progress=False)
    expected = _result(ref.run_dir)

    rng = random.Random(SEED)
    plan = [(STAGES[min(2, i * 3 // KILLS)], rng.uniform(0.0, 6.0)) for i in range(KILLS)]
    landed: List[str] = []
    started = False
    for stage, delay in plan:
        proc = _start(path, resume=started)
        started = True
        hit = _kill_at(proc, run, stage, delay)
        if hit is not None:
            landed.append(hit)
        for ck in (run / "checkpoints").rglob("*.pt"):
            load_checkpoint(ck)  # never torn under its final name
    final = _start(path, resume=True)
    _, err = final.communicate(timeout=1800)
    assert final.returncode == 0, err[-3000:]

    got = _result(run)
    for st in STAGES:
        a, b = got[0][st], expected[0][st]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{st}: {k} differs from the uninterrupted run"
    assert got[1] == expected[1], "metrics.jsonl differs from the uninterrupted run"
    assert got[2]["stages"] == expected[2]["stages"] and got[2]["teacher"] == expected[2]["teacher"]
    print(f"kills landed: {len(landed)}/{KILLS} in {landed}")
    assert len(landed) >= KILLS - 1, f"only {len(landed)} kills landed: {landed}"
    assert {"teacher", "stage1", "stage2"} <= set(landed), f"kills did not reach every stage: {landed}"
