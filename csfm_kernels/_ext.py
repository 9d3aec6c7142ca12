"""Loads the C++ CPU kernels (``csfm_kernels._C``) once, with one warning when they are absent."""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import numpy as np
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


class _ArrayInterface:
    """numpy's array interface over a tensor's memory; holds the tensor, so it outlives the array."""

    __slots__ = ("tensor", "__array_interface__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.__array_interface__ = {"shape": tuple(tensor.shape), "data": (tensor.data_ptr(), False), "version": 3,
                                    "typestr": np.dtype(str(tensor.dtype).removeprefix("torch.")).str}


def as_float32_array(t: torch.Tensor) -> np.ndarray:
    """A kernel input as a C-contiguous float32 numpy array over ``t``'s memory where ``t``
    already is one (else over a converted copy). Unlike ``Tensor.numpy()``, this leaves
    ``t``'s storage resizable, which FSDP needs of the parameters it reshards."""
    t = t.detach().to(torch.float32).contiguous()
    if t.numel() == 0:
        return np.zeros(tuple(t.shape), np.float32)
    return np.asarray(_ArrayInterface(t))
