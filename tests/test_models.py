"""Tests of the ResNet family (bnn_distill.models): registry, quantisation placement, state-dict
layout, torchvision compatibility and the block / shortcut maths. CPU, a few seconds in total."""

from __future__ import annotations

import re

import brevitas.nn as qnn
import pytest
import torch
import torch.nn as nn
import torchvision

from bnn_distill.errors import RecipeError
from bnn_distill.models import MODELS, BasicBlock, PadShortcut, ResNet, create_model
from bnn_distill.quant import conv_factory, is_quant_param, layer_bits

MODES = ("FP", "W32A1", "W1A1")
BODY_CONV = re.compile(r"^layer\d+\.\d+\.conv[12]$")


def _is_brevitas(m: nn.Module) -> bool:
    return type(m).__module__.startswith("brevitas")


def test_registry():
    assert {"cifar_resnet18", "cifar_resnet20", "resnet18", "resnet34"} <= set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_build_and_logit_shape(name, mode, in_chans):
    torch.manual_seed(0)
    # quarter width keeps this grid fast; full widths are covered below and by the torchvision test
    model = create_model(name, num_classes=7, in_chans=in_chans, quant=mode, width_mult=0.25).eval()
    with torch.no_grad():
        y = model(torch.randn(2, in_chans, 32, 32))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()


def test_paper_student_full_width():
    # ReCU's CIFAR ResNet-18 student: 64/128/256/512, 2 blocks per stage, BN1d(512) head.
    model = create_model("cifar_resnet18", 10, quant="W1A1", weight_scale="learned", recu=True)
    assert [getattr(model, s)[0].conv1.out_channels for s in model.stage_names] == [64, 128, 256, 512]
    assert [len(getattr(model, s)) for s in model.stage_names] == [2, 2, 2, 2]
    assert isinstance(model.head_bn, nn.BatchNorm1d) and model.head_bn.num_features == 512
    model.train()
    y = model(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 10)
    y.sum().backward()
    assert model.layer4[1].conv2.weight.grad is not None


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_quantisation_only_in_body_convs(name, mode):
    model = create_model(name, num_classes=10, quant=mode, width_mult=0.25)
    n_body = 0
    for mname, m in model.named_modules():
        if BODY_CONV.match(mname):
            n_body += 1
            if mode == "FP":
                assert type(m) is nn.Conv2d, mname
            else:
                assert isinstance(m, qnn.QuantConv2d), mname
                assert layer_bits(m) == ((32, 1) if mode == "W32A1" else (1, 1)), mname
        elif isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            # stem, downsample, every BN, head_bn and fc stay plain PyTorch, full precision
            assert type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d), mname
            assert layer_bits(m) in (None, (32, 32)), mname
        elif _is_brevitas(m):
            # only the quantisers' own submodules live under a body conv
            assert BODY_CONV.match(
                mname.split(".weight_quant")[0]
                .split(".input_quant")[0]
                .split(".output_quant")[0]
                .split(".bias_quant")[0]
            ), mname
    assert n_body == 2 * sum(MODELS[name].blocks)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_across_modes(name):
    small = dict(width_mult=0.125)  # keys do not depend on the width
    fp_model = create_model(name, 10, quant="FP", **small)
    fp = set(fp_model.state_dict())
    a1 = set(create_model(name, 10, quant="W32A1", **small).state_dict())
    assert fp == a1
    for scale, per_conv in (("mean_abs", {"tau"}), ("learned", {"tau", "alpha"})):
        w1 = set(create_model(name, 10, quant="W1A1", weight_scale=scale, **small).state_dict())
        assert fp <= w1
        extra = w1 - fp
        assert all(is_quant_param(k) for k in extra)
        assert not any(is_quant_param(k) for k in fp)
        expected = {
            f"{conv}.weight_quant.tensor_quant.{p}"
            for conv, _ in fp_model.named_modules()
            if BODY_CONV.match(conv)
            for p in per_conv
        }
        assert extra == expected


