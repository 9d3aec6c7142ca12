"""Per-channel z-score that ignores NaN and keeps flat channels finite."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from csfm_kernels.signal._parallel import serial_or_parallel

from csfm_kernels.signal.resample import FASTMATH, check_signal, finite, output_array


def zscore(x: np.ndarray, std_floor: float, out: np.ndarray | None = None,
           valid: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / max(std, std_floor) per channel, mean and std over the finite samples.

    x: [C, T] real array, NaN where missing. std_floor > 0, in x's units: a channel whose
    standard deviation (population, ddof = 0) is below it is divided by std_floor instead,
    so a flat line becomes all zeros. out: optional [C, T] float32 C-contiguous array to
    write into; it may be x itself. valid: optional [C, T] bool C-contiguous array; when
    given it receives np.isfinite(x) and non-finite samples are written as 0, not NaN.
    Returns [C, T] float32 (out when given); non-finite samples (NaN, inf) are NaN (0 with
    valid), and a channel with no finite sample is all NaN (all 0). T = 0 gives [C, 0].
    """
    x = check_signal(x)
    floor = check_std_floor(std_floor)
    out = output_array(out, x.shape)
    if valid is None:
        _zscore(x.size, x, floor, np.nan, out, np.empty((x.shape[0], 0), np.bool_))
        return out
    if not (isinstance(valid, np.ndarray) and valid.dtype == np.bool_ and valid.shape == x.shape
            and valid.flags.c_contiguous and valid.flags.writeable):
        raise ValueError(f"valid must be a writeable C-contiguous bool array of shape {x.shape}, got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} {getattr(valid, 'shape', '')}")
    _zscore(x.size, x, floor, 0.0, out, valid)
    return out


def check_std_floor(std_floor: object) -> float:
    """std_floor as a positive finite float; ValueError otherwise."""
    floor = float(std_floor) if isinstance(std_floor, (int, float, np.number)) else np.nan
    if not (np.isfinite(floor) and floor > 0):
        raise ValueError(f"std_floor must be a positive finite number, got {std_floor!r}")
    return floor


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


@serial_or_parallel()
def _zscore(x, std_floor, missing, out, valid):
    """out [C, T] (may be x) = z-scores of x [C, T], one ``zscore_row`` per parallel task."""
    for c in prange(x.shape[0]):
        zscore_row(x, c, std_floor, missing, out, valid)


@njit(cache=True, fastmath=FASTMATH)
def zscore_row(x, c, std_floor, missing, out, valid):
    """out[c] (may be x[c]) = z-scores of x[c] (x [C, T]); non-finite samples become
    missing. valid: [C, T] bool receiving the finite mask, or [C, 0] for none."""
    row, out_row = x[c], out[c]
    mean, std = _finite_mean_std(row)
    scale = 1.0 / max(std, std_floor)
    if valid.shape[1] == 0:
        for t in range(row.shape[0]):
            v = np.float64(row[t])
            out_row[t] = (v - mean) * scale if finite(v) else missing
    else:
        valid_row = valid[c]
        for t in range(row.shape[0]):
            v = np.float64(row[t])
            ok = finite(v)
            out_row[t] = (v - mean) * scale if ok else missing
            valid_row[t] = ok
