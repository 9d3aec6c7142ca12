"""Comparison helpers shared by the kernel tests (tolerances of DESIGN.md §4)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from csfm_kernels import _ext
from csfm_kernels._triton import triton_runs_on

FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def backends_here() -> list[str]:
    """Fused backends that can run on CPU tensors in this session."""
    found = []
    if _ext.cpp is not None:
        found.append("cpu")
    if importlib.util.find_spec("triton") is not None and triton_runs_on(torch.device("cpu")):
        found.append("triton")
    return found


def backend_param(name: str):
    """A pytest param that skips with the reason when ``name`` cannot run here."""
    marks = [pytest.mark.interpreter] if name == "triton" else []
    if name not in backends_here():
        marks.append(pytest.mark.skip(reason=f"backend {name!r} unavailable: "
                                             f"{_ext.cpp_error if name == 'cpu' else 'no triton/interpreter'}"))
    return pytest.param(name, marks=marks, id=name)


ALL_BACKENDS = [backend_param("cpu"), backend_param("triton")]


def assert_close_by_rule(ours: torch.Tensor, ref32: torch.Tensor, ref_low: torch.Tensor | None,
                         atol: float = 1e-5, rtol: float = 1e-5, name: str = "") -> None:
    """fp32: allclose. Half precision (flash-attn rule): max |ours - ref32| must not exceed
    2 x max |ref_low - ref32| (the plain op's own error in that dtype) plus ``atol``."""
    assert ours.shape == ref32.shape, f"{name}: shape {ours.shape} != {ref32.shape}"
    if ref_low is None:
        torch.testing.assert_close(ours.float(), ref32.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    ours_err = (ours.float() - ref32.float()).abs().max().item() if ours.numel() else 0.0
    ref_err = (ref_low.float() - ref32.float()).abs().max().item() if ours.numel() else 0.0
    assert ours_err <= 2 * ref_err + atol, f"{name}: error {ours_err:.3g} > 2 x reference error {ref_err:.3g} + {atol}"
