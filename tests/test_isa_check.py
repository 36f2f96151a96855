"""benchmarks/isa_check.sh: the prepared latency run of the native kernels on this session's CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "isa_check.sh"


def _run(*args, timeout=60):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_an_unknown_argument_is_one_line_and_exit_2():
    proc = _run("--fast")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "isa_check.sh: unknown argument '--fast' (valid: --quick, --peers, --out DIR)"
    ]


def _isa() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vpopcntdq" in flags and "avx512bw" in flags:
        return "avx512"
    return "avx2" if " avx2" in flags else ""


@pytest.mark.slow
def test_quick_run_writes_every_file_named_by_the_isa(tmp_path):
    isa = _isa()
    if not isa:
        pytest.skip("this CPU has neither AVX-512 VPOPCNTDQ nor AVX2")
    proc = _run("--quick", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    suf = f"{isa}_quick"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{stem}_{suf}.{ext}"
        for stem, exts in [
            ("isa_check_bench", ("md", "json")),
            ("native_layers_signs", ("md", "json")),
            ("native_profile", ("md", "json")),
            ("native_ab_check", ("txt", "json")),
        ]
        for ext in exts
    )
    ab = json.loads((tmp_path / f"native_ab_check_{suf}.json").read_text())
    text = json.dumps(ab)
    for variant in ("teacher", "standard", "native", "native_own_pool"):
        assert variant in text
    assert ("native_forced_avx2" in text) == (isa == "avx512")
