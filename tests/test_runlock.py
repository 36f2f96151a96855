"""One writer per run folder and per export folder (``bnn_distill.runlock``, issue 16).

A second ``train`` (fresh or ``--resume``) of a run folder that another process is training, and
a second ``export`` into an export folder another process is writing, exit at once with status 2
and one line naming the holder; a holder killed by SIGKILL blocks nobody.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_dict

from bnn_distill.cli import main
from bnn_distill.errors import FolderInUse
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.runlock import FolderLock, hold, lock_file
from bnn_distill.train import run_recipe

BUSY = re.compile(
    r"^error: (run|export) folder (?P<folder>.+) is in use by process (?P<pid>\d+) "
    r"\(started (?P<at>\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d)\); wait for it or stop it$"
)


def _cli(*argv: str):
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _refused(code: int, err: str, pid: int, folder) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    m = BUSY.match(lines[0])
    assert m, lines[0]
    assert int(m["pid"]) == pid and m["folder"] == str(folder), lines[0]


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the holder ended before {what}: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------- the lock itself


def test_a_second_lock_in_the_same_process_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "runs" / "r"
    with FolderLock(run, "run folder", "train") as lock:
        assert lock.held and lock.path == tmp_path / "runs" / ".r.lock"
        rec = json.loads(lock.path.read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["command"] == "train"
        assert not run.exists(), "the lock must not create the run folder (a fresh run checks that it is empty)"
        for _ in range(5):
            with pytest.raises(FolderInUse) as e:
                FolderLock(run).acquire()
            assert BUSY.match("error: " + str(e.value)), str(e.value)
            assert f"by process {os.getpid()} (started" in str(e.value) and str(run) in str(e.value)
    assert not lock.path.exists(), "the lock file is removed on release"
    assert not (tmp_path / "runs").exists(), "a folder made only for the lock is removed on release"
    with FolderLock(run):  # free again
        pass


def test_release_keeps_folders_that_hold_other_files(tmp_path):
    run = tmp_path / "runs" / "r"
    with FolderLock(run):
        run.mkdir()
        (run / "recipe.yaml").write_text("x")
    assert (run / "recipe.yaml").exists() and not lock_file(run).exists()


def test_another_hosts_holder_and_an_unreadable_record_are_named(tmp_path):
    run = tmp_path / "r"
    with FolderLock(run) as lock:
        started = time.time() - 3 * 86400
        lock.path.write_text(json.dumps({"pid": 4321, "host": "elsewhere", "started": started}) + "\n")
        with pytest.raises(
            FolderInUse, match=r"in use by process 4321 on elsewhere \(started \d{4}-\d\d-\d\d \d\d:\d\d\)"
        ):
            FolderLock(run).acquire()
        lock.path.write_text("not json\n")
        with pytest.raises(FolderInUse, match=r"in use by another process; wait for it or stop it$"):
            FolderLock(run).acquire()


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    run = tmp_path / "r"
    lock_file(run).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "started": 0}) + "\n")
    with FolderLock(run) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


_HOLDER = r"""
import sys, time
from bnn_distill.runlock import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_does_not_block(tmp_path):
    sig = signal.SIGKILL
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    with pytest.raises(FolderInUse, match=f"in use by process {proc.pid} "):
        FolderLock(run).acquire()
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == -sig
    assert lock_file(run).exists(), "the killed holder could not remove its file: the stale file must not block"
    with FolderLock(run):
        pass


def test_only_rank_0_takes_the_lock_under_torchrun(tmp_path, monkeypatch):
    run = tmp_path / "r"
    with FolderLock(run):
        monkeypatch.setenv("RANK", "1")
        with hold(run) as lock:  # ranks other than 0 write nothing and take no lock
            assert lock is None
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(FolderInUse):
            with hold(run):
                pass
    monkeypatch.delenv("RANK")
    with hold(run) as lock:
        assert lock is not None and lock.held


def test_a_lock_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception) as e:
        FolderLock(tmp_path / "f" / "runs" / "r").acquire()
    assert "is a file, not a folder" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- train / train, train / resume


