"""Multi-segment WFDB records (MIMIC-III Waveform Database, MIMIC I) read window by window.

A multi-segment record is a master header listing segments in time order: a
``<id>_layout`` header of length 0 (variable layout: it names every channel that
appears in any segment), ``~ n`` gaps of n frames, and segment records
``<id>_0001``... that each carry their own channel subset and gains. Only the
segments a window overlaps are opened, and only the frames it needs are read
(``wfdb.rdrecord`` with ``sampfrom``/``sampto``), so a multi-day record is never
loaded whole. Channels absent from part of a window, and gaps, are NaN (never 0).

The channel list is the layout header's (or, for a fixed-layout record without
one, the first segment's), passed once through the lead contract. The output rate
is the frame rate x the highest samples per frame of the kept channels (041s: ECG
at 4 samples per frame -> 500 Hz; PLETH upsampled from 125 Hz, see wfdb_record).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import wfdb

from csfm.data.leads import LeadMapping, record_from_channels, resolve_channels
from csfm.data.readers.wfdb_record import GAP_SEGMENT, frame_range, parse_comments, read_channels, read_header, record_base
from csfm.data.record import Record


class NoSignalError(ValueError):
    """A range of a multi-segment record where none of the kept channels is recorded (only
    gaps, or segments without them): no data there, as opposed to a file that is broken."""


def read_multisegment(path: str | Path, mapping: LeadMapping | None = None,
                      start_s: float = 0.0, stop_s: float | None = None) -> Record:
    """Read [start_s, stop_s) seconds of a multi-segment record into one Record.

    path: master header, with or without ``.hea``. Returns signal [C, T] float32 with
    the kept channels recorded anywhere in the range (NaN where absent or in gaps).
    record_id is the master record name, patient_id its part before the first "-"
    (MIMIC-III ``p000878-2137-...`` -> ``p000878``); metadata has the master header's
    comments, ``start_s`` and the ``segments`` read. The whole range is held in
    memory: for multi-day records use stream_windows.
    Raises ValueError naming the file for a missing segment header or signal file,
    and naming the record when no kept channel is recorded in the range.
    """
    segments = _Segments(path, mapping)
    sampfrom, sampto = frame_range(segments.master, start_s, stop_s, segments.hea)
    signal, present, names = segments.read(sampfrom, sampto)
    if not present.any():
        raise NoSignalError(f"{segments.hea}: none of the channels {segments.names} is recorded in frames "
                            f"{sampfrom}..{sampto} (only gaps or segments without them)")
    return segments.record(sampfrom, signal, present, names)


def stream_windows(path: str | Path, window_s: float, mapping: LeadMapping | None = None,
                   min_valid_fraction: float = 0.5) -> Iterator[tuple[float, Record]]:
    """Yield (start_s, Record) for consecutive non-overlapping windows of window_s seconds.

    Windows start at 0, window_s, 2 window_s, ... of the master record; the last
    partial window is not yielded. A window carries the kept channels recorded in
    any segment it overlaps ([C, round(window_s * fs_frame) * spf] float32, NaN where
    absent). Windows where fewer than ``min_valid_fraction`` of the samples have a
    finite value in at least one channel (gaps, channels all absent) are skipped.
    Reaching a segment whose header or signal file is missing raises ValueError
    naming that file (windows before it have been yielded). Each window costs one
    ``wfdb.rdrecord`` per overlapping segment (~2 ms here, ~20 s per recorded day at
    10 s windows). Records as in read_multisegment, plus ``metadata["valid_fraction"]``.
    """
    segments = _Segments(path, mapping)
    width = int(round(window_s * segments.fs))
    if width <= 0:
        raise ValueError(f"{segments.hea}: window_s={window_s} s is shorter than one frame at {segments.fs} Hz")
    for sampfrom in range(0, segments.master.sig_len - width + 1, width):
        if not segments.overlaps_recording(sampfrom, sampfrom + width):
            continue
        signal, present, names = segments.read(sampfrom, sampfrom + width)
        valid = np.isfinite(signal[present]).any(axis=0).mean() if present.any() else 0.0
        if valid >= min_valid_fraction:
            record = segments.record(sampfrom, signal, present, names)
            record.metadata["valid_fraction"] = float(valid)
            yield sampfrom / segments.fs, record


class _Segments:
    """The master header, resolved channel list and segment index of one record."""

    def __init__(self, path: str | Path, mapping: LeadMapping | None) -> None:
        self.base = record_base(path)
        self.hea = f"{self.base}.hea"
        self.master = read_header(self.base)
        if not isinstance(self.master, wfdb.MultiRecord):
            raise ValueError(f"{self.hea}: not a multi-segment record (no field n_seg): use read_wfdb")
        self.fs = float(self.master.fs)
        lengths = np.asarray(self.master.seg_len, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.stops = self.starts + lengths
        self._headers: dict[int, wfdb.Record] = {}
        layout = self._channel_source()
        kept, self.dropped = resolve_channels(layout.sig_name, mapping, where=self.hea)
        self.names = [layout.sig_name[i] for i, _ in kept]
        self.units = [layout.units[i] for i, _ in kept]
        self.types = [t for _, t in kept]
        self.out_spf = max(layout.samps_per_frame[i] for i, _ in kept)
        self.metadata, self.text = parse_comments(self.master.comments)

    def overlaps_recording(self, sampfrom: int, sampto: int) -> bool:
        """Whether frames [sampfrom, sampto) touch any segment that is not a gap."""
        return any(self.master.seg_name[k] != GAP_SEGMENT for k in self._overlapping(sampfrom, sampto))

    def read(self, sampfrom: int, sampto: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Frames [sampfrom, sampto) of every kept channel.

        Returns (signal [C, (sampto - sampfrom) * out_spf] float32, NaN where not
        recorded; present [C] bool, the channel is in some overlapping segment;
        names of the segments read).
        """
        signal = np.full((len(self.names), (sampto - sampfrom) * self.out_spf), np.nan, dtype=np.float32)
        present = np.zeros(len(self.names), dtype=bool)
        read = []
        for k in self._overlapping(sampfrom, sampto):
            name = self.master.seg_name[k]
            if name == GAP_SEGMENT:
                continue
            header = self._segment_header(k)
            rows = [row for row, channel in enumerate(self.names) if channel in header.sig_name]
            if not rows:
                continue
            lo, hi = max(sampfrom, int(self.starts[k])), min(sampto, int(self.stops[k]))
            channels = [header.sig_name.index(self.names[row]) for row in rows]
            samples = read_channels(self.base.parent / name, header, channels,
                                    lo - int(self.starts[k]), hi - int(self.starts[k]), self.out_spf)
            signal[rows, (lo - sampfrom) * self.out_spf:(hi - sampfrom) * self.out_spf] = samples
            present[rows] = True
            read.append(name)
        return signal, present, read

    def record(self, sampfrom: int, signal: np.ndarray, present: np.ndarray, segments: list[str]) -> Record:
        """Record of the present channels of a span starting at frame sampfrom."""
        rows = np.flatnonzero(present)
        metadata: dict[str, Any] = {**self.metadata, "start_s": sampfrom / self.fs, "segments": segments}
        name = self.master.record_name
        return record_from_channels(
            signal[rows], self.fs * self.out_spf, [self.names[r] for r in rows],
            [self.units[r] for r in rows], [self.types[r] for r in rows], self.dropped,
            text=self.text, record_id=name, patient_id=name.split("-")[0], metadata=metadata)

    def _overlapping(self, sampfrom: int, sampto: int) -> list[int]:
        """Indices of the segments with frames in [sampfrom, sampto), zero-length ones excluded."""
        first = int(np.searchsorted(self.stops, sampfrom, side="right"))
        last = int(np.searchsorted(self.starts, sampto, side="left"))
        return [k for k in range(first, last) if self.stops[k] > self.starts[k]]

    def _channel_source(self) -> wfdb.Record:
        """The layout header (variable layout) or the first segment's header (fixed layout)."""
        if self.master.seg_len[0] == 0 and self.master.seg_name[0] != GAP_SEGMENT:
            return self._segment_header(0)
        first = next((k for k, name in enumerate(self.master.seg_name) if name != GAP_SEGMENT), None)
        if first is None:
            raise ValueError(f"{self.hea}: field seg_name lists only gaps")
        return self._segment_header(first)

    def _segment_header(self, k: int) -> wfdb.Record:
        """Header of segment k (cached); ValueError names the segment's file when absent."""
        if k not in self._headers:
            name = self.master.seg_name[k]
            try:
                header = read_header(self.base.parent / name)
            except ValueError as error:
                raise ValueError(f"{self.hea}: segment {name!r} (entry {k} of field seg_name): {error}") from error
            if header.fs != self.master.fs:
                raise ValueError(f"{self.base.parent / name}.hea: field fs is {header.fs} Hz but the master "
                                 f"header {self.hea} says {self.master.fs} Hz")
            self._headers[k] = header
        return self._headers[k]
