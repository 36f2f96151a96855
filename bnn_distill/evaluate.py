"""Top-1 / top-5 accuracy of a model on a data loader."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """Return ``{"top1", "top5", "loss", "n"}`` (accuracies in %) with the model in eval mode."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for x, y in it:
            x = x.to(device, non_blocking=True)
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
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}
