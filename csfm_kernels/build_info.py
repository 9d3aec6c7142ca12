"""Which backends this installation can run, and why one cannot."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from csfm_kernels import _ext
from csfm_kernels._triton import interpreter_enabled, triton_installed


@dataclass(frozen=True)
class Backend:
    name: str
    available: bool
    detail: str  # where it comes from, or why it is missing


@dataclass(frozen=True)
class BuildInfo:
    backends: tuple[Backend, ...]

    def __getitem__(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)

    def __str__(self) -> str:
        lines = [f"csfm_kernels on torch {torch.__version__}"]
        for b in self.backends:
            lines.append(f"  {b.name:<20} {'yes' if b.available else 'no ':<4} {b.detail}")
        return "\n".join(lines)


def _cpp_backend() -> Backend:
    if _ext.cpp is None:
        return Backend("cpp_cpu", False, f"extension not built: {_ext.cpp_error}")
    return Backend("cpp_cpu", True, f"{_ext.cpp.__file__} (sources {_ext.cpp.source_hash()}, "
                                    f"{_ext.cpu_threads()} threads)")


def _triton_gpu_backend() -> Backend:
    if not triton_installed:
        return Backend("triton_gpu", False, "triton is not installed (pip install -e '.[gpu]')")
    if not torch.cuda.is_available():
        return Backend("triton_gpu", False, "no CUDA device visible to torch")
    if interpreter_enabled():
        return Backend("triton_gpu", False, "TRITON_INTERPRET=1 forces the interpreter")
    return Backend("triton_gpu", True, f"{torch.cuda.get_device_name()}")


def _triton_interpreter_backend() -> Backend:
    if not triton_installed:
        return Backend("triton_interpreter", False, "triton is not installed (pip install -e '.[dev]')")
    if not interpreter_enabled():
        return Backend("triton_interpreter", False, "set TRITON_INTERPRET=1 before importing triton (tests only)")
    return Backend("triton_interpreter", True, "Triton kernels run on CPU tensors, slowly")


def _flash_attn_backend() -> Backend:
    if importlib.util.find_spec("flash_attn") is None:
        return Backend("flash_attn", False, "flash-attn is not installed (optional, CUDA only)")
    if not torch.cuda.is_available():
        return Backend("flash_attn", False, "installed, but no CUDA device")
    return Backend("flash_attn", True, "flash_attn_varlen_func")


def build_info() -> BuildInfo:
    """Backends: C++ CPU kernels, compiled Triton, the Triton interpreter, flash-attn."""
    return BuildInfo((_cpp_backend(), _triton_gpu_backend(), _triton_interpreter_backend(),
                      _flash_attn_backend()))
