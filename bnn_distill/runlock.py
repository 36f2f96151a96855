"""One writer per folder: an OS lock (``fcntl.flock``) held while a run or an export is written.

``train`` (fresh or ``--resume``) holds the lock of its run folder and ``export`` that of its
export folder for as long as they write. A second writer fails at once with one line naming the
holder's process id and start time. The lock is a file next to the folder, ``.<name>.lock``
(``runs/.quick_fmnist.lock`` for ``runs/quick_fmnist``), so the folder itself holds only the
run: a fresh run still finds its folder empty, and an export folder lists only its files. The
file records the holder's PID, host and start time; the lock, not the file, is what counts: the
OS drops an ``flock`` when its holder dies, even by SIGKILL, so a killed run never blocks the
next one. The holder removes the file (and the folders it created for it) when it is done.

Readers (``eval``, ``summary``, ``bench``) take no lock: every file is replaced atomically.
Under ``torchrun`` only rank 0 (the writer) takes it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from .errors import WRITE_ERRNOS, FolderInUse, UserError, one_line, write_error

_READ_TRIES = 40  # a holder writes its record right after locking; wait up to ~1 s for it


def lock_file(folder: Union[str, Path]) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it."""
    folder = Path(folder)
    name = folder.name or Path(os.path.abspath(folder)).name or "root"
    parent = folder.parent if folder.name else Path(os.path.abspath(folder)).parent
    return parent / f".{name}.lock"


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``folder``'s lock file; use as a context manager."""

    def __init__(self, folder: Union[str, Path], what: str = "run folder", command: str = ""):
        self.folder = Path(folder)
        self.what = what
        self.command = command
        self.path = lock_file(self.folder)
        self._fd: Optional[int] = None
        self._created: List[Path] = []

    # ------------------------------------------------------------ acquire / release

    def acquire(self) -> "FolderLock":
        assert self._fd is None, "lock already held"
        self._make_parents()
        try:
            for _ in range(10):  # retried only when a releasing holder unlinked the file under us
                fd = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise
                    holder = _read_record(fd)
                    os.close(fd)
                    raise FolderInUse(self._busy_message(holder)) from None
                if not _same_file(fd, self.path):  # locked a file its last holder had just removed
                    os.close(fd)
                    continue
                self._fd = fd
                self._write_record()
                return self
            raise FolderInUse(
                one_line(
                    f"{self.what} {self.folder} is being locked and released by other processes "
                    "in quick succession; wait for them and try again"
                )
            )
        except BaseException:
            if self._fd is not None:
                self.release()
            else:
                self._remove_parents()
            raise

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()  # while still locked: a waiting opener sees a removed file and retries
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the lock
        self._remove_parents()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    # ------------------------------------------------------------ internals

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise write_error(e, self.path) from None
            if e.errno in (errno.ENOTDIR, errno.ENOENT):
                raise UserError(
                    one_line(
                        f"{self.what} {self.folder}: cannot create its lock file {self.path} "
                        f"({e.strerror}); give a folder path"
                    )
                ) from None
            raise

    def _make_parents(self) -> None:
        """Create the folders above the lock file that do not exist yet, remembering them for release."""
        missing = []
        p = self.path.parent
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        if p.exists() and not p.is_dir():
            raise UserError(one_line(f"{self.what} {self.folder}: '{p}' is a file, not a folder"))
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                self._remove_parents()
                if e.errno in WRITE_ERRNOS:
                    raise write_error(e, d) from None
                if e.errno in (errno.ENOTDIR, errno.ENOENT):
                    raise UserError(
                        one_line(f"{self.what} {self.folder}: cannot create folder '{d}' ({e.strerror})")
                    ) from None
                raise
            self._created.append(d)

    def _remove_parents(self) -> None:
        """Remove the folders this lock created, if they are still empty (nothing else was written there)."""
        while self._created:
            d = self._created.pop()
            try:
                d.rmdir()
            except OSError:
                self._created.clear()
                return

    def _write_record(self) -> None:
        assert self._fd is not None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": self.command,
            "folder": str(self.folder),
        }
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as e:  # a full disk: the lock holds all the same, the message just lacks the PID
            if e.errno not in WRITE_ERRNOS:
                raise

    def _busy_message(self, holder: Optional[Dict[str, Any]]) -> str:
        if not holder:
            who = "another process"
        else:
            who = f"process {holder.get('pid', '?')}"
            if holder.get("host") and holder["host"] != socket.gethostname():
                who += f" on {holder['host']}"
            started = holder.get("started")
            if isinstance(started, (int, float)):
                who += f" (started {_clock(started)})"
        return one_line(f"{self.what} {self.folder} is in use by {who}; wait for it or stop it")


def _clock(t: float) -> str:
    when = _dt.datetime.fromtimestamp(t)
    if when.date() == _dt.date.today():
        return when.strftime("%H:%M")
    return when.strftime("%Y-%m-%d %H:%M")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_record(fd: int) -> Optional[Dict[str, Any]]:
    for _ in range(_READ_TRIES):
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            return None
        if data.endswith(b"\n"):
            try:
                rec = json.loads(data)
            except ValueError:
                return None
            return rec if isinstance(rec, dict) else None
        time.sleep(0.025)
    return None


def is_writer_rank() -> bool:
    """True unless launched by ``torchrun`` as a rank other than 0 (those do not write)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@contextlib.contextmanager
def hold(folder: Union[str, Path], what: str = "run folder", command: str = "") -> Iterator[Optional[FolderLock]]:
    """Hold ``folder``'s lock for the ``with`` block (rank 0 only under ``torchrun``)."""
    if not is_writer_rank():
        yield None
        return
    with FolderLock(folder, what, command) as lock:
        yield lock
