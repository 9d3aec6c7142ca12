"""Prepared pretraining shards: records preprocessed once, stored as Arrow IPC files.

``python -m csfm.prepare`` writes a folder of ``shard-NNNNN.arrow`` files and ``index.json``;
``--data shards:DIR`` reads it back as a ``ShardSource``. Each row is one record (or one part
of at most ``PART_WINDOWS`` windows of a long record): its preprocessed signal (250 Hz,
band-passed, z-scored, usable channels only) as float16 [C, T] in C order with NaN where a
sample is invalid, its channel types, ids, report, the report's word-piece ids (when prepared
with a vocabulary; ``index.json``'s ``vocab_fingerprint`` names it) and metadata (JSON). Files
are memory-mapped: reading a row copies nothing until a window is cut from it.

Arrow was chosen by measurement (see README, "Prepared shards"): random access by row from any
process, no extra dependency (pyarrow is already one), ~1.0x the float16 bytes on disk.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from csfm.data.record import CHANNEL_TYPE_NAMES, PPG_TYPE, Record
from csfm.files import atomic_write

SHARD_LAYOUT = 2
"""Version of the row layout below; a folder of another layout is refused by name."""
INDEX = "index.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)

SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("patient_id", pa.string()),
    ("start_s", pa.float64()),              # seconds of the record before this row's first sample
    ("channel_types", pa.list_(pa.int8())),
    ("n_samples", pa.int64()),
    ("signal", pa.large_binary()),          # float16 [C, n_samples], C order, NaN where invalid
    ("text", pa.string()),
    ("text_ids", pa.list_(pa.int32())),     # the report's word pieces, all of them (empty without a vocabulary)
    ("metadata", pa.string()),              # JSON object
])


@dataclass
class PreparedRecord:
    """One row: x [C, T] z-scored at 250 Hz (float32, or float16 as stored with NaN where
    invalid) with ``valid`` [C, T] bool, and what the record says about itself. start_s:
    seconds of the source record before x[:, 0]. Made with ``stored_valid`` None (a stored row),
    ``valid`` is computed from x's NaNs when first asked for."""

    record_id: str
    patient_id: str
    start_s: float
    channel_types: list[int]
    x: np.ndarray
    stored_valid: np.ndarray | None
    text: str = ""
    metadata: dict[str, Any] | None = None
    fully_valid: bool = False
    """Every sample is valid (``valid`` is then all True): a crop needs no scan for gaps."""
    text_ids: np.ndarray | None = None
    """[M] int32 word-piece ids of the whole report by the vocabulary ``text_vocab`` (None without one)."""
    text_vocab: str = ""
    """``ReportTokenizer.fingerprint`` of the vocabulary that made text_ids ("" = none)."""

    @property
    def valid(self) -> np.ndarray:
        if self.stored_valid is None:
            self.stored_valid = valid_mask(self.x)
        return self.stored_valid


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.arrow"


def _signal_bytes(x: np.ndarray, valid: np.ndarray) -> bytes:
    """x, valid [C, T] -> float16 bytes with NaN where invalid (values clipped to float16's range,
    so no valid sample turns into inf)."""
    clipped = np.clip(np.where(valid, x, np.nan), -FLOAT16_MAX, FLOAT16_MAX)
    return np.ascontiguousarray(clipped, dtype=np.float16).tobytes()


