"""DICOM ECG reader on the real 12-lead Waveform Storage file and on edited copies of it.

The independent decodes are pydicom's ``Dataset.waveform_array`` (which applies sensitivity,
correction and baseline but keeps the file's unit) and a direct read of the raw WaveformData.
"""
from pathlib import Path

import numpy as np
import pytest
from fixtures import SHARED, need
from helpers import assert_ecg_record, assert_refused_early, assert_lead_matches, assert_median_beats

from csfm.data.readers.dicom_ecg import FORMAT, read_dicom_ecg, sniff
from csfm.data.readers.safe_io import FileFormatError

pydicom = pytest.importorskip("pydicom")
pytestmark = pytest.mark.data
VENDOR = SHARED / "vendor"
ECG = VENDOR / "dicom_ecg" / "waveform_ecg.dcm"
TWELVE = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
UV_PER_COUNT = 1.25  # ChannelSensitivity of every channel, unit uV, correction 1, baseline 0


@pytest.fixture(scope="module")
def record():
    return read_dicom_ecg(need(ECG))


@pytest.fixture(scope="module")
def dataset():
    return pydicom.dcmread(need(ECG))


def test_real_file_fields(record):
    assert_ecg_record(record, 1000.0, TWELVE, 10000)  # 10 s
    assert record.record_id == "waveform_ecg" and record.patient_id == "ANON0001"
    assert record.text == "RITMO SINUSALE; ECG NORMALE"
    meta = record.metadata
    assert meta["format"] == FORMAT and meta["source_file"] == str(ECG)
    assert meta["device"] == "Mortara Instrument, Inc. el250" and meta["acquired"] == "2000-01-01T00:00:00"
    assert meta["sop_class"] == "12-lead ECG Waveform Storage" and meta["age"] == 42.0 and meta["sex"] == "F"


def test_matches_pydicom_and_raw_samples(record, dataset):
    ours = record.signal.astype(np.float64)
    np.testing.assert_allclose(ours, dataset.waveform_array(0).T / 1000, atol=1e-6)  # uV -> mV
    raw = np.frombuffer(dataset.WaveformSequence[0].WaveformData, dtype="<i2").reshape(10000, 12)
    for row, name in enumerate(TWELVE):
        assert_lead_matches(ours[row], raw[:, row] * UV_PER_COUNT / 1000, name)
    assert 0.5 < np.ptp(ours[1]) < 5.0  # an R wave of a few mV


def test_limb_leads_follow_einthoven_and_goldberger(record):
    lead_i, lead_ii, lead_iii, avr, avl, avf = record.signal[:6].astype(np.float64)
    count = UV_PER_COUNT / 1000
    assert np.abs(lead_iii - (lead_ii - lead_i)).max() <= count + 1e-6
    for derived, exact in ((avr, -(lead_i + lead_ii) / 2), (avl, (lead_i - lead_iii) / 2),
                           (avf, (lead_ii + lead_iii) / 2)):
        assert np.abs(derived - exact).max() <= count + 1e-6


def test_rhythm_not_median_beat(record, dataset):
    median = assert_median_beats(record, 1000.0, TWELVE, 1200)
    np.testing.assert_allclose(median, dataset.waveform_array(1).T / 1000, atol=1e-6)
    assert record.signal.shape[1] == 10000


def test_mapping_drops_a_lead():
    record = read_dicom_ecg(need(ECG), mapping={"aVR": None})
    assert "aVR" not in record.channel_names and record.dropped_channels == ["aVR"]


# ---------------------------------------------------------------- sniff
def test_sniff_image_and_garbage(tmp_path):
    assert not sniff(_image(tmp_path).read_bytes()[:4096])
    assert not sniff(b"") and not sniff(b"\0" * 128 + b"DICM")
    head = bytearray(need(ECG).read_bytes()[:4096])
    head[128:132] = b"DICX"
    assert not sniff(bytes(head))


# ---------------------------------------------------------------- edited copies
def _copy(tmp_path: Path, edit, name: str = "edited.dcm") -> Path:
    """A copy of the real file with ``edit(dataset)`` applied, saved by pydicom."""
    dataset = pydicom.dcmread(need(ECG))
    edit(dataset)
    target = tmp_path / name
    dataset.save_as(target)
    return target


def _image(tmp_path: Path) -> Path:
    """The real file turned into a CT image object: no WaveformSequence, a 4 x 4 PixelData."""
    def to_image(ds):
        del ds.WaveformSequence
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.Modality = "CT"
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.add_new(0x7FE00010, "OW", bytes(32))  # PixelData
    return _copy(tmp_path, to_image, "image.dcm")


def _fails(path: Path, field: str) -> FileFormatError:
    """read_dicom_ecg(path) raises FileFormatError naming path and ``field``, under 100 MB."""
    return assert_refused_early(read_dicom_ecg, FORMAT, path, field=field)


def _rhythm(ds):
    return ds.WaveformSequence[0]


def _channel(ds, index: int = 0):
    return _rhythm(ds).ChannelDefinitionSequence[index]


def test_image_has_no_waveform(tmp_path):
    assert "no waveform" in str(_fails(_image(tmp_path), "WaveformSequence"))


def test_billion_samples_fail_before_allocating(tmp_path):
    path = _copy(tmp_path, lambda ds: setattr(_rhythm(ds), "NumberOfWaveformSamples", 10 ** 9))
    assert "12000000000" in str(_fails(path, "NumberOfWaveformSamples"))


def test_truncated_waveform_data(tmp_path):
    def cut(ds):
        _rhythm(ds).WaveformData = _rhythm(ds).WaveformData[:100000]
    _fails(_copy(tmp_path, cut), "WaveformSequence[0].NumberOfWaveformSamples")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.dcm"
    path.write_bytes(need(ECG).read_bytes()[:150000])
    _fails(path, "dataset")


