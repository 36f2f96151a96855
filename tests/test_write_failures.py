"""Full disks and read-only folders at every write site (issue 16).

A write that fails with ENOSPC (injected at the file's ``write`` call, after half a block) or
EACCES (injected where a read-only folder fails: creating the temporary file) must keep the last
good file under its final name, remove its temporary file, and end the command with one line
naming the path and the errno, exit status 2. Every file left under its final name must be
complete. Sites: train (recipe.yaml, last.pt, best.pt, metrics.jsonl, summary.json, curves.png),
export (parity.json, the three .onnx models, manifest.json), bench (bench.json, bench.md,
bench.png). One test does it for real on a tiny tmpfs (skipped with the reason where this
machine cannot mount one).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import yaml
from conftest import tiny_recipe_dict

from bnn_distill.checkpoint import atomic_save, atomic_write_bytes, load_checkpoint
from bnn_distill.cli import main
from bnn_distill.errors import WriteError
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe

REAL_FDOPEN = os.fdopen
REAL_MKSTEMP = tempfile.mkstemp


def _cli(*argv: str):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class _FailingFile:
    """A file whose first ``write`` puts half its bytes down, then fails like a full disk."""

    def __init__(self, f, err: OSError):
        self._f, self._err = f, err

    def write(self, data) -> int:
        self._f.write(bytes(data)[: max(1, len(data) // 2)])
        self._f.flush()
        raise self._err

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Inject:
    """Fail the ``nth`` atomic write of ``final`` (a path, or a folder name + file name) with ``code``."""

    def __init__(self, monkeypatch, final: str, code: int, nth: int = 1):
        self.final = final  # "last.pt", "teacher/last.pt"
        self.code, self.nth, self.count = code, nth, 0
        self.previous: Optional[bytes] = None  # the final file's bytes when the failure struck
        self.path: Optional[Path] = None
        self.fired = False
        if code == errno.ENOSPC:
            monkeypatch.setattr(os, "fdopen", self._fdopen)
        else:
            monkeypatch.setattr(tempfile, "mkstemp", self._mkstemp)

    def _matches(self, folder: Path, prefix: str) -> Optional[Path]:
        parts = self.final.split("/")
        name = parts[-1]
        if not prefix.startswith(f".{name}."):
            return None
        if len(parts) > 1 and folder.name != parts[-2]:
            return None
        return folder / name

    def _strike(self, final: Path) -> bool:
        self.count += 1
        if self.count != self.nth or self.fired:
            return False
        self.fired, self.path = True, final
        self.previous = final.read_bytes() if final.exists() else None
        return True

    def _fdopen(self, fd, *a, **k):
        f = REAL_FDOPEN(fd, *a, **k)
        if not isinstance(fd, int):
            return f
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return f
        final = self._matches(target.parent, target.name) if target.name.endswith(".tmp") else None
        if final is not None and self._strike(final):
            return _FailingFile(f, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f

    def _mkstemp(self, suffix=None, prefix=None, dir=None, text=False):
        final = self._matches(Path(dir), prefix or "") if dir is not None else None
        if final is not None and self._strike(final):
            raise PermissionError(self.code, os.strerror(self.code), os.path.join(dir, f"{prefix}XXXXXX{suffix or ''}"))
        return REAL_MKSTEMP(suffix=suffix, prefix=prefix, dir=dir, text=text)


def _assert_one_line(code: int, err: str, path: Path, name: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    last = lines[-1]
    assert re.match(
        rf"^error: cannot write {re.escape(str(path))}: .+ \({name}, errno {getattr(errno, name)}\)", last
    ), last
    assert sum(ln.startswith("error:") for ln in lines) == 1


def _assert_no_torn_or_lost(folder: Path, inj: Inject) -> None:
    tmps = [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not tmps, f"temporary files left behind: {tmps}"
    assert inj.fired and inj.path is not None
    now = inj.path.read_bytes() if inj.path.exists() else None
    assert now == inj.previous, f"{inj.path}: the last good file was not kept"
    for p in folder.rglob("*"):
        if p.suffix == ".pt":
            load_checkpoint(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines()]
        elif p.suffix == ".onnx":
            import onnx

            onnx.checker.check_model(onnx.load(str(p)))
        elif p.suffix == ".png":
            assert p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and p.read_bytes().rstrip().endswith(b"\xaeB`\x82")


# ---------------------------------------------------------------- the atomic writer itself


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("writer", ["atomic_save", "atomic_write_bytes"])
def test_atomic_writers_keep_the_last_good_file(tmp_path, monkeypatch, code, writer):
    import torch

    path = tmp_path / ("last.pt" if writer == "atomic_save" else "summary.json")
    write = (
        (lambda v: atomic_save({"v": torch.full((4096,), float(v))}, path))
        if writer == "atomic_save"
        else (lambda v: atomic_write_bytes(path, json.dumps({"v": v}).encode() * 100))
    )
    write(1)
    before = path.read_bytes()
    inj = Inject(monkeypatch, path.name, code)
    with pytest.raises(WriteError) as e:
        write(2)
    monkeypatch.undo()
    text = str(e.value)
    name = errno.errorcode[code]
    assert "\n" not in text and str(path) in text and f"({name}, errno {code})" in text, text
    assert f"the previous {path.name} is kept" in text
    assert path.read_bytes() == before == inj.previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_write_error_without_a_previous_file_leaves_nothing(tmp_path, monkeypatch):
    Inject(monkeypatch, "x.json", errno.ENOSPC)
    with pytest.raises(WriteError, match=r"cannot write .*x\.json: .*\(ENOSPC, errno 28\); free some space") as e:
        atomic_write_bytes(tmp_path / "x.json", b"{}" * 10000)
    assert "previous" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_still_raise_as_before(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "x", b"1")
    assert not isinstance(e.value, WriteError) and e.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- train


def _train_recipe(tmp_path: Path, name: str = "w") -> Path:
    d = tiny_recipe_dict(tmp_path / "runs", epochs=2, name=name)
    d["data"]["limit_train"] = 32
    d["data"]["limit_test"] = 16
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


TRAIN_EARLY = [("recipe.yaml", 1), ("teacher/last.pt", 2), ("teacher/best.pt", 1), ("metrics.jsonl", 2)]
TRAIN_END = [("summary.json", 1), ("curves.png", 1)]  # written again by a resume of a finished run
TRAIN_SITES = TRAIN_EARLY + TRAIN_END


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny 2-epoch run, trained once to the end."""
    base = tmp_path_factory.mktemp("finished")
    path = _train_recipe(base)
    recipe = recipe_from_dict(yaml.safe_load(path.read_text()))
    run_recipe(recipe, progress=False)
    return recipe.run_dir


