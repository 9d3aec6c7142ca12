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
sections stays in registers. The recurrence of one run waits on its previous sample, so
independent recurrences run side by side:

- a group of four channels finite throughout (most multi-lead records) runs as four
  interleaved scalar lanes, one channel each;
- any other channel, run by run, is cut into ``_LANES`` stretches of equal length m (up to
  ``_STRETCH_MAX``; longer runs go in consecutive chunks of that many stretches) filtered at
  once, stretch g in lane g of one vector (the compiler vectorises across lanes). A first
  run of the lanes from zero states (stretch 0 from the run's true state) gives each
  stretch's end state; its true end state is that plus ``A^m`` times the true end state of
  the stretch before (A: the pair's one-sample state transition, its powers kept per
  filter), and a second run from those true starts gives the output: linear algebra, not
  an approximation, equal to one plain recurrence to ~1e-11 of the output's range in
  float64. Runs shorter than ``_LANES`` x ``_STRETCH_MIN`` samples, and the last few
  samples of a chunked run, run as one plain recurrence.

Runs match ``sosfiltfilt`` to float32 rounding (~5e-8 of the output's range on MIT-BIH and
PTB records).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.signal
from numba import njit, prange

from csfm_kernels.signal._parallel import serial_or_parallel

from csfm_kernels.signal.resample import FASTMATH, check_rate, check_signal, finite, output_array

_LANES = 16  # stretches of a channel's run filtered at once (16 float64 a state variable: 2 AVX-512 registers)
_STRETCH_MAX = 1 << 10  # longest stretch, in samples (the powers of A kept: 1,025 x 4 x 4 per pair of sections)
_STRETCH_MIN = 16  # runs shorter than _LANES x this run as one plain recurrence
_TILE = 8  # rows of a chunk moved into or out of the lane layout at once
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
    low_hz, high_hz = check_band(low_hz, high_hz, fs)
    out = output_array(out, x.shape)
    _filtfilt_runs(x.size, x, np.arange(x.shape[0]), *butter_sections(fs, low_hz, high_hz, check_order(order)), out)
    return out


def check_order(order: object) -> int:
    """order (the Butterworth order per band edge) as a positive int; ValueError otherwise."""
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    return int(order)


def check_band(low_hz: object, high_hz: object, fs: float) -> tuple[float, float]:
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
                    order: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(sos [S, 6], zi [S, 2], padlen, powers [P, _STRETCH_MAX + 1, 4, 4]) of the band-pass,
    as ``sosfiltfilt`` would use them; fs, low_hz, high_hz in Hz, already checked.

    zi is the per-section state of the steady response to a unit step (``sosfilt_zi``);
    padlen = 3 * (2 * S + 1 - trailing zero coefficients), scipy's default. powers: per pair
    of sections (P = ceil(S / 2)), the powers of its state transition matrix
    (``_zero_input_states``).
    """
    sos = scipy.signal.butter(order, (low_hz, high_hz), btype="band", fs=fs, output="sos")
    zi = scipy.signal.sosfilt_zi(sos)
    n_taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    powers = np.stack([_zero_input_states(_pair_coefficients(sos, s)) for s in range(0, len(sos), 2)])
    for arr in (sos, zi, powers):
        arr.setflags(write=False)
    return sos, zi, 3 * n_taps, powers


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


@njit(cache=True)
def _zero_input_states(coef):
    """[_STRETCH_MAX + 1, 4, 4]: entry k is A^k, A the pair's one-sample state transition:
    column j holds the state k samples of zero input after unit state j, run through
    ``_pair_step`` (as exact as the recurrence; repeated squaring of A lost up to 1e-6 of
    A^4096's entries for a 0.05 Hz high-pass at 250 Hz)."""
    powers = np.empty((_STRETCH_MAX + 1, 4, 4))
    powers[0] = np.eye(4)
    for j in range(4):
        state = (powers[0, 0, j], powers[0, 1, j], powers[0, 2, j], powers[0, 3, j])
        for k in range(1, _STRETCH_MAX + 1):
            _, state = _pair_step(0.0, coef, state)
            powers[k, 0, j], powers[k, 1, j], powers[k, 2, j], powers[k, 3, j] = state
    return powers


@njit(cache=True, fastmath=FASTMATH)
def _four_lanes(rows, coef, states):
    """The pair run in place over each of the four rows [4, n] (views, either direction),
    interleaved so that the core overlaps their recurrences, row g from states[g]."""
    s0, s1, s2, s3 = states
    r0, r1, r2, r3 = rows[0], rows[1], rows[2], rows[3]
    for k in range(rows.shape[1]):
        r0[k], s0 = _pair_step(r0[k], coef, s0)
        r1[k], s1 = _pair_step(r1[k], coef, s1)
        r2[k], s2 = _pair_step(r2[k], coef, s2)
        r3[k], s3 = _pair_step(r3[k], coef, s3)


@njit(cache=True, fastmath=FASTMATH)
def _lanes(x, y, coef, state):
    """y[k, g] = the pair's output for x[k, g]: _LANES independent recurrences, lane g down
    column g of x [m, _LANES] from state[:, g]; state [4, _LANES] ends as the lanes' end
    states. The inner loop over lanes is what the compiler vectorises."""
    st = state.copy()
    for k in range(x.shape[0]):
        xk, yk = x[k], y[k]
        for g in range(_LANES):
            yk[g], (st[0, g], st[1, g], st[2, g], st[3, g]) = _pair_step(
                xk[g], coef, (st[0, g], st[1, g], st[2, g], st[3, g]))
    state[:] = st


@njit(cache=True)
def _stretch_lengths(n):
    """[K] int64: stretch length m of each chunk of a run of n samples (chunk i: _LANES m_i
    consecutive samples): _STRETCH_MAX while whole chunks fit, then the rest // _LANES if
    that is at least _STRETCH_MIN. The samples after the chunks are the run's tail."""
    full, rest = divmod(n, _LANES * _STRETCH_MAX)
    last = rest // _LANES if rest >= _LANES * _STRETCH_MIN else 0
    lengths = np.full(full + (last > 0), _STRETCH_MAX, np.int64)
    if last:
        lengths[full] = last
    return lengths


@njit(cache=True)
def _move_lanes(chunk, lanes, into):
    """Copies chunk [_LANES m] (a view, either direction) into its lane layout lanes [m,
    _LANES] (into; stretch g, samples g m .. g m + m - 1, in column g) or back. Rows go
    _TILE at a time: each stretch's _TILE consecutive samples to one column of _TILE rows."""
    m = lanes.shape[0]
    for k0 in range(0, m, _TILE):
        rows = min(_TILE, m - k0)
        for g in range(_LANES):
            stretch, column = chunk[g * m + k0:g * m + k0 + rows], lanes[k0:k0 + rows, g]
            if into:  # the direction tested outside the copy loops: they vectorise
                for k in range(rows):
                    column[k] = stretch[k]
            else:
                for k in range(rows):
                    stretch[k] = column[k]


@njit(cache=True)
def _lane_pass(x, y, coef, state, powers):
    """y [m, _LANES] = the pair run over a chunk in lanes x [m, _LANES] (see ``_move_lanes``)
    from the true state ``state`` (a 4-tuple); returns the true end state. powers: the
    pair's ``_zero_input_states``."""
    lanes = np.zeros((4, _LANES))
    lanes[0, 0], lanes[1, 0], lanes[2, 0], lanes[3, 0] = state
    _lanes(x, y, coef, lanes)  # end states: stretch 0 true, the others from zero
    carried = powers[x.shape[0]]
    for g in range(1, _LANES):  # true end of g = its zero-start end + A^m (true end of g - 1)
        s0, s1, s2, s3 = lanes[0, g - 1], lanes[1, g - 1], lanes[2, g - 1], lanes[3, g - 1]
        for i in range(4):
            lanes[i, g] += carried[i, 0] * s0 + carried[i, 1] * s1 + carried[i, 2] * s2 + carried[i, 3] * s3
    for g in range(_LANES - 1, 0, -1):  # stretch g starts where stretch g - 1 truly ended
        lanes[:, g] = lanes[:, g - 1]
    lanes[0, 0], lanes[1, 0], lanes[2, 0], lanes[3, 0] = state
    _lanes(x, y, coef, lanes)
    return lanes[0, _LANES - 1], lanes[1, _LANES - 1], lanes[2, _LANES - 1], lanes[3, _LANES - 1]


@njit(cache=True)
def _cascade_one(run, sos, zi, powers):
    """The cascade's pairs of sections run in place over run [n] (a view, either
    direction) from the steady state for its first sample: chunk by chunk
    (``_stretch_lengths``) in lanes, each chunk through every pair while there, then the
    tail sample by sample."""
    n_pairs = (sos.shape[0] + 1) // 2
    states = [_pair_steady_state(zi, 2 * p, run[0]) for p in range(n_pairs)]
    lengths = _stretch_lengths(run.shape[0])
    longest = lengths.max() if lengths.shape[0] else 0
    a, b = np.empty((longest, _LANES)), np.empty((longest, _LANES))
    done = 0
    for m in lengths:
        chunk, x, y = run[done:done + _LANES * m], a[:m], b[:m]
        _move_lanes(chunk, x, True)
        for p in range(n_pairs):
            states[p] = _lane_pass(x, y, _pair_coefficients(sos, 2 * p), states[p], powers[p])
            x, y = y, x
        _move_lanes(chunk, x, False)
        done += _LANES * m
    for p in range(n_pairs):
        coef, state = _pair_coefficients(sos, 2 * p), states[p]
        for i in range(done, run.shape[0]):
            run[i], state = _pair_step(run[i], coef, state)


@njit(cache=True)
def _cascade_four(rows, sos, zi):
    """The cascade's pairs of sections run in place over rows [4, n] (views, either
    direction) as four interleaved lanes, each row from the steady state for its first sample."""
    x0 = rows[:, 0].copy()
    for s in range(0, sos.shape[0], 2):
        _four_lanes(rows, _pair_coefficients(sos, s), (_pair_steady_state(zi, s, x0[0]), _pair_steady_state(
            zi, s, x0[1]), _pair_steady_state(zi, s, x0[2]), _pair_steady_state(zi, s, x0[3])))


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
def _filtfilt_padded(bufs, sos, zi, padlen, powers):
    """sosfiltfilt in place of each row of bufs [G, n + 2 padlen] (G = 1 or 4) whose middle n
    samples are a finite run: forward, then backward in time."""
    for g in range(bufs.shape[0]):
        _odd_pad(bufs[g], padlen)
    if bufs.shape[0] == 4:
        _cascade_four(bufs, sos, zi)
        _cascade_four(bufs[:, ::-1], sos, zi)
    else:
        _cascade_one(bufs[0], sos, zi, powers)
        _cascade_one(bufs[0, ::-1], sos, zi, powers)


@njit(cache=True)
def _skip_gap(row, start):
    """First index >= start holding a finite sample (len(row) if none)."""
    i = start
    while i < row.shape[0] and not finite(row[i]):
        i += 1
    return i


@njit(cache=True)
def _filtfilt_row(row, out_row, sos, zi, padlen, powers, ext):
    """out_row [T] (may be row) = row [T] with each finite run longer than padlen filtered,
    the rest NaN; ext: scratch [1, T + 2 padlen]. A run is read whole before its output is
    written."""
    n_samples = row.shape[0]
    start = _skip_gap(row, 0)
    out_row[:start] = np.nan
    while start < n_samples:
        stop = _copy_finite_run(row, start, ext[0, padlen:])
        n = stop - start
        if n > padlen:
            _filtfilt_padded(ext[:, :n + 2 * padlen], sos, zi, padlen, powers)
            out_row[start:stop] = ext[0, padlen:padlen + n]
        else:
            out_row[start:stop] = np.nan
        start = _skip_gap(row, stop)
        out_row[stop:start] = np.nan


@serial_or_parallel()
def _filtfilt_runs(x, rows, sos, zi, padlen, powers, out):
    """out [C, T] (may be x) = x [C, T] with each finite run of the channels ``rows`` longer
    than padlen filtered, the rest NaN; one ``filtfilt_group`` per parallel task."""
    for group in prange(filter_groups(rows.shape[0])):
        filtfilt_group(x, rows, group, sos, zi, padlen, powers, out)


@njit(cache=True)
def filter_groups(n_rows):
    """Groups of four channels (the last may be smaller) that n_rows channels form."""
    return (n_rows + 3) // 4


@njit(cache=True)
def filtfilt_group(x, rows, group, sos, zi, padlen, powers, out):
    """Filters channels rows[4 group:4 group + 4] of x [C, T] into out [C, T] (may be x):
    each finite run longer than padlen as ``sosfiltfilt`` with the sections of
    ``butter_sections``, the rest NaN. Four channels finite throughout run as four
    interleaved lanes, any other channel on its own (its runs in _LANES stretches)."""
    n_samples = x.shape[1]
    chosen = rows[4 * group:4 * group + 4]
    ext = np.empty((chosen.shape[0], n_samples + 2 * padlen))
    whole = chosen.shape[0] == 4 and n_samples > padlen
    for i in range(chosen.shape[0]):
        whole = whole and _copy_finite_run(x[chosen[i]], 0, ext[i, padlen:]) == n_samples
    if whole:
        _filtfilt_padded(ext, sos, zi, padlen, powers)
        for i in range(4):
            out[chosen[i]] = ext[i, padlen:padlen + n_samples]
    else:
        for i in range(chosen.shape[0]):
            _filtfilt_row(x[chosen[i]], out[chosen[i]], sos, zi, padlen, powers, ext[i:i + 1])
