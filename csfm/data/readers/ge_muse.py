"""Read a GE MUSE XML resting-ECG export (root element ``<RestingECG>``) into a Record.

A MUSE file holds ``<Waveform>`` blocks, one per ``<WaveformType>``: "Rhythm" (the full
strip, read as the signal) and "Median" (the representative beat, kept in
``metadata["median_beats"]``). Each ``<LeadData>`` of a waveform carries

    LeadID                   "I", "II", "V1", ...
    LeadSampleCountTotal     samples in the lead
    LeadAmplitudeUnitsPerBit physical units per stored integer (e.g. 4.88)
    LeadAmplitudeUnits       MICROVOLTS (also read: MILLIVOLTS, NANOVOLTS, VOLTS)
    LeadSampleSize           bytes per sample: 2
    LeadDataCRC32            CRC-32 of the decoded bytes (checked when present)
    WaveFormData             base64 of little-endian int16 samples

and the waveform's ``SampleBase`` and ``SampleExponent`` give fs = base * 10**exponent Hz.

MUSE stores 8 independent leads (I, II, V1..V6). The other limb leads are derived by
``csfm.data.leads.derive_limb_leads`` when the file does not store them (listed in
``metadata["derived_leads"]``), and leads are returned in the standard order I, II, III,
aVR, aVL, aVF, V1..V6 (``csfm.data.leads.standard_order``).

Report text: ``Diagnosis/DiagnosisStatement`` entries are fragments of lines; a fragment
whose ``StmtFlag`` is ENDSLINE ends its line. Fragments are joined into lines with spaces
and the lines with "; " (the machine's unedited statements, ``OriginalDiagnosis``, are not
read). Metadata: "device" (``AcquisitionDevice``), "acquired" (ISO date-time from
``AcquisitionDate`` MM-DD-YYYY and ``AcquisitionTime``, left out when they do not parse),
"age" (years), "sex" ("M"/"F"), "muse_version".
"""
from __future__ import annotations

import zlib
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import numpy as np

from csfm.data.leads import LeadMapping, derive_limb_leads, standard_order
from csfm.data.readers.safe_io import (FileFormatError, decode_base64, number, parse_xml, record_of,
                                       samples_from_bytes, sex_code, unit_factor, xml_root_name)
from csfm.data.record import Record

FORMAT = "GE MUSE XML"
_ROOT = "RestingECG"
# mV per MUSE LeadAmplitudeUnits word (read in upper case)
_MV_PER_UNIT = {"MICROVOLTS": 1e-3, "MILLIVOLTS": 1.0, "NANOVOLTS": 1e-6, "VOLTS": 1e3}
_SAMPLE_BYTES = 2  # int16
_MAX_EXPONENT = 6  # fs = SampleBase * 10**SampleExponent; beyond 10**±6 it is no sampling rate


