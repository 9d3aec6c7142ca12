"""Preprocessing pipeline: config checks, resample -> band-pass -> z-score by channel type,
validity, windows (padding, dropping, stride), what of a record is usable (RecordCheck),
and whole real records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csfm.data.preprocess import (PreprocessConfig, RecordCheck, Windows, make_windows, preprocess_record,
                             preprocess_signal)
from csfm.data.record import PPG_TYPE, Record
from csfm_kernels.signal import bandpass, resample, zscore

PHYSIONET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "physionet"
II, V1, V5 = 1, 6, 10


def _signal(n_channels: int, seconds: float, fs: float, seed: int = 0) -> np.ndarray:
    """[C, T] float32 test signal: a few tones over a wandering baseline, in mV-like units."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fs)) / fs
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (1.2, 7.0, 25.0))
    return (tones + np.cumsum(rng.standard_normal((n_channels, len(t))), axis=1) * 0.01).astype(np.float32)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    ({"target_fs": 0.0}, "target_fs"), ({"target_fs": float("nan")}, "target_fs"),
    ({"window": 0}, "window"), ({"window": 2.5}, "window"),
    ({"ecg_band": (40.0, 0.5)}, "ecg_band"), ({"ecg_band": (0.5, 125.0)}, "ecg_band"),
    ({"ppg_band": (0.0, 8.0)}, "ppg_band"),
    ({"filter_order": 0}, "filter_order"), ({"std_floor": 0.0}, "std_floor"),
    ({"min_valid_fraction": 1.5}, "min_valid_fraction"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_config_defaults_are_the_reference_model():
    c = PreprocessConfig()
    assert (c.target_fs, c.window, c.ecg_band, c.ppg_band, c.filter_order) == (250.0, 2500, (0.5, 40.0), (0.5, 8.0), 2)


# ----------------------------------------------------------------------------- preprocess_signal


def test_signal_is_resampled_filtered_by_type_and_zscored():
    x = _signal(3, 12.0, 500.0)
    types = [II, V5, PPG_TYPE]
    out, valid = preprocess_signal(x, 500.0, types)
    assert out.shape == valid.shape == (3, 3000) and out.dtype == np.float32 and valid.dtype == np.bool_
    at_250 = resample(x, 500.0, 250.0, band_hz=1.5 * 40.0)  # kept band: 1.5 x the highest band-pass edge
    ecg = zscore(bandpass(at_250[:2], 250.0, 0.5, 40.0), 1e-3)
    ppg = zscore(bandpass(at_250[2:], 250.0, 0.5, 8.0), 1e-3)
    np.testing.assert_array_equal(out, np.concatenate([ecg, ppg]))
    assert valid.all()
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=1), 1.0, atol=1e-4)


def test_gaps_become_invalid_zeros_and_stay_local():
    x = _signal(2, 20.0, 360.0)
    x[0, 3600:3960] = np.nan  # 1 s gap from 10 s
    out, valid = preprocess_signal(x, 360.0, [II, V1])
    invalid_s = np.flatnonzero(~valid[0]) / 250.0
    assert valid[1].all() and (out[0][~valid[0]] == 0).all() and np.isfinite(out).all()
    assert 9.9 < invalid_s.min() <= 10.0 and 11.0 <= invalid_s.max() < 11.1  # gap + kernel support only


def test_flat_channel_becomes_zeros():
    x = _signal(2, 12.0, 250.0)
    x[1] = 0.35
    out, valid = preprocess_signal(x, 250.0, [II, PPG_TYPE])
    assert np.abs(out[1]).max() < 1e-6 and valid[1].all()  # rounding residue / std_floor, not noise / ~0


@pytest.mark.parametrize("types, match", [([II], "channel_types has 1 entries"), ([II, 13], "0..12"),
                                          ([II, -1], "0..12"), ([1.5, 2.0], "list of ints")])
def test_signal_rejects_bad_channel_types(types, match):
    with pytest.raises(ValueError, match=match):
        preprocess_signal(np.zeros((2, 1000), np.float32), 250.0, types)


