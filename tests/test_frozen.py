"""The frozen teacher's fast forward forms: BatchNorm folding against its definition, the check
against the teacher as trained, and the fall-back when a fold would change the function."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from conftest import tiny_recipe_dict

from bnn_distill.errors import RecipeError
from bnn_distill.frozen import FrozenTeacher, count_batchnorms, fold_batchnorm
from bnn_distill.models import create_model
from bnn_distill.recipe import recipe_from_dict


def _with_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, then eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def test_fold_of_one_conv_and_batchnorm_by_hand():
    # conv weight 2, no bias; BN mean 1, var 4, eps 0, gamma 3, beta 0.5:
    # 3 * (2x - 1) / 2 + 0.5 = 3x - 1, so the folded conv has weight 3 and bias -1
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(2.0)
    bn = nn.BatchNorm2d(1, eps=0.0)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(0.5)
    folded = fold_batchnorm(nn.Sequential(conv, bn))
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].weight.item() == 3.0 and folded[0].bias.item() == -1.0
    x = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])
    assert torch.equal(folded(x), torch.tensor([[[[-1.0, 2.0], [5.0, -4.0]]]]))
    assert conv.bias is None and bn.running_var.item() == 4.0  # the original is untouched


@pytest.mark.parametrize("name", ["cifar_resnet20", "torchvision:resnet18"])
def test_fold_keeps_the_function_and_removes_every_batchnorm(name):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = _with_statistics(create_model(name, 10, width_mult=0.5) if ":" not in name else create_model(name, 10), x)
    before = count_batchnorms(model)
    folded = fold_batchnorm(model)
    assert before > 0 and count_batchnorms(folded) == 0
    assert count_batchnorms(model) == before
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert (ref - got).abs().max() <= 1e-4 * ref.abs().max()


def test_frozen_teacher_returns_the_eager_outputs_and_feature():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    model = _with_statistics(create_model("cifar_resnet20", 10, width_mult=0.5), x)
    feats = {}
    h = model.get_submodule("layer3").register_forward_hook(lambda m, i, o: feats.update(out=o))
    with torch.no_grad():
        ref = model(x)
    h.remove()
    t = FrozenTeacher(model, "layer3", "folded")
    logits, feat = t(x)
    assert t.form == "folded" and t.check["batchnorms_folded"] == count_batchnorms(model)
    assert t.check["max_rel_err"] < 5e-4
    assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert feat.shape == (16, feats["out"][0].numel()) and torch.allclose(
        feat, feats["out"].flatten(1), rtol=1e-3, atol=1e-3 * feats["out"].abs().max().item()
    )
    assert not logits.is_inference() and not feat.is_inference()  # usable by the student's backward
    again, _ = t(x)  # settled once: the same form afterwards
    assert t.form == "folded" and torch.equal(again, logits)
    # the teacher as trained keeps no hook of this stage (it is evaluated and reused after it)
    assert not model.get_submodule("layer3")._forward_hooks


def test_eager_is_the_model_as_trained():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = _with_statistics(create_model("cifar_resnet20", 10, width_mult=0.25), x)
    t = FrozenTeacher(model, None, "eager")
    logits, feat = t(x)
    with torch.no_grad():
        assert torch.equal(logits, model(x)) and feat is None
    assert t.form == "eager"


class _PreActBlock(nn.Module):
    """bn1 runs before conv1 (pre-activation): folding bn1 into conv1 by name would be wrong."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.conv1(torch.relu(self.bn1(x))).mean((2, 3)))


def test_a_fold_that_changes_the_function_falls_back_to_eager(caplog):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    model = _with_statistics(_PreActBlock(), x)
    with torch.no_grad():
        ref = model(x)
        assert (fold_batchnorm(model)(x) - ref).abs().max() > 1e-2  # the name-based fold is wrong here
    t = FrozenTeacher(model, None, "folded")
    with caplog.at_level(logging.INFO, logger="bnn_distill.frozen"):
        logits, _ = t(x)
    assert t.form == "eager" and torch.equal(logits, ref)
    assert "differs from the teacher as trained" in caplog.text


def test_recipe_teacher_forward_is_checked_and_not_in_the_fingerprint(tmp_path):
    d = tiny_recipe_dict(tmp_path)
    base = recipe_from_dict(d)
    assert base.teacher_forward == "folded"
    eager = recipe_from_dict({**d, "teacher_forward": "eager"})
    assert eager.fingerprint() == base.fingerprint()  # a run may resume with another form
    with pytest.raises(RecipeError, match=r"teacher_forward: 'fused' is not valid.*valid: .*eager.*folded"):
        recipe_from_dict({**d, "teacher_forward": "fused"})


@pytest.mark.slow
def test_compiled_form_matches_or_falls_back():
    """torch.compile of the folded teacher (needs a C++ compiler on CPU); either it matches eager, or the
    teacher falls back to the folded form, never to a wrong one."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = _with_statistics(create_model("cifar_resnet20", 10, width_mult=0.25), x)
    t = FrozenTeacher(model, "head_bn", "compiled")
    logits, feat = t(x)
    with torch.no_grad():
        ref = model(x)
    assert t.form in ("compiled", "folded")
    assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()) and feat is not None
