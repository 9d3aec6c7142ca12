"""GE MUSE XML reader: the real ml4h export, crafted files written by a test-side writer
(known integers, so derived leads and scaling are checked exactly), and hostile files.

The independent decode of the real file below reads the raw text with string splitting and
a regex (no XML parser), then numpy/base64, and scales by the file's own units per bit.
"""
from __future__ import annotations

import base64
import re
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fixtures import SHARED, need
from helpers import assert_ecg_record, assert_refused_early, assert_lead_matches, assert_median_beats

from csfm.data.leads import derive_limb_leads, standard_order
from csfm.data.readers.ge_muse import FORMAT, read_ge_muse, sniff

VENDOR = SHARED / "vendor"
MUSE = VENDOR / "ge_muse" / "muse_ecg.xml"
STORED = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
TWELVE = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


# ---------------------------------------------------------------- independent decode

def _raw_lead(text: str, kind: str, lead: str) -> tuple[np.ndarray, float, str, bool]:
    """(int16 samples, units per bit, units, whether the CRC-32 field matches the bytes) of
    ``lead`` in the waveform ``kind``, found by splitting the raw text: no XML parser involved."""
    section = text.split(f"<WaveformType>{kind}</WaveformType>", 1)[1].split("</Waveform>", 1)[0]
    block = next(b for b in section.split("<LeadData>") if f"<LeadID>{lead}</LeadID>" in b)

    def field(name: str) -> str:
        return re.search(rf"<{name}>(.*?)</{name}>", block, re.S).group(1).strip()

    raw = base64.b64decode("".join(field("WaveFormData").split()))
    crc_ok = int(field("LeadDataCRC32")) == zlib.crc32(raw)
    return np.frombuffer(raw, "<i2"), float(field("LeadAmplitudeUnitsPerBit")), field("LeadAmplitudeUnits"), crc_ok


@pytest.fixture(scope="module")
def muse_text() -> str:
    return need(MUSE).read_bytes().decode("latin-1")


# ---------------------------------------------------------------- the real file

