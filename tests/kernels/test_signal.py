"""Numba signal kernels: resample vs scipy (FFT and polyphase) on real records and sinusoids,
band-pass vs scipy's sosfiltfilt, z-score, NaN gaps, flat channels and bad arguments."""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from csfm_kernels.signal import bandpass, resample, zscore
from csfm_kernels.signal.resample import support_half
from csfm_kernels.signal.filters import (_LANES, _STRETCH_MAX, _STRETCH_MIN, _cascade_one, _pair_coefficients,
                                        _pair_steady_state, _pair_step, _stretch_lengths, butter_sections)

PHYSIONET = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "physionet"


def needs_data(test):
    """Marks ``test`` as reading the real recordings, skipped with the reason when absent."""
    skip = pytest.mark.skipif(not PHYSIONET.is_dir(), reason=f"real recordings absent: {PHYSIONET}")
    return pytest.mark.data(skip(test))


RECORDS = {  # name -> (path under physionet/, rdrecord keyword arguments)
    "ptb_s0010_re": ("ptbdb/s0010_re", {}),
    "mitdb_100": ("mitdb/100", {}),
    "mimic2_03700181": ("mimic2db/03700181", {}),
    "challenge2015_a103l": ("challenge2015/a103l", {}),
    "multifreq_mixedsignals": ("multifreq/mixedsignals", {"smooth_frames": True}),
}
RATES = [62.4725, 125.0, 250.0, 300.0, 360.0, 400.0, 500.0, 1000.0]
ACCURACY = 1e-3  # max passband error / signal range


@lru_cache(maxsize=None)
def _record(name: str) -> tuple[np.ndarray, float]:
    """(signal [C, T] float32 in physical units, NaN where missing; fs in Hz) of a real record."""
    import wfdb

    path, kwargs = RECORDS[name]
    rec = wfdb.rdrecord(str(PHYSIONET / path), **kwargs)
    return np.ascontiguousarray(rec.p_signal.T, dtype=np.float32), float(rec.fs)


def _longest_finite_run(x: np.ndarray) -> np.ndarray:
    """The longest stretch of x [C, T] where every channel is finite."""
    ok = np.concatenate([[False], np.isfinite(x).all(axis=0), [False]])
    edges = np.flatnonzero(np.diff(ok.astype(np.int8)))
    starts, stops = edges[::2], edges[1::2]
    i = int(np.argmax(stops - starts))
    return x[:, starts[i]:stops[i]]


def _exact_length(n: int, ratio: float) -> int:
    """Largest m <= n with m * ratio within 1e-4 of an integer: the FFT resampler's output
    grid then matches the true output times (no drift over the record)."""
    return next(m for m in range(n, 0, -1) if abs(m * ratio - round(m * ratio)) < 1e-4)


def _lowpass(v: np.ndarray, fraction: float) -> np.ndarray:
    """Brick-wall low-pass of v [C, T] keeping frequencies up to fraction x Nyquist."""
    spectrum = np.fft.rfft(v, axis=-1)
    spectrum[..., np.fft.rfftfreq(v.shape[-1]) * 2 > fraction] = 0
    return np.fft.irfft(spectrum, v.shape[-1], axis=-1)


def _passband_error(ours: np.ndarray, ref: np.ndarray, x: np.ndarray, fs_in: float, fs_out: float) -> float:
    """max |ours - ref| / range(x) below 0.8 x the lower Nyquist, ignoring max(1 s, 256 input
    samples) at each end (where the FFT's periodic wrap rings)."""
    n = min(ours.shape[1], ref.shape[1])
    diff = _lowpass(ours[:, :n].astype(np.float64) - ref[:, :n], 0.8 * min(fs_in, fs_out) / fs_out)
    edge = int(round(max(1.0, 256 / fs_in) * fs_out))
    return float((np.abs(diff[:, edge:-edge]).max(axis=1) / np.ptp(x, axis=1)).max())


def _accuracy_case(name: str) -> tuple[np.ndarray, float, np.ndarray]:
    """(x [C, T] finite float32, fs, ours [C, T'] at 250 Hz) with T chosen for an exact FFT grid."""
    x, fs = _record(name)
    x = _longest_finite_run(x)
    x = np.ascontiguousarray(x[:, :_exact_length(x.shape[1], 250.0 / fs)])
    return x, fs, resample(x, fs, 250.0)


