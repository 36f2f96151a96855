"""Tests for :mod:`bnn_distill.summary` on a tiny CIFAR ResNet-20 (widths 4/8/16, 1x8x8 input)."""

from __future__ import annotations

import json

import brevitas.nn as qnn
import pytest
import torch
import torch.nn as nn

from bnn_distill.models import create_model
from bnn_distill.quant import BinaryActQuant, BinaryWeightQuant
from bnn_distill.summary import ModelSummary, summarize

INPUT = (1, 8, 8)


def tiny(quant: str = "FP", **kwargs) -> nn.Module:
    return create_model("cifar_resnet20", 10, in_chans=1, quant=quant, width_mult=0.25, **kwargs)


def rows(summary: ModelSummary) -> dict:
    return {r.name: r for r in summary.rows}


def conv_macs(h_out: int, w_out: int, c_out: int, c_in: int, k: int = 3) -> int:
    return h_out * w_out * c_out * c_in * k * k


# Body convs of the tiny net by hand: stage 1 (4 ch, 8x8), stage 2 (8 ch, 4x4), stage 3 (16 ch, 2x2);
# the first conv of stages 2 and 3 strides and takes the narrower input.
BODY_MACS = (
    6 * conv_macs(8, 8, 4, 4)
    + conv_macs(4, 4, 8, 4)
    + 5 * conv_macs(4, 4, 8, 8)
    + conv_macs(2, 2, 16, 8)
    + 5 * conv_macs(2, 2, 16, 16)
)
STEM_MACS = 8 * 8 * 4 * 1 * 9  # 2304
FC_MACS = 16 * 10


def test_stem_and_layer_macs_by_hand():
    r = rows(summarize(tiny(), INPUT))
    assert r["conv1"].macs == 2304 == STEM_MACS
    assert r["conv1"].params == 4 * 1 * 9
    assert r["conv1"].output_shape == (4, 8, 8)
    assert r["layer1.0.conv1"].macs == 8 * 8 * 4 * 4 * 9
    assert r["layer2.0.conv1"].macs == 4 * 4 * 8 * 4 * 9  # stride 2: 8x8 -> 4x4
    assert r["layer2.0.conv1"].output_shape == (8, 4, 4)
    assert r["layer3.1.conv2"].macs == 2 * 2 * 16 * 16 * 9
    assert r["fc"].macs == FC_MACS and r["fc"].params == 16 * 10 + 10
    assert r["bn1"].macs == 0 and r["bn1"].params == 8 and r["bn1"].weight_bits is None
    assert r["head_bn"].output_shape == (16,)


def test_totals_match_model():
    model = tiny("W1A1", weight_scale="learned")
    s = summarize(model, INPUT)
    assert s.total_macs == STEM_MACS + BODY_MACS + FC_MACS == 159136
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.binary_params + s.fp_params == s.total_params
    assert len({r.name for r in s.rows}) == len(s.rows)


@pytest.mark.parametrize(
    "quant,xnor,binary_input",
    [
        ("FP", 0, 0),
        ("W32A1", 0, BODY_MACS),
        ("W1A1", BODY_MACS, 0),
    ],
)
def test_binary_mac_share(quant, xnor, binary_input):
    s = summarize(tiny(quant), INPUT)
    assert s.xnor_macs == xnor
    assert s.binary_input_macs == binary_input
    assert s.fp_macs == s.total_macs - xnor - binary_input
    expected_share = (xnor + binary_input) / s.total_macs
    assert s.binary_mac_share == pytest.approx(expected_share)
    if quant == "FP":
        assert s.binary_mac_share == 0.0 and s.binary_params == 0
    else:
        assert s.binary_mac_share > 0.9


@pytest.mark.parametrize("scale", ["mean_abs", "learned", "none"])
def test_binary_conv_row_memory(scale):
    r = rows(summarize(tiny("W1A1", weight_scale=scale), INPUT))["layer2.1.conv1"]
    c_out = c_in = 8
    scale_bytes = 0 if scale == "none" else 4 * c_out
    assert (r.weight_bits, r.act_bits) == (1, 1)
    assert r.memory_bytes == c_out * c_in * 9 / 8 + scale_bytes  # 72 + 32 bytes
    assert r.binary_params == c_out * c_in * 9


def test_fp_and_w32a1_rows_are_32_bit():
    fp = rows(summarize(tiny(), INPUT))["layer2.1.conv1"]
    w32 = rows(summarize(tiny("W32A1"), INPUT))["layer2.1.conv1"]
    assert (fp.weight_bits, fp.act_bits) == (32, 32)
    assert (w32.weight_bits, w32.act_bits) == (32, 1)
    assert fp.memory_bytes == w32.memory_bytes == 8 * 8 * 9 * 4
    bn = rows(summarize(tiny(), INPUT))["layer2.1.bn1"]
    assert bn.memory_bytes == 8 * 4 * 4  # weight, bias, running mean, running var