def test_big_endian_refused(tmp_path):
    dataset = pydicom.dcmread(need(ECG))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    path = tmp_path / "big.dcm"
    pydicom.dcmwrite(path, dataset, little_endian=False, implicit_vr=False, force_encoding=True)
    _fails(path, "TransferSyntaxUID")


def test_not_dicom(tmp_path):
    path = tmp_path / "not.dcm"
    path.write_bytes(need(VENDOR / "philips" / "129DYPRG.XML").read_bytes())
    _fails(path, "preamble")


def test_channel_count_beyond_definitions(tmp_path):
    path = _copy(tmp_path, lambda ds: setattr(_rhythm(ds), "NumberOfWaveformChannels", 13))
    _fails(path, "NumberOfWaveformChannels")


def test_non_numeric_sensitivity(tmp_path):
    """A DS value pydicom cannot parse, written by patching the first channel's bytes."""
    data = need(ECG).read_bytes()
    tag = b"\x3a\x00\x10\x02DS\x04\x00"  # (003A,0210) ChannelSensitivity, explicit VR LE, 4 bytes
    at = data.index(tag) + len(tag)
    assert data[at:at + 4] == b"1.25"
    path = tmp_path / "sensitivity.dcm"
    path.write_bytes(data[:at] + b"abc " + data[at + 4:])
    _fails(path, "ChannelDefinitionSequence[0].ChannelSensitivity")


def test_missing_sensitivity_units(tmp_path):
    path = _copy(tmp_path, lambda ds: delattr(_channel(ds, 3), "ChannelSensitivityUnitsSequence"))
    _fails(path, "ChannelDefinitionSequence[3].ChannelSensitivityUnitsSequence")


def test_unit_that_is_not_a_voltage(tmp_path):
    def mmhg(ds):
        _channel(ds).ChannelSensitivityUnitsSequence[0].CodeValue = "mm[Hg]"
    _fails(_copy(tmp_path, mmhg), "ChannelSensitivityUnitsSequence[0].CodeValue")


def test_millivolt_unit_baseline_and_correction(tmp_path, record):
    """Channel 0 in mV with correction 2 and baseline 0.5 mV: value = raw * 1.25e-3 * 2 + 0.5."""
    def rescale(ds):
        channel = _channel(ds)
        channel.ChannelSensitivity = "0.00125"
        channel.ChannelSensitivityUnitsSequence[0].CodeValue = "mV"
        channel.ChannelSensitivityCorrectionFactor = "2"
        channel.ChannelBaseline = "0.5"
    edited = read_dicom_ecg(_copy(tmp_path, rescale))
    np.testing.assert_allclose(edited.signal[0], record.signal[0] * 2 + 0.5, atol=1e-5)
    np.testing.assert_array_equal(edited.signal[1:], record.signal[1:])


def test_padding_value_becomes_nan(tmp_path, record):
    def pad(ds):
        samples = np.frombuffer(_rhythm(ds).WaveformData, dtype="<i2").copy()
        samples[:12 * 5] = -32768  # the first 5 samples of every channel
        _rhythm(ds).WaveformData = samples.tobytes()
        _rhythm(ds).add_new(0x5400100A, "OW", np.int16(-32768).tobytes())  # WaveformPaddingValue
    edited = read_dicom_ecg(_copy(tmp_path, pad))
    assert np.isnan(edited.signal[:, :5]).all()
    np.testing.assert_array_equal(edited.signal[:, 5:], record.signal[:, 5:])


def test_group_without_rhythm_label(tmp_path):
    """No RHYTHM label: the only ORIGINAL group is the strip; with two, the reader refuses."""
    relabelled = read_dicom_ecg(_copy(tmp_path, lambda ds: setattr(_rhythm(ds), "MultiplexGroupLabel", "STRIP")))
    assert relabelled.signal.shape == (12, 10000)

    def ambiguous(ds):
        _rhythm(ds).MultiplexGroupLabel = "STRIP"
        ds.WaveformSequence[1].WaveformOriginality = "ORIGINAL"
    _fails(_copy(tmp_path, ambiguous, "ambiguous.dcm"), "MultiplexGroupLabel")


def test_lead_code_and_meaning_disagree(tmp_path):
    def mislabel(ds):
        _channel(ds, 1).ChannelSourceSequence[0].CodeMeaning = "Lead V5"
    error = _fails(_copy(tmp_path, mislabel), "ChannelDefinitionSequence[1].ChannelSourceSequence")
    assert "lead II" in str(error) and "V5" in str(error)


def test_lead_named_from_meaning_with_unknown_code(tmp_path):
    def local_code(ds):
        source = _channel(ds, 2).ChannelSourceSequence[0]
        source.CodingSchemeDesignator, source.CodeValue, source.CodeMeaning = "99LOCAL", "x3", "Lead III"
    assert read_dicom_ecg(_copy(tmp_path, local_code)).channel_names == TWELVE


def test_lead_code_beyond_the_twelve_keeps_its_own_name(tmp_path):
    """SCPECG code 65 is -aVR: named "aVR negated" and dropped, never read as aVR (its code meaning
    "Lead -aVR" alone would normalise to aVR, an inverted lead taken for aVR)."""
    def negate(ds):
        source = _channel(ds, 3).ChannelSourceSequence[0]
        source.CodeValue, source.CodeMeaning = "5.6.3-9-65", "Lead -aVR"
    record = read_dicom_ecg(_copy(tmp_path, negate))
    assert "aVR" not in record.channel_names and record.dropped_channels == ["aVR negated"]
