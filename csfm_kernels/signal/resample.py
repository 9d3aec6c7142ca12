"""Band-limited resampling of multichannel signals by Kaiser-windowed sinc interpolation.

Output sample n sits at time n / fs_out, i.e. at input position u = n * fs_in / fs_out
(in input samples), and is the dot product of the 2 * half input samples nearest to u
(its *support*) with the interpolation kernel centred on u. The kernel is a sinc cut off
at the lower of the two Nyquist frequencies (so it also anti-aliases when downsampling)
under a Kaiser window. The window is designed (Kaiser's formulas, ``_ATTENUATION_DB`` of
ripple and stop-band attenuation) for a pass band up to ``band`` and a stop band from
``1 - band`` (units of the lower rate): aliases and images of frequencies up to band then
land above band. By default band = 0.4 (0.8 x the lower Nyquist), a kernel half-width of
12.5 samples of the lower rate; a caller that low-passes afterwards may ask for a
narrower band (``band_hz``, clipped to >= 0.2), hence a wider transition band and a
shorter kernel (e.g. band 0.24: half-width 4.8). Each output's taps are normalised to sum
to one, so DC passes exactly.

Two paths share one kernel function. When fs_out / fs_in = up / down with up <=
``_MAX_PHASES``, the taps of the ``up`` possible phases are precomputed once (polyphase
bank) and outputs of one phase are computed together: their supports lie ``down`` input
samples apart, so the input is deinterleaved into ``down`` streams in which each tap
meets contiguous samples (one vectorised multiply-add per tap and 16 outputs). This path
works in float32 relative to a reference sample (the first finite input of each block of
outputs, added back in float64), so large offsets lose no precision. Otherwise (e.g.
62.4725 Hz -> 250 Hz) each output's taps are interpolated from a finely sampled table of
the kernel and applied in float64.

Samples past either end are mirrored (even reflection about the end sample). An output
whose support holds a NaN is NaN (NaN propagates through the dot product), so gaps stay
gaps, widened by at most ``half`` input samples on each side; all other outputs are
computed normally.

Accuracy (frequencies in units of the lower Nyquist frequency), default band: the
kernel's response ripples by <= 1.2e-4 up to 0.8, is -6 dB at 1.0 and attenuates >= 79 dB
from 1.2 on. A sinusoid below 0.8 comes back at its frequency and phase with its
amplitude to within 2.5e-4 relative (worst of 750 random cases, rates 40-1200 Hz, both
paths); with a narrower band_hz, sinusoids below it to within 5.1e-4 (750 cases). Real
ECG records (PTB 1000 Hz, MIT-BIH 360 Hz, MIMIC II 125 Hz) match scipy's FFT resampling to
within 3.1e-4 of the signal's range below 0.8, away from the record's ends (resample_poly:
5.1e-4, its own filter ripples).

Also what the signal kernels share: argument checks (``check_signal``, ``check_rate``,
``output_array``), the numba scalar test ``finite`` and the ``FASTMATH`` flags.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from csfm_kernels.signal._parallel import serial_or_parallel

_MAX_BAND = 0.4  # default and widest pass band, in units of the lower rate (0.8 x its Nyquist)
_MIN_BAND = 0.2  # narrowest pass band designed for (a narrower band_hz gets this kernel)
_ATTENUATION_DB = 80.0  # kernel design: pass-band ripple and stop-band attenuation
_MAX_PHASES = 512  # largest `up` given a precomputed polyphase bank
_TABLE_STEPS = 2048  # kernel table entries per sample of the lower rate
_PHASE_BLOCK = 1024  # outputs of one phase computed together (one parallel task: up x that)
_CHUNK = 4096  # output samples per parallel task of the interpolated path
FASTMATH = {"reassoc", "contract", "nsz"}  # vectorised sums; NaN and inf still propagate


def check_signal(x: object, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous float32/float64 array [C, T]; ValueError naming ``name``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [channels, samples] array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return np.ascontiguousarray(arr)


def output_array(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """``out`` checked to be a C-contiguous float32 array of ``shape``, or a new one if None."""
    if out is None:
        return np.empty(shape, np.float32)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
            and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def check_rate(value: object, name: str) -> float:
    """``value`` as a finite positive float (a rate or frequency in Hz); ValueError naming ``name``."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number of Hz, got {value!r}") from None
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"{name} must be a positive finite number of Hz, got {value!r}")
    return rate


