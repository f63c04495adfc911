"""AdamW with linear warmup and cosine decay, and gradient clipping.

The learning rate is a pure function of the step, so the "scheduler state" of a checkpoint is its step
number and a resumed run sets exactly the rate an uninterrupted run would::

    lr(s) = lr * (s + 1) / warmup                                     for s < warmup
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * p)) / 2),  p = (s - warmup) / max(1, total - warmup)

with ``m = min_lr_ratio``; step ``s`` counts from 0 and ``lr(s)`` is used for the update of step ``s``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from zmqdisagg.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    m = cfg.min_lr_ratio
    return cfg.lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` (fp32 master weights: the draft is kept in fp32)."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr_at(0, cfg), betas=cfg.betas,
                             weight_decay=cfg.weight_decay, foreach=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm``; return the norm before clipping."""
    return float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm,
                                                foreach=False))
