"""onnxruntime latency of a CIFAR ResNet-18 binary student against its FP32 teacher, without a run.

Builds ``cifar_resnet18`` as the FP32 teacher and as a W1A1 student (learned scales, ReCU), both
with random weights, exports them with :func:`bnn_distill.export.export_models` (parity checked on
random inputs with exact zeros) and benchmarks the folder with :func:`bnn_distill.bench.run_bench`:
teacher FP32, student FP32 and binary student interleaved, p50/p90 per batch size and thread count.

BatchNorm statistics are drawn at random (seeded): in a freshly initialised binary net, integer
sums cancel to exactly 0 and the sign of that 0 is then decided by PyTorch's float rounding,
which the parity check (rightly) reports. Latency does not depend on the weights' values.

    python benchmarks/onnx_resnet18.py --out export/cifar_resnet18_random --batch 1 32 --threads 1 2

With ``--runtime native`` (the default) the folder also holds the native student
(``student_binary_native.onnx``, bit-packed XNOR-popcount kernels) and the benchmark adds its row.

Check ``uptime`` first: other processes on the machine inflate every number (the interleaving
keeps the ratios fair, not the absolute times).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from bnn_distill.bench import BENCH_MD, run_bench
from bnn_distill.export import ExportInfo, export_models
from bnn_distill.models import create_model


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="cifar_resnet18")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--out", default="export/cifar_resnet18_random")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--repeats", type=int, default=None, help="rounds per setting (default: from --budget)")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds of rounds per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    ap.add_argument(
        "--runtime",
        choices=("standard", "native"),
        default="native",
        help="native (default): add the bit-packed custom-op student (builds the library if needed)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    torch.manual_seed(args.seed)
    spec = dict(
        name=args.arch,
        num_classes=10,
        in_chans=3,
        quant="W1A1",
        width_mult=args.width_mult,
        weight_scale="learned",
        recu=True,
    )
    student = randomize_batchnorm(create_model(**spec), args.seed)
    teacher = randomize_batchnorm(create_model(args.arch, 10, width_mult=args.width_mult), args.seed + 1)
    out = Path(args.out)
    export_models(
        student,
        spec,
        out,
        ExportInfo(
            input_shape=(3, args.size, args.size),
            run=f"{args.arch}_random",
            fingerprint=f"{args.arch}-random-seed{args.seed}-w{args.width_mult}",
            stage="random",
            quant="W1A1",
        ),
        teacher=teacher,
        force=args.force,
        runtime=args.runtime,
    )
    run_bench(out, batches=args.batch, threads=args.threads, repeats=args.repeats, budget_s=args.budget, accuracy=False)
    print((out / BENCH_MD).read_text())


if __name__ == "__main__":
    main()