@njit(cache=True, inline="always")
def finite(v):
    """np.isfinite(v) for a scalar, in a form the compiler can vectorise."""
    return abs(v) < np.inf


def resample(x: np.ndarray, fs_in: float, fs_out: float = 250.0, band_hz: float | None = None) -> np.ndarray:
    """Resamples every channel of x from fs_in to fs_out (Hz), any ratio.

    x: [C, T] real array, samples at fs_in Hz, NaN where missing. band_hz: the highest
    frequency (Hz) that must come back accurately; default and upper limit 0.8 x the lower
    Nyquist frequency (below 0.4 x the lower Nyquist it is taken as that). A lower band_hz
    (e.g. when a low-pass follows) widens the kernel's transition band and so shortens it:
    frequencies up to band_hz keep the accuracy below and aliases and images still land
    above band_hz, but frequencies between band_hz and the lower Nyquist are attenuated
    and aliased partly into the band between band_hz and the lower Nyquist.
    Returns [C, T_out] float32 at fs_out Hz with T_out = round(T * fs_out / fs_in); T = 0 gives
    [C, 0]; fs_out == fs_in returns a float32 copy. An output is NaN exactly where its
    support (the 2 * half input samples nearest its time, see ``support_half``) holds a NaN.
    Accuracy: see the module docstring.
    """
    x = check_signal(x)
    fs_in, fs_out = check_rate(fs_in, "fs_in"), check_rate(fs_out, "fs_out")
    band_hz = None if band_hz is None else check_rate(band_hz, "band_hz")
    n_out = round(x.shape[1] * fs_out / fs_in)
    if x.shape[1] == 0 or n_out == 0:
        return np.zeros((x.shape[0], n_out), np.float32)
    plan = resample_plan(fs_in, fs_out, band_hz)
    if plan.mode == COPY:
        return x.astype(np.float32)
    if plan.mode == POLYPHASE:
        return _resample_polyphase(x.size, x, plan.bank, plan.up, plan.down, plan.half, n_out)
    return _resample_interpolated(x.size, x, plan.table, plan.scale, plan.step, plan.half, n_out)


COPY, POLYPHASE, INTERPOLATED = 0, 1, 2
"""``ResamplePlan.mode``: equal rates, a rational ratio with up <= _MAX_PHASES, any other ratio."""


class ResamplePlan(NamedTuple):
    """How ``resample`` goes from one rate to another: ``mode`` (COPY, POLYPHASE or
    INTERPOLATED), the support half (input samples), the polyphase bank [up, 2 half] float32
    with up and down, the kernel table with scale (input samples -> samples of the lower
    rate) and step (input samples per output). Fields a mode does not use hold placeholders."""

    mode: int
    half: int
    bank: np.ndarray
    up: int
    down: int
    table: np.ndarray
    scale: float
    step: float


@lru_cache(maxsize=256)
def resample_plan(fs_in: float, fs_out: float, band_hz: float | None) -> ResamplePlan:
    """The ``ResamplePlan`` of resampling fs_in -> fs_out Hz keeping band_hz (Hz or None),
    rates already checked."""
    ratio, width, beta, half = _plan(fs_in, fs_out, band_hz)
    no_bank, no_table = np.zeros((1, 1), np.float32), np.zeros(1)
    for placeholder in (no_bank, no_table):  # read-only like the real ones: one compiled signature for every mode
        placeholder.setflags(write=False)
    if ratio == (1, 1):
        return ResamplePlan(COPY, 0, no_bank, 1, 1, no_table, 1.0, 1.0)
    if ratio is not None:
        up, down = ratio
        return ResamplePlan(POLYPHASE, half, _polyphase_bank(up, down, half, width, beta), up, down, no_table, 1.0,
                            down / up)
    return ResamplePlan(INTERPOLATED, half, no_bank, 1, 1, _kernel_table(width, beta), min(1.0, fs_out / fs_in),
                        fs_in / fs_out)


