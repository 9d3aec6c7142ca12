"""Fixed-length windows of any reader's records as a torch Dataset.

``WindowDataset(source, window_s)`` indexes every (record, window start) pair of a
source (csfm.data.readers.WfdbDirectory, MimicIVECG, PTBXL, Code15, ...) and reads only
that window on access. Items are Records (or whatever ``preprocess`` makes of
them), so a DataLoader needs a collate function that accepts them, e.g.
``DataLoader(ds, collate_fn=list)`` until a preprocessing + collate step is plugged in.

Worker safety: the dataset holds no open file; sources open files lazily per
process (Code15 re-opens its HDF5 files after a fork), so ``num_workers > 0`` works.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from torch.utils.data import Dataset

from csfm.data.record import Record


class WindowSource(Protocol):
    """What WindowDataset needs from a reader (every class in csfm.data.readers.datasets has it)."""

    record_ids: list[str]
    patient_ids: list[str]

    def __len__(self) -> int: ...

    def duration_s(self, i: int) -> float: ...

    def read_window(self, i: int, start_s: float, window_s: float | None) -> Record: ...


class WindowDataset(Dataset):
    """Consecutive non-overlapping windows of window_s seconds over every record of a source.

    source: a WindowSource. window_s: window length in seconds; None gives one item
    per whole record. preprocess: ``callable(record) -> anything`` applied to each
    window (default: the Record itself).
    A record of duration d contributes floor(d / window_s) windows starting at
    0, window_s, ...; a record shorter than window_s contributes one shorter window
    (padding is the preprocessing's job). Windows are read on access, not at init.
    """

    def __init__(self, source: WindowSource, window_s: float | None = 10.0,
                 preprocess: Callable[[Record], Any] | None = None) -> None:
        if window_s is not None and not window_s > 0:
            raise ValueError(f"WindowDataset: window_s must be > 0 seconds or None, got {window_s}")
        self.source = source
        self.window_s = window_s
        self.preprocess = preprocess
        self.index: list[tuple[int, float]] = []
        for i in range(len(source)):
            count = 1 if window_s is None else max(1, math.floor(source.duration_s(i) / window_s + 1e-9))
            self.index.extend((i, k * (window_s or 0.0)) for k in range(count))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Any:
        i, start_s = self.index[k]
        record = self.source.read_window(i, start_s, self.window_s)
        return record if self.preprocess is None else self.preprocess(record)

    @property
    def patient_ids(self) -> list[str]:
        """Patient of every window ([len(self)] str), for subject-wise splits."""
        return [self.source.patient_ids[i] for i, _ in self.index]
