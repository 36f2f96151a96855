#!/usr/bin/env python3
"""The CUDA path of bnn-distill, checked in one prepared run on a lent GPU (issue 18).

ON THE LENT GPU MACHINE (one call of the device tool's ``run``, about 8 minutes of work):

    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)

``benchmarks/gpu_check.sh`` uses the machine's python3 (its torch, onnx, onnxruntime), installs the
three pure-Python wheels that image lacks (brevitas, dependencies, unfoldNd) from ``.whl/`` with pip
``--no-index``, puts the repository on PYTHONPATH (no install of the project) and runs this script
with ``--out $OUT``. Make ``.whl/`` once, beforehand, on the CPU machine (it is git-ignored through
.git/info/exclude; about 1 MB):

    bash benchmarks/gpu_check.sh --prepare

What comes back under $OUT: ``gpu_check.json`` (everything), ``gpu_check.md`` (the readable report)
and ``gpu_check.log`` (the whole console output). Scratch (run folders, checkpoints, exports, the
per-section logs) stays in ``--work`` (a temporary folder by default), since $OUT returns 8 files.

CPU SMOKE (tests/test_gpu_check.py runs it in the default suite; well under a minute on 2 cores):

    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check

Sections, in this order; each catches its own failure, records it and the run goes on. In full mode
each runs in its own process (killed at its cap; the export one with CUDA hidden), under one global
budget (``--budget``, default 450 s) that caps every section by what is left:

* ``env``: GPU name, memory, capability, bf16, driver (nvidia-smi), versions.
* ``steps``: one optimiser step of each training configuration of ``recipes/resnet18_binary.yaml``
  (teacher FP CE; W32A1 ITRD and W1A1 ITRD with the teacher forward; the same network in FP with the
  same ITRD loss; W1A1 CE only; W1A1 ITRD in fp32; W1A1 ITRD with the ReCU tau read without a host
  sync), built with the library's own model/criterion/optimiser code, stepped exactly as
  ``Trainer._train_epoch`` does (autocast from ``Execution``, teacher under no_grad, ``.item()`` finite
  check, GradScaler), interleaved round after round after warm-up; medians, images/s, the step's
  transient GPU memory and the static memory of each configuration, CUDA syncs per step
  (``torch.cuda.set_sync_debug_mode``), the dtype of every loss term under autocast, and the
  test-time forward throughput (for the estimate).
* ``itrd_run``: the real pipeline, ``run_recipe`` on resnet18_binary.yaml with the synthetic
  CIFAR-shaped data set (teacher, W32A1, W1A1, a few epochs each): every loss term per epoch,
  finite, going down, the trainer's images/s per stage, peak GPU memory.
* ``torchrun``: ``python -m torch.distributed.run --standalone --nproc_per_node=1`` of
  ``bnn-distill train`` (one epoch per stage), SIGTERM to torchrun once the teacher's checkpoint is
  written, then the same command with ``--resume``. Variant ``nccl_ddp`` forces the DDP path of the
  library at world size 1 (the library joins a process group only when WORLD_SIZE > 1), so NCCL,
  DDP, the distributed sampler and the collectives really run; variant ``cli`` is the plain
  ``-m bnn_distill`` documented in the README. ``--backend gloo`` exercises the same on CPU.
* ``export``: ``bnn-distill export`` of that run on CPU (CUDA hidden from the process), parity.
* ``compile``: ``torch.compile`` of the W1A1 student (and the FP one, if time is left), the ITRD
  step compiled against eager, side by side; compile time, graph breaks, or the exception.
* ``estimate`` (computed here): wall time of the paper's 600-epoch CIFAR-10 recipe (50,000 images
  per epoch plus the 10,000-image test pass) from the measured images/s, as an estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

THIS = Path(__file__).resolve()
REPO = THIS.parents[1]
RECIPE = REPO / "recipes" / "resnet18_binary.yaml"
RESULT_JSON, RESULT_MD = "gpu_check.json", "gpu_check.md"

SECTION_ORDER = ("env", "steps", "itrd_run", "torchrun", "export", "compile")
# torch.compile takes ~30 s to trace even with the eager backend on 2 CPU cores: in the smoke run only on request
SMOKE_SECTIONS = ("env", "steps", "itrd_run", "torchrun", "export")
# Per-section caps in seconds (full mode, smoke mode); the global budget trims them further.
# (The smoke caps are loose: on an idle 2-core machine the smoke run takes about a minute, but it must
# also pass on a machine shared with other jobs, where it has been seen to take five times as long.)
CAPS = {
    "env": (45, 90),
    "steps": (110, 150),
    "itrd_run": (100, 150),
    "torchrun": (130, 240),
    "export": (70, 120),
    "compile": (170, 180),
    "_sleep": (2, 2),
}
MIN_SECTION_S = {True: 2.0, False: 15.0}  # below this much time left a section is skipped (smoke, full)
REPORT_RESERVE_S = 3.0

PAPER = {
    "epochs": 600,
    "train_images": 50_000,
    "test_images": 10_000,
    "two_stage": (
        ("stage1 (W32A1 ITRD)", "W32A1 ITRD (stage1)", 300),
        ("stage2 (W1A1 ITRD)", "W1A1 ITRD (stage2)", 300),
    ),
    "teacher_epochs": 200,
}


# ============================================================================ small helpers


def now() -> float:
    return time.monotonic()


def atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return repr(o)


def exc_info(e: BaseException, frames: int = 6) -> Dict[str, Any]:
    """An exception as data: type, message (first 3000 chars) and the last traceback frames."""
    tb = traceback.extract_tb(e.__traceback__)[-frames:]
    return {
        "type": type(e).__name__,
        "message": str(e)[:3000],
        "where": [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb],
    }


def tail(path: Path, n: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:]


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Rec:
    """One section's results: a dict saved atomically to ``path`` whenever asked (partial results survive a kill)."""

    def __init__(self, path: Optional[Path], deadline: float, cfg: Dict[str, Any]):
        self.path, self.deadline, self.cfg = path, deadline, cfg
        self.data: Dict[str, Any] = {"status": "running"}

    def left(self) -> float:
        return self.deadline - now()

    def save(self) -> None:
        if self.path is not None:
            atomic_json(self.path, self.data)

    def error(self, where: str, e: BaseException) -> None:
        self.data.setdefault("errors", []).append({"part": where, **exc_info(e)})
        self.save()


# ============================================================================ configuration


def make_cfg(args) -> Dict[str, Any]:
    smoke = bool(args.smoke)
    device = args.device
    if device == "auto":
        device = "cpu" if smoke else "cuda"  # full mode is the GPU check; --device cpu runs it on CPU
    full = not smoke
    cfg = {
        "smoke": smoke,
        "device": device,
        "backend": args.backend,
        "budget_s": args.budget if args.budget is not None else (600.0 if smoke else 450.0),
        "isolate": (not smoke) if args.isolate is None else bool(args.isolate),
        "sections": [
            s
            for s in (args.sections.split(",") if args.sections else SMOKE_SECTIONS if smoke else SECTION_ORDER)
            if s not in (args.skip or "").split(",")
        ],
        "inject_failure": args.inject_failure,
        "width_mult": args.width_mult if args.width_mult is not None else (1.0 if full else 0.125),
        "step_batch": args.batch if args.batch is not None else (256 if full else 16),
        "step_rounds": 12 if full else 1,
        "steps_per_round": 5 if full else 1,
        "step_warmup": 3 if full else 1,
        "eval_batch": 256 if full else 16,
        "run_epochs": args.run_epochs if args.run_epochs is not None else (8 if full else 2),
        "run_batch": args.batch if args.batch is not None else (256 if full else 32),
        "run_limit_train": None if full else 64,
        "torchrun_limit_train": None if full else 128,
        "limit_test": None if full else 64,
        "run_workers": 8 if full else 0,  # the recipe's num_workers on GPU
        "torchrun_batch": args.batch if args.batch is not None else (256 if full else 32),
        "torchrun_workers": 2 if full else 0,
        "torchrun_variants": args.torchrun_variants.split(",")
        if args.torchrun_variants
        else (["nccl_ddp", "cli"] if full else ["nccl_ddp"]),
        "export_limit": None,
        "compile_backend": args.compile_backend or ("inductor" if full else "eager"),
        "compile_models": ["W1A1", "FP"] if full else ["W1A1"],
        "compile_rounds": 8 if full else 2,
        "recipe": str(RECIPE),
    }
    return cfg