# ----------------------------------------------------------------------------- resample


@needs_data
@pytest.mark.parametrize("name", list(RECORDS))
def test_resample_matches_fft_resampling_on_real_records(name):
    x, fs, ours = _accuracy_case(name)
    ref = scipy.signal.resample(x.astype(np.float64), ours.shape[1], axis=1)
    assert ours.shape == (x.shape[0], round(x.shape[1] * 250.0 / fs)) and ours.dtype == np.float32
    assert _passband_error(ours, ref, x, fs, 250.0) <= ACCURACY


@needs_data
@pytest.mark.parametrize("name", ["ptb_s0010_re", "mitdb_100", "mimic2_03700181"])
def test_resample_matches_polyphase_resampling_on_real_records(name):
    """resample_poly's own Kaiser (beta 5) filter ripples by ~5e-4, so this bound is looser in
    effect than the FFT comparison."""
    x, fs, ours = _accuracy_case(name)
    ratio = Fraction(250.0 / fs).limit_denominator(1000)
    ref = scipy.signal.resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator, axis=1)
    assert _passband_error(ours, ref, x, fs, 250.0) <= ACCURACY


@needs_data
@pytest.mark.parametrize("name", ["ptb_s0010_re", "mitdb_100", "mimic2_03700181"])
@pytest.mark.parametrize("band", [(0.5, 40.0), (0.5, 8.0)], ids=["ecg", "ppg"])
def test_narrow_band_resampling_then_bandpass_matches_scipy_on_real_records(name, band):
    """The pipeline's shorter resampling kernel (band_hz = 1.5 x the band-pass's high edge):
    after the band-pass, within 1e-3 of the signal's range of scipy's FFT resampling +
    sosfiltfilt, away from 10 s at each end (where the FFT's periodic wrap rings through
    the filter)."""
    x, fs, _ = _accuracy_case(name)
    ours = bandpass(resample(x, fs, 250.0, band_hz=1.5 * band[1]), 250.0, *band)
    ref = _sosfiltfilt(scipy.signal.resample(x.astype(np.float64), ours.shape[1], axis=1), 250.0, *band, 2)
    inner = slice(2500, -2500)
    error = np.abs(ours - ref)[:, inner].max(axis=1) / np.ptp(ref[:, inner], axis=1)
    assert error.max() <= ACCURACY


@needs_data
def test_resample_to_the_same_rate_is_the_identity():
    x, fs = _record("challenge2015_a103l")
    np.testing.assert_array_equal(resample(x, fs, fs), x)


