"""HL7 aECG reader: the real FDA/HL7 example, crafted files written by a test-side writer,
and hostile files.

The ``aecg`` package needs Python >= 3.12 and cannot be installed beside this project's
Python 3.11, so the independent decode here is a deliberately different minimal parse: a
regex over the raw text (no XML parser), digits split by ``str.split``.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fixtures import SHARED, need
from helpers import assert_ecg_record, assert_refused_early, assert_lead_matches, assert_median_beats

from csfm.data.readers.hl7_aecg import FORMAT, MAX_DIGITS_CHARS, read_hl7_aecg, sniff

VENDOR = SHARED / "vendor"
AECG = VENDOR / "hl7_aecg" / "Example_aECG.xml"
TWELVE = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
FILE_ORDER = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF"]  # as the example stores them
LSB_MV = 2.5e-3  # the example's scale: 2.5 uV


# ---------------------------------------------------------------- independent decode

def _regex_lead(text: str, lead: str) -> np.ndarray:
    """mV of the first sequence coded MDC_ECG_LEAD_<lead> in ``text``, by regex."""
    code = "MDC_ECG_LEAD_" + lead.upper()
    match = re.search(rf'code="{code}".*?<origin value="([^"]+)" unit="uV"/>\s*'
                      rf'<scale value="([^"]+)" unit="uV"/>.*?<digits>(.*?)</digits>', text, re.S)
    origin, scale, digits = float(match.group(1)), float(match.group(2)), match.group(3)
    return (origin + scale * np.array(digits.split(), dtype=np.float64)) / 1000.0


@pytest.fixture(scope="module")
def aecg_parts() -> tuple[str, str]:
    """(rhythm part, median part) of the example's raw text, split at the derived series."""
    text = need(AECG).read_text(encoding="utf-8")
    rhythm, median = text.split("<derivedSeries>", 1)
    return rhythm, median


# ---------------------------------------------------------------- the real file

@pytest.mark.data
def test_real_file_reads_the_rhythm_series():
    record = read_hl7_aecg(need(AECG))
    assert_ecg_record(record, 500.0, TWELVE, 5000)  # 10 s
    assert record.record_id == "Example_aECG" and record.patient_id == "SBJ-123"
    assert record.text == "Sinus Rhythm"
    assert record.metadata["format"] == FORMAT and record.metadata["source_file"] == str(AECG)
    assert record.metadata["device"] == "Mortara Instrument, Inc. ELI250"
    assert record.metadata["acquired"] == "2002-11-22T09:10:00" and record.metadata["sex"] == "M"
    assert record.dropped_channels == []
    assert 0.3 < np.abs(record.signal[1]).max() < 5  # mV, not uV


@pytest.mark.data
def test_every_lead_matches_the_regex_decode(aecg_parts):
    record = read_hl7_aecg(need(AECG))
    for lead in FILE_ORDER:
        assert_lead_matches(record.signal[record.channel_names.index(lead)], _regex_lead(aecg_parts[0], lead), lead)


@pytest.mark.data
def test_stored_limb_leads_obey_einthoven_and_goldberger():
    """The file stores all 12 leads; their relations hold only if every code got its lead."""
    record = read_hl7_aecg(need(AECG))
    lead = {name: record.signal[k].astype(np.float64) for k, name in enumerate(record.channel_names)}
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-5)
    for name, derived in (("aVR", -(lead["I"] + lead["II"]) / 2), ("aVL", lead["I"] - lead["II"] / 2),
                          ("aVF", lead["II"] - lead["I"] / 2)):
        np.testing.assert_allclose(lead[name], derived, atol=LSB_MV / 2 + 1e-5, err_msg=name)


@pytest.mark.data
def test_median_beat_is_metadata_not_the_signal(aecg_parts):
    record = read_hl7_aecg(need(AECG))
    median = assert_median_beats(record, 500.0, TWELVE, 599)
    np.testing.assert_allclose(median[1], _regex_lead(aecg_parts[1], "II"), atol=1e-6)
    assert not np.allclose(record.signal[1, :599], median[1], atol=1e-2)


