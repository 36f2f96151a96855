"""Top-1 / top-5 accuracy of a model on a data loader, and McNemar's test for comparing two models
on the same images."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    desc: str = "eval",
    keep_predictions: bool = False,
) -> Dict[str, Any]:
    """Return ``{"top1", "top5", "loss", "n"}`` (accuracies in %) with the model in eval mode;
    ``keep_predictions`` adds ``"predictions"``, the top-1 class of every sample in loader order
    (N,) int64. The model and the images run in training's layout for ``device``
    (:func:`~bnn_distill.execution.memory_format_for`; the model's 4-d weights are left in it)."""
    from .execution import memory_format_for

    fmt = memory_format_for(device)
    model.to(memory_format=fmt)
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    preds: List[torch.Tensor] = []
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for x, y in it:
            x = x.to(device, non_blocking=True, memory_format=fmt) if x.dim() == 4 else x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with ctx:
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (B, k)
            hit = top.eq(y.unsqueeze(1))
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            if keep_predictions:
                preds.append(top[:, 0].cpu())
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    out: Dict[str, Any] = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}
    if keep_predictions:
        out["predictions"] = torch.cat(preds)
    return out


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (images one model gets
    right and the other wrong, each way): under equal accuracy each discordant image goes either
    way with probability 1/2, so ``P = min(1, 2 P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
    ]
    top = max(log_terms)
    return min(1.0, 2.0 * math.exp(top) * sum(math.exp(t - top) for t in log_terms))
