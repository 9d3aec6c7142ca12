"""Read one single-segment WFDB record (``.hea`` + signal files) into a Record.

Everything ``wfdb`` reads is accepted: formats 16, 212, 80, 24, 310/311, FLAC
508-516, ``.mat`` signal files. Signals are read in physical units with
``physical=True``, where wfdb already gives NaN for invalid samples.

Multi-frequency records (samples per frame > 1 on some channels) are read with
``smooth_frames=False``; channel k then runs at ``fs_frame * spf[k]`` Hz. The record
is brought to the highest rate among the *kept* channels: each lower-rate channel is
upsampled with ``scipy.signal.resample_poly`` by the integer ratio of samples per
frame (NaN gaps are bridged linearly for the filter, then put back, widened to the
output samples they cover). ``metadata["upsampled_channels"]`` names such channels.

Header comments become metadata (all kept as ``metadata["comments"]`` too):
``key: value`` lines (PTB: ``age: 81``, ``sex: female``) -> ``metadata[key.lower()]``,
with ``age`` as float and ``sex`` as "M"/"F"; MIMIC ``<age>: 71 <sex>: M``; MIT-BIH
``69 M ...``; Challenge 2015 ``#Asystole`` + ``#False alarm`` ->
``alarm_type`` = "Asystole", ``true_alarm`` = False. PTB's ``Reason for admission``
becomes ``Record.text``. Unknown values (``?``, ``??``, ``n/a``) are left out.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import wfdb
from scipy.signal import resample_poly

from csfm.data.leads import LeadMapping, record_from_channels, resolve_channels
from csfm.data.record import Record

_UNKNOWN = {"", "?", "??", "n/a", "na", "unknown"}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_ALARM = {"true alarm": True, "false alarm": False}
_KEY_VALUE = re.compile(r"^([^:<>]+?)\s*:\s*(.*)$")
_MIMIC_FIELD = re.compile(r"<(\w+)>:\s*(\S*)")
_MITBIH = re.compile(r"^(\d+)\s+([MF])\b")
_TEXT_KEY = "reason for admission"
GAP_SEGMENT = "~"  # segment name of a gap (multi-segment) / file name of a layout header's signals
_NUMBER = r"(?:\d+\.?\d*|\.\d+)"
_RECORD_NAME = re.compile(r"[-\w]+(?:/\d+)?")
_FS = re.compile(rf"{_NUMBER}(?:/-?{_NUMBER}(?:\(-?{_NUMBER}\))?)?")
_FORMAT = re.compile(r"(\d+)(?:x\d+)?(?::\d+)?(?:\+\d+)?")
_FORMATS = {"0", "8", "16", "24", "32", "61", "80", "160", "212", "310", "311", "508", "516", "524"}  # 0: null signal
_GAIN = re.compile(r"(?P<gain>[^(/]*)(?:\((?P<baseline>[^)]*)\))?(?:/(?P<units>.*))?")
_GAIN_NUMBER = re.compile(rf"-?{_NUMBER}(?:e[+-]?\d+)?")  # wfdb reads only a lower-case exponent
_INTEGER = re.compile(r"-?\d+")
_UNITS = re.compile(r"[\w^\-?%/]+")


def read_wfdb(path: str | Path, mapping: LeadMapping | None = None,
              start_s: float = 0.0, stop_s: float | None = None) -> Record:
    """Read a single-segment WFDB record, or the part of it in [start_s, stop_s) seconds.

    path: record path with or without ``.hea``. mapping: lead-contract overrides
    (csfm.data.leads). Returns a Record of the kept channels, signal [C, T] float32 in
    physical units at fs = frame rate x the highest samples per frame of the kept
    channels (Hz); T = frames read x that factor.
    Raises ValueError naming the header and field for a missing header or signal
    file, a header field that breaks the WFDB syntax (see read_header), a truncated or
    corrupt signal file, a zero-length record, fs <= 0, a multi-segment record (use
    csfm.data.readers.read_multisegment), or no usable channel.
    """
    record_path = record_base(path)
    header = read_header(record_path)
    hea = f"{record_path}.hea"
    if isinstance(header, wfdb.MultiRecord):
        raise ValueError(f"{hea}: multi-segment record (field n_seg={header.n_seg}): "
                         f"read it with csfm.data.readers.read_multisegment or stream_windows")
    kept, dropped = resolve_channels(header.sig_name, mapping, where=hea)
    channels = [index for index, _ in kept]
    out_spf = max(header.samps_per_frame[c] for c in channels)
    sampfrom, sampto = frame_range(header, start_s, stop_s, hea)
    signal = read_channels(record_path, header, channels, sampfrom, sampto, out_spf)
    metadata, text = parse_comments(header.comments)
    upsampled = [header.sig_name[c] for c in channels if header.samps_per_frame[c] != out_spf]
    if upsampled:
        metadata["upsampled_channels"] = upsampled
    return record_from_channels(
        signal, header.fs * out_spf, [header.sig_name[c] for c in channels],
        [header.units[c] for c in channels], [t for _, t in kept], dropped,
        text=text, record_id=header.record_name, metadata=metadata)


def record_base(path: str | Path) -> Path:
    """Record path without the ``.hea`` suffix (what wfdb.rdheader/rdrecord take)."""
    text = str(path)
    return Path(text[:-4] if text.endswith(".hea") else text)


def read_header(record_path: Path) -> wfdb.Record | wfdb.MultiRecord:
    """wfdb.rdheader with errors as ValueError naming the header and the field.

    wfdb's header parser accepts malformed fields silently (a non-numeric fs becomes its
    250 Hz default, ``2S0`` becomes 2 Hz, a non-numeric gain becomes 200 and shifts the
    units into the signal name), so the header text is first checked field by field
    against the WFDB header syntax (see _check_header_text). Then fs must be > 0. A signal
    without a description is named ``record NAME, signal K`` (K from 0), as the WFDB
    library names it, instead of None.
    """
    hea = Path(f"{record_path}.hea")
    try:
        text = hea.read_text(encoding="ascii", errors="ignore")  # as wfdb.rdheader reads it
    except FileNotFoundError as error:
        raise ValueError(f"{hea}: header file not found") from error
    except OSError as error:  # a folder, no permission, ...
        raise ValueError(f"{hea}: cannot read the header file: {error}") from error
    _check_header_text(text, str(hea))
    try:
        header = wfdb.rdheader(str(record_path))
    except Exception as error:  # wfdb raises HeaderSyntaxError, ValueError, IndexError, ...
        raise ValueError(f"{hea}: cannot parse header: {type(error).__name__}: {error}") from error
    if header.fs is None or not header.fs > 0:
        raise ValueError(f"{hea}: field fs (sampling frequency) must be > 0 Hz, got {header.fs}")
    if header.counter_freq is not None and not header.counter_freq > 0:
        raise ValueError(f"{hea}: field counter_freq must be > 0 Hz, got {header.counter_freq} "
                         f"(wfdb reads a negative fs as the counter frequency)")
    if isinstance(header, wfdb.Record) and header.sig_name is not None:
        header.sig_name = [_unnamed(header.record_name, k) if name is None else name
                           for k, name in enumerate(header.sig_name)]
    return header


def _unnamed(record_name: str, k: int) -> str:
    """The name of signal k when its header line has no description, as the WFDB library
    gives it; the lead contract does not know it, so the channel is dropped."""
    return f"record {record_name}, signal {k}"


def record_files(path: str | Path) -> list[Path]:
    """The files a WFDB record is read from: its header and the signal files it names, and
    for a multi-segment record also every segment's (and the layout's) header and signal
    files. Files that are named but absent are listed too (a missing segment header
    without its signal files); ValueError for a header of the record itself that cannot
    be read."""
    record_path = record_base(path)
    header = read_header(record_path)
    files = [Path(f"{record_path}.hea")]
    if isinstance(header, wfdb.MultiRecord):
        for name in dict.fromkeys(header.seg_name):
            segment = record_path.parent / name
            if name != GAP_SEGMENT and Path(f"{segment}.hea").is_file():
                files.extend(record_files(segment))
            elif name != GAP_SEGMENT:
                files.append(Path(f"{segment}.hea"))
    else:
        files.extend(record_path.parent / name for name in dict.fromkeys(header.file_name or []) if name != GAP_SEGMENT)
    return files


def _check_header_text(text: str, hea: str) -> None:
    """ValueError naming ``hea`` and the field for a header that breaks the WFDB syntax:

    record line ``NAME[/N_SEG] N_SIG FS[/COUNTER_FREQ[(BASE_COUNTER)]] [SIG_LEN ...]`` (fs may
    not be left out: wfdb would assume 250 Hz), then N_SIG signal lines ``FILE
    FORMAT[xSPF][:SKEW][+OFFSET] [ADC_GAIN[(BASELINE)][/UNITS] [ADC_RES ADC_ZERO INIT
    CHECKSUM BLOCK_SIZE [DESCRIPTION]]]`` (a description needs all five integers before it),
    or N_SEG segment lines ``NAME LENGTH``. Lines starting with ``#`` are comments.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ValueError(f"{hea}: no record line (empty header)")
    record = lines[0].split()
    where = f"{hea}: record line {lines[0]!r}"
    if not _RECORD_NAME.fullmatch(record[0]):
        raise ValueError(f"{where}: field record name [/n_seg] is {record[0]!r}, expected NAME or NAME/N_SEG")
    if len(record) < 2 or not record[1].isdigit():
        raise ValueError(f"{where}: field n_sig (number of signals) must be a whole number, got "
                         f"{record[1] if len(record) > 1 else 'nothing'!r}")
    if len(record) < 3:
        raise ValueError(f"{where}: field fs (sampling frequency) is absent (wfdb would assume 250 Hz); "
                         f"write the recorded rate in the header")
    if not _FS.fullmatch(record[2]):
        raise ValueError(f"{where}: field fs (sampling frequency) must be > 0 Hz, written as a number "
                         f"[/COUNTER_FREQ[(BASE_COUNTER)]], got {record[2]!r}")
    if len(record) > 3 and not record[3].isdigit():
        raise ValueError(f"{where}: field sig_len (samples per signal) must be a whole number, got {record[3]!r}")
    body = lines[1:]
    if "/" in record[0]:
        n_seg = int(record[0].split("/")[1])
        if len(body) != n_seg:
            raise ValueError(f"{where}: field n_seg is {n_seg} but the header has {len(body)} segment line(s)")
        for line in body:
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{hea}: segment line {line!r}: expected NAME LENGTH (field seg_len a whole number)")
        return
    if len(body) != int(record[1]):
        raise ValueError(f"{where}: field n_sig is {record[1]} but the header has {len(body)} signal line(s)")
    for k, line in enumerate(body):
        _check_signal_line(line.split(maxsplit=8), f"{hea}: signal line {k + 1} {line!r}")


