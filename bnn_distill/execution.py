"""Where and how a run executes: :class:`Execution` (device, AMP, DDP, memory layout),
:class:`StopFlag` (Ctrl-C / SIGTERM saved at the next step) and :func:`machine_info`."""

from __future__ import annotations

import logging
import platform
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import distributed as ddp
from .errors import UserError
from .recipe import Recipe
from .rundir import CURVES_FILE, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, RunDir  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop saves and stops at the next step.

    A second SIGINT falls back to Python's default (immediate ``KeyboardInterrupt``).
    """

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self.exit_code = 130
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = name
        self.exit_code = 128 + signum
        log.warning("%s received: saving progress at the next step (Ctrl-C again to abort at once)", name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------- execution: device, AMP, DDP


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The layout bnn-distill runs models in on ``device``: channels_last on CPU, NCHW elsewhere.

    Training and every evaluation of its weights use it, so a checkpoint scores exactly what it
    scored during training: the two layouts sum a convolution in different orders, and in a binary
    network an activation within rounding of 0 then takes the other sign (one image in 5000 of a
    Fashion-MNIST validation split changed its prediction that way)."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


@dataclass
class Execution:
    """Where and how a run executes: device, mixed precision (AMP), process group (DDP), memory
    layout, progress bars. (Not the CLI's ``--runtime``, which chooses an exported ONNX graph.)"""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    dist: ddp.DistInfo
    progress: bool = True
    # channels_last on CPU (memory_format_for): oneDNN's convolutions run the ResNet-20 W1A1 step
    # ~20% faster and the teacher's forward ~20% faster than in NCHW (benchmarks/results/train_cost.md);
    # the pre-sign values agree within float rounding. CUDA keeps NCHW until it is measured there
    # (benchmarks/gpu_check.py).
    memory_format: torch.memory_format = torch.contiguous_format

    @staticmethod
    def create(recipe: Recipe, progress: bool = True) -> "Execution":
        want = recipe.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device: '{recipe.device}' asked for CUDA but no GPU is visible; use device: auto or cpu")
        use_cuda = want.startswith("cuda")
        info = ddp.init_distributed(use_cuda)
        device = torch.device(f"cuda:{info.local_rank}" if use_cuda and info.enabled else want)
        amp_dtype = None
        if use_cuda and recipe.amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if use_cuda:
            torch.backends.cudnn.benchmark = True
        return Execution(device, amp_dtype, info, progress and info.is_main, memory_format_for(device))

    def layout(self, module: nn.Module) -> nn.Module:
        """``module`` on this device, its 4-d parameters and buffers in :attr:`memory_format`."""
        return module.to(self.device, memory_format=self.memory_format)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A batch of images (B, C, H, W) in :attr:`memory_format` and labels (B,), on this device."""
        return (
            x.to(self.device, non_blocking=True, memory_format=self.memory_format),
            y.to(self.device, non_blocking=True),
        )

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for float16 autocast; a pass-through otherwise (bfloat16 and float32 need none)."""
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel under torchrun, else ``module`` itself."""
        if not self.dist.enabled:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def all_agree(self, *flags: bool) -> Tuple[bool, ...]:
        """Each flag true on every process (one collective under torchrun; as given otherwise)."""
        if not self.dist.enabled:
            return tuple(flags)
        t = torch.tensor([int(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return tuple(bool(v) for v in t)


def machine_info(ex: Optional[Execution] = None) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if ex is not None:
        info["device"] = str(ex.device)
        info["world_size"] = ex.dist.world_size
        if ex.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(ex.device)
    return info
