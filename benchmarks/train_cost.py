"""Training cost of the distillation losses and of Brevitas binarisation, measured side by side.

Times one optimiser step (forward, loss, backward, SGD update) of a student at one batch size for:

* the student with CE only, with KD (Hinton) and with ITRD (CE + 2 L_corr + 1 L_gram);
  each both as a full step (teacher forward included where the loss needs it) and as the
  student-side step (teacher outputs precomputed), which isolates what the loss itself costs;
* the W1A1 Brevitas student against the same network in FP (CE only);
* what the speed-ups of the training step buy, each beside what it replaced: the sign written as
  a comparison stored into a float tensor against the earlier ``torch.where`` form, the student
  in channels_last memory format, and the frozen teacher's forward pass under ``no_grad`` (as it
  was), under ``inference_mode`` (as the Trainer runs it now) and in channels_last;
* with ``--compile``, two ``torch.compile`` forms beside the eager channels_last step: the sign and
  its ApproxSign backward as one fused kernel each, and the whole student compiled.

All configurations run interleaved, round after round, after warm-up, and the median per
configuration is reported with its ratio, so machine noise hits all of them alike. Writes JSON
and markdown. Usage:

    python benchmarks/train_cost.py --batch 256 --rounds 7 --out benchmarks/results/train_cost
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import bnn_distill.quant as quant_mod
from bnn_distill.frozen import fold_batchnorm
from bnn_distill.losses import Criterion, LossInputs, Term
from bnn_distill.models import create_model
from bnn_distill.stepcost import TimedStep, interleaved_times
from bnn_distill.train import machine_info

ITRD = [Term("ce", 1.0, {}), Term("itrd_corr", 2.0, {"alpha": 1.01}), Term("itrd_mi", 1.0, {})]
KD = [Term("ce", 1.0, {}), Term("kd", 1.0, {"temperature": 4.0})]
CE = [Term("ce", 1.0, {})]


def cpu_isa() -> str:
    """The widest SIMD level this x86 CPU has, from /proc/cpuinfo ("AVX-512", "AVX2" or other)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def where_sign(x: torch.Tensor) -> torch.Tensor:
    """The sign as bnn-distill wrote it before (same values, slower): for the 'before' row."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def fused_sign_kernels():
    """The sign forward and the ApproxSign backward, each one ``torch.compile``'d element-wise kernel
    (one pass over the tensor instead of three and five), for the ``--compile`` rows. Same values."""

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.detach() >= 0, 1.0, -1.0).to(x.dtype)

    def bwd(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)

    return torch.compile(fwd, dynamic=True), torch.compile(bwd, dynamic=True)


def loss_alone(terms, batch: int, d: int, classes: int):
    """One forward and backward of the criterion alone, on fixed logits and ``d``-wide features
    (what the loss itself adds to a step, without the network around it)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(batch, classes, generator=g, requires_grad=True)
    feat = torch.randn(batch, d, generator=g, requires_grad=True)
    t_logits, t_feat = torch.randn(batch, classes, generator=g), torch.randn(batch, d, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    crit = Criterion(list(terms), d, d)

    def run():
        out = crit(LossInputs(logits, y, t_logits, feat, t_feat))
        out["loss"].backward()

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="add two torch.compile rows: the sign kernels fused, and the whole student compiled",
    )
    ap.add_argument("--out", default="benchmarks/results/train_cost")
    args = ap.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break reports in Brevitas' code
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.in_chans, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    torch.manual_seed(1)
    teacher = create_model(args.arch, 10, in_chans=args.in_chans, width_mult=args.width_mult).eval()

    teacher_cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    teacher_folded = fold_batchnorm(teacher).to(memory_format=torch.channels_last)

    def timed(name, quant, terms, with_teacher, frozen=None, **kw):
        t = teacher if frozen is None else frozen
        return TimedStep(name, quant, terms, with_teacher, args.arch, args.width_mult, t, x, y, **kw)

    configs = [
        timed("W1A1 CE", "W1A1", CE, True),
        timed("W1A1 KD (student side)", "W1A1", KD, False),
        timed("W1A1 ITRD (student side)", "W1A1", ITRD, False),
        timed("W1A1 KD (with teacher fwd)", "W1A1", KD, True),
        timed("W1A1 ITRD (with teacher fwd)", "W1A1", ITRD, True),
        timed("FP CE (same network)", "FP", CE, True),
    ]
    new_sign = quant_mod.binary_sign
    compile_s = {}
    configs += [
        timed("W1A1 CE, torch.where sign (before)", "W1A1", CE, True, sign=where_sign),
        timed("W1A1 CE channels_last", "W1A1", CE, True, channels_last=True),
        timed("FP CE channels_last", "FP", CE, True, channels_last=True),
        # the trainer's teacher-based step before and after teacher_forward: folded (the default)
        timed("W1A1 ITRD channels_last, teacher eager", "W1A1", ITRD, True, frozen=teacher_cl, channels_last=True),
        timed(
            "W1A1 ITRD channels_last, teacher BatchNorm folded",
            "W1A1",
            ITRD,
            True,
            frozen=teacher_folded,
            channels_last=True,
        ),
    ]
    if args.compile:
        fwd, bwd = fused_sign_kernels()
        compiled = [
            timed(
                "W1A1 CE channels_last, fused sign kernels",
                "W1A1",
                CE,
                True,
                channels_last=True,
                sign=fwd,
                sign_backward=bwd,
            ),
            timed(
                "W1A1 CE channels_last, torch.compile(student)",
                "W1A1",
                CE,
                True,
                channels_last=True,
                compile_student=True,
            ),
        ]
        for c in compiled:
            t0 = time.perf_counter()
            try:
                c.step()  # compiles
            except Exception as exc:  # noqa: BLE001 - a benchmark row, reported and skipped
                print(
                    f"{c.name}: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); row skipped",
                    file=sys.stderr,
                )
                continue
            compile_s[c.name] = time.perf_counter() - t0
            configs.append(c)
    steps = {c.name: c.step for c in configs}
    d = configs[0].student.num_features
    for name, terms in (("loss alone: CE", CE), ("loss alone: ITRD", ITRD)):
        steps[name] = loss_alone(terms, args.batch, d, 10)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def forward(model, inp, mode):
        def run():
            quant_mod.binary_sign = new_sign
            with mode():
                model(inp)

        return run

    steps["teacher forward, no_grad (before)"] = forward(teacher, x, torch.no_grad)
    steps["teacher forward, inference_mode"] = forward(teacher, x, torch.inference_mode)
    steps["teacher forward, inference_mode channels_last"] = forward(teacher_cl, x_cl, torch.inference_mode)
    steps["teacher forward, inference_mode channels_last, BatchNorm folded"] = forward(
        teacher_folded, x_cl, torch.inference_mode
    )
    if args.compile:
        teacher_compiled = torch.compile(teacher_cl)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                teacher_compiled(x_cl)
        except Exception as exc:  # noqa: BLE001 - a benchmark row, reported and skipped
            print(f"teacher torch.compile failed ({type(exc).__name__}); row skipped", file=sys.stderr)
        else:
            name = "teacher forward, inference_mode channels_last, torch.compile"
            compile_s[name] = time.perf_counter() - t0
            steps[name] = forward(teacher_compiled, x_cl, torch.inference_mode)
    times = interleaved_times(
        steps, args.rounds, args.warmup, on_round=lambda r: print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    )
    quant_mod.binary_sign = new_sign
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["W1A1 CE"]
    rows = []
    for k in steps:
        rows.append(
            {
                "config": k,
                "median_ms": 1000 * med[k],
                "images_per_s": args.batch / med[k],
                "vs_W1A1_CE": med[k] / base,
                "all_ms": [round(1000 * t, 2) for t in times[k]],
            }
        )
    fp = med["FP CE (same network)"]
    result = {
        "what": "one optimiser step (forward, loss, backward, SGD) at fixed batch; medians over interleaved rounds",
        "args": vars(args),
        "machine": machine_info(),
        "isa": cpu_isa(),
        "rows": rows,
        "itrd_vs_ce_student_side": med["W1A1 ITRD (student side)"] / base,
        "itrd_vs_kd_with_teacher": med["W1A1 ITRD (with teacher fwd)"] / med["W1A1 KD (with teacher fwd)"],
        "binary_vs_fp_ce": base / fp,
        "binary_vs_fp_ce_before": med["W1A1 CE, torch.where sign (before)"] / fp,
        "binary_channels_last_vs_fp_channels_last": med["W1A1 CE channels_last"] / med["FP CE channels_last"],
        "teacher_forward_vs_ce_step": {k: med[k] / base for k in steps if k.startswith("teacher forward")},
        "compile_seconds": compile_s,
        "itrd_loss_alone_vs_ce_step": (med["loss alone: ITRD"] - med["loss alone: CE"]) / base,
        "itrd_step_teacher_eager_vs_folded": med["W1A1 ITRD channels_last, teacher eager"]
        / med["W1A1 ITRD channels_last, teacher BatchNorm folded"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Training step cost: {args.arch} x{args.width_mult} on "
        f"{args.in_chans}x{args.image_size}x{args.image_size}, "
        f"batch {args.batch}, {torch.get_num_threads()} threads, {result['machine']['cpu']} ({result['isa']}), "
        f"{args.rounds} interleaved rounds, medians",
        "",
        "| configuration | median ms/step | images/s | vs W1A1 CE |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {r['median_ms']:.1f} | {r['images_per_s']:.0f} | {r['vs_W1A1_CE']:.3f} |")
    lines += [
        "",
        f"ITRD / CE (student side): {result['itrd_vs_ce_student_side']:.3f}; "
        f"ITRD / KD (teacher forward included): {result['itrd_vs_kd_with_teacher']:.3f}; "
        f"W1A1 Brevitas / FP, CE: {result['binary_vs_fp_ce']:.3f} (before the sign change: "
        f"{result['binary_vs_fp_ce_before']:.3f}; both in channels_last: "
        f"{result['binary_channels_last_vs_fp_channels_last']:.3f})",
    ]
    lines.append(
        f"ITRD's terms alone (criterion forward + backward, ITRD minus CE): "
        f"{1000 * (med['loss alone: ITRD'] - med['loss alone: CE']):.2f} ms, "
        f"{100 * result['itrd_loss_alone_vs_ce_step']:.2f}% of the W1A1 CE step"
    )
    fp_cl = med["FP CE channels_last"]
    t_cl = med["teacher forward, inference_mode channels_last"]
    for k, sec in compile_s.items():
        if k.startswith("teacher"):
            lines.append(f"{k}: {t_cl / med[k]:.3f}x faster than eager (first call, compiling: {sec:.0f} s)")
        else:
            lines.append(f"{k}: {med[k] / fp_cl:.3f}x the FP channels_last step (first step, compiling: {sec:.0f} s)")
    folded = med["teacher forward, inference_mode channels_last, BatchNorm folded"]
    lines.append(f"teacher forward with BatchNorm folded into the convs: {t_cl / folded:.3f}x faster than eager")
    lines.append(
        f"the W1A1 ITRD step (channels_last, teacher forward included) with the teacher folded, as the trainer "
        f"now runs it: {result['itrd_step_teacher_eager_vs_folded']:.3f}x faster than with the eager teacher"
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
