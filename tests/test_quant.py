"""Property and hand-value tests of the binary quantisers (bnn_distill.quant) and the Brevitas
layers built from them. `hypothesis` is not installed, so properties loop over seeded cases."""

from __future__ import annotations

import math

import brevitas.nn as qnn
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnn_distill.errors import RecipeError
from bnn_distill.quant import (
    BinaryActTensorQuant,
    BinaryWeightTensorQuant,
    binary_sign,
    conv_factory,
    init_binary_scales,
    is_quant_param,
    layer_bits,
    mean_abs_scale,
    recu_tau_clamp,
    set_tau,
    sign_grad,
    sign_with_grad,
    tau_at,
)

SEEDS = range(8)


def _rand(seed: int, *shape, zeros: bool = True) -> torch.Tensor:
    """Random tensor; with ``zeros`` about a fifth of the entries are exactly 0 (half of them -0.0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if zeros:
        mask = torch.rand(*shape, generator=g) < 0.2
        neg = torch.rand(*shape, generator=g) < 0.5
        x = torch.where(mask, torch.where(neg, torch.tensor(-0.0), torch.tensor(0.0)), x)
    return x


def _pm1(x: torch.Tensor) -> torch.Tensor:
    """Reference sign with sign(0) = +1, element by element in Python."""
    return torch.tensor([1.0 if v >= 0 else -1.0 for v in x.flatten().tolist()]).view_as(x)


# --------------------------------------------------------------------------- binary_sign


def test_binary_sign_hand_values():
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_sign_only_pm1(seed):
    x = _rand(seed, 4, 3, 5, 5)
    y = binary_sign(x)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(y, _pm1(x))
    assert y.shape == x.shape and y.dtype == x.dtype


# --------------------------------------------------------------------------- gradients

POINTS = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0])
UPSTREAM = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
# identity:    grad unchanged
# ste:         mask |x| <= 1      -> [0, 1, 1, 1, 1] * g
# approx_sign: max(0, 2 - 2|x|)   -> [0, 1, 2, 1.5, 0] * g
EXPECTED_GRADS = {
    "identity": [1.0, 2.0, 3.0, 4.0, 5.0],
    "ste": [0.0, 2.0, 3.0, 4.0, 5.0],
    "approx_sign": [0.0, 2.0, 6.0, 6.0, 0.0],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_GRADS))
def test_sign_with_grad_hand_values(kind):
    x = POINTS.clone().requires_grad_(True)
    y = sign_with_grad(x, kind)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.backward(UPSTREAM)
    assert x.grad.tolist() == pytest.approx(EXPECTED_GRADS[kind])
    assert (sign_grad(POINTS, kind) * UPSTREAM).tolist() == pytest.approx(EXPECTED_GRADS[kind])


def test_sign_grad_unknown_kind():
    with pytest.raises(ValueError):
        sign_grad(POINTS, "tanh")


def _approx_sign_poly(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real Net's piecewise polynomial, whose derivative is the ApproxSign gradient."""
    return torch.where(
        x < -1,
        -torch.ones_like(x),
        torch.where(x < 0, 2 * x + x * x, torch.where(x < 1, 2 * x - x * x, torch.ones_like(x))),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_approx_sign_gradient_is_derivative_of_bireal_polynomial(seed):
    x = (_rand(seed, 200, zeros=False) * 1.5).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = _rand(seed + 100, 200, zeros=False)
    sign_with_grad(x, "approx_sign").backward(g)
    _approx_sign_poly(x2).backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


# --------------------------------------------------------------------------- weight tensor quant


@pytest.mark.parametrize("seed", SEEDS)
def test_weight_quant_mean_abs(seed):
    w = _rand(seed, 6, 3, 3, 3)
    tq = BinaryWeightTensorQuant(6, "mean_abs", recu=False, gradient="identity")
    y, scale, zp, bw = tq(w)
    alpha = torch.tensor([w[c].abs().sum().item() / w[c].numel() for c in range(6)])
    assert torch.allclose(scale.flatten(), alpha, atol=1e-6)
    assert torch.allclose(mean_abs_scale(w).flatten(), alpha, atol=1e-6)
    assert torch.allclose(y.abs(), alpha.view(6, 1, 1, 1).expand_as(y), atol=1e-6)
    assert torch.equal(torch.sign(y), _pm1(w))  # sign(0) = +1 survives the scaling
    assert float(bw) == 1.0 and float(zp) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_weight_quant_none_gives_pm1(seed):
    w = _rand(seed, 5, 2, 3, 3)
    y, scale, _, _ = BinaryWeightTensorQuant(5, "none", recu=False, gradient="ste")(w)
    assert torch.equal(y, _pm1(w))
    assert torch.equal(scale.flatten(), torch.ones(5))


@pytest.mark.parametrize("seed", SEEDS)
def test_weight_quant_recu_sign_follows_centred_weight(seed):
    # ReCU standardisation (x - mean_c) / std_c keeps the sign of x - mean_c, and the symmetric
    # clamp keeps it too; the scale is still mean |w_c| of the raw weight.
    w = _rand(seed, 4, 3, 3, 3, zeros=False) * 0.1 + 0.05
    tq = BinaryWeightTensorQuant(4, "mean_abs", recu=True, gradient="identity")
    tq.tau.fill_(0.9)
    y, _, _, _ = tq(w)
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(y, alpha * _pm1(centred), atol=1e-7)
    # ...which differs from the raw sign: the weights here are mostly positive.
    assert not torch.equal(torch.sign(y), _pm1(w))


def test_weight_quant_learned_scale_and_init():
    w = _rand(0, 3, 2, 3, 3)
    tq = BinaryWeightTensorQuant(3, "learned", recu=False, gradient="identity")
    assert torch.equal(tq.alpha.flatten(), torch.ones(3))
    tq.init_scale(w)
    assert torch.allclose(tq.alpha.flatten(), w.abs().mean(dim=(1, 2, 3)), atol=1e-7)
    y, _, _, _ = tq(w)
    assert torch.allclose(y, tq.alpha.view(3, 1, 1, 1) * _pm1(w), atol=1e-7)
    y.sum().backward()
    assert tq.alpha.grad is not None


def test_weight_quant_gradient_kinds_reach_weight():
    w = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0]).view(5, 1, 1, 1).requires_grad_(True)
    for kind, expected in EXPECTED_GRADS.items():
        w.grad = None
        y, _, _, _ = BinaryWeightTensorQuant(5, "none", recu=False, gradient=kind)(w)
        y.backward(UPSTREAM.view(5, 1, 1, 1))
        assert w.grad.flatten().tolist() == pytest.approx(expected), kind


