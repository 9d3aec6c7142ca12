"""Directory datasets: an on-disk corpus as an indexable list of Records.

Each class indexes its corpus at construction (CSV tables, file names, HDF5
``exam_id`` arrays: no signal is read) and opens signal files only in
``__getitem__`` / ``read_window``, so it can be handed to DataLoader workers.
Common interface (``csfm.data.record.WindowedSource`` and ``ListedSource``):

    len(ds), ds[i] -> Record            the whole record i
    ds.record_ids, ds.patient_ids       [len(ds)] str, for subject-wise splits
    ds.duration_s(i) -> float           seconds, without reading the signal
    ds.read_window(i, start_s, window_s) -> Record   only that part is read
    ds.record_files(i) -> list[Path]   the files record i is built from (signals,
                                        headers, the tables giving its text / metadata)

Layouts:
- WfdbDirectory: any folder of WFDB records (CinC 2017: ``RECORDS`` + a
  ``REFERENCE.csv`` of ``record,label`` rows without header -> metadata["label"]).
- MimicIVECG: ``files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.hea`` (+ ``record_list.csv``),
  ``machine_measurements.csv`` ``report_0..report_17`` -> text.
- PTBXL: ``ptbxl_database.csv`` + ``records100/`` or ``records500/``.
- Code15: ``exams.csv`` + HDF5 parts with ``tracings`` [N, 4096, 12] (400 Hz, mV)
  and ``exam_id`` [N].
"""
from __future__ import annotations

import ast
import csv
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd
import wfdb

from csfm.data.leads import LeadMapping, record_from_channels, resolve_channels
from csfm.data.readers.mimic3 import read_multisegment
from csfm.data.readers.wfdb_record import read_header, read_wfdb, record_base, record_files
from csfm.data.record import Record

