"""How much does the epsilon in ITRD's standardisation change the loss on the grid's features?

``L_corr`` standardises each feature dimension over the batch as ``(z - mean) / sqrt(var + eps)``.
This prints, over fixed test batches of ``--batch-size`` images, the smallest and median
per-dimension batch variance of the distilled feature of the grid's teacher and of a finished
student run (its feature after its trained ``embed`` projection, which is what ``L_corr`` sees).
With a minimum variance v, eps changes the standardisation by at most about eps / (2 v) relative.

    python benchmarks/feature_variance.py --run runs/grid/itrd_s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bnn_distill.data import build_datasets
from bnn_distill.hooks import forward_features
from bnn_distill.models import default_feature_layer
from bnn_distill.rundir import RunDir, model_from_checkpoint


def batch_variance(z: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-dimension unbiased variance within each full batch of ``batch`` rows: (batches, d)."""
    n = (len(z) // batch) * batch
    return z[:n].reshape(-1, batch, z.shape[1]).var(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/grid")
    ap.add_argument("--run", default="runs/grid/itrd_s0", help="a finished ITRD student run folder")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--limit-test", type=int, default=2048)
    ap.add_argument("--eps", type=float, default=1e-5)
    args = ap.parse_args(argv)
    _, test, _ = build_datasets(args.dataset, None, False, False, None, args.limit_test)
    x = torch.stack([test[i][0] for i in range(len(test))])
    run = RunDir(args.run)
    stage = run.stages_with_checkpoints()[-1]  # the last stage by name
    for name, path in [
        ("teacher", RunDir(Path(args.runs) / "teacher").last("teacher")),
        (f"{run.path.name} ({stage})", run.last(stage)),
    ]:
        model, ck = model_from_checkpoint(path)
        layer = default_feature_layer(ck["model_spec"]["name"])
        _, feat = forward_features(model, x, layer, args.batch_size)
        what = f"{layer} feature"
        if name != "teacher":
            state = ck["criterion"]
            if "embed.weight" not in state:
                print(f"error: {path} has no trained embed projection (not an ITRD run)", file=sys.stderr)
                return 2
            feat = feat @ state["embed.weight"].T + state["embed.bias"]
            what += " after embed"
        v = batch_variance(feat, args.batch_size)
        print(
            f"{name}, {what}: per-dimension batch variance min {v.min():.3g}, median {v.median():.3g} "
            f"({v.shape[0]} batches of {args.batch_size}); eps {args.eps:g} changes the standardisation by "
            f"at most {args.eps / (2 * float(v.min())):.1e} relative"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
