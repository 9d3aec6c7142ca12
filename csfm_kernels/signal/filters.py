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
sections stays in registers. Each pass runs four recurrences interleaved, so that the
core overlaps them instead of waiting on one (about 3x faster per sample): four channels
at once when a group of four channels is finite throughout (most multi-lead records),
otherwise four consecutive stretches of the run:

- up to ``_EXACT_MAX`` samples a stretch (a 10 s window, a CinC record), exactly: stretches
  after the first start from a zero state, and once the stretch before has ended, its true
  end state s is carried in (each output k of the stretch gains ``C A^k s``, the zero-input
  response of the two sections to s, read from a table made once per filter; the stretch's
  end state gains ``A^m s``). Linear algebra, not an approximation: equal to one plain
  recurrence to ~1e-13 of the output's range in float64;
- longer, as overlapping stretches: every stretch but the first starts ``warmup`` samples
  early, from the steady state for its first sample; warmup is chosen so that this start-up
  error decays below 1e-12 of itself (slowest pole radius r: r ** warmup <= 1e-12; 3,112
  samples for 0.5-40 Hz at 250 Hz), a small share of such a stretch.

Runs shorter than ``_LANE_MIN_EXACT`` samples, or too long to run exactly and shorter than
``_LANE_MIN`` x warmup, run as one recurrence. Long or short, runs match
``sosfiltfilt`` as closely (float32 rounding: ~5e-8 of the output's range on MIT-BIH and PTB
records).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.signal
from numba import njit, prange

from csfm_kernels.signal._parallel import serial_or_parallel

from csfm_kernels.signal.resample import FASTMATH, check_rate, check_signal, finite, output_array

_SETTLE = 1e-12  # a lane's start-up error must decay below this fraction of itself
_EXACT_MAX = 1 << 12  # stretches up to this long run exactly (the zero-input response table, 128 KB, stays in cache)
_LANE_MIN_EXACT = 64  # runs from this long on run as four stretches
_LANE_MIN = 2  # beyond 4 x _EXACT_MAX, runs from _LANE_MIN x warmup samples on run as overlapping stretches
_COPY_CHUNK = 256  # samples checked for finiteness at once when copying a run


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
    out = output_array(out, x.shape)
    _filtfilt_runs(x.size, x, np.arange(x.shape[0]), *butter_sections(fs, low_hz, high_hz, int(order)), out)
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
def butter_sections(fs: float, low_hz: float, high_hz: float,
                     order: int) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    """(sos [S, 6], zi [S, 2], padlen, warmup, response [P, _EXACT_MAX, 4]) of the band-pass,
    as ``sosfiltfilt`` would use them.

    zi is the per-section state of the steady response to a unit step (``sosfilt_zi``);
    padlen = 3 * (2 * S + 1 - trailing zero coefficients), scipy's default. warmup: samples
    after which a start-up error has decayed below _SETTLE of itself (its slowest pole,
    of radius r, gives r ** warmup <= _SETTLE). response: per pair of sections (P = ceil(S /
    2)), the zero-input output k samples after each unit state (``_zero_input_response``).
    """
    sos = scipy.signal.butter(order, (low_hz, high_hz), btype="band", fs=fs, output="sos")
    zi = scipy.signal.sosfilt_zi(sos)
    n_taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    radius = max(np.abs(np.roots([1.0, a1, a2])).max() for a1, a2 in sos[:, 4:])
    warmup = int(np.ceil(np.log(_SETTLE) / np.log(radius)))
    response = np.stack([_zero_input_response(_pair_coefficients(sos, s), _EXACT_MAX) for s in range(0, len(sos), 2)])
    for arr in (sos, zi, response):
        arr.setflags(write=False)
    return sos, zi, 3 * n_taps, warmup, response


@njit(cache=True)
def _pair_coefficients(sos, s):
    """(b0, b1, b2, a1, a2) of sections s and s + 1 as one 10-tuple; an identity section
    stands in for s + 1 past the last."""
    c0, c1, c2, d1, d2 = 1.0, 0.0, 0.0, 0.0, 0.0
    if s + 1 < sos.shape[0]:
        c0, c1, c2, d1, d2 = sos[s + 1, 0], sos[s + 1, 1], sos[s + 1, 2], sos[s + 1, 4], sos[s + 1, 5]
    return sos[s, 0], sos[s, 1], sos[s, 2], sos[s, 4], sos[s, 5], c0, c1, c2, d1, d2


