"""The evidence grid: what ITRD and the two-stage recipe buy a binary student, on real data.

Trains one FP teacher, then binary students of the same family from it, one row per method:

* ``ce``          two stages (W32A1 then W1A1), cross-entropy only
* ``kd``          two stages, CE + Hinton KD (T=4)
* ``itrd_corr``   two stages, CE + 2.0 L_corr
* ``itrd``        two stages, CE + 2.0 L_corr + 1.0 L_gram (the paper's loss)
* ``itrd_single`` one W1A1 stage of the same total epochs, CE + 2.0 L_corr + 1.0 L_gram

* ``itrd_kd``     two stages, CE + KD + 2.0 L_corr + 1.0 L_gram (do the losses stack?)
* ``ce_single``, ``kd_single``, ``itrd_kd_single``: any method in one W1A1 stage of the same total
  epochs (only when named in ``--rows``; the default rows are the five above)

Two regimes (``--regime``):

* ``teacher_init`` (the first grid): every student starts from the teacher's weights
  (``init_from: teacher``), Adam, no validation split.
* ``scratch`` (the paper's regime): students start from random initialisation; stage 1 (W32A1)
  from scratch, stage 2 (W1A1) from stage 1, single stage W1A1 from scratch for the same total
  epochs; SGD momentum 0.9, weight decay 5e-4, lr 0.1, warm-up then cosine (ITRD.md, scaled from
  600 epochs); the teacher trains on the whole training split; the students hold out a balanced
  validation split (``--val-size``, seed fixed across run seeds) and may train on a balanced
  subset of the rest (``--limit-train``). The table reports the final weights' test top-1; the
  best-on-validation weights' test top-1 is beside it, and nothing is selected on the test split.

Every run is an ordinary bnn-distill run folder under ``--runs``: a finished run is skipped, an
unfinished one resumes, so the grid can be completed across several sittings. Each finished run's
summary, metrics and test predictions are also copied to ``<out>_runs/`` (small, committed), and
a finished run found there is not trained again, so the grid survives a machine whose ``runs/``
is gone; for the same reason ``--regime scratch`` keeps the teacher's weights there too.
Writes ``<out>.json`` (every number), ``<out>.md`` (mean ± std over seeds) and ``<out>.png``.

``--parallel N`` trains N student runs at once, each in a worker process of its own (a run folder's
lock keeps two workers off one run; OMP_NUM_THREADS, or the cores, are split between them): on the
2-core CPU two 1-thread workers train about 10-25% more images per second than one 2-thread
process, and on a GPU several small students share the device (``--device cuda``;
``benchmarks/gpu_grid.py`` runs the scratch grid that way on a lent GPU).

    python benchmarks/itrd_grid.py --dataset fashion_mnist --seeds 0 1 \\
        --teacher-epochs 10 --stage-epochs 5 --out benchmarks/results/itrd_grid
    python benchmarks/itrd_grid.py --regime scratch --seeds 0 1 2 --teacher-epochs 15 \\
        --stage-epochs 12 --limit-train 20000 --batch-size 256 --runs runs/grid_scratch \\
        --rows ce kd itrd itrd_kd itrd_single --out benchmarks/results/itrd_grid_scratch
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from bnn_distill.errors import FolderInUse, UserError
from bnn_distill.evaluate import mcnemar_p
from bnn_distill.frozen import FORMS as TEACHER_FORMS
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.rundir import RunDir
from bnn_distill.train import run_recipe

log = logging.getLogger("itrd_grid")

CE = [{"name": "ce"}]
METHODS: Dict[str, List[Dict[str, Any]]] = {
    "ce": CE,
    "kd": CE + [{"name": "kd", "weight": 1.0, "temperature": 4.0}],
    "itrd_corr": CE + [{"name": "itrd_corr", "weight": 2.0, "alpha": 1.01}],
    "itrd": CE + [{"name": "itrd_corr", "weight": 2.0, "alpha": 1.01}, {"name": "itrd_mi", "weight": 1.0}],
    "itrd_kd": CE
    + [
        {"name": "kd", "weight": 1.0, "temperature": 4.0},
        {"name": "itrd_corr", "weight": 2.0, "alpha": 1.01},
        {"name": "itrd_mi", "weight": 1.0},
    ],
}
SINGLE = "itrd_single"
#: Each method in one W1A1 stage of the grid's total epochs: row name -> method.
SINGLE_ROWS: Dict[str, str] = {f"{m}_single": m for m in METHODS if m != "itrd_corr"}
#: Seconds between the ``--parallel`` parent's refreshes of the report while its workers train.
PROGRESS_S = 60.0
DEFAULT_ROWS = list(METHODS) + [SINGLE]
ROWS = DEFAULT_ROWS + [r for r in SINGLE_ROWS if r != SINGLE]

#: Single-change variants of the ``itrd`` row, for finding out what ITRD's result depends on
#: (``--variants``; each runs as row ``itrd-NAME`` with the same seeds and budget).
VARIANTS: Dict[str, str] = {
    "feat_flatten": "distil the pooled feature before the BatchNorm1d (feature_layer: flatten) instead of after",
    "alpha_1.5": "Renyi order alpha 1.5 instead of 1.01",
    "alpha_2": "Renyi order alpha 2.0",
    "eps_0": "no epsilon in the standardisation (the official code's form)",
    "corr_w1": "L_corr weight 1.0 instead of 2.0",
    "mi_w0.5": "L_gram weight 0.5 instead of 1.0",
    "mi_w2": "L_gram weight 2.0",
    "batch_256": "batch size 256 instead of --batch-size (the batch statistics ITRD uses)",
    # what the two-stage recipe's result depends on (against itrd_single at the same budget)
    "s2_lr_0.1x": "stage 2 (W1A1) starts from a tenth of the learning rate instead of restarting at --lr",
    "split_1_3": "a quarter of the epochs in stage 1 (W32A1) and three quarters in stage 2, instead of half each",
}


#: What each variant changes in every student stage: (loss term or "stage", key, value).
_STAGE_CHANGES: Dict[str, tuple] = {
    "alpha_1.5": ("itrd_corr", "alpha", 1.5),
    "alpha_2": ("itrd_corr", "alpha", 2.0),
    "eps_0": ("itrd_corr", "eps", 0.0),
    "corr_w1": ("itrd_corr", "weight", 1.0),
    "mi_w0.5": ("itrd_mi", "weight", 0.5),
    "mi_w2": ("itrd_mi", "weight", 2.0),
    "batch_256": ("stage", "batch_size", 256),
}


def _variant(d: Dict[str, Any], name: str) -> Dict[str, Any]:
    """Apply one named change to an ``itrd`` student recipe dict."""
    if name == "feat_flatten":
        d["student"]["feature_layer"] = d["teacher"]["feature_layer"] = "flatten"
        return d
    if name == "s2_lr_0.1x":
        d["stages"][-1]["optimizer"]["lr"] *= 0.1
        return d
    if name == "split_1_3":
        first, second = d["stages"]
        total = first["epochs"] + second["epochs"]
        first["epochs"] = max(1, round(total / 4))
        second["epochs"] = total - first["epochs"]
        for st in d["stages"]:
            st["schedule"]["warmup_epochs"] = min(st["schedule"]["warmup_epochs"], st["epochs"] / 2)
        return d
    target, key, value = _STAGE_CHANGES[name]
    for st in d["stages"]:
        where = st if target == "stage" else next(t for t in st["losses"] if t["name"] == target)
        where[key] = value
    return d


def _stage(name: str, quant: str, init_from: Optional[str], epochs: int, args, losses) -> Dict[str, Any]:
    if args.regime == "scratch":  # the paper's binary recipe: SGD, warm-up then cosine
        optimizer = {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4}
        warmup = min(args.warmup_epochs, epochs / 2)
    else:
        optimizer = {"name": "adam", "lr": args.lr, "weight_decay": 0.0}
        warmup = min(1.0, epochs / 2)
    return {
        "name": name,
        "kind": "student",
        "quant": quant,
        "init_from": init_from,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "optimizer": optimizer,
        "schedule": {"name": "cosine", "warmup_epochs": warmup},
        "losses": copy.deepcopy(losses),
    }


def base(args, name: str, seed: int, student: bool = True) -> Dict[str, Any]:
    model = {"arch": args.arch, "width_mult": args.width_mult}
    data = {"dataset": args.dataset, "limit_train": args.limit_train, "limit_test": args.limit_test}
    if args.regime == "scratch":  # the teacher learns from every training image; students hold out validation
        data["limit_train"] = args.limit_train if student else None
        if student:
            data["val_size"] = args.val_size
    if args.root:
        data["root"] = args.root
    return {
        "name": name,
        "seed": seed,
        "device": args.device,  # not part of the recipe's fingerprint: a run may resume on another device
        "teacher_forward": args.teacher_forward,  # nor is this (float rounding only)
        "output_dir": args.runs,
        "data": data,
        "teacher": dict(model),
        "student": dict(model),
        "binary": {"weight_scale": "learned", "recu": True},
    }


def teacher_recipe(args) -> Dict[str, Any]:
    d = base(args, "teacher", 0, student=False)
    d["stages"] = [
        {
            "name": "teacher",
            "kind": "teacher",
            "quant": "FP",
            "epochs": args.teacher_epochs,
            "batch_size": args.batch_size,
            "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4},
            "schedule": {"name": "cosine", "warmup_epochs": 1.0},
            "losses": CE,
        }
    ]
    return d


def student_recipe(args, row: str, seed: int, teacher_ckpt: str) -> Dict[str, Any]:
    if row.startswith("itrd-"):  # a variant of the itrd row
        method, name = row.split("-", 1)
        d = student_recipe(args, method, seed, teacher_ckpt)
        d["name"] = f"{method}-{name}_s{seed}"
        return _variant(d, name)
    d = base(args, f"{row}_s{seed}", seed)
    d["teacher"]["checkpoint"] = teacher_ckpt
    start = None if args.regime == "scratch" else "teacher"
    if row in SINGLE_ROWS:
        d["stages"] = [_stage("binary", "W1A1", start, 2 * args.stage_epochs, args, METHODS[SINGLE_ROWS[row]])]
    else:
        d["stages"] = [
            _stage("stage1", "W32A1", start, args.stage_epochs, args, METHODS[row]),
            _stage("stage2", "W1A1", "stage1", args.stage_epochs, args, METHODS[row]),
        ]
    return d


def step_cost(args, rounds: int = 7, warmup: int = 2) -> Dict[str, Any]:
    """Images/s of one W1A1 student optimiser step per method (teacher forward included where the
    loss needs it), all methods interleaved round after round: the side-by-side cost comparison.
    Cached in ``<runs>/step_cost.json`` for the same architecture, batch and input shape."""
    import torch

    from bnn_distill.data import build_datasets
    from bnn_distill.losses import Term
    from bnn_distill.models import create_model
    from bnn_distill.stepcost import TimedStep, interleaved_times  # the step benchmarks/train_cost.py times

    train, _, _ = build_datasets(args.dataset, args.root, False, False, 1, 1)
    shape = tuple(train[0][0].shape)
    key = {"arch": args.arch, "width_mult": args.width_mult, "batch": args.batch_size, "shape": list(shape)}
    cache = Path(args.runs) / "step_cost.json"
    if cache.exists() and not args.remeasure_cost:
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old
    x = torch.randn((args.batch_size,) + shape)
    y = torch.randint(0, 10, (args.batch_size,))
    torch.manual_seed(1)
    teacher = create_model(args.arch, 10, in_chans=shape[0], width_mult=args.width_mult).eval()
    configs = {}
    for row, losses in METHODS.items():
        terms = [
            Term(d["name"], float(d.get("weight", 1.0)), {k: v for k, v in d.items() if k not in ("name", "weight")})
            for d in losses
        ]
        configs[row] = TimedStep(row, "W1A1", terms, True, args.arch, args.width_mult, teacher, x, y)
    times = interleaved_times({row: c.step for row, c in configs.items()}, rounds, warmup)
    med = {row: statistics.median(v) for row, v in times.items()}
    out = {
        "key": key,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "images_per_s": {row: args.batch_size / med[row] for row in med},
        "vs_ce": {row: med[row] / med["ce"] for row in med},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


def kept_dir(args) -> Path:
    """The committed copy of the grid's finished runs: ``<out>_runs/``."""
    return Path(str(args.out) + "_runs")


