"""Zero-phase Butterworth band-pass: scipy's ``sosfiltfilt`` run per finite stretch, in numba.

The second-order sections come from ``scipy.signal.butter(order, (low, high), "band",
fs=fs, output="sos")``, designed once per (fs, band, order). Each finite run of a channel
(the samples between NaN gaps) is filtered on its own exactly as ``sosfiltfilt`` filters a
whole signal: odd-reflection padding of ``padlen`` samples at both ends (``padlen`` = 3 x
the filter's tap count, scipy's default), a forward pass started from the steady state
for the first padded sample, a backward pass started from the steady state for the last
forward output, then the padding is dropped. A run of ``padlen`` samples or fewer (too
short to pad; ``sosfiltfilt`` refuses such input) becomes NaN: it joins the gap rather
than passing through unfiltered. NaN never spreads beyond its own gap.

Sections run in pairs, one pass over the run per pair, so that the state of both
sections stays in registers.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.signal
from numba import njit, prange

from csfm_kernels.signal.resample import check_rate, check_signal, finite, output_array


def bandpass(x: np.ndarray, fs: float, low_hz: float, high_hz: float, order: int = 2,
             out: np.ndarray | None = None) -> np.ndarray:
    """Zero-phase Butterworth band-pass of every channel of x, gaps kept as gaps.

    x: [C, T] real array, samples at fs Hz, NaN where missing. low_hz < high_hz: the -3 dB
    edges of one pass (-6 dB after both passes), in Hz, inside (0, fs / 2). order: the
    Butterworth order per edge (the band-pass has 2 * order poles). out: optional [C, T]
    float32 C-contiguous array to write into; it may be x itself.
    Returns [C, T] float32 (out when given); T = 0 gives [C, 0]. Equal to
    ``scipy.signal.sosfiltfilt`` on every finite run longer than the pad length (to ~1e-12
    relative in float64, before the float32 rounding); shorter runs and gaps are NaN.
    """
    x = check_signal(x)
    fs = check_rate(fs, "fs")
    low_hz, high_hz = _check_band(low_hz, high_hz, fs)
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    sos, zi, padlen = _butter_sections(fs, low_hz, high_hz, int(order))
    out = output_array(out, x.shape)
    _filtfilt_runs(x, sos, zi, padlen, out)
    return out


def _check_band(low_hz: object, high_hz: object, fs: float) -> tuple[float, float]:
    """(low_hz, high_hz) as floats with 0 < low_hz < high_hz < fs / 2; ValueError naming the bad one."""
    low, high = check_rate(low_hz, "low_hz"), check_rate(high_hz, "high_hz")
    nyquist = fs / 2
    if not low < nyquist:
        raise ValueError(f"low_hz must lie in (0, fs / 2) = (0, {nyquist:g}) Hz, got {low_hz!r}")
    if not low < high < nyquist:
        raise ValueError(f"high_hz must lie in (low_hz, fs / 2) = ({low:g}, {nyquist:g}) Hz, got {high_hz!r}")
    return low, high


@lru_cache(maxsize=64)
def _butter_sections(fs: float, low_hz: float, high_hz: float, order: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(sos [S, 6], zi [S, 2], padlen) of the band-pass, as ``sosfiltfilt`` would use them.

    zi is the per-section state of the steady response to a unit step (``sosfilt_zi``);
    padlen = 3 * (2 * S + 1 - trailing zero coefficients), scipy's default.
    """
    sos = scipy.signal.butter(order, (low_hz, high_hz), btype="band", fs=fs, output="sos")
    zi = scipy.signal.sosfilt_zi(sos)
    n_taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    for arr in (sos, zi):
        arr.setflags(write=False)
    return sos, zi, 3 * n_taps


@njit(cache=True)
def _section(sos, s):
    """(b0, b1, b2, a1, a2) of section s, or an identity section when s is past the last."""
    if s >= sos.shape[0]:
        return 1.0, 0.0, 0.0, 0.0, 0.0
    return sos[s, 0], sos[s, 1], sos[s, 2], sos[s, 4], sos[s, 5]


