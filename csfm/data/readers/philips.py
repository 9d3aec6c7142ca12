"""Read a Philips resting-ECG XML export (``<restingecgdata>``, SierraECG 1.03 / PhilipsECG 1.04)
into a Record.

The rhythm strip is ``waveforms/parsedwaveforms``: base64 text holding one XLI block per stored
channel. A block is an 8-byte header (int32 LE compressed size, 2 bytes, int16 LE first sample)
followed by 10-bit LZW codes whose output is the channel's second differences, high bytes first
then low bytes. The LZW and difference decoding is ``sierraecg.xli`` (sierraecg 0.4.0); the block
walk is done here, so that every header is checked against the bytes present and a block never
decodes to more than the samples ``durationperchannel`` states.

XLI stores leads III, aVR, aVL and aVF as residuals of the values the cart derives from I and II;
they are rebuilt here with integer division truncated toward zero, as the cart and the reference
C# decoder compute them:

    III = II - I - r3        aVR = -r4 - (I + II) / 2
    aVL = (I - III) / 2 - r5 aVF = (II + III) / 2 - r6

(``sierraecg.read_file`` floors the halves instead, which puts aVL and aVF one count low on every
sample where the sum is negative and odd.) Counts are scaled by the file's resolution in uV to mV.

The carts end the strip with a calibration tail: every lead flat at 0, a 1 mV square pulse, then 0
again. That tail is cut off (its start and the pulse height go into metadata) so the Record holds
ECG only; ``metadata["stored_duration_s"]`` keeps the length the file states.

Text is the interpretation's statements, ``left, right`` per statement, joined with "; ".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import numpy as np

from csfm.data.leads import LeadMapping
from csfm.data.readers.safe_io import (FileFormatError, check_count, decode_base64, number, parse_xml, record_of,
                                       sex_code, xml_root_name)
from csfm.data.record import Record

FORMAT = "Philips XML"

_ROOT = "restingecgdata"
_LIMB_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF"]
_STANDARD_12 = _LIMB_LEADS + [f"V{k}" for k in range(1, 7)]
_TWELVE_LEAD_ACQUISITIONS = {"STD-12", "10-WIRE"}  # acquisitiontype values that store the 12 leads in order
_XLI_HEADER = 8
_LZW_BITS = 10
# One 10-bit code yields at most 768 bytes (the longest string a 1023-code table can hold), so
# a block of n bytes cannot decode to more than 768 * 8 / 10 * n bytes.
_LZW_MAX_BYTES_PER_BYTE = 615


def sniff(head: bytes) -> bool:
    """True when ``head`` (a file's first 4096 bytes) is XML whose root element is
    ``restingecgdata``; UTF-8 and UTF-16 (with or without a byte-order mark) are recognised."""
    return xml_root_name(head) == _ROOT


def read_philips(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """Read one Philips XML file.

    Returns a Record: signal [C, T] float32 in mV (the rhythm strip without the calibration tail),
    fs in Hz from ``samplingrate``, channel names as the file labels them (I, II, III, aVR, aVL,
    aVF, V1..V6), text from the interpretation statements, patient_id from ``patientid``.
    mapping: lead-contract overrides (see csfm.data.leads.channel_type).
    Raises FileFormatError naming the file and the field for anything it cannot read.
    """
    root = parse_xml(path, FORMAT)
    if _local(root.tag) != _ROOT:
        raise FileFormatError(path, FORMAT, "root element", f"is <{_local(root.tag)}>, expected <{_ROOT}>")
    signal_info = _require(root, "dataacquisition/signalcharacteristics", path)
    waves = _require(root, "waveforms/parsedwaveforms", path)
    fs = _sampling_rate(signal_info, waves, path)
    resolution_uv = _resolution(signal_info, waves, path)
    names = _lead_labels(signal_info, waves, path)
    duration_ms = number(waves.get("durationperchannel"), path, FORMAT, "parsedwaveforms@durationperchannel",
                         positive=True)
    samples = duration_ms * fs / 1000
    if samples != round(samples):
        raise FileFormatError(path, FORMAT, "parsedwaveforms@durationperchannel",
                              f"{duration_ms} ms at {fs} Hz is not a whole number of samples")
    if names[:6] != _LIMB_LEADS:
        raise FileFormatError(path, FORMAT, "lead labels", f"XLI stores III, aVR, aVL, aVF as residuals of "
                              f"I and II; the labels {names[:6]} do not start with {_LIMB_LEADS}")
    counts = _decode_waveforms(waves, len(names), int(samples), path)
    counts = _rebuild_limb_leads(counts)
    counts, tail = _cut_calibration_tail(counts)
    signal = counts.astype(np.float32) * np.float32(resolution_uv / 1000.0)
    metadata: dict[str, Any] = {"format_version": _text(root, "documentinfo/documentversion"),
                                "resolution_uV": resolution_uv, "stored_duration_s": int(samples) / fs}
    if tail is not None:
        metadata["calibration_tail_start_s"] = tail[0] / fs
        metadata["calibration_pulse_mV"] = tail[1] * resolution_uv / 1000.0
    metadata.update(_facts(root))
    return record_of(path, FORMAT, "lead labels", signal, fs, names, mapping, metadata=metadata,
                     patient_id=_text(root, "patient/generalpatientdata/patientid"), text=_statements(root))


# ---------------------------------------------------------------- XML helpers
def _local(tag: str) -> str:
    """An element's name without its ``{namespace}``."""
    return tag.rpartition("}")[2]


def _path(relative: str) -> str:
    """An ElementTree path matching each step in any namespace: ``a/b`` -> ``{*}a/{*}b``."""
    return "/".join(f"{{*}}{step}" for step in relative.split("/"))


def _require(root: Element, relative: str, path: str | Path) -> Element:
    """The element at ``relative`` under root; FileFormatError naming it when absent."""
    element = root.find(_path(relative))
    if element is None:
        raise FileFormatError(path, FORMAT, relative, "required element is missing")
    return element


def _text(root: Element, relative: str) -> str:
    """The stripped text at ``relative`` under root, "" when absent or empty."""
    element = root.find(_path(relative))
    return (element.text or "").strip() if element is not None else ""


# ---------------------------------------------------------------- signal characteristics
def _agreeing(values: list[tuple[str, str | None]], path: str | Path) -> float:
    """The one positive number that several fields state (absent ones skipped); FileFormatError
    when none is present, one is not a positive number, or two disagree."""
    present = [(field, number(text, path, FORMAT, field, positive=True))
               for field, text in values if text is not None]
    if not present:
        raise FileFormatError(path, FORMAT, " or ".join(field for field, _ in values), "required field is missing")
    if len({value for _, value in present}) > 1:
        raise FileFormatError(path, FORMAT, " and ".join(field for field, _ in present),
                              f"disagree: {', '.join(f'{field}={value:g}' for field, value in present)}")
    return present[0][1]


def _child_text(element: Element, name: str) -> str | None:
    """Text of ``element``'s child ``name`` (any namespace), None when the child is absent."""
    child = element.find(f"{{*}}{name}")
    return None if child is None else (child.text or "")


def _sampling_rate(signal_info: Element, waves: Element, path: str | Path) -> float:
    """Samples per second, from ``samplingrate`` and ``parsedwaveforms@samplespersecond``."""
    return _agreeing([("signalcharacteristics/samplingrate", _child_text(signal_info, "samplingrate")),
                      ("parsedwaveforms@samplespersecond", waves.get("samplespersecond"))], path)


def _resolution(signal_info: Element, waves: Element, path: str | Path) -> float:
    """uV per count: ``signalresolution`` (1.03), ``resolution`` (1.04) and
    ``parsedwaveforms@resolution``; a non-zero ``signaloffset`` is refused (no verified meaning)."""
    offsets = [("signalcharacteristics/signaloffset", _child_text(signal_info, "signaloffset")),
               ("parsedwaveforms@signaloffset", waves.get("signaloffset"))]
    for field, text in offsets:
        if text is not None and number(text, path, FORMAT, field) != 0:
            raise FileFormatError(path, FORMAT, field, f"is {text!r}; only 0 is read")
    return _agreeing([("signalcharacteristics/signalresolution", _child_text(signal_info, "signalresolution")),
                      ("signalcharacteristics/resolution", _child_text(signal_info, "resolution")),
                      ("parsedwaveforms@resolution", waves.get("resolution"))], path)


def _lead_labels(signal_info: Element, waves: Element, path: str | Path) -> list[str]:
    """The stored channels' names: ``parsedwaveforms@leadlabels`` cut to ``@numberofleads`` (1.04),
    else the standard 12 when ``acquisitiontype`` is STD-12 or 10-WIRE and
    ``numberchannelsallocated`` is 12 (1.03)."""
    labels = waves.get("leadlabels")
    if labels is not None:
        names = labels.split()
        count = int(number(waves.get("numberofleads"), path, FORMAT, "parsedwaveforms@numberofleads",
                           positive=True))
        check_count(count, len(names), path, FORMAT, "parsedwaveforms@numberofleads", "leads with labels")
        return names[:count]
    acquisition = (_child_text(signal_info, "acquisitiontype") or "").strip()
    if acquisition not in _TWELVE_LEAD_ACQUISITIONS:
        raise FileFormatError(path, FORMAT, "signalcharacteristics/acquisitiontype",
                              f"is {acquisition!r} and parsedwaveforms has no leadlabels; lead names are known "
                              f"only for {sorted(_TWELVE_LEAD_ACQUISITIONS)}")
    field = "signalcharacteristics/numberchannelsallocated"
    count = number(_child_text(signal_info, "numberchannelsallocated"), path, FORMAT, field, positive=True)
    if count != len(_STANDARD_12):
        raise FileFormatError(path, FORMAT, field, f"is {count:g} for acquisition type {acquisition}, expected 12")
    return list(_STANDARD_12)


# ---------------------------------------------------------------- waveform decoding
def _decode_waveforms(waves: Element, channels: int, samples: int, path: str | Path) -> np.ndarray:
    """The first ``channels`` XLI blocks of parsedwaveforms as counts: [channels, samples] int32
    (III..aVF still residuals). Every header is checked against the bytes present before a
    block is decoded, and no block decodes past ``samples``."""
    field = "parsedwaveforms"
    encoding, compression = waves.get("dataencoding"), waves.get("compressmethod", waves.get("compression"))
    if encoding != "Base64":
        raise FileFormatError(path, FORMAT, f"{field}@dataencoding", f"is {encoding!r}; only 'Base64' is read")
    if compression != "XLI":
        raise FileFormatError(path, FORMAT, f"{field}@compressmethod",
                              f"is {compression!r}; only XLI-compressed waveforms are read")
    raw = decode_base64(waves.text, path, FORMAT, field)
    if samples < 2:
        raise FileFormatError(path, FORMAT, f"{field}@durationperchannel", f"gives {samples} samples; XLI needs 2")
    blocks = _xli_blocks(raw, channels, path)
    check_count(channels, len(blocks), path, FORMAT, f"{field} (XLI blocks)", "channels")
    smallest = min(len(block) for block, _ in blocks)
    check_count(2 * samples, _LZW_MAX_BYTES_PER_BYTE * smallest, path, FORMAT, f"{field}@durationperchannel",
                "bytes per channel (2 per sample) at most")
    return np.stack([_decode_block(block, first, samples, index, path)
                     for index, (block, first) in enumerate(blocks)])


def _xli_blocks(raw: bytes, channels: int, path: str | Path) -> list[tuple[bytes, int]]:
    """The first ``channels`` XLI blocks of ``raw`` as (LZW bytes, first sample); fewer when raw
    ends cleanly before that. FileFormatError for a header that runs past the data."""
    blocks: list[tuple[bytes, int]] = []
    offset = 0
    while len(blocks) < channels and offset < len(raw):
        where = f"parsedwaveforms (XLI block {len(blocks)} at byte {offset})"
        if len(raw) - offset < _XLI_HEADER:
            raise FileFormatError(path, FORMAT, where, f"{len(raw) - offset} bytes left, less than the "
                                  f"{_XLI_HEADER}-byte block header: truncated?")
        size = int.from_bytes(raw[offset:offset + 4], "little", signed=True)
        first = int.from_bytes(raw[offset + 6:offset + 8], "little", signed=True)
        offset += _XLI_HEADER
        if not 0 < size <= len(raw) - offset:
            raise FileFormatError(path, FORMAT, where, f"header states {size} compressed bytes but "
                                  f"{len(raw) - offset} follow: truncated or corrupt block")
        blocks.append((raw[offset:offset + size], first))
        offset += size
    return blocks


def _decode_block(block: bytes, first: int, samples: int, index: int, path: str | Path) -> np.ndarray:
    """One XLI block -> [samples] int32 counts, using sierraecg's LZW decoder and difference
    decoding; FileFormatError when it holds more or fewer samples than stated."""
    from sierraecg.lzw import LzwDecoder
    from sierraecg.xli import xli_decode_deltas

    where = f"parsedwaveforms (XLI block {index})"
    decoder = LzwDecoder(block, bits=_LZW_BITS)
    wanted = 2 * samples
    buffer: list[int] = []
    try:
        while len(buffer) <= wanted and (byte := decoder.read()) != -1:
            buffer.append(byte)
    except (IndexError, KeyError) as exc:
        raise FileFormatError(path, FORMAT, where, f"corrupt LZW data ({type(exc).__name__})") from exc
    if len(buffer) != wanted:
        got = "more than" if len(buffer) > wanted else f"{len(buffer) // 2} samples for"
        raise FileFormatError(path, FORMAT, where, f"decodes to {got} the {samples} that durationperchannel "
                              "states: truncated or corrupt block?")
    try:
        return xli_decode_deltas(buffer, first).astype(np.int32)
    except OverflowError as exc:
        raise FileFormatError(path, FORMAT, where, f"samples leave the 16-bit range ({exc}): corrupt block") from exc


def _rebuild_limb_leads(counts: np.ndarray) -> np.ndarray:
    """[C, T] int32 counts with rows 2..5 (III, aVR, aVL, aVF) rebuilt from their residuals and
    leads I, II; halves truncate toward zero (see the module doc)."""
    def half(x: np.ndarray) -> np.ndarray:
        return np.trunc(x / 2).astype(np.int32)

    out = counts.copy()
    lead_i, lead_ii = counts[0], counts[1]
    out[2] = lead_ii - lead_i - counts[2]
    out[3] = -counts[3] - half(lead_i + lead_ii)
    out[4] = half(lead_i - out[2]) - counts[4]
    out[5] = half(lead_ii + out[2]) - counts[5]
    return out


def _cut_calibration_tail(counts: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(counts without the calibration tail, (tail start sample, pulse height in counts)), or
    (counts, None) without one. The tail is the longest final run of samples on which every
    channel holds the same value, when it contains a non-zero pulse and is not the whole record."""
    if counts.shape[0] < 2:
        return counts, None
    differs = np.nonzero(np.any(counts != counts[0], axis=0))[0]
    start = int(differs[-1]) + 1 if len(differs) else 0
    pulse = counts[0, start:]
    if start == 0 or not pulse.any():
        return counts, None
    values, frequency = np.unique(pulse[pulse != 0], return_counts=True)
    return counts[:, :start], (start, int(values[np.argmax(frequency)]))


# ---------------------------------------------------------------- text and metadata
def _statements(root: Element) -> str:
    """The first interpretation's statements, ``left, right`` each, joined with "; "."""
    interpretation = root.find(_path("interpretations/interpretation"))
    if interpretation is None:
        interpretation = root.find(_path("interpretation"))
    if interpretation is None:
        return ""
    parts = []
    for statement in interpretation.findall(_path("statement")):
        words = [_text(statement, name) for name in ("leftstatement", "rightstatement")]
        if any(words):
            parts.append(", ".join(word for word in words if word))
    return "; ".join(parts)


def _facts(root: Element) -> dict[str, Any]:
    """device, acquired (ISO date-time), acquisition_type, severity, age, sex where the file has them."""
    facts: dict[str, Any] = {}
    acquisition = root.find(_path("dataacquisition"))
    if acquisition is not None:
        if device := _text(acquisition, "machine"):
            facts["device"] = device
        if acquisition.get("date"):
            facts["acquired"] = f"{acquisition.get('date')}T{acquisition.get('time', '00:00:00')}"
    for key, relative in (("acquisition_type", "dataacquisition/signalcharacteristics/acquisitiontype"),
                          ("severity", "interpretations/interpretation/severity")):
        if value := _text(root, relative):
            facts[key] = value
    years = _text(root, "patient/generalpatientdata/age/years")
    if re.fullmatch(r"\d+(\.\d+)?", years):
        facts["age"] = float(years)
    sex = sex_code(_text(root, "patient/generalpatientdata/sex"))
    if sex:
        facts["sex"] = sex
    return facts
