"""Read a DICOM ECG waveform object (12-lead, general or ambulatory ECG Waveform Storage) into a
Record, with pydicom.

The Record holds the ``WaveformSequence`` multiplex group labelled "RHYTHM" (without one: the
only group whose originality is ORIGINAL); a "MEDIAN BEAT" group goes into
``metadata["median_beats"]``. Samples are interleaved by channel ([T, C] in the file). Each
channel is scaled to mV from its own fields:

    value = (sample * ChannelSensitivity * ChannelSensitivityCorrectionFactor + ChannelBaseline)
            * (mV per ChannelSensitivityUnitsSequence UCUM unit: nV 1e-6, uV 0.001, mV 1, V 1000)

and samples equal to ``WaveformPaddingValue`` become NaN. Leads are named from the channel source
code (SCPECG ``5.6.3-9-n`` or MDC ``2:n``, n from ``csfm.data.leads.SCP_LEAD_CODES``), else from its
code meaning ("Lead I (Einthoven)" -> "I"); when both name a channel type they must agree.
``NumberOfWaveformSamples`` times the channels is checked against the bytes of ``WaveformData``
before anything is reshaped or allocated.

Text is the waveform annotations' unformatted statements joined with "; ".
"""
from __future__ import annotations

import re
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from csfm.data.leads import SCP_LEAD_CODES, LeadMapping, channel_type
from csfm.data.readers.safe_io import (MV_PER_UCUM_UNIT, FileFormatError, number, read_bytes, record_of,
                                       samples_from_bytes, sex_code, unit_factor)
from csfm.data.record import CHANNEL_TYPE_NAMES, PPG_TYPE, Record

FORMAT = "DICOM ECG"

ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG Waveform Storage",
}
_ECG_SOP_IN_HEAD = re.compile(rb"1\.2\.840\.10008\.5\.1\.4\.1\.1\.9\.1\.[123](?![0-9.])")
_MAGIC_OFFSET = 128
_RHYTHM, _MEDIAN = "RHYTHM", "MEDIAN BEAT"
# the lead number n (csfm.data.leads.SCP_LEAD_CODES) in the SCPECG code 5.6.3-9-n and the MDC code 2:n
_LEAD_CODE = {"SCPECG": re.compile(r"5\.6\.3-9-(\d+)"), "MDC": re.compile(r"2:(\d+)")}
_SAMPLE_TYPES = {("SS", 16): "i2", ("US", 16): "u2", ("SB", 8): "i1", ("UB", 8): "u1",
                 ("SL", 32): "i4", ("UL", 32): "u4"}
_BIG_ENDIAN_SYNTAX = "1.2.840.10008.1.2.2"
_PYDICOM_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, OSError,
                   struct.error, NotImplementedError)


def sniff(head: bytes) -> bool:
    """True when ``head`` (a file's first 4096 bytes) has "DICM" at byte 128 and names an ECG
    waveform SOP class (12-lead, general or ambulatory ECG Waveform Storage)."""
    return head[_MAGIC_OFFSET:_MAGIC_OFFSET + 4] == b"DICM" and _ECG_SOP_IN_HEAD.search(head[:4096]) is not None