def test_learned_scale_counted_in_conv_row():
    s = summarize(tiny("W1A1", weight_scale="learned"), INPUT)
    assert not [r.name for r in s.rows if "quant" in r.name or "alpha" in r.name]
    r = rows(s)["layer2.1.conv1"]
    assert r.params == 8 * 8 * 9 + 8
    assert r.binary_params == 8 * 8 * 9
    assert r.fp32_memory_bytes == 4 * r.params
    mean_abs = rows(summarize(tiny("W1A1"), INPUT))["layer2.1.conv1"]
    assert mean_abs.params == 8 * 8 * 9 and mean_abs.memory_bytes == r.memory_bytes


def test_w1a1_memory_smaller_than_fp():
    fp = summarize(tiny(), INPUT)
    w1 = summarize(tiny("W1A1"), INPUT)
    assert w1.memory_bytes < fp.memory_bytes
    assert fp.memory_bytes == fp.fp32_memory_bytes and fp.compression_ratio == 1.0
    assert w1.fp32_memory_bytes == fp.memory_bytes  # mean_abs adds no parameters
    assert w1.compression_ratio == pytest.approx(fp.memory_bytes / w1.memory_bytes)
    assert w1.compression_ratio > 5


def test_relu_warning():
    relu = summarize(tiny("W1A1", act="relu"), INPUT)
    assert any("ReLU" in w for w in relu.warnings)
    assert not any("ReLU" in w for w in summarize(tiny("W1A1"), INPUT).warnings)  # hardtanh
    assert not any("ReLU" in w for w in summarize(tiny("FP", act="relu"), INPUT).warnings)
    full = create_model("cifar_resnet20", 10, quant="W1A1", act="relu")
    assert any("ReLU" in w for w in summarize(full, (3, 8, 8)).warnings)


def test_bias_and_unscaled_warnings():
    biased = nn.Sequential(
        qnn.QuantConv2d(
            2, 4, 3, bias=True, weight_quant=BinaryWeightQuant, input_quant=BinaryActQuant, return_quant_tensor=False
        ),
        nn.BatchNorm2d(4),
    )
    s = summarize(biased, (2, 5, 5))
    assert any(w.startswith("0: binary conv with a bias") for w in s.warnings)
    assert rows(s)["0"].params == 4 * 2 * 9 + 4
    assert rows(s)["0"].memory_bytes == 4 * 2 * 9 / 8 + 4 * 4 + 4 * 4  # weights, scales, bias

    unscaled = nn.Sequential(
        qnn.QuantConv2d(
            2,
            4,
            3,
            bias=False,
            weight_quant=BinaryWeightQuant.let(scale_mode="none"),
            input_quant=BinaryActQuant,
            return_quant_tensor=False,
        ),
        nn.Flatten(),
        nn.Linear(36, 3),
    )
    assert any("no BatchNorm" in w for w in summarize(unscaled, (2, 5, 5)).warnings)
    assert not any("no BatchNorm" in w for w in summarize(tiny("W1A1", weight_scale="none"), INPUT).warnings)


def test_training_mode_restored():
    model = tiny("W1A1")
    model.train()
    model.bn1.eval()  # a mixed state must survive too
    summarize(model, INPUT)
    assert model.training and model.layer1[0].bn1.training and not model.bn1.training
    model.eval()
    summarize(model, INPUT)
    assert not any(m.training for m in model.modules())


def test_to_dict_json_and_format():
    s = summarize(tiny("W1A1", weight_scale="learned", act="relu"), INPUT)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["totals"]["total_macs"] == s.total_macs
    assert d["rows"][0]["output_shape"] == [4, 8, 8]
    assert d["input_shape"] == list(INPUT) and d["warnings"] == s.warnings
    text = s.format()
    assert all(len(line) <= 110 for line in text.splitlines())
    assert "layer3.2.conv2" in text and "17,454" in text and "159.14k" in text and "Warning:" in text


class _Scaled(nn.Module):
    """A module owning a parameter directly, next to a child layer."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))
        self.fc = nn.Linear(8 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.gain


def test_grouped_conv_and_loose_parameters():
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), _Scaled())
    s = summarize(grouped, (4, 5, 5))
    r = rows(s)
    assert r["0"].macs == 5 * 5 * 8 * (4 // 2) * 9
    assert r["1"].params == 3 and r["1"].weight_bits is None  # the loose parameter, own row
    assert r["1.fc"].macs == 200 * 3
    assert s.total_params == sum(p.numel() for p in grouped.parameters())
