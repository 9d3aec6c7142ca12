"""Loads the C++ CPU kernels (``csfm_kernels._C``) once, with one warning when they are absent."""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch  # first: its libgomp.so.1 is the one the extension's OpenMP then binds to

cpp: ModuleType | None
cpp_error: str | None

try:
    cpp = importlib.import_module("csfm_kernels._C")

    cpp_error = None
except ImportError as exc:  # not built: the reference / torch paths still work
    cpp = None
    cpp_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "csfm_kernels: the C++ CPU kernels are not built, so CPU ops use the slower reference path "
        f"({cpp_error}). Rebuild with `pip install -e .` (needs a C++17 compiler).",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_threads() -> int:
    """Threads the C++ kernels use: torch's intra-op count, so they share its setting."""
    return max(1, int(os.environ.get("CSFM_CPU_THREADS", torch.get_num_threads())))
