"""Hand-crafted rhythm and signal-quality features of a single-lead ECG.

R peaks come from wfdb's XQRS detector; the RR intervals between them give heart rate,
variability and irregularity measures (atrial fibrillation is irregularly irregular), and
a few amplitude and quality measures describe the recording itself (noise, clipping).

Records with fewer than 3 detected beats have fewer than 2 RR intervals, so every RR
feature (heart rate included) is NaN for them; ``n_beats`` and the signal features stay
finite. A classifier on these features must impute (e.g. with the training median).
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterable

import numpy as np
from scipy import signal as sps

RR_FEATURE_NAMES = ("heart_rate_bpm", "rr_mean_s", "rr_std_s", "rr_cv", "rmssd_s", "pnn50",
                    "sd_entropy_bits", "irregular_fraction")
SIGNAL_FEATURE_NAMES = ("n_beats", "signal_std", "r_amplitude", "clipped_fraction",
                        "hf_power_ratio", "zero_crossing_rate_hz")
FEATURE_NAMES = RR_FEATURE_NAMES + SIGNAL_FEATURE_NAMES

MIN_BEATS = 3                 # fewer beats: RR features are NaN
IRREGULAR_THRESHOLD = 0.15    # |dRR| above this fraction of the local mean RR is irregular
_ENTROPY_BINS = np.linspace(0.0, 0.6, 13)  # |dRR| histogram edges, s; larger values fall in the last bin
_HF_CUTOFF_HZ = 40.0
_BAND_HZ = (0.5, 40.0)        # band of the zero-crossing rate and R-amplitude signal


def _checked_signal(signal: np.ndarray, fs: float) -> np.ndarray:
    """``signal`` as a finite float64 [T]; NaN samples are set to the median of the rest."""
    x = np.asarray(signal, np.float64)
    if x.ndim != 1:
        raise ValueError(f"signal must be 1-D [T], got shape {x.shape}")
    if fs <= 0:
        raise ValueError(f"fs must be positive, got {fs}")
    finite = np.isfinite(x)
    if x.size == 0 or not finite.any():
        raise ValueError(f"signal is empty or has no finite sample (length {x.size}); cannot detect R peaks")
    if not finite.all():
        x = np.where(finite, x, np.median(x[finite]))
    return x


def detect_r_peaks(signal: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices of an ECG, by wfdb's XQRS detector, with its output silenced.

    signal: [T] float (mV), sampled at ``fs`` Hz. Returns int64 [n_beats], ascending; empty
    for a flat signal or one shorter than 1 s. NaN samples are replaced by the median.
    Raises ValueError for an empty or all-NaN signal.
    """
    from wfdb.processing import XQRS  # wfdb's import is slow; only the detector needs it

    x = _checked_signal(signal, fs)
    if np.ptp(x) == 0 or len(x) < fs:  # flat, or too short for XQRS's filters: no beats
        return np.zeros(0, np.int64)
    logger = logging.getLogger("wfdb")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            xqrs = XQRS(sig=x, fs=fs)
            xqrs.detect(verbose=False)
    finally:
        logger.setLevel(level)
    return np.unique(np.asarray(xqrs.qrs_inds, np.int64))


def _rr_features(peaks: np.ndarray, fs: float) -> dict[str, float]:
    """RR features of R peaks [n_beats] at ``fs`` Hz; all NaN below MIN_BEATS beats."""
    if len(peaks) < MIN_BEATS:
        return {name: float("nan") for name in RR_FEATURE_NAMES}
    rr = np.diff(peaks) / fs                        # [n_beats - 1], s
    d_rr = np.diff(rr)                              # [n_beats - 2], s
    local_mean = 0.5 * (rr[1:] + rr[:-1])           # mean of the two intervals around each dRR
    hist = np.histogram(np.minimum(np.abs(d_rr), _ENTROPY_BINS[-1]), bins=_ENTROPY_BINS)[0]
    p = hist[hist > 0] / hist.sum()
    mean = rr.mean()
    return {
        "heart_rate_bpm": 60.0 / mean,
        "rr_mean_s": mean,
        "rr_std_s": rr.std(),
        "rr_cv": rr.std() / mean,
        "rmssd_s": float(np.sqrt(np.mean(d_rr ** 2))),
        "pnn50": float(np.mean(np.abs(d_rr) > 0.05)),
        "sd_entropy_bits": float(max(0.0, -(p * np.log2(p)).sum())),
        "irregular_fraction": float(np.mean(np.abs(d_rr) > IRREGULAR_THRESHOLD * local_mean)),
    }


