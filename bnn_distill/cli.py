"""The ``bnn-distill`` command line: thin wrappers over the library.

Every error a user can cause prints one line (``error: ...``) and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import WRITE_ERRNOS, Interrupted, UserError, one_line, write_error
from .rundir import RunDir, model_from_checkpoint

# Only light modules are imported here: torch, Brevitas and the data stack are imported inside the
# commands that need them, so that ``bnn-distill --help`` and argument errors answer at once.

log = logging.getLogger("bnn_distill")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bnn-distill", description="Distil binary ResNets with ITRD, export and benchmark them."
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_summary(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_predict(sub)
    _add_build_native(sub)
    return ap


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="run every stage of a recipe (teacher, W32A1, W1A1)")
    t.add_argument("recipe", help="YAML recipe, e.g. recipes/quick_fmnist.yaml")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set stages.stage1.epochs=2 (repeatable)",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in the recipe's run folder")
    t.add_argument("--force", action="store_true", help="with --resume: continue even if the recipe changed")
    t.add_argument(
        "--dry-run", action="store_true", help="validate, print the resolved recipe and model summary; train nothing"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per epoch)")
    _add_common(t)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="top-1/top-5 of a run's final model or of a checkpoint on the test split")
    e.add_argument("target", help="run folder (runs/NAME) or checkpoint file (.pt)")
    e.add_argument("--stage", help="stage to evaluate in a run folder (default: the last)")
    e.add_argument("--data-root", help="dataset folder, if not where the run found it")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")
    _add_common(e)


def _add_summary(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("summary", help="per-layer bit-widths, parameters, MACs and memory")
    s.add_argument("target", help="recipe (.yaml), run folder or checkpoint (.pt)")
    s.add_argument("--stage", help="only this stage's model")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_common(s)


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser(
        "export", help="export a run's binary student, FP32 student and teacher to ONNX, with a parity check"
    )
    x.add_argument("run", help="run folder (runs/NAME)")
    x.add_argument("--out", help="export folder (default: export/<run-name>)")
    x.add_argument("--stage", help="binary student stage to export (default: the last stage)")
    x.add_argument("--force", action="store_true", help="overwrite an export folder that holds another run's export")
    x.add_argument("--data-root", help="dataset folder, if not where the run found it")
    x.add_argument(
        "--limit-test", type=int, metavar="N", help="check parity on the first N test images only (default: all)"
    )
    x.add_argument(
        "--strict-top1",
        action="store_true",
        help="fail if any image's top-1 differs, even when explained by a sign of a value within float32 "
        "rounding of 0 (default: such images pass and are listed in parity.json)",
    )
    x.add_argument(
        "--runtime",
        choices=("standard", "native"),
        default="standard",
        help="native: also write student_binary_native.onnx for the bit-packed custom-op library "
        "(built on first use; see 'bnn-distill build-native')",
    )
    x.add_argument(
        "--no-progress", action="store_true", help="no progress bars for the parity check (shown only on a terminal)"
    )
    _add_common(x)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="onnxruntime latency and accuracy of an export folder, models side by side")
    b.add_argument("export_dir", help="export folder written by 'bnn-distill export'")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 32], metavar="N", help="batch sizes (default: 1 32)")
    b.add_argument(
        "--threads", type=int, nargs="+", metavar="N", help="intra-op thread counts (default: 1 and all cores)"
    )
    b.add_argument(
        "--repeats", type=int, metavar="N", help="measurement rounds per setting (default: from --budget, 10..200)"
    )
    b.add_argument("--warmup", type=int, default=3, metavar="N", help="warm-up rounds per setting (default: 3)")
    b.add_argument(
        "--budget",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds of rounds per setting when --repeats is not given",
    )
    b.add_argument(
        "--burst",
        type=int,
        default=3,
        metavar="N",
        help="calls of each model back to back per round; the first of each is reported as 'cold' (default: 3)",
    )
    b.add_argument("--no-accuracy", action="store_true", help="skip the test-split accuracy")
    b.add_argument(
        "--openvino",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the FP32 teacher in OpenVINO (default: when openvino is installed, "
        "pip install 'bnn-distill[peers]')",
    )
    b.add_argument("--data-root", help="dataset folder, if not where the run found it")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (shown only on a terminal)")
    _add_common(b)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (PNG/JPEG or .npy) with an export folder's binary student")
    p.add_argument("export_dir", help="export folder written by 'bnn-distill export'")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG images or .npy arrays")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to print per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON (top-k with probabilities, and the logits)")
    p.add_argument(
        "--runtime",
        choices=("auto", "standard", "native"),
        default="auto",
        help="auto (default): the native graph when the export has it and the native library loads, "
        "else the standard one",
    )
    p.add_argument(
        "--model",
        choices=("student_binary", "student_fp32", "teacher"),
        default="student_binary",
        help="which exported model to run (default: the binary student)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: onnxruntime's)")
    _add_common(p)


def _add_build_native(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser(
        "build-native", help="build the native onnxruntime custom-op library (XNOR-popcount binary conv)"
    )
    n.add_argument(
        "--headers",
        help="folder with the onnxruntime C/C++ API headers (default: cached, else "
        "downloaded from Debian trixie's libonnxruntime-dev)",
    )
    n.add_argument("--out", help="write the library here instead of the cache folder")
    n.add_argument("--force", action="store_true", help="rebuild even if a build for this source exists")
    _add_common(n)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Brevitas is imported by the commands now, after this line: keep its import-time "no CUDA runtime"
    # warning as quiet as when the package imported it eagerly (bnn_distill/__init__.py sets ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return {
            "train": cmd_train,
            "eval": cmd_eval,
            "summary": cmd_summary,
            "export": cmd_export,
            "bench": cmd_bench,
            "predict": cmd_predict,
            "build-native": cmd_build_native,
        }[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        if isinstance(e, Interrupted):
            hint = f"; resume with: bnn-distill train {args.recipe} --resume" if args.command == "train" else ""
            print(f"interrupted: {e}{hint}", file=sys.stderr)
        else:
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk or a read-only folder met outside the atomic writers
        if args.debug or e.errno not in WRITE_ERRNOS:
            raise
        err = write_error(e)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except RuntimeError as e:  # under torchrun: another process of the group died or hangs
        from .distributed import peer_failure

        msg = None if args.debug else peer_failure(e)
        if msg is None:
            raise
        print(f"error: {one_line(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = ""
        if args.command == "train":
            hint = f"; completed epochs are saved: resume with 'bnn-distill train {args.recipe} --resume'"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- train


def cmd_train(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(recipe.to_yaml().rstrip())
        print()
        for title, model, shape in _recipe_models(recipe):
            print(f"== {title}")
            print(_summarize(model, shape).format())
            print()
        print(f"recipe OK; run folder would be {recipe.run_dir}")
        return 0
    from .train import run_recipe

    if args.resume is False and args.force:
        raise UserError("--force only applies with --resume")
    from .runlock import hold

    with hold(recipe.run_dir, "run folder", "train"):  # one writer per run folder (rank 0 under torchrun)
        summary = run_recipe(
            recipe, resume=args.resume, force=args.force, progress=not args.no_progress and sys.stderr.isatty()
        )
    _print_summary(summary, recipe.run_dir)
    return 0


def _print_summary(summary: Dict[str, Any], run_dir: Path) -> None:
    t = summary.get("teacher", {})
    if "test_top1" in t:
        print(f"teacher ({t['arch']}): test top-1 {t['test_top1']:.2f}%")
    for st in summary["stages"]:
        acc = st["final"].get("test_top1", float("nan"))
        best = (
            (
                f" (best on validation {st['best_top1']:.2f}% at epoch {st['best_epoch']}: test "
                f"{st.get('best_test_top1', float('nan')):.2f}%)"
            )
            if st.get("best_epoch")
            else ""
        )
        print(
            f"{st['name']} ({st['kind']}, {st['quant']}, {st['epochs']} epochs): test top-1 {acc:.2f}%{best}, "
            f"{st['wall_s']:.0f} s"
        )
    print(f"total {summary['wall_s']:.0f} s; run folder {run_dir}")


# ---------------------------------------------------------------- models of a recipe / checkpoint


def _recipe_models(recipe, only_stage: Optional[str] = None):
    from .data import dataset_info
    from .train import build_model, model_spec_dict

    info = dataset_info(recipe.data.dataset, recipe.data.root) if _takes_root() else dataset_info(recipe.data.dataset)
    if info.num_classes <= 0:
        raise UserError(f"data.dataset '{info.name}': class count unknown until data.root is given")
    shape = (info.in_chans, info.image_size, info.image_size)
    seen = set()
    wanted = [s for s in recipe.stages if only_stage in (None, s.name)]
    if only_stage is not None and not wanted:
        raise UserError(f"--stage: no stage named '{only_stage}'; valid: {', '.join(s.name for s in recipe.stages)}")
    if only_stage is None and (recipe.teacher.checkpoint or not any(s.kind == "teacher" for s in recipe.stages)):
        spec = model_spec_dict(recipe, recipe.teacher, "FP", info.num_classes, info.in_chans)
        seen.add(("teacher", "FP"))
        yield f"teacher: {recipe.teacher.arch} FP", build_model(spec), shape
    for st in wanted:
        cfg = recipe.teacher if st.kind == "teacher" else recipe.student
        key = (st.kind, st.quant)
        if key in seen:
            continue
        seen.add(key)
        spec = model_spec_dict(recipe, cfg, st.quant, info.num_classes, info.in_chans)
        yield f"stage {st.name}: {cfg.arch} {st.quant}", build_model(spec), shape


def _takes_root() -> bool:
    import inspect

    from .data import dataset_info

    return "root" in inspect.signature(dataset_info).parameters


def _summarize(model, shape):
    from .summary import summarize

    return summarize(model, shape)


def _resolve_checkpoint(target: str, stage: Optional[str]) -> Path:
    """The checkpoint a target names: a ``.pt`` file itself, or a run folder's stage (default: the last)."""
    p = Path(target)
    if p.is_dir():
        run = RunDir(p).require("give runs/NAME or a checkpoint .pt file")
        return run.checkpoint(run.stage(run.recipe(), stage).name)
    if not p.exists():
        raise UserError(f"'{target}' does not exist; give a run folder (runs/NAME) or a checkpoint file")
    return p