@njit(cache=True)
def _pair_steady_state(zi, s, x0):
    """State (z0, z1, w0, w1) of sections s, s + 1 in the steady response to a constant x0
    at the cascade's input."""
    w0 = w1 = 0.0
    if s + 1 < zi.shape[0]:
        w0, w1 = zi[s + 1, 0] * x0, zi[s + 1, 1] * x0
    return zi[s, 0] * x0, zi[s, 1] * x0, w0, w1


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _pair_step(v, coef, state):
    """One sample v through two sections (direct form II transposed): (output, new state)."""
    b0, b1, b2, a1, a2, c0, c1, c2, d1, d2 = coef
    z0, z1, w0, w1 = state
    y = b0 * v + z0
    z0 = (b1 * v + z1) - a1 * y
    z1 = b2 * v - a2 * y
    out = c0 * y + w0
    w0 = (c1 * y + w1) - d1 * out
    w1 = c2 * y - d2 * out
    return out, (z0, z1, w0, w1)


_UNIT_STATES = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))
"""The unit states (z0, z1, w0, w1) of a pair of sections."""


@njit(cache=True)
def _transition(coef):
    """A [4, 4]: how the state of a pair of sections moves in one sample of zero input, so
    that state_{k+1} = A state_k; column j is ``_pair_step`` of v = 0 from unit state j."""
    a = np.empty((4, 4))
    for j in range(4):
        _, moved = _pair_step(0.0, coef, _UNIT_STATES[j])
        a[0, j], a[1, j], a[2, j], a[3, j] = moved
    return a


@njit(cache=True)
def _zero_input_response(coef, n):
    """[n, 4]: row k holds the pair's output k samples after starting from each unit state
    with zero input (C A^k), run as four lanes of ``_four_lanes``."""
    zeros, out = np.zeros(n), np.empty((4, n))
    _four_lanes((zeros, zeros, zeros, zeros), (out[0], out[1], out[2], out[3]), (0, 0, 0, 0), n, coef, _UNIT_STATES)
    return np.ascontiguousarray(out.T)


@njit(cache=True)
def _product(a, b):
    """a [4, 4] @ b [4, 4], written out (no BLAS call for 64 products)."""
    out = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            for k in range(4):
                out[i, j] += a[i, k] * b[k, j]
    return out


@njit(cache=True)
def _matrix_power(a, m):
    """a [4, 4] ** m (m >= 0) by repeated squaring."""
    result, base = np.eye(4), a.copy()
    while m:
        if m & 1:
            result = _product(result, base)
        base = _product(base, base)
        m >>= 1
    return result


@njit(cache=True, fastmath=FASTMATH)
def _carry_in(out, start, m, response, state):
    """Adds to out[start:start + m] the zero-input response to ``state`` (a 4-tuple) of a
    stretch filtered from a zero state: out[start + k] += response[k] . state."""
    t0, t1, t2, t3 = state
    for k in range(m):
        out[start + k] += response[k, 0] * t0 + response[k, 1] * t1 + response[k, 2] * t2 + response[k, 3] * t3


@njit(cache=True, fastmath=FASTMATH)
def _four_lanes(srcs, dsts, offsets, steps, coef, states):
    """Four independent runs of two sections, interleaved so that the core overlaps their
    recurrences: dsts[g][offsets[g] + k] = filtered srcs[g][offsets[g] + k] for k < steps,
    lane g started from states[g]. srcs, dsts: 4-tuples of 1-D views. Returns the 4 final
    states."""
    a0, a1, a2, a3 = srcs
    b0, b1, b2, b3 = dsts
    o0, o1, o2, o3 = offsets
    s0, s1, s2, s3 = states
    for k in range(steps):
        y0, s0 = _pair_step(a0[o0 + k], coef, s0)
        y1, s1 = _pair_step(a1[o1 + k], coef, s1)
        y2, s2 = _pair_step(a2[o2 + k], coef, s2)
        y3, s3 = _pair_step(a3[o3 + k], coef, s3)
        b0[o0 + k], b1[o1 + k], b2[o2 + k], b3[o3 + k] = y0, y1, y2, y3
    return s0, s1, s2, s3


