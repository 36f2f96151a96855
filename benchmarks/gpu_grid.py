#!/usr/bin/env python3
"""The scratch-regime evidence grid on a lent GPU (issue 13, item 4): probe, size, run, in one call.

ON THE CPU MACHINE, once (the wheels the GPU image lacks, and Fashion-MNIST's .gz files into the
git-ignored ``.fmnist/``, about 31 MB):

    bash benchmarks/gpu_check.sh --prepare

ON THE LENT GPU MACHINE (one call of the device tool's ``run``, about 9 minutes):

    run(command="bash benchmarks/gpu_check.sh --grid", carry=[".whl", ".fmnist"], timeout_s=590)

What it does:

1. unpacks ``.fmnist/*.gz`` into ``data/FashionMNIST/raw/`` (where the ``fashion_mnist`` dataset looks);
2. copies the CPU grid's kept teacher (``benchmarks/results/itrd_grid_scratch_runs/teacher``,
   committed) into this grid's kept folder: the GPU trains students only, distilled from the same
   teacher, and the teacher's recipe (so its fingerprint) is the CPU grid's;
3. a probe of ``--probe`` seconds: ``--parallel`` one-epoch CE students at once, read back from
   their ``metrics.jsonl`` (images/s per worker, including the validation and test passes);
4. sizes ``--stage-epochs`` so that the grid's 15 student runs (5 rows x 3 seeds, in waves of
   ``--parallel``; 3 more per extra ``--rows`` or ``--variants`` name) fit ``--budget`` seconds, from
   the probe's images/s;
5. runs ``benchmarks/itrd_grid.py --regime scratch --device cuda --parallel N`` on all 55,000
   training images left after the 5,000-image validation split (no ``--limit-train``).

Back under ``$OUT`` (at most 8 files come back): ``itrd_grid_scratch_gpu.{md,json,png}``, the kept
runs as ``itrd_grid_scratch_gpu_runs.tar.gz`` (unpack into ``benchmarks/results/``), ``gpu_grid.json``
(probe, sizing, timings) and the console log (``gpu_grid.log``, by the wrapper). Scratch run folders
stay in ``--work``.

CPU smoke (tests/test_gpu_grid.py): ``python benchmarks/gpu_grid.py --smoke --out /tmp/gg`` runs the
same steps on the synthetic data set with a tiny grid.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "benchmarks" / "itrd_grid.py"
CPU_TEACHER = REPO / "benchmarks" / "results" / "itrd_grid_scratch_runs" / "teacher"
ROWS = ["ce", "kd", "itrd", "itrd_kd", "itrd_single"]
SEEDS = ["0", "1", "2"]
FMNIST_FILES = tuple(f"{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))


def unpack_fmnist(src: Path, dest: Path) -> None:
    """``src/<name>.gz`` -> ``dest/<name>`` for the four Fashion-MNIST files (kept if already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        if (dest / name).exists():
            continue
        gz = src / f"{name}.gz"
        if not gz.exists():
            raise SystemExit(f"error: {gz} is missing; run 'bash benchmarks/gpu_check.sh --prepare' and carry .fmnist")
        with gzip.open(gz, "rb") as f, open(dest / f"{name}.part", "wb") as out:
            shutil.copyfileobj(f, out)
        os.replace(dest / f"{name}.part", dest / name)


def grid_args(cfg: dict, out: Path, runs: Path, epochs: int, rows, seeds, extra=()) -> list:
    """itrd_grid.py's command line: the CPU grid's teacher settings, this run's students."""
    return [
        sys.executable,
        str(GRID),
        "--regime",
        "scratch",
        "--dataset",
        cfg["dataset"],
        "--teacher-epochs",
        str(cfg["teacher_epochs"]),
        "--stage-epochs",
        str(epochs),
        "--val-size",
        str(cfg["val_size"]),
        "--batch-size",
        str(cfg["batch_size"]),
        "--device",
        cfg["device"],
        "--teacher-forward",
        "folded",  # new runs: the library's default (the CPU grid keeps eager to stay comparable with itself)
        "--parallel",
        str(cfg["parallel"]),
        "--no-cost",
        "--rows",
        *rows,
        *(["--variants", *cfg["variants"]] if cfg.get("variants") else []),
        "--seeds",
        *seeds,
        "--runs",
        str(runs),
        "--out",
        str(out),
        *cfg["grid_extra"],
        *extra,
    ]


def probe(cfg: dict, work: Path) -> dict:
    """Images/s per worker with ``parallel`` one-epoch CE students at once, for ``probe_s`` seconds."""
    out = work / "probe"
    runs = work / "probe_runs"
    shutil.rmtree(runs, ignore_errors=True)
    kept = Path(str(out) + "_runs")
    seed_teacher(cfg, kept)
    seeds = [str(100 + i) for i in range(cfg["parallel"])]  # one run per worker
    cmd = grid_args(cfg, out, runs, 1, ["ce"], seeds)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)  # its own group: the workers stop with it
    try:
        proc.wait(timeout=cfg["probe_s"])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the workers save and stop at their next step
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rates = []
    for m in sorted(runs.glob("ce_s*/metrics.jsonl")):  # the students (a smoke probe trains its teacher too)
        lines = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        if lines:
            rates.append(lines[-1]["images_per_s"])
    return {"seconds": round(time.time() - t0, 1), "workers_reporting": len(rates), "images_per_s": rates}