def recipe_overrides(
    cfg: Dict[str, Any], name: str, epochs: int, batch: int, workers: int, work: Path, limit_train: Optional[int] = None
) -> List[str]:
    """``--set`` values that turn resnet18_binary.yaml into a short run on the synthetic CIFAR-shaped set."""
    (work / "data").mkdir(parents=True, exist_ok=True)  # synthetic data reads nothing, but data.root must exist
    o = [
        f"name={name}",
        f"output_dir={work / 'runs'}",
        "data.dataset=synthetic",
        f"data.root={work / 'data'}",
        "data.download=false",
        f"data.num_workers={workers}",
        f"device={cfg['device']}",
    ]
    try:  # a held-out validation split (data.val_size, 5000 in the recipe) would leave nothing of 512 images
        import dataclasses

        from bnn_distill.recipe import DataConfig

        o += [f"data.{f.name}=null" for f in dataclasses.fields(DataConfig) if f.name in ("val_size", "val_fraction")]
    except ImportError:
        pass
    if limit_train:
        o.append(f"data.limit_train={limit_train}")
    if cfg.get("limit_test"):
        o.append(f"data.limit_test={cfg['limit_test']}")
    if cfg["width_mult"] != 1.0:
        o += [f"teacher.width_mult={cfg['width_mult']}", f"student.width_mult={cfg['width_mult']}"]
    for st in ("teacher", "stage1", "stage2"):
        o += [
            f"stages.{st}.epochs={epochs}",
            f"stages.{st}.batch_size={batch}",
            f"stages.{st}.schedule.warmup_epochs={min(1, epochs - 1)}",
        ]
    return o


# ============================================================================ section: env


