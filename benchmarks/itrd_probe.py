"""Why does (or doesn't) ITRD help here? Probe the evidence grid's finished students.

For every finished run of ``benchmarks/itrd_grid.py`` (and, as the common starting point, the
teacher's weights binarised with no training), this loads each stage's final checkpoint and
measures on the test split, against the frozen teacher:

* ``top1``: test top-1 of the student; ``agree``: fraction of images where its top-1 equals the
  teacher's top-1;
* ``kd``: the Hinton KD loss (T=4) to the teacher, i.e. what the KD row optimises;
* ``corr``: mean over feature dimensions of the (unprojected) correlation between the student's and
  the teacher's distilled feature (``head_bn`` output), standardised over fixed test batches: the
  quantity ``L_corr`` pushes to 1 (the students start from the teacher's weights, so dimensions
  correspond without the projection);
* ``L_corr``: the correlation loss itself (alpha 1.01, eps 1e-5) through a least-squares linear
  projection fitted on the first half of the test split and applied to the second half (the same
  projection family ``embed`` trains, fitted the same way for every method so rows compare);
* ``L_gram``: the mutual-information loss on the unprojected features;
* ``cka``: linear CKA between student and teacher features over the whole test split.

Then every final (last-stage) student is compared with the ``itrd`` student of the same seed on
the same test images (McNemar's exact test): how many images one gets right and the other wrong,
each way, and the two-sided p-value. Paired on images, this separates methods far better than the
±0.28-point binomial error of each accuracy alone.

Losses are means over fixed test batches of ``--batch-size`` images (the statistics ITRD sees in
training). Writes ``<out>.md`` and ``<out>.json``.

    python benchmarks/itrd_probe.py --runs runs/grid --out benchmarks/results/itrd_probe
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from bnn_distill.data import build_datasets
from bnn_distill.evaluate import mcnemar_p  # noqa: F401 - used by paired(), and tests import it from here
from bnn_distill.hooks import forward_features
from bnn_distill.losses import dimension_correlations, itrd_correlation, itrd_mutual_information, kd_loss
from bnn_distill.models import default_feature_layer
from bnn_distill.rundir import RunDir, model_from_checkpoint
from bnn_distill.train import build_model, init_from_state

log = logging.getLogger("itrd_probe")


def features(model: torch.nn.Module, x: Tensor, layer: str, batch: int) -> Tuple[Tensor, Tensor]:
    """(logits (N, classes), features (N, d)) of ``model`` in eval mode, in batches."""
    return forward_features(model, x, layer, batch)


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of (N, d_a) and (N, d_b): ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F),
    columns centred."""
    a = (a - a.mean(0)).double()
    b = (b - b.mean(0)).double()
    return float((a.t() @ b).pow(2).sum() / ((a.t() @ a).norm() * (b.t() @ b).norm()))


def mean_corr(zs: Tensor, zt: Tensor, eps: float = 1e-5) -> float:
    """Mean over dimensions of the per-dimension correlation v_i of L_corr (same standardisation)."""
    return float(dimension_correlations(zs, zt, eps).mean())


def fit_projection(zs: Tensor, zt: Tensor, ridge: float = 1e-3) -> Tuple[Tensor, Tensor]:
    """Least-squares ``zt ~ zs @ w + b`` (ridge-regularised), the linear map ``embed`` can learn."""
    xs = torch.cat([zs, torch.ones(len(zs), 1)], 1).double()
    gram = xs.t() @ xs + ridge * len(zs) * torch.eye(xs.shape[1], dtype=torch.float64)
    sol = torch.linalg.solve(gram, xs.t() @ zt.double())
    return sol[:-1].float(), sol[-1].float()


def probe(logits: Tensor, feat: Tensor, t_logits: Tensor, t_feat: Tensor, y: Tensor, batch: int) -> Dict[str, float]:
    n = len(y)
    half = n // 2
    w, b = fit_projection(feat[:half], t_feat[:half])
    proj = feat @ w + b
    batches = [slice(i, i + batch) for i in range(0, n - batch + 1, batch)]
    second = [slice(i, i + batch) for i in range(half, n - batch + 1, batch)]
    return {
        "top1": 100.0 * float((logits.argmax(1) == y).float().mean()),
        "agree": 100.0 * float((logits.argmax(1) == t_logits.argmax(1)).float().mean()),
        "kd": statistics.mean(float(kd_loss(logits[s], t_logits[s])) for s in batches),
        "corr": statistics.mean(mean_corr(feat[s], t_feat[s]) for s in batches),
        "L_corr": statistics.mean(float(itrd_correlation(proj[s], t_feat[s])) for s in second),
        "L_gram": statistics.mean(float(itrd_mutual_information(feat[s], t_feat[s])) for s in batches),
        "cka": linear_cka(feat, t_feat),
    }


