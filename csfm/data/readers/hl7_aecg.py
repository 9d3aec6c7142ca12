"""Read an HL7 v3 annotated ECG (FDA aECG, root element ``<AnnotatedECG>``) into a Record.

The waveforms sit in ``component/series``; the series whose ``code`` is RHYTHM is read as the
signal. Its ``component/sequenceSet`` holds one time sequence and one sequence per lead:

    time   code TIME_ABSOLUTE or TIME_RELATIVE, value GLIST_TS / GLIST_PQ with
           <increment value="0.002" unit="s"/> (s, ms or us): fs = 1 / increment
    lead   code MDC_ECG_LEAD_I, _II, _III, _AVR, _AVL, _AVF, _V1.._V6 (other lead codes keep
           their suffix as the name, e.g. V3R, and the lead contract drops them), value
           SLIST_PQ with <origin value= unit=/>, <scale value= unit=/> (V, mV, uV, nV) and
           <digits> of space-separated integers: physical = origin + scale * digits, in mV

Sequences of other codes are not read and are listed as dropped channels. A series with
more than one sequence set (leads recorded at different times) is refused. Digits are
inline text, so no stated count can exceed the file; each lead's text is still capped at
``MAX_DIGITS_CHARS`` before it is parsed. Leads are returned in the standard order.

The representative (median) beat, ``derivation/derivedSeries`` with code
REPRESENTATIVE_BEAT, goes into ``metadata["median_beats"]``; it is never the signal.
Text: the annotations MDC_ECG_INTERPRETATION_STATEMENT, MDC_ECG_INTERPRETATION_SUMMARY and
MDC_ECG_RHY (the rhythm statement), in file order without repeats, joined with "; "; a
coded value gives its displayName. Patient id: the trial subject's id (``extension``).
Metadata: "device" (manufacturer and model of the series author), "acquired" (ISO, from
the series' or document's effectiveTime; left out when it does not parse), "sex".
Namespaces are ignored (files with v1/v2/v3 or no namespace are all read).
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import numpy as np

from csfm.data.leads import LeadMapping, standard_order
from csfm.data.readers.safe_io import (MV_PER_UCUM_UNIT, FileFormatError, number, parse_xml, record_of, sex_code,
                                       unit_factor, xml_root_name)
from csfm.data.record import Record

FORMAT = "HL7 aECG"
MAX_DIGITS_CHARS = 16 * 2 ** 20  # per lead: over 100 min at 500 Hz of typical 4-6 character digits
_ROOT = "AnnotatedECG"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_TIME_CODES = ("TIME_ABSOLUTE", "TIME_RELATIVE")
_TIME_TYPES = ("GLIST_TS", "GLIST_PQ")
_LEAD_PREFIX = "MDC_ECG_LEAD_"
_LEADS = {code.upper(): code for code in ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")}
_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_STATEMENTS = ("MDC_ECG_INTERPRETATION_STATEMENT", "MDC_ECG_INTERPRETATION_SUMMARY", "MDC_ECG_RHY")
_DIGITS = re.compile(r"\s*(?:[-+]?\d+(?:\s+|\Z))*", re.ASCII)  # whitespace-separated integers; linear time
_TS = re.compile(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(?:(\d{2})(?:\.(\d{1,6})\d*)?)?)?([+-]\d{4})?")
_SUBJECT = "componentOf/timepointEvent/componentOf/subjectAssignment/subject/trialSubject"


def sniff(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) is XML whose root element is <AnnotatedECG>."""
    return xml_root_name(head) == _ROOT