def test_act_quant_values_and_gradient():
    tq = BinaryActTensorQuant("approx_sign")
    x = POINTS.clone().requires_grad_(True)
    y, scale, zp, bw = tq(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    assert float(scale) == 1.0 and float(bw) == 1.0 and float(zp) == 0.0
    y.backward(UPSTREAM)
    assert x.grad.tolist() == pytest.approx(EXPECTED_GRADS["approx_sign"])


# --------------------------------------------------------------------------- ReCU clamp and tau


def test_recu_clamp_hand_example():
    # One filter [-3, -1, 1, 3]: mean 0, unbiased var 20/3, std 2.5819889.
    # w1 = [-1.1618950, -0.3872983, 0.3872983, 1.1618950], E = mean|w1| = 0.7745967.
    # tau = 0.85: Q = -E ln(2 - 1.7) = -E ln(0.3) = 0.7745967 * 1.2039728 = 0.9325933 (0.9295160 + 0.0030773).
    assert -math.log(2 - 2 * 0.85) == pytest.approx(1.2039728, abs=1e-7)
    w = torch.tensor([-3.0, -1.0, 1.0, 3.0]).view(1, 1, 1, 4)
    out = recu_tau_clamp(w, 0.85, eps=0.0).flatten()
    assert out.tolist() == pytest.approx([-0.9325933, -0.3872983, 0.3872983, 0.9325933], abs=1e-6)
    # tau = 0.99: Q = 0.7745967 * -ln(0.02) = 3.03 > 1.16, nothing clamped.
    out = recu_tau_clamp(w, 0.99, eps=0.0).flatten()
    assert out.tolist() == pytest.approx([-1.1618950, -0.3872983, 0.3872983, 1.1618950], abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_recu_standardises_per_filter(seed):
    # tau so close to 1 that Q ~ 14 E: nothing is clamped, so the output is the standardised weight.
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(8, 1, 1, 1, generator=g) * 3
    scale = torch.rand(8, 1, 1, 1, generator=g) * 5 + 0.5
    w = torch.randn(8, 4, 3, 3, generator=g) * scale + shift
    out = recu_tau_clamp(w, 1 - 1e-6)
    flat = out.view(8, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(flat.var(1, unbiased=True), torch.ones(8), atol=1e-4)
    # Per-filter positive affine maps of w do not change the result (up to eps).
    a = torch.rand(8, 1, 1, 1, generator=g) + 0.5
    b = torch.randn(8, 1, 1, 1, generator=g)
    assert torch.allclose(recu_tau_clamp(w * a + b, 0.85), recu_tau_clamp(w, 0.85), atol=1e-4)


def test_recu_clamp_fraction_matches_laplace_quantile_and_decreases():
    # For Laplace weights, Q is the tau-quantile of Laplace(0, E), so P(|w1| > Q) = 2 (1 - tau).
    g = torch.Generator().manual_seed(0)
    u = torch.rand(64, 64, 3, 3, generator=g) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1) samples
    fractions = []
    for tau in (0.6, 0.75, 0.85, 0.9, 0.95, 0.99):
        out = recu_tau_clamp(w, tau)
        q = out.abs().max()
        frac = (out.abs() >= q * (1 - 1e-6)).float().mean().item()
        fractions.append(frac)
        assert frac == pytest.approx(2 * (1 - tau), abs=0.02), tau
    assert all(a > b for a, b in zip(fractions, fractions[1:])), fractions


def test_tau_at():
    assert tau_at(0.0) == pytest.approx(0.85)
    assert tau_at(1.0) == pytest.approx(0.99)
    assert tau_at(0.5) == pytest.approx(0.92)
    assert tau_at(-0.3) == pytest.approx(0.85)
    assert tau_at(7.0) == pytest.approx(0.99)
    assert tau_at(0.25, start=0.5, end=0.9) == pytest.approx(0.6)


# --------------------------------------------------------------------------- Brevitas layers


def _conv_input(seed, shape=(2, 3, 6, 6)):
    x = _rand(seed, *shape)
    x[0, 0, 0, :] = 0.0  # a guaranteed row of exact zeros
    return x


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_w32a1_conv_equals_conv_of_sign(seed, stride):
    conv = conv_factory("W32A1")(3, 4, 3, stride, 1)
    assert isinstance(conv, qnn.QuantConv2d)
    x = _conv_input(seed)
    for train in (True, False):
        conv.train(train)
        y = conv(x)
        assert isinstance(y, torch.Tensor)
        ref = F.conv2d(_pm1(x), conv.weight.detach(), stride=stride, padding=1)
        assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("weight_scale", ["mean_abs", "learned", "none"])
@pytest.mark.parametrize("recu", [False, True])
def test_w1a1_conv_equals_conv_of_signs(weight_scale, recu):
    conv = conv_factory("W1A1", weight_scale=weight_scale, recu=recu)(3, 5, 3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(_rand(7, 5, 3, 3, 3, zeros=not recu) * 0.2 + (0.03 if recu else 0.0))
    if weight_scale == "learned":
        init_binary_scales(conv)
    w = conv.weight.detach()
    alpha = {"none": torch.ones(5, 1, 1, 1)}.get(weight_scale, w.abs().mean(dim=(1, 2, 3), keepdim=True))
    w_tilde = w - w.mean(dim=(1, 2, 3), keepdim=True) if recu else w
    x = _conv_input(3)
    ref = F.conv2d(_pm1(x), alpha * _pm1(w_tilde), padding=1)
    for train in (True, False):
        conv.train(train)
        assert torch.allclose(conv(x), ref, atol=1e-5), train


def test_w32a1_input_gradient_is_approx_sign():
    conv = conv_factory("W32A1", act_gradient="approx_sign")(2, 3, 3, 1, 1)
    x = (_rand(11, 1, 2, 5, 5, zeros=False) * 1.2).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    conv(x).square().sum().backward()
    # Independent formulation: forward with the exact sign, backward through Bi-Real's polynomial.
    p = _approx_sign_poly(x2)
    s = p + (_pm1(x2.detach()) - p.detach())
    F.conv2d(s, conv.weight.detach(), padding=1).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_fp_conv_factory_and_bad_options():
    conv = conv_factory("FP")(3, 4, 3, 2, 1)
    assert type(conv) is nn.Conv2d and conv.bias is None and conv.stride == (2, 2)
    with pytest.raises(RecipeError, match=r"did you mean 'W1A1'"):
        conv_factory("W1A2")
    with pytest.raises(RecipeError, match=r"did you mean 'mean_abs'"):
        conv_factory("W1A1", weight_scale="mean_ab")
    with pytest.raises(RecipeError, match=r"did you mean 'approx_sign'"):
        conv_factory("W1A1", act_gradient="aprox_sign")


def test_layer_bits():
    assert layer_bits(conv_factory("W32A1")(3, 4)) == (32, 1)
    assert layer_bits(conv_factory("W1A1")(3, 4)) == (1, 1)
    assert layer_bits(conv_factory("FP")(3, 4)) == (32, 32)
    assert layer_bits(nn.Linear(3, 4)) == (32, 32)
    assert layer_bits(nn.BatchNorm2d(3)) is None


def test_init_binary_scales_and_only_missing():
    make = conv_factory("W1A1", weight_scale="learned")
    model = nn.Sequential(make(3, 4), make(4, 6))
    with torch.no_grad():
        for m in model:
            m.weight.normal_(0, 0.3)
            m.weight_quant.tensor_quant.alpha.fill_(7.0)
    init_binary_scales(model, only_missing={"1"})
    assert torch.equal(model[0].weight_quant.tensor_quant.alpha.flatten(), torch.full((4,), 7.0))
    init_binary_scales(model)
    for m in model:
        expected = m.weight.detach().abs().mean(dim=(1, 2, 3))
        assert torch.allclose(m.weight_quant.tensor_quant.alpha.flatten(), expected, atol=1e-7)


def test_set_tau_changes_buffers_and_gradients():
    make = conv_factory("W1A1", weight_scale="learned", recu=True)
    model = nn.Sequential(make(3, 4), make(4, 4))
    init_binary_scales(model)
    x = _conv_input(5, (2, 3, 6, 6))

    def weight_grad():
        model.zero_grad()
        model(x).square().sum().backward()
        return model[0].weight.grad.clone()

    set_tau(model, 0.6)
    g_low = weight_grad()
    set_tau(model, 0.99)
    for m in model:
        assert m.weight_quant.tensor_quant.tau.item() == pytest.approx(0.99)
    g_high = weight_grad()
    # tau only moves the clamp, so the forward is unchanged but the gradient is not.
    assert not torch.allclose(g_low, g_high)
    # tau is saved with the model.
    assert any(k.endswith("tensor_quant.tau") for k in model.state_dict())


def test_quant_state_keys():
    conv = conv_factory("W1A1", weight_scale="learned", recu=True)(3, 4)
    keys = set(conv.state_dict())
    assert keys == {"weight", "weight_quant.tensor_quant.alpha", "weight_quant.tensor_quant.tau"}
    assert {k for k in keys if is_quant_param(k)} == keys - {"weight"}
    assert set(conv_factory("W32A1")(3, 4).state_dict()) == {"weight"}


@pytest.mark.parametrize("tau", [0.85, 0.9137, 0.99])
def test_recu_clamp_with_a_tensor_tau_equals_the_float_form(tau):
    """The module passes its tau buffer as a tensor (no host sync on a GPU); the clamp must be
    the same, bit for bit, as with the Python float."""
    from bnn_distill.quant import recu_tau_clamp

    torch.manual_seed(7)
    w = torch.randn(16, 8, 3, 3)
    t = torch.tensor(tau)  # float32, as the buffer
    assert torch.equal(recu_tau_clamp(w, t), recu_tau_clamp(w, float(t)))