def test_fp_and_w32a1_share_weights():
    # An FP checkpoint loads strictly into W32A1 (the first stage of the two-stage recipe).
    fp = create_model("cifar_resnet20", 10, quant="FP")
    a1 = create_model("cifar_resnet20", 10, quant="W32A1")
    a1.load_state_dict(fp.state_dict(), strict=True)
    assert torch.equal(a1.layer2[0].conv1.weight, fp.layer2[0].conv1.weight)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_torchvision_state_dict_loads_and_matches(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics so eval-mode BN is not the identity
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours = create_model(name, 1000).eval()
    result = ours.load_state_dict(tv.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(ours.state_dict()) == set(tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- blocks and shortcuts


def test_pad_shortcut_stride2_hand_values():
    x = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4)
    y = PadShortcut(2, 3, stride=2)(x)
    # channel 0 = [[0..3], [4..7], [8..11], [12..15]]: 2x2 means (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5,
    # (8+9+12+13)/4 = 10.5, (10+11+14+15)/4 = 12.5; channel 1 is channel 0 + 16; channel 2 appended zeros.
    expected = torch.tensor(
        [[[2.5, 4.5], [10.5, 12.5]], [[18.5, 20.5], [26.5, 28.5]], [[0.0, 0.0], [0.0, 0.0]]]
    ).unsqueeze(0)
    assert torch.equal(y, expected)


def test_pad_shortcut_odd_size_and_stride1():
    # 3x3 input, ceil mode: partial windows average only the real pixels.
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    y = PadShortcut(1, 1, stride=2)(x)
    assert torch.equal(y, torch.tensor([[[[2.0, 3.5], [6.5, 8.0]]]]))
    x = torch.randn(2, 3, 5, 5)
    y = PadShortcut(3, 5, stride=1)(x)
    assert y.shape == (2, 5, 5, 5)
    assert torch.equal(y[:, :3], x) and torch.equal(y[:, 3:], torch.zeros(2, 2, 5, 5))


def _zero_conv_block(bireal: bool) -> BasicBlock:
    block = BasicBlock(3, 3, 1, conv_factory("FP"), nn.Identity, "param_free", bireal).eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()
        block.bn1.bias.fill_(0.5)
        block.bn2.bias.fill_(0.25)
    return block


def test_block_formulas_with_zero_convs():
    # Convs output 0, so bn1 -> 0.5 and bn2 -> 0.25 everywhere; activations are the identity.
    # Bi-Real: h = 0.5 + x, y = 0.25 + h = x + 0.75.   Standard: y = 0.25 + x.
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(_zero_conv_block(True)(x), x + 0.75)
        assert torch.allclose(_zero_conv_block(False)(x), x + 0.25)


def test_bireal_and_standard_forward_differ():
    torch.manual_seed(0)
    a = create_model("cifar_resnet20", 10, quant="W1A1", bireal=True).eval()
    b = create_model("cifar_resnet20", 10, quant="W1A1", bireal=False).eval()
    b.load_state_dict(a.state_dict(), strict=True)  # same parameters, different wiring
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_conv_shortcut_builds_downsample():
    m = create_model("cifar_resnet20", 10, shortcut="conv")
    assert isinstance(m.layer2[0].downsample, nn.Sequential)
    assert type(m.layer2[0].downsample[0]) is nn.Conv2d
    assert m.layer1[0].downsample is None  # 16 -> 16, stride 1: identity
    p = create_model("cifar_resnet20", 10)
    assert p.layer2[0].downsample is None and isinstance(p.layer2[0].shortcut, PadShortcut)


@pytest.mark.parametrize(
    "mult, widths", [(1.0, (16, 32, 64)), (2.0, (32, 64, 128)), (0.5, (8, 16, 32)), (0.3, (5, 10, 19))]
)  # rounded: 4.8, 9.6, 19.2
def test_width_mult(mult, widths):
    m = create_model("cifar_resnet20", 10, width_mult=mult)
    got = tuple(getattr(m, s)[-1].conv2.out_channels for s in m.stage_names)
    assert got == widths
    assert m.conv1.out_channels == widths[0]
    assert m.num_features == widths[-1] and m.fc.in_features == widths[-1]
    assert isinstance(m.head_bn, nn.BatchNorm1d) and m.head_bn.num_features == widths[-1]


def test_stems_and_heads():
    c = create_model("cifar_resnet18", 10)
    assert c.conv1.kernel_size == (3, 3) and isinstance(c.maxpool, nn.Identity)
    assert isinstance(c.head_bn, nn.BatchNorm1d) and isinstance(c.act1, nn.Hardtanh)
    i = create_model("resnet18", 10)
    assert i.conv1.kernel_size == (7, 7) and isinstance(i.maxpool, nn.MaxPool2d)
    assert isinstance(i.head_bn, nn.Identity) and isinstance(i.act1, nn.ReLU)
    assert isinstance(create_model("resnet18", 10, act="prelu").act1, nn.PReLU)


def test_unknown_arch_and_options():
    with pytest.raises(RecipeError, match=r"did you mean 'resnet18'"):
        create_model("resnet19", 10)
    with pytest.raises(RecipeError, match=r"did you mean 'bireal'"):
        create_model("resnet18", 10, bireel=True)
    with pytest.raises(RecipeError, match=r"did you mean 'relu'"):
        create_model("resnet18", 10, act="rélu")
    with pytest.raises(RecipeError):
        create_model("resnet18", 10, shortcut="dense")
    with pytest.raises(RecipeError):
        create_model("resnet18", 10, width_mult=0)
    with pytest.raises(RecipeError):
        create_model("resnet18", 10, quant="W2A2")


def test_resnet_class_defaults_to_fp():
    m = ResNet((1, 1), (4, 8), num_classes=3, in_chans=1)
    assert not any(_is_brevitas(x) for x in m.modules())
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 3)
