"""Argument checks shared by the ops: each error names the argument and what was expected."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def check_values(ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raises ValueError(message + detail()) where the 0-d bool tensor ``ok`` is False.

    The check runs where ``ok`` lives, with no host read: on CUDA a failure becomes a
    device-side assert with ``message`` at the next synchronising call (so a forward stays
    free of host syncs); on CPU it raises here, and ``detail`` (computed only then) adds the
    offending values.
    """
    if ok.device.type != "cpu":
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message + (detail() if detail is not None else "")) from None


def check_float_tensor(name: str, t: object, device: torch.device) -> None:
    """A floating-point tensor on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def check_index_tensor(name: str, t: object, shape: Sequence[int], device: torch.device) -> None:
    """An integer tensor of exactly ``shape`` (no broadcasting) on ``device`` (values: check_index_range)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def check_index_range(name: str, t: torch.Tensor, low: int, high: int,
                      detail: Callable[[], str] | None = None) -> None:
    """Every value of the integer tensor ``t`` in [low, high), checked where ``t`` lives
    (check_values); ``detail`` may say more than the range found, on CPU."""
    check_values(((t >= low) & (t < high)).all(), f"{name} values must lie in [{low}, {high - 1}]",
                 detail or (lambda: f", got range [{int(t.min())}, {int(t.max())}]"))


def check_channel_ids(name: str, ids: object, shape: Sequence[int], n_types: int,
                      device: torch.device) -> None:
    """Channel-type ids: one per channel, each a row of the channel-type table."""
    check_index_tensor(name, ids, shape, device)
    check_index_range(name, ids, 0, n_types)

