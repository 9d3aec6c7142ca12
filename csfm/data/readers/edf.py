"""EDF, EDF+ and BDF recordings (Holter, wearables, sleep labs) -> Record.

An EDF file is a 256-byte ASCII header, then 256 bytes of fixed-width fields per signal
(label, transducer, physical dimension, physical/digital min and max, prefiltering, samples
per data record), then the data records: each holds ``samples per data record`` little-endian
samples of every signal in turn, 16-bit in EDF, 24-bit in BDF (BioSemi, version field
``0xFF "BIOSEMI"``). A sample is ``physical = pmin + (digital - dmin) * (pmax - pmin) /
(dmax - dmin)``. EDF+ (reserved field ``EDF+C`` / ``EDF+D``, BDF+ likewise) adds an ``EDF
Annotations`` signal whose first annotation in each data record states the record's onset in
seconds after the start date/time.

The file is parsed here rather than with ``edfio``: measured with edfio 0.4.18, a
non-numeric physical minimum gives the raw digital values as if physical, digital min ==
max only warns and does the same, a truncated file or a wrong record count only warns and
drops data, EDF+D records are joined without their gaps, and BDF is read whole into int32.
Tests use edfio as the independent decoder and fixture writer.

Decisions (the contract is csfm.data.leads):

* Header checks come before anything is allocated: header bytes = 256 x (signals + 1);
  the number of data records x the bytes per record must equal the bytes after the header
  exactly (-1, "unknown", is derived from the file size and must divide it); every field
  the reader uses must be printable ASCII (the physical dimension may spell micro as
  ``µ`` / ``μ``) and a number where EDF wants one; digital min < max; physical min != max.
  Calibration fields are checked for the channels that are kept.
* Labels go through the lead contract (``ECG II`` and ``EKG II`` -> II, ``Pleth`` -> PPG; a
  user ``mapping`` overrides it). EEG, EMG, Resp, ... are dropped; annotation signals are never channels
  and are listed in ``dropped_channels`` too.
* Signals may have different rates. The kept channels at the highest rate among them stay;
  the others are dropped with the reason, e.g. ``"Pleth (64 Hz; kept channels are at
  256 Hz)"`` (nothing is resampled). ``mapping={"ECG": None}`` drops a channel to keep the
  lower-rate ones instead.
* ECG channels are converted to mV from V, mV, uV/µV or nV (case-insensitive); any other
  physical dimension of an ECG channel is an error naming the signal and the field. PPG
  keeps its physical units as written ("", "%", "NU", ...).
* EDF+D / BDF+D: each data record is placed at its time-keeping onset (rounded to the
  nearest sample); sample 0 is the header start time, so a record that starts late leaves
  NaN before it and gaps between records are NaN. ``metadata["gaps_s"]`` lists them as
  [start s, length s]. Overlapping or out-of-order records are errors. EDF+C records are
  contiguous by definition and are joined.
* patient_id is the first subfield (hospital code) of an EDF+ patient field, "" for
  ``X``; a plain EDF file's whole patient field. ``metadata["acquired"]`` is the start
  date/time (ISO; the 4-digit year of an EDF+ ``Startdate dd-MMM-yyyy`` where given,
  else 1985..2084 from ``yy``); ``metadata["device"]`` the EDF+ equipment subfield.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from csfm.data.leads import LeadMapping, modality, record_from_channels, resolve_channels
from csfm.data.readers.safe_io import FileFormatError, number
from csfm.data.record import Record

FORMAT = "EDF"
MAX_SIGNAL_BYTES = 4 * 2 ** 30  # float32 output (kept channels x samples, gaps included) this reader allocates

_EDF_VERSION = b"0       "
_BDF_VERSION = b"\xffBIOSEMI"
_FIXED_FIELDS = (("version", 8), ("local patient identification", 80), ("local recording identification", 80),
                 ("startdate of recording", 8), ("starttime of recording", 8), ("number of bytes in header", 8),
                 ("reserved", 44), ("number of data records", 8), ("duration of a data record", 8),
                 ("number of signals", 4))
_SIGNAL_FIELDS = (("label", 16), ("transducer type", 80), ("physical dimension", 8), ("physical minimum", 8),
                  ("physical maximum", 8), ("digital minimum", 8), ("digital maximum", 8), ("prefiltering", 80),
                  ("samples per data record", 8), ("reserved", 32))
_ANNOTATION_LABELS = ("EDF Annotations", "BDF Annotations")
_DIGITAL_RANGE = {"EDF": (-2 ** 15, 2 ** 15 - 1), "BDF": (-2 ** 23, 2 ** 23 - 1)}
_TO_MV = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "nv": 1e-6}
_MICRO = (b"\xc2\xb5", b"\xce\xbc")  # micro sign and Greek mu in UTF-8; 0xB5 alone is Latin-1 micro
_INTEGER = re.compile(r"[+-]?\d+")
_DOTTED = re.compile(r"(\d\d)\.(\d\d)\.(\d\d)")  # dd.mm.yy, hh.mm.ss
_EDFPLUS_DATE = re.compile(r"(\d\d)-([A-Za-z]{3})-(\d{4})")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_TIMEKEEPING = re.compile(rb"([+-]\d+(?:\.\d+)?)\x14")


@dataclass(frozen=True)
class _Source:
    """The file being read and the format it is read as ("EDF" or "BDF"), for errors."""

    path: Path
    fmt: str

    def error(self, field: str, why: str) -> FileFormatError:
        return FileFormatError(self.path, self.fmt, field, why)


@dataclass(frozen=True)
class _Header(_Source):
    """What the header states, checked against the file size. fields: the fixed fields as
    text; signals: per signal, field name -> raw bytes; samples: per data record."""

    fields: dict[str, str]
    signals: list[dict[str, bytes]]
    labels: list[str]
    samples: list[int]
    n_records: int
    duration: float  # s per data record

    @property
    def plus(self) -> bool:
        return self.fields["reserved"][:4] in ("EDF+", "BDF+")

    @property
    def discontinuous(self) -> bool:
        return self.plus and self.fields["reserved"][4:5] == "D"

    @property
    def bytes_per_sample(self) -> int:
        return 3 if self.fmt == "BDF" else 2

    @property
    def header_bytes(self) -> int:
        return 256 * (len(self.signals) + 1)

    def signal_field(self, k: int, name: str) -> str:
        """How errors name field ``name`` of signal k."""
        return f"signal {k + 1} ({self.labels[k]!r}) {name}"

    def records(self) -> np.ndarray:
        """The data records, memory-mapped: [n_records, bytes per record] uint8."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.header_bytes,
                         shape=(self.n_records, sum(self.samples) * self.bytes_per_sample))

    def columns(self, records: np.ndarray, k: int) -> np.ndarray:
        """Signal k's bytes in ``records`` ([R, bytes per record]): [R, spr x bytes per sample]."""
        start = sum(self.samples[:k]) * self.bytes_per_sample
        return records[:, start:start + self.samples[k] * self.bytes_per_sample]


