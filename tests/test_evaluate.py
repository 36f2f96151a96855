"""evaluate(): accuracies and loss by hand, prediction order, and the layout it runs models in."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bnn_distill.evaluate import evaluate
from bnn_distill.execution import memory_format_for
from bnn_distill.models import create_model

CPU = torch.device("cpu")


class PixelsAsLogits(nn.Module):
    """Logits = the image's pixels (B, 1, 2, 3) -> (B, 6): six classes with known scores."""

    def forward(self, x):
        return x.flatten(1)


def test_top1_top5_loss_and_predictions_by_hand():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # class 0 first: right for label 0
            [1.0, 9, 2, 3, 4, 5],  # class 1 first; label 5 is second: a top-5 hit, not top-1
            [6.0, 5, 4, 3, 2, 1],  # label 5 scores lowest: in no top-5
        ]
    )
    labels = torch.tensor([0, 5, 5])
    data = TensorDataset(logits.view(3, 1, 2, 3), labels)
    res = evaluate(PixelsAsLogits(), DataLoader(data, batch_size=2), CPU, keep_predictions=True)
    assert res["n"] == 3
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == pytest.approx(200 / 3)
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert res["predictions"].tolist() == [0, 1, 0]  # loader order, across batches


def test_an_empty_loader_gives_nan_and_the_mode_is_restored():
    model = PixelsAsLogits().train()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 2, 3), torch.zeros(0, dtype=torch.long)))
    res = evaluate(model, empty, CPU)
    assert res["n"] == 0 and all(math.isnan(res[k]) for k in ("top1", "top5", "loss"))
    assert model.training


def test_the_same_weights_score_the_same_in_either_layout():
    """A binary network built in NCHW and its channels_last copy give bit-identical results: evaluate
    runs both in training's layout on the CPU (channels_last), which a checkpoint loaded later, in
    NCHW, must reproduce exactly (the grid checks its kept copies against the training summary)."""
    assert memory_format_for(CPU) == torch.channels_last
    assert memory_format_for(torch.device("cuda", 0)) == torch.contiguous_format
    torch.manual_seed(0)
    nchw = create_model("cifar_resnet20", 10, in_chans=1, quant="W1A1", width_mult=0.25, recu=True)
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 1, 12, 12, generator=g), torch.randint(0, 10, (64,), generator=g))
    a = evaluate(nchw, DataLoader(data, batch_size=16), CPU, keep_predictions=True)
    b = evaluate(cl, DataLoader(data, batch_size=16), CPU, keep_predictions=True)
    assert a["loss"] == b["loss"] and torch.equal(a["predictions"], b["predictions"])
    assert nchw.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # left in training's layout