def _check_signal_line(fields: list[str], where: str) -> None:
    """One signal line split into at most 9 fields (see _check_header_text)."""
    if len(fields) < 2:
        raise ValueError(f"{where}: expected at least FILE FORMAT")
    fmt = _FORMAT.fullmatch(fields[1])
    if fmt is None:
        raise ValueError(f"{where}: field fmt is {fields[1]!r}, expected FORMAT[xSAMPLES_PER_FRAME][:SKEW][+OFFSET]")
    if fmt.group(1) not in _FORMATS:
        raise ValueError(f"{where}: field fmt {fmt.group(1)} is not a signal format wfdb reads "
                         f"({', '.join(sorted(_FORMATS, key=int))})")
    if len(fields) > 2:
        gain = _GAIN.fullmatch(fields[2])
        if gain is None:
            raise ValueError(f"{where}: {fields[2]!r} is not ADC_GAIN[(BASELINE)][/UNITS]")
        for name, value, pattern, expected in (("adc_gain", gain["gain"], _GAIN_NUMBER, "a number (exponent: e)"),
                                               ("baseline", gain["baseline"], _INTEGER, "a whole number"),
                                               ("units", gain["units"], _UNITS, "letters, digits or ^-?%/")):
            if value is not None and not pattern.fullmatch(value):
                raise ValueError(f"{where}: field {name} is {value!r}, expected {expected}")
    for name, value in zip(("adc_res", "adc_zero", "init_value", "checksum", "block_size"), fields[3:8]):
        if not _INTEGER.fullmatch(value):
            raise ValueError(f"{where}: field {name} is {value!r}, expected a whole number (a description "
                             f"needs adc_res, adc_zero, init_value, checksum and block_size before it)")


