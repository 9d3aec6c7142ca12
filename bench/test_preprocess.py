"""Preprocessing on real records: numba kernels vs scipy / wfdb, same inputs, same run.

(a) resampling to 250 Hz alone: ours vs scipy.signal.resample (FFT), resample_poly and
wfdb.processing.resample_sig (one channel at a time, as it takes 1-D signals); ours also
with the shorter kernel ``preprocess_signal`` uses before its 0.5-40 Hz band-pass
(band_hz = 60 Hz).
(b) the whole per-record pipeline, resample -> band-pass -> z-score: ours
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


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline(side_by_side, name):
    x, fs, types = _load(name)
    config = PreprocessConfig()
    side_by_side(
        f"pipeline {name}", _shape(x, fs),
        baselines={"scipy FFT+filtfilt+zscore": lambda: _reference_pipeline(x, fs, config)},
        ours={"numba preprocess_signal": lambda: preprocess_signal(x, fs, types, config)}, rounds=11,
    )