def _last_checkpoint(recipe) -> Path:
    return RunDir.of(recipe).last(recipe.stages[-1].name)


def _keep(args, recipe, summary: Dict[str, Any]) -> None:
    """Copy a finished run's summary, metrics and final test predictions to :func:`kept_dir`."""
    import torch
    from torch.utils.data import DataLoader

    from bnn_distill.checkpoint import atomic_write_bytes
    from bnn_distill.data import build_splits
    from bnn_distill.evaluate import evaluate
    from bnn_distill.rundir import model_from_checkpoint

    dest = kept_dir(args) / recipe.name
    model, ck = model_from_checkpoint(_last_checkpoint(recipe))
    d = recipe.data
    test = build_splits(d.dataset, d.root, False, False, None, d.limit_test, seed=recipe.seed).test
    ev = evaluate(model, DataLoader(test, batch_size=500), torch.device("cpu"), keep_predictions=True)
    final = summary["stages"][-1]["final"].get("test_top1")
    if final is not None and abs(ev["top1"] - final) > 1e-6:  # the same weights, the same images
        raise UserError(
            f"{recipe.name}: its final checkpoint gives {ev['top1']:.3f}% on the test split, "
            f"its summary says {final:.3f}%"
        )
    kept = {
        "summary": summary,
        "metrics": RunDir.of(recipe).read_metrics(),
        "test_predictions": ev["predictions"].tolist(),
        "test_labels": [int(y) for y in test.targets],
    }
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest / "run.json", (json.dumps(kept) + "\n").encode())
    if recipe.name == "teacher":  # the students' teacher, so that the grid can go on on another machine
        weights = {k: ck[k] for k in ("format", "stage", "model_spec", "model")} | {"kind": "weights"}
        from bnn_distill.checkpoint import atomic_save

        atomic_save(weights, dest / "teacher.pt")


