"""Numba signal kernels of the preprocessing: resampling, zero-phase band-pass, z-score.

All take [C, T] arrays (float32 or float64, NaN where samples are missing), work in
float64 (resampling at a rational ratio: float32 relative to a per-block reference
sample), return float32, run channels (or chunks of samples) in parallel and compile once
per input dtype (cached on disk). NaN gaps stay local: no kernel spreads a NaN over a
whole channel.

Numba's default OpenMP threading layer kills a forked child (a DataLoader worker) that
calls a kernel after its parent did; unless the user chose a layer, the fork-safe
``workqueue`` layer is used.
"""
import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import numba  # noqa: E402

if numba.config.THREADING_LAYER == "default":  # numba was imported before this module
    numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]

from csfm_kernels.signal.filters import bandpass
from csfm_kernels.signal.normalize import zscore
from csfm_kernels.signal.resample import check_signal, resample

__all__ = ["bandpass", "check_signal", "resample", "zscore"]
