"""RR features: heart rate and irregularity on synthetic ECG-like trains, input errors, real CinC records."""
from pathlib import Path

import numpy as np
import pytest

from csfm.benchmarks.cinc2017.rr_features import FEATURE_NAMES, detect_r_peaks, feature_matrix, rr_features

FS = 300
CINC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cinc2017"


def _spike_train(rr_s, fs=FS, seed=0):
    """Unit impulses at the given RR intervals (s), convolved with a QRS-like Gaussian
    (sd 10 ms), plus small noise: [T] float."""
    beats = 0.5 + np.concatenate([[0.0], np.cumsum(rr_s)])
    x = np.zeros(int((beats[-1] + 0.5) * fs))
    x[np.round(beats * fs).astype(int)] = 1.0
    t = np.arange(-30, 31) / fs
    qrs = np.exp(-0.5 * (t / 0.01) ** 2)
    noise = 0.01 * np.random.default_rng(seed).standard_normal(len(x))
    return np.convolve(x, qrs, mode="same") + noise


def test_regular_train_at_72_bpm():
    f = rr_features(_spike_train([60 / 72] * 40), FS)
    assert list(f) == list(FEATURE_NAMES)
    assert f["heart_rate_bpm"] == pytest.approx(72, abs=1.0)
    assert f["rr_mean_s"] == pytest.approx(60 / 72, abs=0.01)
    assert f["rr_cv"] < 0.02
    assert f["irregular_fraction"] == 0.0 and f["pnn50"] == 0.0
    assert f["n_beats"] == pytest.approx(41, abs=1)
    assert f["r_amplitude"] > 0.5


def test_jittered_rr_is_more_variable_and_irregular():
    regular = rr_features(_spike_train([60 / 72] * 40), FS)
    rr = np.random.default_rng(1).uniform(0.5, 1.1, 40)
    jittered = rr_features(_spike_train(rr), FS)
    assert jittered["rr_cv"] > 0.1 > regular["rr_cv"]
    assert jittered["irregular_fraction"] > 0.3 > regular["irregular_fraction"]
    assert jittered["sd_entropy_bits"] > regular["sd_entropy_bits"]
    assert jittered["rmssd_s"] > 5 * regular["rmssd_s"]


def test_peaks_match_the_impulses():
    peaks = detect_r_peaks(_spike_train([0.8] * 20), FS)
    expected = np.round((0.5 + 0.8 * np.arange(21)) * FS)
    assert len(peaks) == len(expected)
    assert np.abs(peaks - expected).max() <= 3


def test_too_few_beats_give_nan_rr_features():
    f = rr_features(np.zeros(10 * FS), FS)  # flat line: no beats
    assert f["n_beats"] == 0
    assert all(np.isnan(f[name]) for name in ("heart_rate_bpm", "rr_cv", "rmssd_s", "irregular_fraction"))
    assert np.isfinite(f["signal_std"])


@pytest.mark.parametrize("n", [5, 50, 200])
def test_very_short_signal_has_no_beats(n):
    f = rr_features(np.random.default_rng(0).standard_normal(n), FS)
    assert f["n_beats"] == 0 and np.isnan(f["heart_rate_bpm"])


def test_nan_samples_are_tolerated():
    x = _spike_train([60 / 72] * 30)
    x[1000:1010] = np.nan
    assert rr_features(x, FS)["heart_rate_bpm"] == pytest.approx(72, abs=1.5)


@pytest.mark.parametrize("bad", [np.array([]), np.full(500, np.nan)], ids=["empty", "all-nan"])
def test_empty_or_nan_input_raises(bad):
    with pytest.raises(ValueError, match="empty or has no finite sample"):
        detect_r_peaks(bad, FS)
    with pytest.raises(ValueError, match="empty or has no finite sample"):
        rr_features(bad, FS)


def test_two_dimensional_input_raises():
    with pytest.raises(ValueError, match="1-D"):
        rr_features(np.zeros((2, 100)), FS)


def test_feature_matrix_shape_and_order():
    signals = [_spike_train([60 / 72] * 20), _spike_train([0.6] * 30)]
    X = feature_matrix(signals, FS)
    assert X.shape == (2, len(FEATURE_NAMES))
    hr = X[:, FEATURE_NAMES.index("heart_rate_bpm")]
    assert hr == pytest.approx([72, 100], abs=1.5)
    assert feature_matrix([], FS).shape == (0, len(FEATURE_NAMES))


@pytest.mark.data
@pytest.mark.skipif(not CINC.is_dir(), reason=f"CinC 2017 records not found at {CINC}")
def test_real_cinc_records_have_plausible_heart_rate():
    import wfdb

    for record in ("A00001", "A00002", "A00004", "A00005", "A00009"):
        rec = wfdb.rdrecord(str(CINC / record))
        f = rr_features(rec.p_signal[:, 0], rec.fs)
        assert 30 <= f["heart_rate_bpm"] <= 200, (record, f)
        assert f["n_beats"] >= 10, (record, f)
