"""The evidence grid: what ITRD and the two-stage recipe buy a binary student, on real data.

Trains one FP teacher, then binary students of the same family from it, one row per method:

* ``ce``          two stages (W32A1 then W1A1), cross-entropy only
* ``kd``          two stages, CE + Hinton KD (T=4)
* ``itrd_corr``   two stages, CE + 2.0 L_corr
* ``itrd``        two stages, CE + 2.0 L_corr + 1.0 L_gram (the paper's loss)
* ``itrd_single`` one W1A1 stage of the same total epochs, CE + 2.0 L_corr + 1.0 L_gram

Every student starts from the teacher's weights (``init_from: teacher``) so the rows differ only
by method. Every run is an ordinary bnn-distill run folder under ``--runs``: a finished run is
skipped, an unfinished one resumes, so the grid can be completed across several sittings.
Writes ``<out>.json`` (every number), ``<out>.md`` (mean ± std over seeds) and ``<out>.png``.

    python benchmarks/itrd_grid.py --dataset fashion_mnist --seeds 0 1 \\
        --teacher-epochs 10 --stage-epochs 5 --out benchmarks/results/itrd_grid
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from bnn_distill.errors import UserError
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import SUMMARY_FILE, read_metrics, run_recipe

log = logging.getLogger("itrd_grid")

CE = [{"name": "ce"}]
METHODS: Dict[str, List[Dict[str, Any]]] = {
    "ce": CE,
    "kd": CE + [{"name": "kd", "weight": 1.0, "temperature": 4.0}],
    "itrd_corr": CE + [{"name": "itrd_corr", "weight": 2.0, "alpha": 1.01}],
    "itrd": CE + [{"name": "itrd_corr", "weight": 2.0, "alpha": 1.01}, {"name": "itrd_mi", "weight": 1.0}],
}
SINGLE = "itrd_single"
ROWS = list(METHODS) + [SINGLE]

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
}


#: What each variant changes in every student stage: (loss term or "stage", key, value).
_STAGE_CHANGES: Dict[str, tuple] = {
    "alpha_1.5": ("itrd_corr", "alpha", 1.5), "alpha_2": ("itrd_corr", "alpha", 2.0),
    "eps_0": ("itrd_corr", "eps", 0.0), "corr_w1": ("itrd_corr", "weight", 1.0),
    "mi_w0.5": ("itrd_mi", "weight", 0.5), "mi_w2": ("itrd_mi", "weight", 2.0),
    "batch_256": ("stage", "batch_size", 256),
}


def _variant(d: Dict[str, Any], name: str) -> Dict[str, Any]:
    """Apply one named change to an ``itrd`` student recipe dict."""
    if name == "feat_flatten":
        d["student"]["feature_layer"] = d["teacher"]["feature_layer"] = "flatten"
        return d
    target, key, value = _STAGE_CHANGES[name]
    for st in d["stages"]:
        where = st if target == "stage" else next(t for t in st["losses"] if t["name"] == target)
        where[key] = value
    return d


def _stage(name: str, quant: str, init_from: str, epochs: int, args, losses) -> Dict[str, Any]:
    return {"name": name, "kind": "student", "quant": quant, "init_from": init_from, "epochs": epochs,
            "batch_size": args.batch_size, "optimizer": {"name": "adam", "lr": args.lr, "weight_decay": 0.0},
            "schedule": {"name": "cosine", "warmup_epochs": min(1.0, epochs / 2)}, "losses": copy.deepcopy(losses)}


def base(args, name: str, seed: int) -> Dict[str, Any]:
    model = {"arch": args.arch, "width_mult": args.width_mult}
    data = {"dataset": args.dataset, "limit_train": args.limit_train, "limit_test": args.limit_test}
    if args.root:
        data["root"] = args.root
    return {"name": name, "seed": seed, "output_dir": args.runs, "data": data,
            "teacher": dict(model), "student": dict(model), "binary": {"weight_scale": "learned", "recu": True}}


def teacher_recipe(args) -> Dict[str, Any]:
    d = base(args, "teacher", 0)
    d["stages"] = [{"name": "teacher", "kind": "teacher", "quant": "FP", "epochs": args.teacher_epochs,
                    "batch_size": args.batch_size, "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4},
                    "schedule": {"name": "cosine", "warmup_epochs": 1.0}, "losses": CE}]
    return d


def student_recipe(args, row: str, seed: int, teacher_ckpt: str) -> Dict[str, Any]:
    if row.startswith("itrd-"):  # a variant of the itrd row
        method, name = row.split("-", 1)
        d = student_recipe(args, method, seed, teacher_ckpt)
        d["name"] = f"{method}-{name}_s{seed}"
        return _variant(d, name)
    d = base(args, f"{row}_s{seed}", seed)
    d["teacher"]["checkpoint"] = teacher_ckpt
    if row == SINGLE:
        d["stages"] = [_stage("binary", "W1A1", "teacher", 2 * args.stage_epochs, args, METHODS["itrd"])]
    else:
        d["stages"] = [_stage("stage1", "W32A1", "teacher", args.stage_epochs, args, METHODS[row]),
                       _stage("stage2", "W1A1", "stage1", args.stage_epochs, args, METHODS[row])]
    return d


def step_cost(args, rounds: int = 7, warmup: int = 2) -> Dict[str, Any]:
    """Images/s of one W1A1 student optimiser step per method (teacher forward included where the
    loss needs it), all methods interleaved round after round: the side-by-side cost comparison.
    Cached in ``<runs>/step_cost.json`` for the same architecture, batch and input shape."""
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_cost import Config  # noqa: E402 - the step definition of benchmarks/train_cost.py

    from bnn_distill.data import build_datasets
    from bnn_distill.losses import Term
    from bnn_distill.models import create_model

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
    cfg_args = argparse.Namespace(arch=args.arch, width_mult=args.width_mult)
    configs = {}
    for row, losses in METHODS.items():
        terms = [Term(d["name"], float(d.get("weight", 1.0)), {k: v for k, v in d.items() if k not in ("name", "weight")})
                 for d in losses]
        configs[row] = Config(row, "W1A1", terms, True, cfg_args, teacher, x, y)
    times: Dict[str, List[float]] = {row: [] for row in configs}
    for c in configs.values():
        for _ in range(warmup):
            c.step()
    for r in range(rounds):
        order = list(configs)[r % len(configs):] + list(configs)[:r % len(configs)]
        for row in order:
            t0 = time.perf_counter()
            configs[row].step()
            times[row].append(time.perf_counter() - t0)
    med = {row: statistics.median(v) for row, v in times.items()}
    out = {"key": key, "rounds": rounds, "threads": torch.get_num_threads(),
           "images_per_s": {row: args.batch_size / med[row] for row in med},
           "vs_ce": {row: med[row] / med["ce"] for row in med}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


def run_cached(raw: Dict[str, Any], train: bool = True) -> Optional[Dict[str, Any]]:
    """Run a recipe unless its run folder already holds a finished run; resume an unfinished one.
    ``train=False``: only read a finished run (None if there is none)."""
    recipe = recipe_from_dict(raw)
    done = recipe.run_dir / SUMMARY_FILE
    if done.exists():
        log.info("%s: finished earlier, skipped", recipe.name)
        return json.loads(done.read_text())
    if not train:
        return None
    resume = (recipe.run_dir / "recipe.yaml").exists()
    log.info("%s: %s", recipe.name, "resuming" if resume else "training")
    return run_recipe(recipe, resume=resume, progress=sys.stderr.isatty())


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


def report(args, teacher: Dict[str, Any], results: Dict[str, List[Dict[str, Any]]],
           quiet: bool = False, cost: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    t_acc = teacher["teacher"]["test_top1"]
    rows = {}
    for row, runs in results.items():
        finals = [r["stages"][-1]["final"]["test_top1"] for r in runs]
        rows[row] = {"top1": finals, "seeds": [r.get("_seed") for r in runs],
                     "mean": statistics.mean(finals) if finals else None,
                     "std": statistics.stdev(finals) if len(finals) > 1 else None,
                     "gap_to_teacher": (t_acc - statistics.mean(finals)) if finals else None,
                     "wall_s": [_train_s(r) for r in runs],
                     "images_per_s": [statistics.mean(s["images_per_s"] for s in r["stages"]) for r in runs]}
    for row, r in rows.items():
        r["vs_itrd_same_seeds"] = None if row == "itrd" else _vs_itrd(r, rows.get("itrd"))
    out = {"args": vars(args), "teacher_top1": t_acc, "teacher_wall_s": _train_s(teacher), "rows": rows,
           "machine": teacher["machine"], "step_cost": cost}
    lines = [f"Binary {args.arch} x{args.width_mult} students on {args.dataset}; teacher top-1 {t_acc:.2f}%; "
             f"{args.stage_epochs}+{args.stage_epochs} student epochs (single stage: {2 * args.stage_epochs}); "
             f"seeds {args.seeds}; {out['machine'].get('cpu')}", "",
             "| method | seeds done | test top-1 (mean ± std) | gap to teacher | train s / run | train images/s (runs) "
             "| step images/s side by side | step time vs CE | vs itrd, same seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, r in rows.items():
        gap = "-" if r["gap_to_teacher"] is None else f"{r['gap_to_teacher']:.2f}"
        wall = f"{statistics.mean(r['wall_s']):.0f}" if r["wall_s"] else "-"
        ips = f"{statistics.mean(r['images_per_s']):.0f}" if r["images_per_s"] else "-"
        # itrd_single and the itrd- variants take itrd's step, except batch_256 (a different batch than measured)
        crow = "itrd" if row == SINGLE or (row.startswith("itrd-") and row != "itrd-batch_256") else row
        side = ratio = "-"
        vs = _vs_cell(r["vs_itrd_same_seeds"])
        if cost and crow in cost["images_per_s"]:
            side, ratio = f"{cost['images_per_s'][crow]:.0f}", f"{cost['vs_ce'][crow]:.3f}"
        lines.append(f"| {row} | {len(r['top1'])} | {_mean_std(r['top1'])} | {gap} | {wall} | {ips} | {side} | {ratio} | {vs} |")
    lines += ["", "Train images/s (runs): mean over each run's stages, from separate runs (machine load differs "
              "between them). Step images/s side by side: one W1A1 student optimiser step per method, teacher "
              "forward included where the loss needs it, all methods interleaved"
              + (f" ({cost['rounds']} rounds, batch {cost['key']['batch']}, {cost['threads']} threads, medians)" if cost else "")
              + "; itrd_single and the itrd- variants have itrd's step (batch_256: not measured). vs itrd, same seeds: mean "
              "over the seeds both rows have finished of (row top-1 - itrd top-1), in points, and on how many of "
              "those seeds the row was above itrd."]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(args, out, path.with_suffix(".png"))
    if not quiet:
        print("\n".join(lines))
    return out


def _plot(args, out: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r for r in out["rows"] if out["rows"][r].get("top1")]  # rows, then variants
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 rows
    for i, row in enumerate(names):
        vals = out["rows"][row]["top1"]
        colour = palette[(2 * i) % 20 + (2 * i) // 20 % 2]  # the strong shades first, then the light ones
        ax_bar.bar(i, statistics.mean(vals), color=colour, alpha=0.8)
        ax_bar.plot([i] * len(vals), vals, "k.", ms=8)
        for k, seed in enumerate(out["rows"][row]["seeds"]):  # finished runs only
            metrics = read_metrics(Path(args.runs) / f"{row}_s{seed}")
            ys = [m["test_top1"] for m in metrics if "test_top1" in m]
            ax_curve.plot(range(1, len(ys) + 1), ys, color=colour, alpha=0.8, label=row if k == 0 else None)
    ax_bar.axhline(out["teacher_top1"], color="grey", ls="--", label="FP teacher")
    ax_bar.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax_bar.set(ylabel="final test top-1 (%)", title="binary student by method (dots: seeds)")
    if names:
        values = [v for r in names for v in out["rows"][r]["top1"]] + [out["teacher_top1"]]
        ax_bar.set_ylim(max(0.0, min(values) - 3), min(100.0, max(values) + 2))
    ax_bar.legend()
    ax_curve.set(xlabel="student epoch (all stages)", ylabel="test top-1 (%)", title="test accuracy during training")
    ax_curve.legend(fontsize=8)
    for ax in (ax_bar, ax_curve):
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
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the student stages")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS), metavar="NAME",
                    help="also run single-change variants of the itrd row: " +
                         "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    ap.add_argument("--runs", default="runs/grid", help="folder of the grid's run folders (the cache)")
    ap.add_argument("--out", default="benchmarks/results/itrd_grid")
    ap.add_argument("--remeasure-cost", action="store_true", help="measure the side-by-side step cost again")
    ap.add_argument("--no-cost", action="store_true", help="skip the side-by-side step-cost measurement")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the runs that have finished (e.g. while the grid runs elsewhere)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        teacher = run_cached(teacher_recipe(args), train=not args.report_only)
        if teacher is None:
            raise UserError(f"--report-only: the teacher in {args.runs} has not finished")
        ckpt = str(Path(args.runs) / "teacher" / "checkpoints" / "teacher" / "last.pt")
        # Seed-major order: a grid stopped part-way still has every row for the first seed(s),
        # and the report is rewritten after every finished run so partial progress is visible.
        cost = None if args.no_cost else step_cost(args)
        rows = list(args.rows) + [f"itrd-{v}" for v in args.variants]
        results: Dict[str, List[Dict[str, Any]]] = {row: [] for row in rows}
        for s in args.seeds:
            for row in rows:
                r = run_cached(student_recipe(args, row, s, ckpt), train=not args.report_only)
                if r is None:  # --report-only: not finished yet
                    continue
                results[row].append(dict(r, _seed=s))
                report(args, teacher, results, quiet=True, cost=cost)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    report(args, teacher, results, cost=cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
