"""AdamW parameter groups and the warmup + cosine learning-rate schedule (DESIGN.md §2)."""
from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_NAMES = ("embedding", "cls_token", "mask_token", "norm")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, embedding tables, the CLS and mask tokens get no weight decay."""
    return param.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and the no-decay rest."""
    decay, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine to ``min_ratio`` at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
