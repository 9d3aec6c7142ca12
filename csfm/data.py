"""Pretraining samples: one 10 s window of a record, preprocessed, lead-subset augmented,
with its report tokenized; and the collate that turns samples into a ragged Batch.

Randomness (crop start, lead subset) comes from ``default_rng([seed, epoch, index])``, so
an epoch's samples are the same whatever the worker count, and a resumed run sees the data
an uninterrupted one would.

Reading and preprocessing a record costs far more than a small model's step on it, so
records of up to ``CACHE_MAX_RECORD_S`` are preprocessed once and kept in memory (up to
``cache_mb`` per process or DataLoader worker); each sample is then a random crop of the
cached record. Longer records (multi-day MIMIC waveforms) are always read a window at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import numpy as np
import torch

from csfm.batch import Batch, make_batch
from csfm.preprocess import PreprocessConfig, preprocess_record, preprocess_signal
from csfm.record import PPG_TYPE, Record
from csfm.tokenizer import ReportTokenizer

LIMB_LEADS = (0, 1, 2, 3, 4, 5)  # I, II, III, aVR, aVL, aVF
LEAD_II = 1
CACHE_MAX_RECORD_S = 600.0  # longer records are read a window at a time, never cached
_CROP_TRIES = 8  # random crop starts tried before taking the most valid one


class RecordSource(Protocol):
    """Anything with ``len`` and ``[i] -> Record`` (demo data, every reader of csfm.readers)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


@dataclass
class Sample:
    """x, valid [C, window] (float32 z-scored, bool); channel_types [C]; text_ids [M]."""

    x: np.ndarray
    valid: np.ndarray
    channel_types: list[int]
    text_ids: np.ndarray
    record_id: str
    patient_id: str
    metadata: dict = field(default_factory=dict)


def lead_subset(channel_types: Sequence[int], rng: np.random.Generator) -> list[int]:
    """Indices of a random lead subset the model should also serve: one lead (II where
    present), two (II + PPG where present), three, the six limb leads, ECG only or PPG only.
    Only subsets the record can give are drawn; with none, all channels are kept."""
    types = list(channel_types)
    ecg = [i for i, t in enumerate(types) if t != PPG_TYPE]
    ppg = [i for i, t in enumerate(types) if t == PPG_TYPE]
    lead_ii = [i for i in ecg if types[i] == LEAD_II]
    options: list[list[int]] = []
    if ecg:
        options.append(lead_ii[:1] or [int(rng.choice(ecg))])
    if lead_ii and ppg:
        options.append(lead_ii[:1] + ppg[:1])
    if len(ecg) > 3:
        options.append(sorted(rng.choice(ecg, 3, replace=False).tolist()))
    limb = [i for i in ecg if types[i] in LIMB_LEADS]
    if len(limb) == 6 and len(ecg) > 6:
        options.append(limb)
    if ecg and ppg:
        options.extend([ecg, ppg])
    return options[int(rng.integers(len(options)))] if options else list(range(len(types)))


