"""Build and load the native onnxruntime custom-op library (bit-packed XNOR-popcount convolution).

The library is compiled from ``bnn_ops.cc`` (next to this file) with the system C++ compiler
against the onnxruntime C/C++ API headers. The pip ``onnxruntime`` wheel ships no headers, so
they come from, in order: ``--headers DIR`` / ``BNN_DISTILL_ORT_HEADERS``, a cached earlier
download, or Debian trixie's ``libonnxruntime-dev`` package (API version 21; onnxruntime's C API is
append-only, so newer runtimes load it), fetched with a private apt configuration and
``apt-get download`` (the system's apt sources are not touched) and unpacked with ``dpkg-deb``.
Headers and the built library live in the cache folder (``BNN_DISTILL_CACHE`` or
``~/.cache/bnn-distill``), never in the repository.

``library_path()`` returns a built library (building it on first use, keyed by the source, the
compiler and the headers); ``BNN_DISTILL_NATIVE_LIB`` points at a prebuilt one instead.
Anything missing (compiler, headers, apt) raises :class:`NativeUnavailable`: one line saying what
and how to fix it; the standard export does not need any of this.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from ..errors import UserError

if TYPE_CHECKING:
    import numpy as np

DOMAIN = "ai.bnn_distill"
OP = "BinaryConv2d"  # float in, float out
OP_TO_BITS = "BinaryConv2dToBits"  # float in, packed sign bits out (BatchNorm + next sign as thresholds)
OP_FROM_BITS = "BinaryConv2dFromBits"  # packed sign bits in, float out
OPS = (OP, OP_TO_BITS, OP_FROM_BITS)
ABI = 2  # 2: BinaryConv2d / ...FromBits have an optional output 1, Y's packed signs
SOURCE = Path(__file__).with_name("bnn_ops.cc")
LIB_NAME = "libbnn_distill_ort.so"
HEADER = "onnxruntime_cxx_api.h"
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
CXXFLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall"]


class NativeUnavailable(UserError):
    """The native library cannot be built or loaded here (the standard export still works)."""


def cache_dir() -> Path:
    root = os.environ.get("BNN_DISTILL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "bnn-distill"


def _header_dir(path: Path) -> Optional[Path]:
    """The folder holding ``onnxruntime_cxx_api.h`` at or under ``path`` (include/, include/onnxruntime/)."""
    for cand in (
        path,
        path / "onnxruntime",
        path / "include",
        path / "include" / "onnxruntime",
        path / "usr" / "include" / "onnxruntime",
    ):
        if (cand / HEADER).is_file() and (cand / "onnxruntime_c_api.h").is_file():
            return cand
    return None


def _api_version(headers: Path) -> int:
    for line in (headers / "onnxruntime_c_api.h").read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[:2] == ["#define", "ORT_API_VERSION"]:
            return int(parts[2])
    raise NativeUnavailable(f"'{headers}' has an onnxruntime_c_api.h without ORT_API_VERSION; give other headers")


def fetch_headers(dest: Path) -> Path:
    """Download Debian trixie's libonnxruntime-dev with a private apt setup; unpack its headers to ``dest``."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise NativeUnavailable(
                f"cannot fetch the onnxruntime headers: '{tool}' is not installed; "
                "give --headers DIR (a folder with onnxruntime_cxx_api.h)"
            )
    if not Path(DEBIAN_KEYRING).is_file():
        raise NativeUnavailable(
            f"cannot fetch the onnxruntime headers: no Debian keyring at {DEBIAN_KEYRING}; give --headers DIR"
        )
    with tempfile.TemporaryDirectory(prefix="bnn-apt-") as tmp:
        t = Path(tmp)
        for sub in ("etc/sources.list.d", "etc/preferences.d", "state/lists/partial", "cache/archives/partial", "dl"):
            (t / sub).mkdir(parents=True, exist_ok=True)
        (t / "etc/sources.list").write_text(f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
        opts = [
            f"-oDir::Etc::sourcelist={t}/etc/sources.list",
            f"-oDir::Etc::sourceparts={t}/etc/sources.list.d",
            f"-oDir::Etc::preferencesparts={t}/etc/preferences.d",
            f"-oDir::State={t}/state",
            "-oDir::State::status=/dev/null",
            f"-oDir::Cache={t}/cache",
            "-oDebug::NoLocking=1",
            "-oAPT::Get::List-Cleanup=0",
            "-qq",
        ] + (["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else [])
        for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", DEBIAN_PACKAGE]):
            r = subprocess.run(cmd, cwd=t / "dl", capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise NativeUnavailable(
                    f"cannot download {DEBIAN_PACKAGE} from Debian {DEBIAN_SUITE} ({last}); "
                    "give --headers DIR (a folder with onnxruntime_cxx_api.h)"
                )
        debs = sorted((t / "dl").glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise NativeUnavailable(f"apt-get download left no {DEBIAN_PACKAGE} package; give --headers DIR")
        x = t / "x"
        r = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(x)], capture_output=True, text=True)
        src = _header_dir(x)
        if r.returncode != 0 or src is None:
            raise NativeUnavailable(f"{debs[-1].name} holds no onnxruntime headers; give --headers DIR")
        staging = dest.with_name(f".{dest.name}.{os.getpid()}.partial")  # per process: concurrent fetches do not clash
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(src, staging)
        (staging / "SOURCE").write_text(f"{debs[-1].name} from {DEBIAN_MIRROR} {DEBIAN_SUITE}\n")
        if _header_dir(dest) is None:  # else another process got there first; keep its copy
            shutil.rmtree(dest, ignore_errors=True)
            try:
                staging.rename(dest)
            except OSError:  # lost the race just now
                pass
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def find_headers(headers: Optional[str] = None, download: bool = True) -> Path:
    """The onnxruntime header folder: ``headers``, ``BNN_DISTILL_ORT_HEADERS``, the cache, or a download."""
    given = headers or os.environ.get("BNN_DISTILL_ORT_HEADERS")
    if given:
        found = _header_dir(Path(given))
        if found is None:
            raise NativeUnavailable(
                f"no {HEADER} in '{given}' (looked in it and its include/onnxruntime); "
                "give the folder that holds the onnxruntime C/C++ API headers"
            )
        return found
    cached = cache_dir() / "onnxruntime-headers"
    if _header_dir(cached) is not None:
        return cached
    if not download:
        raise NativeUnavailable("no onnxruntime headers cached; run 'bnn-distill build-native'")
    return fetch_headers(cached)


def _compiler() -> str:
    env = os.environ.get("CXX")
    if env:
        if shutil.which(env) is None:
            raise NativeUnavailable(f"CXX='{env}' is not an executable compiler; unset CXX or point it at g++/clang++")
        return env
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeUnavailable(
            "no C++ compiler found (c++, g++ or clang++; or set CXX); "
            "install one (e.g. apt-get install g++) or use the standard export"
        )
    return cxx


def _compiler_id(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return (r.stdout.splitlines() or [cxx])[0]


def build(headers: Optional[str] = None, out: Optional[Path] = None, force: bool = False) -> Path:
    """Compile the library (if not already built for this source, compiler and headers); return its path."""
    hdr = find_headers(headers)
    api = _api_version(hdr)
    if api < 17:
        raise NativeUnavailable(f"onnxruntime headers in '{hdr}' are API version {api}; 17 or newer is needed")
    cxx = _compiler()
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(CXXFLAGS).encode(),
        _compiler_id(cxx).encode(),
        (hdr / "onnxruntime_c_api.h").read_bytes(),
        (hdr / HEADER).read_bytes(),
    ):
        key.update(part)
    target = Path(out) if out else cache_dir() / "native" / key.hexdigest()[:16] / LIB_NAME
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    cmd = [cxx, *CXXFLAGS, f"-I{hdr}", str(SOURCE), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:300])
        raise NativeUnavailable(f"compiling {SOURCE.name} failed: {first}")
    os.replace(tmp, target)
    return target


def library_path(headers: Optional[str] = None) -> Path:
    """``BNN_DISTILL_NATIVE_LIB`` if set, else the built library (built now if needed)."""
    given = os.environ.get("BNN_DISTILL_NATIVE_LIB")
    if given:
        p = Path(given)
        if not p.is_file():
            raise NativeUnavailable(
                f"BNN_DISTILL_NATIVE_LIB='{given}' is not a file; unset it or build with 'bnn-distill build-native'"
            )
        return p
    return build(headers)


def info(lib: Path) -> Dict[str, str]:
    """What the library says about itself: its ABI and the kernel family this CPU gets."""
    try:
        so = ctypes.CDLL(str(lib))
    except OSError as e:
        raise NativeUnavailable(f"cannot load '{lib}': {e}") from None
    so.BnnDistillNativeIsa.restype = ctypes.c_char_p
    return {
        "library": str(lib),
        "abi": str(so.BnnDistillNativeAbi()),
        "isa": so.BnnDistillNativeIsa().decode(),
        "isa_override": os.environ.get("BNN_DISTILL_NATIVE_ISA", ""),
    }


def uses_native(model) -> bool:
    """Whether an ONNX ``ModelProto`` has nodes of the native op domain."""
    return any(n.domain == DOMAIN for n in model.graph.node)


# ---------------------------------------------------------------- the op's constant inputs


def pack_weights(q) -> "np.ndarray":
    """+-1 weights (N, Cin, k, k) -> the op's packed form: uint64 (ceil(N/8), k*k, ceil(Cin/64), 8).

    Word ``[g, tap, w, l]`` holds bit ``c % 64`` = 1 where weight (8g + l, c = 64w + bit, tap) is -1;
    channel and output padding are 0 bits."""
    import numpy as np

    q = np.asarray(q)
    n, c, kh, kw = q.shape
    cw, ocp = (c + 63) // 64, (n + 7) // 8 * 8
    neg = np.zeros((ocp, kh * kw, cw * 64), dtype=bool)
    neg[:n, :, :c] = (q < 0).transpose(0, 2, 3, 1).reshape(n, kh * kw, c)
    packed = np.packbits(neg.reshape(ocp, kh * kw, cw, 64), axis=-1, bitorder="little")  # (ocp, taps, cw, 8 bytes)
    words = np.ascontiguousarray(packed).view("<u8")[..., 0]  # (ocp, taps, cw)
    return np.ascontiguousarray(words.reshape(ocp // 8, 8, kh * kw, cw).transpose(0, 2, 3, 1)).astype(np.uint64)


def border_corrections(q, pad: int) -> "np.ndarray":
    """int32 (16, ceil(N/8)*8): per border class, the sum of the +-1 weights over the taps that fall
    outside the image (the kernel pads with +1 words and subtracts this). Class = 4 * (top | bottom << 1)
    + (left | right << 1): for a k x k kernel with pad k // 2, top means tap row 0 is outside, bottom
    row k - 1, and likewise for columns."""
    import numpy as np

    q = np.asarray(q)
    n, _, kh, kw = q.shape
    ocp = (n + 7) // 8 * 8
    per_tap = q.astype(np.int64).sum(axis=1)  # (N, kh, kw)
    corr = np.zeros((16, ocp), dtype=np.int32)
    if pad == 0:
        return corr
    for cls in range(16):
        ry, rx = divmod(cls, 4)
        rows = np.zeros(kh, bool)
        cols = np.zeros(kw, bool)
        rows[0], rows[-1] = bool(ry & 1) or rows[0], bool(ry & 2) or rows[-1]
        cols[0], cols[-1] = bool(rx & 1) or cols[0], bool(rx & 2) or cols[-1]
        outside = rows[:, None] | cols[None, :]
        corr[cls, :n] = (per_tap * outside).sum(axis=(1, 2))
    return corr


def sign_thresholds(scale, shift, act, n_bits: int):
    """Integer thresholds that fold ``y = act(dot * scale + shift)`` followed by the next layer's sign
    into the conv: per output channel the ``T`` with ``act(fl(fl(dot * scale) + shift)) < 0`` exactly
    when ``dot < T``, over every reachable ``dot`` in ``[-n_bits, n_bits]``, evaluated in float32 as
    the float path computes it (so the two agree bit for bit). ``act``: a PyTorch activation module
    (applied to a (dots, channels) tensor). Returns int32 (OC,), or None when some channel's
    negative set is not such a prefix (e.g. a PReLU with a negative slope)."""
    import numpy as np
    import torch

    scale = np.asarray(scale, dtype=np.float32)
    shift = np.asarray(shift, dtype=np.float32)
    dots = np.arange(-n_bits, n_bits + 1, dtype=np.float32)[:, None]  # exact: |dot| < 2**24
    y = dots * scale[None, :] + shift[None, :]  # float32 multiply, then add: as the kernel's epilogue
    with torch.no_grad():
        neg = (act(torch.from_numpy(np.ascontiguousarray(y))) < 0).numpy()  # sign(0) = +1
    count = neg.sum(axis=0)
    prefix = np.arange(len(dots))[:, None] < count[None, :]
    if not (neg == prefix).all():
        return None
    return (count - n_bits).astype(np.int32)


def unpack_signs(words, channels: int):
    """Packed sign bits (..., ceil(C/64)) uint64 -> +-1 float32 (..., C) (bit 1 = -1)."""
    import numpy as np

    words = np.ascontiguousarray(words, dtype=np.uint64)
    bits = np.unpackbits(words.view(np.uint8).reshape(words.shape + (8,)), axis=-1, bitorder="little")
    bits = bits.reshape(words.shape[:-1] + (-1,))[..., :channels]
    return (1.0 - 2.0 * bits).astype(np.float32)


# ---------------------------------------------------------------- the instruction-throughput floor


def vector_steps(model) -> int:
    """Inner-loop steps (8 output channels x 64 input bits: one AVX-512 VPOPCNTQ, two AVX2 nibble-table
    popcounts) that one image costs in a native ``ModelProto``: per BinaryConv2d,
    Ho*Wo * ceil(OC/8) * k*k * ceil(C/64)."""
    total = 0
    for n in model.graph.node:
        if n.domain != DOMAIN or n.op_type not in OPS:
            continue
        a = {at.name: at.i for at in n.attribute if at.type == at.INT}
        k, s, p = a["kernel"], a["stride"], a["pad"]
        ho, wo = (a["in_h"] + 2 * p - k) // s + 1, (a["in_w"] + 2 * p - k) // s + 1
        total += ho * wo * ((a["out_c"] + 7) // 8) * k * k * ((a["in_c"] + 63) // 64)
    return total


def peak_ns_per_step(lib: Path, steps: int = 20_000_000) -> Optional[float]:
    """Measured ns per inner-loop step (8 output channels x 64 input bits, 512 binary MACs) of the
    register tile of the kernels this CPU runs by default, on L1-resident data: their instruction-
    throughput floor (AVX-512 VPOPCNTQ where the CPU has it, else AVX2), or None for the portable
    kernels. The wall-clock minimum of one run; take the minimum of a few on a busy machine."""
    so = ctypes.CDLL(str(lib))
    so.BnnDistillPeakNsPerStep.restype = ctypes.c_double
    so.BnnDistillPeakNsPerStep.argtypes = [ctypes.c_int64]
    v = so.BnnDistillPeakNsPerStep(int(steps))
    return None if v < 0 else float(v)


PEAK_ISAS = {"avx512": 2, "avx2": 1}


def peak_ns_per_step_isa(lib: Path, isa: str, steps: int = 20_000_000) -> Optional[float]:
    """The floor of one kernel family (``avx512`` or ``avx2``), in the same unit, or None when this CPU
    cannot run it."""
    so = ctypes.CDLL(str(lib))
    so.BnnDistillPeakNsPerStepIsa.restype = ctypes.c_double
    so.BnnDistillPeakNsPerStepIsa.argtypes = [ctypes.c_int, ctypes.c_int64]
    v = so.BnnDistillPeakNsPerStepIsa(PEAK_ISAS[isa], int(steps))
    return None if v < 0 else float(v)
