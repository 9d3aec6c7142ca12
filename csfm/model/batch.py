"""A batch of records with different lead sets, lengths and reports, kept ragged.

The model packs it itself (patch embedding takes the lists, attention takes cu_seqlens), so
nothing here pads, broadcasts or drops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from csfm.model.token_rhythm import PatchPlaces, patch_places
from csfm_kernels import PATCH_LEN


@dataclass
class Batch:
    """signals[b] [C_b, L_b] float32 (z-scored, 250 Hz, L_b a multiple of 25);
    channel_ids[b] [C_b] int64 in 0..12; text_ids[b] [M_b] int64 (M_b may be 0);
    valid[b] [C_b, L_b] bool (False where samples were missing or padded)."""

    signals: list[torch.Tensor]
    channel_ids: list[torch.Tensor]
    text_ids: list[torch.Tensor]
    valid: list[torch.Tensor]
    record_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.signals)
        if n == 0:
            raise ValueError("a Batch needs at least one record")
        for name in ("channel_ids", "text_ids", "valid"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Batch.{name} has {len(getattr(self, name))} entries for {n} signals")
        for b, (x, ids, ok, text) in enumerate(zip(self.signals, self.channel_ids, self.valid, self.text_ids)):
            where = f"Batch record {b} ({self.record_ids[b] if b < len(self.record_ids) else 'unnamed'})"
            if x.dim() != 2 or ids.shape != (x.shape[0],) or ok.shape != x.shape:
                raise ValueError(f"{where}: signal [C, L] {tuple(x.shape)}, channel_ids {tuple(ids.shape)} "
                                 f"and valid {tuple(ok.shape)} do not agree")
            if x.shape[0] == 0:
                raise ValueError(f"{where}: no usable channel (the model needs at least one ECG lead or PPG)")
            if text.dim() != 1:
                raise ValueError(f"{where}: text_ids must be 1-D, got shape {tuple(text.shape)}")

    def __len__(self) -> int:
        return len(self.signals)

    def n_text_tokens(self) -> torch.Tensor:
        return torch.tensor([len(t) for t in self.text_ids], dtype=torch.int64)

    def patch_places(self, rows: torch.Tensor) -> PatchPlaces:
        """Where the patch rows ``rows`` [K] of this batch (``valid_patches``' order) sit:
        ``csfm.model.token_rhythm.patch_places`` of the samples' shapes."""
        return patch_places([x.shape[1] for x in self.signals], [x.shape[0] for x in self.signals], rows)

    def n_channels(self) -> torch.Tensor:
        return torch.tensor([x.shape[0] for x in self.signals], dtype=torch.int64)

    def valid_patches(self) -> tuple[torch.Tensor, list[int]]:
        """The patch tokens that hold at least one valid sample, as rows of the order the
        encoder packs them in (record by record, channel by channel, patch by patch):
        (rows [K] int64 ascending, on the valid masks' device; kept per record [B] host ints).
        Taking these rows of the patch tokens leaves each one's channel type and position as
        they were."""
        per_record = [v.reshape(v.shape[0], -1, PATCH_LEN).any(-1).reshape(-1) for v in self.valid]
        return torch.cat(per_record).nonzero().flatten(), [int(k.sum()) for k in per_record]

    def split_windows(self, max_samples: int) -> tuple["Batch", torch.Tensor]:
        """Records longer than ``max_samples`` cut into consecutive windows of that length
        (the last one shorter, if the length is not a multiple); each window keeps the
        record's channels and report. -> (batch of windows, owner [W] int64 record index)."""
        parts: list[tuple[int, int, int]] = []  # (record, start, stop)
        for b, x in enumerate(self.signals):
            length = x.shape[1]
            parts.extend((b, start, min(start + max_samples, length)) for start in range(0, max(length, 1), max_samples))
        windows = Batch([self.signals[b][:, a:z] for b, a, z in parts], [self.channel_ids[b] for b, _, _ in parts],
                        [self.text_ids[b] for b, _, _ in parts], [self.valid[b][:, a:z] for b, a, z in parts],
                        [self.record_ids[b] for b, _, _ in parts] if self.record_ids else [])
        return windows, torch.tensor([b for b, _, _ in parts], dtype=torch.int64)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda ts: [t.to(device, non_blocking=True) for t in ts]  # noqa: E731
        return Batch(move(self.signals), move(self.channel_ids), move(self.text_ids), move(self.valid),
                     list(self.record_ids))


def make_batch(signals: Sequence[np.ndarray], channel_types: Sequence[Sequence[int]],
               text_ids: Sequence[Sequence[int]] | None = None, valid: Sequence[np.ndarray] | None = None,
               record_ids: Sequence[str] | None = None) -> Batch:
    """From numpy windows: signals[b] [C_b, L_b], channel_types[b] [C_b], optional token ids."""
    n = len(signals)
    text_ids = text_ids if text_ids is not None else [[] for _ in range(n)]
    valid = valid if valid is not None else [np.isfinite(s) for s in signals]
    return Batch([torch.as_tensor(np.nan_to_num(s), dtype=torch.float32) for s in signals],
                 [torch.as_tensor(c, dtype=torch.int64) for c in channel_types],
                 [torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in text_ids],
                 [torch.as_tensor(v, dtype=torch.bool) for v in valid],
                 list(record_ids) if record_ids is not None else [])