def _nan_distance(row: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Distance (in samples) from each position to the nearest NaN of row [T]; inf if none."""
    gaps = np.concatenate([[-np.inf], np.flatnonzero(np.isnan(row)), [np.inf]])
    i = np.searchsorted(gaps, positions)  # gaps[i - 1] < position <= gaps[i]
    return np.minimum(positions - gaps[i - 1], gaps[i] - positions)


def _assert_gaps_local(x: np.ndarray, y: np.ndarray, fs_in: float, fs_out: float) -> None:
    """y = resample(x): NaN where an output's time is within half - 1 input samples of a NaN,
    finite where it is farther than half (the kernel's support is 2 * half samples; the
    identity has none)."""
    half = support_half(fs_in, fs_out)
    positions = np.arange(y.shape[1]) * (fs_in / fs_out)
    for row_in, row_out in zip(x, y):
        distance = _nan_distance(row_in, positions)
        assert np.isnan(row_out[distance < half - 1]).all()
        assert np.isfinite(row_out[distance > half]).all()


@needs_data
@pytest.mark.parametrize("name", ["multifreq_mixedsignals", "mimic2_03700181"])
def test_resample_keeps_real_gaps_local(name):
    """These records have NaN gaps (256 samples per ECG channel, 4 in RESP): they stay gaps."""
    x, fs = _record(name)
    assert np.isnan(x).any()
    _assert_gaps_local(x, resample(x, fs, 250.0), fs, 250.0)


def _rates():
    return st.one_of(st.sampled_from(RATES), st.floats(40.0, 1200.0))


@settings(max_examples=40, deadline=None)
@given(fs_in=_rates(), fs_out=_rates(), seconds=st.floats(1.0, 6.0),
       rel_freq=st.floats(0.0, 0.8), phase=st.floats(0.0, 6.3), amplitude=st.floats(1e-2, 1e3))
def test_resample_keeps_in_band_sinusoids(fs_in, fs_out, seconds, rel_freq, phase, amplitude):
    """A sinusoid below 0.8 x the lower Nyquist comes back at its frequency, phase and
    amplitude to within 1e-3 of its amplitude, away from the ends."""
    freq = rel_freq * min(fs_in, fs_out) / 2
    n_in = max(int(seconds * fs_in), 1)
    x = amplitude * np.sin(2 * np.pi * freq * np.arange(n_in) / fs_in + phase)
    y = resample(x[None, :], fs_in, fs_out)[0]
    assert len(y) == round(n_in * fs_out / fs_in)
    expected = amplitude * np.sin(2 * np.pi * freq * np.arange(len(y)) / fs_out + phase)
    margin = int(np.ceil((support_half(fs_in, fs_out) + 2) / fs_in * fs_out))  # support crosses an end
    inner = slice(margin, len(y) - margin)
    assert np.abs(y[inner] - expected[inner]).max(initial=0.0) <= 1e-3 * amplitude


@settings(max_examples=40, deadline=None)
@given(fs_in=_rates(), fs_out=_rates(), band=st.floats(0.05, 0.4), rel_freq=st.floats(0.0, 1.0),
       phase=st.floats(0.0, 6.3))
def test_resample_with_a_narrower_band_keeps_sinusoids_below_it(fs_in, fs_out, band, rel_freq, phase):
    """band_hz below the default shortens the kernel; sinusoids below band_hz still come back
    to within 1e-3 of their amplitude."""
    band_hz = band * min(fs_in, fs_out)
    freq = rel_freq * band_hz
    x = np.sin(2 * np.pi * freq * np.arange(int(4 * fs_in)) / fs_in + phase)
    y = resample(x[None, :], fs_in, fs_out, band_hz=band_hz)[0]
    half = support_half(fs_in, fs_out, band_hz)
    assert half <= support_half(fs_in, fs_out)
    expected = np.sin(2 * np.pi * freq * np.arange(len(y)) / fs_out + phase)
    margin = int(np.ceil((half + 2) / fs_in * fs_out))
    assert np.abs(y - expected)[margin:len(y) - margin].max(initial=0.0) <= 1e-3


@settings(max_examples=30, deadline=None)
@given(fs_in=_rates(), fs_out=_rates(), n_in=st.integers(1, 3000), level=st.floats(-1e4, 1e4))
def test_resample_passes_constants_exactly(fs_in, fs_out, n_in, level):
    y = resample(np.full((2, n_in), level, np.float32), fs_in, fs_out)
    np.testing.assert_allclose(y, np.float32(level), rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(fs_in=_rates(), fs_out=_rates(), n_in=st.integers(200, 3000), gap=st.tuples(st.floats(0, 1), st.floats(0, 0.2)),
       seed=st.integers(0, 2**16))
def test_resample_nan_gaps_stay_local(fs_in, fs_out, n_in, gap, seed):
    """NaN only near the gap, and outputs off the gap do not depend on what the gap holds
    (beyond float32 rounding: each block of outputs is computed relative to its first
    finite input sample)."""
    x = np.random.default_rng(seed).standard_normal((1, n_in))
    start = int(gap[0] * (n_in - 1))
    stop = min(n_in, start + 1 + int(gap[1] * n_in))
    with_gap, filled = x.copy(), x.copy()
    with_gap[0, start:stop], filled[0, start:stop] = np.nan, 0.0
    y, y_filled = resample(with_gap, fs_in, fs_out), resample(filled, fs_in, fs_out)
    _assert_gaps_local(with_gap, y, fs_in, fs_out)
    finite = np.isfinite(y)
    np.testing.assert_allclose(y[finite], y_filled[finite], rtol=0, atol=1e-5 * np.abs(x).max())


def test_resample_dtypes_and_empty_input():
    x = np.random.default_rng(0).standard_normal((3, 500))
    y64, y32 = resample(x, 500.0), resample(x.astype(np.float32), 500.0)
    assert y64.dtype == y32.dtype == np.float32 and y64.shape == (3, 250)
    np.testing.assert_allclose(y64, y32, atol=1e-5)
    np.testing.assert_allclose(resample(x.astype(np.int16), 500.0), resample(x.astype(np.int16).astype(float), 500.0))
    assert resample(np.zeros((2, 0)), 360.0).shape == (2, 0)
    assert resample(np.zeros((2, 1)), 1000.0).shape == (2, 0)  # round(0.25) output samples


@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.zeros(10)}, "x must be a 2-D"),
    ({"x": np.zeros((1, 2, 3))}, "x must be a 2-D"),
    ({"x": np.zeros((1, 3), complex)}, "x must hold real"),
    ({"fs_in": 0.0}, "fs_in"), ({"fs_in": -250.0}, "fs_in"), ({"fs_in": np.nan}, "fs_in"),
    ({"fs_in": np.inf}, "fs_in"), ({"fs_in": "fast"}, "fs_in"), ({"fs_out": 0.0}, "fs_out"),
    ({"band_hz": 0.0}, "band_hz"), ({"band_hz": np.nan}, "band_hz"),
])
def test_resample_rejects_bad_arguments(kwargs, match):
    args = {"x": np.zeros((1, 100)), "fs_in": 100.0, "fs_out": 250.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        resample(**args)


# ----------------------------------------------------------------------------- band-pass


def _sosfiltfilt(x, fs, low, high, order):
    sos = scipy.signal.butter(order, (low, high), btype="band", fs=fs, output="sos")
    return scipy.signal.sosfiltfilt(sos, np.asarray(x, np.float64), axis=-1)


def _assert_relative(ours, ref, tol=1e-6):
    scale = np.abs(ref).max(axis=-1, keepdims=True)
    assert (np.abs(ours - ref) / scale).max() <= tol


@settings(max_examples=30, deadline=None)
@given(fs=st.sampled_from(RATES), band=st.tuples(st.floats(0.01, 0.3), st.floats(0.35, 0.95)),
       order=st.integers(1, 5), n=st.integers(40, 4000), seed=st.integers(0, 2**16))
def test_bandpass_matches_sosfiltfilt(fs, band, order, n, seed):
    """Five channels: four filtered together as interleaved lanes, the fifth alone."""
    low, high = band[0] * fs / 2, band[1] * fs / 2
    x = np.cumsum(np.random.default_rng(seed).standard_normal((5, n)), axis=1)  # wandering baseline
    _assert_relative(bandpass(x, fs, low, high, order), _sosfiltfilt(x, fs, low, high, order))


@needs_data
@pytest.mark.parametrize("name", ["challenge2015_a103l", "ptb_s0010_re"])
@pytest.mark.parametrize("band", [(0.5, 40.0), (0.5, 8.0)], ids=["ecg", "ppg"])
def test_bandpass_matches_sosfiltfilt_on_real_records(name, band):
    x, fs = _record(name)
    _assert_relative(bandpass(x, fs, *band), _sosfiltfilt(x, fs, *band, 2))


@pytest.mark.parametrize("fs, band, order", [(250.0, (0.5, 40.0), 2), (250.0, (0.05, 100.0), 5),
                                            (500.0, (1.0, 30.0), 3), (360.0, (0.5, 8.0), 1)])
def test_bandpass_matches_sosfiltfilt_on_long_runs(fs, band, order):
    """Runs long enough to be filtered in several chunks of lanes (one channel) and as four
    interleaved channels: a wandering baseline far from zero, runs of several lengths
    between gaps; in place as well."""
    x = 1e4 + np.cumsum(np.random.default_rng(order).standard_normal((5, 300_000)), axis=1)
    x[4, 100_000:100_050] = np.nan
    x[4, 160_000:160_001] = np.nan
    y = bandpass(x, fs, *band, order)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
    in_place = x.astype(np.float32)
    np.testing.assert_array_equal(bandpass(in_place, fs, *band, order, out=in_place),
                                  bandpass(x.astype(np.float32), fs, *band, order))
    _assert_relative(y[:4], _sosfiltfilt(x[:4], fs, *band, order))
    for run in (slice(0, 100_000), slice(100_050, 160_000), slice(160_001, None)):
        _assert_relative(y[4, run], _sosfiltfilt(x[4, run], fs, *band, order))


@pytest.mark.parametrize("n", [_LANES * _STRETCH_MIN - 1, _LANES * _STRETCH_MIN, _LANES * _STRETCH_MIN + 3, 2_554,
                               _LANES * _STRETCH_MAX - 1, _LANES * _STRETCH_MAX, _LANES * _STRETCH_MAX + 300,
                               3 * _LANES * _STRETCH_MAX + 9_001])
@pytest.mark.parametrize("order", [2, 3, 5])
def test_one_channel_cascade_in_lanes_equals_one_recurrence(n, order):
    """One channel's pass through the cascade, its run cut into chunks of _LANES stretches
    (each stretch from the true end state of the one before, A^m from the powers table),
    then a tail, equals the plain recurrence of each pair from the same starts, forward in
    time and on a reversed view; around the chunk boundaries and with a slow (0.05 Hz) pole."""
    sos, zi, _, powers = butter_sections(250.0, 0.05 if order == 5 else 0.5, 40.0, order)
    x = 1e3 + np.cumsum(np.random.default_rng(n).standard_normal(n))
    lengths = _stretch_lengths(n)
    assert 0 <= n - _LANES * lengths.sum() < (_LANES if len(lengths) else _LANES * _STRETCH_MIN)
    for reverse in (False, True):
        expected = (x[::-1] if reverse else x).copy()
        x0 = expected[0]
        for s in range(0, len(sos), 2):
            coef, state = _pair_coefficients(sos, s), _pair_steady_state(zi, s, x0)
            for i in range(n):
                expected[i], state = _pair_step(expected[i], coef, state)
        got = x.copy()
        _cascade_one(got[::-1] if reverse else got, sos, zi, powers)
        np.testing.assert_allclose(got[::-1] if reverse else got, expected, rtol=0,
                                   atol=1e-9 * np.abs(expected).max())


def test_bandpass_filters_each_finite_run_alone():
    """Channel 0 has gaps, so its group of four channels is filtered channel by channel."""
    x = np.cumsum(np.random.default_rng(1).standard_normal((4, 3000)), axis=1)
    x[0, 1000:1100] = np.nan
    x[0, 1110:1120] = np.nan  # leaves a 10-sample run: shorter than the 15-sample pad -> NaN
    y = bandpass(x, 250.0, 0.5, 40.0)[0]
    _assert_relative(y[:1000], _sosfiltfilt(x[0, :1000], 250.0, 0.5, 40.0, 2))
    _assert_relative(y[1120:], _sosfiltfilt(x[0, 1120:], 250.0, 0.5, 40.0, 2))
    assert np.isnan(y[1000:1120]).all()
    assert np.isfinite(y[:1000]).all() and np.isfinite(y[1120:]).all()
    _assert_relative(bandpass(x, 250.0, 0.5, 40.0)[1:], _sosfiltfilt(x[1:], 250.0, 0.5, 40.0, 2))


def test_bandpass_edge_cases():
    assert bandpass(np.zeros((3, 0)), 250.0, 0.5, 40.0).shape == (3, 0)
    assert np.isnan(bandpass(np.ones((1, 15)), 250.0, 0.5, 40.0)).all()  # one run, not longer than the pad
    np.testing.assert_allclose(bandpass(np.full((1, 500), 7.0), 250.0, 0.5, 40.0), 0.0, atol=1e-6)
    x = np.random.default_rng(2).standard_normal((2, 700))
    np.testing.assert_allclose(bandpass(x.astype(np.float32), 250.0, 1.0, 30.0), bandpass(x, 250.0, 1.0, 30.0),
                               atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.zeros(100)}, "x must be a 2-D"), ({"fs": 0.0}, "fs"), ({"fs": np.nan}, "fs"),
    ({"low_hz": 0.0}, "low_hz"), ({"low_hz": -1.0}, "low_hz"), ({"low_hz": 125.0}, "low_hz"),
    ({"high_hz": 125.0}, "high_hz"), ({"high_hz": 0.4}, "high_hz"), ({"high_hz": np.nan}, "high_hz"),
    ({"order": 0}, "order"), ({"order": 2.5}, "order"),
])
def test_bandpass_rejects_bad_arguments(kwargs, match):
    args = {"x": np.zeros((1, 100)), "fs": 250.0, "low_hz": 0.5, "high_hz": 40.0, "order": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        bandpass(**args)


# ----------------------------------------------------------------------------- z-score


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2000), scale=st.floats(1e-2, 1e4), offset=st.floats(-1e4, 1e4),
       nan_fraction=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_zscore_matches_numpy_ignoring_nan(n, scale, offset, nan_fraction, seed):
    rng = np.random.default_rng(seed)
    x = offset + scale * rng.standard_normal((2, n))
    x[:, 1:][rng.random((2, n - 1)) < nan_fraction] = np.nan  # sample 0 stays finite
    z = zscore(x, 1e-3)
    mean, std = np.nanmean(x, axis=1, keepdims=True), np.nanstd(x, axis=1, keepdims=True)
    expected = (x - mean) / np.maximum(std, 1e-3)
    np.testing.assert_array_equal(np.isnan(z), np.isnan(x))
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_zscore_can_zero_fill_and_return_the_finite_mask():
    x = np.random.default_rng(3).standard_normal((3, 500))
    x[0, 10:20], x[1, -1], x[2] = np.nan, np.inf, np.nan
    valid = np.empty(x.shape, bool)
    z = zscore(x, 1e-3, valid=valid)
    np.testing.assert_array_equal(valid, np.isfinite(x))
    np.testing.assert_array_equal(z[valid], zscore(x, 1e-3)[valid])
    assert (z[~valid] == 0).all()
    with pytest.raises(ValueError, match="valid must be"):
        zscore(x, 1e-3, valid=np.empty((3, 499), bool))


def test_zscore_flat_and_empty_channels():
    x = np.stack([np.full(100, 3.5), 3.5 + 1e-7 * np.sin(np.arange(100)), np.full(100, np.nan)])
    z = zscore(x, 1e-3)
    assert (z[0] == 0).all() and np.abs(z[1]).max() < 1e-3 and np.isnan(z[2]).all()
    assert zscore(np.zeros((2, 0)), 1e-3).shape == (2, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.zeros(5)}, "x must be a 2-D"), ({"std_floor": 0.0}, "std_floor"),
    ({"std_floor": -1.0}, "std_floor"), ({"std_floor": np.nan}, "std_floor"), ({"std_floor": "1"}, "std_floor"),
])
def test_zscore_rejects_bad_arguments(kwargs, match):
    args = {"x": np.zeros((1, 5)), "std_floor": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        zscore(**args)


@pytest.mark.parametrize("channels, samples", [(1, 2500), (5, 3001), (12, 9000)])
@pytest.mark.parametrize("op", ["resample_polyphase", "resample_interpolated", "bandpass", "zscore"])
def test_serial_and_parallel_builds_agree_bitwise(monkeypatch, op, channels, samples):
    """Each prange kernel runs serially below PARALLEL_MIN_SAMPLES and on numba's threads above:
    both builds give the same bits (each output is computed by the same code either way)."""
    from csfm_kernels.signal import _parallel

    rng = np.random.default_rng(channels * samples)
    x = rng.standard_normal((channels, samples)).astype(np.float32)
    x[0, 100:140] = np.nan  # a gap: the filter's run handling and the z-score's mask
    run = {"resample_polyphase": lambda: resample(x, 500.0, 250.0),
           "resample_interpolated": lambda: resample(x, 62.4725, 250.0),
           "bandpass": lambda: bandpass(x, 250.0, 0.5, 40.0),
           "zscore": lambda: zscore(x, 1e-6)}[op]
    results = []
    for threshold in (0, 1 << 62):  # everything parallel, then everything serial
        monkeypatch.setattr(_parallel, "PARALLEL_MIN_SAMPLES", threshold)
        results.append(run())
    np.testing.assert_array_equal(results[0], results[1])