def _train_case(tmp_path, monkeypatch, site: str, nth: int, code: int, finished: Path) -> None:
    path = _train_recipe(tmp_path)
    run = tmp_path / "runs" / "w"
    argv = ["train", str(path), "--no-progress"]
    if (site, nth) in TRAIN_END:
        shutil.copytree(finished, run)
        argv.append("--resume")
    inj = Inject(monkeypatch, site, code, nth)
    got = _cli(*argv)
    monkeypatch.undo()
    _assert_one_line(got[0], got[2], inj.path, errno.errorcode[code])
    _assert_no_torn_or_lost(run, inj)
    if (site, nth) in TRAIN_END:
        assert inj.previous is not None
    assert not (tmp_path / "runs" / ".w.lock").exists()


def _needs_finished(site, nth):
    return (site, nth) in TRAIN_END


@pytest.fixture
def finished_if_needed(request, site, nth):
    return request.getfixturevalue("finished") if _needs_finished(site, nth) else None


@pytest.mark.parametrize("site,nth", TRAIN_SITES, ids=[s for s, _ in TRAIN_SITES])
def test_train_full_disk(tmp_path, monkeypatch, site, nth, finished_if_needed):
    _train_case(tmp_path, monkeypatch, site, nth, errno.ENOSPC, finished_if_needed)


@pytest.mark.parametrize("site,nth", [("teacher/last.pt", 2), ("summary.json", 1)])
def test_train_read_only_folder(tmp_path, monkeypatch, site, nth, finished_if_needed):
    _train_case(tmp_path, monkeypatch, site, nth, errno.EACCES, finished_if_needed)