def _holder_recipe(tmp_path: Path) -> Path:
    d = tiny_recipe_dict(tmp_path / "runs", epochs=1, name="held")
    d["stages"][0]["epochs"] = 2  # the teacher's first checkpoint lands with an epoch still to train
    path = tmp_path / "held.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _start(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "bnn_distill", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_second_train_and_resume_are_refused_while_a_run_trains_then_resume_after_a_kill(tmp_path):
    path = _holder_recipe(tmp_path)
    run = tmp_path / "runs" / "held"
    first = _start("train", str(path), "--no-progress")
    try:
        _wait(lambda: (run / "checkpoints" / "teacher" / "last.pt").exists(), first, "teacher checkpoint")
        first.send_signal(signal.SIGSTOP)  # frozen mid-training, holding the lock; nothing changes under the attempts
        before = _snapshot(run)
        attempts = refused = 0
        for argv in (
            ["train", str(path), "--no-progress"],
            ["train", str(path), "--resume", "--no-progress"],
            ["train", str(path), "--resume", "--force", "--no-progress"],
            ["train", str(path), "--resume", "--force", "--set", "stages.stage2.epochs=2", "--no-progress"],
        ):
            attempts += 1
            code, out, err = _cli(*argv)
            _refused(code, err, first.pid, run)
            refused += 1
        # and as a user meets it: a real second process, exit status 2, one line on stderr
        second = _start("train", str(path), "--resume", "--no-progress")
        _, err = second.communicate(timeout=300)
        attempts += 1
        _refused(second.returncode, err, first.pid, run)
        refused += 1
        assert refused == attempts == 5
        assert _snapshot(run) == before, "a refused writer changed the run folder"
    finally:
        _kill(first)
    # the killed holder's lock does not block: resume finishes the run
    code, out, err = _cli("train", str(path), "--resume", "--no-progress")
    assert code == 0, err[-2000:]
    assert (run / "summary.json").exists() and not lock_file(run).exists()


# ---------------------------------------------------------------- export / export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tiny_recipe_dict(tmp_path_factory.mktemp("runs"), name="exp")
    recipe = recipe_from_dict(d)
    run_recipe(recipe, progress=False)
    return recipe.run_dir


_GATED_EXPORT = r"""
import sys
import bnn_distill.export as ex
real = ex.export_run
def gated(*a, **k):
    print("holding", flush=True)
    sys.stdin.readline()  # the test lets it go on
    return real(*a, **k)
ex.export_run = gated
from bnn_distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_second_export_into_the_same_folder_is_refused_and_a_killed_one_does_not_block(trained, tmp_path):
    out = tmp_path / "export" / "exp"
    first = subprocess.Popen(
        [sys.executable, "-c", _GATED_EXPORT, "export", str(trained), "--out", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
        attempts = refused = 0
        for extra in ([], ["--force"], ["--stage", "stage1"]):
            attempts += 1
            code, _, err = _cli("export", str(trained), "--out", str(out), *extra)
            _refused(code, err, first.pid, out)
            refused += 1
        assert refused == attempts == 3
        assert not out.exists() or not any(out.iterdir()), "a refused export wrote into the folder"
    finally:
        _kill(first)  # killed while holding the lock
    assert lock_file(out).exists()
    code, _, err = _cli("export", str(trained), "--out", str(out))
    assert code == 0, err[-2000:]
    assert (out / "manifest.json").exists() and not lock_file(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["exp"], "the lock file is removed after the export"


def test_dry_run_and_readers_need_no_lock(trained, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text((trained / "recipe.yaml").read_text())
    with FolderLock(trained):  # as if a writer held it
        assert _cli("train", str(path), "--dry-run")[0] == 0
        assert _cli("summary", str(trained))[0] == 0
        assert _cli("eval", str(trained))[0] == 0


def test_default_export_folder_is_locked_too(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FolderLock(Path("export") / "exp"):
        code, _, err = _cli("export", str(trained))
        _refused(code, err, os.getpid(), Path("export") / "exp")