def support_half(fs_in: float, fs_out: float, band_hz: float | None = None) -> int:
    """Half the support of ``resample(x, fs_in, fs_out, band_hz)``, in input samples:
    ceil(kernel half-width x max(1, fs_in / fs_out)); 0 when fs_in == fs_out."""
    return _plan(float(fs_in), float(fs_out), None if band_hz is None else float(band_hz))[3]


@lru_cache(maxsize=256)
def _plan(fs_in: float, fs_out: float, band_hz: float | None) -> tuple[tuple[int, int] | None, float, float, int]:
    """(rational ratio or None, kernel half-width in samples of the lower rate, Kaiser beta,
    support half in input samples) of resampling fs_in -> fs_out keeping band_hz."""
    ratio = _rational_ratio(fs_in, fs_out)
    width, beta = _kaiser_design(_design_band(fs_in, fs_out, band_hz))
    half = 0 if ratio == (1, 1) else int(np.ceil(width * max(1.0, fs_in / fs_out)))
    return ratio, width, beta, half


def _design_band(fs_in: float, fs_out: float, band_hz: float | None) -> float:
    """The kernel's pass band, in units of the lower rate: band_hz clipped to [_MIN_BAND,
    _MAX_BAND] (_MAX_BAND when None)."""
    if band_hz is None:
        return _MAX_BAND
    return min(_MAX_BAND, max(_MIN_BAND, band_hz / min(fs_in, fs_out)))


def _rational_ratio(fs_in: float, fs_out: float) -> tuple[int, int] | None:
    """(up, down) with fs_out / fs_in = up / down exactly and up <= _MAX_PHASES, else None."""
    ratio = Fraction(fs_out).limit_denominator(10**6) / Fraction(fs_in).limit_denominator(10**6)
    if ratio.numerator > _MAX_PHASES or abs(float(ratio) * fs_in - fs_out) > 1e-9 * fs_out:
        return None
    return ratio.numerator, ratio.denominator


def _kaiser_design(band: float) -> tuple[float, float]:
    """(half-width in samples of the lower rate, Kaiser beta) of the kernel whose pass band
    ends at ``band`` and stop band starts at 1 - band (units of the lower rate), with
    _ATTENUATION_DB of ripple and stop-band attenuation (Kaiser's formulas)."""
    transition = 2 * np.pi * (1.0 - 2.0 * band)  # rad per sample of the lower rate
    length = (_ATTENUATION_DB - 7.95) / (2.285 * transition)
    return length / 2, 0.1102 * (_ATTENUATION_DB - 8.7)


def _kernel(tau: np.ndarray, width: float, beta: float) -> np.ndarray:
    """Kaiser-windowed sinc cut off at the lower Nyquist, at tau (samples of the lower rate),
    zero for |tau| >= width."""
    inside = np.clip(1.0 - (tau / width) ** 2, 0.0, None)
    window = np.i0(beta * np.sqrt(inside)) / np.i0(beta)
    return np.where(inside > 0, np.sinc(tau) * window, 0.0)


@lru_cache(maxsize=32)
def _polyphase_bank(up: int, down: int, half: int, width: float, beta: float) -> np.ndarray:
    """[up, 2 * half] float32 taps: row p serves outputs at fractional input offset p / up.

    Tap j multiplies input sample floor(u) - half + 1 + j, at distance p / up + half - 1 - j.
    """
    offsets = np.arange(up)[:, None] / up + (half - 1 - np.arange(2 * half))[None, :]
    taps = _kernel(offsets * min(1.0, up / down), width, beta)
    taps = (taps / taps.sum(axis=1, keepdims=True)).astype(np.float32)
    taps.setflags(write=False)
    return taps


@lru_cache(maxsize=8)
def _kernel_table(width: float, beta: float) -> np.ndarray:
    """_kernel sampled every 1 / _TABLE_STEPS samples of the lower rate on [0, width + 1]."""
    table = _kernel(np.arange(int((width + 1) * _TABLE_STEPS) + 1) / _TABLE_STEPS, width, beta)
    table.setflags(write=False)
    return table


