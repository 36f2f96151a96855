"""Process-group helpers for PyTorch DDP launched by ``torchrun`` (NCCL on GPU, gloo on CPU).

When a process of the group dies (killed, out of memory, a lost machine), the others fail in
their next collective; :func:`peer_failure` turns that error into one line naming the ranks, so
the CLI can end with it (exit status 2) instead of a traceback, and ``--resume`` continues from
the last checkpoint. ``BNN_DISTILL_DIST_TIMEOUT_S`` bounds how long a collective waits for a
peer that hangs instead of dying (default: PyTorch's, 30 minutes for gloo).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = _timeout()
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
        log.info("joined process group: backend=%s rank=%d/%d", backend, dist.get_rank(), world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_min(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if ``flag`` is true on every process."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


TIMEOUT_ENV = "BNN_DISTILL_DIST_TIMEOUT_S"


def _timeout() -> Optional[datetime.timedelta]:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        from .errors import UserError

        raise UserError(f"{TIMEOUT_ENV}={text!r}: give a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


# what gloo and NCCL say when a peer is gone or silent
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|connection refused|"
    r"NCCL communicator was aborted|remote process exited|Timed out waiting|timed out|"
    r"Socket Timeout|terminated due to timeout|Connection reset|ECONNRESET|EPIPE",
    re.I,
)


def peer_failure(exc: BaseException) -> Optional[str]:
    """One line for an error of a collective caused by another process of the group, else None."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    is_dist_error = isinstance(exc, getattr(dist, "DistError", ())) if hasattr(dist, "DistError") else False
    if not (_PEER_GONE.search(text) or is_dist_error):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    others = [r for r in range(world) if r != rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"another rank of {', '.join(map(str, others))}"
    timed_out = re.search(r"timed out|timeout", text, re.I) is not None
    what = "stopped answering" if timed_out else "stopped (its process died or closed the connection)"
    first = re.sub(r"^\[[^\]]*\]\s*", "", (text.strip().splitlines() or [""])[0])
    first = first if len(first) <= 120 else first[:117] + "..."
    return (
        f"rank {rank} of {world}: {who} {what} ({first}); see that rank's log, then continue from the last "
        "checkpoint with --resume"
    )