def load_kept(args, name: str) -> Optional[Dict[str, Any]]:
    path = kept_dir(args) / name / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_cached(args, raw: Dict[str, Any], train: bool = True) -> Optional[Dict[str, Any]]:
    """Run a recipe unless it has finished (a kept copy, or a finished run folder); resume an
    unfinished one. ``train=False``: only read a finished run (None if there is none). A run whose
    folder another process is writing (``--parallel``'s other workers) is skipped: None. Returns
    the run's summary, with ``_metrics`` and ``_predictions`` from the kept copy."""
    from bnn_distill.runlock import hold

    recipe = recipe_from_dict(raw)
    kept = load_kept(args, recipe.name)
    if kept is None:
        run = RunDir.of(recipe)
        if not train and not run.summary_file.exists():
            return None
        try:
            with hold(recipe.run_dir, "run folder", "itrd_grid"):  # one writer per run (workers share the grid)
                kept = load_kept(args, recipe.name)  # a worker may have finished it meanwhile
                if kept is None:
                    _train_and_keep(args, recipe, run)
                    kept = load_kept(args, recipe.name)
        except FolderInUse:
            if args.parallel_worker:
                log.info("%s: another worker has it, skipped", recipe.name)
                return None
            raise
        assert kept is not None
    elif kept["summary"].get("fingerprint") != recipe.fingerprint():
        raise UserError(
            f"{kept_dir(args) / recipe.name} holds a run of another recipe than this grid's "
            f"'{recipe.name}'; give another --out, or delete that folder to train it again"
        )
    else:
        log.info("%s: kept in %s, skipped", recipe.name, kept_dir(args))
    return _kept_result(kept)


