"""The step-cost harness (bnn_distill.stepcost) and benchmarks/train_cost.py, on tiny inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_script

import bnn_distill.quant as quant_mod
from bnn_distill.losses import Term
from bnn_distill.models import create_model
from bnn_distill.stepcost import TimedStep, interleaved_times

CE = [Term("ce", 1.0, {})]


def _batch(n=4, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _teacher():
    torch.manual_seed(3)
    return create_model("cifar_resnet20", 10, in_chans=1).eval()


def test_interleaved_times_rotates_the_order_and_counts_every_call():
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleaved_times(steps, rounds=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, one each
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_timed_step_uses_the_given_sign_forms_and_restores_the_library_ones():
    x, y = _batch()
    used = {"fwd": 0, "bwd": 0}
    lib_fwd, lib_bwd = quant_mod.binary_sign, quant_mod.approx_sign_backward

    def fwd(t):
        used["fwd"] += 1
        return lib_fwd(t)

    def bwd(t, g):
        used["bwd"] += 1
        return lib_bwd(t, g)

    step = TimedStep("w1a1", "W1A1", CE, True, "cifar_resnet20", 0.25, _teacher(), x, y, sign=fwd, sign_backward=bwd)
    before = [p.detach().clone() for p in step.student.parameters()]
    step.step()
    # 18 binary convs in a ResNet-20, one activation sign each; weight signs use the same forward
    assert used["fwd"] >= 18 and used["bwd"] == 18
    assert quant_mod.binary_sign is lib_fwd and quant_mod.approx_sign_backward is lib_bwd
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, step.student.parameters()))


def test_timed_step_restores_the_library_sign_after_an_error():
    x, y = _batch()
    lib_fwd = quant_mod.binary_sign

    def broken(t):
        raise RuntimeError("boom")

    step = TimedStep("w1a1", "W1A1", CE, False, "cifar_resnet20", 0.25, _teacher(), x, y, sign=broken)
    with pytest.raises(RuntimeError, match="boom"):
        step.step()
    assert quant_mod.binary_sign is lib_fwd


def test_channels_last_step_matches_nchw_within_float_rounding():
    """FP: one step in channels_last ends within float rounding of the NCHW step. W1A1: the binary
    weights are bit-identical in both layouts (an activation within rounding of 0 may still take
    the other sign, which a binary net amplifies, so its whole step is not compared)."""
    x, y = _batch()
    teacher = _teacher()
    a = TimedStep("a", "FP", CE, False, "cifar_resnet20", 0.25, teacher, x, y)
    b = TimedStep("b", "FP", CE, False, "cifar_resnet20", 0.25, teacher, x, y, channels_last=True)

    def flat(step):
        return torch.cat([p.detach().flatten() for p in step.student.parameters()])

    p0 = flat(a).clone()
    assert torch.equal(p0, flat(b))
    a.step()
    b.step()
    da, db = flat(a) - p0, flat(b) - p0
    assert da.norm() > 0.1  # the step moved the weights ...
    assert (da - db).norm() / da.norm() < 1e-3  # ... the same way in both layouts (measured: 7e-5)
    a = TimedStep("a", "W1A1", CE, False, "cifar_resnet20", 0.25, teacher, x, y)
    b = TimedStep("b", "W1A1", CE, False, "cifar_resnet20", 0.25, teacher, x, y, channels_last=True)
    convs = [(ma, mb) for ma, mb in zip(a.student.modules(), b.student.modules()) if hasattr(ma, "quant_weight")]
    assert len(convs) == 18
    for ma, mb in convs:
        assert mb.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ma.quant_weight().value, mb.quant_weight().value)


def test_train_cost_script_writes_its_table(tmp_path):
    mod = load_script("benchmarks/train_cost.py")
    out = tmp_path / "cost"
    rc = mod.main(
        [
            "--batch",
            "4",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--image-size",
            "8",
            "--width-mult",
            "0.25",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    names = [r["config"] for r in res["rows"]]
    assert "W1A1 CE" in names and "FP CE (same network)" in names and len(names) == len(set(names))
    assert all(r["median_ms"] > 0 and len(r["all_ms"]) == 1 for r in res["rows"])
    assert res["isa"] in ("AVX-512", "AVX2", "no AVX2", "unknown")
    assert res["compile_seconds"] == {}
    assert "loss alone: CE" in names and "loss alone: ITRD" in names
    assert math.isfinite(res["itrd_loss_alone_vs_ce_step"])
    md = out.with_suffix(".md").read_text()
    assert "| W1A1 CE |" in md and "ITRD's terms alone" in md


@pytest.mark.slow
def test_fused_sign_kernels_give_the_library_values():
    mod = load_script("benchmarks/train_cost.py")
    fwd, bwd = mod.fused_sign_kernels()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 5, generator=g) * 1.5
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1.0])
    grad = torch.randn(x.shape, generator=g)
    assert torch.equal(fwd(x), quant_mod.binary_sign(x))
    assert torch.equal(bwd(x, grad), quant_mod.approx_sign_backward(x, grad))


def test_fold_batchnorm_gives_the_same_function_without_batchnorms():
    mod = load_script("benchmarks/train_cost.py")
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet20", 10, in_chans=1, width_mult=0.25).eval()
    with torch.no_grad():  # statistics and affine terms away from the identity
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    folded = mod.fold_batchnorm(teacher)
    bn = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn == [] and sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()) == 19
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        a, b = teacher(x), folded(x)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