# ---------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from .checkpoint import load_checkpoint
    from .data import build_datasets
    from .evaluate import evaluate
    from .recipe import recipe_from_dict

    path = _resolve_checkpoint(args.target, args.stage)
    model, ck = model_from_checkpoint(path, load_checkpoint(path))
    raw = dict(ck["recipe"])
    if args.data_root:
        raw["data"] = {**raw["data"], "root": args.data_root}
    recipe = recipe_from_dict(raw)
    d = recipe.data
    _, test_set, info = build_datasets(d.dataset, d.root, False, False, d.limit_train, d.limit_test, seed=recipe.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate(
        model.to(device),
        DataLoader(test_set, batch_size=256, num_workers=d.num_workers),
        device,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    out = {
        "checkpoint": str(path),
        "stage": ck.get("stage"),
        "model": ck["model_spec"]["name"],
        "quant": ck["model_spec"]["quant"],
        "dataset": info.name,
        **res,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{out['model']} {out['quant']} (stage {out['stage']}) on {info.name} test ({res['n']} images): "
            f"top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}%, loss {res['loss']:.4f}"
        )
    return 0


# ---------------------------------------------------------------- summary


def cmd_summary(args) -> int:
    from .checkpoint import load_checkpoint
    from .recipe import load_recipe

    p = Path(args.target)
    items: List[Any] = []
    sizes = None  # the ONNX files of this run's export, next to the deployed size
    if p.is_dir() and (p / "manifest.json").is_file() and not RunDir(p).is_run():
        from .predict import load_export

        manifest = load_export(p)  # an export folder: its files' sizes
        if args.json:
            out = {"export": str(p), "sizes": manifest.get("sizes"), "models": manifest["models"]}
            print(json.dumps(out, indent=2))
        else:
            print(_sizes_text(manifest, p))
        return 0
    if p.suffix in (".yaml", ".yml"):
        recipe = load_recipe(p, args.overrides)
        items = list(_recipe_models(recipe, args.stage))
    else:
        path = _resolve_checkpoint(args.target, args.stage)
        model, ck = model_from_checkpoint(path, load_checkpoint(path))
        from .data import dataset_info
        from .recipe import recipe_from_dict

        recipe = recipe_from_dict(ck["recipe"])
        info = dataset_info(recipe.data.dataset)
        items = [
            (
                f"{ck['model_spec']['name']} {ck['model_spec']['quant']} ({path})",
                model,
                (info.in_chans, info.image_size, info.image_size),
            )
        ]
        sizes = _run_export(p, recipe) if p.is_dir() else None
    if args.json:
        out = {title: _summarize(m, shape).to_dict() for title, m, shape in items}
        if sizes is not None:
            out["export"] = {"folder": str(sizes[1]), "sizes": sizes[0].get("sizes"), "models": sizes[0]["models"]}
        print(json.dumps(out, indent=2))
        return 0
    for title, model, shape in items:
        print(f"== {title}")
        print(_summarize(model, shape).format())
        print()
    if sizes is not None:
        print(_sizes_text(*sizes))
    return 0


def _run_export(run: Path, recipe) -> Optional[tuple]:
    """``(manifest, folder)`` of the run's export in export/<name>, if there is one of this run."""
    d = Path("export") / recipe.name
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return (m, d) if isinstance(m, dict) and m.get("fingerprint") == recipe.fingerprint() and "models" in m else None


def _sizes_text(manifest: Dict[str, Any], folder: Path) -> str:
    """The export's ONNX files with their sizes, next to the binary student's deployed size."""
    sz = manifest.get("sizes") or {}
    dep = sz.get("deployed_bytes")
    lines = [f"== ONNX files in {folder}" + (f" (binary student deployed: {dep:,} bytes)" if dep else "")]
    for role, entry in manifest["models"].items():
        over = f", {entry['bytes'] / dep:.1f}x deployed" if dep else ""
        lines.append(f"{entry['file']:<30} {entry['bytes']:>12,} bytes{over}")
    if sz.get("standard_over_native"):
        lines.append(f"standard / native binary student: {sz['standard_over_native']:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- export / bench


def cmd_export(args) -> int:
    from .export import export_run

    if args.limit_test is not None and args.limit_test < 1:
        raise UserError(f"--limit-test: {args.limit_test} must be >= 1")
    from .runlock import hold

    target = Path(args.out) if args.out else _default_export_dir(args.run)
    with hold(target, "export folder", "export") if target is not None else _no_lock():  # one writer per folder
        manifest = export_run(
            args.run,
            out=args.out,
            stage=args.stage,
            force=args.force,
            data_root=args.data_root,
            limit_test=args.limit_test,
            runtime=args.runtime,
            strict_top1=args.strict_top1,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    out = Path(args.out) if args.out else Path("export") / manifest["run"]
    parity = json.loads((out / "parity.json").read_text())
    for role, r in parity["models"].items():
        flips = f", {len(r['sign_flips'])} differ by a sign within rounding of 0" if r["sign_flips"] else ""
        if r.get("top1_changed_by_flips"):
            flips += f" ({len(r['top1_changed_by_flips'])} of them change top-1)"
        acc = "" if r["onnx_top1"] is None else f", test top-1 {r['onnx_top1']:.2f}%"
        print(
            f"{role}: top-1 agrees on {r['top1_agree']}/{r['n']} images, {r['within_tol']} within |logit diff| "
            f"{r['atol']:.2g} (max {r['max_abs_diff']:.2g}){flips}{acc}"
        )
    print(
        f"binary convs fused into MatMulIntegerToFloat: "
        f"{parity['fused_matmul_integer_to_float']}/{parity['binary_convs']}"
    )
    if parity.get("native_vs_standard"):
        c = parity["native_vs_standard"]
        print(
            f"native vs standard integer graph: top-1 identical on {c['top1_agree']}/{c['n']} images, "
            f"max |logit diff| {c['max_abs_diff']:.2g}"
        )
    if manifest.get("native"):
        print(
            f"native runtime: {manifest['models']['student_native']['file']} ({manifest['native']['isa']} kernels, "
            f"library {manifest['native']['library']})"
        )
    print(f"exported stage '{manifest['stage']}' ({manifest['quant']}) of {manifest['run']} to {out}")
    return 0


def _default_export_dir(run: str) -> Optional[Path]:
    """export/<run name>, or None when ``run`` is not a readable run folder (export_run then says why)."""
    try:
        return Path("export") / RunDir(run).recipe().name
    except (UserError, OSError):
        return None


def _no_lock():
    import contextlib

    return contextlib.nullcontext()


def cmd_bench(args) -> int:
    from .bench import BENCH_MD, run_bench

    run_bench(
        args.export_dir,
        batches=args.batch,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        budget_s=args.budget,
        accuracy=not args.no_accuracy,
        data_root=args.data_root,
        burst=args.burst,
        progress=not args.no_progress and sys.stderr.isatty(),
        openvino=args.openvino,
    )
    print((Path(args.export_dir) / BENCH_MD).read_text().rstrip())
    return 0


def cmd_predict(args) -> int:
    from .predict import format_text, predict

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: {args.threads} must be >= 1")
    result = predict(
        args.export_dir, args.images, top_k=args.top_k, runtime=args.runtime, model=args.model, threads=args.threads
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        log.info("%s (%s graph, %s)", result["file"], result["runtime"], args.export_dir)
        print(format_text(result))
    return 0


def cmd_build_native(args) -> int:
    from . import native

    lib = native.build(headers=args.headers, out=Path(args.out) if args.out else None, force=args.force)
    about = native.info(lib)
    print(f"built {lib} (kernels for this CPU: {about['isa']})")
    print(f"use it from onnxruntime: so = onnxruntime.SessionOptions(); so.register_custom_ops_library('{lib}')")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
