"""Resample -> band-pass -> z-score of a multichannel signal in one compiled call.

Calling ``resample``, ``bandpass`` and ``zscore`` in turn costs each call its argument
checks, plan lookups and numba dispatch: about 25 us of a 10 s one-lead window's ~50 us,
more when the caches are cold. The chain runs the same per-task functions of the three
kernels (``polyphase_task`` or ``interpolated_chunk``, ``filtfilt_group``, ``zscore_row``)
from one compiled function, with everything that depends only on the rates, bands and
filter order planned once (``chain_plan``): its outputs are those of the three kernels
called in turn, bit for bit.

Numba's on-disk cache keys a compiled function by its own file: after editing
``resample.py``, ``filters.py`` or ``normalize.py`` in a checkout, ``_chain`` would still run
the cached code of the old ones until ``csfm_kernels/signal/__pycache__`` is cleared (the
test of the chain against the kernels in turn fails until then). A fresh install compiles
everything anew.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numba import prange

from csfm_kernels.signal._parallel import serial_or_parallel
from csfm_kernels.signal.filters import butter_sections, check_band, check_order, filter_groups, filtfilt_group
from csfm_kernels.signal.normalize import check_std_floor, zscore_row
from csfm_kernels.signal.resample import (COPY, POLYPHASE, ResamplePlan, check_rate, check_signal, interpolated_chunk,
                                          interpolated_chunks, polyphase_blocks, polyphase_task, resample_plan)


class ChainPlan(NamedTuple):
    """What ``resample_bandpass_zscore`` needs besides the signal: the rates (Hz), the
    ``ResamplePlan`` and, per band b of B (all of one order: S sections, P = ceil(S / 2)
    pairs), the band-pass of ``butter_sections`` stacked: sos [B, S, 6], zi [B, S, 2],
    padlen [B] (samples), powers [B, P, K, 4, 4]."""

    fs_in: float
    fs_out: float
    resample: ResamplePlan
    sos: np.ndarray
    zi: np.ndarray
    padlen: np.ndarray
    powers: np.ndarray


@lru_cache(maxsize=64)
def chain_plan(fs_in: float, fs_out: float, bands: tuple[tuple[float, float], ...], order: int,
               band_hz: float | None = None) -> ChainPlan:
    """The ``ChainPlan`` of resampling fs_in -> fs_out Hz (keeping band_hz Hz, as
    ``resample``), then band-passing in each of ``bands`` ((low_hz, high_hz) -3 dB edges at
    fs_out, Butterworth ``order`` per edge, as ``bandpass``). ValueError naming a bad argument."""
    fs_in, fs_out = check_rate(fs_in, "fs_in"), check_rate(fs_out, "fs_out")
    band_hz, order = None if band_hz is None else check_rate(band_hz, "band_hz"), check_order(order)
    if not bands:
        raise ValueError("bands must hold at least one (low_hz, high_hz) pair")
    filters = [butter_sections(fs_out, *check_band(*band, fs_out), order) for band in bands]
    sos, zi, padlen, powers = (np.stack([np.asarray(f[i]) for f in filters]) for i in range(4))
    return ChainPlan(fs_in, fs_out, resample_plan(fs_in, fs_out, band_hz), sos, zi, padlen.astype(np.int64), powers)


def resample_bandpass_zscore(x: np.ndarray, plan: ChainPlan, band_of_row: np.ndarray,
                             std_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """``resample`` -> ``bandpass`` -> ``zscore`` (with valid) of every channel of x in one call.

    x: [C, T] real array at plan.fs_in Hz, NaN where missing. band_of_row: [C] int64, the
    index into the plan's bands of each channel's band-pass. std_floor > 0: as ``zscore``.
    Returns (z [C, T'] float32, valid [C, T'] bool) at plan.fs_out, T' = round(T fs_out /
    fs_in): z is 0 wherever valid is False (gaps, widened by the resampling support, and
    finite runs too short to band-pass).
    """
    x, std_floor = check_signal(x), check_std_floor(std_floor)
    if not (isinstance(band_of_row, np.ndarray) and band_of_row.shape == (x.shape[0],)
            and band_of_row.dtype == np.int64):
        raise ValueError(f"band_of_row must be a [{x.shape[0]}] int64 array (one band per channel), got "
                         f"{getattr(band_of_row, 'dtype', type(band_of_row).__name__)} {np.shape(band_of_row)}")
    return run_chain(x, plan, band_of_row, std_floor)


def run_chain(x: np.ndarray, plan: ChainPlan, band_of_row: np.ndarray,
              std_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """``resample_bandpass_zscore`` without its argument checks, for callers that made them
    (each Python check costs microseconds when the caches are cold): x a [C, T] array as
    ``check_signal`` returns it, band_of_row [C] int64, std_floor a positive float. A
    band_of_row entry outside the plan's bands still raises ValueError."""
    n_out = round(x.shape[1] * plan.fs_out / plan.fs_in)
    if x.shape[1] == 0 or n_out == 0:
        return np.zeros((x.shape[0], n_out), np.float32), np.zeros((x.shape[0], n_out), np.bool_)
    rs = plan.resample
    known_bands, out, valid = _chain(x.size, x, rs.mode, rs.half, rs.bank, rs.up, rs.down, rs.table, rs.scale, rs.step,
                                     band_of_row, plan.sos, plan.zi, plan.padlen, plan.powers, std_floor, n_out)
    if not known_bands:
        raise ValueError(f"band_of_row must index the plan's {plan.sos.shape[0]} bands, got {band_of_row.tolist()}")
    return out, valid


@serial_or_parallel()
def _chain(x, mode, half, bank, up, down, table, scale, step, band_of_row, sos, zi, padlen, powers, std_floor, n_out):
    """(True, out [C, n_out] float32, valid [C, n_out] bool): the chain of x [C, T], the
    three kernels' parallel tasks one kernel after the other; (False, ...) without doing
    anything when a band_of_row entry is not a band of sos [B, S, 6]."""
    n_channels = x.shape[0]
    out, valid = np.empty((n_channels, n_out), np.float32), np.empty((n_channels, n_out), np.bool_)
    for c in range(n_channels):
        if not 0 <= band_of_row[c] < sos.shape[0]:
            return False, out, valid
    if mode == COPY:
        for c in prange(n_channels):
            for t in range(n_out):
                out[c, t] = x[c, t]
    elif mode == POLYPHASE:
        n_blocks = polyphase_blocks(up, n_out)
        for task in prange(n_channels * n_blocks):
            polyphase_task(x, bank, up, down, half, out, task, n_blocks)
    else:
        for chunk in prange(interpolated_chunks(n_out)):
            interpolated_chunk(x, table, scale, step, half, out, chunk)
    for b in range(sos.shape[0]):
        rows = np.nonzero(band_of_row == b)[0]
        for group in prange(filter_groups(rows.shape[0])):
            filtfilt_group(out, rows, group, sos[b], zi[b], padlen[b], powers[b], out)
    for c in prange(n_channels):
        zscore_row(out, c, std_floor, 0.0, out, valid)
    return True, out, valid
