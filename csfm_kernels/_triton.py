"""Triton, where it exists: compiled on a CUDA device, or interpreted on CPU tensors.

Also the launch helpers every op's Triton section shares. Triton stays optional: without
it ``triton`` and ``tl`` are None and the ops' Triton sections define nothing.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: reference and C++ paths still work
    triton = tl = None

triton_installed = triton is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (tests only: ~1.5 ms a program)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """True where a Triton kernel can launch on tensors of ``device``."""
    if not triton_installed:
        return False
    if device.type == "cuda":
        return not interpreter_enabled()
    return device.type == "cpu" and interpreter_enabled()


def device_arch(device: torch.device) -> int | None:
    """Compute capability of a CUDA ``device`` as one number (major * 10 + minor: 80, 90, 100),
    the key of the ops' per-architecture launch configurations; None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def column_block(n: int, largest: int, smallest: int = 16) -> int:
    """Power-of-two block width for ``n`` columns with the fewest padded (dead) columns, the widest
    among equals; tried: the next power of two >= n (capped at ``largest``) and its two halvings,
    none under ``smallest``. E.g. n = 768, largest 512 -> 256 (3 full blocks, not 1024 columns)."""
    top = min(largest, max(smallest, next_pow2(n)))
    widths = [w for w in (top, top // 2, top // 4) if w >= smallest]
    return min(widths, key=lambda w: (-(-n // w) * w, -w))


def default_max_programs(device: torch.device, per_sm: int) -> int | None:
    """Cap on the number of reduction programs: a few per SM on CUDA, none elsewhere."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return None


def split_grid(n_blocks: int, max_programs: int | None) -> tuple[int, int]:
    """(n_programs, blocks_per_program) covering ``n_blocks`` with no empty program."""
    if max_programs is None or max_programs >= n_blocks:
        return n_blocks, 1
    per = -(-n_blocks // max(1, int(max_programs)))
    return -(-n_blocks // per), per


def dummy_if_empty(t: torch.Tensor) -> torch.Tensor:
    """A 1-element stand-in for an empty tensor: kernels mask every load, but some launchers
    reject a null data pointer."""
    return torch.zeros(1, dtype=t.dtype, device=t.device) if t.numel() == 0 else t
