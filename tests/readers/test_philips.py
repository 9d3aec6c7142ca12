"""Philips XML reader on the two real exports (1.03 UTF-8, 1.04 UTF-16) and on broken copies of them.

The independent decode is ``sierraecg.read_file`` (it parses the XML and walks the XLI blocks
itself); the derived limb leads are checked against the Einthoven/Goldberger identities.
"""
from pathlib import Path

import numpy as np
import pytest
from fixtures import SHARED, need
from helpers import assert_ecg_record, assert_refused_early, assert_lead_matches

from csfm.data.readers.philips import FORMAT, read_philips, sniff
from csfm.data.readers.safe_io import FileFormatError

pytestmark = pytest.mark.data
VENDOR = SHARED / "vendor"
V103 = VENDOR / "philips" / "129DYPRG.XML"
V104 = VENDOR / "philips" / "3191723_ZZDEMOPTONLY_1-04_orig.xml"
TWELVE = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
UV_PER_COUNT = 5.0  # signalresolution / resolution of both files
# file, kept samples (ECG before the calibration tail), text start, patient id, device, version
REAL = [(V103, 5264, "Sinus bradycardia, rate< 50; Nonspecific", "1112010721168bdc", "HeartstartMRx", "1.03"),
        (V104, 5300, "SINUS RHYTHM, normal P axis", "9999", "PageWriter Touch", "1.04")]


@pytest.fixture(scope="module")
def records():
    return {path: read_philips(need(path)) for path, *_ in REAL}


@pytest.fixture(scope="module")
def sierra():
    sierraecg = pytest.importorskip("sierraecg")
    return {path: np.stack([lead.samples for lead in sierraecg.read_file(str(need(path))).leads]).astype(np.int64)
            for path, *_ in REAL}


@pytest.mark.parametrize("path, kept, text, patient, device, version", REAL, ids=["1.03", "1.04"])
def test_real_file_fields(records, path, kept, text, patient, device, version):
    record = records[path]
    assert_ecg_record(record, 500.0, TWELVE, kept)
    assert record.record_id == path.stem and record.patient_id == patient
    assert record.text.startswith(text) and record.text.count("; ") >= 2
    meta = record.metadata
    assert meta["format"] == FORMAT and meta["source_file"] == str(path)
    assert meta["device"] == device and meta["format_version"] == version
    assert meta["stored_duration_s"] == 11.0  # durationperchannel 11000 ms
    assert meta["calibration_tail_start_s"] == pytest.approx(kept / 500)
    # the tail's square pulse is the carts' 1 mV calibration: 200 counts x 5 uV, so the scaling is right
    assert meta["calibration_pulse_mV"] == pytest.approx(1.0)
    assert np.isfinite(record.signal).all()


@pytest.mark.parametrize("path", [V103, V104], ids=["1.03", "1.04"])
def test_stored_leads_equal_sierraecg_in_mv(records, sierra, path):
    """I, II, V1..V6 are not derived: they equal sierraecg's counts x 5 uV at every kept sample."""
    ours, counts = records[path].signal, sierra[path]
    n = ours.shape[1]
    for row in (0, 1, 6, 7, 8, 9, 10, 11):
        assert_lead_matches(ours[row], counts[row, :n] * UV_PER_COUNT / 1000, TWELVE[row])
    assert 0.5 < np.ptp(ours[1]) < 5.0  # an R wave of a few mV, not uV or V


@pytest.mark.parametrize("path, iii_counts", [(V103, 2), (V104, 0)], ids=["1.03", "1.04"])
def test_derived_leads_follow_einthoven_and_goldberger(records, path, iii_counts):
    """III = II - I and aV* = the Goldberger means of the limb leads, within the cart's rounding
    (the 1.03 cart stores III with up to 2 counts of its own)."""
    lead_i, lead_ii, lead_iii, avr, avl, avf = (records[path].signal[k].astype(np.float64) for k in range(6))
    count = UV_PER_COUNT / 1000
    assert np.abs(lead_iii - (lead_ii - lead_i)).max() <= iii_counts * count + 1e-6
    for derived, exact in ((avr, -(lead_i + lead_ii) / 2), (avl, (lead_i - lead_iii) / 2),
                           (avf, (lead_ii + lead_iii) / 2)):
        assert np.abs(derived - exact).max() <= 1.5 * count + 1e-6
        assert np.corrcoef(derived, exact)[0, 1] > 0.999


def test_halves_truncate_toward_zero_unlike_sierraecg(records, sierra):
    """On the 1.04 file every rebuilt aVL/aVF lies within half a count of the identity; the
    library's floored halves put some samples 1.5 counts low."""
    signal = records[V104].signal.astype(np.float64) * 1000 / UV_PER_COUNT  # back to counts
    lead_i, lead_ii, lead_iii, _, avl, avf = signal[:6]
    assert np.abs(avl - (lead_i - lead_iii) / 2).max() <= 0.5 + 1e-3
    assert np.abs(avf - (lead_ii + lead_iii) / 2).max() <= 0.5 + 1e-3
    library = sierra[V104][:, :signal.shape[1]]
    assert np.abs(library[5] - (library[1] + library[2]) / 2).max() == 1.5


def test_rhythm_strip_not_the_representative_beats(records):
    """1.04 also carries 1200-sample repbeats; the Record is the 10.6 s strip."""
    assert records[V104].signal.shape[1] == 5300 and "median_beats" not in records[V104].metadata