def test_sniff_crafted_content():
    text = _aecg_xml({"I": np.arange(3)})
    assert sniff(text.encode()[:4096]) and sniff(text.encode("utf-16")[:4096])
    assert sniff(b'<?xml version="1.0"?>\n<!-- a comment -->\n<v3:AnnotatedECG xmlns:v3="urn:hl7-org:v3">')
    assert not sniff(b"100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n")
    assert not sniff(b"<?xml version='1.0'?><RestingECG>") and not sniff(b"") and not sniff(bytes(4096))


# ---------------------------------------------------------------- test-side writer

def _sequence(code: str, value: str) -> str:
    return f'<component><sequence><code code="{code}"/>{value}</sequence></component>'


def _sequence_set(leads: dict[str, np.ndarray], increment: str, unit: str, origin: tuple[str, str],
                  scale: tuple[str, str]) -> str:
    time_value = (f'<value xsi:type="GLIST_TS"><head value="20200102030405.250"/>'
                  f'<increment value="{increment}" unit="{unit}"/></value>')
    body = _sequence("TIME_ABSOLUTE", time_value) + "".join(
        _sequence(code if "_" in code else f"MDC_ECG_LEAD_{code.upper()}",
                  f'<value xsi:type="SLIST_PQ"><origin value="{origin[0]}" unit="{origin[1]}"/>'
                  f'<scale value="{scale[0]}" unit="{scale[1]}"/><digits>{" ".join(map(str, ints))}</digits></value>')
        for code, ints in leads.items())
    return f"<component><sequenceSet>{body}</sequenceSet></component>"


def _aecg_xml(leads: dict[str, np.ndarray], median: dict[str, np.ndarray] | None = None, increment: str = "0.002",
              unit: str = "s", origin: tuple[str, str] = ("0", "uV"), scale: tuple[str, str] = ("2.5", "uV"),
              statements: tuple[str, ...] = (), namespace: bool = True) -> str:
    """An aECG-shaped document: a RHYTHM series of integer ``leads`` (keys: lead suffixes such as
    "II", or full codes), optionally a REPRESENTATIVE_BEAT derived series and interpretation statements."""
    annotations = "".join(f'<component><annotation><code code="MDC_ECG_INTERPRETATION_STATEMENT"/>'
                          f'<value xsi:type="ST">{s}</value></annotation></component>' for s in statements)
    derived = ("" if median is None else
               '<derivation><derivedSeries><code code="REPRESENTATIVE_BEAT"/>'
               f"{_sequence_set(median, increment, unit, origin, scale)}</derivedSeries></derivation>")
    xmlns = ' xmlns="urn:hl7-org:v3"' if namespace else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<AnnotatedECG{xmlns} '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><effectiveTime><center value="20200102030405"/>'
            '</effectiveTime><componentOf><timepointEvent><componentOf><subjectAssignment><subject><trialSubject>'
            '<id root="1.2.3" extension="SUBJ-9"/><subjectDemographicPerson><administrativeGenderCode code="F"/>'
            "</subjectDemographicPerson></trialSubject></subject></subjectAssignment></componentOf></timepointEvent>"
            '</componentOf><component><series><code code="RHYTHM"/><effectiveTime><low value="20200102030405.250"/>'
            "</effectiveTime><author><seriesAuthor><manufacturedSeriesDevice><manufacturerModelName>CartX"
            "</manufacturerModelName></manufacturedSeriesDevice></seriesAuthor></author>"
            f"{_sequence_set(leads, increment, unit, origin, scale)}"
            f"<subjectOf><annotationSet>{annotations}</annotationSet></subjectOf>{derived}"
            "</series></component></AnnotatedECG>")


