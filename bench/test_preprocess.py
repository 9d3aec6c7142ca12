"""Preprocessing on real records: numba kernels vs scipy / wfdb, same inputs, same run.

(a) resampling to 250 Hz alone: ours vs scipy.signal.resample (FFT), resample_poly and
wfdb.processing.resample_sig (one channel at a time, as it takes 1-D signals); ours also
with the shorter kernel ``preprocess_signal`` uses before its 0.5-40 Hz band-pass
(band_hz = 60 Hz).
(b) the band-pass alone on one channel of 10, 30 and 60 s: ours vs scipy's sosfiltfilt.
(c) the whole per-record pipeline, resample -> band-pass -> z-score: ours
(``preprocess_signal``, which also returns the validity mask) vs the reference-style chain
scipy FFT resample + butter/filtfilt + numpy z-score.
Records: PTB s0010_re (12 leads, 38.4 s at 1000 Hz), MIT-BIH 100 (2 leads, 30 min at
360 Hz), MIMIC II 03700181 (MCL1, 10 min at 125 Hz); skipped when ../shared/data is absent.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from csfm.data.preprocess import PreprocessConfig, preprocess_signal
from csfm_kernels.signal import resample

PHYSIONET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "physionet"
CASES = {  # name -> (record path, rows, channel types)
    "ptb_12lead_1000Hz": ("ptbdb/s0010_re", list(range(12)), list(range(12))),
    "mitdb_30min_360Hz": ("mitdb/100", [0, 1], [1, 10]),
    "mimic2_125Hz": ("mimic2db/03700181", [0], [6]),
}
TARGET_FS = 250.0

pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not PHYSIONET.is_dir(), reason=f"real recordings absent: {PHYSIONET}")]


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[np.ndarray, float, list[int]]:
    """(signal [C, T] float32, fs in Hz, channel types) of a bench case."""
    import wfdb

    path, rows, types = CASES[name]
    rec = wfdb.rdrecord(str(PHYSIONET / path))
    return np.ascontiguousarray(rec.p_signal.T[rows], dtype=np.float32), float(rec.fs), types


def _shape(x: np.ndarray, fs: float) -> str:
    return f"{x.shape[0]}x{x.shape[1]} @{fs:g}->{TARGET_FS:g} Hz"


def _reference_pipeline(x: np.ndarray, fs: float, config: PreprocessConfig) -> np.ndarray:
    """The reference-style chain: FFT resample, butter(b, a) + filtfilt per band, z-score."""
    y = scipy.signal.resample(x, round(x.shape[1] * config.target_fs / fs), axis=1)
    b, a = scipy.signal.butter(config.filter_order, config.ecg_band, btype="band", fs=config.target_fs)
    y = scipy.signal.filtfilt(b, a, y, axis=1)
    return (y - y.mean(axis=1, keepdims=True)) / y.std(axis=1, keepdims=True)


@pytest.mark.parametrize("name", list(CASES))
def test_resample(side_by_side, name):
    x, fs, _ = _load(name)
    n_out = round(x.shape[1] * TARGET_FS / fs)
    ratio = Fraction(TARGET_FS / fs).limit_denominator(1000)
    import wfdb.processing

    side_by_side(
        f"resample {name}", _shape(x, fs),
        baselines={
            "scipy.resample (FFT)": lambda: scipy.signal.resample(x, n_out, axis=1),
            "scipy.resample_poly": lambda: scipy.signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=1),
            "wfdb.resample_sig": lambda: [wfdb.processing.resample_sig(row, fs, TARGET_FS) for row in x],
        },
        ours={"numba resample": lambda: resample(x, fs, TARGET_FS),
              "numba resample band 60 Hz": lambda: resample(x, fs, TARGET_FS, band_hz=60.0)}, rounds=11,
    )


WINDOW_CASES = {  # name -> (record path under ../shared/data, rows, channel types), 10 s from the start
    "cinc2017_1lead_300Hz": ("cinc2017/A00001", [0], [1]),
    "mitdb_2lead_360Hz": ("physionet/mitdb/100", [0, 1], [1, 10]),
    "challenge2015_2ecg_ppg_250Hz": ("physionet/challenge2015/v102s", [0, 1, 2], [1, 7, 12]),
    "ptb_12lead_1000Hz": ("physionet/ptbdb/s0010_re", list(range(12)), list(range(12))),
}


def _official_window(x: np.ndarray, fs: float, types: list[int], config: PreprocessConfig) -> np.ndarray:
    """The published model's preprocessing style, channel by channel: scipy FFT resample to
    250 Hz, neurokit2's ecg_clean / ppg_clean, z-score."""
    import neurokit2 as nk

    n_out = round(x.shape[1] * config.target_fs / fs)
    rows = []
    for row, kind in zip(x, types):
        y = scipy.signal.resample(row, n_out)
        y = nk.ppg_clean(y, sampling_rate=config.target_fs) if kind == 12 else \
            nk.ecg_clean(y, sampling_rate=config.target_fs)
        rows.append((y - y.mean()) / y.std())
    return np.stack(rows)


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_pipeline_one_window(side_by_side, name):
    """One 10 s window per call, as on-the-fly pretraining reads and preprocesses them."""
    pytest.importorskip("neurokit2", reason="the official-style baseline needs neurokit2 (pip install neurokit2)")
    import wfdb

    path, rows, types = WINDOW_CASES[name]
    header = wfdb.rdheader(str(PHYSIONET.parent / path))
    record = wfdb.rdrecord(str(PHYSIONET.parent / path), sampto=int(10 * header.fs), channels=rows)
    x, fs, config = np.ascontiguousarray(record.p_signal.T, dtype=np.float32), float(record.fs), PreprocessConfig()
    side_by_side(
        f"window {name}", _shape(x, fs),
        baselines={"scipy FFT + neurokit2 clean + zscore, per channel": lambda: _official_window(x, fs, types, config)},
        ours={"numba preprocess_signal": lambda: preprocess_signal(x, fs, types, config)}, rounds=21,
    )


