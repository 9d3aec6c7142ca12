"""Pretraining samples: one 10 s window of a record, preprocessed, lead-subset augmented,
with its report tokenized; and the collate that turns samples into a ragged Batch.

Randomness (crop start, lead subset) comes from a stream per item (``ItemRandom``: seed,
epoch, record, item number), so an epoch's samples are the same whatever the worker count,
and a resumed run sees the data an uninterrupted one would.

Reading and preprocessing a record costs far more than a small model's step on it, so
records of up to ``CACHE_MAX_RECORD_S`` are preprocessed once and kept in memory (up to
``cache_mb`` per process or DataLoader worker); each sample is then a random crop of the
cached record. Other records (multi-day MIMIC waveforms) are read a random window at a time
where the source can, and read whole (part by part) only when several random windows in a
row have too few valid samples.

What of a record the model can use is decided by ``csfm.data.preprocess.RecordCheck``, the rule
``csfm.evaluation.embedding`` applies too: channels without a valid sample are left out, and a record
without a window of enough valid samples is unusable. ``find_unusable`` lists those up
front, by name and reason, and ``check_usable`` fails on them (or, asked to skip them,
warns) before any work starts.
"""
from __future__ import annotations

import ctypes
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csfm.model.batch import Batch, make_batch
from csfm.data.preprocess import (PreprocessConfig, RecordCheck, Windows, keep_channels, make_windows,
                                  preprocess_signal, select_channels)
from csfm.data.readers.mimic3 import NoSignalError
from csfm.data.record import CHANNEL_TYPE_NAMES, PPG_TYPE, ListedSource, Record, RecordSource, WindowedSource
from csfm.data.shards import PreparedRecord, header_record, is_prepared, valid_mask
from csfm.data.tokenizer import ReportTokenizer