def _write(tmp_path: Path, text: str | bytes, name: str = "ecg.xml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _ints(names: list[str], n: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(-2000, 2000, n) for name in names}


# ---------------------------------------------------------------- crafted round trips

def test_crafted_file_scaled_ordered_and_described(tmp_path):
    leads = _ints(["V2", "AVF", "I", "II"])
    record = read_hl7_aecg(_write(tmp_path, _aecg_xml(leads, statements=("Sinus rhythm", "Normal ECG"))))
    assert record.fs == 500.0 and record.channel_names == ["I", "II", "aVF", "V2"]
    for k, code in enumerate(["I", "II", "AVF", "V2"]):
        np.testing.assert_allclose(record.signal[k], leads[code] * 2.5e-3, atol=1e-6)
    assert record.text == "Sinus rhythm; Normal ECG" and record.patient_id == "SUBJ-9"
    assert record.metadata["acquired"] == "2020-01-02T03:04:05.250000"
    assert record.metadata["device"] == "CartX" and record.metadata["sex"] == "F"
    assert "median_beats" not in record.metadata


@pytest.mark.parametrize(("increment", "unit", "fs"), [
    ("0.002", "s", 500.0), ("1", "ms", 1000.0), ("4000", "us", 250.0)])
def test_increment_units(tmp_path, increment, unit, fs):
    record = read_hl7_aecg(_write(tmp_path, _aecg_xml(_ints(["II"], 20), increment=increment, unit=unit)))
    assert record.fs == pytest.approx(fs)


@pytest.mark.parametrize(("origin", "scale", "expected"), [
    (("0", "uV"), ("2.5", "uV"), lambda d: d * 2.5e-3),
    (("-0.5", "mV"), ("0.005", "mV"), lambda d: -0.5 + d * 5e-3),
    (("100", "uV"), ("500", "nV"), lambda d: 0.1 + d * 5e-4),
])
def test_origin_and_scale_to_millivolts(tmp_path, origin, scale, expected):
    leads = _ints(["II"], 50)
    record = read_hl7_aecg(_write(tmp_path, _aecg_xml(leads, origin=origin, scale=scale)))
    np.testing.assert_allclose(record.signal[0], expected(leads["II"].astype(np.float64)), rtol=1e-6, atol=1e-7)


def test_no_namespace_other_leads_and_mapping(tmp_path):
    leads = {**_ints(["I", "II", "V1"], 40), "MDC_ECG_LEAD_V3R": np.arange(40), "X_RESPIRATION": np.arange(40)}
    path = _write(tmp_path, _aecg_xml(leads, namespace=False))
    record = read_hl7_aecg(path)
    assert record.channel_names == ["I", "II", "V1"]
    assert record.dropped_channels == ["V3R", "X_RESPIRATION"]
    mapped = read_hl7_aecg(path, mapping={"V1": None, "V3R": "V3"})
    assert mapped.channel_names == ["I", "II", "V3R"] and mapped.channel_types == [0, 1, 8]
    np.testing.assert_allclose(mapped.signal[2], np.arange(40) * 2.5e-3, atol=1e-6)


def test_median_beat_series(tmp_path):
    rhythm, median = _ints(["I", "II"], 500), _ints(["II", "I"], 80, seed=4)
    record = read_hl7_aecg(_write(tmp_path, _aecg_xml(rhythm, median=median)))
    beats = record.metadata["median_beats"]
    assert beats["fs"] == 500.0 and beats["leads"] == ["I", "II"] and beats["signal"].shape == (2, 80)
    np.testing.assert_allclose(beats["signal"][1], median["II"] * 2.5e-3, atol=1e-6)
    assert record.signal.shape == (2, 500)


# ---------------------------------------------------------------- hostile files

# _hostile(path, *fragments): reading path fails fast with a FileFormatError naming it and the fragments
_hostile = partial(assert_refused_early, read_hl7_aecg, FORMAT)


@pytest.fixture
def valid() -> str:
    return _aecg_xml(_ints(["I", "II", "V1"], 5000))


def test_missing_rhythm_series(tmp_path, valid):
    _hostile(_write(tmp_path, valid.replace('code="RHYTHM"', 'code="REPRESENTATIVE_BEAT"')),
             "component/series[code=RHYTHM]", "absent")


def test_digits_text_over_the_cap(tmp_path):
    huge = "<digits>" + "0 " * (MAX_DIGITS_CHARS // 2 + 1) + "</digits>"  # just over the cap
    text = _aecg_xml({"II": np.zeros(1, dtype=int)}).replace("<digits>0</digits>", huge)
    _hostile(_write(tmp_path, text), "sequence[MDC_ECG_LEAD_II]/value/digits", "more than")


@pytest.mark.parametrize(("old", "new", "fragments"), [
    ('<scale value="2.5"', '<scale value="2.5uV"', ("sequence[MDC_ECG_LEAD_I]/value/scale@value", "2.5uV")),
    ('<scale value="2.5"', '<scale value="0"', ("sequence[MDC_ECG_LEAD_I]/value/scale@value",)),
    ('<scale value="2.5" unit="uV"', '<scale value="2.5" unit="UV"', ("scale@unit", "'UV'")),
    ('<origin value="0"', '<origin value="zero"', ("sequence[MDC_ECG_LEAD_I]/value/origin@value",)),
    ('<increment value="0.002"', '<increment value="0"', ("sequence[TIME_ABSOLUTE]/value/increment@value",)),
    ('<increment value="0.002" unit="s"', '<increment value="0.002" unit="sec"', ("increment@unit",)),
    ('xsi:type="GLIST_TS"', 'xsi:type="SLIST_TS"', ("sequence[TIME_ABSOLUTE]/value@xsi:type", "GLIST_TS")),
    ('xsi:type="SLIST_PQ"', 'xsi:type="SLIST_INT"', ("sequence[MDC_ECG_LEAD_I]/value@xsi:type",)),
    ("<digits>", "<digits>1.5 ", ("sequence[MDC_ECG_LEAD_I]/value/digits", "'1.5")),
    ("<digits>", "<digits>x ", ("sequence[MDC_ECG_LEAD_I]/value/digits", "integers")),
    ('code="MDC_ECG_LEAD_V1"', 'code="MDC_ECG_LEAD_II"', ("sequence[MDC_ECG_LEAD_II]/code", "twice")),
    ('code="TIME_ABSOLUTE"', 'code="TIME_SOMETHING"', ("sequence[TIME_ABSOLUTE|TIME_RELATIVE]", "absent")),
    ("<AnnotatedECG ", "<ECGDocument ", ("root element",)),
])
def test_bad_fields(tmp_path, valid, old, new, fragments):
    text = valid.replace(old, new, 1)
    if old == "<AnnotatedECG ":
        text = text.replace("</AnnotatedECG>", "</ECGDocument>")
    _hostile(_write(tmp_path, text), *fragments)


def test_empty_digits(tmp_path):
    _hostile(_write(tmp_path, _aecg_xml({"I": np.arange(0)})), "sequence[MDC_ECG_LEAD_I]/value/digits", "empty")


def test_leads_of_unequal_length(tmp_path):
    leads = _ints(["I", "II", "V1"], 100)
    leads["V1"] = leads["V1"][:99]
    _hostile(_write(tmp_path, _aecg_xml(leads)), "sequence[MDC_ECG_LEAD_V1]/value/digits",
             "99 samples but lead I has 100")


def test_two_sequence_sets(tmp_path, valid):
    one = re.search(r"<component><sequenceSet>.*?</sequenceSet></component>", valid, re.S).group(0)
    _hostile(_write(tmp_path, valid.replace(one, one + one)), "series[RHYTHM]/component/sequenceSet", "2 sequence sets")


def test_no_usable_lead(tmp_path):
    _hostile(_write(tmp_path, _aecg_xml({"V3R": np.arange(10)})), "sequence/code", "no usable ECG/PPG channel")


def test_missing_file(tmp_path):
    _hostile(tmp_path / "absent.xml", "file")
