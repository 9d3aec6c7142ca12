"""Comparison helpers shared by the kernel tests (tolerances of docs/design.md)."""
from __future__ import annotations

import importlib.util
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from csfm_kernels import _ext
from csfm_kernels._triton import triton_runs_on
from csfm_kernels.patch_embed import PatchEmbedParams, patch_embed_tokens_reference

from csfm.data.readers.safe_io import FileFormatError
from csfm.data.record import CHANNEL_TYPE_NAMES, Record

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


PATCH_PARAM_NAMES = ["ln_p_w", "ln_p_b", "weight", "bias", "ln_d_w", "ln_d_b", "chan_emb", "pos_emb"]


def patch_embed_inputs(T: int, P: int, D: int, n_chan: int = 13, n_pos: int = 100, seed: int = 0,
                       offset: float = 0.0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random fp32 inputs of the fused patch embedding: patches [T, P] with a random scale and
    DC level per token, like raw ECG patches, plus ``offset``; token_chan [T] < n_chan and
    token_pos [T] < n_pos (int64); the eight parameters of PATCH_PARAM_NAMES for width D."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    patches = rnd(T, P) * (0.5 + torch.rand(T, 1, generator=g)) + rnd(T, 1, shift=offset)
    inputs = dict(
        patches=patches,
        token_chan=torch.randint(0, n_chan, (T,), generator=g),
        token_pos=torch.randint(0, n_pos, (T,), generator=g),
        ln_p_w=rnd(P, scale=0.2, shift=1.0),
        ln_p_b=rnd(P, scale=0.1),
        weight=rnd(D, P, scale=P ** -0.5),
        bias=rnd(D, scale=0.1),
        ln_d_w=rnd(D, scale=0.2, shift=1.0),
        ln_d_b=rnd(D, scale=0.1),
        chan_emb=rnd(n_chan, D, scale=0.5),
        pos_emb=rnd(n_pos, D, scale=0.5),
    )
    return {k: v.to(device) for k, v in inputs.items()}


def patch_embed_torch(inputs: dict[str, torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """The package's plain-torch reference on a :func:`patch_embed_inputs` dict -> [T, D]."""
    params = PatchEmbedParams(*[inputs[k] for k in PATCH_PARAM_NAMES], eps=eps)
    return patch_embed_tokens_reference(inputs["patches"], inputs["token_chan"], inputs["token_pos"], params)


def assert_refused_early(read: Callable[[Path], object], fmt: str, path: Path, *in_message: str,
                      field: str = "") -> FileFormatError:
    """``read(path)`` (a file reader) must raise FileFormatError naming ``path`` and ``fmt``, with
    ``field`` in its field and each of ``in_message`` in its message, with a tracemalloc peak under
    100 MB (a hostile file fails before anything big is allocated; how fast is measured in
    bench/test_readers.py). Returns the error for further checks."""
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as info:
            read(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    error = info.value
    assert error.path == Path(path) and error.fmt == fmt and str(path) in str(error), (str(error), path, fmt)
    assert field in error.field, (field, str(error))
    for fragment in in_message:
        assert fragment in str(error), (fragment, str(error))
    assert peak < 100 * 2 ** 20, peak
    return error


def assert_ecg_record(record: Record, fs: float, names: list[str], samples: int) -> None:
    """The contract's fields of a file reader's Record: fs in Hz, the standard lead ``names`` in
    this order with their channel types, signal [len(names), samples] float32 (duration
    samples / fs), every channel an ECG lead in mV."""
    assert record.fs == fs
    assert record.channel_names == list(names)
    assert record.channel_types == [CHANNEL_TYPE_NAMES.index(name) for name in names]
    assert record.signal.shape == (len(names), samples) and record.signal.dtype == np.float32
    assert record.duration_s == pytest.approx(samples / fs)
    assert record.units == ["mV"] * len(names) and record.modalities == ["ECG"] * len(names)


def assert_median_beats(record: Record, fs: float, leads: list[str], samples: int) -> np.ndarray:
    """``record.metadata["median_beats"]`` as the readers give it: {"fs": fs Hz, "leads": leads,
    "signal": [len(leads), samples] float32 mV}, shorter than the rhythm strip. Returns its signal."""
    median = record.metadata["median_beats"]
    assert median["fs"] == fs and median["leads"] == list(leads)
    assert median["signal"].shape == (len(leads), samples) and median["signal"].dtype == np.float32
    assert samples < record.signal.shape[1]
    return median["signal"]


def assert_lead_matches(ours: np.ndarray, expected: np.ndarray, label: str = "", atol: float = 1e-6) -> None:
    """A reader's lead ``ours`` [T] equals an independent decode ``expected`` [T] (same unit, mV)
    within ``atol`` at every one of at least 100 samples, and correlates with it at >= 0.999."""
    assert ours.shape == expected.shape and ours.size >= 100, (label, ours.shape, expected.shape)
    assert np.corrcoef(ours, expected)[0, 1] >= 0.999, label
    equal = np.isclose(ours, expected, rtol=0, atol=atol)
    assert equal.all(), (label, int((~equal).sum()), np.abs(ours - expected).max())
