"""pyproject.toml: the extras, py.typed, the classifiers, and a brevitas bound that admits the tested version."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_and_what_is_optional():
    p = _project()
    extras = p["project"]["optional-dependencies"]
    assert {"plots", "tensorboard", "peers", "test"} <= set(extras)
    assert any(d.startswith("matplotlib") for d in extras["plots"])
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    assert any(d.startswith("openvino") for d in extras["peers"])
    # the suite checks the PNGs (plots) and times the OpenVINO row for real (peers); CI lints with ruff
    assert "bnn-distill[plots,peers]" in extras["test"]
    assert any(d.startswith("ruff") for d in extras["test"])
    deps = p["project"]["dependencies"]
    assert not any(d.startswith("matplotlib") for d in deps) and any(d.startswith("pillow") for d in deps)
    # a fresh install here must find the local torch files
    assert "torch>=2.4,<=2.14.1" in deps and "torchvision>=0.19,<=0.29.1" in deps


def test_py_typed_and_classifiers():
    p = _project()
    assert (ROOT / "bnn_distill" / "py.typed").is_file()
    assert "py.typed" in p["tool"]["setuptools"]["package-data"]["bnn_distill"]
    versions = {
        c.rsplit(" ", 1)[-1]
        for c in p["project"]["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    }
    assert versions == {"3.10", "3.11", "3.12", "3.13"}


def test_brevitas_is_bounded_above_the_tested_minor():
    dep = next(d for d in _project()["project"]["dependencies"] if d.startswith("brevitas"))
    upper = re.search(r"<\s*([0-9.]+)", dep)
    assert upper, dep
    have = tuple(int(v) for v in metadata.version("brevitas").split(".")[:2])
    bound = tuple(int(v) for v in upper.group(1).split(".")[:2])
    assert have < bound and bound == (have[0], have[1] + 1)  # the installed (tested) minor, not beyond


HEAVY = ("torch", "torchvision", "brevitas", "onnx", "onnxruntime")


def _python(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_help_imports_neither_torch_nor_brevitas():
    """``bnn-distill --help`` answers without the heavy stack: the modules it imports, by -X importtime."""
    res = _python("-X", "importtime", "-m", "bnn_distill", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: bnn-distill" in res.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in res.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "bnn_distill" in imported and "argparse" in imported  # the listing is what it says
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_every_command_help_and_the_parser_import_no_torch():
    code = (
        "import json, sys\n"
        "import bnn_distill.cli as cli\n"
        "cli.build_parser().format_help()\n"
        "for cmd in ('train', 'eval', 'summary', 'export', 'bench', 'predict', 'build-native'):\n"
        "    try:\n"
        "        cli.main([cmd, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (cmd, e.code)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    res = _python("-c", code)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == []


def test_public_names_resolve_lazily():
    import bnn_distill

    for name in bnn_distill.__all__:
        assert getattr(bnn_distill, name) is not None, name
    from bnn_distill import Criterion, create_model, load_recipe  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bnn_distill.nope  # noqa: B018