def sniff(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) starts an EDF/EDF+ file (version ``"0"`` and a
    header length that is a multiple of 256 at bytes 184..192) or a BDF file (0xFF ``BIOSEMI``)."""
    if head[:8] == _BDF_VERSION:
        return True
    length = head[184:192].strip(b" ")
    return head[:8] == _EDF_VERSION and length.isdigit() and int(length) >= 512 and int(length) % 256 == 0


def read_edf(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """Read an EDF, EDF+ (C or D) or BDF file into a Record (see the module doc for the rules).

    path: the file. mapping: lead-contract overrides (csfm.data.leads), e.g. ``{"ECG1": "II"}``
    for a Holter that numbers its channels. Returns signal [C, T] float32 (mV for ECG, the
    file's units for PPG, NaN in EDF+D gaps) at fs = samples per data record / record
    duration (Hz). Raises FileFormatError naming the file and the field for a missing file,
    a header that breaks the format or disagrees with the file size, an ECG channel whose
    dimension is not a voltage, overlapping EDF+D records, or no usable channel.
    """
    header = _read_header(Path(path))
    kept, dropped = _channels(header, mapping)
    units, scales = zip(*(_units(header, k, ctype) for k, ctype in kept))
    calibrations = [_calibration(header, k) for k, _ in kept]
    metadata = {"format": header.fmt + ("+" if header.plus else ""), "source_file": str(path), **_recording(header)}
    prefiltering = {header.labels[k]: _text(header, header.signals[k]["prefiltering"],
                                            header.signal_field(k, "prefiltering")) for k, _ in kept}
    if any(prefiltering.values()):
        metadata["prefiltering"] = {name: text for name, text in prefiltering.items() if text}
    spr = header.samples[kept[0][0]]
    fs = spr / header.duration
    records = header.records()
    starts, gaps = _record_starts(header, records, spr, fs, len(kept))
    if header.discontinuous:
        metadata["gaps_s"] = gaps
    signal = np.full((len(kept), int(starts[-1]) + spr), np.nan, dtype=np.float32)
    breaks = np.flatnonzero(np.diff(starts) != spr) + 1  # runs of back-to-back records
    for row, ((k, _), scale, (gain, offset)) in enumerate(zip(kept, scales, calibrations)):
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, header.n_records]):
            digital = _digital(header, records[first:last], k)
            signal[row, starts[first]:starts[first] + digital.size] = (digital.ravel() * gain + offset) * scale
    return record_from_channels(signal, fs, [header.labels[k] for k, _ in kept], list(units),
                                [ctype for _, ctype in kept], dropped, text="", record_id=Path(path).stem,
                                patient_id=_patient_id(header), metadata=metadata)


def _read_header(path: Path) -> _Header:
    """The header of ``path`` with every layout field checked against the file size."""
    if not path.is_file():
        raise FileFormatError(path, FORMAT, "file", "does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as file:
        fixed = file.read(256)
        if len(fixed) < 256:
            raise FileFormatError(path, FORMAT, "header", f"the file has {len(fixed)} bytes, an EDF header 256")
        if fixed[:8] not in (_EDF_VERSION, _BDF_VERSION):
            raise FileFormatError(path, FORMAT, "version", f"{fixed[:8]!r} is neither EDF's b'0       ' nor "
                                  "BDF's b'\\xffBIOSEMI'")
        source = _Source(path, "BDF" if fixed[:8] == _BDF_VERSION else "EDF")
        fields, offset = {}, 0
        for name, width in _FIXED_FIELDS:
            if name != "version":
                fields[name] = _text(source, fixed[offset:offset + width], name)
            offset += width
        n_signals = _integer(source, fields["number of signals"], "number of signals")
        header_bytes = 256 * (n_signals + 1)
        if n_signals < 1 or header_bytes > size:
            raise source.error("number of signals", f"states {n_signals} signals: needs 1 or more and a "
                               f"{header_bytes}-byte header, the file has {size} bytes")
        if _integer(source, fields["number of bytes in header"], "number of bytes in header") != header_bytes:
            raise source.error("number of bytes in header", f"states {fields['number of bytes in header']}, "
                               f"but {n_signals} signals make a {header_bytes}-byte header")
        block = file.read(header_bytes - 256)
    signals: list[dict[str, bytes]] = [{} for _ in range(n_signals)]
    offset = 0
    for name, width in _SIGNAL_FIELDS:
        for signal in signals:
            signal[name], offset = block[offset:offset + width], offset + width
    labels = [_text(source, s["label"], f"signal {k + 1} label").strip() for k, s in enumerate(signals)]
    named = _Header(path, source.fmt, fields, signals, labels, [], 0, 0.0)
    samples = []
    for k, signal in enumerate(signals):
        field = named.signal_field(k, "samples per data record")
        samples.append(_integer(source, _text(source, signal["samples per data record"], field), field))
        if samples[-1] < 1:
            raise source.error(field, f"{samples[-1]}: must be 1 or more")
    duration = number(fields["duration of a data record"], path, source.fmt, "duration of a data record",
                      positive=True)
    record_bytes = sum(samples) * named.bytes_per_sample
    n_records = _integer(source, fields["number of data records"], "number of data records")
    full, rest = divmod(size - header_bytes, record_bytes)
    if n_records == -1 and full > 0 and rest == 0:
        n_records = full
    elif n_records < 1 or n_records * record_bytes != size - header_bytes:
        raise source.error("number of data records", f"states {n_records} records of {record_bytes} bytes, but the "
                           f"file holds {size - header_bytes} bytes after the header ({full} records + {rest} "
                           "bytes): truncated, or the count is wrong")
    return replace(named, samples=samples, n_records=n_records, duration=duration)


def _text(source: _Source, raw: bytes, field: str, micro: bool = False) -> str:
    """A header field as text, trailing spaces removed; EDF allows printable ASCII only
    (``micro``: also µ as Latin-1 0xB5 or UTF-8 micro sign / Greek mu, read as "µ")."""
    if micro:
        for spelling in _MICRO:
            raw = raw.replace(spelling, b"\xb5")
    bad = [(i, byte) for i, byte in enumerate(raw) if not 32 <= byte <= 126 and not (micro and byte == 0xB5)]
    if bad:
        raise source.error(field, f"byte 0x{bad[0][1]:02X} at position {bad[0][0]} of {raw.rstrip()!r}: EDF header "
                           "fields hold printable ASCII only")
    return raw.decode("latin-1").rstrip(" ")


def _integer(source: _Source, text: str, field: str) -> int:
    """A whole-number field; FileFormatError naming ``field`` otherwise."""
    if not _INTEGER.fullmatch(text.strip()):
        raise source.error(field, f"expected a whole number, got {text!r}")
    return int(text)


def _channels(header: _Header, mapping: LeadMapping | None) -> tuple[list[tuple[int, int]], list[str]]:
    """(kept [(signal index, channel type)], dropped names) after the lead contract and the
    one-rate rule; annotation signals are dropped without being offered to the contract."""
    ordinary = [k for k, label in enumerate(header.labels) if label not in _ANNOTATION_LABELS]
    names = [header.labels[k] for k in ordinary]
    try:
        resolved, dropped = resolve_channels(names, mapping, where=str(header.path))
    except ValueError as error:
        raise header.error("signal labels", str(error)) from error
    kept = [(ordinary[i], ctype) for i, ctype in resolved]
    top = max(header.samples[k] for k, _ in kept)
    fs = top / header.duration
    dropped += [f"{header.labels[k]} ({header.samples[k] / header.duration:g} Hz; kept channels are at {fs:g} Hz)"
                for k, _ in kept if header.samples[k] != top]
    dropped += [label for label in header.labels if label in _ANNOTATION_LABELS]
    return [(k, ctype) for k, ctype in kept if header.samples[k] == top], dropped


def _units(header: _Header, k: int, ctype: int) -> tuple[str, float]:
    """(units, factor to them) of signal k: ("mV", V/mV/uV/nV -> mV) for ECG, the physical
    dimension as written and 1 for PPG."""
    field = header.signal_field(k, "physical dimension")
    dimension = _text(header, header.signals[k]["physical dimension"], field, micro=True).strip()
    if modality(ctype) == "PPG":
        return dimension, 1.0
    if dimension.lower() not in _TO_MV:
        raise header.error(field, f"{dimension!r} is not a voltage (V, mV, uV, µV, nV): cannot give the ECG in mV")
    return "mV", _TO_MV[dimension.lower()]


def _calibration(header: _Header, k: int) -> tuple[float, float]:
    """(gain, offset) with physical = digital x gain + offset, from signal k's checked
    physical and digital minimum and maximum."""
    values = {}
    for name in ("physical minimum", "physical maximum"):
        field = header.signal_field(k, name)
        values[name] = number(_text(header, header.signals[k][name], field), header.path, header.fmt, field)
    low, high = _DIGITAL_RANGE[header.fmt]
    for name in ("digital minimum", "digital maximum"):
        field = header.signal_field(k, name)
        values[name] = _integer(header, _text(header, header.signals[k][name], field), field)
        if not low <= values[name] <= high:
            raise header.error(field, f"{values[name]} is outside the {header.fmt} sample range {low}..{high}")
    pmin, pmax, dmin, dmax = values.values()
    if dmin >= dmax:
        raise header.error(header.signal_field(k, "digital maximum"), f"{dmax} must exceed the digital minimum {dmin}")
    if pmin == pmax:
        raise header.error(header.signal_field(k, "physical maximum"), f"{pmax} equals the physical minimum: no scale")
    gain = (pmax - pmin) / (dmax - dmin)
    return gain, pmin - dmin * gain


def _digital(header: _Header, records: np.ndarray, k: int) -> np.ndarray:
    """Signal k's samples in ``records`` (data records [R, bytes per record]): [R, spr] int32."""
    block = np.ascontiguousarray(header.columns(records, k))
    if header.bytes_per_sample == 2:
        return block.view("<i2").astype(np.int32)
    triples = block.reshape(len(block), -1, 3)
    return (triples[..., 0].astype(np.int32) | (triples[..., 1].astype(np.int32) << 8)
            | (triples[..., 2].view(np.int8).astype(np.int32) << 16))


def _record_starts(header: _Header, records: np.ndarray, spr: int, fs: float,
                   channels: int) -> tuple[np.ndarray, list[list[float]]]:
    """(first output sample of each data record [R] int64, gaps [[start s, length s]]).
    Records are contiguous unless the file is EDF+D, where the time-keeping onsets place
    them; the output size is checked against MAX_SIGNAL_BYTES before it is allocated."""
    if not header.discontinuous:
        _check_size(header, channels, header.n_records * spr, "number of data records")
        return np.arange(header.n_records, dtype=np.int64) * spr, []
    onsets, field = _onsets(header, records)
    last = int(np.argmax(onsets))
    _check_size(header, channels, onsets[last] * fs + spr, f"{field} of data record {last + 1}")
    starts = np.rint(onsets * fs).astype(np.int64)
    ends = np.r_[0, starts[:-1] + spr]
    overlap = np.flatnonzero(starts < ends)
    if overlap.size:
        k = int(overlap[0])
        raise header.error(f"{field} of data record {k + 1}", f"starts at {onsets[k]:g} s, before data record {k} "
                           f"ends at {ends[k] / fs:g} s (records overlap or are out of order)")
    gaps = [[float(end / fs), float((start - end) / fs)] for start, end in zip(starts, ends) if start > end]
    return starts, gaps


def _check_size(header: _Header, channels: int, samples: float, field: str) -> None:
    """FileFormatError naming ``field`` when [channels, samples] float32 exceeds MAX_SIGNAL_BYTES."""
    if not channels * samples * 4 <= MAX_SIGNAL_BYTES:
        raise header.error(field, f"makes {channels} channel(s) x {samples:.0f} samples, more than the "
                           f"{MAX_SIGNAL_BYTES / 2 ** 30:g} GiB of float32 this reader allocates")


def _onsets(header: _Header, records: np.ndarray) -> tuple[np.ndarray, str]:
    """(each data record's onset in s after the start time [R] float64, the field naming
    them) from the first annotation signal's time-keeping annotations ``+onset<0x14><0x14>``."""
    annotation = next((k for k, label in enumerate(header.labels) if label in _ANNOTATION_LABELS), None)
    if annotation is None:
        raise header.error("reserved", f"{header.fields['reserved'][:5]} (discontinuous) but no "
                           f"{' / '.join(_ANNOTATION_LABELS)} signal gives the data record onsets")
    field = f"{header.labels[annotation]} time-keeping onset"
    onsets = np.empty(header.n_records)
    for k, record in enumerate(header.columns(records, annotation)):
        match = _TIMEKEEPING.match(record.tobytes())
        onsets[k] = float(match[1]) if match else np.nan
        if not 0 <= onsets[k] < np.inf:
            raise header.error(f"{field} of data record {k + 1}", "expected a time-keeping annotation "
                               f"'+seconds\\x14\\x14' at or after the start time, got {record[:24].tobytes()!r}")
    return onsets, field


def _patient_id(header: _Header) -> str:
    """EDF+: the patient code subfield ("" for ``X``); EDF: the whole patient field."""
    text = header.fields["local patient identification"].strip()
    if not header.plus:
        return text
    code = text.split(" ", 1)[0]
    return "" if code == "X" else code


def _recording(header: _Header) -> dict[str, str]:
    """{"acquired": ISO start date/time, "device": the EDF+ equipment code where given}."""
    date = _DOTTED.fullmatch(header.fields["startdate of recording"])
    time = _DOTTED.fullmatch(header.fields["starttime of recording"])
    if date is None or time is None:
        field = "startdate of recording" if date is None else "starttime of recording"
        raise header.error(field, f"{header.fields[field]!r} is not dd.mm.yy / hh.mm.ss")
    day, month, year = (int(part) for part in date.groups())
    year += 1900 if year >= 85 else 2000
    result = {}
    recording = header.fields["local recording identification"].split()
    if header.plus and len(recording) > 1 and recording[0] == "Startdate":
        full = _EDFPLUS_DATE.fullmatch(recording[1])
        if full and full[2].upper() in _MONTHS:
            year = int(full[3])
        if len(recording) > 4 and recording[4] != "X":
            result["device"] = recording[4]
    try:
        start = datetime.date(year, month, day)
    except ValueError as error:
        raise header.error("startdate of recording", f"{header.fields['startdate of recording']!r}: {error}") from error
    try:
        clock = datetime.time(*(int(part) for part in time.groups()))
    except ValueError as error:
        raise header.error("starttime of recording", f"{header.fields['starttime of recording']!r}: {error}") from error
    return {"acquired": datetime.datetime.combine(start, clock).isoformat(), **result}