def read_dicom_ecg(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """Read one DICOM ECG waveform file.

    Returns a Record: signal [C, T] float32 in mV from the RHYTHM group, fs in Hz from its
    SamplingFrequency, channel names as standard lead names (I, II, III, aVR, aVL, aVF, V1..V6),
    text from the annotation statements, patient_id from PatientID; the MEDIAN BEAT group, when
    present, as metadata["median_beats"] = {"fs": Hz, "leads": [...], "signal": [C, T] float32 mV}.
    mapping: lead-contract overrides (see csfm.data.leads.channel_type).
    Raises FileFormatError naming the file and the field for anything it cannot read, including a
    DICOM file without waveforms (an image).
    """
    dataset = _dataset(read_bytes(path, FORMAT), path)
    groups = _get(dataset, "WaveformSequence", "WaveformSequence", path, required=False)
    if not groups:
        sop = str(_get(dataset, "SOPClassUID", "SOPClassUID", path, required=False) or "")
        raise FileFormatError(path, FORMAT, "WaveformSequence", f"no waveform in this DICOM object (SOP class "
                              f"{sop or 'unknown'}: {_sop_name(sop)})")
    labels = [str(_get(group, "MultiplexGroupLabel", f"WaveformSequence[{i}].MultiplexGroupLabel", path,
                       required=False) or "").strip().upper() for i, group in enumerate(groups)]
    rhythm = _rhythm_index(groups, labels, path)
    fs, names, signal = _decode_group(groups[rhythm], f"WaveformSequence[{rhythm}]", path)
    metadata: dict[str, Any] = _facts(dataset, path)
    if _MEDIAN in labels:
        median = labels.index(_MEDIAN)
        median_fs, median_names, median_signal = _decode_group(groups[median], f"WaveformSequence[{median}]", path)
        metadata["median_beats"] = {"fs": median_fs, "leads": median_names,
                                    "signal": median_signal.astype(np.float32)}
    return record_of(path, FORMAT, f"WaveformSequence[{rhythm}].ChannelSourceSequence", signal, fs, names, mapping,
                     metadata=metadata, text=_statements(dataset, path),
                     patient_id=str(_get(dataset, "PatientID", "PatientID", path, required=False) or "").strip())


# ---------------------------------------------------------------- dataset access
def _dataset(data: bytes, path: str | Path) -> Any:
    """The pydicom Dataset of ``data``; FileFormatError when it is not DICOM, cannot be parsed or
    is in the retired big-endian transfer syntax (whose OW byte order writers do not agree on)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        dataset = dcmread(BytesIO(data))
    except InvalidDicomError as exc:
        raise FileFormatError(path, FORMAT, "preamble", f"not a DICOM file ({exc})") from exc
    except _PYDICOM_ERRORS as exc:
        raise FileFormatError(path, FORMAT, "dataset", f"cannot be parsed ({type(exc).__name__}: {exc})") from exc
    if str(getattr(dataset.file_meta, "TransferSyntaxUID", "")) == _BIG_ENDIAN_SYNTAX:
        raise FileFormatError(path, FORMAT, "TransferSyntaxUID", "Explicit VR Big Endian (retired) is not read")
    return dataset


def _get(item: Any, keyword: str, field: str, path: str | Path, required: bool = True) -> Any:
    """``item.keyword`` (None when absent and not required); FileFormatError naming ``field`` when
    pydicom cannot convert the stored value, or when a required element is absent or empty."""
    try:
        value = item.get(keyword)
    except _PYDICOM_ERRORS as exc:
        raise FileFormatError(path, FORMAT, field, f"unreadable value ({type(exc).__name__}: {exc})") from exc
    if required and (value is None or value == ""):
        raise FileFormatError(path, FORMAT, field, "required element is missing or empty")
    return value


def _number(item: Any, keyword: str, field: str, path: str | Path, positive: bool = False,
            default: float | None = None) -> float:
    """A numeric element as float (``default`` when absent); FileFormatError when not numeric."""
    value = _get(item, keyword, field, path, required=default is None)
    if value is None or value == "":
        return float(default)
    return number(str(value), path, FORMAT, field, positive=positive)


def _sop_name(uid: str) -> str:
    """A SOP class UID's name: the ECG ones listed here, others from pydicom's UID dictionary."""
    if uid in ECG_SOP_CLASSES:
        return ECG_SOP_CLASSES[uid]
    from pydicom.uid import UID

    return UID(uid).name if uid else "no SOP class"


# ---------------------------------------------------------------- waveform groups
def _rhythm_index(groups: Any, labels: list[str], path: str | Path) -> int:
    """Index of the RHYTHM group; without that label, of the only ORIGINAL group."""
    if _RHYTHM in labels:
        return labels.index(_RHYTHM)
    original = [i for i, group in enumerate(groups)
                if str(_get(group, "WaveformOriginality", f"WaveformSequence[{i}].WaveformOriginality", path,
                            required=False) or "").strip().upper() == "ORIGINAL"]
    if len(original) != 1:
        raise FileFormatError(path, FORMAT, "WaveformSequence.MultiplexGroupLabel",
                              f"no group labelled {_RHYTHM!r} and {len(original)} ORIGINAL groups "
                              f"(labels {labels}); cannot tell which is the rhythm strip")
    return original[0]


def _decode_group(group: Any, where: str, path: str | Path) -> tuple[float, list[str], np.ndarray]:
    """One multiplex group -> (fs in Hz, lead names, signal [C, T] float64 in mV, NaN where padded)."""
    fs = _number(group, "SamplingFrequency", f"{where}.SamplingFrequency", path, positive=True)
    channels = int(_number(group, "NumberOfWaveformChannels", f"{where}.NumberOfWaveformChannels", path,
                           positive=True))
    samples = int(_number(group, "NumberOfWaveformSamples", f"{where}.NumberOfWaveformSamples", path,
                          positive=True))
    definitions = _get(group, "ChannelDefinitionSequence", f"{where}.ChannelDefinitionSequence", path)
    if len(definitions) != channels:
        raise FileFormatError(path, FORMAT, f"{where}.NumberOfWaveformChannels",
                              f"states {channels} channels but ChannelDefinitionSequence defines {len(definitions)}")
    interpretation = str(_get(group, "WaveformSampleInterpretation", f"{where}.WaveformSampleInterpretation",
                              path)).strip()
    bits = int(_number(group, "WaveformBitsAllocated", f"{where}.WaveformBitsAllocated", path, positive=True))
    if (interpretation, bits) not in _SAMPLE_TYPES:
        raise FileFormatError(path, FORMAT, f"{where}.WaveformSampleInterpretation",
                              f"{interpretation!r} with {bits} bits allocated is not read; expected one of "
                              f"{sorted(_SAMPLE_TYPES)}")
    dtype = "<" + _SAMPLE_TYPES[interpretation, bits]
    raw = _get(group, "WaveformData", f"{where}.WaveformData", path)
    flat = samples_from_bytes(raw, dtype, samples * channels, path, FORMAT,
                              f"{where}.NumberOfWaveformSamples x NumberOfWaveformChannels")
    counts = flat.reshape(samples, channels).T.astype(np.float64)
    padding = _get(group, "WaveformPaddingValue", f"{where}.WaveformPaddingValue", path, required=False)
    if padding:
        pad_value = samples_from_bytes(padding, dtype, 1, path, FORMAT, f"{where}.WaveformPaddingValue")[0]
        counts[counts == pad_value] = np.nan
    names, scales, offsets = [], [], []
    for index, definition in enumerate(definitions):
        field = f"{where}.ChannelDefinitionSequence[{index}]"
        names.append(_lead_name(definition, field, path))
        scale, offset = _channel_scale(definition, field, path)
        scales.append(scale)
        offsets.append(offset)
    signal = counts * np.array(scales)[:, None] + np.array(offsets)[:, None]
    return fs, names, signal


def _channel_scale(definition: Any, field: str, path: str | Path) -> tuple[float, float]:
    """(mV per count, mV offset) of one channel from sensitivity, correction factor, baseline
    and the sensitivity units."""
    sensitivity = _number(definition, "ChannelSensitivity", f"{field}.ChannelSensitivity", path)
    correction = _number(definition, "ChannelSensitivityCorrectionFactor",
                         f"{field}.ChannelSensitivityCorrectionFactor", path, default=1.0)
    baseline = _number(definition, "ChannelBaseline", f"{field}.ChannelBaseline", path, default=0.0)
    units = _get(definition, "ChannelSensitivityUnitsSequence", f"{field}.ChannelSensitivityUnitsSequence", path)
    where = f"{field}.ChannelSensitivityUnitsSequence[0].CodeValue"
    to_mv = unit_factor(str(_get(units[0], "CodeValue", where, path)).strip(), MV_PER_UCUM_UNIT, path, FORMAT, where)
    return sensitivity * correction * to_mv, baseline * to_mv


def _lead_name(definition: Any, field: str, path: str | Path) -> str:
    """The channel's lead name from its source code and code meaning (see the module doc)."""
    field = f"{field}.ChannelSourceSequence[0]"
    sources = _get(definition, "ChannelSourceSequence", field, path)
    source = sources[0]
    scheme = str(_get(source, "CodingSchemeDesignator", f"{field}.CodingSchemeDesignator", path,
                      required=False) or "").strip()
    code = str(_get(source, "CodeValue", f"{field}.CodeValue", path, required=False) or "").strip()
    meaning = str(_get(source, "CodeMeaning", f"{field}.CodeMeaning", path, required=False) or "").strip()
    pattern = _LEAD_CODE.get(scheme)
    match = pattern.fullmatch(code) if pattern else None
    by_code = SCP_LEAD_CODES.get(int(match.group(1))) if match else None
    by_meaning = re.sub(r"\s*\([^)]*\)", "", meaning).strip()
    meaning_type = channel_type(by_meaning) if by_meaning else None
    if by_code is None:
        if not by_meaning:
            raise FileFormatError(path, FORMAT, field, f"neither a known lead code ({scheme} {code!r}) nor a "
                                  "code meaning")
        is_lead = meaning_type is not None and meaning_type != PPG_TYPE
        return CHANNEL_TYPE_NAMES[meaning_type] if is_lead else by_meaning
    code_type = channel_type(by_code)
    if code_type is not None and meaning_type is not None and code_type != meaning_type:
        raise FileFormatError(path, FORMAT, field, f"code {scheme} {code} is lead {by_code} but the code meaning "
                              f"{meaning!r} says {CHANNEL_TYPE_NAMES[meaning_type]}")
    return by_code


# ---------------------------------------------------------------- text and metadata
def _statements(dataset: Any, path: str | Path) -> str:
    """The unformatted text values of WaveformAnnotationSequence joined with "; "."""
    annotations = _get(dataset, "WaveformAnnotationSequence", "WaveformAnnotationSequence", path, required=False)
    texts = [str(_get(item, "UnformattedTextValue", f"WaveformAnnotationSequence[{i}].UnformattedTextValue",
                      path, required=False) or "").strip() for i, item in enumerate(annotations or [])]
    return "; ".join(text for text in texts if text)


def _facts(dataset: Any, path: str | Path) -> dict[str, Any]:
    """device, acquired (ISO date-time), sop_class, age (years), sex where the file has them."""
    def text(keyword: str) -> str:
        return str(_get(dataset, keyword, keyword, path, required=False) or "").strip()

    facts: dict[str, Any] = {}
    device = " ".join(part for part in (text("Manufacturer"), text("ManufacturerModelName")) if part)
    if device:
        facts["device"] = device
    stamp = text("AcquisitionDateTime") or text("AcquisitionDate") + text("AcquisitionTime")
    if match := re.match(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})?(\d{2})?)?", stamp):
        year, month, day, hour, minute, second = match.groups()
        facts["acquired"] = f"{year}-{month}-{day}" + (f"T{hour}:{minute or '00'}:{second or '00'}" if hour else "")
    if sop := text("SOPClassUID"):
        facts["sop_class"] = _sop_name(sop)
    if age := re.fullmatch(r"(\d{3})Y", text("PatientAge")):
        facts["age"] = float(age.group(1))
    if sex := sex_code(text("PatientSex")):
        facts["sex"] = sex
    return facts