@njit(cache=True, fastmath=FASTMATH)
def _dot(taps, window):
    """sum_j taps[j] * window[j]; taps, window: [n] float64."""
    acc = 0.0
    for j in range(taps.shape[0]):
        acc += taps[j] * window[j]
    return acc


@njit(cache=True)
def _reflect(i, n):
    """Index i folded into [0, n) by even reflection about the end samples (n >= 1)."""
    if 0 <= i < n:
        return i
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return i if i < n else period - i


@njit(cache=True)
def _copy_span(row, start, span):
    """span[j] = row[start + j] as float64, indices outside row mirrored. span: [n]."""
    n = span.shape[0]
    inside_from = min(n, max(0, -start))
    inside_to = max(inside_from, min(n, row.shape[0] - start))
    span[inside_from:inside_to] = row[start + inside_from:start + inside_to]
    for j in range(inside_from):
        span[j] = row[_reflect(start + j, row.shape[0])]
    for j in range(inside_to, n):
        span[j] = row[_reflect(start + j, row.shape[0])]


@njit(cache=True)
def _first_finite(row, start, stop):
    """First finite value of row[max(start, 0):stop] as float64; 0 if there is none."""
    for i in range(max(start, 0), min(stop, row.shape[0])):
        v = np.float64(row[i])
        if finite(v):
            return v
    return 0.0