@pytest.mark.slow
@pytest.mark.parametrize("site,nth", TRAIN_SITES, ids=[s for s, _ in TRAIN_SITES])
def test_train_read_only_folder_every_site(tmp_path, monkeypatch, site, nth, finished_if_needed):
    _train_case(tmp_path, monkeypatch, site, nth, errno.EACCES, finished_if_needed)


@pytest.mark.slow
def test_train_resumes_after_a_full_disk_to_the_same_result(tmp_path, monkeypatch, finished):
    path = _train_recipe(tmp_path)
    inj = Inject(monkeypatch, "stage1/last.pt", errno.ENOSPC, 2)
    code, _, err = _cli("train", str(path), "--no-progress")
    monkeypatch.undo()
    assert code == 2 and inj.fired, err
    code, _, err = _cli("train", str(path), "--resume", "--no-progress")
    assert code == 0, err[-2000:]
    import torch

    for st in ("teacher", "stage1", "stage2"):
        a = load_checkpoint(tmp_path / "runs" / "w" / "checkpoints" / st / "last.pt")["model"]
        b = load_checkpoint(finished / "checkpoints" / st / "last.pt")["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), st


# ---------------------------------------------------------------- export and bench


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("wf")
    d = tiny_recipe_dict(base / "runs", name="wx")
    d["data"]["limit_test"] = 16
    recipe = recipe_from_dict(d)
    run_recipe(recipe, progress=False)
    out = base / "export" / "wx"
    code, _, err = _cli("export", str(recipe.run_dir), "--out", str(out))
    assert code == 0, err
    return recipe.run_dir, out


EXPORT_SITES = ["parity.json", "student_binary.onnx", "student_fp32.onnx", "teacher_fp32.onnx", "manifest.json"]
BENCH_SITES = ["bench.json", "bench.md", "bench.png"]
BENCH_ARGS = ["--batch", "1", "--threads", "1", "--repeats", "1", "--warmup", "0", "--burst", "1", "--no-accuracy"]


def _export_case(exported, tmp_path, monkeypatch, site, code):
    run, good = exported
    out = tmp_path / "export" / "wx"
    shutil.copytree(good, out)
    inj = Inject(monkeypatch, site, code)
    got = _cli("export", str(run), "--out", str(out))
    monkeypatch.undo()
    _assert_one_line(got[0], got[2], inj.path, errno.errorcode[code])
    _assert_no_torn_or_lost(out, inj)
    if site != "parity.json":  # the folder no longer vouches for a mix of old and new files
        assert not (out / "manifest.json").exists()
    assert not (tmp_path / "export" / ".wx.lock").exists()


def _bench_case(exported, tmp_path, monkeypatch, site, code):
    _, good = exported
    out = tmp_path / "wx"
    shutil.copytree(good, out)
    assert _cli("bench", str(out), *BENCH_ARGS)[0] == 0  # a previous bench to keep
    inj = Inject(monkeypatch, site, code)
    got = _cli("bench", str(out), *BENCH_ARGS)
    monkeypatch.undo()
    _assert_one_line(got[0], got[2], inj.path, errno.errorcode[code])
    _assert_no_torn_or_lost(out, inj)
    if site != "bench.png":  # bench removes its old plot first: never an old plot beside new numbers
        assert inj.previous is not None


@pytest.mark.parametrize("site", EXPORT_SITES)
def test_export_full_disk(exported, tmp_path, monkeypatch, site):
    _export_case(exported, tmp_path, monkeypatch, site, errno.ENOSPC)


@pytest.mark.parametrize("site", BENCH_SITES)
def test_bench_full_disk(exported, tmp_path, monkeypatch, site):
    _bench_case(exported, tmp_path, monkeypatch, site, errno.ENOSPC)


@pytest.mark.parametrize("cmd,site", [("export", "student_binary.onnx"), ("bench", "bench.json")])
def test_export_and_bench_read_only_folder(exported, tmp_path, monkeypatch, cmd, site):
    (_export_case if cmd == "export" else _bench_case)(exported, tmp_path, monkeypatch, site, errno.EACCES)


@pytest.mark.slow
@pytest.mark.parametrize("cmd,site", [("export", s) for s in EXPORT_SITES] + [("bench", s) for s in BENCH_SITES])
def test_export_and_bench_read_only_folder_every_site(exported, tmp_path, monkeypatch, cmd, site):
    (_export_case if cmd == "export" else _bench_case)(exported, tmp_path, monkeypatch, site, errno.EACCES)


# ---------------------------------------------------------------- for real: a tiny tmpfs


_IN_NAMESPACE = textwrap.dedent(r"""
    import errno, json, os, subprocess, sys
    from pathlib import Path
    mnt, recipe = Path(sys.argv[1]), sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], check=True)
    res = {}
    import torch
    from bnn_distill.checkpoint import atomic_save, load_checkpoint
    from bnn_distill.errors import WriteError
    atomic_save({"w": torch.zeros(1000)}, mnt / "last.pt")
    try:
        atomic_save({"w": torch.zeros(100000)}, mnt / "last.pt")  # 400 kB into 160 kB
        res["atomic"] = "no error"
    except WriteError as e:
        res["atomic"] = str(e)
    res["atomic_files"] = sorted(os.listdir(mnt))
    res["atomic_kept"] = int(load_checkpoint(mnt / "last.pt")["w"].numel())
    os.unlink(mnt / "last.pt")
    p = subprocess.run([sys.executable, "-m", "bnn_distill", "train", recipe, "--no-progress"],
                       capture_output=True, text=True)
    res["train_rc"], res["train_err"] = p.returncode, p.stderr
    res["train_files"] = sorted(str(q.relative_to(mnt)) for q in mnt.rglob("*"))
    bad = []
    for q in mnt.rglob("*.pt"):
        try:
            load_checkpoint(q)
        except Exception as e:
            bad.append(f"{q}: {e}")
    res["train_bad"] = bad
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    p = subprocess.run([sys.executable, "-m", "bnn_distill", "train", recipe, "--resume", "--no-progress"],
                       capture_output=True, text=True)
    res["ro_rc"], res["ro_err"] = p.returncode, p.stderr
    print("RESULT " + json.dumps(res))
""")


def _can_mount() -> Optional[str]:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "no unshare/mount on this machine"
    try:
        p = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare failed: {e}"
    if p.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {p.stderr.strip()[:200]}"
    return None


def test_real_full_tmpfs_and_read_only_mount(tmp_path):
    why = _can_mount()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = tiny_recipe_dict(mnt / "runs", epochs=1, name="full")
    d["data"]["limit_train"] = 32
    d["data"]["limit_test"] = 16
    recipe = tmp_path / "full.yaml"
    recipe.write_text(yaml.safe_dump(d))
    script = tmp_path / "ns.py"
    script.write_text(_IN_NAMESPACE)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run(
        ["unshare", "-rm", sys.executable, str(script), str(mnt), str(recipe)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    res = json.loads(line[0][len("RESULT ") :])
    assert re.match(
        rf"cannot write {re.escape(str(mnt / 'last.pt'))}: .*\(ENOSPC, errno 28\); the previous last.pt "
        "is kept",
        res["atomic"],
    ), res["atomic"]
    assert res["atomic_files"] == ["last.pt"] and res["atomic_kept"] == 1000
    # the run fills the disk: one line with the path and ENOSPC, no temporary or torn file
    err = [ln for ln in res["train_err"].splitlines() if ln.strip()]
    assert res["train_rc"] == 2 and "Traceback" not in res["train_err"], res["train_err"][-3000:]
    assert re.match(rf"^error: cannot write {re.escape(str(mnt))}/runs/full/\S+: .*\(ENOSPC, errno 28\)", err[-1]), err[
        -1
    ]
    assert not [f for f in res["train_files"] if ".tmp" in f], res["train_files"]
    assert res["train_bad"] == []
    # read-only: resume cannot write its first file
    ro = [ln for ln in res["ro_err"].splitlines() if ln.strip()]
    assert res["ro_rc"] == 2 and "Traceback" not in res["ro_err"], res["ro_err"][-3000:]
    assert re.match(r"^error: cannot write .*: .*\(EROFS, errno 30\)", ro[-1]), ro[-1]