def read_hl7_aecg(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """Read the rhythm series of an HL7 aECG file.

    path: the .xml file. mapping: lead-contract overrides (csfm.data.leads).
    Returns a Record: signal [C, T] float32 in mV at fs = 1 / increment Hz, leads in standard
    order; metadata["median_beats"] = {"fs": Hz, "leads": [...], "signal": [C, T'] float32 mV}
    when the series has a REPRESENTATIVE_BEAT derived series.
    Raises FileFormatError naming the file and field for unsafe or malformed XML, another
    root element, no RHYTHM series, several sequence sets, a missing or irregular time
    increment, a non-numeric or unknown-unit origin or scale, digits that are not integers
    or exceed MAX_DIGITS_CHARS, leads of unequal length or no lead the lead contract (with
    ``mapping``) can use.
    """
    root = parse_xml(path, FORMAT)
    _strip_namespaces(root)
    if root.tag != _ROOT:
        raise FileFormatError(path, FORMAT, "root element", f"is <{root.tag}>, expected <{_ROOT}>")
    series = _coded(root.findall("component/series"), "RHYTHM")
    if series is None:
        raise FileFormatError(path, FORMAT, "component/series[code=RHYTHM]",
                              "absent: the file holds no rhythm series (a median beat is not read as signal)")
    fs, leads, others = _read_series(series, "series[RHYTHM]", path)
    metadata: dict[str, Any] = _facts(root, series)
    median = _coded(series.findall("derivation/derivedSeries"), "REPRESENTATIVE_BEAT")
    if median is not None:
        median_fs, beats, _ = _read_series(median, "series[RHYTHM]/derivedSeries[REPRESENTATIVE_BEAT]", path)
        metadata["median_beats"] = {"fs": median_fs, "leads": list(beats),
                                    "signal": np.stack(list(beats.values())).astype(np.float32)}
    subject = root.find(f"{_SUBJECT}/id")
    patient_id = "" if subject is None else (subject.get("extension") or subject.get("root") or "").strip()
    return record_of(path, FORMAT, "series[RHYTHM]/sequenceSet/sequence/code", np.stack(list(leads.values())), fs,
                     list(leads), mapping, unread=others, metadata=metadata, patient_id=patient_id,
                     text="; ".join(_statements(root)))


def _strip_namespaces(root: Element) -> None:
    """Drop the namespace from every element tag (attributes keep theirs, e.g. xsi:type)."""
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith("{"):
            element.tag = element.tag.rpartition("}")[2]


def _code(element: Element) -> str:
    """The ``code`` attribute of an element's <code> child, "" when there is none."""
    child = element.find("code")
    return "" if child is None else (child.get("code") or "").strip()


def _coded(elements: list[Element], code: str) -> Element | None:
    """The first element whose <code code=...> is ``code``."""
    return next((element for element in elements if _code(element) == code), None)


def _read_series(series: Element, where: str, path: str | Path) -> tuple[float, dict[str, np.ndarray], list[str]]:
    """(fs Hz, lead name -> [T] float64 mV in standard order, codes of unread sequences) of a
    series' single sequence set."""
    sets = series.findall("component/sequenceSet")
    if len(sets) != 1:
        raise FileFormatError(path, FORMAT, f"{where}/component/sequenceSet",
                              f"{len(sets)} sequence sets; exactly one (all leads recorded together) is read")
    where = f"{where}/sequenceSet"
    fs: float | None = None
    leads: dict[str, np.ndarray] = {}
    others: list[str] = []
    for k, sequence in enumerate(sets[0].findall("component/sequence")):
        code = _code(sequence)
        field = f"{where}/sequence[{code or k}]"
        if code in _TIME_CODES:
            if fs is not None:
                raise FileFormatError(path, FORMAT, field, "a second time sequence in one sequence set")
            fs = _rate(sequence.find("value"), field, path)
        elif code.upper().startswith(_LEAD_PREFIX):
            suffix = code[len(_LEAD_PREFIX):]
            name = _LEADS.get(suffix.upper(), suffix)
            if name in leads:
                raise FileFormatError(path, FORMAT, f"{field}/code", "the lead appears twice in the sequence set")
            leads[name] = _read_lead(sequence.find("value"), field, path)
            first = next(iter(leads))
            if leads[name].size != leads[first].size:
                raise FileFormatError(path, FORMAT, f"{field}/value/digits",
                                      f"{leads[name].size} samples but lead {first} has {leads[first].size}")
        else:
            others.append(code or f"sequence {k}")
    if fs is None:
        raise FileFormatError(path, FORMAT, f"{where}/sequence[TIME_ABSOLUTE|TIME_RELATIVE]",
                              "absent: no time sequence gives the sampling increment")
    if not leads:
        raise FileFormatError(path, FORMAT, f"{where}/sequence[{_LEAD_PREFIX}*]", "absent: no lead sequence")
    return fs, standard_order(leads), others


def _value(value: Element | None, types: tuple[str, ...], field: str, path: str | Path) -> Element:
    """``value`` when present with an xsi:type in ``types``, else FileFormatError."""
    if value is None:
        raise FileFormatError(path, FORMAT, f"{field}/value", "absent")
    if value.get(_XSI_TYPE) not in types:
        raise FileFormatError(path, FORMAT, f"{field}/value@xsi:type",
                              f"is {value.get(_XSI_TYPE)!r}, expected {' or '.join(types)}")
    return value


def _quantity(parent: Element, name: str, units: dict[str, float], field: str, path: str | Path,
              positive: bool = False) -> float:
    """<name value=... unit=...> of ``parent`` as a number in the unit ``units`` maps to 1."""
    element = parent.find(name)
    if element is None:
        raise FileFormatError(path, FORMAT, f"{field}/{name}", "absent")
    value = number(element.get("value"), path, FORMAT, f"{field}/{name}@value", positive=positive)
    return value * unit_factor(element.get("unit"), units, path, FORMAT, f"{field}/{name}@unit")


def _rate(value: Element | None, field: str, path: str | Path) -> float:
    """fs in Hz from a GLIST time sequence's increment."""
    value = _value(value, _TIME_TYPES, field, path)
    return 1.0 / _quantity(value, "increment", _TO_S, f"{field}/value", path, positive=True)


def _read_lead(value: Element | None, field: str, path: str | Path) -> np.ndarray:
    """[T] float64 mV of one SLIST_PQ lead sequence; the digits text is size-capped and
    checked to be integers before it is parsed."""
    value = _value(value, ("SLIST_PQ",), field, path)
    origin = _quantity(value, "origin", MV_PER_UCUM_UNIT, f"{field}/value", path)
    scale = _quantity(value, "scale", MV_PER_UCUM_UNIT, f"{field}/value", path, positive=True)
    text = value.findtext("digits")
    where = f"{field}/value/digits"
    if text is None or not text.strip():
        raise FileFormatError(path, FORMAT, where, "absent or empty: the lead holds no samples")
    if len(text) > MAX_DIGITS_CHARS:
        raise FileFormatError(path, FORMAT, where, f"{len(text)} characters, more than the {MAX_DIGITS_CHARS} "
                                                   "read per lead")
    valid = _DIGITS.match(text).end()  # the pattern matches at least the empty prefix
    if valid != len(text):
        raise FileFormatError(path, FORMAT, where, f"expected space-separated integers, found "
                                                   f"{text[valid:valid + 40]!r} after {valid} characters")
    return origin + scale * np.fromstring(text, dtype=np.float64, sep=" ")


def _statements(root: Element) -> list[str]:
    """Interpretation and rhythm statements in file order, without repeats (see module doc)."""
    found: dict[str, None] = {}
    for annotation in root.iter("annotation"):
        value = annotation.find("value")
        if value is None or _code(annotation) not in _STATEMENTS:
            continue
        text = (value.text or "").strip() or (value.get("displayName") or value.get("code") or "").strip()
        if text:
            found[text] = None
    return list(found)


def _iso_time(text: str | None) -> str | None:
    """ISO 8601 of an HL7 TS value ``YYYYMMDD[HHMM[SS[.S...]]][+ZZZZ]``, None when it does not parse."""
    match = _TS.fullmatch((text or "").strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        stamp = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                         int((fraction or "0").ljust(6, "0")))
    except ValueError:
        return None
    if zone:
        sign = 1 if zone[0] == "+" else -1
        stamp = stamp.replace(tzinfo=timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[3:]))))
    return stamp.isoformat() if hour else stamp.date().isoformat()


def _facts(root: Element, series: Element) -> dict[str, Any]:
    """device, acquired, sex where the file gives them (see module doc)."""
    facts: dict[str, Any] = {}
    author = "author/seriesAuthor"
    parts = (series.findtext(f"{author}/manufacturerOrganization/name"),
             series.findtext(f"{author}/manufacturedSeriesDevice/manufacturerModelName"))
    device = " ".join(part.strip() for part in parts if part and part.strip())
    if device:
        facts["device"] = device
    for element, step in ((series, "low"), (series, "center"), (root, "center"), (root, "low")):
        time = element.find(f"effectiveTime/{step}")
        acquired = None if time is None else _iso_time(time.get("value"))
        if acquired:
            facts["acquired"] = acquired
            break
    gender = root.find(f"{_SUBJECT}/subjectDemographicPerson/administrativeGenderCode")
    sex = None if gender is None else sex_code(gender.get("code"))
    if sex:
        facts["sex"] = sex
    return facts
