"""What happens to a two-stage run when stage 2 starts, measured on the validation split.

A two-stage student (W32A1, then W1A1 initialised from it) loses accuracy in the first epoch of
stage 2 (`benchmarks/results/itrd_grid_scratch.png`). This finds out where the loss comes from.
For each finished two-stage run folder given, the validation top-1 of:

* ``stage1_final``: stage 1's last W32A1 weights;
* ``binarised``: the W1A1 network initialised from them exactly as stage 2 is (``init_from_state``:
  the learned scales start at mean |w| per output channel, ReCU's tau at ``binary.tau_start``),
  before any step;
* ``binarised_bn``: the same after BatchNorm's statistics are re-estimated on ``--bn-batches``
  training batches (forward passes only: no weight changes);
* ``stage2_epoch1`` and ``stage2_final``: what training made of it, from the run's metrics.

If ``binarised`` is close to ``stage1_final``, the dip is the restarted learning rate's doing; if it
is far below and ``binarised_bn`` recovers it, binarising shifted the activations' statistics. The
test split is not read. Usage:

    python benchmarks/stage_switch.py runs/grid_scratch/{ce,kd,itrd,itrd_kd}_s0 \\
        --out benchmarks/results/stage_switch
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from bnn_distill.errors import UserError
from bnn_distill.evaluate import evaluate
from bnn_distill.models import create_model
from bnn_distill.quant import set_tau
from bnn_distill.recipe import load_recipe
from bnn_distill.rundir import RunDir, model_from_checkpoint
from bnn_distill.train import recipe_splits
from bnn_distill.trainer import init_from_state


def reestimate_bn(model: nn.Module, loader: DataLoader, batches: int) -> None:
    """BatchNorm running statistics recomputed as the plain average over ``batches`` batches (no
    gradient, no weight change); the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def switch(run_path: Path, bn_batches: int, batch_size: int) -> Dict[str, Any]:
    """The measurements above for one finished two-stage run folder."""
    if not (run_path / "recipe.yaml").exists():
        raise UserError(f"{run_path}: no recipe.yaml; give a bnn-distill run folder")
    recipe = load_recipe(run_path / "recipe.yaml")
    by_name = {st.name: st for st in recipe.stages}
    pairs = [
        (by_name[st.init_from], st)
        for st in recipe.stages
        if st.quant == "W1A1" and st.init_from in by_name and by_name[st.init_from].quant == "W32A1"
    ]
    if not pairs:
        raise UserError(f"{run_path}: no W1A1 stage initialised from a W32A1 stage (a two-stage run) in its recipe")
    run = RunDir(run_path)
    s1, s2 = pairs[-1]
    for st in (s1, s2):
        if not run.last(st.name).exists():
            raise UserError(f"{run_path}: stage '{st.name}' has no checkpoint; finish the run first")
    torch.manual_seed(recipe.seed)
    splits = recipe_splits(recipe, download=False)
    if splits.val is None:
        raise UserError(f"{run_path}: the recipe holds out no validation split; this measures on one only")
    val = DataLoader(splits.val, batch_size=500)
    cpu = torch.device("cpu")

    def top1(model: nn.Module) -> float:
        return float(evaluate(model, val, cpu)["top1"])

    w32, ck1 = model_from_checkpoint(run.last(s1.name))
    _, ck2 = model_from_checkpoint(run.last(s2.name))
    out: Dict[str, Any] = {"run": recipe.name, "stage1_final": top1(w32)}

    def binarised() -> nn.Module:
        model = create_model(**ck2["model_spec"])
        init_from_state(model, ck1["model"], f"stage '{s1.name}' weights")
        if recipe.binary.recu:
            set_tau(model, recipe.binary.tau_start)
        return model

    out["binarised"] = top1(binarised())
    model = binarised()
    g = torch.Generator().manual_seed(recipe.seed)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=g)
    reestimate_bn(model, train, bn_batches)
    out["binarised_bn"] = top1(model)
    metrics = [m for m in run.read_metrics() if m.get("stage") == s2.name and "val_top1" in m]
    out["stage2_epoch1"] = metrics[0]["val_top1"] if metrics else None
    out["stage2_final"] = metrics[-1]["val_top1"] if metrics else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="finished two-stage run folders")
    ap.add_argument("--bn-batches", type=int, default=20, help="training batches for the BatchNorm re-estimate")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/stage_switch")
    args = ap.parse_args(argv)
    try:
        rows: List[Dict[str, Any]] = [switch(Path(p), args.bn_batches, args.batch_size) for p in args.runs]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"what": __doc__.split("\n")[0], "bn_batches": args.bn_batches, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    def cell(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "Validation top-1 (%) where stage 2 starts: stage 1's final W32A1 weights, the same binarised as "
        f"stage 2 starts (before any step), with BatchNorm re-estimated on {args.bn_batches} training "
        "batches, and what stage 2 training made of it.",
        "",
        "| run | stage 1 final (W32A1) | binarised, no step | binarised, BN re-estimated | stage 2, epoch 1 "
        "| stage 2, final |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {cell(r['stage1_final'])} | {cell(r['binarised'])} | {cell(r['binarised_bn'])} | "
            f"{cell(r['stage2_epoch1'])} | {cell(r['stage2_final'])} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