def test_mapping_drops_a_lead():
    record = read_philips(need(V103), mapping={"V6": None})
    assert record.channel_names == TWELVE[:11] and record.dropped_channels == ["V6"]


# ---------------------------------------------------------------- sniff
def test_sniff_other_encodings_and_garbage():
    doc = '<?xml version="1.0"?>\n<!-- export -->\n<restingecgdata xmlns="http://www3.medical.philips.com">'
    assert sniff(doc.encode("utf-16-be"))  # no byte-order mark
    assert sniff(b"\xfe\xff" + doc.encode("utf-16-be"))
    assert sniff(b"\xef\xbb\xbf" + doc.encode())
    assert not sniff(b"<RestingECG><restingecgdata/></RestingECG>")
    assert not sniff(b"") and not sniff(b"\xff\xfe\x00") and not sniff(bytes(range(256)) * 16)


# ---------------------------------------------------------------- hostile inputs
def _text(path: Path) -> str:
    data = need(path).read_bytes()
    return data.decode("utf-16") if data.startswith(b"\xff\xfe") else data.decode("utf-8")


def _write(tmp_path: Path, text: str, encoding: str = "utf-8", name: str = "broken.xml") -> Path:
    target = tmp_path / name
    target.write_bytes(text.encode(encoding))
    return target


def _edit(source: Path, old: str, new: str) -> str:
    text = _text(source)
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _fails(path: Path, field: str) -> FileFormatError:
    """read_philips(path) raises FileFormatError naming path and ``field``, under 100 MB."""
    return assert_refused_early(read_philips, FORMAT, path, field=field)


def _base64(text: str) -> str:
    start = text.index(">", text.index("<parsedwaveforms")) + 1
    return text[start:text.index("</parsedwaveforms>")]


def test_duration_claiming_a_billion_samples(tmp_path):
    text = _edit(V103, 'durationperchannel="11000"', f'durationperchannel="{2 * 10 ** 9}"')  # 10**9 samples
    _fails(_write(tmp_path, text), "parsedwaveforms@durationperchannel")


def test_duration_longer_than_the_blocks_decode_to(tmp_path):
    text = _edit(V103, 'durationperchannel="11000"', 'durationperchannel="12000"')
    assert "5500 samples for the 6000" in str(_fails(_write(tmp_path, text), "XLI block 0"))


def test_more_channels_than_blocks(tmp_path):
    labels = " ".join(TWELVE + [f"X{k}" for k in range(13, 41)])
    text = _edit(V104, 'numberofleads="12" leadlabels="I II III aVR aVL aVF V1 V2 V3 V4 V5 V6"',
                 f'numberofleads="40" leadlabels="{labels}"')
    assert "states 40 channels but the file holds 16" in str(
        _fails(_write(tmp_path, text, "utf-16"), "XLI blocks"))


def test_more_leads_than_labels(tmp_path):
    text = _edit(V104, 'numberofleads="12"', 'numberofleads="1000"')
    _fails(_write(tmp_path, text, "utf-16"), "parsedwaveforms@numberofleads")


@pytest.mark.parametrize("keep, field", [(10001, "parsedwaveforms"), (10000, "XLI block")],
                         ids=["not-base64", "cut-block"])
def test_truncated_waveform_block(tmp_path, keep, field):
    text = _text(V103)
    payload = "".join(_base64(text).split())
    _fails(_write(tmp_path, text.replace(_base64(text), payload[:keep])), field)


@pytest.mark.parametrize("old, new, field", [
    ("<signalresolution>5</signalresolution>", "<signalresolution>five</signalresolution>",
     "signalcharacteristics/signalresolution"),
    ("<samplingrate>500</samplingrate>", "<samplingrate>-500</samplingrate>", "signalcharacteristics/samplingrate"),
    ('compressmethod="XLI"', 'compressmethod="ZIP"', "parsedwaveforms@compressmethod"),
    ('durationperchannel="11000" ', "", "parsedwaveforms@durationperchannel"),
    ("<acquisitiontype>STD-12</acquisitiontype>", "<acquisitiontype>3-LEAD</acquisitiontype>",
     "signalcharacteristics/acquisitiontype"),
    ("<restingecgdata ", "<restingecg ", "root element"),
], ids=["non-numeric-resolution", "negative-fs", "compression", "no-duration", "lead-set", "root"])
def test_bad_fields(tmp_path, old, new, field):
    text = _edit(V103, old, new)
    if old == "<restingecgdata ":
        text = text.replace("</restingecgdata>", "</restingecg>")
    _fails(_write(tmp_path, text), field)


def test_missing_signal_characteristics(tmp_path):
    text = _text(V103)
    start, stop = text.index("<signalcharacteristics>"), text.index("</signalcharacteristics>")
    text = text[:start] + text[stop + len("</signalcharacteristics>"):]
    _fails(_write(tmp_path, text), "dataacquisition/signalcharacteristics")


def test_fields_that_disagree(tmp_path):
    text = _edit(V104, 'samplespersecond="500" resolution="5"', 'samplespersecond="500" resolution="2.5"')
    error = _fails(_write(tmp_path, text, "utf-16"), "parsedwaveforms@resolution")
    assert "disagree" in str(error)


def test_labels_that_are_not_the_limb_leads_first(tmp_path):
    """The residual coding of III..aVF is only known for the I, II, III, aVR, aVL, aVF order."""
    text = _edit(V104, 'leadlabels="I II III aVR', 'leadlabels="II I III aVR')
    _fails(_write(tmp_path, text, "utf-16"), "lead labels")