def _train_and_keep(args, recipe, run: RunDir) -> None:
    if run.summary_file.exists():
        log.info("%s: finished earlier, skipped", recipe.name)
        summary = json.loads(run.summary_file.read_text())
    else:
        resume = run.recipe_file.exists()
        log.info("%s: %s", recipe.name, "resuming" if resume else "training")
        summary = run_recipe(recipe, resume=resume, progress=sys.stderr.isatty())
    _keep(args, recipe, json.loads(json.dumps(summary)))


def _worker_argv(argv: List[str]) -> List[str]:
    """This grid's command line for a ``--parallel`` worker: the same, without ``--parallel N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--parallel":
            skip = True
        elif not a.startswith("--parallel="):
            out.append(a)
    return out + ["--parallel-worker"]


def run_workers(args, argv: List[str], on_tick: Optional[Callable[[], None]] = None, tick_s: float = 60.0) -> int:
    """``--parallel N``: N worker processes of this script share the student runs (each takes the next
    run nobody holds), with the CPU threads split between them; returns the number that failed.
    SIGTERM / SIGINT reaching this process are passed on as SIGTERM, so every worker saves its progress
    (a second SIGTERM is harmless; a second SIGINT would abort a worker at once). ``on_tick()`` is
    called every ``tick_s`` seconds while they run (the report of what has finished so far)."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // args.parallel)))
    cmd = [sys.executable, str(Path(__file__).resolve())] + _worker_argv(argv)
    log.info("%d workers, %s CPU thread(s) each", args.parallel, env["OMP_NUM_THREADS"])
    procs = [subprocess.Popen(cmd, env=env) for _ in range(args.parallel)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    next_tick = time.monotonic() + tick_s
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            if on_tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick_s
                on_tick()
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return sum(c != 0 for c in codes)


def _kept_result(kept: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        kept["summary"], _metrics=kept["metrics"], _predictions=kept["test_predictions"], _labels=kept["test_labels"]
    )


def finished_runs(args, rows: List[str], ckpt: str) -> Dict[str, List[Dict[str, Any]]]:
    """The student runs of this grid kept so far, by row: reads the kept copies only (no run folder,
    no lock, so it can run while ``--parallel``'s workers write theirs)."""
    out: Dict[str, List[Dict[str, Any]]] = {row: [] for row in rows}
    for s in args.seeds:
        for row in rows:
            recipe = recipe_from_dict(student_recipe(args, row, s, ckpt))
            kept = load_kept(args, recipe.name)
            if kept is not None and kept["summary"].get("fingerprint") == recipe.fingerprint():
                out[row].append(dict(_kept_result(kept), _seed=s))
    return out


def _mean_std(xs: List[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:  # no spread to show from one seed
        return f"{xs[0]:.2f} (1 seed)"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _vs_itrd(row: Dict[str, Any], ref: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """(row - itrd) over the seeds both have finished: a paired difference, not a difference of means.

    Returns the mean difference, on how many shared seeds the row was above itrd, and how many seeds
    were shared; None when no seed is shared."""
    if ref is None:
        return None
    theirs = dict(zip(ref["seeds"], ref["top1"]))
    diffs = [a - theirs[s] for s, a in zip(row["seeds"], row["top1"]) if s in theirs]
    if not diffs:
        return None
    return {"mean": statistics.mean(diffs), "above": sum(d > 0 for d in diffs), "n": len(diffs)}


def _vs_cell(vs: Optional[Dict[str, Any]]) -> str:
    if vs is None:
        return "-"
    return f"{vs['mean']:+.2f} (above on {vs['above']}/{vs['n']})"


def _train_s(summary: Dict[str, Any]) -> float:
    """Training time of a run: its stages' times, which add up across interruptions and resumes."""
    return round(sum(st["wall_s"] for st in summary["stages"]), 1)


def _mcnemar_vs_itrd(row: List[Dict[str, Any]], ref: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per seed both rows finished: images only the row's student gets right (``b``), only itrd's
    (``c``), the difference in points and McNemar's exact two-sided p (same test images)."""
    theirs = {r["_seed"]: r for r in ref}
    out = []
    for r in row:
        other = theirs.get(r["_seed"])
        if other is None:
            continue
        y = r["_labels"]
        mine = [p == t for p, t in zip(r["_predictions"], y)]
        their = [p == t for p, t in zip(other["_predictions"], y)]
        b = sum(m and not t for m, t in zip(mine, their))
        c = sum(t and not m for m, t in zip(mine, their))
        out.append(
            {
                "seed": r["_seed"],
                "only_row": b,
                "only_itrd": c,
                "diff_points": 100.0 * (b - c) / len(y),
                "p": mcnemar_p(b, c),
            }
        )
    return out


def _mcnemar_cell(tests: List[Dict[str, Any]]) -> str:
    return "; ".join(f"s{t['seed']} {t['diff_points']:+.2f} p={t['p']:.2g}" for t in tests) or "-"


def _paired(rows: Dict[str, Any], a: str, b: str) -> List[Dict[str, Any]]:
    """(seed, row a's top-1 minus row b's) for every seed both rows have finished."""
    if a not in rows or b not in rows:
        return []
    tb = dict(zip(rows[b]["seeds"], rows[b]["top1"]))
    return [{"seed": sd, "diff": round(x - tb[sd], 2)} for sd, x in zip(rows[a]["seeds"], rows[a]["top1"]) if sd in tb]


def targets(rows: Dict[str, Any], teacher_top1: float, seeds_wanted: int) -> List[Dict[str, Any]]:
    """Issue 13's three accuracy targets, computed from the finished runs: each with its evidence and
    ``met`` True / False, or None while fewer than ``seeds_wanted`` paired seeds are in."""
    out = []

    def above_all(pairs):
        if not pairs:
            return None
        if any(p["diff"] <= 0 for p in pairs):
            return False  # one seed against it decides "on every seed"
        return True if len(pairs) >= seeds_wanted else None

    kd = {r: _paired(rows, r, "kd") for r in ("itrd", "itrd_kd") if r in rows}
    verdicts = [above_all(p) for p in kd.values()]
    met = True if True in verdicts else (False if verdicts and all(v is False for v in verdicts) else None)
    out.append(
        {
            "target": f"itrd or itrd_kd above kd on {seeds_wanted}/{seeds_wanted} seeds",
            "met": met,
            "evidence": {r: p for r, p in kd.items()},
        }
    )
    stage = {a: _paired(rows, a, f"{a}_single") for a in ("itrd", "itrd_kd") if f"{a}_single" in rows}
    verdicts = [above_all(p) for p in stage.values()]
    met = None
    if verdicts:
        met = False if False in verdicts else (True if all(v is True for v in verdicts) else None)
    out.append(
        {
            "target": "two stages above one stage at the same budget, every seed",
            "met": met,
            "evidence": {f"{a} - {a}_single": p for a, p in stage.items()},
        }
    )
    done = {r: v for r, v in rows.items() if v["top1"]}
    if done:
        best = max(done, key=lambda r: done[r]["mean"])
        gap = teacher_top1 - done[best]["mean"]
        n = len(done[best]["top1"])
        out.append(
            {
                "target": "the best binary student within 0.5 points of the teacher",
                "met": (gap <= 0.5) if n >= seeds_wanted else None,
                "evidence": {"best": best, "mean": round(done[best]["mean"], 2), "gap": round(gap, 2), "seeds": n},
            }
        )
    return out


def _targets_lines(ts: List[Dict[str, Any]]) -> List[str]:
    word = {True: "**met**", False: "**not met**", None: "not decided yet"}
    lines = ["", "Targets (issue 13), computed from the finished runs:", ""]
    for t in ts:
        ev = t["evidence"]
        if "best" in ev:
            detail = (
                f"best {ev['best']}, {ev['mean']:.2f}% over {ev['seeds']} seed(s), {ev['gap']:.2f} below the teacher"
            )
        else:
            detail = (
                "; ".join(
                    f"{name}: " + (", ".join(f"s{p['seed']} {p['diff']:+.2f}" for p in pairs) or "no paired seed yet")
                    for name, pairs in ev.items()
                )
                or "rows not in this grid"
            )
        lines.append(f"- {t['target']}: {word[t['met']]} ({detail})")
    return lines


def report(
    args,
    teacher: Dict[str, Any],
    results: Dict[str, List[Dict[str, Any]]],
    quiet: bool = False,
    cost: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    t_acc = teacher["teacher"]["test_top1"]
    rows = {}
    for row, runs in results.items():
        finals = [r["stages"][-1]["final"]["test_top1"] for r in runs]
        best = [r["stages"][-1].get("best_test_top1") for r in runs]
        best = [b for b in best if b is not None and b == b]  # nan: no validation split
        rows[row] = {
            "top1": finals,
            "seeds": [r.get("_seed") for r in runs],
            "mean": statistics.mean(finals) if finals else None,
            "std": statistics.stdev(finals) if len(finals) > 1 else None,
            "best_on_val_top1": best,
            "val_top1": [r["stages"][-1]["final"].get("val_top1") for r in runs],
            "gap_to_teacher": (t_acc - statistics.mean(finals)) if finals else None,
            "wall_s": [_train_s(r) for r in runs],
            "images_per_s": [statistics.mean(s["images_per_s"] for s in r["stages"]) for r in runs],
        }
    for row, r in rows.items():
        r["vs_itrd_same_seeds"] = None if row == "itrd" else _vs_itrd(r, rows.get("itrd"))
        r["mcnemar_vs_itrd"] = [] if row == "itrd" else _mcnemar_vs_itrd(results[row], results.get("itrd", []))
    out = {
        "args": vars(args),
        "regime": args.regime,
        "teacher_top1": t_acc,
        "teacher_wall_s": _train_s(teacher),
        "rows": rows,
        "machine": teacher["machine"],
        "step_cost": cost,
    }
    if args.regime == "scratch":
        out["targets"] = targets(rows, t_acc, len(args.seeds))
    start = "random initialisation" if args.regime == "scratch" else "the teacher's weights"
    lines = [
        f"Binary {args.arch} x{args.width_mult} students on {args.dataset}, from {start}; teacher top-1 "
        f"{t_acc:.2f}%; {args.stage_epochs}+{args.stage_epochs} student epochs (single stage: "
        f"{2 * args.stage_epochs}); seeds {args.seeds}; {out['machine'].get('cpu')}",
        "",
        "| method | seeds done | test top-1, final (mean ± std) | test top-1, best on val | gap to teacher "
        "| train s / run | step images/s side by side | step time vs CE | vs itrd, same seeds "
        "| McNemar vs itrd per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row, r in rows.items():
        gap = "-" if r["gap_to_teacher"] is None else f"{r['gap_to_teacher']:.2f}"
        wall = f"{statistics.mean(r['wall_s']):.0f}" if r["wall_s"] else "-"
        # a single-stage row takes its method's step; the itrd- variants itrd's, except batch_256 (another batch)
        crow = SINGLE_ROWS.get(row) or ("itrd" if row.startswith("itrd-") and row != "itrd-batch_256" else row)
        side = ratio = "-"
        if cost and crow in cost["images_per_s"]:
            side, ratio = f"{cost['images_per_s'][crow]:.0f}", f"{cost['vs_ce'][crow]:.3f}"
        lines.append(
            f"| {row} | {len(r['top1'])} | {_mean_std(r['top1'])} | {_mean_std(r['best_on_val_top1'])} "
            f"| {gap} | {wall} | {side} | {ratio} | {_vs_cell(r['vs_itrd_same_seeds'])} "
            f"| {_mcnemar_cell(r['mcnemar_vs_itrd'])} |"
        )
    lines += [
        "",
        "Final: the last epoch's weights (no selection). Best on val: the weights best on the held-out "
        "validation split (best.pt), then read once on the test split; '-' where there is no validation "
        "split. Step images/s side by side: one W1A1 student optimiser step per method, teacher "
        "forward included where the loss needs it, all methods interleaved"
        + (
            f" ({cost['rounds']} rounds, batch {cost['key']['batch']}, {cost['threads']} threads, medians)"
            if cost
            else ""
        )
        + "; a single-stage row (NAME_single) has its method's step, the itrd- variants itrd's (batch_256: "
        "not measured). vs itrd, same "
        "seeds: mean over the seeds both rows have finished of (row top-1 - itrd top-1), in points, and on how many of "
        "those seeds the row was above itrd. McNemar: per seed, (row - itrd) in points over the same test "
        "images and the exact two-sided p.",
    ]
    if "targets" in out:
        lines += _targets_lines(out["targets"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(args, out, results, path.with_suffix(".png"))
    if not quiet:
        print("\n".join(lines))
    return out


def _plot(args, out: Dict[str, Any], results: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    """Left: final test top-1 per method on an axis from 0 (dots: seeds). Middle: the paired
    difference to ``ce`` per seed in points, so small differences show with their spread instead
    of being blown up by a cut axis. Right: validation (else test) top-1 per epoch, stage 2's start
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_diff, ax_curve) = plt.subplots(1, 3, figsize=(17, 4.8))
    names = [r for r in out["rows"] if out["rows"][r].get("top1")]  # rows, then variants
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 rows
    ref = dict(zip(out["rows"].get("ce", {}).get("seeds", []), out["rows"].get("ce", {}).get("top1", [])))
    stage2_at = None
    for i, row in enumerate(names):
        vals = out["rows"][row]["top1"]
        colour = palette[(2 * i) % 20 + (2 * i) // 20 % 2]  # the strong shades first, then the light ones
        ax_bar.bar(i, statistics.mean(vals), color=colour, alpha=0.8)
        ax_bar.plot([i] * len(vals), vals, "k.", ms=6)
        diffs = [v - ref[s] for s, v in zip(out["rows"][row]["seeds"], vals) if s in ref]
        if diffs and row != "ce":
            ax_diff.plot([i] * len(diffs), diffs, "o", color=colour, ms=6)
            ax_diff.hlines(statistics.mean(diffs), i - 0.3, i + 0.3, color=colour, lw=2)
        for k, run in enumerate(results.get(row, [])):
            metrics = run.get("_metrics") or RunDir(Path(args.runs) / f"{row}_s{run['_seed']}").read_metrics()
            key = "val_top1" if any("val_top1" in m for m in metrics) else "test_top1"
            ys = [m[key] for m in metrics if key in m]
            ax_curve.plot(range(1, len(ys) + 1), ys, color=colour, alpha=0.8, label=row if k == 0 else None)
            stages = [m["stage"] for m in metrics]
            if "stage2" in stages and stage2_at is None:
                stage2_at = stages.index("stage2") + 0.5
    ax_bar.axhline(out["teacher_top1"], color="grey", ls="--", label=f"FP teacher {out['teacher_top1']:.2f}")
    ax_bar.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax_bar.set(ylabel="final test top-1 (%)", title="binary student by method (dots: seeds)", ylim=(0, 100))
    ax_bar.legend(loc="lower right")
    ax_diff.axhline(0.0, color="k", lw=0.8)
    ax_diff.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    lim = max([1.0] + [abs(v) for line in ax_diff.get_lines() for v in line.get_ydata()])
    ax_diff.set(
        ylabel="test top-1 minus ce, same seed (points)",
        title="paired difference to ce (bar: mean)",
        ylim=(-1.15 * lim, 1.15 * lim),
    )
    if stage2_at is not None:
        ax_curve.axvline(stage2_at, color="grey", ls=":", label="stage 2 starts")
    key = "validation" if args.regime == "scratch" else "test"
    ax_curve.set(
        xlabel="student epoch (all stages)", ylabel=f"{key} top-1 (%)", title=f"{key} accuracy during training"
    )
    ax_curve.legend(fontsize=8)
    for ax in (ax_bar, ax_diff, ax_curve):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--root", default=None)
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--stage-epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument(
        "--regime",
        choices=("teacher_init", "scratch"),
        default="teacher_init",
        help="students from the teacher's weights (Adam) or from random initialisation (SGD, the paper's)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="student learning rate (default: Adam 2e-3 for teacher_init, SGD 0.1 for scratch)",
    )
    ap.add_argument("--warmup-epochs", type=float, default=1.0, help="scratch: linear warm-up before the cosine")
    ap.add_argument(
        "--val-size",
        type=int,
        default=5000,
        help="scratch: validation images held out of the students' training split (balanced)",
    )
    ap.add_argument(
        "--limit-train",
        type=int,
        default=None,
        help="balanced training subset (scratch: of the students' split; the teacher uses all of it)",
    )
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[],
        choices=sorted(VARIANTS),
        metavar="NAME",
        help="also run single-change variants of the itrd row: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()),
    )
    ap.add_argument("--runs", default="runs/grid", help="folder of the grid's run folders (the cache)")
    ap.add_argument("--out", default="benchmarks/results/itrd_grid")
    ap.add_argument("--remeasure-cost", action="store_true", help="measure the side-by-side step cost again")
    ap.add_argument("--no-cost", action="store_true", help="skip the side-by-side step-cost measurement")
    ap.add_argument("--device", default="auto", help="the runs' device: auto (cuda when present), cpu, cuda, cuda:N")
    ap.add_argument(
        "--teacher-forward",
        default="eager",
        choices=list(TEACHER_FORMS),
        help="the frozen teacher's forward in student runs (the recipe's teacher_forward). Default eager: the "
        "committed grids trained that way, so their remaining runs keep to it",
    )
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="student runs at once, each in its own process (OMP_NUM_THREADS, or the cores, split between them); "
        "the report of the finished runs is refreshed every minute while they train",
    )
    ap.add_argument("--parallel-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the runs that have finished (e.g. while the grid runs elsewhere)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.parallel < 1:
        ap.error(f"--parallel {args.parallel}: give 1 or more")
    if args.lr is None:
        args.lr = 0.1 if args.regime == "scratch" else 2e-3
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        teacher = run_cached(args, teacher_recipe(args), train=not args.report_only)
        if teacher is None:
            raise UserError(f"--report-only: the teacher in {args.runs} has not finished")
        ckpt = str(kept_dir(args) / "teacher" / "teacher.pt")
        # Seed-major order: a grid stopped part-way still has every row for the first seed(s),
        # and the report is rewritten after every finished run so partial progress is visible.
        failed = 0
        train = not args.report_only
        rows = list(args.rows) + [f"itrd-{v}" for v in args.variants]
        if args.parallel > 1 and train:  # the workers train; this process reports what they finished
            reported: List[Any] = [None]

            def progress_report() -> None:
                try:
                    done = finished_runs(args, rows, ckpt)
                    key = sorted((row, r["_seed"]) for row, rs in done.items() for r in rs)
                    if key != reported[0]:
                        reported[0] = key
                        if key:
                            report(args, teacher, done, quiet=True, cost=None)
                        total = len(rows) * len(args.seeds)
                        where = f"; report refreshed in {args.out}.md" if key else ""
                        log.info("%d of %d student runs finished%s", len(key), total, where)
                except Exception as exc:  # noqa: BLE001 - a progress report must never stop the workers
                    log.warning("progress report skipped (%s: %s)", type(exc).__name__, exc)

            failed = run_workers(args, argv, on_tick=progress_report, tick_s=PROGRESS_S)
            train = False
        cost = None if args.no_cost or args.parallel_worker else step_cost(args)
        results: Dict[str, List[Dict[str, Any]]] = {row: [] for row in rows}
        for s in args.seeds:
            for row in rows:
                r = run_cached(args, student_recipe(args, row, s, ckpt), train=train)
                if r is None:  # not finished (yet), or another worker's
                    continue
                results[row].append(dict(r, _seed=s))
                if not args.parallel_worker:
                    report(args, teacher, results, quiet=True, cost=cost)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.parallel_worker:
        return 0
    report(args, teacher, results, cost=cost)
    if failed:
        print(f"error: {failed} of {args.parallel} workers stopped early; the same command resumes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
