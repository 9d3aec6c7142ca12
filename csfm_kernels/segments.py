"""Index helpers for packed segments (records, channels) of different lengths."""
from __future__ import annotations

from typing import Sequence

import torch


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor,
                            device: torch.device | None = None) -> torch.Tensor:
    """lengths [B] -> cu_seqlens int32 [B+1] = [0, l0, l0+l1, ...] (flash-attn convention)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0)
    return out


def segment_positions(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [B] int64 -> (owner, within), both [sum counts]: for every packed row, the
    segment it belongs to and its position inside that segment."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    within = torch.arange(int(counts.sum()), device=counts.device) - (torch.cumsum(counts, 0) - counts)[owner]
    return owner, within