def seed_teacher(cfg: dict, kept: Path) -> None:
    """The CPU grid's kept teacher as this grid's (skipped by itrd_grid.py: same recipe)."""
    if cfg["teacher_from"] and not (kept / "teacher").exists():
        shutil.copytree(cfg["teacher_from"], kept / "teacher")


def size(cfg: dict, rate_per_worker: float) -> dict:
    """Stage epochs such that the student runs fit the budget, in waves of ``parallel`` workers."""
    runs = (len(cfg["rows"]) + len(cfg.get("variants", []))) * len(cfg["seeds"])
    waves = math.ceil(runs / cfg["parallel"])
    # the trainer's images/s counts training images; the validation and test passes after each epoch
    # (15,000 images forward only) add about a tenth: a 15% margin
    epoch_s = 1.15 * cfg["epoch_images"] / rate_per_worker
    epochs = max(1, min(cfg["max_epochs"], int(cfg["budget_s"] / (waves * 2 * epoch_s))))
    return {"runs": runs, "waves": waves, "epoch_s": round(epoch_s, 2), "stage_epochs": epochs}


def pack_runs(kept: Path, dest: Path) -> None:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(kept, arcname=kept.name)


def config(args) -> dict:
    smoke = args.smoke
    return {
        "dataset": "synthetic" if smoke else "fashion_mnist",
        "teacher_epochs": 1 if smoke else 15,
        "val_size": 16 if smoke else 5000,
        "batch_size": 16 if smoke else 256,
        "device": "cpu" if smoke else "cuda",
        "parallel": args.parallel,
        "probe_s": args.probe,
        "budget_s": args.budget,
        "rows": ["ce", "itrd"] if smoke else list(getattr(args, "rows", None) or ROWS),
        "variants": list(args.variants),
        "seeds": ["0"] if smoke else SEEDS,
        # an epoch's training images (the metrics' images/s counts these)
        "epoch_images": 64 if smoke else 55000,
        "max_epochs": 2 if smoke else 100,
        "grid_extra": ["--width-mult", "0.25", "--limit-train", "64", "--limit-test", "32"] if smoke else [],
        "teacher_from": None if smoke else str(CPU_TEACHER),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="where the results go ($OUT)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--parallel", type=int, default=8, help="student runs at once on the GPU")
    ap.add_argument("--probe", type=float, default=60.0, help="seconds of the sizing probe")
    ap.add_argument("--budget", type=float, default=390.0, help="seconds for the student runs")
    ap.add_argument("--smoke", action="store_true", help="the same steps on CPU, synthetic data, a tiny grid")
    ap.add_argument(
        "--rows",
        nargs="+",
        default=ROWS,
        help="itrd_grid.py rows to run (default: the CPU grid's five; e.g. add itrd_kd_single, kd_single)",
    )
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        help="also run these itrd_grid.py variants of the itrd row (e.g. s2_lr_0.1x split_1_3), in the same budget",
    )
    args = ap.parse_args(argv)
    cfg = config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_grid_"))
    report = {"config": cfg, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if not args.smoke:
        unpack_fmnist(REPO / ".fmnist", REPO / "data" / "FashionMNIST" / "raw")
    report["probe"] = p = probe(cfg, work)
    print(f"[gpu_grid] probe: {p}", flush=True)
    if not p["images_per_s"]:
        report["error"] = "the probe finished no epoch; nothing was sized or run"
        (out / "gpu_grid.json").write_text(json.dumps(report, indent=1))
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    rate = min(p["images_per_s"])  # the slowest worker sets the waves' pace
    report["sizing"] = s = size(cfg, rate)
    print(f"[gpu_grid] sizing: {s}", flush=True)
    name = out / "itrd_grid_scratch_gpu"
    kept = Path(str(name) + "_runs")
    seed_teacher(cfg, kept)
    t0 = time.time()
    rc = subprocess.run(
        grid_args(cfg, name, work / "runs", s["stage_epochs"], cfg["rows"], cfg["seeds"]), cwd=REPO, check=False
    ).returncode
    report["grid"] = {"exit": rc, "seconds": round(time.time() - t0, 1)}
    if kept.exists():
        pack_runs(kept, out / "itrd_grid_scratch_gpu_runs.tar.gz")
        shutil.rmtree(kept)  # $OUT returns files at most two folders down: the runs travel as the archive
    (out / "gpu_grid.json").write_text(json.dumps(report, indent=1))
    print(f"[gpu_grid] grid exit {rc} after {report['grid']['seconds']} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