def paired(results: Dict[str, List[Tuple[Any, Tensor]]], reference: str = "itrd") -> Dict[str, List[Dict[str, Any]]]:
    """Per row and seed: images only the row's student gets right (``b``), only the reference's
    (``c``), and McNemar's p. ``results``: row -> [(seed, per-image correct (N,) bool)]."""
    ref = dict(results.get(reference, []))
    out: Dict[str, List[Dict[str, Any]]] = {}
    for row, runs in results.items():
        if row == reference:
            continue
        for seed, right in runs:
            if seed not in ref:
                continue
            b = int((right & ~ref[seed]).sum())
            c = int((~right & ref[seed]).sum())
            out.setdefault(row, []).append(
                {
                    "seed": seed,
                    "only_row": b,
                    "only_ref": c,
                    "diff_points": 100.0 * (b - c) / len(right),
                    "p": mcnemar_p(b, c),
                }
            )
    return out


def binarised_teacher(teacher_ck: Dict[str, Any], student_spec: Dict[str, Any]) -> torch.nn.Module:
    """The common starting point: the teacher's weights in the W1A1 student, scales initialised as
    a stage with ``init_from: teacher`` does, before any training."""
    model = build_model(student_spec)
    init_from_state(model, teacher_ck["model"], "teacher weights")
    return model


def load(path: Path) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model of a bnn-distill checkpoint, and the checkpoint."""
    return model_from_checkpoint(path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/grid", help="the grid's run folder")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--root", default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/itrd_probe")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    runs = Path(args.runs)
    t_path = RunDir(runs / "teacher").last("teacher")
    if not t_path.exists():
        print(f"error: no finished teacher at {t_path}; run benchmarks/itrd_grid.py first", file=sys.stderr)
        return 2
    _, test, _ = build_datasets(args.dataset, args.root, False, False, None, args.limit_test)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.as_tensor([int(test[i][1]) for i in range(len(test))])
    teacher, t_ck = load(t_path)
    layer = default_feature_layer(t_ck["model_spec"]["name"])
    t_logits, t_feat = features(teacher, x, layer, args.batch_size)
    t_top1 = 100.0 * float((t_logits.argmax(1) == y).float().mean())
    log.info("teacher: %.2f%% on %d test images", t_top1, len(y))

    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    correct: Dict[str, List[Tuple[Any, Tensor]]] = {}
    finished = [r for r in RunDir.finished_in(runs) if r.path.name != "teacher"]
    spec = None
    for rd in finished:
        run = rd.path
        row = run.name.rsplit("_s", 1)[0]
        summary = rd.read_summary()
        for st in summary["stages"]:
            model, ck = load(rd.last(st["name"]))
            spec = spec or (ck["model_spec"] if ck["model_spec"]["quant"] == "W1A1" else None)
            logits, feat = features(model, x, default_feature_layer(ck["model_spec"]["name"]), args.batch_size)
            m = probe(logits, feat, t_logits, t_feat, y, args.batch_size)
            m["seed"] = int(run.name.rsplit("_s", 1)[1])
            label = f"{row} / {st['name']} ({ck['model_spec']['quant']})"
            results.setdefault(label, {}).setdefault("runs", []).append(m)
            if st is summary["stages"][-1]:
                correct.setdefault(row, []).append((m["seed"], logits.argmax(1) == y))
            log.info("%s %s: %s", run.name, st["name"], {k: round(v, 4) for k, v in m.items() if k != "seed"})
    if spec is not None:
        model = binarised_teacher(t_ck, spec)
        logits, feat = features(model, x, layer, args.batch_size)
        untrained = probe(logits, feat, t_logits, t_feat, y, args.batch_size)
        results = {"teacher weights binarised, untrained (W1A1)": {"runs": [untrained]}, **results}

    keys = ["top1", "agree", "kd", "corr", "L_corr", "L_gram", "cka"]
    rows = {}
    for label, r in results.items():
        rows[label] = {
            "n": len(r["runs"]),
            "runs": r["runs"],
            **{k: statistics.mean(m[k] for m in r["runs"]) for k in keys},
        }
    pairs = paired(correct)
    out = {"args": vars(args), "teacher_top1": t_top1, "test_images": len(y), "rows": rows, "paired_vs_itrd": pairs}
    lines = [
        f"Students of `{args.runs}` probed against the FP teacher ({t_top1:.2f}% top-1) on {len(y)} "
        f"{args.dataset} test images; means over the finished seeds (n). Higher is closer to the teacher "
        "for agree / corr / cka; lower for kd / L_corr / L_gram.",
        "",
        "| student / stage | n | top-1 % | agrees with teacher % | KD loss (T=4) | feature corr "
        "| L_corr (fitted proj.) | L_gram | linear CKA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['n']} | {r['top1']:.2f} | {r['agree']:.2f} | {r['kd']:.4f} | {r['corr']:.4f} | "
            f"{r['L_corr']:.3f} | {r['L_gram']:.5f} | {r['cka']:.4f} |"
        )
    if pairs:
        lines += [
            "",
            "Final students against the `itrd` student of the same seed, image by image (McNemar's exact test):",
            "",
            "| row | seed | right only in row | right only in itrd | row - itrd (points) | p |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row, ps in pairs.items():
            for q in ps:
                lines.append(
                    f"| {row} | {q['seed']} | {q['only_row']} | {q['only_ref']} | {q['diff_points']:+.2f} "
                    f"| {q['p']:.3g} |"
                )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