BATCH_WINDOWS = 16


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_pipeline_windows_batched(side_by_side, name):
    """BATCH_WINDOWS 10 s windows of one record (starts 1 s apart, from the first whole second
    after which all of them are gap-free: neurokit2 fails on NaN) per call: preprocess_signal
    treats channels independently, so windows of one rate go in stacked as channels, one call
    for all; the baseline preprocesses each window as the one-window case does."""
    pytest.importorskip("neurokit2", reason="the official-style baseline needs neurokit2 (pip install neurokit2)")
    import wfdb

    path, rows, types = WINDOW_CASES[name]
    record = wfdb.rdrecord(str(PHYSIONET.parent / path), channels=rows)
    signal, fs = np.ascontiguousarray(record.p_signal.T, dtype=np.float32), float(record.fs)
    n, span = int(10 * fs), int((10 + BATCH_WINDOWS - 1) * fs)
    first = next(int(k * fs) for k in range(int(signal.shape[1] / fs))
                 if np.isfinite(signal[:, int(k * fs):int(k * fs) + span]).all())
    windows = [signal[:, first + int(k * fs):first + int(k * fs) + n] for k in range(BATCH_WINDOWS)]
    stacked, stacked_types = np.concatenate(windows), types * BATCH_WINDOWS
    config = PreprocessConfig()
    side_by_side(
        f"windows x{BATCH_WINDOWS} {name}", f"{BATCH_WINDOWS} x {_shape(windows[0], fs)}",
        baselines={"scipy FFT + neurokit2 clean + zscore, per channel": lambda: [
            _official_window(w, fs, types, config) for w in windows]},
        ours={"numba preprocess_signal, windows stacked": lambda: preprocess_signal(stacked, fs, stacked_types, config)},
        rounds=11, counts={"windows": BATCH_WINDOWS},
    )


@pytest.mark.parametrize("seconds", [10, 30, 60])
def test_bandpass_one_channel(side_by_side, seconds):
    """The zero-phase 0.5-40 Hz band-pass alone on one channel of a real record (MIT-BIH 100,
    lead MLII at 360 Hz): ours (the run cut into 16 stretches filtered at once in SIMD lanes)
    vs scipy's sosfiltfilt of the same sections."""
    from csfm_kernels.signal import bandpass
    import wfdb

    record = wfdb.rdrecord(str(PHYSIONET / "mitdb/100"), channels=[0], sampto=int(seconds * 360))
    x, fs = np.ascontiguousarray(record.p_signal.T, dtype=np.float32), float(record.fs)
    sos = scipy.signal.butter(2, (0.5, 40.0), btype="band", fs=fs, output="sos")
    side_by_side(
        f"bandpass one channel {seconds} s", f"1x{x.shape[1]} @{fs:g} Hz",
        baselines={"scipy sosfiltfilt": lambda: scipy.signal.sosfiltfilt(sos, x, axis=1)},
        ours={"numba bandpass": lambda: bandpass(x, fs, 0.5, 40.0)}, rounds=21,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline(side_by_side, name):
    x, fs, types = _load(name)
    config = PreprocessConfig()
    side_by_side(
        f"pipeline {name}", _shape(x, fs),
        baselines={"scipy FFT+filtfilt+zscore": lambda: _reference_pipeline(x, fs, config)},
        ours={"numba preprocess_signal": lambda: preprocess_signal(x, fs, types, config)}, rounds=11,
    )
