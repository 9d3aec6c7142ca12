"""``--data`` specs -> one record source: ``KIND:PATH[?OPTION=VALUE&...][@WEIGHT]`` or
``demo[:N][@WEIGHT]``.

KIND is wfdb (any folder of WFDB records, e.g. CinC 2017), mimic3 (a MIMIC-III waveform
folder of multi-segment records), mimic4 (MIMIC-IV-ECG), ptbxl (PTB-XL), code15 (CODE-15
HDF5) or files (a folder, or one file, of recordings in any mix of formats: WFDB, GE MUSE,
Philips, HL7 aECG, DICOM, SCP-ECG, EDF; ``?strict=1`` makes an unrecognised file an error) or
shards (a folder ``python -m csfm.prepare`` wrote: records already preprocessed, read as they
are stored). OPTIONs go to the reader, e.g. ``wfdb:data/cinc2017?labels_csv=REFERENCE.csv`` or
``ptbxl:data/ptbxl?sampling=hr``. WEIGHT (a finite number > 0, default 1) scales how often
a source's records come up per epoch: 2 repeats each, 0.5 takes a seeded half.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from csfm.data.demo import DemoDataset
from csfm.data.readers import PTBXL, Code15, FileFolder, MimicIVECG, WfdbDirectory
from csfm.data.record import ListedSource, Record, RecordSource, WindowedSource
from csfm.data.shards import PreparedRecord, ShardSource

READERS = {"wfdb": WfdbDirectory, "mimic3": WfdbDirectory, "mimic4": MimicIVECG, "ptbxl": PTBXL, "code15": Code15,
           "files": FileFolder, "shards": ShardSource}


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: str
    weight: float = 1.0
    options: tuple[tuple[str, str], ...] = ()


def _weight(text: str | float, where: str) -> float:
    """A source weight as a finite float > 0; ValueError starting with ``where`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: weight {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: weight must be a finite number > 0, got {text!r}")
    return value


def parse_spec(text: str, demo_records: int = 600) -> DataSpec:
    """'KIND:PATH[?OPTION=VALUE&...][@WEIGHT]' or 'demo[:N][@WEIGHT]' -> DataSpec, or a
    ValueError naming the spec."""
    body, at, weight = text.rpartition("@")
    if not at:
        body, weight = text, ""
    body, _, query = body.partition("?")
    kind, _, path = body.partition(":")
    options = tuple(tuple(item.split("=", 1)) for item in query.split("&") if item)
    if any(len(option) != 2 or not option[0] for option in options):
        raise ValueError(f"--data {text!r}: options must look like ?name=value&name=value")
    value = _weight(weight, f"--data {text!r}") if at else 1.0
    if kind == "demo":
        if path and not path.isdigit():
            raise ValueError(f"--data {text!r}: demo takes a record count, e.g. demo:600")
        return DataSpec(kind, path or str(demo_records), value)
    if kind not in READERS or not path:
        raise ValueError(f"--data {text!r}: expected KIND:PATH[@WEIGHT] with KIND one of "
                         f"{sorted(READERS)} or demo[:N]")
    return DataSpec(kind, path, value, options)


class MixedSource:
    """Several record sources as one sequence: item offset[s] + i is record i of source s.
    Patient ids are prefixed with the source's position, so sources never share a patient."""

    def __init__(self, sources: Sequence[RecordSource], weights: Sequence[float]) -> None:
        if len(weights) != len(sources):
            raise ValueError(f"MixedSource: {len(weights)} weights for {len(sources)} sources")
        self.sources = list(sources)
        self.weights = [_weight(w, f"MixedSource source {s}") for s, w in enumerate(weights)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self._starts = self.offsets.tolist()  # Python ints: bisect per record beats np.searchsorted

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[RecordSource, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        s = bisect.bisect_right(self._starts, index) - 1
        return self.sources[s], index - self._starts[s]

    def __getitem__(self, index: int) -> Record:
        source, i = self._locate(index)
        return source[i]

    def is_prepared(self, index: int) -> bool:
        """Whether record ``index`` comes from a shards source (stored preprocessed)."""
        return isinstance(self._locate(index)[0], ShardSource)

    def prepared(self, index: int) -> PreparedRecord:
        """Record ``index`` as stored preprocessed (``ShardSource.prepared``); ValueError for a
        record of a raw source (see ``is_prepared``)."""
        source, i = self._locate(index)
        if not isinstance(source, ShardSource):
            raise ValueError(f"record {index} comes from a source of raw recordings, not from shards")
        return source.prepared(i)

    def read_window(self, index: int, start_s: float, window_s: float) -> Record:
        """Only ``window_s`` seconds from ``start_s`` where the source can read part of a
        record; the whole record otherwise."""
        source, i = self._locate(index)
        return source.read_window(i, start_s, window_s) if isinstance(source, WindowedSource) else source[i]

    def duration_s(self, index: int) -> float | None:
        source, i = self._locate(index)
        return source.duration_s(i) if isinstance(source, WindowedSource) else None

    def record_files(self, index: int) -> list[Path]:
        """The files record ``index`` is built from (its source's ``record_files``; [] for demo
        records, generated from their seed)."""
        source, i = self._locate(index)
        return source.record_files(i) if isinstance(source, ListedSource) else []

    @property
    def record_ids(self) -> list[str]:
        """Each source's record ids as it gives them (``#i`` for a source that lists none)."""
        return [rid for source in self.sources
                for rid in (source.record_ids if isinstance(source, ListedSource) else
                            [f"#{i}" for i in range(len(source))])]

    @property
    def patient_ids(self) -> list[str]:
        return [f"{s}:{p}" for s, source in enumerate(self.sources) for p in source.patient_ids]

    def weighted(self, indices: Sequence[int], seed: int) -> list[int]:
        """``indices`` with each source's share scaled by its weight: whole repeats, then a
        seeded random part for the fraction."""
        rng = np.random.default_rng([seed, 11])
        out: list[int] = []
        for s, weight in enumerate(self.weights):
            mine = [i for i in indices if self.offsets[s] <= i < self.offsets[s + 1]]
            out.extend(mine * int(weight))
            extra = int(round((weight - int(weight)) * len(mine)))
            out.extend(sorted(rng.choice(mine, extra, replace=False).tolist()) if extra else [])
        return out


def _open_reader(spec: DataSpec):
    """The reader of ``spec`` with its options; a TypeError from an unknown option becomes a
    ValueError that names the spec."""
    try:
        return READERS[spec.kind](spec.path, **dict(spec.options))
    except TypeError as exc:
        raise ValueError(f"--data {spec.kind}:{spec.path}: bad option in {dict(spec.options)} ({exc})") from exc


def open_sources(specs: Sequence[str], seed: int = 0, demo_records: int = 600) -> MixedSource:
    """Opens every ``--data`` spec (readers open files lazily, per worker)."""
    parsed = [parse_spec(text, demo_records) for text in specs]
    sources = [DemoDataset(int(p.path), seed=seed) if p.kind == "demo" else _open_reader(p) for p in parsed]
    return MixedSource(sources, [p.weight for p in parsed])