_SEX_PTBXL = {0: "M", 1: "F"}
_REPORTS = [f"report_{k}" for k in range(18)]
CODE15_LEADS = ("DI", "DII", "DIII", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
CODE15_FS = 400.0


def read_wfdb_record(path: str | Path, mapping: LeadMapping | None = None, start_s: float = 0.0,
                     stop_s: float | None = None) -> Record:
    """A WFDB record's [start_s, stop_s) seconds, single-segment (read_wfdb) or multi-segment
    (read_multisegment), as its header says."""
    path = record_base(path)
    reader = read_multisegment if isinstance(read_header(path), wfdb.MultiRecord) else read_wfdb
    return reader(path, mapping, start_s, stop_s)


class _WfdbFiles:
    """Records stored as WFDB headers under a root: the shared part of the WFDB datasets."""

    def __init__(self, root: Path, paths: list[str], record_ids: list[str], patient_ids: list[str],
                 mapping: LeadMapping | None, tables: list[Path]) -> None:
        self.root = root
        self._tables = tables
        self._paths = paths
        self.record_ids = record_ids
        self.patient_ids = patient_ids
        self.mapping = mapping

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> Record:
        return self.read_window(i, 0.0, None)

    def path(self, i: int) -> Path:
        """Record path of item i (without ``.hea``)."""
        return self.root / self._paths[i]

    def record_files(self, i: int) -> list[Path]:
        """Header(s) and signal files of record i (csfm.data.readers.record_files), then the
        corpus tables its text and metadata come from."""
        return record_files(self.path(i)) + self._tables

    def duration_s(self, i: int) -> float:
        """Length of record i in seconds, from its header (sig_len / fs)."""
        header = read_header(self.path(i))
        return header.sig_len / header.fs

    def read_window(self, i: int, start_s: float, window_s: float | None) -> Record:
        """Record i restricted to [start_s, start_s + window_s) seconds (all of it for None)."""
        stop_s = None if window_s is None else start_s + window_s
        record = self._read(self.path(i), start_s, stop_s)
        record.record_id, record.patient_id = self.record_ids[i], self.patient_ids[i]
        self._annotate(i, record)
        return record

    def _read(self, path: Path, start_s: float, stop_s: float | None) -> Record:
        """Read one record's [start_s, stop_s) seconds."""
        return read_wfdb(path, self.mapping, start_s, stop_s)

    def _annotate(self, i: int, record: Record) -> None:
        """Add the corpus' text and metadata for item i (subclasses)."""


class WfdbDirectory(_WfdbFiles):
    """Every WFDB record under ``root``.

    root: folder. pattern: glob of headers relative to root; None (default) reads the
    record list from ``root/RECORDS`` when present (the WFDB convention, which lists
    multi-segment masters but not their segments), else uses ``"**/*.hea"``.
    labels_csv: optional ``record,label`` CSV without header (absolute or relative to
    root) -> ``metadata["label"]``. record_id is the record path relative to root;
    a plain directory names no subjects, so patient_ids are the record ids.
    Multi-segment records are read with csfm.data.readers.read_multisegment (a window in
    a gap raises ValueError; stream_windows skips gaps); ``*_layout`` headers are
    never records and are left out of globs.
    """

    def __init__(self, root: str | Path, pattern: str | None = None, labels_csv: str | Path | None = None,
                 mapping: LeadMapping | None = None) -> None:
        root = Path(root)
        if pattern is None and (root / "RECORDS").is_file():
            names = [line.strip() for line in (root / "RECORDS").read_text().splitlines() if line.strip()]
            names = [name for name in names if not name.endswith("/")]
        else:
            names = sorted(record_base(p.relative_to(root)).as_posix() for p in root.glob(pattern or "**/*.hea")
                           if not p.stem.endswith("_layout"))
        if not names:
            raise ValueError(f"{root}: no WFDB records (RECORDS file or pattern {pattern or '**/*.hea'!r})")
        labels = [root / labels_csv] if labels_csv is not None else []
        super().__init__(root, names, names, list(names), mapping, labels)
        self._labels = read_labels(labels[0]) if labels else {}

    def _read(self, path: Path, start_s: float, stop_s: float | None) -> Record:
        return read_wfdb_record(path, self.mapping, start_s, stop_s)

    def _annotate(self, i: int, record: Record) -> None:
        name = self.record_ids[i]
        label = self._labels.get(name, self._labels.get(Path(name).name))
        if label is not None:
            record.metadata["label"] = label


class MimicIVECG(_WfdbFiles):
    """MIMIC-IV-ECG: 12-lead 10 s ECGs at 500 Hz with machine reports.

    root holds ``files/`` and optionally ``record_list.csv`` (subject_id, study_id,
    path; used for the record list when present, else the ``files/`` tree is
    globbed) and ``machine_measurements.csv`` (subject_id, study_id, report_0..17,
    measurements). text: the non-empty reports joined with ", "; the other
    measurement columns go to metadata. record_id = study_id, patient_id = subject_id.
    """

    RECORD_S = 10.0  # every MIMIC-IV-ECG record is 10 s (5000 samples at 500 Hz)

    def __init__(self, root: str | Path, mapping: LeadMapping | None = None) -> None:
        root = Path(root)
        listing = root / "record_list.csv"
        if listing.is_file():
            table = _read_csv(listing, ["subject_id", "study_id", "path"])
            paths = list(table["path"].astype(str))
            studies, subjects = list(table["study_id"].astype(str)), list(table["subject_id"].astype(str))
        else:
            headers = sorted(root.glob("files/p*/p*/s*/*.hea"))
            paths = [record_base(h.relative_to(root)).as_posix() for h in headers]
            studies, subjects = [h.parent.name[1:] for h in headers], [h.parent.parent.name[1:] for h in headers]
        if not paths:
            raise ValueError(f"{root}: no MIMIC-IV-ECG records (no record_list.csv and no files/p*/p*/s*/*.hea)")
        measurements = root / "machine_measurements.csv"
        super().__init__(root, paths, studies, subjects, mapping, [measurements] if measurements.is_file() else [])
        self._measurements = (_read_csv(measurements, ["study_id"]).set_index("study_id")
                              if measurements.is_file() else None)

    def duration_s(self, i: int) -> float:
        return self.RECORD_S

    def _annotate(self, i: int, record: Record) -> None:
        if self._measurements is None or int(self.record_ids[i]) not in self._measurements.index:
            return
        row = self._measurements.loc[int(self.record_ids[i])]
        reports = [str(row[c]).strip() for c in _REPORTS if c in row.index and pd.notna(row[c])]
        record.text = ", ".join(report for report in reports if report)
        record.metadata.update(_row_facts(row, skip={"subject_id", *_REPORTS}))


class PTBXL(_WfdbFiles):
    """PTB-XL: 12-lead 10 s ECGs at 100 Hz (sampling="lr") or 500 Hz ("hr").

    root holds ``ptbxl_database.csv`` (ecg_id, patient_id, filename_lr, filename_hr,
    report, scp_codes, strat_fold, age, sex, ...). text = report; metadata has
    scp_codes as a dict, strat_fold, age (years), sex "M"/"F" (PTB-XL codes 0 = male,
    1 = female) and the table's other columns. record_id = ecg_id.
    """

    RECORD_S = 10.0  # every PTB-XL record is 10 s

    def __init__(self, root: str | Path, sampling: str = "lr", mapping: LeadMapping | None = None) -> None:
        if sampling not in ("lr", "hr"):
            raise ValueError(f"PTBXL: sampling must be 'lr' (100 Hz) or 'hr' (500 Hz), got {sampling!r}")
        root = Path(root)
        self._table = _read_csv(root / "ptbxl_database.csv",
                                ["ecg_id", "patient_id", f"filename_{sampling}", "report", "scp_codes"])
        self._table["scp_codes"] = [_literal(text, root / "ptbxl_database.csv", ecg_id)
                                    for text, ecg_id in zip(self._table["scp_codes"], self._table["ecg_id"])]
        super().__init__(root, list(self._table[f"filename_{sampling}"].astype(str)),
                         [str(e) for e in self._table["ecg_id"]],
                         [str(int(p)) for p in self._table["patient_id"]], mapping, [root / "ptbxl_database.csv"])

    def duration_s(self, i: int) -> float:
        return self.RECORD_S

    def _annotate(self, i: int, record: Record) -> None:
        row = self._table.iloc[i]
        record.text = str(row["report"]) if pd.notna(row["report"]) else ""
        facts = _row_facts(row, skip={"ecg_id", "patient_id", "filename_lr", "filename_hr", "report", "sex"})
        if pd.notna(row.get("sex")):
            facts["sex"] = _SEX_PTBXL.get(int(row["sex"]))
        record.metadata.update(facts)


class Code15:
    """CODE-15%: 12-lead ECGs at 400 Hz in HDF5 parts, labels in ``exams.csv``.

    root holds ``exams.csv`` (exam_id, age, is_male, patient_id, death, timey, the
    rhythm labels, trace_file) and the HDF5 files it names (``tracings`` [N, 4096, 12]
    float32 mV, leads DI, DII, DIII, AVR, AVL, AVF, V1..V6; ``exam_id`` [N]). Exams
    whose HDF5 part is absent are left out (the corpus ships in parts). The
    tracings are zero-padded to 4096 samples: the leading and trailing samples where
    all 12 leads are exactly 0 are that padding and become NaN. metadata: the CSV
    columns, with is_male as sex "M"/"F". record_id = exam_id.

    HDF5 handles are opened lazily per process (the pid is stored and files are
    re-opened after a fork) and are not pickled, so DataLoader workers are safe.
    """

    def __init__(self, root: str | Path, mapping: LeadMapping | None = None) -> None:
        self.root = Path(root)
        table = _read_csv(self.root / "exams.csv", ["exam_id", "patient_id", "trace_file"])
        parts = [name for name in table["trace_file"].unique() if (self.root / name).is_file()]
        if not parts:
            raise ValueError(f"{self.root / 'exams.csv'}: none of the HDF5 files in column trace_file "
                             f"is in {self.root}")
        rows, self._length = {}, {}
        for name in parts:
            rows[name], self._length[name] = _exam_rows(self.root / name)
        self._table = table[table["trace_file"].isin(parts)].reset_index(drop=True)
        self._rows = []
        for exam_id, name in zip(self._table["exam_id"], self._table["trace_file"]):
            if int(exam_id) not in rows[name]:
                raise ValueError(f"{self.root / name}: exam_id {exam_id} listed in exams.csv is not in "
                                 f"dataset 'exam_id'")
            self._rows.append((name, rows[name][int(exam_id)]))
        self.record_ids = [str(int(e)) for e in self._table["exam_id"]]
        self.patient_ids = [str(int(p)) for p in self._table["patient_id"]]
        self.mapping = mapping
        self._kept, self._dropped = resolve_channels(list(CODE15_LEADS), mapping, where=str(self.root))
        self._files: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Record:
        return self.read_window(i, 0.0, None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def record_files(self, i: int) -> list[Path]:
        """The HDF5 part holding exam i, and exams.csv (its metadata)."""
        return [self.root / self._rows[i][0], self.root / "exams.csv"]

    def duration_s(self, i: int) -> float:
        """4096 samples / 400 Hz = 10.24 s (padding included)."""
        return self._length[self._rows[i][0]] / CODE15_FS

    def read_window(self, i: int, start_s: float, window_s: float | None) -> Record:
        """Exam i in [start_s, start_s + window_s) seconds: signal [C, T] float32 mV at 400 Hz."""
        name, row = self._rows[i]
        tracing = np.asarray(self._file(name)["tracings"][row], dtype=np.float32).T
        tracing = _padding_to_nan(tracing)
        first = int(round(start_s * CODE15_FS))
        last = tracing.shape[1] if window_s is None else first + int(round(window_s * CODE15_FS))
        channels = [index for index, _ in self._kept]
        facts = _row_facts(self._table.iloc[i], skip={"exam_id", "patient_id", "trace_file", "is_male"})
        if pd.notna(self._table.iloc[i].get("is_male")):
            facts["sex"] = "M" if bool(self._table.iloc[i]["is_male"]) else "F"
        return record_from_channels(
            tracing[channels, first:last], CODE15_FS, [CODE15_LEADS[c] for c in channels], ["mV"] * len(channels),
            [t for _, t in self._kept], self._dropped, record_id=self.record_ids[i],
            patient_id=self.patient_ids[i], metadata=facts)

    def _file(self, name: str) -> h5py.File:
        """Open HDF5 part ``name`` in this process (handles from before a fork are dropped)."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if name not in self._files:
            self._files[name] = h5py.File(self.root / name, "r")
        return self._files[name]


def _padding_to_nan(tracing: np.ndarray) -> np.ndarray:
    """[12, T] with the leading/trailing all-lead-zero samples set to NaN (CODE padding)."""
    active = np.flatnonzero((tracing != 0).any(axis=0))
    if active.size == 0:
        return np.full_like(tracing, np.nan)
    tracing[:, :active[0]] = np.nan
    tracing[:, active[-1] + 1:] = np.nan
    return tracing


def _exam_rows(path: Path) -> tuple[dict[int, int], int]:
    """({exam_id: row}, samples per tracing) of an HDF5 part; ValueError names file and dataset."""
    with h5py.File(path, "r") as f:
        for dataset in ("tracings", "exam_id"):
            if dataset not in f:
                raise ValueError(f"{path}: no dataset {dataset!r} (found {sorted(f.keys())})")
        shape, ids = f["tracings"].shape, np.asarray(f["exam_id"][:])
    if len(shape) != 3 or shape[2] != len(CODE15_LEADS) or shape[0] != len(ids):
        raise ValueError(f"{path}: dataset 'tracings' has shape {shape}, expected [{len(ids)}, T, "
                         f"{len(CODE15_LEADS)}] to match dataset 'exam_id'")
    return {int(exam_id): row for row, exam_id in enumerate(ids)}, int(shape[1])


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """A CSV table; ValueError naming the file when it or a required column is missing."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    table = pd.read_csv(path)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {list(table.columns)})")
    return table


def read_labels(path: str | Path, allowed: Sequence[str] | None = None) -> dict[str, str]:
    """``record,label`` rows without header (CinC 2017 REFERENCE.csv) -> {record: label}, in
    file order; blank lines are skipped. ValueError naming the file (and line and record) when
    it is missing, on a malformed line, a record listed twice, or a label outside ``allowed``
    (when given)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: labels file not found")
    labels: dict[str, str] = {}
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not "".join(row).strip():
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'record,label', got {','.join(row)!r}")
            record, label = row[0].strip(), row[1].strip()
            if allowed is not None and label not in allowed:
                raise ValueError(f"{path}:{line_no}: record {record!r} has unknown label {label!r} "
                                 f"(expected one of {tuple(allowed)})")
            if record in labels:
                raise ValueError(f"{path}:{line_no}: record {record!r} is listed twice")
            labels[record] = label
    return labels


def _literal(text: str, path: Path, ecg_id: Any) -> dict[str, float]:
    """Parse a dict literal such as ``"{'NORM': 100.0}"``; ValueError names file, row and column."""
    try:
        return dict(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError) as error:
        raise ValueError(f"{path}: ecg_id {ecg_id}: column scp_codes is not a dict literal: {text!r}") from error


def _row_facts(row: pd.Series, skip: set[str]) -> dict[str, Any]:
    """A table row as {column: python value}, without ``skip`` columns and missing values."""
    facts = {}
    for column, value in row.items():
        if column in skip or (not isinstance(value, (dict, list)) and pd.isna(value)):
            continue
        facts[str(column)] = value.item() if isinstance(value, np.generic) else value
    return facts