def test_signal_rejects_bad_rate_and_shape():
    with pytest.raises(ValueError, match="fs must"):
        preprocess_signal(np.zeros((1, 1000)), -1.0, [II])
    with pytest.raises(ValueError, match="2-D"):
        preprocess_signal(np.zeros(1000), 250.0, [II])


# ----------------------------------------------------------------------------- windows


def test_windows_tile_the_record_and_pad_the_last_one():
    config = PreprocessConfig(window=100)
    x = np.arange(2 * 250, dtype=np.float32).reshape(2, 250)
    w = make_windows(x, np.ones_like(x, dtype=bool), config)
    assert isinstance(w, Windows) and w.x.shape == w.valid.shape == (3, 2, 100) and w.n_dropped == 0
    np.testing.assert_array_equal(w.start_s, [0.0, 0.4, 0.8])
    np.testing.assert_array_equal(w.x[1], x[:, 100:200])
    assert w.valid[2, :, :50].all() and not w.valid[2, :, 50:].any() and (w.x[2, :, 50:] == 0).all()


def test_windows_without_padding_and_with_overlap():
    config = PreprocessConfig(window=100)
    x = np.ones((1, 250), np.float32)
    valid = np.ones_like(x, dtype=bool)
    assert len(make_windows(x, valid, config, pad_last=False).x) == 2
    w = make_windows(x, valid, config, stride=50)
    np.testing.assert_array_equal(w.start_s, [0.0, 0.2, 0.4, 0.6])  # 150..250 is the last full one
    assert len(make_windows(x, valid, config, stride=300).x) == 1


def test_windows_below_the_valid_fraction_are_dropped_and_counted():
    config = PreprocessConfig(window=100, min_valid_fraction=0.5)
    x = np.ones((2, 400), np.float32)
    valid = np.ones_like(x, dtype=bool)
    valid[:, 100:160] = False  # window 1: 40 % valid -> dropped
    valid[0, 200:300] = False  # window 2: 50 % valid -> kept
    w = make_windows(x, valid, config)
    assert w.n_dropped == 1 and len(w.x) == 3
    np.testing.assert_array_equal(w.start_s, [0.0, 0.8, 1.2])


def test_short_and_empty_records():
    config = PreprocessConfig(window=100, min_valid_fraction=0.3)
    short = make_windows(np.ones((1, 40), np.float32), np.ones((1, 40), bool), config)
    assert short.x.shape == (1, 1, 100) and short.valid.sum() == 40
    dropped = make_windows(np.ones((1, 20), np.float32), np.ones((1, 20), bool), config)
    assert dropped.x.shape == (0, 1, 100) and dropped.n_dropped == 1
    empty = make_windows(np.zeros((1, 0), np.float32), np.zeros((1, 0), bool), config)
    assert empty.x.shape == (0, 1, 100) and empty.start_s.shape == (0,) and empty.n_dropped == 0


def test_windows_reject_bad_arguments():
    x = np.zeros((1, 300), np.float32)
    with pytest.raises(ValueError, match="stride"):
        make_windows(x, np.ones_like(x, dtype=bool), stride=0)
    with pytest.raises(ValueError, match="valid"):
        make_windows(x, np.ones((1, 299), bool))
    with pytest.raises(ValueError, match="valid"):
        make_windows(x, np.ones_like(x))


# ----------------------------------------------------------------------------- usable records


def _record(signal: np.ndarray, types: list[int], fs: float = 250.0) -> Record:
    names = [f"c{k}" for k in range(len(types))]
    return Record(signal, fs, names, ["mV"] * len(types), types, ["PPG" if t == PPG_TYPE else "ECG" for t in types],
                  record_id="r")