@njit(cache=True)
def _section_pair_pass(buf, sos, zi, s, x0, reverse):
    """Runs sections s and s + 1 over buf in place (direct form II transposed), forwards
    or backwards, each started from its steady state for a constant input x0."""
    b0, b1, b2, a1, a2 = _section(sos, s)
    c0, c1, c2, d1, d2 = _section(sos, s + 1)
    z0, z1 = zi[s, 0] * x0, zi[s, 1] * x0
    w0 = w1 = 0.0
    if s + 1 < sos.shape[0]:
        w0, w1 = zi[s + 1, 0] * x0, zi[s + 1, 1] * x0
    n = buf.shape[0]
    for k in range(n):
        i = n - 1 - k if reverse else k
        v = buf[i]
        y = b0 * v + z0
        z0 = b1 * v - a1 * y + z1
        z1 = b2 * v - a2 * y
        out = c0 * y + w0
        w0 = c1 * y - d1 * out + w1
        w1 = c2 * y - d2 * out
        buf[i] = out


@njit(cache=True)
def _cascade(buf, sos, zi, reverse):
    """All sections over buf in place, started from the steady state for buf's first
    sample in the direction of travel (sosfilt with zi * that sample)."""
    x0 = buf[buf.shape[0] - 1] if reverse else buf[0]
    for s in range(0, sos.shape[0], 2):
        _section_pair_pass(buf, sos, zi, s, x0, reverse)


@njit(cache=True)
def _copy_finite_run(row, start, dest):
    """Copies row[start:] into dest as float64 up to the first non-finite sample; returns
    that sample's index (len(row) if none)."""
    i = start
    while i < row.shape[0]:
        v = np.float64(row[i])
        if not finite(v):
            break
        dest[i - start] = v
        i += 1
    return i


@njit(cache=True)
def _odd_pad(buf, padlen):
    """Fills the padlen samples at each end of buf [n + 2 * padlen] by odd reflection of
    its middle n samples about their end samples (scipy's odd_ext)."""
    n = buf.shape[0] - 2 * padlen
    first, last = buf[padlen], buf[padlen + n - 1]
    for j in range(padlen):
        buf[j] = 2.0 * first - buf[2 * padlen - j]
        buf[padlen + n + j] = 2.0 * last - buf[padlen + n - 2 - j]


@njit(cache=True)
def _filtfilt_padded(buf, sos, zi, padlen):
    """sosfiltfilt in place on buf [n + 2 * padlen] whose middle n samples are a finite run."""
    _odd_pad(buf, padlen)
    _cascade(buf, sos, zi, False)
    _cascade(buf, sos, zi, True)


@njit(cache=True)
def _skip_gap(row, start):
    """First index >= start holding a finite sample (len(row) if none)."""
    i = start
    while i < row.shape[0] and not finite(row[i]):
        i += 1
    return i


@njit(cache=True, parallel=True)
def _filtfilt_runs(x, sos, zi, padlen, out):
    """out [C, T] (may be x) = x [C, T] with each finite run longer than padlen filtered,
    the rest NaN. A run is read whole before its output is written."""
    n_channels, n_samples = x.shape
    for c in prange(n_channels):
        row, out_row = x[c], out[c]
        ext = np.empty(n_samples + 2 * padlen)
        start = _skip_gap(row, 0)
        out_row[:start] = np.nan
        while start < n_samples:
            stop = _copy_finite_run(row, start, ext[padlen:])
            n = stop - start
            if n > padlen:
                _filtfilt_padded(ext[:n + 2 * padlen], sos, zi, padlen)
                out_row[start:stop] = ext[padlen:padlen + n]
            else:
                out_row[start:stop] = np.nan
            start = _skip_gap(row, stop)
            out_row[stop:start] = np.nan
