"""Per-channel z-score that ignores NaN and keeps flat channels finite."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from csfm_kernels.signal.resample import FASTMATH, check_signal, finite, output_array


def zscore(x: np.ndarray, std_floor: float, out: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / max(std, std_floor) per channel, mean and std over the finite samples.

    x: [C, T] real array, NaN where missing. std_floor > 0, in x's units: a channel whose
    standard deviation (population, ddof = 0) is below it is divided by std_floor instead,
    so a flat line becomes all zeros. out: optional [C, T] float32 C-contiguous array to
    write into; it may be x itself.
    Returns [C, T] float32 (out when given); non-finite samples (NaN, inf) are NaN, and a
    channel with no finite sample is all NaN. T = 0 gives [C, 0].
    """
    x = check_signal(x)
    floor = float(std_floor) if isinstance(std_floor, (int, float, np.number)) else np.nan
    if not (np.isfinite(floor) and floor > 0):
        raise ValueError(f"std_floor must be a positive finite number, got {std_floor!r}")
    out = output_array(out, x.shape)
    _zscore(x, floor, out)
    return out


@njit(cache=True, fastmath=FASTMATH)
def _finite_mean_std(row):
    """(mean, population std) of the finite samples of row [T]; (nan, nan) when none are."""
    count, total = 0, 0.0
    for t in range(row.shape[0]):
        v = np.float64(row[t])
        ok = finite(v)
        count += ok
        total += v if ok else 0.0
    if count == 0:
        return np.nan, np.nan
    mean = total / count
    squares = 0.0
    for t in range(row.shape[0]):
        d = np.float64(row[t]) - mean
        squares += d * d if finite(d) else 0.0
    return mean, np.sqrt(squares / count)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _zscore(x, std_floor, out):
    """out [C, T] (may be x) = z-scores of x [C, T]; non-finite samples become NaN."""
    for c in prange(x.shape[0]):
        row, out_row = x[c], out[c]
        mean, std = _finite_mean_std(row)
        scale = 1.0 / max(std, std_floor)
        for t in range(row.shape[0]):
            v = np.float64(row[t])
            out_row[t] = (v - mean) * scale if finite(v) else np.nan
