"""Index helpers for packed segments (records, channels) of different lengths."""
from __future__ import annotations

from typing import Sequence

import torch


def host_to_device(values: Sequence[int], device: torch.device | str | None,
                   dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Host ints -> a tensor on ``device``, copied without blocking the host (no device sync)."""
    return torch.tensor(list(values), dtype=dtype).to(device, non_blocking=True)


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Host lengths [B] -> cu_seqlens int32 [B+1] = [0, l0, l0+l1, ...] (flash-attn convention)
    on ``device``, summed on the host and copied without a device sync."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + int(n))
    return host_to_device(offsets, device, torch.int32)


def segment_positions(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [B] int64 (on any device) with sum ``total`` (a host int, so nothing is read back)
    -> (owner, within), both [total]: for every packed row, the segment it belongs to and its
    position inside that segment."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    within = torch.arange(total, device=counts.device) - (torch.cumsum(counts, 0) - counts)[owner]
    return owner, within


def host_segment_positions(counts: Sequence[int], device: torch.device | str | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_positions`` of host counts, on ``device``."""
    return segment_positions(host_to_device(counts, device), total=sum(counts))