@pytest.mark.data
def test_real_file_reads_the_rhythm_strip():
    record = read_ge_muse(need(MUSE))
    assert_ecg_record(record, 240.0, TWELVE, 2500)
    assert record.metadata["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
    assert record.metadata["format"] == FORMAT and record.metadata["source_file"] == str(MUSE)
    assert record.metadata["device"] == "MAC" and record.metadata["acquired"] == "2000-01-01T11:34:00"
    assert record.record_id == "muse_ecg" and record.patient_id == "000000000"
    assert record.dropped_channels == []
    # Diagnosis fragments are joined into lines at each ENDSLINE flag
    assert record.text.split("; ") == [
        "BASELINE ARTIFACT", "SINUS TACHYCARDIA WITH ONE VENTRICULAR PREMATURE BEAT", "LEFT AXIS DEVIATION",
        "OLD ANTEROSEPTAL INFARCT", "WHEN COMPARED WITH ECG OF 1/21/99 16:22,", "SINUS TACHYCARDIA HAS APPEARED"]
    # a real ECG: lead II of a tachycardic adult peaks at ~1-2 mV, not 1000x (uV) or 0.001x (V)
    assert 0.5 < np.abs(record.signal[1]).max() < 5


@pytest.mark.data
def test_every_stored_lead_matches_the_independent_decode(muse_text):
    record = read_ge_muse(need(MUSE))
    for lead in STORED:
        ints, per_bit, units, crc_ok = _raw_lead(muse_text, "Rhythm", lead)
        assert crc_ok and units == "MICROVOLTS" and per_bit == 4.88
        assert_lead_matches(record.signal[record.channel_names.index(lead)], ints * per_bit / 1000.0, lead)


@pytest.mark.data
def test_derived_limb_leads_follow_einthoven_and_goldberger(muse_text):
    record = read_ge_muse(need(MUSE))
    lead = {name: record.signal[k].astype(np.float64) for k, name in enumerate(record.channel_names)}
    i_raw, ii_raw = (_raw_lead(muse_text, "Rhythm", name)[0].astype(np.float64) for name in ("I", "II"))
    mv = 4.88 / 1000.0
    np.testing.assert_allclose(lead["III"], (ii_raw - i_raw) * mv, atol=1e-6)
    np.testing.assert_allclose(lead["aVR"], -(i_raw + ii_raw) / 2 * mv, atol=1e-6)
    np.testing.assert_allclose(lead["aVL"], (i_raw - ii_raw / 2) * mv, atol=1e-6)
    np.testing.assert_allclose(lead["aVF"], (ii_raw - i_raw / 2) * mv, atol=1e-6)
    # the augmented leads sum to zero
    np.testing.assert_allclose(lead["aVR"] + lead["aVL"] + lead["aVF"], 0, atol=1e-6)


@pytest.mark.data
def test_median_beats_are_metadata_not_the_signal(muse_text):
    record = read_ge_muse(need(MUSE))
    median = assert_median_beats(record, 240.0, TWELVE, 300)
    ints, per_bit, _, _ = _raw_lead(muse_text, "Median", "II")
    np.testing.assert_allclose(median[1], ints * per_bit / 1000.0, atol=1e-6)
    rhythm_ii = _raw_lead(muse_text, "Rhythm", "II")[0] * per_bit / 1000.0
    np.testing.assert_allclose(record.signal[1], rhythm_ii, atol=1e-6)
    assert not np.allclose(record.signal[1, :300], median[1], atol=1e-3)


def test_sniff_crafted_content(tmp_path):
    text = _muse_xml({"I": np.arange(4), "II": np.arange(4)})
    assert sniff(text.encode()[:4096])
    assert sniff(text.encode("utf-16")[:4096])  # BOM
    assert sniff(text.encode("utf-16-be")[:4096])  # no BOM
    assert sniff(b"<!-- <Other> in a comment -->\n<!DOCTYPE RestingECG SYSTEM 'x'>\n<RestingECG>")
    assert not sniff(b"100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n")
    assert not sniff(b"<?xml version='1.0'?><restingecgdata>")  # Philips
    assert not sniff(b"# Notes\nThe MUSE root is `<RestingECG>`.\n")  # text that only mentions the tag
    assert not sniff(b"<?xml version='1.0'?><Other><RestingECG>")
    assert not sniff(b"") and not sniff(b"\xff\xfe\x00") and not sniff(bytes(range(256)) * 16)


# ---------------------------------------------------------------- test-side writer

def _lead_xml(name: str, ints: np.ndarray, per_bit: str = "4.88", units: str = "MICROVOLTS") -> str:
    raw = np.asarray(ints, dtype="<i2").tobytes()
    return (f"<LeadData><LeadByteCountTotal>{len(raw)}</LeadByteCountTotal>"
            f"<LeadSampleCountTotal>{len(ints)}</LeadSampleCountTotal>"
            f"<LeadAmplitudeUnitsPerBit>{per_bit}</LeadAmplitudeUnitsPerBit>"
            f"<LeadAmplitudeUnits>{units}</LeadAmplitudeUnits><LeadID>{name}</LeadID>"
            f"<LeadSampleSize>2</LeadSampleSize><LeadDataCRC32>{zlib.crc32(raw)}</LeadDataCRC32>"
            f"<WaveFormData>{base64.b64encode(raw).decode()}</WaveFormData></LeadData>")


def _muse_xml(rhythm: dict[str, np.ndarray], median: dict[str, np.ndarray] | None = None, base: str = "500",
              exponent: str = "0", per_bit: str = "4.88", units: str = "MICROVOLTS") -> str:
    """A MUSE-shaped document with Rhythm (and optionally Median) waveforms of int16 leads."""
    def waveform(kind: str, leads: dict[str, np.ndarray]) -> str:
        body = "".join(_lead_xml(name, ints, per_bit, units) for name, ints in leads.items())
        return (f"<Waveform><WaveformType>{kind}</WaveformType><SampleBase>{base}</SampleBase>"
                f"<SampleExponent>{exponent}</SampleExponent>{body}</Waveform>")

    return ('<?xml version="1.0" encoding="UTF-8"?>\n<RestingECG><PatientDemographics><PatientID>P-7</PatientID>'
            "</PatientDemographics><TestDemographics><AcquisitionDevice>MAC5500</AcquisitionDevice>"
            "<AcquisitionDate>12-31-2019</AcquisitionDate><AcquisitionTime>23:59:58</AcquisitionTime>"
            "</TestDemographics><Diagnosis><DiagnosisStatement><StmtText>NORMAL SINUS RHYTHM</StmtText>"
            "<StmtFlag>ENDSLINE</StmtFlag></DiagnosisStatement></Diagnosis>"
            + (waveform("Median", median) if median else "") + waveform("Rhythm", rhythm) + "</RestingECG>")


def _write(tmp_path: Path, text: str | bytes, name: str = "ecg.xml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _ints(n: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(-3000, 3000, n).astype(np.int16) for name in STORED}


# ---------------------------------------------------------------- crafted round trips

def test_crafted_eight_leads_scaled_and_derived_exactly(tmp_path):
    leads = _ints()
    record = read_ge_muse(_write(tmp_path, _muse_xml(leads)))
    assert record.fs == 500.0 and record.channel_names == TWELVE and record.signal.shape == (12, 500)
    i, ii = (leads[name].astype(np.float64) * 4.88e-3 for name in ("I", "II"))
    expected = {"I": i, "II": ii, "III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2,
                **{name: leads[name] * 4.88e-3 for name in STORED[2:]}}
    for k, name in enumerate(TWELVE):
        np.testing.assert_allclose(record.signal[k], expected[name], atol=1e-5, err_msg=name)
    assert record.patient_id == "P-7" and record.text == "NORMAL SINUS RHYTHM"
    assert record.metadata["device"] == "MAC5500" and record.metadata["acquired"] == "2019-12-31T23:59:58"
    assert "median_beats" not in record.metadata


def test_twelve_stored_leads_are_not_derived_and_come_in_standard_order(tmp_path):
    rng = np.random.default_rng(1)
    leads = {name: rng.integers(-100, 100, 50).astype(np.int16) for name in reversed(TWELVE)}
    record = read_ge_muse(_write(tmp_path, _muse_xml(leads)))
    assert record.metadata["derived_leads"] == [] and record.channel_names == TWELVE
    for k, name in enumerate(TWELVE):
        np.testing.assert_allclose(record.signal[k], leads[name] * 4.88e-3, atol=1e-6)


@pytest.mark.parametrize(("units", "per_bit", "factor"), [
    ("MICROVOLTS", "4.88", 4.88e-3), ("MILLIVOLTS", "0.005", 5e-3), ("NANOVOLTS", "2500", 2.5e-3)])
def test_units_are_converted_to_millivolts(tmp_path, units, per_bit, factor):
    leads = {"I": np.array([1000, -2000, 0], dtype=np.int16), "II": np.array([3, 2, 1], dtype=np.int16)}
    record = read_ge_muse(_write(tmp_path, _muse_xml(leads, per_bit=per_bit, units=units)))
    np.testing.assert_allclose(record.signal[0], leads["I"] * factor, rtol=1e-6)


def test_sample_exponent_scales_the_rate(tmp_path):
    record = read_ge_muse(_write(tmp_path, _muse_xml(_ints(20), base="25", exponent="1")))
    assert record.fs == 250.0


def test_mapping_and_median(tmp_path):
    rhythm, median = _ints(400), _ints(60, seed=3)
    record = read_ge_muse(_write(tmp_path, _muse_xml(rhythm, median)), mapping={"V1": None})
    assert "V1" not in record.channel_names and record.dropped_channels == ["V1"]
    beats = record.metadata["median_beats"]
    assert beats["leads"] == TWELVE and beats["signal"].shape == (12, 60)
    np.testing.assert_allclose(beats["signal"][2], (median["II"] - median["I"].astype(float)) * 4.88e-3, atol=1e-5)


def test_limb_lead_helpers():
    i, ii = np.array([1.0, 2.0]), np.array([4.0, np.nan])
    signal, names, derived = derive_limb_leads(np.stack([np.zeros(2), ii, i, np.ones(2)]), ["V1", "II", "I", "aVR"])
    assert derived == ["III", "aVL", "aVF"]  # a stored aVR is kept, not recomputed
    assert names == ["V1", "II", "I", "aVR", "III", "aVL", "aVF"] and signal.shape == (7, 2)
    leads = dict(zip(names, signal))
    np.testing.assert_array_equal(leads["aVR"], np.ones(2))
    np.testing.assert_array_equal(leads["III"], ii - i)
    np.testing.assert_array_equal(leads["aVL"], i - ii / 2)  # NaN where II is NaN
    np.testing.assert_array_equal(leads["aVF"], ii - i / 2)
    assert list(standard_order(leads)) == ["I", "II", "III", "aVR", "aVL", "aVF", "V1"]
    assert derive_limb_leads(np.stack([i, i]), ["I", "V1"])[2] == []  # no II: nothing derived
    # the lead contract's names count: "DII" is lead II, so III etc. come from "Lead I" and "DII"
    _, names, derived = derive_limb_leads(np.stack([i, ii]), ["Lead I", "DII"])
    assert derived == ["III", "aVR", "aVL", "aVF"] and names[:2] == ["Lead I", "DII"]
    assert list(standard_order({"X": i, "V2": i, "Y": i, "I": i})) == ["I", "V2", "X", "Y"]


# ---------------------------------------------------------------- hostile files

# _hostile(path, *fragments): reading path fails fast with a FileFormatError naming it and the fragments
_hostile = partial(assert_refused_early, read_ge_muse, FORMAT)


@pytest.fixture
def valid() -> str:
    return _muse_xml(_ints(2500))


def test_truncated_base64(tmp_path, valid):
    data = re.search(r"<LeadID>II</LeadID>.*?<WaveFormData>([^<]*)</WaveFormData>", valid).group(1)
    _hostile(_write(tmp_path, valid.replace(data, data[:-3])), "Waveform[Rhythm]/LeadData[II]/WaveFormData",
             "base64")
    # cut on a 4-character boundary: valid base64, fewer samples than LeadSampleCountTotal states
    _hostile(_write(tmp_path, valid.replace(data, data[:-400]), "cut.xml"),
             "Waveform[Rhythm]/LeadData[II]/LeadSampleCountTotal", "states 2500 samples")


def test_sample_count_claim_of_a_billion(tmp_path, valid):
    text = valid.replace("<LeadSampleCountTotal>2500</LeadSampleCountTotal>",
                         "<LeadSampleCountTotal>1000000000</LeadSampleCountTotal>", 1)
    _hostile(_write(tmp_path, text), "Waveform[Rhythm]/LeadData[I]/LeadSampleCountTotal", "1000000000")


def test_more_bytes_than_the_stated_count(tmp_path, valid):
    text = valid.replace("<LeadSampleCountTotal>2500</LeadSampleCountTotal>",
                         "<LeadSampleCountTotal>2000</LeadSampleCountTotal>", 1)
    _hostile(_write(tmp_path, text), "Waveform[Rhythm]/LeadData[I]/WaveFormData", "needs 4000")


def test_missing_rhythm_waveform(tmp_path):
    text = _muse_xml(_ints(50)).replace("<WaveformType>Rhythm</WaveformType>", "<WaveformType>Median</WaveformType>")
    _hostile(_write(tmp_path, text), "Waveform[WaveformType=Rhythm]", "absent")


@pytest.mark.parametrize(("old", "new", "field"), [
    ("<LeadAmplitudeUnitsPerBit>4.88<", "<LeadAmplitudeUnitsPerBit>4,88<", "LeadData[I]/LeadAmplitudeUnitsPerBit"),
    ("<LeadAmplitudeUnitsPerBit>4.88<", "<LeadAmplitudeUnitsPerBit>0<", "LeadData[I]/LeadAmplitudeUnitsPerBit"),
    ("<LeadAmplitudeUnits>MICROVOLTS<", "<LeadAmplitudeUnits>MICROVOLT<", "LeadData[I]/LeadAmplitudeUnits"),
    ("<SampleBase>500<", "<SampleBase>five hundred<", "Waveform[Rhythm]/SampleBase"),
    ("<SampleExponent>0<", "<SampleExponent>400<", "Waveform[Rhythm]/SampleExponent"),
    ("<LeadSampleSize>2<", "<LeadSampleSize>4<", "LeadData[I]/LeadSampleSize"),
    ("<LeadID>V3<", "<LeadID>V2<", "LeadData[V2]/LeadID"),
    ("<RestingECG>", "<RestingECGX>", "root element"),
])
def test_bad_fields(tmp_path, valid, old, new, field):
    text = valid.replace(old, new, 1)
    if old == "<RestingECG>":
        text = text.replace("</RestingECG>", "</RestingECGX>")
    _hostile(_write(tmp_path, text), field)


def test_crc_mismatch(tmp_path, valid):
    crc = re.search(r"<LeadID>V4</LeadID>.*?<LeadDataCRC32>(\d+)<", valid).group(1)
    _hostile(_write(tmp_path, valid.replace(f"<LeadDataCRC32>{crc}<", f"<LeadDataCRC32>{int(crc) ^ 1}<")),
             "LeadData[V4]/LeadDataCRC32", "corrupt")


def test_leads_of_unequal_length(tmp_path):
    leads = _ints(100)
    leads["V5"] = leads["V5"][:90]
    _hostile(_write(tmp_path, _muse_xml(leads)), "LeadData[V5]/LeadSampleCountTotal", "90 samples but lead I has 100")


def test_no_usable_lead(tmp_path):
    _hostile(_write(tmp_path, _muse_xml({"V4R": np.arange(10), "X": np.arange(10)})),
             "LeadData/LeadID", "no usable ECG/PPG channel")


def test_missing_file(tmp_path):
    _hostile(tmp_path / "absent.xml", "file")