def sniff(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) is XML whose root element is <RestingECG>."""
    return xml_root_name(head) == _ROOT


def read_ge_muse(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """Read the Rhythm waveform of a GE MUSE XML file.

    path: the .xml file. mapping: lead-contract overrides (csfm.data.leads).
    Returns a Record: signal [C, T] float32 in mV at fs = SampleBase * 10**SampleExponent Hz,
    leads in standard order with III, aVR, aVL, aVF derived from I and II where not stored;
    metadata["median_beats"] = {"fs": Hz, "leads": [...], "signal": [C, T'] float32 mV} when
    the file has a Median waveform (derived and ordered the same way).
    Raises FileFormatError naming the file and field for unsafe or malformed XML, another
    root element, no Rhythm waveform, a missing or non-numeric field, unknown amplitude
    units, a sample count the data does not hold, a bad CRC-32, leads of unequal length or
    no lead the lead contract (with ``mapping``) can use.
    """
    root = parse_xml(path, FORMAT)
    if root.tag != _ROOT:
        raise FileFormatError(path, FORMAT, "root element", f"is <{root.tag}>, expected <{_ROOT}>")
    rhythm = _waveform(root, "Rhythm")
    if rhythm is None:
        raise FileFormatError(path, FORMAT, "Waveform[WaveformType=Rhythm]",
                              "absent: the file holds no rhythm strip (only the median beat is not read as signal)")
    fs, leads = _read_waveform(rhythm, "Rhythm", path)
    leads, derived = _twelve_leads(leads)
    metadata: dict[str, Any] = {"derived_leads": derived, **_facts(root)}
    median = _waveform(root, "Median")
    if median is not None:
        median_fs, beats = _read_waveform(median, "Median", path)
        beats = _twelve_leads(beats)[0]
        metadata["median_beats"] = {"fs": median_fs, "leads": list(beats),
                                    "signal": np.stack(list(beats.values())).astype(np.float32)}
    return record_of(path, FORMAT, "Waveform[Rhythm]/LeadData/LeadID", np.stack(list(leads.values())), fs,
                     list(leads), mapping, metadata=metadata,
                     patient_id=(root.findtext("PatientDemographics/PatientID") or "").strip(),
                     text="; ".join(_statement_lines(root.find("Diagnosis"))))


def _twelve_leads(leads: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(``leads`` with III, aVR, aVL, aVF derived where absent, in standard order; names derived)."""
    signal, names, derived = derive_limb_leads(np.stack(list(leads.values())), list(leads))
    return standard_order(dict(zip(names, signal))), derived


def _waveform(root: Element, kind: str) -> Element | None:
    """The first <Waveform> whose <WaveformType> is ``kind`` (case-insensitive)."""
    for waveform in root.findall("Waveform"):
        if (waveform.findtext("WaveformType") or "").strip().lower() == kind.lower():
            return waveform
    return None


def _read_waveform(waveform: Element, kind: str, path: str | Path) -> tuple[float, dict[str, np.ndarray]]:
    """(fs in Hz, lead name -> [T] float64 mV) of one <Waveform>, every field checked."""
    where = f"Waveform[{kind}]"
    base = number(waveform.findtext("SampleBase"), path, FORMAT, f"{where}/SampleBase", positive=True)
    exponent = _integer(waveform.findtext("SampleExponent") or "0", path, f"{where}/SampleExponent")
    if abs(exponent) > _MAX_EXPONENT:
        raise FileFormatError(path, FORMAT, f"{where}/SampleExponent",
                              f"is {exponent}: fs = SampleBase * 10**exponent needs |exponent| <= {_MAX_EXPONENT}")
    fs = base * 10.0 ** exponent
    blocks = waveform.findall("LeadData")
    if not blocks:
        raise FileFormatError(path, FORMAT, f"{where}/LeadData", "absent: the waveform holds no lead")
    leads: dict[str, np.ndarray] = {}
    for k, block in enumerate(blocks):
        name = (block.findtext("LeadID") or "").strip()
        if not name:
            raise FileFormatError(path, FORMAT, f"{where}/LeadData[{k}]/LeadID", "absent or empty")
        field = f"{where}/LeadData[{name}]"
        if name in leads:
            raise FileFormatError(path, FORMAT, f"{field}/LeadID", "the lead appears twice in the waveform")
        leads[name] = _read_lead(block, field, path)
        first = next(iter(leads))
        if leads[name].size != leads[first].size:
            raise FileFormatError(path, FORMAT, f"{field}/LeadSampleCountTotal",
                                  f"{leads[name].size} samples but lead {first} has {leads[first].size}")
    return fs, leads


def _read_lead(block: Element, field: str, path: str | Path) -> np.ndarray:
    """[T] float64 mV of one <LeadData>: count checked against the decoded bytes before any
    array is made, then the CRC-32, then the amplitude scale and units."""
    size = block.findtext("LeadSampleSize")
    if size is not None and _integer(size, path, f"{field}/LeadSampleSize") != _SAMPLE_BYTES:
        raise FileFormatError(path, FORMAT, f"{field}/LeadSampleSize",
                              f"is {size.strip()}, only {_SAMPLE_BYTES}-byte (int16) samples are read")
    count = _integer(block.findtext("LeadSampleCountTotal"), path, f"{field}/LeadSampleCountTotal")
    raw = decode_base64(block.findtext("WaveFormData"), path, FORMAT, f"{field}/WaveFormData")
    samples = samples_from_bytes(raw, "<i2", count, path, FORMAT, f"{field}/LeadSampleCountTotal")
    if len(raw) != count * _SAMPLE_BYTES:
        raise FileFormatError(path, FORMAT, f"{field}/WaveFormData",
                              f"holds {len(raw)} bytes, but LeadSampleCountTotal {count} needs {count * _SAMPLE_BYTES}")
    crc = block.findtext("LeadDataCRC32")
    if crc is not None and _integer(crc, path, f"{field}/LeadDataCRC32") != zlib.crc32(raw):
        raise FileFormatError(path, FORMAT, f"{field}/LeadDataCRC32",
                              f"is {crc.strip()}, the decoded samples give {zlib.crc32(raw)}: corrupt data")
    per_bit = number(block.findtext("LeadAmplitudeUnitsPerBit"), path, FORMAT,
                     f"{field}/LeadAmplitudeUnitsPerBit", positive=True)
    units = (block.findtext("LeadAmplitudeUnits") or "").strip().upper()
    to_mv = unit_factor(units, _MV_PER_UNIT, path, FORMAT, f"{field}/LeadAmplitudeUnits")
    return samples.astype(np.float64) * (per_bit * to_mv)


def _integer(text: str | None, path: str | Path, field: str) -> int:
    """A whole number read from a field's text; FileFormatError naming ``field`` otherwise."""
    value = number(text, path, FORMAT, field)
    if not value.is_integer():
        raise FileFormatError(path, FORMAT, field, f"expected a whole number, got {text!r}")
    return int(value)


def _statement_lines(diagnosis: Element | None) -> list[str]:
    """Statement lines of a <Diagnosis>: fragments joined by spaces up to one flagged ENDSLINE."""
    lines: list[str] = []
    fragments: list[str] = []
    for statement in [] if diagnosis is None else diagnosis.findall("DiagnosisStatement"):
        text = (statement.findtext("StmtText") or "").strip()
        if text:
            fragments.append(text)
        if fragments and any((flag.text or "").strip() == "ENDSLINE" for flag in statement.findall("StmtFlag")):
            lines.append(" ".join(fragments))
            fragments = []
    if fragments:
        lines.append(" ".join(fragments))
    return lines


def _facts(root: Element) -> dict[str, Any]:
    """device, acquired, age, sex, muse_version where the file gives them (see module doc)."""
    facts: dict[str, Any] = {}
    device = (root.findtext("TestDemographics/AcquisitionDevice") or "").strip()
    if device:
        facts["device"] = device
    date = (root.findtext("TestDemographics/AcquisitionDate") or "").strip()
    time = (root.findtext("TestDemographics/AcquisitionTime") or "00:00:00").strip()
    try:
        facts["acquired"] = datetime.strptime(f"{date} {time}", "%m-%d-%Y %H:%M:%S").isoformat()
    except ValueError:
        pass  # no date, or one in another layout: "acquired" is left out, as documented
    age = (root.findtext("PatientDemographics/PatientAge") or "").strip()
    if age.isdigit() and (root.findtext("PatientDemographics/AgeUnits") or "YEARS").strip().upper() == "YEARS":
        facts["age"] = float(age)
    sex = sex_code(root.findtext("PatientDemographics/Gender"))
    if sex:
        facts["sex"] = sex
    version = (root.findtext("MuseInfo/MuseVersion") or "").strip()
    if version:
        facts["muse_version"] = version
    return facts
