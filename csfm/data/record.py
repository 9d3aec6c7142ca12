"""The one record type every reader returns and every later stage takes, and the two
protocols of what gives records: ``RecordSource`` (any indexable collection of Records) and
``WindowedSource`` (one that can also tell a record's duration and read part of it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

CHANNEL_TYPE_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6", "PPG")
PPG_TYPE = 12  # channel types 0..11 are the 12 ECG leads, 12 is PPG


@dataclass
class Record:
    """One recording after lead resolution: only channels the model can use are kept.

    signal: [C, T] float32 in the channel's physical units, NaN where samples are missing.
    fs: sampling frequency in Hz (any positive float, e.g. 62.4725).
    channel_names: the names as the file gives them; units: e.g. "mV", "NU".
    channel_types: [C] ints in 0..12 (I..V6, PPG), see CHANNEL_TYPE_NAMES.
    modalities: "ECG" or "PPG" per channel.
    text: free-text report ("" when there is none).
    metadata: per-record facts the source has (age, sex, labels, ...).
    dropped_channels: names of the channels the lead contract dropped (ABP, RESP, ...).
    """

    signal: np.ndarray
    fs: float
    channel_names: list[str]
    units: list[str]
    channel_types: list[int]
    modalities: list[str]
    text: str = ""
    patient_id: str = ""
    record_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    dropped_channels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = f"record {self.record_id or '<unnamed>'}"
        if not isinstance(self.signal, np.ndarray) or self.signal.ndim != 2:
            raise ValueError(f"{where}: signal must be a [C, T] numpy array, got "
                             f"{getattr(self.signal, 'shape', type(self.signal).__name__)}")
        n = self.signal.shape[0]
        for name in ("channel_names", "units", "channel_types", "modalities"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{where}: {name} has {len(getattr(self, name))} entries for {n} channels")
        if not (np.isfinite(self.fs) and self.fs > 0):
            raise ValueError(f"{where}: fs must be a positive number of Hz, got {self.fs}")
        bad = [t for t in self.channel_types if not 0 <= int(t) <= PPG_TYPE]
        if bad:
            raise ValueError(f"{where}: channel_types must lie in 0..{PPG_TYPE}, got {bad}")
        for t, m in zip(self.channel_types, self.modalities):
            if (m == "PPG") != (int(t) == PPG_TYPE) or m not in ("ECG", "PPG"):
                raise ValueError(f"{where}: modality {m!r} does not match channel type {t}")

    @property
    def duration_s(self) -> float:
        return self.signal.shape[1] / self.fs


@runtime_checkable
class RecordSource(Protocol):
    """Anything with ``len`` and ``[i] -> Record``: demo data, every reader of
    csfm.data.readers, csfm.data.sources.MixedSource."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


@runtime_checkable
class WindowedSource(RecordSource, Protocol):
    """A RecordSource that can tell a record's duration without reading it and read only part
    of it, so records longer than memory is meant to hold are read a part at a time. Every
    reader of csfm.data.readers and MixedSource are (``isinstance(source, WindowedSource)``)."""

    def duration_s(self, index: int) -> float | None:
        """Seconds of record ``index``, or None where the source cannot tell without reading it."""
        ...

    def read_window(self, index: int, start_s: float, window_s: float | None) -> Record:
        """The ``window_s`` seconds of record ``index`` from ``start_s`` (None: to the end)."""
        ...


@runtime_checkable
class ListedSource(RecordSource, Protocol):
    """A RecordSource that lists its records' ids and patients and the files each is read from
    (every reader of csfm.data.readers)."""

    record_ids: list[str]
    patient_ids: list[str]

    def record_files(self, index: int) -> list[Path]: ...