def sec_env(cfg, rec: Rec) -> None:
    d = rec.data
    d["python"] = sys.version.split()[0]
    d["platform"] = platform.platform()
    d["cpu_count"] = os.cpu_count()
    try:
        d["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        d["git_commit"] = None
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
        d["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    except Exception as e:
        d["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    rec.save()
    import torch

    d["torch"] = torch.__version__
    d["torch_cuda"] = torch.version.cuda
    d["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    d["cuda_available"] = torch.cuda.is_available()
    for mod in ("brevitas", "onnx", "onnxruntime", "numpy", "torchvision", "bnn_distill"):
        try:
            m = __import__(mod)
            d[mod] = getattr(m, "__version__", "?")
            if mod == "bnn_distill":
                d["bnn_distill_path"] = str(Path(m.__file__).parent)
        except Exception as e:
            d[mod] = f"import failed: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = torch.cuda.get_device_name(0)
        d["gpu_count"] = torch.cuda.device_count()
        d["capability"] = f"{p.major}.{p.minor}"
        d["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        d["multiprocessors"] = p.multi_processor_count
        d["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            v = torch.cuda.nccl.version()
            d["nccl"] = ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        except Exception as e:
            d["nccl"] = f"unknown ({type(e).__name__})"
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        d["bf16_matmul_tflops"] = round(20 * 2 * 4096**3 / (time.perf_counter() - t0) / 1e12, 1)
    elif cfg["device"].startswith("cuda"):
        raise RuntimeError("full mode asked for CUDA but torch.cuda.is_available() is False")


# ============================================================================ section: steps


def _load_recipe(cfg, work: Path, name: str, epochs: int, batch: int, workers: int, limit_train: Optional[int] = None):
    from bnn_distill.recipe import load_recipe

    return load_recipe(cfg["recipe"], recipe_overrides(cfg, name, epochs, batch, workers, work, limit_train))


def _synthetic_batches(cfg, n_batches: int, batch: int, device):
    """CIFAR-shaped batches from the library's synthetic generator, normalised like the data set, on ``device``."""
    import torch

    from bnn_distill.data import SYNTHETIC_INFO, synthetic_arrays

    x, y, _, _ = synthetic_arrays(0, n_train=n_batches * batch, n_test=10)
    mean = torch.tensor(SYNTHETIC_INFO.mean).view(1, -1, 1, 1)
    std = torch.tensor(SYNTHETIC_INFO.std).view(1, -1, 1, 1)
    x = (x.float() / 255.0 - mean) / std
    return [
        (x[i * batch : (i + 1) * batch].to(device), y[i * batch : (i + 1) * batch].to(device)) for i in range(n_batches)
    ]


def _nosync_tau(model) -> int:
    """Diagnostic only: make every binary-weight quantiser read the ReCU tau as a Python float fixed now.

    ``BinaryWeightTensorQuant.forward`` calls ``float(self.tau)`` on a buffer that lives on the GPU:
    one device-to-host sync per binary conv per forward. This replica of that forward (same maths)
    shows what removing the sync is worth; it changes nothing in the library.
    """
    from bnn_distill.quant import binary_weight_quants, recu_tau_clamp, sign_with_grad

    n = 0
    for _, _, tq in binary_weight_quants(model):
        tau = float(tq.tau)

        def forward(w, tq=tq, tau=tau):
            wt = recu_tau_clamp(w, tau) if tq.recu else w
            scale = tq.scale(w)
            return sign_with_grad(wt, tq.gradient) * scale, scale, tq.zero_point, tq.bit_width

        tq.forward = forward
        n += 1
    return n


class StepConfig:
    """One training configuration, built with the library's code and stepped like ``Trainer._train_epoch``."""

    def __init__(
        self,
        key: str,
        recipe,
        stage,
        quant: str,
        terms,
        teacher,
        teacher_hook,
        rt,
        kind: str = "student",
        nosync: bool = False,
        compile_backend: Optional[str] = None,
    ):
        import torch

        from bnn_distill.losses import Criterion
        from bnn_distill.train import DistillStep, _make_optimizer, build_model, feature_layer, model_spec_dict

        self.key, self.rt, self.stage = key, rt, stage
        mcfg = recipe.teacher if kind == "teacher" else recipe.student
        spec = model_spec_dict(recipe, mcfg, quant, 10, 3)
        torch.manual_seed(0)
        self.model = build_model(spec).to(rt.device)
        path = feature_layer(mcfg)
        self.feat_dtypes: List[str] = []
        self._dtype_hook = self.model.get_submodule(path).register_forward_hook(
            lambda m, i, o: self.feat_dtypes.append(str(o.dtype)) if len(self.feat_dtypes) < 1 else None
        )
        s_dim = t_dim = None
        if any(t.name.startswith("itrd") for t in terms):
            s_dim = t_dim = self.model.num_features
        self.criterion = Criterion(terms, s_dim, t_dim).to(rt.device)
        self.teacher = teacher if self.criterion.needs_teacher else None
        self.teacher_hook = teacher_hook
        self.step_module = DistillStep(self.model, self.criterion, path)
        self.optimizer = _make_optimizer(stage, self.step_module)
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
        self.nosync = _nosync_tau(self.model) if nosync else 0
        if compile_backend:
            self._dtype_hook.remove()  # its list-length test would be a guard: a recompile on the second step
            self.step_module.student = torch.compile(self.model, backend=compile_backend)
        self.losses: List[Dict[str, float]] = []
        self.term_dtypes: Dict[str, str] = {}
        self.times: List[float] = []
        self.finite = True

    def static_bytes(self) -> int:
        own = sum(
            t.numel() * t.element_size() for t in list(self.step_module.parameters()) + list(self.step_module.buffers())
        )
        for st in self.optimizer.state.values():
            own += sum(v.numel() * v.element_size() for v in st.values() if hasattr(v, "numel"))
        return own

    def step(self, x, y, record: bool = False) -> None:
        import torch

        t_logits = t_feat = None
        with self.rt.autocast():
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(x)
                    t_feat = self.teacher_hook.pop()
            out = self.step_module(x, y, t_logits, t_feat)
        loss = out["loss"]
        finite = bool(torch.isfinite(loss).item())  # Trainer._step_checks: one .item() per step
        self.finite &= finite
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if record:
            if not self.term_dtypes:
                self.term_dtypes = {k: str(v.dtype) for k, v in out.items()}
            self.losses.append({k: float(v) for k, v in out.items() if k != "logits"})


def _make_configs(
    cfg,
    recipe,
    rt,
    wanted: Optional[List[str]] = None,
    compile_backend: Optional[str] = None,
    rec: Optional[Rec] = None,
):
    """The step configurations of the recipe, keyed by label; a configuration that fails to build is recorded
    and skipped."""
    import dataclasses

    import torch

    from bnn_distill.hooks import FeatureHook
    from bnn_distill.losses import Term
    from bnn_distill.train import build_model, feature_layer, model_spec_dict

    stages = {s.name: s for s in recipe.stages}
    tst, s1, s2 = stages["teacher"], stages["stage1"], stages["stage2"]
    itrd = [Term(t.name, t.weight, dict(t.params)) for t in s2.losses]
    ce = [Term("ce", 1.0, {})]
    torch.manual_seed(1)
    teacher = build_model(model_spec_dict(recipe, recipe.teacher, "FP", 10, 3))
    teacher = teacher.to(rt.device).eval().requires_grad_(False)
    thook = FeatureHook(teacher, feature_layer(recipe.teacher))
    fp32 = dataclasses.replace(rt, amp_dtype=None)
    plan = [
        ("teacher FP, CE (teacher stage)", dict(stage=tst, quant="FP", terms=ce, kind="teacher")),
        (
            "W32A1 ITRD (stage1)",
            dict(stage=s1, quant="W32A1", terms=[Term(t.name, t.weight, dict(t.params)) for t in s1.losses]),
        ),
        ("W1A1 ITRD (stage2)", dict(stage=s2, quant="W1A1", terms=itrd)),
        ("FP student, ITRD (same network and loss in FP)", dict(stage=s2, quant="FP", terms=itrd)),
        ("W1A1 CE only", dict(stage=s2, quant="W1A1", terms=ce)),
        ("FP student, CE only", dict(stage=s2, quant="FP", terms=ce)),
        ("W1A1 ITRD, fp32 (no autocast)", dict(stage=s2, quant="W1A1", terms=itrd, rt=fp32)),
        ("W1A1 ITRD, tau without host sync (diagnostic)", dict(stage=s2, quant="W1A1", terms=itrd, nosync=True)),
    ]
    configs = {}
    for key, kw in plan:
        if wanted is not None and key not in wanted:
            continue
        kw.setdefault("rt", rt)
        try:
            configs[key] = StepConfig(
                key,
                recipe,
                kw.pop("stage"),
                kw.pop("quant"),
                kw.pop("terms"),
                teacher,
                thook,
                compile_backend=compile_backend,
                **kw,
            )
        except Exception as e:
            if rec is None:
                raise
            rec.error(f"build {key}", e)
    return configs, teacher


def _count_syncs(fn) -> Dict[str, Any]:
    """CUDA synchronisations ``fn`` causes, by ``torch.cuda.set_sync_debug_mode('warn')``, with their sources."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sources: Dict[str, int] = {}
    for w in syncs:
        where = f"{Path(w.filename).name}:{w.lineno}"
        sources[where] = sources.get(where, 0) + 1
    return {"count": len(syncs), "sources": dict(sorted(sources.items(), key=lambda kv: -kv[1])[:8])}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sec_steps(cfg, rec: Rec) -> None:
    import torch

    from bnn_distill.train import Execution

    d = rec.data
    work = Path(cfg["work"])
    recipe = _load_recipe(cfg, work, "gpu_check_steps", 1, cfg["step_batch"], 0)
    rt = Execution.create(recipe, progress=False)
    cuda = rt.device.type == "cuda"
    B = cfg["step_batch"]
    d.update(
        device=str(rt.device),
        amp_dtype=str(rt.amp_dtype),
        batch=B,
        width_mult=cfg["width_mult"],
        arch=recipe.student.arch,
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
    )
    batches = _synthetic_batches(cfg, 4, B, rt.device)
    configs, teacher = _make_configs(cfg, recipe, rt, rec=rec)
    d["configs"] = list(configs)
    rows: Dict[str, Dict[str, Any]] = {k: {} for k in configs}
    d["rows"] = rows
    # warm-up (cudnn autotune), then one recorded step per configuration: dtypes, memory, syncs
    for k, c in list(configs.items()):
        try:
            for i in range(cfg["step_warmup"]):
                c.step(*batches[i % len(batches)], record=True)
            _sync(rt.device)
            row = rows[k]
            row["term_dtypes"] = c.term_dtypes
            row["feature_dtype"] = c.feat_dtypes[0] if c.feat_dtypes else None
            row["static_mib"] = round(c.static_bytes() / 2**20, 1)
            if cuda:
                base = torch.cuda.memory_allocated(rt.device)
                torch.cuda.reset_peak_memory_stats(rt.device)
                c.step(*batches[0])
                _sync(rt.device)
                row["step_transient_mib"] = round((torch.cuda.max_memory_allocated(rt.device) - base) / 2**20, 1)
                row["syncs_per_step"] = _count_syncs(lambda: c.step(*batches[1]))
            if c.nosync:
                row["quantisers_patched"] = c.nosync
        except Exception as e:
            rec.error(f"warm-up {k}", e)
            configs.pop(k)
        rec.save()
    # interleaved timing rounds
    k_steps = cfg["steps_per_round"]
    done_rounds = 0
    round_s = None
    for r in range(cfg["step_rounds"]):
        if round_s is not None and rec.left() < round_s * 1.5 + 25:  # keep time for the eval pass
            d["rounds_cut_by_budget"] = True
            break
        t_round = time.perf_counter()
        for k, c in list(configs.items()):
            try:
                _sync(rt.device)
                t0 = time.perf_counter()
                for j in range(k_steps):
                    c.step(*batches[(r + j) % len(batches)], record=j == k_steps - 1)
                _sync(rt.device)
                c.times.append((time.perf_counter() - t0) / k_steps)
            except Exception as e:
                rec.error(f"round {r} {k}", e)
                configs.pop(k)
        round_s = time.perf_counter() - t_round
        done_rounds = r + 1
        _summarise_steps(d, configs, rows, B, done_rounds, k_steps)
        rec.save()
    _summarise_steps(d, configs, rows, B, done_rounds, k_steps)
    if cuda:
        d["process_peak_gib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
    rec.save()
    # test-time forward throughput (evaluate() runs the model in eval mode under the same autocast)
    eval_ips = {}
    for key, model in (("W1A1 student", configs.get("W1A1 ITRD (stage2)")), ("FP teacher", teacher)):
        if model is None:
            continue
        m = model.model if hasattr(model, "model") else model
        try:
            eval_ips[key] = _eval_throughput(m, rt, cfg["eval_batch"], 3 if cfg["smoke"] else 20)
        except Exception as e:
            rec.error(f"eval throughput {key}", e)
    d["eval_images_per_s"] = eval_ips
    rec.save()


def _summarise_steps(d, configs, rows, B, rounds, k_steps) -> None:
    d["rounds"], d["steps_per_round"] = rounds, k_steps
    ref = configs.get("W1A1 ITRD (stage2)")
    ref_ms = 1000 * median(ref.times) if ref is not None and ref.times else float("nan")
    for k, c in configs.items():
        if not c.times:
            continue
        ms = 1000 * median(c.times)
        row = rows[k]
        row.update(
            median_ms=round(ms, 3),
            images_per_s=round(B / (ms / 1000), 1),
            vs_w1a1_itrd=round(ms / ref_ms, 3) if math.isfinite(ref_ms) else None,
            all_ms=[round(1000 * t, 3) for t in c.times],
            finite=c.finite,
            loss_first=c.losses[0]["loss"] if c.losses else None,
            loss_last=c.losses[-1]["loss"] if c.losses else None,
            terms_last={k2: round(v, 5) for k2, v in c.losses[-1].items()} if c.losses else None,
        )


def _eval_throughput(model, rt, batch: int, iters: int) -> float:
    import torch

    x = torch.randn(batch, 3, 32, 32, device=rt.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), rt.autocast():
            for _ in range(2):
                model(x)
            _sync(rt.device)
            t0 = time.perf_counter()
            for _ in range(iters):
                model(x).float()
            _sync(rt.device)
    finally:
        model.train(was)
    return round(batch * iters / (time.perf_counter() - t0), 1)


# ============================================================================ section: itrd_run


def sec_itrd_run(cfg, rec: Rec) -> None:
    import torch

    from bnn_distill.rundir import RunDir
    from bnn_distill.train import run_recipe

    d = rec.data
    work = Path(cfg["work"])
    recipe = _load_recipe(
        cfg, work, "gpu_check_itrd", cfg["run_epochs"], cfg["run_batch"], cfg["run_workers"], cfg["run_limit_train"]
    )
    d.update(
        run_dir=str(recipe.run_dir),
        epochs_per_stage=cfg["run_epochs"],
        batch=cfg["run_batch"],
        num_workers=recipe.data.num_workers,
        dataset=f"synthetic ({recipe.data.limit_train or 512} train / {recipe.data.limit_test or 256} test, 3x32x32)",
    )
    cuda = torch.cuda.is_available() and cfg["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        d["bf16_supported"] = torch.cuda.is_bf16_supported()
    rec.save()
    t0 = time.perf_counter()
    try:
        summary = run_recipe(recipe, resume=False, progress=False)
    finally:
        d["wall_s"] = round(time.perf_counter() - t0, 2)
        if cuda:
            d["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            d["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        d["metrics"] = _stage_metrics(recipe, RunDir.of(recipe).read_metrics())
        rec.save()
    d["summary_stages"] = [
        {k: s[k] for k in ("name", "quant", "epochs", "wall_s", "images_per_s", "final")} for s in summary["stages"]
    ]
    d["machine"] = summary.get("machine")
    d["complete"] = True


def _stage_metrics(recipe, metrics: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per stage: every term per epoch, finite, each term logged, loss first -> last epoch."""
    out: Dict[str, Any] = {}
    for st in recipe.stages:
        recs = [m for m in metrics if m.get("stage") == st.name]
        expected = sorted({t.name for t in st.losses} | {"loss"})
        epochs = [
            {
                "epoch": m["epoch"],
                **{k: round(v, 5) for k, v in m.get("train", {}).items()},
                "train_top1": round(m.get("train_top1", float("nan")), 2),
                "test_top1": m.get("test_top1"),
                "images_per_s": round(m.get("images_per_s", float("nan")), 1),
                "lr": m.get("lr"),
            }
            for m in recs
        ]
        logged = all(set(expected) <= set(m.get("train", {})) for m in recs) and bool(recs)
        finite = all(math.isfinite(v) for m in recs for v in m.get("train", {}).values())
        first, last = (recs[0]["train"]["loss"], recs[-1]["train"]["loss"]) if recs else (None, None)
        out[st.name] = {
            "quant": st.quant,
            "terms_expected": expected,
            "every_term_logged": logged,
            "finite": finite,
            "loss_first": first,
            "loss_last": last,
            "loss_down": (last < first) if recs and len(recs) > 1 else None,
            "epochs": epochs,
        }
    return out


# ============================================================================ section: torchrun (+ SIGTERM + --resume)

_CHILDREN: List[subprocess.Popen] = []


def _kill_children(*_a) -> None:
    for p in _CHILDREN:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass


def _torchrun_cmd(cfg, variant: str, overrides: List[str], resume: bool) -> List[str]:
    target = ["-m", "bnn_distill"] if variant == "cli" else [str(THIS), "--torchrun-shim", "--backend", cfg["backend"]]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        *target,
        "train",
        cfg["recipe"],
        "--no-progress",
    ]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def _launch(cmd: List[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    f = open(log, "wb")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    f.close()
    _CHILDREN.append(p)
    return p


def _wait(p: subprocess.Popen, timeout: float) -> Optional[int]:
    try:
        return p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=5)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return None


def _checkpoints(run_dir: Path) -> Dict[str, Any]:
    import torch

    from bnn_distill.rundir import RunDir

    out = {}
    run = RunDir(run_dir)
    for ck in [run.last(stage) for stage in run.stages_with_checkpoints()]:
        try:
            s = torch.load(ck, map_location="cpu", weights_only=True)
            part = s.get("partial")
            out[ck.parent.name] = {
                "epoch": s.get("epoch"),
                "step": s.get("step"),
                "complete": s.get("complete"),
                "partial_batch": part.get("batch") if part else None,
                "mib": round(ck.stat().st_size / 2**20, 1),
            }
        except Exception as e:
            out[ck.parent.name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def _torchrun_variant(cfg, rec: Rec, variant: str, cap: float) -> Dict[str, Any]:
    from bnn_distill.rundir import RunDir

    work = Path(cfg["work"])
    name = f"gpu_check_tr_{variant}"
    overrides = recipe_overrides(
        cfg, name, 1, cfg["torchrun_batch"], cfg["torchrun_workers"], work, cfg["torchrun_limit_train"]
    )
    run_dir = work / "runs" / name
    res: Dict[str, Any] = {"run_dir": str(run_dir), "command": " ".join(_torchrun_cmd(cfg, variant, overrides, False))}
    t_end = now() + cap
    log1 = work / f"torchrun_{variant}_1.log"
    p = _launch(_torchrun_cmd(cfg, variant, overrides, False), log1)
    trigger = RunDir(run_dir).last("teacher")
    t0 = now()
    while p.poll() is None and not trigger.exists() and now() < t_end - 20:
        time.sleep(0.02)
    if p.poll() is None and trigger.exists():
        os.kill(p.pid, signal.SIGTERM)  # to torchrun, as a scheduler would; it forwards it to the worker
        res["sigterm_after_s"] = round(now() - t0, 2)
    else:
        res["sigterm_after_s"] = None
        res["note"] = "the run ended or ran out of time before the teacher's checkpoint appeared; no signal sent"
    rc1 = _wait(p, t_end - now() - 15)
    log_text = tail(log1, 20000)
    res["first"] = {
        "rc": rc1,
        "log_tail": log_text[-2500:],
        "interrupted_line": next((ln for ln in log_text.splitlines() if ln.startswith("interrupted:")), None),
        "process_group": re.findall(r"(?:joined process group|GPU_CHECK_SHIM)[^\n]*", log_text)[:2],
        "checkpoints": _checkpoints(run_dir),
    }
    rec.save()
    log2 = work / f"torchrun_{variant}_2.log"
    p2 = _launch(_torchrun_cmd(cfg, variant, overrides, True), log2)
    rc2 = _wait(p2, t_end - now())
    log_text2 = tail(log2, 20000)
    res["resume"] = {
        "rc": rc2,
        "log_tail": log_text2[-2500:],
        "checkpoints": _checkpoints(run_dir),
        "resuming_lines": [ln for ln in log_text2.splitlines() if "resuming" in ln][:3],
    }
    summary = RunDir(run_dir).summary_file
    if summary.exists():
        s = json.loads(summary.read_text())
        res["resume"]["summary_stages"] = [
            {k: st.get(k) for k in ("name", "epochs", "wall_s", "images_per_s", "final")} for st in s["stages"]
        ]
        res["resume"]["device"] = s.get("machine", {}).get("device")
        res["resume"]["world_size"] = s.get("machine", {}).get("world_size")
        m = RunDir(run_dir).read_metrics()
        res["resume"]["epochs_logged"] = {
            st: [r["epoch"] for r in m if r["stage"] == st] for st in ("teacher", "stage1", "stage2")
        }
    ok = rc2 == 0 and summary.exists() and all(v == [1] for v in res["resume"].get("epochs_logged", {"x": []}).values())
    res["interrupted_by_sigterm"] = bool(res["sigterm_after_s"] is not None and rc1 not in (0, None))
    res["passed"] = bool(ok and res["interrupted_by_sigterm"])
    return res


def sec_torchrun(cfg, rec: Rec) -> None:
    previous = signal.signal(signal.SIGTERM, lambda *a: (_kill_children(), sys.exit(143)))
    d = rec.data
    d["variants"] = {}
    variants = cfg["torchrun_variants"]
    try:
        for i, v in enumerate(variants):
            later = len(variants) - 1 - i  # the first variant may take all but ~50 s for each later one
            share = max(rec.left() / (later + 1), rec.left() - 50 * later)
            if share < 25 and i > 0:
                d["variants"][v] = {"skipped": f"budget: {rec.left():.0f} s left"}
                continue
            try:
                d["variants"][v] = _torchrun_variant(cfg, rec, v, share)
            except Exception as e:
                d["variants"][v] = {"error": exc_info(e)}
            rec.save()
    finally:
        _kill_children()
        signal.signal(signal.SIGTERM, previous)
    d["passed"] = {v: r.get("passed") for v, r in d["variants"].items()}


def torchrun_shim(argv: List[str], backend: str) -> int:
    """Worker of variant ``nccl_ddp``: join a process group even at world size 1, so the library's DDP path runs.

    ``bnn_distill.distributed.init_distributed`` returns a single-process ``DistInfo`` when
    ``WORLD_SIZE`` is 1 (no process group, no NCCL). Here it is replaced, in this process only, by one
    that initialises the group (NCCL on CUDA, gloo on CPU, or ``--backend``) and reports DDP enabled:
    the Trainer then wraps the step in DistributedDataParallel and runs every collective.
    """
    import torch
    import torch.distributed as dist

    from bnn_distill import distributed as bd

    class ForcedDist(bd.DistInfo):
        @property
        def enabled(self) -> bool:  # type: ignore[override]
            return True

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def init_forced(use_cuda: bool):
        if not dist.is_initialized():
            be = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=be)
            print(
                f"GPU_CHECK_SHIM backend={dist.get_backend()} rank={dist.get_rank()} world={dist.get_world_size()}",
                file=sys.stderr,
                flush=True,
            )
        return ForcedDist(dist.get_rank(), dist.get_world_size(), local_rank)

    bd.init_distributed = init_forced
    from bnn_distill.cli import main

    return main(argv)


# ============================================================================ section: export


def sec_export(cfg, rec: Rec) -> None:
    import torch

    from bnn_distill.cli import main as cli_main
    from bnn_distill.rundir import RunDir

    d = rec.data
    work = Path(cfg["work"])
    d["cuda_visible_here"] = torch.cuda.is_available()
    candidates = [work / "runs" / f"gpu_check_tr_{v}" for v in cfg["torchrun_variants"]] + [
        work / "runs" / "gpu_check_itrd"
    ]
    run = next((c for c in candidates if RunDir(c).summary_file.exists()), None)
    if run is None:
        raise RuntimeError(f"no finished run to export among {[c.name for c in candidates]}")
    d["run"] = str(run)
    ck = RunDir(run).last("stage2")
    try:  # what the file holds: CUDA tensors need map_location on a CPU-only process (the library passes 'cpu')
        s = torch.load(ck, weights_only=True)
        dev = {str(v.device) for v in s["model"].values()}
        d["checkpoint_tensor_devices_plain_load"] = sorted(dev)
    except Exception as e:
        d["checkpoint_plain_load_without_map_location"] = f"{type(e).__name__}: {str(e)[:300]}"
    out = work / "export" / run.name
    argv = ["export", str(run), "--out", str(out)]
    if cfg["export_limit"]:
        argv += ["--limit-test", str(cfg["export_limit"])]
    d["command"] = "bnn-distill " + " ".join(argv)
    t0 = time.perf_counter()
    rc = cli_main(argv)
    d["wall_s"] = round(time.perf_counter() - t0, 2)
    d["rc"] = rc
    parity = out / "parity.json"
    if parity.exists():
        p = json.loads(parity.read_text())
        d["parity_passed"] = p.get("passed")
        d["images"] = p.get("images")
        d["models"] = {
            role: {
                k: r.get(k) for k in ("passed", "top1_agree", "n", "max_abs_diff", "atol", "onnx_top1", "torch_top1")
            }
            for role, r in p.get("models", {}).items()
        }
        d["binary_convs"], d["fused"] = p.get("binary_convs"), p.get("fused_matmul_integer_to_float")
    if (out / "manifest.json").exists():
        d["files"] = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    if rc != 0 and d.get("parity_passed") is False:
        try:
            d["failed_images_probe"] = _batch_dependence_probe(run)
        except Exception as e:
            rec.error("batch-dependence probe", e)
    if rc != 0:
        raise RuntimeError(f"bnn-distill export exited {rc}")


def _batch_dependence_probe(run: Path, max_images: int = 8) -> Dict[str, Any]:
    """For images whose exported logits differ: PyTorch's own logits at batch 1 against those in the test batch.

    ``check_parity`` runs PyTorch on batches of 256, but its diagnosis re-runs PyTorch on the failing
    images alone. A pre-activation within float rounding of 0 can take the other sign at another batch
    size (another conv algorithm), so a flip seen in the parity pass may vanish in the diagnosis, which
    then calls the difference unexplained. This measures that, with the library's own lowering.
    """
    import numpy as np
    import torch

    from bnn_distill.data import build_datasets
    from bnn_distill.export import INPUT_NAME, OUTPUT_NAME, lower, ort_session
    from bnn_distill.rundir import RunDir, model_from_checkpoint

    rd = RunDir(run)
    recipe = rd.recipe()
    model, _ = model_from_checkpoint(rd.last(recipe.stages[-1].name))
    model.eval()
    d = recipe.data
    _, test, _ = build_datasets(d.dataset, d.root, False, False, d.limit_train, d.limit_test, seed=recipe.seed)
    x = torch.stack([test[i][0] for i in range(min(len(test), 256))])
    proto, _ = lower(model, tuple(x.shape[1:]))
    got = ort_session(proto).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).float().numpy()
        diff = np.abs(got - ref).max(1)
        atol = 1e-3 * max(1.0, float(np.abs(ref).max()))
        bad = [int(j) for j in np.argsort(-diff)[:max_images] if diff[j] > atol]
        rows = []
        for j in bad:
            one = model(x[j : j + 1]).float().numpy()[0]
            rows.append(
                {
                    "image": j,
                    "onnx_vs_torch_batch": float(diff[j]),
                    "onnx_vs_torch_alone": float(np.abs(got[j] - one).max()),
                    "torch_batch_vs_alone": float(np.abs(ref[j] - one).max()),
                }
            )
    return {
        "batch": len(x),
        "atol": atol,
        "images": rows,
        "batch_dependent": bool(rows)
        and all(r["torch_batch_vs_alone"] > atol >= r["onnx_vs_torch_alone"] for r in rows),
    }


# ============================================================================ section: compile


def sec_compile(cfg, rec: Rec) -> None:
    import torch

    from bnn_distill.train import Execution

    d = rec.data
    work = Path(cfg["work"])
    recipe = _load_recipe(cfg, work, "gpu_check_compile", 1, cfg["step_batch"], 0)
    rt = Execution.create(recipe, progress=False)
    B = cfg["step_batch"]
    batches = _synthetic_batches(cfg, 4, B, rt.device)
    d.update(
        backend=cfg["compile_backend"],
        device=str(rt.device),
        amp_dtype=str(rt.amp_dtype),
        batch=B,
        torch=torch.__version__,
    )
    labels = {"W1A1": "W1A1 ITRD (stage2)", "FP": "FP student, ITRD (same network and loss in FP)"}
    d["models"] = {}
    for quant in cfg["compile_models"]:
        if rec.left() < 30 and d["models"]:
            d["models"][quant] = {"skipped": f"budget: {rec.left():.0f} s left"}
            continue
        r: Dict[str, Any] = {}
        d["models"][quant] = r
        try:
            import torch._dynamo

            torch._dynamo.reset()
            from torch._dynamo.utils import counters

            counters.clear()
            key = labels[quant]
            eager, _ = _make_configs(cfg, recipe, rt, [key])
            comp, _ = _make_configs(cfg, recipe, rt, [key], compile_backend=cfg["compile_backend"])
            e, c = eager[key], comp[key]
            x, y = batches[0]
            t0 = time.perf_counter()
            c.step(x, y, record=True)
            _sync(rt.device)
            r["first_step_s"] = round(time.perf_counter() - t0, 2)  # compile of forward and backward
            e.step(x, y, record=True)
            r["first_step_loss"] = {"eager": e.losses[0]["loss"], "compiled": c.losses[0]["loss"]}
            t0 = time.perf_counter()
            c.step(*batches[1], record=True)
            _sync(rt.device)
            r["second_step_s"] = round(time.perf_counter() - t0, 3)  # a recompilation would show here
            r["graph_breaks"] = {str(k): v for k, v in counters.get("graph_break", {}).items()}
            r["unique_graphs"] = counters.get("stats", {}).get("unique_graphs")
            rec.save()
            for i in range(cfg["compile_rounds"]):
                if rec.left() < 10:
                    r["rounds_cut_by_budget"] = True
                    break
                for cc in (e, c):
                    _sync(rt.device)
                    t0 = time.perf_counter()
                    for j in range(cfg["steps_per_round"]):
                        cc.step(*batches[(i + j) % len(batches)])
                    _sync(rt.device)
                    cc.times.append((time.perf_counter() - t0) / cfg["steps_per_round"])
            em, cm = 1000 * median(e.times), 1000 * median(c.times)
            r.update(
                eager_ms=round(em, 3),
                compiled_ms=round(cm, 3),
                speedup=round(em / cm, 3) if cm else None,
                compiled_images_per_s=round(B / (cm / 1000), 1) if cm else None,
                finite=c.finite,
                rounds=len(c.times),
                status="ok",
            )
            del eager, comp, e, c
        except Exception as ex:
            r["status"] = "error"
            r["error"] = exc_info(ex)
        rec.save()
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
    if all(m.get("status") == "error" for m in d["models"].values() if "status" in m):
        d["status"] = "error"


# ============================================================================ test-only section


def sec__sleep(cfg, rec: Rec) -> None:
    """For tests of the orchestration: sleeps past any cap."""
    rec.data["slept"] = True
    rec.save()
    time.sleep(max(0.0, rec.left()) + 30)


SECTIONS: Dict[str, Callable] = {
    "env": sec_env,
    "steps": sec_steps,
    "itrd_run": sec_itrd_run,
    "torchrun": sec_torchrun,
    "export": sec_export,
    "compile": sec_compile,
    "_sleep": sec__sleep,
}


# ============================================================================ estimate and findings


def estimate(results: Dict[str, Any]) -> Dict[str, Any]:
    """Wall time of the paper's recipe from the measured throughputs (an estimate: no data loading, no checkpoint
    I/O)."""
    steps = results.get("steps", {})
    rows = steps.get("rows", {})
    ev = steps.get("eval_images_per_s", {})
    ips = {k: r.get("images_per_s") for k, r in rows.items() if r.get("images_per_s")}
    out: Dict[str, Any] = {
        "basis": "step throughput at batch %s (synthetic batches already on the device, no data "
        "loading, no checkpoint writes) + a test pass of %d images per epoch at the measured "
        "test-time throughput" % (steps.get("batch"), PAPER["test_images"]),
        "train_images_per_epoch": PAPER["train_images"],
    }
    w1 = ips.get("W1A1 ITRD (stage2)")
    if not w1:
        out["error"] = "no W1A1 ITRD step throughput measured"
        return out
    e_s = ev.get("W1A1 student")
    e_t = ev.get("FP teacher")

    def epoch_s(train_ips, eval_ips):
        return PAPER["train_images"] / train_ips + (PAPER["test_images"] / eval_ips if eval_ips else 0.0)

    single = PAPER["epochs"] * epoch_s(w1, e_s)
    out["single_stage_600_w1a1_h"] = round(single / 3600, 2)
    w32 = ips.get("W32A1 ITRD (stage1)")
    if w32:
        two = 300 * epoch_s(w32, e_s) + 300 * epoch_s(w1, e_s)
        out["two_stage_300_300_h"] = round(two / 3600, 2)
    tea = ips.get("teacher FP, CE (teacher stage)")
    if tea:
        out["teacher_200_h"] = round(PAPER["teacher_epochs"] * epoch_s(tea, e_t) / 3600, 2)
    if w32 and tea:
        out["resnet18_binary_yaml_total_h"] = round(out["teacher_200_h"] + out["two_stage_300_300_h"], 2)
    comp = results.get("compile", {}).get("models", {}).get("W1A1", {})
    if comp.get("compiled_images_per_s") and comp.get("speedup"):
        out["single_stage_600_w1a1_compiled_h"] = round(PAPER["epochs"] * epoch_s(w1 * comp["speedup"], e_s) / 3600, 2)
    run = results.get("itrd_run", {})
    trainer_ips = {s["name"]: s.get("images_per_s") for s in run.get("summary_stages", [])}
    if trainer_ips.get("stage2"):
        out["single_stage_600_from_trainer_h"] = round(
            PAPER["epochs"] * PAPER["train_images"] / trainer_ips["stage2"] / 3600, 2
        )
        out["trainer_note"] = (
            f"the trainer's own images/s in itrd_run: data loading included, but on epochs of "
            f"{run.get('dataset', 'a few hundred images')} at batch {run.get('batch')}, where the "
            "per-epoch loader start-up weighs far more than on CIFAR-10"
        )
    return out


def findings(results: Dict[str, Any]) -> List[str]:
    """What the numbers say about the library's CUDA path, one line each ('OK' or 'ISSUE' first)."""
    f: List[str] = []
    steps = results.get("steps", {})
    rows = steps.get("rows", {})
    if rows:
        bad = {
            k: {t: dt for t, dt in r.get("term_dtypes", {}).items() if t != "logits" and dt != "torch.float32"}
            for k, r in rows.items()
        }
        bad = {k: v for k, v in bad.items() if v}
        amp = steps.get("amp_dtype")
        if bad:
            f.append(f"ISSUE losses not in fp32 under autocast ({amp}): {bad}")
        elif any(r.get("term_dtypes") for r in rows.values()):
            feats = {r.get("feature_dtype") for r in rows.values() if r.get("feature_dtype")}
            f.append(
                f"OK every loss term is float32 under autocast {amp} (features hooked as {sorted(feats)}, "
                "cast by the criterion)"
            )
        w1, ns = rows.get("W1A1 ITRD (stage2)", {}), rows.get("W1A1 ITRD, tau without host sync (diagnostic)", {})
        s1 = (w1.get("syncs_per_step") or {}).get("count")
        s2 = (ns.get("syncs_per_step") or {}).get("count")
        if s1 is not None:
            gain = ""
            if w1.get("median_ms") and ns.get("median_ms"):
                gain = (
                    f"; the step without them: {ns['median_ms']:.2f} ms against {w1['median_ms']:.2f} ms "
                    f"({w1['median_ms'] / ns['median_ms']:.3f}x)"
                )
            level = "ISSUE" if s2 is not None and s1 > s2 else "OK"
            f.append(
                f"{level} W1A1 step: {s1} host syncs per step ({s2} with tau read as a Python float); sources "
                f"{w1['syncs_per_step'].get('sources')}{gain}. bnn_distill/quant.py BinaryWeightTensorQuant.forward "
                "calls float(self.tau) on a CUDA buffer once per binary conv per forward"
            )
        if not all(r.get("finite", True) for r in rows.values()):
            f.append(
                "ISSUE a step configuration produced a non-finite loss: "
                + ", ".join(k for k, r in rows.items() if not r.get("finite", True))
            )
    run = results.get("itrd_run", {})
    for st, m in (run.get("metrics") or {}).items():
        if not m.get("finite") or not m.get("every_term_logged"):
            f.append(
                f"ISSUE itrd_run stage {st}: finite={m.get('finite')} every term logged={m.get('every_term_logged')}"
            )
        elif m.get("loss_down") is False:
            f.append(
                f"NOTE itrd_run stage {st}: train loss did not go down ({m['loss_first']:.4f} -> {m['loss_last']:.4f})"
            )
    tr = results.get("torchrun", {}).get("variants", {})
    cli = tr.get("cli", {})
    if cli and not cli.get("error") and not cli.get("skipped"):
        pg = cli.get("first", {}).get("process_group")
        f.append(
            "NOTE plain `torchrun --nproc_per_node=1 -m bnn_distill train` joins no process group "
            f"(bnn_distill/distributed.py init_distributed returns early when WORLD_SIZE <= 1; seen: {pg or 'none'}), "
            "so NCCL is exercised only by the nccl_ddp variant, which forces the DDP path at world size 1"
        )
    for v, r in tr.items():
        if r.get("passed") is False:
            f.append(
                f"ISSUE torchrun {v}: SIGTERM + --resume did not pass (first rc {r.get('first', {}).get('rc')}, "
                f"resume rc {r.get('resume', {}).get('rc')})"
            )
    ex = results.get("export", {})
    if ex.get("checkpoint_plain_load_without_map_location"):
        f.append(
            "OK checkpoints written on CUDA hold CUDA tensors (a plain torch.load on a CPU-only process fails: "
            f"{ex['checkpoint_plain_load_without_map_location'][:90]}...); the library loads with map_location='cpu' "
            "and the export ran"
        )
    if ex.get("parity_passed") is False or (ex.get("rc") not in (None, 0)):
        f.append(f"ISSUE export of the GPU-trained run: rc {ex.get('rc')}, parity passed {ex.get('parity_passed')}")
    probe = ex.get("failed_images_probe") or {}
    if probe.get("batch_dependent"):
        f.append(
            "ISSUE bnn_distill/export.py check_parity: the failing images' PyTorch logits depend on the batch size "
            f"({[(r['image'], round(r['torch_batch_vs_alone'], 4)) for r in probe['images']]}: "
            f"batch of {probe['batch']} vs alone), "
            "and alone they equal the ONNX graph's; diagnose() re-runs PyTorch on the failing images alone, "
            "sees no sign "
            "flip and calls the difference 'unexplained'. Fix: take the flips from the parity pass's own batch"
        )
    for q, m in results.get("compile", {}).get("models", {}).items():
        if m.get("status") == "error":
            err = m.get("error", {})
            f.append(f"NOTE torch.compile of the {q} student failed: {err.get('type')}: {err.get('message', '')[:200]}")
        elif m.get("speedup"):
            f.append(
                f"NOTE torch.compile ({results['compile'].get('backend')}) of the {q} student: "
                f"{m['speedup']:.2f}x the eager "
                f"step after {m.get('first_step_s')} s of compilation; "
                f"graph breaks {sum(m.get('graph_breaks', {}).values())}"
            )
    return f


# ============================================================================ report


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
    return str(v)


def render_md(report: Dict[str, Any]) -> str:
    meta, res = report["meta"], report["sections"]
    env = res.get("env", {})
    L = [
        f"# bnn-distill GPU check{' (CPU smoke)' if meta['smoke'] else ''}",
        "",
        f"GPU: **{env.get('gpu', 'none')}** ({env.get('gpu_memory_gib', '-')} GiB, "
        f"capability {env.get('capability', '-')}, "
        f"bf16 {env.get('bf16_supported', '-')}; nvidia-smi: {env.get('nvidia_smi', '-')}). "
        f"torch {env.get('torch', '-')} "
        f"(CUDA {env.get('torch_cuda', '-')}, cuDNN {env.get('cudnn', '-')}, NCCL {env.get('nccl', '-')}), brevitas "
        f"{env.get('brevitas', '-')}, onnxruntime {env.get('onnxruntime', '-')}, Python {env.get('python', '-')}, "
        f"{env.get('cpu_count', '-')} CPUs, commit {env.get('git_commit', '-')}.",
        "",
        f"Started {meta['started']}, {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget; "
        f"device {meta['device']}, "
        f"width x{meta['width_mult']}.",
        "",
        "| section | status | s |",
        "|---|---|---:|",
    ]
    for name in meta["sections"]:
        r = res.get(name, {})
        st = r.get("status", "not run")
        if r.get("error"):
            st += f": {r['error'].get('type')}: {r['error'].get('message', '')[:120]}"
        L.append(f"| {name} | {st} | {_fmt(r.get('section_wall_s'), 0)} |")
    f = report.get("findings", [])
    if f:
        L += ["", "## Findings", ""] + [f"* {x}" for x in f]
    s = res.get("steps", {})
    if s.get("rows"):
        L += [
            "",
            f"## One optimiser step, batch {s.get('batch')}, {s.get('amp_dtype')} autocast on {s.get('device')} "
            f"({s.get('arch')} x{s.get('width_mult')}; medians of {s.get('rounds')} interleaved rounds of "
            f"{s.get('steps_per_round')} steps)",
            "",
            "| configuration | ms/step | images/s | vs W1A1 ITRD | step transient MiB | static MiB | syncs/step "
            "| loss first -> last |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for k, r in s["rows"].items():
            sy = (r.get("syncs_per_step") or {}).get("count")
            L.append(
                f"| {k} | {_fmt(r.get('median_ms'), 2)} | {_fmt(r.get('images_per_s'), 0)} | "
                f"{_fmt(r.get('vs_w1a1_itrd'), 3)} | "
                f"{_fmt(r.get('step_transient_mib'))} | {_fmt(r.get('static_mib'))} | {_fmt(sy)} | "
                f"{_fmt(r.get('loss_first'), 4)} -> {_fmt(r.get('loss_last'), 4)}"
                f"{'' if r.get('finite', True) else ' NON-FINITE'} |"
            )
        ev = s.get("eval_images_per_s", {})
        L += [
            "",
            f"Test-time forward: {', '.join(f'{k} {v:.0f} images/s' for k, v in ev.items()) or '-'}. "
            f"Peak GPU memory of the process (all configurations resident): {_fmt(s.get('process_peak_gib'), 2)} GiB.",
        ]
    r = res.get("itrd_run", {})
    if r.get("metrics"):
        L += [
            "",
            f"## ITRD pipeline (`run_recipe`, resnet18_binary.yaml on {r.get('dataset')}, {r.get('epochs_per_stage')} "
            f"epochs per stage, batch {r.get('batch')}, {r.get('num_workers')} loader workers)",
            "",
            f"Wall {_fmt(r.get('wall_s'))} s; peak GPU memory {_fmt(r.get('peak_gpu_gib'), 2)} GiB allocated, "
            f"{_fmt(r.get('peak_gpu_reserved_gib'), 2)} GiB reserved.",
            "",
            "| stage | quant | every term logged | finite | loss first -> last epoch | terms, last epoch "
            "| trainer images/s | test top-1 |",
            "|---|---|---|---|---|---|---:|---:|",
        ]
        ips = {st["name"]: st.get("images_per_s") for st in r.get("summary_stages", [])}
        for st, m in r["metrics"].items():
            last = m["epochs"][-1] if m["epochs"] else {}
            terms = ", ".join(f"{t}={last.get(t):.4f}" for t in m["terms_expected"] if isinstance(last.get(t), float))
            L.append(
                f"| {st} | {m['quant']} | {m['every_term_logged']} | {m['finite']} | {_fmt(m['loss_first'], 4)} -> "
                f"{_fmt(m['loss_last'], 4)} "
                f"({'down' if m['loss_down'] else 'NOT down' if m['loss_down'] is False else '-'}) | "
                f"{terms} | {_fmt(ips.get(st), 0)} | {_fmt(last.get('test_top1'), 2)} |"
            )
    t = res.get("torchrun", {})
    if t.get("variants"):
        L += [
            "",
            "## torchrun --nproc_per_node=1, SIGTERM, --resume",
            "",
            "| variant | process group | SIGTERM after s | first rc | interrupted | resume rc | epochs logged "
            "| passed |",
            "|---|---|---:|---:|---|---:|---|---|",
        ]
        for v, x in t["variants"].items():
            if x.get("error") or x.get("skipped"):
                why = x.get("skipped") or x["error"].get("type") + ": " + x["error"].get("message", "")[:100]
                L.append(f"| {v} | {why} | | | | | | False |")
                continue
            fi, re_ = x.get("first", {}), x.get("resume", {})
            L.append(
                f"| {v} | {'; '.join(fi.get('process_group') or []) or 'none'} | {_fmt(x.get('sigterm_after_s'), 2)} | "
                f"{fi.get('rc')} | {(fi.get('interrupted_line') or '-')[:160]} | {re_.get('rc')} | "
                f"{re_.get('epochs_logged')} | {x.get('passed')} |"
            )
    e = res.get("export", {})
    if e.get("command"):
        L += [
            "",
            "## Export on CPU",
            "",
            f"`{e['command']}` (CUDA visible to the exporting process: {e.get('cuda_visible_here')}): "
            f"rc {e.get('rc')}, parity passed **{e.get('parity_passed')}** on {e.get('images')} images, "
            f"{_fmt(e.get('wall_s'))} s; "
            f"{e.get('fused')}/{e.get('binary_convs')} binary convs fused into MatMulIntegerToFloat.",
            "",
        ]
        if e.get("models"):
            L += ["| model | top-1 agree | max logit diff | tol |", "|---|---:|---:|---:|"]
            for role, m in e["models"].items():
                L.append(
                    f"| {role} | {m.get('top1_agree')}/{m.get('n')} | {_fmt(m.get('max_abs_diff'), 6)} | "
                    f"{_fmt(m.get('atol'), 6)} |"
                )
    c = res.get("compile", {})
    if c.get("models"):
        L += [
            "",
            f"## torch.compile of the student (backend {c.get('backend')}, {c.get('amp_dtype')}, "
            f"batch {c.get('batch')})",
            "",
            "| student | status | first step (compile) s | eager ms | compiled ms | speed-up | graph breaks |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for q, m in c["models"].items():
            err = m.get("error")
            st = m.get("status") or m.get("skipped") or "-"
            if err:
                st = f"error: {err.get('type')}: {err.get('message', '')[:150]}"
            L.append(
                f"| {q} | {st} | {_fmt(m.get('first_step_s'))} | {_fmt(m.get('eager_ms'), 2)} | "
                f"{_fmt(m.get('compiled_ms'), 2)} | "
                f"{_fmt(m.get('speedup'), 3)} | {m.get('graph_breaks') if m.get('graph_breaks') is not None else '-'} |"
            )
    est = report.get("estimate", {})
    if est:
        L += ["", "## Estimate: the paper's CIFAR-10 recipe on this GPU", "", f"Basis: {est.get('basis')}.", ""]
        if est.get("error"):
            L.append(f"Not available: {est['error']}.")
        else:
            L += [
                "| schedule | estimated hours |",
                "|---|---:|",
                f"| 600 epochs W1A1 ITRD (the paper's single stage) | {_fmt(est.get('single_stage_600_w1a1_h'), 2)} |",
                "| 300 W32A1 + 300 W1A1 ITRD (resnet18_binary.yaml's students) | "
                f"{_fmt(est.get('two_stage_300_300_h'), 2)} |",
                "| + 200-epoch FP teacher (resnet18_binary.yaml in full) | "
                f"{_fmt(est.get('resnet18_binary_yaml_total_h'), 2)} |",
            ]
            if est.get("single_stage_600_w1a1_compiled_h"):
                L.append(
                    f"| 600 epochs W1A1 ITRD, student compiled | {_fmt(est['single_stage_600_w1a1_compiled_h'], 2)} |"
                )
            if est.get("single_stage_600_from_trainer_h"):
                L.append(
                    f"| 600 epochs W1A1, from {est.get('trainer_note')} | "
                    f"{_fmt(est['single_stage_600_from_trainer_h'], 2)} |"
                )
    return "\n".join(L) + "\n"


# ============================================================================ orchestration


def run_section_inline(name: str, cfg: Dict[str, Any], cap: float, registry: Dict[str, Callable]) -> Dict[str, Any]:
    rec = Rec(Path(cfg["work"]) / "sections" / f"{name}.json", now() + cap, cfg)
    t0 = now()
    try:
        if cfg.get("inject_failure") == name:
            raise RuntimeError(f"failure injected into section '{name}' (--inject-failure)")
        registry[name](cfg, rec)
        rec.data["status"] = "error" if rec.data.get("status") == "error" else "ok"
    except BaseException as e:  # noqa: B902 - a section must never take the others down
        rec.data["status"] = "error"
        rec.data["error"] = exc_info(e)
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        rec.data["section_wall_s"] = round(now() - t0, 2)
        rec.save()
    return rec.data


def run_section_isolated(name: str, cfg: Dict[str, Any], cap: float) -> Dict[str, Any]:
    work = Path(cfg["work"])
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result_path = work / "sections" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if name == "export":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the export runs on CPU, as on a machine without a GPU
    cmd = [sys.executable, str(THIS), "--child", name, "--work", str(work), "--cap", f"{cap:.1f}"]
    t0 = now()
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    status = None
    try:
        rc = p.wait(timeout=cap + 5)
    except subprocess.TimeoutExpired:
        status = "timeout"
        try:
            os.killpg(p.pid, signal.SIGTERM)
            rc = p.wait(timeout=8)
        except Exception:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            rc = p.wait()
    try:
        data = json.loads(result_path.read_text())
    except (OSError, ValueError):
        data = {}
    if status == "timeout":
        data["status"] = "timeout"
        data.setdefault("error", {"type": "Timeout", "message": f"killed at its cap of {cap:.0f} s", "where": []})
    elif data.get("status") in (None, "running"):
        data["status"] = "crashed"
        data["error"] = {"type": "Crashed", "message": f"exit status {rc} before the section finished", "where": []}
    data["rc"] = rc
    data["section_wall_s"] = round(now() - t0, 2)
    data["log_tail"] = tail(log, 3000)
    return data


def child_main(name: str, work: Path, cap: float) -> int:
    cfg = json.loads((work / "config.json").read_text())
    signal.signal(signal.SIGTERM, lambda *a: (_kill_children(), sys.exit(143)))
    data = run_section_inline(name, cfg, cap - 2, SECTIONS)
    return 0 if data.get("status") == "ok" else 1


def orchestrate(cfg: Dict[str, Any], registry: Dict[str, Callable] = SECTIONS) -> Dict[str, Any]:
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg["work"])
    work.mkdir(parents=True, exist_ok=True)
    atomic_json(work / "config.json", cfg)
    t_start = now()
    deadline = t_start + cfg["budget_s"]
    report: Dict[str, Any] = {
        "meta": {k: cfg[k] for k in ("smoke", "device", "budget_s", "isolate", "sections", "width_mult")},
        "sections": {},
    }
    report["meta"]["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["meta"]["config"] = cfg
    for name in cfg["sections"]:
        left = deadline - now() - REPORT_RESERVE_S
        cap = min(CAPS.get(name, (60, 60))[1 if cfg["smoke"] else 0], left)
        if name not in registry:
            res = {
                "status": "error",
                "error": {"type": "KeyError", "message": f"unknown section '{name}'", "where": []},
            }
        elif cap < MIN_SECTION_S[cfg["smoke"]]:
            res = {
                "status": "skipped",
                "error": {"type": "Budget", "message": f"{max(left, 0):.0f} s left of the budget", "where": []},
            }
        else:
            print(f"[gpu_check] {name}: up to {cap:.0f} s ({deadline - now():.0f} s of the budget left)", flush=True)
            if cfg["isolate"] and registry is SECTIONS:
                res = run_section_isolated(name, cfg, cap)
            else:
                res = run_section_inline(name, cfg, cap, registry)
            print(
                f"[gpu_check] {name}: {res.get('status')} in {res.get('section_wall_s')} s"
                + (
                    f" ({res['error'].get('type')}: {res['error'].get('message', '')[:200]})"
                    if res.get("error")
                    else ""
                ),
                flush=True,
            )
        report["sections"][name] = res
        _write_report(report, out, t_start)
    report["estimate"] = estimate(report["sections"])
    report["findings"] = findings(report["sections"])
    _write_report(report, out, t_start)
    return report


def _write_report(report: Dict[str, Any], out: Path, t_start: float) -> None:
    report["meta"]["wall_s"] = round(now() - t_start, 1)
    atomic_json(out / RESULT_JSON, report)
    (out / RESULT_MD).write_text(render_md(report))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument(
        "--work", help="scratch folder for runs, checkpoints, exports and logs (default: a new temporary folder)"
    )
    ap.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny width, a few steps, seconds")
    ap.add_argument(
        "--device", default="auto", help="cuda, cpu or cuda:N (default: cuda in full mode, cpu with --smoke)"
    )
    ap.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "nccl", "gloo"),
        help="process-group backend of the nccl_ddp torchrun variant",
    )
    ap.add_argument("--budget", type=float, help="global time budget in seconds (default 450; 600 with --smoke)")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTION_ORDER)}")
    ap.add_argument("--skip", help="comma-separated sections to leave out")
    iso = ap.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="one process per section (default in full mode)",
    )
    iso.add_argument(
        "--inline", dest="isolate", action="store_false", help="all sections in this process (default with --smoke)"
    )
    ap.add_argument("--width-mult", type=float, help="model width (default 1.0; 0.125 with --smoke)")
    ap.add_argument("--batch", type=int, help="batch size of every section (default 256; smaller with --smoke)")
    ap.add_argument(
        "--run-epochs", type=int, help="epochs per stage of the itrd_run section (default 8; 2 with --smoke)"
    )
    ap.add_argument("--torchrun-variants", help="comma-separated: nccl_ddp, cli (default both; nccl_ddp with --smoke)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default inductor; eager with --smoke)")
    ap.add_argument("--inject-failure", metavar="SECTION", help="testing: make SECTION raise at its start")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--torchrun-shim", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--torchrun-shim" in argv:  # worker under torchrun: everything after our two options is bnn-distill's
        i = argv.index("--torchrun-shim")
        rest = argv[:i] + argv[i + 1 :]
        backend = "auto"
        if rest[:1] == ["--backend"]:
            backend, rest = rest[1], rest[2:]
        return torchrun_shim(rest, backend)
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child, Path(args.work), args.cap)
    cfg = make_cfg(args)
    cfg["out"] = str(Path(args.out).resolve())
    cfg["work"] = str(Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_")))
    report = orchestrate(cfg)
    print(render_md(report))
    print(f"[gpu_check] wrote {Path(cfg['out']) / RESULT_JSON} and {RESULT_MD}; scratch in {cfg['work']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
