"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

from .recipe import ScheduleConfig


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of a stage.

    * linear warm-up over ``warmup_epochs`` from ``base_lr / warmup_steps`` up to ``base_lr``;
    * ``cosine``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction
      of post-warm-up steps done;
    * ``step``: ``base_lr * gamma ** (number of milestones passed)``;
    * ``constant``: ``base_lr``.
    """
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.name == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if cfg.name == "step":
        epoch = step // max(1, steps_per_epoch)
        return base_lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    return base_lr
