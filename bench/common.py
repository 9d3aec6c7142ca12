"""Helpers the bench suites share: a guarded torch.compile and the matmul roof of the device."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def try_compile(fn: Callable[..., Any], *example: Any) -> tuple[Callable[..., Any] | None, str | None]:
    """``torch.compile(fn)`` checked on ``example``: (compiled, None), or (None, why) where
    torch.compile fails on this machine (the baseline is then skipped with that reason)."""
    try:
        compiled = torch.compile(fn)
        compiled(*example)
        return compiled, None
    except Exception as exc:  # any compiler failure: the baseline is reported as not run
        return None, f"torch.compile failed here: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def matmul_roof_tflops(device: str) -> float:
    """Dense matmul rate of ``device`` in TFLOP/s, the MFU denominator: fp32 2048^3 on CPU, bf16
    8192^3 on CUDA (median of triton.testing.do_bench), on random data."""
    if device == "cuda":
        from triton.testing import do_bench

        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return 2 * 8192 ** 3 / (do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") * 1e-3) / 1e12
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2 * 2048 ** 3 * 3 / (time.perf_counter() - start) / 1e12
