"""The native kernels' internal choices: every register-tile width of the AVX2 kernel, weights that are
not constant (split on every call), the library's own thread pool against onnxruntime's ParallelFor on
1-3 threads, and the instruction-throughput floor per ISA. All outputs must be bit-identical to the
float convolution of +-1 tensors (and so to each other); no test asserts a time."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from test_export import _randomize
from test_native import _isas, _op_model, native_lib  # noqa: F401  (the fixture)

from bnn_distill import native
from bnn_distill.export import lower, ort_session, parity_inputs
from bnn_distill.models import create_model

SHAPES = [  # (batch, Cin, H, W, Cout, stride): odd widths and channel counts, 1-wide maps, deep and shallow
    (1, 64, 9, 7, 64, 1),
    (2, 130, 5, 11, 20, 2),
    (1, 200, 1, 6, 13, 1),
    (1, 512, 4, 4, 40, 1),
    (3, 7, 6, 5, 9, 2),
]


def _case(shape, seed=0):
    b, c, h, w, n, s = shape
    rng = np.random.default_rng(seed + sum(shape))
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    q = np.where(rng.random((n, c, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    signs = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
    dot = F.conv2d(torch.from_numpy(signs), torch.from_numpy(q), stride=s, padding=1).numpy()
    scale = rng.uniform(-2, 2, n).astype(np.float32)
    shift = rng.uniform(-3, 3, n).astype(np.float32)
    ho, wo = dot.shape[2:]
    r = rng.standard_normal((b, ho * wo, n)).astype(np.float32)
    d = dot.transpose(0, 2, 3, 1).reshape(b, ho * wo, n)
    want = np.clip(d * scale + shift + r, np.float32(-1), np.float32(1))
    flat = x.transpose(0, 2, 3, 1).reshape(b, h * w, c)
    return x, q, scale, shift, flat, r, want


def _need(isa):
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")


@pytest.mark.parametrize("pixels", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_avx2_tile_width_is_exact(native_lib, monkeypatch, pixels, shape):
    _need("avx2")
    monkeypatch.setenv("BNN_DISTILL_NATIVE_ISA", "avx2")
    monkeypatch.setenv("BNN_DISTILL_NATIVE_AVX2_PIXELS", str(pixels))
    x, q, scale, shift, flat, r, want = _case(shape)
    m = _op_model(x.shape, q, shape[5], scale, shift, residual=True, act=(-1.0, 1.0))
    got = ort_session(m, threads=1, native_lib=native_lib).run(None, {"x": flat, "r": r})[0]
    np.testing.assert_array_equal(got, want)


def test_a_bad_tile_width_is_refused(native_lib, monkeypatch):
    monkeypatch.setenv("BNN_DISTILL_NATIVE_AVX2_PIXELS", "9")
    q = np.ones((8, 8, 3, 3), dtype=np.float32)
    with pytest.raises(Exception, match="BNN_DISTILL_NATIVE_AVX2_PIXELS must be 1..4"):
        ort_session(_op_model((1, 8, 4, 4), q, 1, np.ones(8), np.zeros(8)), native_lib=native_lib)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_weights_computed_at_run_time(native_lib, monkeypatch, isa):
    """Weights that are a graph input (not an initializer) are split for the AVX2 kernel on every call."""
    _need(isa)
    monkeypatch.setenv("BNN_DISTILL_NATIVE_ISA", isa)
    shape = (2, 70, 6, 5, 12, 1)
    x, q, scale, shift, flat, r, want = _case(shape)
    m = _op_model(x.shape, q, 1, scale, shift, residual=True, act=(-1.0, 1.0))
    w = next(t for t in m.graph.initializer if t.name == "w")
    m.graph.initializer.remove(w)
    m.graph.input.append(helper.make_tensor_value_info("w", TensorProto.UINT64, list(w.dims)))
    sess = ort_session(m, threads=2, native_lib=native_lib)
    wv = native.pack_weights(q)
    for _ in range(2):
        np.testing.assert_array_equal(sess.run(None, {"x": flat, "r": r, "w": wv})[0], want)


@pytest.mark.parametrize("pool", ["own", "ort"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_pools_give_the_same_network_output(native_lib, monkeypatch, pool, threads):
    """The library's spinning pool and onnxruntime's ParallelFor, on 1-3 threads, over every block kind
    (pooled shortcuts with packing and pooling in phase a, packed-bits convs) and a batch of images."""
    monkeypatch.setenv("BNN_DISTILL_NATIVE_POOL", pool)
    outs = {}
    for kw in (dict(), dict(bireal=False, shortcut="conv", act="relu")):
        model = _randomize(
            create_model("cifar_resnet18", 10, quant="W1A1", width_mult=0.25, weight_scale="learned", recu=True, **kw)
        )
        proto, _ = lower(model, (3, 20, 20), native=True)
        x = parity_inputs((3, 20, 20), n=5).numpy()
        monkeypatch.delenv("BNN_DISTILL_NATIVE_POOL")
        ref = ort_session(proto, threads=1, native_lib=native_lib).run(None, {"input": x})[0]
        monkeypatch.setenv("BNN_DISTILL_NATIVE_POOL", pool)
        sess = ort_session(proto, threads=threads, spin=False, native_lib=native_lib)
        for _ in range(3):  # later runs: the pool's workers are spinning or asleep, both must work
            np.testing.assert_array_equal(sess.run(None, {"input": x})[0], ref)
        outs[str(kw)] = ref
    assert len(outs) == 2


def test_two_sessions_share_the_pool(native_lib, monkeypatch):
    """Sessions of different thread counts in turn: the pool grows, and a smaller job leaves workers out."""
    model = _randomize(
        create_model("cifar_resnet18", 10, quant="W1A1", width_mult=0.25, weight_scale="learned", recu=True)
    )
    proto, _ = lower(model, (3, 16, 16), native=True)
    x = parity_inputs((3, 16, 16), n=2).numpy()
    ref = ort_session(proto, threads=1, native_lib=native_lib).run(None, {"input": x})[0]
    sessions = [ort_session(proto, threads=t, spin=False, native_lib=native_lib) for t in (2, 3, 2)]
    for _ in range(3):
        for s in sessions:
            np.testing.assert_array_equal(s.run(None, {"input": x})[0], ref)


def test_a_bad_pool_choice_is_refused(native_lib, monkeypatch):
    monkeypatch.setenv("BNN_DISTILL_NATIVE_POOL", "openmp")
    q = np.ones((8, 8, 3, 3), dtype=np.float32)
    with pytest.raises(Exception, match="BNN_DISTILL_NATIVE_POOL='openmp' is not one of own, ort"):
        ort_session(_op_model((1, 8, 4, 4), q, 1, np.ones(8), np.zeros(8)), native_lib=native_lib)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_floor_per_isa(native_lib, isa):
    got = native.peak_ns_per_step_isa(native_lib, isa, steps=200_000)
    if isa not in _isas():
        assert got is None
    else:
        assert got is not None and got > 0


def test_floor_of_the_default_kernels(native_lib):
    best = native.info(native.library_path())["isa"]
    got = native.peak_ns_per_step(native_lib, steps=200_000)
    assert (got is None) == (best == "portable")


def test_library_reports_its_abi(native_lib):
    so = ctypes.CDLL(native_lib)
    assert so.BnnDistillNativeAbi() == native.ABI
