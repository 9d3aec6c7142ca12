"""A numba kernel written with ``prange``, compiled twice: parallel for large inputs, serial for
small ones. A parallel call wakes numba's worker threads, and with the fork-safe
``workqueue`` threading layer this package selects that costs about 60 us even for an empty
loop (OpenMP: 2 us, but it kills forked DataLoader workers). Measured on a 2-core VM, parallel
builds of these kernels were no faster than serial ones up to 2.5 M samples when the process
did other work between calls (the median of 15 calls after 10 ms of other work each; 16
stacked 12-lead PTB windows, 1.92 M samples: serial 5.5 ms, parallel 5.9-8.1 ms), so calls
below PARALLEL_MIN_SAMPLES run in the calling thread. Where the machine has cores to spare
(several processes already share them when csfm.prepare or a DataLoader runs workers), the
parallel build serves long records.
"""
from __future__ import annotations

import types
from typing import Callable

from numba import njit

PARALLEL_MIN_SAMPLES = 1 << 22
"""Input samples (all channels) from which a call runs on numba's threads."""


class SerialOrParallel:
    """``kernel(work, *args)``: the parallel build where ``work`` (samples) reaches
    PARALLEL_MIN_SAMPLES, else the serial one (prange runs as range there)."""

    def __init__(self, fn: Callable, **options) -> None:
        self.parallel = njit(cache=True, parallel=True, **options)(fn)
        # a copy under another name: numba's on-disk cache is keyed by the function's name
        name = f"{fn.__name__}_serial"
        code = fn.__code__.replace(co_name=name, co_qualname=name)
        serial = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        serial.__module__, serial.__doc__ = fn.__module__, fn.__doc__
        self.serial = njit(cache=True, **options)(serial)

    def __call__(self, work: int, *args):
        return (self.parallel if work >= PARALLEL_MIN_SAMPLES else self.serial)(*args)


def serial_or_parallel(**options) -> Callable[[Callable], SerialOrParallel]:
    """Decorator form: ``@serial_or_parallel(fastmath=...)`` over a prange kernel."""
    return lambda fn: SerialOrParallel(fn, **options)
