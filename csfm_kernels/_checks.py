"""Argument checks shared by the ops: each error names the argument and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch


def check_float_tensor(name: str, t: object, device: torch.device) -> None:
    """A floating-point tensor on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def check_index_tensor(name: str, t: object, shape: Sequence[int], low: int, high: int,
                       device: torch.device) -> None:
    """An integer tensor of exactly ``shape`` (no broadcasting) with values in [low, high)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= high:
            raise ValueError(f"{name} values must lie in [{low}, {high - 1}], got range [{lo}, {hi}]")


def check_channel_ids(name: str, ids: object, shape: Sequence[int], n_types: int,
                      device: torch.device) -> None:
    """Channel-type ids: one per channel, each a row of the channel-type table."""
    check_index_tensor(name, ids, shape, 0, n_types, device)