def frame_range(header: wfdb.Record | wfdb.MultiRecord, start_s: float, stop_s: float | None,
                where: str) -> tuple[int, int | None]:
    """[start_s, stop_s) seconds as frame indices (sampfrom, sampto), clipped to sig_len.

    sampto is None when the header gives no length and stop_s is None (wfdb then
    reads to the end of the file). ValueError for a zero-length record or an empty range.
    """
    if header.sig_len == 0:
        raise ValueError(f"{where}: field sig_len is 0: zero-length record")
    sampfrom = int(round(start_s * header.fs))
    sampto = header.sig_len if stop_s is None else int(round(stop_s * header.fs))
    if header.sig_len is not None and sampto is not None:
        sampto = min(sampto, header.sig_len)
    if sampfrom < 0 or (sampto is not None and sampto <= sampfrom):
        raise ValueError(f"{where}: empty sample range: start_s={start_s}, stop_s={stop_s} give frames "
                         f"{sampfrom}..{sampto} of sig_len={header.sig_len} at fs={header.fs} Hz")
    return sampfrom, sampto


def read_channels(record_path: Path, header: wfdb.Record, channels: list[int], sampfrom: int,
                  sampto: int | None, out_spf: int) -> np.ndarray:
    """Physical samples of ``channels`` for frames [sampfrom, sampto), all at out_spf per frame.

    Returns [len(channels), frames * out_spf] float32 with NaN for invalid samples.
    Raises ValueError naming the header and the field ``file_name`` for a missing signal
    file, and naming ``sig_len`` when the file cannot supply the frames (truncated).
    """
    hea = f"{record_path}.hea"
    for c in channels:
        if not (record_path.parent / header.file_name[c]).is_file():
            raise ValueError(f"{hea}: field file_name of channel {header.sig_name[c]!r}: "
                             f"signal file {header.file_name[c]!r} not found in {record_path.parent}")
    try:
        record = wfdb.rdrecord(str(record_path), sampfrom=sampfrom, sampto=sampto, channels=channels,
                               physical=True, smooth_frames=False, return_res=32)
    except Exception as error:  # wfdb reports short files as broadcasting or index errors
        files = sorted({header.file_name[c] for c in channels})
        raise ValueError(f"{hea}: cannot read frames {sampfrom}..{sampto} (field sig_len={header.sig_len}) "
                         f"from {files}: truncated or corrupt signal file? ({type(error).__name__}: {error})"
                         ) from error
    frames = (sampto if sampto is not None else record.sig_len) - sampfrom
    if frames <= 0:
        raise ValueError(f"{hea}: field sig_len: no samples in the signal file (zero-length record)")
    rows = []
    for c, samples in zip(channels, record.e_p_signal):
        spf = header.samps_per_frame[c]
        if len(samples) != frames * spf:
            raise ValueError(f"{hea}: channel {header.sig_name[c]!r} gave {len(samples)} samples for "
                             f"{frames} frames x {spf} (field sig_len={header.sig_len}): truncated signal file?")
        rows.append(_resample_frames(np.asarray(samples, dtype=np.float32), spf, out_spf))
    return np.stack(rows)


