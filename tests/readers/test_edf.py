"""EDF / EDF+ / BDF reader: files written here by edfio (an independent writer and decoder)
and by a minimal numpy writer below (which sets every header field by hand, so hostile
files are easy), plus real WFDB recordings converted to EDF.

Expected physical values are computed in the tests from the fields the test wrote:
physical = pmin + (digital - dmin) * (pmax - pmin) / (dmax - dmin).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import edfio
import numpy as np
import pytest
import wfdb
from fixtures import PHYSIONET, SHARED, need
from helpers import assert_refused_early

from csfm.data.readers.edf import FORMAT, read_edf, sniff
from csfm.data.readers.safe_io import FileFormatError
from csfm.data.record import CHANNEL_TYPE_NAMES

T = {name: index for index, name in enumerate(CHANNEL_TYPE_NAMES)}


# ---------------------------------------------------------------- a minimal EDF/BDF writer
@dataclass
class Sig:
    """One signal for write_edf: ``digital`` [records, spr] ints, or ``annotations`` (raw TAL
    bytes per record) for an annotation signal. Header fields are written as given."""

    label: str | bytes
    digital: np.ndarray | None = None
    dimension: str | bytes = "mV"
    pmin: str = "-10"
    pmax: str = "10"
    dmin: str = "-32768"
    dmax: str = "32767"
    spr: str | None = None  # default: from digital / annotations
    prefiltering: str = ""
    annotations: list[bytes] = field(default_factory=list)


def _field(value: str | bytes, width: int) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("ascii")
    assert len(raw) <= width, (value, width)
    return raw.ljust(width, b" ")


def _bytes(sig: Sig, r: int, bdf: bool) -> bytes:
    width = 3 if bdf else 2
    if sig.digital is None:
        size = -(-max(len(a) for a in sig.annotations) // width) * width
        return sig.annotations[r].ljust(size, b"\x00")
    d = sig.digital[r].astype(np.int64)
    if not bdf:
        return d.astype("<i2").tobytes()
    return np.stack([d & 0xFF, (d >> 8) & 0xFF, (d >> 16) & 0xFF], axis=-1).astype(np.uint8).tobytes()


def write_edf(path: Path, signals: list[Sig], *, bdf: bool = False, duration: str = "1", reserved: str = "",
              patient: str | bytes = "X", recording: str = "", startdate: str = "01.02.23",
              starttime: str = "10.20.30", n_records: str | None = None, header_bytes: str | None = None,
              n_signals: str | None = None, version: bytes | None = None) -> Path:
    """Write ``signals`` as an EDF (or BDF) file; the keyword fields override the header."""
    records = len(signals[0].digital if signals[0].digital is not None else signals[0].annotations)
    blocks = [_bytes(s, r, bdf) for r in range(records) for s in signals]
    per_record = [len(blocks[k]) // (3 if bdf else 2) for k in range(len(signals))]
    ns = len(signals)
    head = (version or (b"\xffBIOSEMI" if bdf else b"0       ")) + _field(patient, 80) + _field(recording, 80)
    head += _field(startdate, 8) + _field(starttime, 8) + _field(header_bytes or str(256 * (ns + 1)), 8)
    head += _field(reserved or ("24BIT" if bdf else ""), 44) + _field(n_records or str(records), 8)
    head += _field(duration, 8) + _field(n_signals or str(ns), 4)
    columns = [("label", 16), ("transducer", 80), ("dimension", 8), ("pmin", 8), ("pmax", 8), ("dmin", 8),
               ("dmax", 8), ("prefiltering", 80), ("spr", 8), ("reserved", 32)]
    for name, width in columns:
        for k, s in enumerate(signals):
            value = {"transducer": "", "reserved": "", "spr": s.spr or str(per_record[k])}.get(name)
            head += _field(getattr(s, name) if value is None else value, width)
    path.write_bytes(head + b"".join(blocks))
    return path


def physical(sig: Sig) -> np.ndarray:
    """The test's own decode of a written signal: [records * spr] float64."""
    pmin, pmax, dmin, dmax = float(sig.pmin), float(sig.pmax), int(sig.dmin), int(sig.dmax)
    return pmin + (sig.digital.ravel() - dmin) * (pmax - pmin) / (dmax - dmin)


