"""Checkpoints: written atomically, loaded without executing pickled code.

A checkpoint is a plain ``dict`` of tensors and Python primitives, saved with ``torch.save`` to a
temporary file in the same folder, flushed to disk, then renamed over the final name, so a reader
never sees a half-written file under that name. A full disk or a read-only folder ends the write
with one line (:class:`~bnn_distill.errors.WriteError`) naming the path and the errno; the previous
file stays under its name and the temporary file is removed. Loading uses ``torch.load(weights_only=True)``:
a file carrying arbitrary pickled objects is refused without running them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .errors import WRITE_ERRNOS, CheckpointError, write_error

FORMAT = "bnn-distill/1"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + fsync of the folder)."""
    _atomic(path, lambda f: f.write(data))


def atomic_save(obj: Dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic(path, lambda f: torch.save(obj, f))


def _atomic(path: Union[str, Path], write) -> None:
    """Write through ``write(f)`` atomically; a full disk or a read-only or forbidden folder raises
    :class:`WriteError`, one line naming ``path`` and the errno, with the previous file (if any) kept
    under its name and no temporary file left behind."""
    path = Path(path)
    try:
        _atomic_unchecked(path, write)
    except (OSError, RuntimeError) as e:
        disk = _disk_error(e)
        if disk is None:
            raise
        raise write_error(disk, path, kept=path.exists()) from None


def _disk_error(e: BaseException):
    """The OSError of a full disk / read-only folder behind ``e`` (torch.save wraps it in a RuntimeError)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _atomic_unchecked(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the user's usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely; raise :class:`CheckpointError` with one clear line on any problem."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint '{path}' is a folder; give a .pt file (a run folder's are in checkpoints/<stage>/)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save zip archive or legacy pickle
        raise CheckpointError(
            f"'{path}' is not a checkpoint (not a torch.save archive) or is truncated; use another file"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "Unsupported operand" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"checkpoint '{path}' holds pickled objects that are not plain tensors; refused without running them "
                "(only files written by bnn-distill or plain state dicts load)"
            ) from None
        raise CheckpointError(f"checkpoint '{path}' is corrupted ({_short(e)}); use another checkpoint") from None
    except Exception as e:  # torch raises many types for damaged archives
        raise CheckpointError(
            f"checkpoint '{path}' is corrupted or truncated ({_short(e)}); use another checkpoint"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict or bnn-distill checkpoint"
        )
    return obj


def _short(e: BaseException, n: int = 100) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= n else text[: n - 3] + "..."


def is_bnn_checkpoint(obj: Dict[str, Any]) -> bool:
    return obj.get("format") == FORMAT


def state_dict_of(obj: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model state dict of a bnn-distill checkpoint, or the dict itself if it is a state dict."""
    if is_bnn_checkpoint(obj):
        state = obj.get("model")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                "bnn-distill checkpoint holds no model state dict (damaged or not written by a trainer)"
            )
        return state
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    raise CheckpointError("checkpoint holds neither a bnn-distill checkpoint nor a state dict of tensors")


def load_model_state(
    model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str, allow_quant_missing: bool = False
) -> set:
    """Load ``state`` strictly, naming mismatched keys; returns quantiser keys that were missing.

    With ``allow_quant_missing`` the quantiser parameters of a binary model (learned scales, tau)
    may be absent (loading real-valued weights into a binary student) or extra.
    """
    from .quant import is_quant_param

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if allow_quant_missing:
        missing_q = {k for k in missing if is_quant_param(k)}
        missing = [k for k in missing if k not in missing_q]
        unexpected = [k for k in unexpected if not is_quant_param(k)]
    else:
        missing_q = set()
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shape:
            k = shape[0]
            parts.append(
                f"shape of '{k}' is {tuple(state[k].shape)}, model has {tuple(own[k].shape)}"
                + (f" (+{len(shape) - 1} more)" if len(shape) > 1 else "")
            )
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    with keep_quantizers():
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing_q


@contextlib.contextmanager
def keep_quantizers():
    """Load state dicts in place, without Brevitas rebuilding its quantisers.

    By default Brevitas re-creates a layer's tensor quantiser when a state dict is loaded
    (``brevitas.config.REINIT_ON_STATE_DICT_LOAD``). That replaces learned-scale parameters with
    new objects, so an optimiser or DDP built before the load would silently train stale copies.
    """
    from brevitas import config

    old = config.REINIT_ON_STATE_DICT_LOAD
    config.REINIT_ON_STATE_DICT_LOAD = False
    try:
        yield
    finally:
        config.REINIT_ON_STATE_DICT_LOAD = old


def _few(keys, n: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
