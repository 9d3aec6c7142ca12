"""AdamW parameter groups and the warmup + cosine learning-rate schedule (docs/design.md, "Pretraining recipe")."""
from __future__ import annotations

import math

import torch
from torch import nn

def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that get no weight decay: norms and biases (under 2-D), the
    tables of nn.Embedding modules, and parameters named as embedding tables or tokens
    (``ts_pos_embedding``, ``cls_token``, ``signal_mask_token``, ...). Projections such as
    ``ts_to_patch_embedding.2.weight`` are decayed."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, param in model.named_parameters():
        own = name.rsplit(".", 1)[-1]
        if param.ndim < 2 or "embedding" in own or "token" in own:
            ids.add(id(param))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and the no-decay rest."""
    skip = no_weight_decay_ids(model)
    decay, rest = [], []
    for param in model.parameters():
        if param.requires_grad:
            (rest if id(param) in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def encoder_layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the embeddings and CLS token,
    i + 1 for ``transformer.layers.i``, depth + 1 for the final norm and any head."""
    if name.startswith("transformer.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith("transformer.") or not any(part in name for part in ("embedding", "cls_token")):
        return depth + 1
    return 0


def layerwise_param_groups(encoder: nn.Module, head: nn.Module, depth: int, lr: float, weight_decay: float,
                           decay: float = 0.75) -> list[dict]:
    """AdamW groups for fine-tuning (docs/design.md): lr x decay^(depth + 1 - layer) per encoder
    layer (the head at the full lr), no weight decay as in ``no_weight_decay_ids``."""
    skip = no_weight_decay_ids(encoder) | no_weight_decay_ids(head)
    named = [*encoder.named_parameters(), *((f"head.{n}", p) for n, p in head.named_parameters())]
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        layer = encoder_layer_id(name, depth)
        skip_decay = id(param) in skip
        group = groups.setdefault((layer, skip_decay), {
            "params": [], "lr": lr * decay ** (depth + 1 - layer), "weight_decay": 0.0 if skip_decay else weight_decay,
            "layer": layer})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def warmup_linear(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warmup to 1, then linear decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine to ``min_ratio`` at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