def _signal_features(x: np.ndarray, fs: float, peaks: np.ndarray) -> dict[str, float]:
    """Amplitude and quality features of a finite signal x: [T] with R peaks [n_beats]."""
    low, high = _BAND_HZ[0], min(_BAND_HZ[1], 0.45 * fs)
    if len(x) > 30:
        sos = sps.butter(2, [low, high], btype="bandpass", fs=fs, output="sos")
        band = sps.sosfiltfilt(sos, x, padlen=min(len(x) - 1, 3 * 6))
    else:
        band = x - np.median(x)
    span = np.ptp(x)
    tol = 1e-3 * span
    clipped = np.mean((x >= x.max() - tol) | (x <= x.min() + tol)) if span > 0 else 1.0
    freqs, psd = sps.periodogram(x - x.mean(), fs=fs)
    total = psd.sum()
    hf = psd[freqs > _HF_CUTOFF_HZ].sum() / total if total > 0 else 0.0
    signs = np.signbit(band)
    crossings = np.count_nonzero(signs[1:] != signs[:-1])
    return {
        "n_beats": float(len(peaks)),
        "signal_std": float(x.std()),
        "r_amplitude": float(np.median(np.abs(band[peaks]))) if len(peaks) else 0.0,
        "clipped_fraction": float(clipped),
        "hf_power_ratio": float(hf),
        "zero_crossing_rate_hz": crossings * fs / len(x),
    }


def rr_features(signal: np.ndarray, fs: float) -> dict[str, float]:
    """Rhythm and signal-quality features of one ECG, keyed by :data:`FEATURE_NAMES`.

    signal: [T] float (mV) at ``fs`` Hz. RR features (s, or bpm for the heart rate):
    mean/std/CV of RR, RMSSD, pNN50 (fraction of |dRR| > 50 ms), successive-difference
    entropy (Shannon entropy in bits of |dRR| in 50 ms bins up to 0.6 s), the fraction of
    irregular beats (|dRR| > 15 % of the mean of the two intervals); NaN with fewer than
    3 beats. Signal features: beat count, signal std, median |R| of the 0.5-40 Hz
    band-passed signal, fraction of samples within 0.1 % of the range of either extreme
    (clipping), share of power above 40 Hz, zero crossings per second of the band-passed signal.
    """
    x = _checked_signal(signal, fs)
    peaks = detect_r_peaks(x, fs)
    features = {**_rr_features(peaks, fs), **_signal_features(x, fs, peaks)}
    return {name: float(features[name]) for name in FEATURE_NAMES}


def feature_matrix(signals: Iterable[np.ndarray], fs: float, progress: bool = False) -> np.ndarray:
    """Features of many ECGs: signals, each [T_i] at ``fs`` Hz -> [N, F] float64, columns in
    :data:`FEATURE_NAMES` order (NaN where undefined). ``progress`` shows a tqdm bar."""
    signals = list(signals)
    if progress:
        from tqdm import tqdm
        signals_iter = tqdm(signals, desc="rr features", unit="record")
    else:
        signals_iter = signals
    rows = [[rr_features(s, fs)[name] for name in FEATURE_NAMES] for s in signals_iter]
    return np.asarray(rows, np.float64).reshape(len(signals), len(FEATURE_NAMES))
