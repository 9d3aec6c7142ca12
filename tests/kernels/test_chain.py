"""The one-call chain resample -> band-pass -> z-score against the three kernels called in turn."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csfm_kernels.signal import bandpass, resample, zscore
from csfm_kernels.signal.chain import chain_plan, resample_bandpass_zscore

BANDS = ((0.5, 40.0), (0.5, 8.0))


def _in_turn(x, fs_in, fs_out, band_of_row, order, std_floor, band_hz):
    """The chain's definition: resample, band-pass the channels of each band together, z-score."""
    y = resample(x, fs_in, fs_out, band_hz=band_hz)
    for b, band in enumerate(BANDS):
        rows = np.flatnonzero(band_of_row == b)
        if rows.size:
            y[rows] = bandpass(y[rows], fs_out, *band, order=order)
    valid = np.empty(y.shape, np.bool_)
    zscore(y, std_floor, out=y, valid=valid)
    return y, valid


@settings(max_examples=40, deadline=None)
@given(fs_in=st.sampled_from([62.4725, 125.0, 250.0, 300.0, 360.0, 500.0, 1000.0]),
       n_channels=st.integers(1, 9), seconds=st.floats(0.2, 12.0), order=st.integers(1, 3),
       band_hz=st.sampled_from([None, 12.0, 60.0]), gaps=st.booleans(), seed=st.integers(0, 2**16))
def test_chain_equals_the_kernels_in_turn(fs_in, n_channels, seconds, order, band_hz, gaps, seed):
    """Bit for bit, on random rates (rational and not), channel counts (groups of four and
    odd ones), lengths (shorter than the band-pass's pad too), bands and gaps."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.standard_normal((n_channels, max(1, int(seconds * fs_in)))), axis=1).astype(np.float32)
    if gaps:
        start = rng.integers(0, x.shape[1])
        x[rng.integers(0, n_channels), start:start + rng.integers(1, 200)] = np.nan
    band_of_row = rng.integers(0, 2, n_channels).astype(np.int64)
    plan = chain_plan(fs_in, 250.0, BANDS, order, band_hz)
    z, valid = resample_bandpass_zscore(x, plan, band_of_row, 1e-3)
    expected, expected_valid = _in_turn(x, fs_in, 250.0, band_of_row, order, 1e-3, band_hz)
    np.testing.assert_array_equal(z, expected)
    np.testing.assert_array_equal(valid, expected_valid)
    assert np.isfinite(z).all() and (z[~valid] == 0).all()


@pytest.mark.parametrize("fs_in", [360.0, 62.4725, 250.0])
def test_chain_serial_and_parallel_builds_agree_bitwise(monkeypatch, fs_in):
    """The chain's parallel build (large inputs) gives the serial build's bits."""
    from csfm_kernels.signal import _parallel

    x = np.cumsum(np.random.default_rng(3).standard_normal((6, 4000)), axis=1)
    x[2, 500:700] = np.nan
    plan, band_of_row = chain_plan(fs_in, 250.0, BANDS, 2, 60.0), np.array([0, 1, 0, 0, 1, 0])
    results = []
    for threshold in (0, 1 << 62):
        monkeypatch.setattr(_parallel, "PARALLEL_MIN_SAMPLES", threshold)
        results.append(resample_bandpass_zscore(x, plan, band_of_row, 1e-3))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_chain_of_no_samples_and_no_channels():
    plan = chain_plan(300.0, 250.0, BANDS, 2)
    z, valid = resample_bandpass_zscore(np.zeros((2, 0)), plan, np.zeros(2, np.int64), 1e-3)
    assert z.shape == valid.shape == (2, 0)
    z, valid = resample_bandpass_zscore(np.zeros((0, 300)), plan, np.zeros(0, np.int64), 1e-3)
    assert z.shape == valid.shape == (0, 250)


@pytest.mark.parametrize("args, match", [
    ({"band_of_row": np.zeros(3, np.int64)}, r"band_of_row must be a \[2\] int64"),
    ({"band_of_row": np.zeros(2, np.int32)}, r"band_of_row must be a \[2\] int64"),
    ({"band_of_row": np.array([0, 2])}, "must index the plan's 2 bands"),
    ({"band_of_row": np.array([-1, 0])}, "must index the plan's 2 bands"),
    ({"std_floor": 0.0}, "std_floor"),
    ({"x": np.zeros(10)}, "2-D"),
])
def test_chain_rejects_bad_arguments(args, match):
    call = {"x": np.zeros((2, 100)), "plan": chain_plan(250.0, 250.0, BANDS, 2), "band_of_row": np.zeros(2, np.int64),
            "std_floor": 1e-3} | args
    with pytest.raises(ValueError, match=match):
        resample_bandpass_zscore(**call)


@pytest.mark.parametrize("args, match", [((-1.0, 250.0, BANDS, 2), "fs_in"), ((250.0, 250.0, (), 2), "at least one"),
                                         ((250.0, 250.0, ((40.0, 0.5),), 2), "high_hz"),
                                         ((250.0, 250.0, ((0.5, 200.0),), 2), "high_hz"),
                                         ((250.0, 250.0, BANDS, 0), "order")])
def test_chain_plan_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        chain_plan(*args)