@njit(cache=True)
def _copy_streams(row, start, length, down, reference, streams):
    """Deinterleaves span = row[start:start + length] (indices outside row mirrored), minus
    reference, into float32 streams [down, ceil(length / down)]: streams[r, m] = span[r + m
    * down] - reference."""
    n = row.shape[0]
    for r in range(down):
        dest, first = streams[r], start + r  # dest[m] = row[first + m * down]
        count = (length - r + down - 1) // down
        inside_from = min(count, max(0, (down - 1 - first) // down))  # first m with first + m * down >= 0
        inside_to = max(inside_from, min(count, (n - first + down - 1) // down))  # first m past row's end
        for m in range(inside_from, inside_to):
            dest[m] = np.float64(row[first + m * down]) - reference
        for m in range(inside_from):
            dest[m] = np.float64(row[_reflect(first + m * down, n)]) - reference
        for m in range(inside_to, count):
            dest[m] = np.float64(row[_reflect(first + m * down, n)]) - reference


@njit(cache=True, inline="always")
def _stream_window(streams, i, down, n):
    """span[i + k * down] for k < n, as a contiguous view of span's deinterleaved streams."""
    return streams[i % down, i // down:i // down + n]


@njit(cache=True, fastmath=FASTMATH)
def _phase_outputs(taps, streams, first_input, down, acc):
    """acc[k] = sum_j taps[j] * span[first_input + k * down + j] for k < len(acc), with span
    deinterleaved into streams [down, M]: each pass over acc (vectorised) adds 4 taps."""
    n, n_taps = acc.shape[0], taps.shape[0]
    acc[:] = 0.0
    for j in range(0, n_taps - 3, 4):
        t0, t1, t2, t3 = taps[j], taps[j + 1], taps[j + 2], taps[j + 3]
        w0 = _stream_window(streams, first_input + j, down, n)
        w1 = _stream_window(streams, first_input + j + 1, down, n)
        w2 = _stream_window(streams, first_input + j + 2, down, n)
        w3 = _stream_window(streams, first_input + j + 3, down, n)
        for k in range(n):
            acc[k] += (t0 * w0[k] + t1 * w1[k]) + (t2 * w2[k] + t3 * w3[k])
    for j in range(n_taps - n_taps % 4, n_taps):
        tap, w = taps[j], _stream_window(streams, first_input + j, down, n)
        for k in range(n):
            acc[k] += tap * w[k]


@serial_or_parallel()
def _resample_polyphase(x, bank, up, down, half, n_out):
    """x [C, T] -> [C, n_out] float32 with output n at input position n * down / up, one
    ``polyphase_task`` per parallel task."""
    out = np.empty((x.shape[0], n_out), np.float32)
    n_blocks = polyphase_blocks(up, n_out)
    for task in prange(x.shape[0] * n_blocks):
        polyphase_task(x, bank, up, down, half, out, task, n_blocks)
    return out


@njit(cache=True)
def polyphase_blocks(up, n_out):
    """Tasks per channel of the polyphase path: blocks of up x _PHASE_BLOCK outputs."""
    block = up * _PHASE_BLOCK
    return (n_out + block - 1) // block


@njit(cache=True)
def polyphase_task(x, bank, up, down, half, out, task, n_blocks):
    """Writes one block of up x _PHASE_BLOCK consecutive outputs of one channel (task =
    channel x n_blocks + block) of x [C, T] resampled into out [C, n_out], output n at input
    position n * down / up.

    Outputs p, p + up, p + 2 up, ... of the block share phase p (hence taps) and read
    supports down input samples apart, so the block's input span is deinterleaved into down
    streams in which those supports are contiguous.
    """
    n_out = out.shape[1]
    c = task // n_blocks
    block = up * _PHASE_BLOCK
    first = (task % n_blocks) * block
    last = min(n_out, first + block)
    span_start = first // up * down - half + 1  # support start of the block's first output
    length = (last - 1) * down // up + half + 1 - span_start
    reference = _first_finite(x[c], span_start, span_start + length)
    streams = np.empty((down, (length + down - 1) // down), np.float32)
    _copy_streams(x[c], span_start, length, down, reference, streams)
    acc = np.empty(_PHASE_BLOCK, np.float32)
    for p in range(min(up, last - first)):
        base, phase = divmod(p * down, up)  # floor(u) - floor(u of first) and up * frac(u)
        n_phase = (last - first - p + up - 1) // up
        _phase_outputs(bank[phase], streams, base, down, acc[:n_phase])
        for k in range(n_phase):
            out[c, first + p + k * up] = acc[k] + reference


@njit(cache=True)
def _interpolated_taps(table, scale, frac, taps):
    """Fills taps [2 * half] for fractional offset frac by linear interpolation of table
    (zero past its end), normalised to sum to one. scale: input samples -> samples of the
    lower rate."""
    half = taps.shape[0] // 2
    total = 0.0
    for j in range(taps.shape[0]):
        pos = abs(frac + half - 1 - j) * scale * _TABLE_STEPS
        i = int(pos)
        tap = 0.0
        if i + 1 < table.shape[0]:
            tap = table[i] + (pos - i) * (table[i + 1] - table[i])
        taps[j] = tap
        total += tap
    for j in range(taps.shape[0]):
        taps[j] /= total


@serial_or_parallel()
def _resample_interpolated(x, table, scale, step, half, n_out):
    """x [C, T] -> [C, n_out] float32 with output n at input position n * step, one
    ``interpolated_chunk`` per parallel task."""
    out = np.empty((x.shape[0], n_out), np.float32)
    for chunk in prange(interpolated_chunks(n_out)):
        interpolated_chunk(x, table, scale, step, half, out, chunk)
    return out


@njit(cache=True)
def interpolated_chunks(n_out):
    """Tasks of the interpolated path: chunks of _CHUNK outputs (all channels)."""
    return (n_out + _CHUNK - 1) // _CHUNK


@njit(cache=True)
def interpolated_chunk(x, table, scale, step, half, out, chunk):
    """Writes outputs chunk x _CHUNK .. of every channel of x [C, T] resampled into out [C,
    n_out], output n at input position n * step; each output's taps are computed once and
    applied to every channel."""
    n_channels, n_out = x.shape[0], out.shape[1]
    first = chunk * _CHUNK
    last = min(n_out, first + _CHUNK)
    span_start = int(np.floor(first * step)) - half + 1
    spans = np.empty((n_channels, int(np.floor((last - 1) * step)) + half + 1 - span_start))
    for c in range(n_channels):
        _copy_span(x[c], span_start, spans[c])
    taps = np.empty(2 * half)
    for n in range(first, last):
        position = n * step
        base = int(np.floor(position))
        _interpolated_taps(table, scale, position - base, taps)
        offset = base - half + 1 - span_start
        for c in range(n_channels):
            out[c, n] = _dot(taps, spans[c, offset:offset + 2 * half])