@njit(cache=True, fastmath=FASTMATH)
def _pair_pass(src, dst, sos, zi, s, x0, warmup, response):
    """dst [G, n] = sections s, s + 1 run over each row of src [G, n] (views, either
    direction), row g started from the steady state for a constant x0[g] at the cascade's
    input. G = 4: the rows run as four interleaved lanes. response [_EXACT_MAX, 4]: the
    pair's zero-input response table.

    G = 1: the row is cut into four stretches run as lanes (see the module doc). With m =
    n // 4 <= _EXACT_MAX, lane g filters src[g m:(g + 1) m] from a zero state (lane 0 from
    the true one) and the true state each lane starts from is carried in afterwards, lane
    by lane; the last n - 4 m samples follow from the last lane's true end state. Longer:
    lane g filters src[g m:g m + m + warmup], m = (n - warmup) // 4, lanes after the first
    starting from the steady state for their first sample, only their outputs after the
    first warmup counting (the earlier lane overwrites the others later in the same loop).
    Rows shorter than _LANE_MIN_EXACT, or too long to run exactly and shorter than _LANE_MIN
    x warmup: one plain recurrence.
    """
    n = src.shape[1]
    coef = _pair_coefficients(sos, s)
    if src.shape[0] == 4:
        states = (_pair_steady_state(zi, s, x0[0]), _pair_steady_state(zi, s, x0[1]),
                  _pair_steady_state(zi, s, x0[2]), _pair_steady_state(zi, s, x0[3]))
        _four_lanes((src[0], src[1], src[2], src[3]), (dst[0], dst[1], dst[2], dst[3]), (0, 0, 0, 0), n, coef, states)
        return
    row, out = src[0], dst[0]
    state = _pair_steady_state(zi, s, x0[0])
    if n < _LANE_MIN_EXACT or (n // 4 > _EXACT_MAX and n < _LANE_MIN * warmup):
        done = 0
    elif n // 4 <= _EXACT_MAX:
        m, zero = n // 4, (0.0, 0.0, 0.0, 0.0)
        ends = _four_lanes((row, row, row, row), (out, out, out, out), (0, m, 2 * m, 3 * m), m, coef,
                           (state, zero, zero, zero))
        carried = _matrix_power(_transition(coef), m)
        state = ends[0]
        for g in range(1, 4):  # lane g began at the state lane g - 1 truly ended in
            _carry_in(out, g * m, m, response, state)
            moved = [carried[i, 0] * state[0] + carried[i, 1] * state[1] + carried[i, 2] * state[2]
                     + carried[i, 3] * state[3] for i in range(4)]
            state = (ends[g][0] + moved[0], ends[g][1] + moved[1], ends[g][2] + moved[2], ends[g][3] + moved[3])
        done = 4 * m
    else:
        m = (n - warmup) // 4
        states = (state, _pair_steady_state(zi, s, row[m]), _pair_steady_state(zi, s, row[2 * m]),
                  _pair_steady_state(zi, s, row[3 * m]))
        state = _four_lanes((row, row, row, row), (out, out, out, out), (0, m, 2 * m, 3 * m), m + warmup, coef,
                            states)[3]
        done = 4 * m + warmup
    for i in range(done, n):
        out[i], state = _pair_step(row[i], coef, state)


@njit(cache=True)
def _copy_finite_run(row, start, dest):
    """Copies row[start:] into dest as float64 up to the first non-finite sample; returns
    that sample's index (len(row) if none)."""
    i, n = start, row.shape[0]
    while i + _COPY_CHUNK <= n:  # whole chunks while all finite: a vectorised check and copy
        chunk = row[i:i + _COPY_CHUNK]
        n_finite = 0
        for v in chunk:
            n_finite += finite(v)
        if n_finite < _COPY_CHUNK:
            break
        dest[i - start:i - start + _COPY_CHUNK] = chunk
        i += _COPY_CHUNK
    while i < n and finite(row[i]):
        dest[i - start] = row[i]
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
def _filtfilt_padded(buf, tmp, sos, zi, padlen, warmup, response):
    """sosfiltfilt of each row of buf [G, n + 2 * padlen] (G = 1 or 4) whose middle n
    samples are a finite run; tmp: scratch of the same shape. Returns the filtered rows:
    buf or tmp."""
    for g in range(buf.shape[0]):
        _odd_pad(buf[g], padlen)
    src, dst = buf, tmp
    x0 = src[:, 0].copy()
    for s in range(0, sos.shape[0], 2):
        _pair_pass(src, dst, sos, zi, s, x0, warmup, response[s // 2])
        src, dst = dst, src
    x0 = src[:, src.shape[1] - 1].copy()
    for s in range(0, sos.shape[0], 2):
        _pair_pass(src[:, ::-1], dst[:, ::-1], sos, zi, s, x0, warmup, response[s // 2])
        src, dst = dst, src
    return src


@njit(cache=True)
def _skip_gap(row, start):
    """First index >= start holding a finite sample (len(row) if none)."""
    i = start
    while i < row.shape[0] and not finite(row[i]):
        i += 1
    return i


@njit(cache=True)
def _filtfilt_row(row, out_row, padlen, sos, zi, warmup, response, ext, tmp):
    """out_row [T] (may be row) = row [T] with each finite run longer than padlen filtered,
    the rest NaN; ext, tmp: scratch [1, T + 2 padlen]. A run is read whole before its
    output is written."""
    n_samples = row.shape[0]
    start = _skip_gap(row, 0)
    out_row[:start] = np.nan
    while start < n_samples:
        stop = _copy_finite_run(row, start, ext[0, padlen:])
        n = stop - start
        if n > padlen:
            filtered = _filtfilt_padded(ext[:, :n + 2 * padlen], tmp[:, :n + 2 * padlen], sos, zi, padlen, warmup,
                                        response)
            out_row[start:stop] = filtered[0, padlen:padlen + n]
        else:
            out_row[start:stop] = np.nan
        start = _skip_gap(row, stop)
        out_row[stop:start] = np.nan


@serial_or_parallel()
def _filtfilt_runs(x, rows, sos, zi, padlen, warmup, response, out):
    """out [C, T] (may be x) = x [C, T] with each finite run of the channels ``rows`` longer
    than padlen filtered, the rest NaN; one ``filtfilt_group`` per parallel task."""
    for group in prange(filter_groups(rows.shape[0])):
        filtfilt_group(x, rows, group, sos, zi, padlen, warmup, response, out)


@njit(cache=True)
def filter_groups(n_rows):
    """Groups of four channels (the last may be smaller) that n_rows channels form."""
    return (n_rows + 3) // 4


@njit(cache=True)
def filtfilt_group(x, rows, group, sos, zi, padlen, warmup, response, out):
    """Filters channels rows[4 group:4 group + 4] of x [C, T] into out [C, T] (may be x):
    each finite run longer than padlen as ``sosfiltfilt`` with the sections of
    ``butter_sections``, the rest NaN. Four channels finite throughout run as four
    interleaved lanes, any other channel on its own."""
    n_samples = x.shape[1]
    chosen = rows[4 * group:4 * group + 4]
    ext, tmp = np.empty((chosen.shape[0], n_samples + 2 * padlen)), np.empty((chosen.shape[0], n_samples + 2 * padlen))
    whole = chosen.shape[0] == 4 and n_samples > padlen
    for i in range(chosen.shape[0]):
        whole = whole and _copy_finite_run(x[chosen[i]], 0, ext[i, padlen:]) == n_samples
    if whole:
        filtered = _filtfilt_padded(ext, tmp, sos, zi, padlen, warmup, response)
        for i in range(4):
            out[chosen[i]] = filtered[i, padlen:padlen + n_samples]
    else:
        for i in range(chosen.shape[0]):
            _filtfilt_row(x[chosen[i]], out[chosen[i]], padlen, sos, zi, warmup, response, ext[i:i + 1],
                          tmp[i:i + 1])