def _resample_frames(x: np.ndarray, spf: int, out_spf: int) -> np.ndarray:
    """[n * spf] samples (n frames) -> [n * out_spf] by resample_poly(out_spf / spf), NaN kept.

    NaN runs are bridged by linear interpolation for the filter only; every output
    sample that falls in an invalid input sample's interval is NaN again.
    """
    if spf == out_spf:
        return x
    invalid = ~np.isfinite(x)
    if invalid.all():
        return np.full(len(x) * out_spf // spf, np.nan, dtype=np.float32)
    filled = x
    if invalid.any():
        where = np.arange(len(x))
        filled = np.interp(where, where[~invalid], x[~invalid]).astype(np.float32)
    gcd = np.gcd(spf, out_spf)
    y = resample_poly(filled, out_spf // gcd, spf // gcd, padtype="line").astype(np.float32)
    y[np.repeat(invalid, out_spf // gcd)[:: spf // gcd]] = np.nan
    return y


def parse_comments(comments: list[str]) -> tuple[dict[str, Any], str]:
    """Header comment lines -> (metadata, text); see the module docstring for the forms."""
    metadata: dict[str, Any] = {"comments": list(comments)} if comments else {}
    lines = [line.strip() for line in comments]
    for i, line in enumerate(lines):
        if line.lower() in _ALARM:
            metadata["true_alarm"] = _ALARM[line.lower()]
            if i > 0:
                metadata["alarm_type"] = lines[i - 1]
        elif _MIMIC_FIELD.search(line):
            for key, value in _MIMIC_FIELD.findall(line):
                _set_fact(metadata, key, value)
        elif match := _MITBIH.match(line):
            _set_fact(metadata, "age", match.group(1))
            _set_fact(metadata, "sex", match.group(2))
        elif match := _KEY_VALUE.match(line):
            _set_fact(metadata, match.group(1), match.group(2))
    return metadata, metadata.get(_TEXT_KEY, "")


def _set_fact(metadata: dict[str, Any], key: str, value: str) -> None:
    """metadata[key.lower()] = value, with age as float and sex as "M"/"F"; unknowns skipped."""
    key, value = key.strip().lower(), value.strip()
    if value.lower() in _UNKNOWN:
        return
    if key == "age":
        try:
            metadata[key] = float(value)
        except ValueError:
            return
    elif key in ("sex", "gender"):
        if value.lower() in _SEX:
            metadata["sex"] = _SEX[value.lower()]
    else:
        metadata[key] = value