def tal(onset: str, *texts: str) -> bytes:
    """An EDF+ time-stamped annotation list: the time-keeping one when ``texts`` is empty."""
    return onset.encode() + b"\x14" + b"\x14".join(t.encode() for t in texts or ("",)) + b"\x14\x00"


def random_digital(records: int, spr: int, seed: int, low: int = -32768, high: int = 32767) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, size=(records, spr))


def sine_digital(records: int, spr: int, period: float = 37.0) -> np.ndarray:
    n = np.arange(records * spr)
    return np.round(20000 * np.sin(2 * np.pi * n / period)).astype(np.int64).reshape(records, spr)


# ---------------------------------------------------------------- edfio-written EDF+C
@pytest.fixture
def holter(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """An EDF+C file written by edfio: 10 s at 256 Hz of ECG I (uV), EKG (mV), EEG, Pleth,
    and Resp at 64 Hz, with patient code, start date/time, equipment and one annotation."""
    t = np.arange(2560) / 256
    data = {"ECG I": 800 * np.sin(2 * np.pi * 1.2 * t), "EKG": 1.5 * np.cos(2 * np.pi * 1.1 * t),
            "EEG Fp1": 30 * np.sin(2 * np.pi * 10 * t), "Pleth": 50 + 40 * np.sin(2 * np.pi * 1.2 * t + 1),
            "Resp": np.sin(2 * np.pi * 0.25 * t[::4])}
    dims = {"ECG I": "uV", "EKG": "mV", "EEG Fp1": "uV", "Pleth": "NU", "Resp": ""}
    signals = [edfio.EdfSignal(x, 256 if name != "Resp" else 64, label=name, physical_dimension=dims[name],
                               prefiltering="HP:0.05Hz LP:40Hz" if name == "ECG I" else "")
               for name, x in data.items()]
    edf = edfio.Edf(signals, patient=edfio.Patient(code="P-0042", sex="F", name="Jane"),
                    recording=edfio.Recording(startdate=datetime.date(2023, 2, 1), equipment_code="HolterX"),
                    starttime=datetime.time(10, 20, 30), annotations=[edfio.EdfAnnotation(1.0, None, "button")])
    path = tmp_path / "holter_01.edf"
    edf.write(path)
    return path, data


def test_edfio_file_labels_fs_units_dropped_and_ids(holter):
    path, _ = holter
    record = read_edf(path)
    assert record.channel_names == ["ECG I", "EKG", "Pleth"]
    assert record.channel_types == [T["I"], T["II"], T["PPG"]]
    assert record.modalities == ["ECG", "ECG", "PPG"]
    assert record.units == ["mV", "mV", "NU"]
    assert record.dropped_channels == ["EEG Fp1", "Resp", "EDF Annotations"]
    assert record.fs == 256.0 and record.signal.shape == (3, 2560) and record.signal.dtype == np.float32
    assert record.duration_s == 10.0
    assert (record.record_id, record.patient_id, record.text) == ("holter_01", "P-0042", "")
    assert record.metadata["format"] == "EDF+" and record.metadata["source_file"] == str(path)
    assert record.metadata["acquired"] == "2023-02-01T10:20:30"
    assert record.metadata["device"] == "HolterX"
    assert record.metadata["prefiltering"] == {"ECG I": "HP:0.05Hz LP:40Hz"}
    assert "gaps_s" not in record.metadata


def test_edfio_file_values_within_resolution_and_equal_to_edfio_decode(holter):
    path, data = holter
    record = read_edf(path)
    reference = edfio.read_edf(path)
    for row, (name, to_file_units) in enumerate([("ECG I", 1e3), ("EKG", 1.0), ("Pleth", 1.0)]):
        signal = reference.get_signal(name)
        resolution = (signal.physical_max - signal.physical_min) / (signal.digital_max - signal.digital_min)
        expected = data[name] / to_file_units
        assert np.abs(record.signal[row] - expected).max() <= resolution / to_file_units * 0.51 + 1e-6
        np.testing.assert_allclose(record.signal[row], signal.data / to_file_units, rtol=1e-6, atol=1e-7)


def test_mapping_overrides_and_holter_channel_numbers(tmp_path):
    digital = sine_digital(4, 100)
    path = write_edf(tmp_path / "h.edf", [Sig("ECG1", digital), Sig("ECG2", digital), Sig("EKG", digital)])
    record = read_edf(path)
    assert record.channel_names == ["EKG"] and record.channel_types == [T["II"]]
    assert record.dropped_channels == ["ECG1", "ECG2"]
    mapped = read_edf(path, mapping={"ECG1": "II", "ecg2": "V5", "EKG": None})
    assert mapped.channel_names == ["ECG1", "ECG2"]
    assert mapped.channel_types == [T["II"], T["V5"]] and mapped.dropped_channels == ["EKG"]


# ---------------------------------------------------------------- numpy-crafted files
def test_crafted_edf_decodes_by_the_header_scale(tmp_path):
    ecg = Sig("ECG II", random_digital(5, 200, 1, -2048, 2047), pmin="-5", pmax="12.5", dmin="-2048", dmax="2047")
    ppg = Sig("PPG", random_digital(5, 200, 2), dimension="%", pmin="0", pmax="100")
    path = write_edf(tmp_path / "plain.edf", [ecg, ppg], duration="0.5", patient="Jane Doe 1234",
                     startdate="31.12.99", starttime="23.59.58")
    record = read_edf(path)
    assert record.fs == 400.0 and record.signal.shape == (2, 1000)
    assert record.units == ["mV", "%"]
    np.testing.assert_allclose(record.signal[0], physical(ecg), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(record.signal[1], physical(ppg), rtol=1e-6, atol=1e-5)
    assert record.metadata["format"] == "EDF" and record.patient_id == "Jane Doe 1234"  # plain EDF: the whole field
    assert record.metadata["acquired"] == "1999-12-31T23:59:58"
    reference = edfio.read_edf(path)
    np.testing.assert_allclose(record.signal[0], reference.signals[0].data, rtol=1e-6, atol=1e-6)


UNITS = [("mV", "-5", "5"), ("uV", "-5000", "5000"), ("UV", "-5000", "5000"), (b"\xb5V", "-5000", "5000"),
         ("µV".encode(), "-5000", "5000"), ("V", "-0.005", "0.005"), ("nV", "-5000000", "5000000")]


@pytest.mark.parametrize("dimension, pmin, pmax", UNITS, ids=[str(u[0]) for u in UNITS])
def test_ecg_units_converted_to_millivolts(tmp_path, dimension, pmin, pmax):
    digital = sine_digital(3, 250)
    millivolts = physical(Sig("ECG II", digital, pmin="-5", pmax="5"))
    path = write_edf(tmp_path / "u.edf", [Sig("ECG II", digital, dimension=dimension, pmin=pmin, pmax=pmax)])
    record = read_edf(path)
    assert record.units == ["mV"]
    np.testing.assert_allclose(record.signal[0], millivolts, rtol=1e-6, atol=1e-7)
    assert np.abs(record.signal[0]).max() > 3  # really mV: the sine reaches 20000 / 32767.5 * 5 = 3.05


@pytest.mark.parametrize("dimension", ["mmHg", "", "uv/s"])
def test_unknown_ecg_dimension_names_signal_and_field(tmp_path, dimension):
    path = write_edf(tmp_path / "bad_unit.edf", [Sig("Pleth", sine_digital(2, 50), dimension=dimension),
                                                 Sig("ECG II", sine_digital(2, 50), dimension=dimension)])
    with pytest.raises(FileFormatError, match=r"signal 2 \('ECG II'\) physical dimension") as error:
        read_edf(path)
    assert error.value.path == path and error.value.fmt == "EDF"
    assert read_edf(path, mapping={"ECG II": None}).units == [dimension]  # PPG: units as given


def test_mixed_rates_keep_the_highest_rate_and_list_the_others(tmp_path):
    ecg = Sig("ECG II", sine_digital(4, 256))
    v1 = Sig("ECG V1", random_digital(4, 256, 3))
    ppg = Sig("Pleth", random_digital(4, 64, 4), dimension="NU", pmin="0", pmax="1")
    resp = Sig("Resp", random_digital(4, 32, 5), dimension="")
    path = write_edf(tmp_path / "mixed.edf", [ecg, ppg, v1, resp])
    record = read_edf(path)
    assert record.fs == 256.0 and record.channel_names == ["ECG II", "ECG V1"]
    assert record.dropped_channels == ["Resp", "Pleth (64 Hz; kept channels are at 256 Hz)"]
    np.testing.assert_allclose(record.signal[1], physical(v1), rtol=1e-6, atol=1e-6)
    ppg_only = read_edf(path, mapping={"ECG II": None, "ECG V1": None})
    assert ppg_only.fs == 64.0 and ppg_only.channel_names == ["Pleth"] and ppg_only.units == ["NU"]
    np.testing.assert_allclose(ppg_only.signal[0], physical(ppg), rtol=1e-6, atol=1e-6)


def _discontinuous(tmp_path: Path, onsets: list[str], reserved: str = "EDF+D", name: str = "d.edf"):
    ecg = Sig("ECG II", random_digital(len(onsets), 10, 6))
    notes = [tal(onset) + (tal("1.5", "Arousal") if k == 1 else b"") for k, onset in enumerate(onsets)]
    ann = Sig("EDF Annotations", annotations=notes, dimension="", pmin="-1", pmax="1")
    return write_edf(tmp_path / name, [ecg, ann], reserved=reserved, patient="MCH-0234567 F 02-MAY-1951 Haagse_Harry",
                     recording="Startdate 02-MAR-2002 PSG-1234/2002 NN Telemetry03"), ecg


def test_edf_plus_d_places_records_at_their_onsets_with_nan_gaps(tmp_path):
    path, ecg = _discontinuous(tmp_path, ["+0", "+1", "+4.5"])
    record = read_edf(path)
    assert record.metadata["format"] == "EDF+" and record.fs == 10.0
    assert record.signal.shape == (1, 55)  # 4.5 s onset + 1 s record at 10 Hz
    expected = physical(ecg)
    np.testing.assert_allclose(record.signal[0, :20], expected[:20], rtol=1e-6, atol=1e-6)
    assert np.isnan(record.signal[0, 20:45]).all()
    np.testing.assert_allclose(record.signal[0, 45:], expected[20:], rtol=1e-6, atol=1e-6)
    assert record.metadata["gaps_s"] == [[2.0, 2.5]]
    assert record.dropped_channels == ["EDF Annotations"]
    assert record.patient_id == "MCH-0234567" and record.metadata["device"] == "Telemetry03"
    assert record.metadata["acquired"] == "2002-02-01T10:20:30"  # the 4-digit year of "Startdate 02-MAR-2002"


def test_edf_plus_d_late_first_record_and_edf_plus_c_join(tmp_path):
    late, ecg = _discontinuous(tmp_path, ["+0.5", "+1.5", "+2.5"])
    record = read_edf(late)
    assert np.isnan(record.signal[0, :5]).all() and record.metadata["gaps_s"] == [[0.0, 0.5]]
    np.testing.assert_allclose(record.signal[0, 5:], physical(ecg), rtol=1e-6, atol=1e-6)
    joined, ecg = _discontinuous(tmp_path, ["+0", "+1", "+2"], reserved="EDF+C", name="c.edf")
    record = read_edf(joined)
    assert record.signal.shape == (1, 30) and np.isfinite(record.signal).all()
    assert "gaps_s" not in record.metadata


@pytest.mark.parametrize("onsets, record_k", [(["+0", "+0.5", "+3"], 2), (["+0", "+3", "+2"], 3)])
def test_edf_plus_d_overlapping_records_are_an_error(tmp_path, onsets, record_k):
    path, _ = _discontinuous(tmp_path, onsets)
    with pytest.raises(FileFormatError, match=f"EDF Annotations time-keeping onset of data record {record_k}: "):
        read_edf(path)


def test_bdf_24_bit_samples(tmp_path):
    digital = random_digital(3, 128, 7, -2 ** 23, 2 ** 23 - 1)
    digital[0, :4] = [-2 ** 23, 2 ** 23 - 1, -1, 0]
    ecg = Sig("ECG II", digital, dimension="uV", pmin="-262144", pmax="262143", dmin="-8388608", dmax="8388607")
    path = write_edf(tmp_path / "biosemi.bdf", [ecg], bdf=True, duration="0.25")
    record = read_edf(path)
    assert record.metadata["format"] == "BDF" and record.fs == 512.0 and record.units == ["mV"]
    np.testing.assert_allclose(record.signal[0], physical(ecg) / 1e3, rtol=1e-6, atol=1e-6)
    assert record.signal[0, 0] == pytest.approx(-262.144) and record.signal[0, 1] == pytest.approx(262.143)
    np.testing.assert_allclose(record.signal[0], edfio.read_bdf(path).signals[0].data / 1e3, rtol=1e-6, atol=1e-6)


def test_bdf_plus_written_by_edfio(tmp_path):
    x = np.sin(np.arange(1000) / 7.0)
    bdf = edfio.Bdf([edfio.BdfSignal(x, 100, label="ECG V2", physical_dimension="mV")],
                    patient=edfio.Patient(code="B7"), annotations=[edfio.EdfAnnotation(2, None, "x")])
    path = tmp_path / "plus.bdf"
    bdf.write(path)
    record = read_edf(path)
    assert record.metadata["format"] == "BDF+" and record.channel_types == [T["V2"]] and record.patient_id == "B7"
    assert record.dropped_channels == ["BDF Annotations"]
    assert np.abs(record.signal[0] - x).max() < 1e-6  # 24-bit resolution of a +-1 mV range


# ---------------------------------------------------------------- real WFDB recordings as EDF
ROUND_TRIP = [("ptbdb/s0010_re", ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"],
               ["vx", "vy", "vz"]),
              ("challenge2015/a103l", ["II", "V", "PLETH"], [])]


@pytest.mark.data
@pytest.mark.parametrize("name, kept, dropped", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_real_wfdb_recording_round_trip_within_edf_resolution(tmp_path, name, kept, dropped):
    source = wfdb.rdrecord(str(need(PHYSIONET / name)))
    signals = []
    for label, units, x in zip(source.sig_name, source.units, source.p_signal.T):
        volts = units == "mV"  # ECG written in uV to exercise the conversion
        signals.append(edfio.EdfSignal(x * 1e3 if volts else x, source.fs, label=f"ECG {label}" if volts else label,
                                       physical_dimension="uV" if volts else units))
    path = tmp_path / f"{Path(name).name}.edf"
    edfio.Edf(signals, data_record_duration=0.1).write(path)
    record = read_edf(path)
    assert record.fs == source.fs and record.signal.shape == (len(kept), source.sig_len)
    assert record.duration_s == pytest.approx(source.sig_len / source.fs)
    assert record.channel_names == [f"ECG {n}" if n != "PLETH" else n for n in kept]
    assert record.units == ["mV" if n != "PLETH" else "NU" for n in kept]
    assert record.dropped_channels == [f"ECG {n}" for n in dropped]
    written = edfio.read_edf(path)
    for row, label in enumerate(kept):
        signal = written.signals[source.sig_name.index(label)]
        scale = 1e3 if label != "PLETH" else 1.0
        resolution = (signal.physical_max - signal.physical_min) / (signal.digital_max - signal.digital_min) / scale
        truth = source.p_signal[:, source.sig_name.index(label)]
        assert np.abs(record.signal[row] - truth).max() <= 0.51 * resolution + 1e-6
    lead_ii = record.signal[record.channel_types.index(T["II"])]
    truth_ii = source.p_signal[:, [n.lower() for n in source.sig_name].index("ii")]
    assert np.corrcoef(lead_ii, truth_ii)[0, 1] >= 0.999


# ---------------------------------------------------------------- hostile inputs
def _valid() -> list[Sig]:
    """4 s at 250 Hz: ECG II (kept) and EEG Fp1 (dropped)."""
    return [Sig("ECG II", sine_digital(4, 250)), Sig("EEG Fp1", sine_digital(4, 250))]


def _with(signal_field: str, value: str | bytes):
    def edit(signals: list[Sig]) -> None:
        setattr(signals[0], signal_field, value)
    return edit


HOSTILE = [  # id, signal edit, header overrides, truncate bytes, expected field in the message
    ("99999999 records", None, {"n_records": "99999999"}, 0, "number of data records"),
    ("1E9 records", None, {"n_records": "1E9"}, 0, "number of data records"),
    ("1e9 samples per record", _with("spr", "99999999"), {}, 0, "number of data records"),
    ("truncated record", None, {}, 7, "number of data records"),
    ("extra bytes", None, {"n_records": "3"}, 0, "number of data records"),
    ("-1 records, truncated", None, {"n_records": "-1"}, 3, "number of data records"),
    ("non-numeric physical min", _with("pmin", "abc"), {}, 0, "signal 1 ('ECG II') physical minimum"),
    ("digital min == max", _with("dmin", "32767"), {}, 0, "signal 1 ('ECG II') digital maximum"),
    ("physical min == max", _with("pmax", "-10"), {}, 0, "signal 1 ('ECG II') physical maximum"),
    ("digital min outside int16", _with("dmin", "-40000"), {}, 0, "signal 1 ('ECG II') digital minimum"),
    ("non-ASCII label", _with("label", "ECG II".encode() + b"\xe9"), {}, 0, "signal 1 label"),
    ("non-ASCII patient", None, {"patient": "M\u00fcller".encode("latin-1")}, 0, "local patient identification"),
    ("zero samples per record", _with("spr", "0"), {}, 0, "signal 1 ('ECG II') samples per data record"),
    ("non-numeric samples per record", _with("spr", "2.5e2"), {}, 0, "signal 1 ('ECG II') samples per data record"),
    ("zero record duration", None, {"duration": "0"}, 0, "duration of a data record"),
    ("header length", None, {"header_bytes": "512"}, 0, "number of bytes in header"),
    ("9999 signals", None, {"n_signals": "9999"}, 0, "number of signals"),
    ("version", None, {"version": b"1       "}, 0, "version"),
    ("start date", None, {"startdate": "31.02.23"}, 0, "startdate of recording"),
    ("start time", None, {"starttime": "10:20:30"}, 0, "starttime of recording"),
    ("start hour", None, {"starttime": "25.20.30"}, 0, "starttime of recording"),
    ("no usable channel", _with("label", "EMG chin"), {}, 0, "signal labels"),
]


@pytest.mark.parametrize("edit, header, cut, expected", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_header_is_refused_naming_the_field(tmp_path, edit, header, cut, expected):
    signals = _valid()
    if edit:
        edit(signals)
    path = write_edf(tmp_path / "hostile.edf", signals, **header)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    _assert_refused_early(path, expected)


def test_hostile_bdf_names_bdf(tmp_path):
    ecg = Sig("ECG II", random_digital(2, 64, 8, -2 ** 23, 2 ** 23 - 1), dmin="-8388609", dmax="8388607")
    _assert_refused_early(write_edf(tmp_path / "range.bdf", [ecg], bdf=True), "signal 1 ('ECG II') digital minimum")
    ecg.dmin = "-8388608"
    path = write_edf(tmp_path / "cut.bdf", [ecg], bdf=True)
    path.write_bytes(path.read_bytes()[:-2])
    error = _assert_refused_early(path, "number of data records")
    assert error.fmt == "BDF"


def test_huge_discontinuous_onset_fails_fast(tmp_path):
    path, _ = _discontinuous(tmp_path, ["+0", "+1", "+100000000000"])
    _assert_refused_early(path, "EDF Annotations time-keeping onset of data record 3")


def test_discontinuous_without_timekeeping_fails(tmp_path):
    path = write_edf(tmp_path / "d.edf", [Sig("ECG II", sine_digital(2, 10))], reserved="EDF+D")
    _assert_refused_early(path, "reserved")
    ecg = Sig("ECG II", sine_digital(2, 10))
    broken = Sig("EDF Annotations", annotations=[tal("+0"), b"garbage\x00"], dimension="")
    path = write_edf(tmp_path / "t.edf", [ecg, broken], reserved="EDF+D")
    _assert_refused_early(path, "EDF Annotations time-keeping onset of data record 2")


def test_missing_and_short_files(tmp_path):
    _assert_refused_early(tmp_path / "absent.edf", "file")
    short = tmp_path / "short.edf"
    short.write_bytes(b"0       " + b" " * 100)
    _assert_refused_early(short, "header")


def test_number_of_records_minus_one_is_derived_from_the_file_size(tmp_path):
    signals = _valid()
    record = read_edf(write_edf(tmp_path / "open.edf", signals, n_records="-1"))
    assert record.signal.shape == (1, 1000)
    np.testing.assert_allclose(record.signal[0], physical(signals[0]), rtol=1e-6, atol=1e-6)


def _assert_refused_early(path: Path, expected_field: str) -> FileFormatError:
    """read_edf(path) fails fast (``assert_refused_early``) naming ``expected_field``; the format
    named is the one the file is written in (BDF for a .bdf here)."""
    return assert_refused_early(read_edf, "BDF" if path.suffix == ".bdf" else "EDF", path, field=expected_field)


# ---------------------------------------------------------------- sniff
def test_sniff_edf_bdf_and_others(tmp_path, holter):
    signals = _valid()
    assert FORMAT == "EDF"
    assert sniff(write_edf(tmp_path / "a.edf", signals).read_bytes()[:4096])
    assert sniff(write_edf(tmp_path / "b.bdf", [Sig("ECG", sine_digital(2, 8))], bdf=True).read_bytes()[:4096])
    assert sniff(holter[0].read_bytes()[:4096])
    header = write_edf(tmp_path / "c.edf", signals).read_bytes()
    for head in (b"", b"0", b"0       ", header[:184], header[:184] + b"abc     ", header[:184] + b"100     ",
                 b"\xffBIOSEM", b"s0010_re 15 1000 38400\ns0010_re.dat 16 2000 16 0 -489 -8337 0 i\n",
                 b"<?xml version='1.0'?><RestingECG/>", bytes(range(256)) * 16):
        assert not sniff(head), head[:40]


@pytest.mark.data
def test_sniff_false_for_real_vendor_and_wfdb_files():
    files = [PHYSIONET / "ptbdb" / "s0010_re.hea", PHYSIONET / "ptbdb" / "s0010_re.dat",
             SHARED / "vendor" / "ge_muse" / "muse_ecg.xml", SHARED / "vendor" / "philips" / "129DYPRG.XML",
             SHARED / "vendor" / "hl7_aecg" / "Example_aECG.xml", SHARED / "vendor" / "dicom_ecg" / "waveform_ecg.dcm",
             SHARED / "vendor" / "scp_ecg" / "ECGToolkit_Example.scp"]
    for path in files:
        with need(path).open("rb") as file:
            assert not sniff(file.read(4096)), path