LIMB_LEADS = (0, 1, 2, 3, 4, 5)  # I, II, III, aVR, aVL, aVF
LEAD_II = 1
CACHE_MAX_RECORD_S = 600.0  # longer records are read a window at a time, never cached
_READ_TRIES = 8  # random windows read from a record before reading all of it for a usable one
_GAP_SPANS = 8  # most all-channel gaps of a prepared row that its draws zero by slices, not by a NaN scan
PART_WINDOWS = 60
"""Records longer than this many windows (10 min at the defaults) are read and preprocessed
in parts of that length (``record_parts``), so memory does not grow with the record."""
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
PART_MARGIN_S = 5.0
"""Seconds read on each side of a part so the band-pass filters settle before it (the
0.5 Hz high-pass edge's transient decays to ~1e-5 within 5 s)."""


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
    Only subsets the record can give are drawn, each as likely; with none, all channels are
    kept. Random leads are drawn only for the subset chosen."""
    types = list(channel_types)
    ecg = [i for i, t in enumerate(types) if t != PPG_TYPE]
    ppg = [i for i, t in enumerate(types) if t == PPG_TYPE]
    lead_ii = [i for i in ecg if types[i] == LEAD_II]
    limb = [i for i in ecg if types[i] in LIMB_LEADS]
    options: list[Callable[[], list[int]]] = []
    if ecg:
        options.append(lambda: lead_ii[:1] or [ecg[rng.integers(len(ecg))]])
    if lead_ii and ppg:
        options.append(lambda: lead_ii[:1] + ppg[:1])
    if len(ecg) > 3:
        options.append(lambda: sorted(ecg[k] for k in rng.choice(len(ecg), 3, replace=False)))
    if len(limb) == 6 and len(ecg) > 6:
        options.append(lambda: limb)
    if ecg and ppg:
        options.extend([lambda: ecg, lambda: ppg])
    return options[int(rng.integers(len(options)))]() if options else list(range(len(types)))


class ItemRandom:
    """The random stream of one dataset item: ``ItemRandom(seed)(epoch, index, i, view)`` is a
    Philox generator keyed (seed, epoch) whose counter starts at (0, index, i, view), so every
    item draws its own stream whatever the worker or the order items come in. One generator
    is reset per item (~3 us) instead of a new one seeded through a SeedSequence (~16 us,
    a sixth of a prepared window's cost); the generator returned is reused by the next call."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) % 2**64
        self._bits = np.random.Philox(key=[self.seed, 0])
        self._generator = np.random.Generator(self._bits)

    def __call__(self, epoch: int, index: int, i: int, view: int = 0) -> np.random.Generator:
        self._bits.state = {"bit_generator": "Philox", "buffer": np.zeros(4, np.uint64), "buffer_pos": 4,
                            "has_uint32": 0, "uinteger": 0,
                            "state": {"counter": np.array([0, index, i, view], np.uint64),
                                      "key": np.array([self.seed, epoch], np.uint64)}}
        return self._generator


@dataclass(frozen=True)
class _StoredRow:
    """What a draw from a prepared row needs, kept per row and process: its header Record
    (``header_record``), crop starts (``start_runs``), report ids stored with the tokenizer's
    vocabulary (else None), the stored float16 view x [C, T] (NaN where invalid), whether it
    has no gap, and its gaps when all are across every channel (``gap_spans``)."""

    header: Record
    runs: np.ndarray
    text_ids: np.ndarray | None
    x: np.ndarray
    fully_valid: bool
    gaps: tuple[tuple[int, int], ...] | None


class PretrainWindows(torch.utils.data.Dataset):
    """Item i: a random window of record i, preprocessed to 250 Hz, z-scored, tokenized.

    subset_prob: chance of replacing the lead set by a random subset (``lead_subset``).
    Channels without a valid sample are left out (``RecordCheck``); a record shorter than
    the window is zero-padded to it with valid=False there. A record the model cannot use
    raises ValueError naming it and why: list those up front with ``find_unusable``.
    cache_mb: memory (MiB) for preprocessed records of up to CACHE_MAX_RECORD_S seconds (or
    of unknown duration: sources without ``duration_s``, which are read whole anyway); 0
    reads and preprocesses every sample's record anew.
    views: 1, or the number of independent random windows (and lead subsets) item i gives of
    its record, as a list of Samples (``collate_views`` puts them side by side in a batch).
    """

    def __init__(self, records: RecordSource, tokenizer: ReportTokenizer | None,
                 preprocess: PreprocessConfig | None = None, subset_prob: float = 0.5,
                 max_text_tokens: int = 64, seed: int = 0, indices: Sequence[int] | None = None,
                 cache_mb: float = 0.0, views: int = 1) -> None:
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a whole number >= 1, got {views!r}")
        self.records, self.tokenizer, self.views = records, tokenizer, views
        self.preprocess = preprocess or PreprocessConfig()
        self.subset_prob, self.max_text_tokens, self.seed = subset_prob, max_text_tokens, seed
        self.indices = list(range(len(records))) if indices is None else list(indices)
        self.epoch = 0
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_bytes_left = int(cache_mb * 2**20)
        self._cache: dict[int, tuple[Record, np.ndarray, np.ndarray]] = {}
        self._random = ItemRandom(seed)
        self._prepared: dict[int, _StoredRow] = {}

    def __getstate__(self) -> dict:
        """Pickled (e.g. for DataLoader worker processes) without the per-row lookups of prepared
        rows: they hold views of memory-mapped shards, which pickling would copy; each process
        makes its own."""
        return {**self.__dict__, "_prepared": {}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample | list[Sample]:
        index = self.indices[i]
        if self.views == 1:
            return self._sample(index, self._random(self.epoch, index, i))
        return [self._sample(index, self._random(self.epoch, index, i, v)) for v in range(self.views)]

    def _sample(self, index: int, rng: np.random.Generator) -> Sample:
        """One random window (and lead subset) of record ``index`` drawn with ``rng``."""
        record, x, valid = self._window(index, rng)
        keep = list(range(len(record.channel_types)))
        if rng.random() < self.subset_prob:
            keep = lead_subset(record.channel_types, rng)
        text = self._text_ids(index, record)
        if len(keep) < len(record.channel_types):
            x, valid = x[keep], valid[keep]
        return Sample(x, valid, [record.channel_types[c] for c in keep],
                      text, record.record_id, record.patient_id, dict(record.metadata))

    def _text_ids(self, index: int, record: Record) -> np.ndarray:
        """The report's word-piece ids [M] int64, M <= max_text_tokens: as ``csfm.prepare`` stored
        them with this tokenizer's vocabulary, else tokenised now; empty without a tokenizer or
        a report."""
        if self.tokenizer is None or not record.text:
            return np.zeros(0, dtype=np.int64)
        stored = self._prepared.get(index)
        if stored is not None and stored.text_ids is not None:
            return stored.text_ids[:self.max_text_tokens].astype(np.int64)
        return np.asarray(self.tokenizer.encode(record.text, self.max_text_tokens).ids, dtype=np.int64)

    def _window(self, index: int, rng: np.random.Generator) -> tuple[Record, np.ndarray, np.ndarray]:
        """(record reduced to its usable channels, x [C, window], valid [C, window]) of one
        random window of record ``index``; ValueError naming the record when it has none."""
        stored = self._prepared.get(index)
        if stored is None and is_prepared(self.records, index):  # stored preprocessed: looked at once per process
            row = self.records.prepared(index)
            same_vocab = self.tokenizer is not None and row.text_vocab == self.tokenizer.fingerprint
            stored = self._prepared[index] = _StoredRow(header_record(row), start_runs(row, self.preprocess),
                                                        row.text_ids if same_vocab else None, row.x, row.fully_valid,
                                                        gap_spans(row))
        if stored is not None:
            return stored.header, *prepared_crop(stored.x, stored.fully_valid, self.preprocess, rng, stored.runs,
                                                 stored.gaps)
        cached = self._preprocessed(index)
        if cached is not None:
            record, x, valid = cached
            return record, *random_crop(x, valid, self.preprocess, rng, record.record_id)
        duration = _duration(self.records, index)
        window_s = self.preprocess.window / self.preprocess.target_fs
        if duration is not None and duration > window_s:  # a known duration: a WindowedSource
            read = self._read_window(index, duration, rng)
            if read is not None:
                return read
        return self._scan(index, rng)

    def _preprocessed(self, index: int) -> tuple[Record, np.ndarray, np.ndarray] | None:
        """(record reduced to its usable channels, without its raw signal; x [C, T'], valid
        [C, T']) of the whole preprocessed record, from the cache or made now while the
        budget lasts; None for records too long to cache or once the budget is spent."""
        if index in self._cache:
            return self._cache[index]
        duration = _duration(self.records, index)
        if self.cache_bytes_left <= 0 or (duration is not None and duration > CACHE_MAX_RECORD_S):
            return None
        record = self.records[index]
        check = RecordCheck(self.preprocess)
        used = check.usable_channels(record)
        if not used:
            raise ValueError(f"record {record.record_id}: {check.problem}")
        record = keep_channels(record, used)
        x, valid = preprocess_signal(record.signal, record.fs, record.channel_types, self.preprocess)
        entry = (replace(record, signal=np.empty((len(used), 0), np.float32)), x, valid)
        self.cache_bytes_left -= x.nbytes + valid.nbytes
        if self.cache_bytes_left >= 0:
            self._cache[index] = entry
        return entry

    def _read_window(self, index: int, duration: float,
                     rng: np.random.Generator) -> tuple[Record, np.ndarray, np.ndarray] | None:
        """``_window`` by reading only a window: a random window's span (plus PART_MARGIN_S
        each side for the filters); up to _READ_TRIES random starts, None when none of them
        has enough valid samples."""
        window_s = self.preprocess.window / self.preprocess.target_fs
        for _ in range(_READ_TRIES):
            part = read_part(self.records, index, float(rng.uniform(0.0, max(0.0, duration - window_s))), window_s)
            if part is None:
                continue
            windows, used = RecordCheck(self.preprocess).windows(part[0], part[1], window_s)
            if len(windows.x):
                return _without_signal(part[0], used), windows.x[0], windows.valid[0]
        return None

    def _scan(self, index: int, rng: np.random.Generator) -> tuple[Record, np.ndarray, np.ndarray]:
        """``_window`` by reading the whole record (part by part: ``record_parts``): one of its
        usable windows drawn uniformly (reservoir sampling, so one window is held at a time),
        or ValueError naming the record and why it has none."""
        check, name, chosen, seen = RecordCheck(self.preprocess), record_name(self.records, index), None, 0
        for part, _, skip_s, span_s in record_parts(self.records, index, self.preprocess):
            windows, used = check.windows(part, skip_s, span_s)
            name = part.record_id
            for w in range(len(windows.x)):
                seen += 1
                if rng.integers(seen) == 0:
                    chosen = (_without_signal(part, used), windows.x[w].copy(), windows.valid[w].copy())
        if chosen is None:
            raise ValueError(f"record {name}: {check.problem}")
        return chosen


def random_crop(x: np.ndarray, valid: np.ndarray, config: PreprocessConfig, rng: np.random.Generator,
                record_id: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A random window of config.window samples from x, valid [C, T] (preprocessed).

    The start is drawn uniformly among those whose window has at least
    config.min_valid_fraction valid samples (all channels together), so a record that has
    such a window always gives one. A record shorter than the window is zero-padded to it
    (valid False there). ValueError naming ``record_id`` when no start qualifies.
    Returns (x [C, window] float32, valid [C, window] bool), copies.
    """
    x, valid = _padded(x, 0.0, config.window), _padded(valid, False, config.window)
    s = crop_start(valid, config, rng, record_id)
    return x[:, s:s + config.window].astype(np.float32), valid[:, s:s + config.window].copy()


def _padded(a: np.ndarray, fill: float | bool, window: int) -> np.ndarray:
    """a [C, T] padded with ``fill`` to at least ``window`` columns (itself when long enough)."""
    return a if a.shape[1] >= window else np.pad(a, ((0, 0), (0, window - a.shape[1])), constant_values=fill)


def crop_start(valid: np.ndarray, config: PreprocessConfig, rng: np.random.Generator, record_id: str = "") -> int:
    """``random_crop``'s start (samples) for valid [C, T]: uniform among ``crop_starts``."""
    starts = crop_starts(valid, config, record_id)
    return int(starts[rng.integers(len(starts))])  # rng.choice(starts)'s draw, without its overhead


def crop_starts(valid: np.ndarray, config: PreprocessConfig, record_id: str = "") -> np.ndarray:
    """The starts (samples, ascending) whose window of valid [C, T] (a record shorter than it
    padded with invalid samples) has enough valid samples; ValueError naming ``record_id``
    when there is none."""
    window, (channels, _) = config.window, valid.shape
    valid = _padded(valid, False, window)
    if valid.shape[1] == window:  # one start (most records of 10 s): no running sum needed
        fractions = np.array([np.count_nonzero(valid) / max(1, channels * window)])
    else:
        before = np.concatenate([[0], np.cumsum(valid.sum(axis=0))])  # valid samples before each column
        fractions = (before[window:] - before[:-window]) / max(1, channels * window)
    starts = np.flatnonzero(fractions >= config.min_valid_fraction)
    if not len(starts):
        raise ValueError(f"record {record_id}: no {window}-sample window with at least "
                         f"{config.min_valid_fraction:.0%} valid samples (best {fractions.max():.0%})")
    return starts


def start_runs(row: PreparedRecord, config: PreprocessConfig) -> np.ndarray:
    """``crop_starts`` of a prepared row as runs of consecutive starts: [R, 2] int64 (the run's
    first start, the number of starts in runs 0..r together), a few numbers per row however
    long (one run for a row without gaps)."""
    if row.fully_valid and row.x.shape[1] >= config.window:
        return np.array([[0, row.x.shape[1] - config.window + 1]])
    starts = crop_starts(row.valid, config, row.record_id)
    breaks = np.flatnonzero(np.diff(starts) != 1) + 1
    lasts = starts[np.r_[breaks - 1, len(starts) - 1]]
    firsts = starts[np.r_[0, breaks]]
    return np.stack([firsts, np.cumsum(lasts + 1 - firsts)], axis=1)


def gap_spans(row: PreparedRecord) -> tuple[tuple[int, int], ...] | None:
    """The (start, stop) sample spans of a prepared row where every channel is invalid, when
    those hold all its invalid samples and number at most _GAP_SPANS (a tracing's zero-padded
    ends, a gap across all leads); None otherwise (() for a row without gaps)."""
    if row.fully_valid:
        return ()
    valid = row.valid
    all_valid = valid.all(axis=0)
    if not np.array_equal(all_valid, valid.any(axis=0)):  # a gap in some channels only
        return None
    edges = np.flatnonzero(np.diff(np.r_[0, (~all_valid).view(np.int8), 0])).tolist()
    return tuple(zip(edges[::2], edges[1::2])) if len(edges) <= 2 * _GAP_SPANS else None


def prepared_crop(stored_x: np.ndarray, fully_valid: bool, config: PreprocessConfig, rng: np.random.Generator,
                  runs: np.ndarray, gaps: tuple[tuple[int, int], ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """``random_crop`` of a prepared row as stored (stored_x: float16 [C, T], NaN where invalid;
    fully_valid: it has no NaN): the same start for the same ``rng`` (the k-th of the row's
    ``start_runs``, k drawn as crop_start draws it); only the window is converted (x [C, window]
    float32, 0 where invalid; valid [C, window]). gaps (``gap_spans``): zeroed by slices, with
    the samples past the row's end; None: the window is scanned for NaN."""
    counts = runs[:, 1]
    k = int(rng.integers(counts[-1]))
    run = int(np.searchsorted(counts, k, side="right"))
    s = int(runs[run, 0] + k - (counts[run - 1] if run else 0))
    x16 = np.ascontiguousarray(_padded(stored_x, np.nan, config.window)[:, s:s + config.window])
    x = torch.from_numpy(x16).float()  # torch: vectorised fp16 -> fp32
    long_enough = stored_x.shape[1] >= config.window
    if fully_valid and long_enough:  # no NaN to look for
        return x.numpy(), np.ones(x16.shape, np.bool_)
    if gaps is None:
        valid = valid_mask(x16)
        return x.nan_to_num_(0.0).numpy(), valid
    x, valid = x.numpy(), np.ones(x16.shape, np.bool_)
    end = s + config.window
    spans = gaps if long_enough else gaps + ((stored_x.shape[1], end),)
    for first, stop in spans:
        first, stop = max(first, s) - s, min(stop, end) - s
        if first < stop:
            x[:, first:stop] = 0.0
            valid[:, first:stop] = False
    return x, valid


def read_part(records: WindowedSource, index: int, start_s: float, span_s: float) -> tuple[Record, float] | None:
    """(seconds [start_s - PART_MARGIN_S, start_s + span_s + PART_MARGIN_S) of record
    ``index``, clipped to the record; the seconds of it before start_s), read with the
    source's ``read_window``; None where a multi-segment record has nothing recorded there."""
    begin = max(0.0, start_s - PART_MARGIN_S)
    try:
        return records.read_window(index, begin, start_s + span_s + PART_MARGIN_S - begin), start_s - begin
    except NoSignalError:
        return None


def record_parts(records: RecordSource, index: int,
                 config: PreprocessConfig) -> Iterator[tuple[Record, float, float, float | None]]:
    """Record ``index`` as (part, start_s, skip_s, span_s), the arguments of
    ``RecordCheck.windows`` plus where the span starts in the record (seconds).

    The whole record, once ((record, 0, 0, None)), when it lasts at most PART_WINDOWS
    windows or the source cannot read parts of records; otherwise consecutive spans of
    PART_WINDOWS windows from 0 s, each read with PART_MARGIN_S more on both sides
    (``read_part``), so a record of any length costs the memory of one part. Each part is
    z-scored on its own. Stretches of a multi-segment record where nothing is recorded give
    no part.
    """
    duration, part_s = _duration(records, index), PART_WINDOWS * config.window / config.target_fs
    if duration is None or duration <= part_s:  # a known duration: a WindowedSource
        try:
            record = records[index]
        except NoSignalError:
            return
        yield record, 0.0, 0.0, None
        return
    for start_s in np.arange(0.0, duration, part_s):
        part = read_part(records, index, float(start_s), part_s)
        if part is not None:
            yield part[0], float(start_s), part[1], part_s


@dataclass
class RecordWindows:
    """The windows of one record (or of one part of a long record) as the encoder takes them:
    x, valid [W, C, window] (float32 preprocessed, bool), start_s [W] seconds from the
    record's start, channel_types [C] of the channels used, the record's ids and metadata."""

    x: np.ndarray
    valid: np.ndarray
    start_s: np.ndarray
    channel_types: list[int]
    record_id: str
    patient_id: str
    metadata: dict = field(default_factory=dict)

    def samples(self, every: int = 1) -> list[Sample]:
        """One Sample (no text) per ``every``-th window."""
        return [Sample(x, v, self.channel_types, np.zeros(0, np.int64), self.record_id, self.patient_id)
                for x, v in zip(self.x[::every], self.valid[::every])]


def record_windows(records: RecordSource, index: int, check: RecordCheck,
                   stride_s: float | None = None) -> Iterator[RecordWindows]:
    """Every usable window of record ``index``, cut by ``check`` (its config and modality;
    afterwards ``check.problem`` and ``check.empty_channels`` tell what was left out), one
    RecordWindows per part (``record_parts``: one for a record of up to PART_WINDOWS windows).

    stride_s: seconds between window starts (rounded to samples at the target rate; default
    the window, no overlap); in a long record, each part's windows start anew at the part's
    start. The heap memory freed is handed back to the OS after each part of a long record.
    """
    config = check.config
    stride = None if stride_s is None else max(1, int(round(stride_s * config.target_fs)))
    if is_prepared(records, index):
        yield _prepared_windows(records.prepared(index), check, stride)
        return
    for part, start_s, skip_s, span_s in record_parts(records, index, config):
        windows, used = check.windows(part, skip_s, span_s, stride)
        yield RecordWindows(windows.x, windows.valid, start_s + windows.start_s,
                            [part.channel_types[c] for c in used], part.record_id, part.patient_id, part.metadata)
        if span_s is not None:
            _return_freed_memory()


def _prepared_windows(row: PreparedRecord, check: RecordCheck, stride: int | None) -> RecordWindows:
    """A prepared row's windows, of its channels of ``check.modality``, cut and counted as
    ``check.windows`` does (the row is already preprocessed: nothing is filtered again)."""
    config = check.config
    used = list(select_channels(row.channel_types, check.modality))
    check.channels.update({CHANNEL_TYPE_NAMES[row.channel_types[c]]: True for c in used})
    check.seconds += row.x.shape[1] / config.target_fs
    x, valid = np.nan_to_num(row.x[used].astype(np.float32)), row.valid[used]
    check.valid_seconds += int(valid.any(axis=0).sum()) / config.target_fs if used else 0.0
    windows = make_windows(x, valid, config, stride=stride) if used else Windows.none(config)
    check.n_windows += len(windows.x)
    return RecordWindows(windows.x, windows.valid, row.start_s + windows.start_s,
                         [row.channel_types[c] for c in used], row.record_id, row.patient_id, row.metadata or {})


def _return_freed_memory() -> None:
    """Hands the heap memory freed so far back to the OS (glibc's ``malloc_trim``; nothing
    where it is absent). Called after each part of a long record: glibc keeps freed heap
    pages, and the parts' buffers freed between the encoder's tensors fragment its heap, so
    without this a 10-hour 12-lead record grew the embedding process by about 1 GB more
    (measured)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _UsabilityChecks(torch.utils.data.Dataset):
    """Item k: (index, record id, problem) of record indices[k] (``RecordCheck.problem``, or
    the reader's ValueError for a record that cannot be read, e.g. one without an ECG or PPG
    channel; "" when usable); the record is read part by part until its first usable window."""

    def __init__(self, records: RecordSource, indices: Sequence[int], config: PreprocessConfig,
                 modality: str) -> None:
        self.records, self.indices, self.config, self.modality = records, list(indices), config, modality

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, str, str]:
        index = self.indices[k]
        if self.modality == "both" and is_prepared(self.records, index):  # csfm.prepare kept only usable records
            return index, record_name(self.records, index), ""
        check, name = RecordCheck(self.config, self.modality), record_name(self.records, index)
        try:
            for part, _, skip_s, span_s in record_parts(self.records, index, self.config):
                name = part.record_id or name
                if len(check.windows(part, skip_s, span_s)[0].x):
                    break
        except ValueError as error:  # readers raise ValueError naming the file and what is wrong
            return index, name, f"cannot be read: {error}"
        return index, name, check.problem


def all_windows(records: RecordSource, index: int, check: RecordCheck,
                stride_s: float | None = None) -> RecordWindows:
    """Every usable window of record ``index`` (``record_windows``' parts joined into one
    RecordWindows). ValueError naming the record when it has none (``check.problem``)."""
    parts = list(record_windows(records, index, check, stride_s))
    if check.problem:
        name = parts[0].record_id if parts else record_name(records, index)
        raise ValueError(f"record {name}: {check.problem}")
    if len(parts) == 1:
        return parts[0]
    return RecordWindows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "valid", "start_s")),
                         parts[0].channel_types, parts[0].record_id, parts[0].patient_id, parts[0].metadata)


def find_unusable(records: RecordSource, indices: Sequence[int], config: PreprocessConfig | None = None,
                  modality: str = "both", workers: int = 0, progress: bool = False) -> dict[int, tuple[str, str]]:
    """{index: (record id, why)} for the records among ``indices`` the model cannot use
    (``RecordCheck``: no channel of ``modality`` with a valid sample, or no window with
    enough valid samples; or the reader cannot read it). Each record is read until its first
    usable window, a long one part by part (``record_parts``); ``workers`` > 0 reads in that
    many processes."""
    checks = _UsabilityChecks(records, sorted(set(indices)), config or PreprocessConfig(), modality)
    loader = torch.utils.data.DataLoader(checks, batch_size=None, num_workers=workers)
    return {int(index): (name, problem)
            for index, name, problem in tqdm(loader, total=len(checks), disable=not progress, unit="record",
                                             desc="checking records")
            if problem}


class UnusableRecordsError(ValueError):
    """Records the model cannot use were found and not skipped; the message lists them."""


def check_usable(unusable: dict[int, tuple[str, str]], n_records: int, skip_unusable: bool) -> None:
    """Fails on the records ``find_unusable`` found: UnusableRecordsError listing each (id:
    why) and naming --skip-unusable; with ``skip_unusable`` a warning listing them instead
    (the caller leaves them out)."""
    if not unusable:
        return
    listing = "\n".join(f"  {name}: {why}" for name, why in unusable.values())
    head = f"{len(unusable)} of {n_records} records cannot be used"
    if not skip_unusable:
        raise UnusableRecordsError(f"{head} (--skip-unusable leaves them out):\n{listing}")
    warnings.warn(f"{head}; left out (--skip-unusable):\n{listing}", stacklevel=2)


def _without_signal(record: Record, channels: Sequence[int]) -> Record:
    """``record`` reduced to ``channels`` without its raw samples (what a Sample keeps of it)."""
    return keep_channels(replace(record, signal=record.signal[:, :0]), channels)


def _duration(records: RecordSource, index: int) -> float | None:
    """Seconds of record ``index`` where the source tells without reading it, else None."""
    return records.duration_s(index) if isinstance(records, WindowedSource) else None


def record_name(records: RecordSource, index: int) -> str:
    """Record ``index``'s id where the source lists ids, else ``#index``."""
    return records.record_ids[index] if isinstance(records, ListedSource) else f"#{index}"


def collate_views(items: Sequence[Sequence[Sample]]) -> Batch:
    """Items of several views each (``PretrainWindows(views=V)``) -> one Batch of N * V
    samples, the views of an item side by side (rows i * V .. i * V + V - 1)."""
    return collate([sample for views in items for sample in views])


def collate(samples: Sequence[Sample]) -> Batch:
    """Samples -> ragged Batch (nothing padded: lead counts and text lengths stay per sample)."""
    return make_batch([s.x for s in samples], [s.channel_types for s in samples],
                      [s.text_ids for s in samples], [s.valid for s in samples],
                      [s.record_id for s in samples])