def test_record_check_leaves_out_empty_channels_and_says_why_a_record_is_unusable():
    signal = _signal(3, 30.0, 250.0)
    signal[1] = np.nan
    check = RecordCheck(PreprocessConfig())
    windows, used = check.windows(_record(signal, [II, V1, PPG_TYPE]))
    assert used == [0, 2] and windows.x.shape == (3, 2, 2500) and windows.valid.all()
    assert check.empty_channels == ["c1"] and check.problem == ""
    np.testing.assert_array_equal(windows.x[1], preprocess_record(_record(signal[[0, 2]], [II, PPG_TYPE])).x[1])

    ppg = RecordCheck(PreprocessConfig(), "ppg")
    assert ppg.windows(_record(signal[:2], [II, V1]))[1] == [] and ppg.problem == "no PPG channel"
    nan = RecordCheck(PreprocessConfig(), "ecg")
    nan.windows(_record(signal[1:3], [V1, PPG_TYPE]))
    assert nan.problem == "no valid sample in its ECG channel(s) c0"
    short = RecordCheck(PreprocessConfig())
    short.windows(_record(signal[:1, :1000], [II]))
    assert short.problem == "no 10 s window with at least 50% valid samples (4.0 s of valid signal in 4.0 s)"
    with pytest.raises(ValueError, match="modality must be one of"):
        RecordCheck(PreprocessConfig(), "eeg")


def test_record_check_cuts_windows_from_the_span_of_a_part():
    """A part read with 5 s before a 20 s span: windows start at the span, counted from it."""
    signal = _signal(1, 30.0, 500.0)
    part = _record(signal, [II], fs=500.0)
    windows, _ = RecordCheck(PreprocessConfig()).windows(part, skip_s=5.0, span_s=20.0)
    x, _ = preprocess_signal(signal, 500.0, [II])
    np.testing.assert_array_equal(windows.start_s, [0.0, 10.0])
    np.testing.assert_array_equal(windows.x[:, 0], [x[0, 1250:3750], x[0, 3750:6250]])


# ----------------------------------------------------------------------------- real records


def _real_record(path: str, types: list[int], rows: list[int] | None = None, **kwargs) -> Record:
    """A Record of the given rows of a shared recording, skipping the test when it is absent."""
    if not PHYSIONET.is_dir():
        pytest.skip(f"real recordings absent: {PHYSIONET}")
    import wfdb

    rec = wfdb.rdrecord(str(PHYSIONET / path), **kwargs)
    rows = list(range(len(types))) if rows is None else rows
    return Record(signal=np.ascontiguousarray(rec.p_signal.T[rows], dtype=np.float32), fs=float(rec.fs),
                  channel_names=[rec.sig_name[r] for r in rows], units=[rec.units[r] for r in rows],
                  channel_types=types, modalities=["PPG" if t == PPG_TYPE else "ECG" for t in types],
                  record_id=path)


@pytest.mark.data
@pytest.mark.parametrize("path, types, rows, kwargs", [
    ("ptbdb/s0010_re", list(range(12)), None, {}),
    ("mitdb/100", [II, V5], None, {}),
    ("mimic2db/03700181", [V1], [0], {}),
    ("challenge2015/a103l", [II, V1, PPG_TYPE], None, {}),
    ("multifreq/mixedsignals", [II, 2, V1, PPG_TYPE], [0, 1, 2, 4], {"smooth_frames": True}),
], ids=["ptb", "mitdb", "mimic2", "challenge2015", "multifreq"])
def test_real_records_become_windows(path, types, rows, kwargs):
    record = _real_record(path, types, rows, **kwargs)
    windows = preprocess_record(record)
    n_250 = round(record.signal.shape[1] * 250.0 / record.fs)
    assert len(windows.x) + windows.n_dropped == -(-n_250 // 2500)
    assert windows.x.shape[1:] == (len(types), 2500) and windows.x.dtype == np.float32
    assert np.isfinite(windows.x).all() and (windows.x[~windows.valid] == 0).all()
    assert (windows.valid.mean(axis=(1, 2)) >= 0.5).all()
    np.testing.assert_allclose(np.diff(windows.start_s) % 10.0, 0.0, atol=1e-9)
    full = windows.valid.all(axis=(1, 2))
    assert np.abs(windows.x[full]).max() < 60  # z-scores: no channel blown up by a gap or an edge
