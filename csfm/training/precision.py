"""Mixed precision chosen at run time: bf16 only where this machine runs it fast.

On CPUs bf16 is ~3x fp32 with AVX512-BF16 and ~150x slower without it (docs/design.md, "CPU bf16"), so
"auto" measures a matmul in both dtypes instead of assuming. On CUDA, bf16 where supported,
else fp16 with a gradient scaler.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """dtype: the autocast dtype (None = plain fp32); use_scaler: fp16 on CUDA needs a GradScaler."""

    name: str
    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool = False

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _block_seconds(dtype: torch.dtype | None, tokens: int = 2048, width: int = 256, repeats: int = 3) -> float:
    """Seconds of a transformer-like block (Linear, GELU, LayerNorm, backward) under autocast
    to ``dtype`` (None = fp32): matmuls alone flatter bf16 on CPUs whose elementwise bf16 is slow."""
    layer = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width), torch.nn.LayerNorm(width))
    x = torch.randn(tokens, width)
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def run() -> None:
        with context:
            layer(x).float().square().mean().backward()

    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def cpu_bf16_is_fast(min_speedup: float = 1.3) -> bool:
    """True where a bf16-autocast block runs at least ``min_speedup`` x the fp32 one on this CPU."""
    return _block_seconds(None) / _block_seconds(torch.bfloat16) >= min_speedup


def choose_precision(name: str, device: torch.device) -> Precision:
    """Resolves "auto" / "fp32" / "bf16" / "fp16" for ``device``; explains impossible choices."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    kind = device.type
    if name == "fp32":
        return Precision("fp32", kind, None)
    if kind == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if name == "fp16" or (name == "auto" and not bf16_ok):
            return Precision("fp16", kind, torch.float16, use_scaler=True)
        if not bf16_ok:
            raise ValueError("precision='bf16' but this GPU has no bf16 support; use fp16 or auto")
        return Precision("bf16", kind, torch.bfloat16)
    if name == "fp16":
        raise ValueError("precision='fp16' needs a CUDA device; on CPU use bf16, fp32 or auto")
    if name == "bf16" or cpu_bf16_is_fast():
        return Precision("bf16", kind, torch.bfloat16)
    return Precision("fp32", kind, None)