class PretrainWindows(torch.utils.data.Dataset):
    """Item i: a random window of record i, preprocessed to 250 Hz, z-scored, tokenized.

    subset_prob: chance of replacing the lead set by a random subset (``lead_subset``).
    A record shorter than the window is zero-padded to it with valid=False there (and
    raises if less than PreprocessConfig.min_valid_fraction of it is real signal).
    cache_mb: memory (MiB) for preprocessed records of up to CACHE_MAX_RECORD_S seconds (or
    of unknown duration: sources without ``duration_s``, which are read whole anyway); 0
    reads and preprocesses every sample's record anew.
    """

    def __init__(self, records: RecordSource, tokenizer: ReportTokenizer | None,
                 preprocess: PreprocessConfig | None = None, subset_prob: float = 0.5,
                 max_text_tokens: int = 64, seed: int = 0, indices: Sequence[int] | None = None,
                 cache_mb: float = 0.0) -> None:
        self.records, self.tokenizer = records, tokenizer
        self.preprocess = preprocess or PreprocessConfig()
        self.subset_prob, self.max_text_tokens, self.seed = subset_prob, max_text_tokens, seed
        self.indices = list(range(len(records))) if indices is None else list(indices)
        self.epoch = 0
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_bytes_left = int(cache_mb * 2**20)
        self._cache: dict[int, tuple[Record, np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = self.indices[i]
        rng = np.random.default_rng([self.seed, self.epoch, index, i])
        record, x, valid = self._window(index, rng)
        keep = list(range(len(record.channel_types)))
        if rng.random() < self.subset_prob:
            keep = lead_subset(record.channel_types, rng)
        text = np.zeros(0, dtype=np.int64)
        if self.tokenizer is not None and record.text:
            text = np.asarray(self.tokenizer.encode(record.text, self.max_text_tokens).ids, dtype=np.int64)
        return Sample(x[keep], valid[keep], [record.channel_types[c] for c in keep],
                      text, record.record_id, record.patient_id, dict(record.metadata))

    def _window(self, index: int, rng: np.random.Generator) -> tuple[Record, np.ndarray, np.ndarray]:
        """(record, x [C, window], valid [C, window]) of one random window of record ``index``."""
        cached = self._preprocessed(index)
        if cached is not None:
            record, x, valid = cached
            return record, *random_crop(x, valid, self.preprocess, rng, record.record_id)
        record = self._read(index, rng)
        windows = preprocess_record(record, self.preprocess)
        if len(windows.x) == 0:
            raise ValueError(f"record {record.record_id}: no window with enough valid samples")
        w = int(rng.integers(len(windows.x)))
        return record, windows.x[w], windows.valid[w]

    def _preprocessed(self, index: int) -> tuple[Record, np.ndarray, np.ndarray] | None:
        """(record without its raw signal, x [C, T'], valid [C, T']) of the whole preprocessed
        record, from the cache or made now while the budget lasts; None for records too long
        to cache or once the budget is spent."""
        if index in self._cache:
            return self._cache[index]
        duration = self.records.duration_s(index) if hasattr(self.records, "duration_s") else None
        if self.cache_bytes_left <= 0 or (duration is not None and duration > CACHE_MAX_RECORD_S):
            return None
        record = self.records[index]
        x, valid = preprocess_signal(record.signal, record.fs, record.channel_types, self.preprocess)
        entry = (replace(record, signal=np.empty((len(record.channel_types), 0), np.float32)), x, valid)
        self.cache_bytes_left -= x.nbytes + valid.nbytes
        if self.cache_bytes_left >= 0:
            self._cache[index] = entry
        return entry

    def _read(self, index: int, rng: np.random.Generator) -> Record:
        """A random window of the record (plus a second each side for the filters) where the
        source reads parts of records; the whole record otherwise."""
        duration = self.records.duration_s(index) if hasattr(self.records, "duration_s") else None
        if duration is None or not hasattr(self.records, "read_window"):
            return self.records[index]
        window_s = self.preprocess.window / self.preprocess.target_fs + 2.0
        start = float(rng.uniform(0.0, max(0.0, duration - window_s)))
        return self.records.read_window(index, start, window_s)


def random_crop(x: np.ndarray, valid: np.ndarray, config: PreprocessConfig, rng: np.random.Generator,
                record_id: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A random window of config.window samples from x, valid [C, T] (preprocessed).

    Shorter records are zero-padded (valid False there). Up to _CROP_TRIES random starts
    are tried for one with at least config.min_valid_fraction valid samples, then the most
    valid of those; ValueError naming ``record_id`` when even that falls short.
    Returns (x [C, window] float32, valid [C, window] bool), copies.
    """
    window, n = config.window, x.shape[1]
    if n <= window:
        out_x, out_valid = np.zeros((x.shape[0], window), np.float32), np.zeros((x.shape[0], window), bool)
        out_x[:, :n], out_valid[:, :n] = x, valid
        crops = [(out_x, out_valid)]
    else:
        starts = rng.integers(0, n - window + 1, size=_CROP_TRIES)
        crops = [(x[:, s:s + window], valid[:, s:s + window]) for s in starts]
    fractions = [v.mean() if v.size else 0.0 for _, v in crops]
    best = next((k for k, f in enumerate(fractions) if f >= config.min_valid_fraction), int(np.argmax(fractions)))
    if fractions[best] < config.min_valid_fraction:
        raise ValueError(f"record {record_id}: no window with enough valid samples "
                         f"(best {fractions[best]:.2f} < min_valid_fraction {config.min_valid_fraction})")
    return crops[best][0].copy(), crops[best][1].copy()


def collate(samples: Sequence[Sample]) -> Batch:
    """Samples -> ragged Batch (nothing padded: lead counts and text lengths stay per sample)."""
    return make_batch([s.x for s in samples], [s.channel_types for s in samples],
                      [s.text_ids for s in samples], [s.valid for s in samples],
                      [s.record_id for s in samples])


def split_by_patient(patient_ids: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Record indices (train, val): every patient's records fall on one side only."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    patients = sorted(set(patient_ids))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    n_val = max(1, int(round(val_fraction * len(patients)))) if len(patients) > 1 else 0
    val_patients = {patients[i] for i in order[:n_val]}
    train = [i for i, p in enumerate(patient_ids) if p not in val_patients]
    val = [i for i, p in enumerate(patient_ids) if p in val_patients]
    return train, val