def write_shard(path: Path, rows: Sequence[PreparedRecord]) -> int:
    """Writes ``rows`` as one Arrow IPC file at ``path`` (a temp file renamed into place, so a
    killed write leaves no partial shard). Returns the file's size in bytes."""
    columns = {
        "record_id": [r.record_id for r in rows],
        "patient_id": [r.patient_id for r in rows],
        "start_s": [float(r.start_s) for r in rows],
        "channel_types": [[int(t) for t in r.channel_types] for r in rows],
        "n_samples": [int(r.x.shape[1]) for r in rows],
        "signal": [_signal_bytes(r.x, r.valid) for r in rows],
        "text": [r.text for r in rows],
        "text_ids": [[] if r.text_ids is None else r.text_ids.tolist() for r in rows],
        "metadata": [json.dumps(r.metadata or {}, default=str, sort_keys=True) for r in rows],
    }
    table = pa.table(columns, schema=SCHEMA)

    def write(temp: Path) -> None:
        with pa.OSFile(str(temp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
    atomic_write(path, write)
    return path.stat().st_size


class ShardFormatError(ValueError):
    """A shard folder or file that is not what ``csfm.prepare`` writes; names the file and field."""


def read_index(folder: Path) -> dict[str, Any]:
    """``folder/index.json`` checked: layout version, and one entry per shard with its rows."""
    path = folder / INDEX
    if not path.is_file():
        raise ShardFormatError(f"{folder}: no {INDEX}; not a finished `python -m csfm.prepare` folder "
                               "(a prepare that stopped early continues when run again with the same --out)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardFormatError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("layout") != SHARD_LAYOUT:
        raise ShardFormatError(f"{path}: field 'layout' is {index.get('layout') if isinstance(index, dict) else None!r}; "
                               f"this csfm reads shard layout {SHARD_LAYOUT}: prepare the data again")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "rows"} <= s.keys() for s in shards):
        raise ShardFormatError(f"{path}: field 'shards' must list {{file, rows}} entries")
    return index


_ROW_FIELDS = ("record_id", "patient_id", "start_s", "channel_types", "n_samples", "text", "metadata")


class _Shard:
    """One memory-mapped shard file: the signal bytes as a numpy view (no copy), the small
    columns as Python lists."""

    def __init__(self, path: Path, rows: int, text_vocab: str = "") -> None:
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardFormatError(f"{path}: not a readable Arrow IPC shard ({exc})") from None
        if not table.schema.equals(SCHEMA):
            raise ShardFormatError(f"{path}: columns {table.schema.names} are not shard layout {SHARD_LAYOUT}'s "
                                   f"{SCHEMA.names}")
        if table.num_rows != rows:
            raise ShardFormatError(f"{path}: {table.num_rows} rows, {INDEX} says {rows}")
        signal = table.column("signal").combine_chunks()
        offsets_buffer, data_buffer = signal.buffers()[1:3]
        self.offsets = np.frombuffer(offsets_buffer, np.int64)[signal.offset:signal.offset + rows + 1]
        self.data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
        text_ids = table.column("text_ids").combine_chunks()
        self.text_offsets = text_ids.offsets.to_numpy()
        self.text_values = text_ids.values.to_numpy()
        self.text_vocab = text_vocab
        self.columns = {name: table.column(name).to_pylist() for name in _ROW_FIELDS}
        self._first_read: dict[int, tuple[dict, np.ndarray | None]] = {}  # row -> (metadata, all-True valid)
        self.path = path

    def row(self, row: int) -> PreparedRecord:
        """Row ``row`` with x the stored float16 [C, T] view (NaN where invalid); its valid = not NaN
        (a read-only all-True view for a row without gaps, else computed when first asked for)."""
        c = {name: values[row] for name, values in self.columns.items()}
        n_channels, n_samples = len(c["channel_types"]), c["n_samples"]
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        if end - start != 2 * n_channels * n_samples:
            raise ShardFormatError(f"{self.path} row {row}: field 'signal' holds {end - start} bytes, expected "
                                   f"{2 * n_channels * n_samples} for {n_channels} channels x {n_samples} samples")
        x = self.data[start:end].view(np.float16).reshape(n_channels, n_samples)
        if row not in self._first_read:  # metadata parsed and gaps looked for on the row's first read
            try:
                metadata = json.loads(c["metadata"])
            except ValueError as exc:
                raise ShardFormatError(f"{self.path} row {row}: field 'metadata' is not JSON ({exc})") from None
            full = bool(valid_mask(x).all())  # then valid is a read-only all-True view, else computed when asked for
            self._first_read[row] = metadata, np.broadcast_to(np.True_, x.shape) if full else None
        metadata, valid = self._first_read[row]
        ids = self.text_values[self.text_offsets[row]:self.text_offsets[row + 1]] if self.text_vocab else None
        return PreparedRecord(c["record_id"], c["patient_id"], c["start_s"], c["channel_types"], x, valid,
                              c["text"], dict(metadata), valid is not None, ids, self.text_vocab)


def valid_mask(x: np.ndarray) -> np.ndarray:
    """Not-NaN mask of float16 x: NaN has all exponent bits set and a non-zero fraction, i.e.
    |bits| > 0x7C00 (integer ops: much faster than np.isnan on float16)."""
    return (x.view(np.uint16) & 0x7FFF) <= 0x7C00


class ShardSource:
    """A prepared folder as a record source: ``len``, ``[i] -> Record`` (the preprocessed signal
    at 250 Hz) and ``prepared(i) -> PreparedRecord`` (the stored float16 view, for pretraining).
    Files are opened lazily, once per process (DataLoader workers each map their own)."""

    def __init__(self, path: str | Path) -> None:
        self.folder = Path(path)
        index = read_index(self.folder)
        self.fs = float(index.get("fs", 250.0))
        self.text_vocab = str(index.get("vocab_fingerprint", ""))
        self._files = [(self.folder / s["file"], int(s["rows"])) for s in index["shards"]]
        missing = [str(p) for p, _ in self._files if not p.is_file()]
        if missing:
            raise ShardFormatError(f"{self.folder}: {INDEX} lists shard files that are missing: {missing[:5]}")
        self._starts = np.cumsum([0] + [rows for _, rows in self._files]).tolist()
        self.record_ids: list[str] = [rid for s in index["shards"] for rid in s.get("record_ids", [])]
        self.patient_ids: list[str] = [pid for s in index["shards"] for pid in s.get("patient_ids", [])]
        if len(self.record_ids) != len(self) or len(self.patient_ids) != len(self):
            raise ShardFormatError(f"{self.folder / INDEX}: fields 'record_ids' and 'patient_ids' must list "
                                   f"every row ({len(self)})")
        self._open: dict[int, _Shard] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} prepared rows in {self.folder}")
        return bisect.bisect_right(self._starts, index) - 1

    def prepared(self, index: int) -> PreparedRecord:
        """Row ``index`` as stored: x float16 [C, T] (a read-only view of the mapped file, NaN
        where invalid), valid [C, T] bool, ids, report, metadata."""
        number = self._shard_of(index)
        if number not in self._open:
            self._open[number] = _Shard(*self._files[number], self.text_vocab)
        return self._open[number].row(index - self._starts[number])

    def is_prepared(self, index: int) -> bool:
        """Every row is (the same question MixedSource answers per source)."""
        self._shard_of(index)
        return True

    def __getitem__(self, index: int) -> Record:
        return to_record(self.prepared(index), self.fs)

    def record_files(self, index: int) -> list[Path]:
        return [self._files[self._shard_of(index)][0]]


def header_record(row: PreparedRecord, fs: float = 250.0) -> Record:
    """A prepared row's Record without samples (signal [C, 0]): its channels, ids, report and
    metadata, with ``prepared_start_s`` (seconds of the source record before the row)."""
    types = [int(t) for t in row.channel_types]
    return Record(np.zeros((len(types), 0), np.float32), fs, [CHANNEL_TYPE_NAMES[t] for t in types],
                  ["z-score"] * len(types), types, ["PPG" if t == PPG_TYPE else "ECG" for t in types], row.text,
                  row.patient_id, row.record_id, {**(row.metadata or {}), "prepared_start_s": row.start_s})


def to_record(row: PreparedRecord, fs: float) -> Record:
    """A prepared row as a Record: the preprocessed signal as float32 (z-scored units, NaN where invalid)."""
    return replace(header_record(row, fs), signal=np.where(row.valid, row.x, np.nan).astype(np.float32))


def is_prepared(records: Any, index: int) -> bool:
    """Whether ``records`` holds record ``index`` preprocessed (without reading it)."""
    check = getattr(records, "is_prepared", None)
    return bool(check(index)) if check is not None else False
