"""Kernel-level tests of the C++ CPU kernels in csrc/ (``csfm_kernels._C``): thread counts,
strided/misaligned buffers, argument errors, and every kernel against plain torch (values)
and autograd (grads). The op-level tests of every backend are in test_patch_embed.py and
test_masking.py; the timings are in bench/test_kernels.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from csfm_kernels import _ext
from helpers import PATCH_PARAM_NAMES, patch_embed_inputs, patch_embed_torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

ROOT = Path(__file__).resolve().parents[2]


C = _ext.cpp
pytestmark = pytest.mark.skipif(C is None, reason=f"csfm_kernels._C is not built: {_ext.cpp_error}")

EPS = 1e-5


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
ARG_ORDER = ["patches", "token_chan", "token_pos"] + PATCH_PARAM_NAMES


def ours_forward(x, n_threads, eps=EPS, out=None):
    T = x["patches"].shape[0]
    D = x["weight"].shape[0]
    if out is None:
        out = torch.full((T, D), float("nan"))
    C.patch_embed_forward(*[x[k].numpy() for k in ARG_ORDER], eps, out.numpy(), n_threads)
    return out


def torch_backward(x, grad_out, eps=EPS):
    leaves = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in x.items()}
    patch_embed_torch(leaves, eps).backward(grad_out)
    return {k: leaves[k].grad for k in ["patches"] + PATCH_PARAM_NAMES}


def _to64(x):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}


def well_conditioned(x):
    """P >= 4 and D >= 8. With fewer elements per LayerNorm its backward is mostly cancellation
    (D == 1: dy is exactly 0; P == 2: grad_patches is O(eps)), so any fp32 result, torch's
    included, carries rounding noise amplified by up to 1/sqrt(eps)."""
    return x["patches"].shape[1] >= 4 and x["weight"].shape[0] >= 8


def check_forward(x, n_threads, eps=EPS, fp32=True):
    """Ours vs torch in float64 (rtol = atol = 1e-5) and vs plain fp32 torch where that is well
    conditioned (P >= 8, D >= 16, no large DC offset: fp32 torch's own LayerNorm error grows
    with the offset and with few elements, while ours keeps LayerNorm_P in double)."""
    out = ours_forward(x, n_threads, eps)
    # D < 8: a token's y can have a variance far below eps (e.g. D = 2 with two close values),
    # where zhat amplifies fp32 rounding by up to 1/sqrt(eps); fp32 torch is off more there
    tol = 1e-5 if x["weight"].shape[0] >= 8 else 1e-4
    torch.testing.assert_close(out.double(), patch_embed_torch(_to64(x), eps), rtol=tol, atol=tol)
    if fp32 and x["patches"].shape[1] >= 8 and x["weight"].shape[0] >= 16:
        torch.testing.assert_close(out, patch_embed_torch(x, eps), rtol=1e-5, atol=1e-5)
    return out


def check_backward(x, grad_out, n_threads, eps=EPS, fp32=True):
    """Ours vs torch autograd in float64 with the tolerances of ``assert_grads_close`` (1e-3
    where the LayerNorms are too short to be well conditioned, see ``well_conditioned``), and
    vs fp32 torch autograd where that is well conditioned (as in ``check_forward``)."""
    ours = ours_backward(x, grad_out, n_threads, eps)
    ref64 = torch_backward(_to64(x), grad_out.double(), eps)
    if well_conditioned(x):
        assert_grads_close(ours, ref64)
    else:
        for k, r in ref64.items():
            scale = float(r.abs().max()) if r.numel() else 1.0
            torch.testing.assert_close(ours[k].double(), r, rtol=1e-3, atol=1e-3 * max(1.0, scale),
                                       msg=lambda m: f"{k}: {m}")
    if fp32 and x["patches"].shape[1] >= 8 and x["weight"].shape[0] >= 16:
        assert_grads_close(ours, torch_backward(x, grad_out, eps))
    return ours


def ours_backward(x, grad_out, n_threads, eps=EPS):
    grads = {k: torch.full_like(x[k], float("nan")) for k in ["patches"] + PATCH_PARAM_NAMES}
    C.patch_embed_backward(grad_out.numpy(), *[x[k].numpy() for k in ARG_ORDER], eps,
                           *[grads[k].numpy() for k in ["patches"] + PATCH_PARAM_NAMES], n_threads)
    return grads


# grads that are sums over many tokens get a tolerance relative to their scale
SUMMED = {"ln_p_w", "ln_p_b", "weight", "bias", "ln_d_w", "ln_d_b", "chan_emb", "pos_emb"}


def assert_grads_close(ours, ref, floor=0.1):
    for k, r in ref.items():
        r = r.float()
        o = ours[k]
        assert o.shape == r.shape, k
        assert torch.isfinite(o).all(), f"{k} has non-finite values"
        if k in SUMMED:
            scale = float(r.abs().max()) if r.numel() else 1.0
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * max(scale, floor),
                                       msg=lambda m: f"{k}: {m}")
        else:
            scale = float(r.abs().max()) if r.numel() else 1.0
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5 * max(1.0, scale),
                                       msg=lambda m: f"{k}: {m}")


SHAPES = [  # T, P, D, NC, NP
    (0, 25, 768, 13, 100),
    (1, 25, 768, 13, 100),
    (3, 25, 17, 2, 5),
    (5, 1, 3, 1, 1),
    (37, 25, 768, 13, 100),
    (50, 7, 64, 3, 9),
    (129, 25, 100, 13, 40),
    (17, 3, 16, 4, 4),
    (300, 25, 48, 13, 100),
    (64, 30, 130, 2, 70),
    (9, 1, 768, 2, 3),
    (7, 25, 1, 2, 3),
]


# ------------------------------------------------------------------------------------------
# patch_embed forward / backward
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_P{}_D{}_NC{}_NP{}".format(*s))
@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_patch_embed_forward_matches_torch(shape, n_threads):
    check_forward(patch_embed_inputs(*shape, seed=sum(shape)), n_threads)


def test_patch_embed_forward_offset_patches_and_eps():
    # ECG patches with a large DC offset: fp32 torch's own LayerNorm is off by ~7e-5 here, so
    # only the float64 reference applies
    x = patch_embed_inputs(40, 25, 96, 13, 100, seed=3, offset=500.0)
    check_forward(x, 2, eps=1e-6, fp32=False)


def test_patch_embed_backward_offset_patches_and_eps():
    x = patch_embed_inputs(40, 25, 96, 13, 100, seed=4, offset=500.0)
    grad_out = torch.randn(40, 96, generator=torch.Generator().manual_seed(4))
    check_backward(x, grad_out, 2, eps=1e-6, fp32=False)


def test_patch_embed_forward_n_threads_larger_than_work():
    x = patch_embed_inputs(3, 25, 33, 2, 2, seed=1)
    check_forward(x, 64)
    check_backward(x, torch.randn(3, 33, generator=torch.Generator().manual_seed(1)), 64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_P{}_D{}_NC{}_NP{}".format(*s))
@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_patch_embed_backward_matches_autograd(shape, n_threads):
    x = patch_embed_inputs(*shape, seed=sum(shape) + 1)
    grad_out = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(7))
    check_backward(x, grad_out, n_threads)


def test_patch_embed_backward_large_many_tokens():
    x = patch_embed_inputs(1000, 25, 768, 13, 100, seed=11, offset=3.0)
    grad_out = torch.randn(1000, 768, generator=torch.Generator().manual_seed(2))
    check_backward(x, grad_out, 2)


def test_patch_embed_forward_large_output_streaming_and_misaligned_out():
    # >= 8 MiB of output takes the non-temporal store path (aligned rows); a misaligned
    # (but C-contiguous) out array takes the plain path
    x = patch_embed_inputs(3000, 25, 768, 13, 100, seed=9)
    ref = patch_embed_torch(x)
    torch.testing.assert_close(ours_forward(x, 2), ref, rtol=1e-5, atol=1e-5)
    buf = np.full(3000 * 768 + 1, np.nan, np.float32)
    out = buf[1:].reshape(3000, 768)
    assert out.flags.c_contiguous and out.ctypes.data % 64 != 0
    C.patch_embed_forward(*[x[k].numpy() for k in ARG_ORDER], EPS, out, 2)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(buf[0])


def test_patch_embed_backward_large_tables_and_many_threads():
    # big embedding tables cap the number of accumulator segments; many threads on few blocks
    x = patch_embed_inputs(700, 25, 96, 13, 60000, seed=12)
    grad_out = torch.randn(700, 96, generator=torch.Generator().manual_seed(12))
    check_backward(x, grad_out, 3)
    check_backward(x, grad_out, 16)


def test_patch_embed_backward_deterministic():
    x = patch_embed_inputs(203, 25, 96, 13, 100, seed=5)
    grad_out = torch.randn(203, 96, generator=torch.Generator().manual_seed(3))
    for n_threads in (1, 2, 3, 7):
        a = ours_backward(x, grad_out, n_threads)
        for _ in range(3):
            b = ours_backward(x, grad_out, n_threads)
            for k in a:
                assert torch.equal(a[k], b[k]), k
    a = ours_forward(x, 1)
    for n_threads in (2, 3, 7):  # the forward does not depend on the thread count at all
        assert torch.equal(ours_forward(x, n_threads), a)


def test_patch_embed_single_feature_is_exactly_flat():
    # D == 1: LayerNorm_D outputs ln_d_b whatever y is, so every upstream gradient is 0
    x = patch_embed_inputs(20, 25, 1, 2, 3, seed=6)
    grad_out = torch.randn(20, 1, generator=torch.Generator().manual_seed(6))
    grads = ours_backward(x, grad_out, 2)
    for k in ["patches", "ln_p_w", "ln_p_b", "weight", "bias", "ln_d_w"]:
        assert torch.equal(grads[k], torch.zeros_like(grads[k])), k
    torch.testing.assert_close(grads["ln_d_b"], grad_out.sum(0))
    torch.testing.assert_close(ours_forward(x, 2), patch_embed_torch(x), rtol=1e-5, atol=1e-5)


def test_patch_embed_backward_zero_tokens_zeroes_grads():
    x = patch_embed_inputs(0, 25, 20, 3, 4)
    grads = ours_backward(x, torch.zeros(0, 20), 2)
    for k, v in grads.items():
        assert torch.equal(v, torch.zeros_like(v)), k


def test_patch_embed_backward_unused_embedding_rows_are_zero():
    x = patch_embed_inputs(10, 25, 40, 13, 100, seed=2)
    x["token_chan"] = torch.zeros(10, dtype=torch.int64)
    x["token_pos"] = torch.arange(10)
    grads = ours_backward(x, torch.randn(10, 40), 2)
    assert torch.equal(grads["chan_emb"][1:], torch.zeros(12, 40))
    assert torch.equal(grads["pos_emb"][10:], torch.zeros(90, 40))


if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(T=st.integers(0, 70), P=st.integers(1, 33), D=st.integers(1, 150),
           NC=st.integers(1, 5), NP=st.integers(1, 20), n_threads=st.integers(1, 4),
           offset=st.sampled_from([0.0, 0.0, 30.0]), seed=st.integers(0, 2 ** 16))
    def test_patch_embed_random_shapes(T, P, D, NC, NP, n_threads, offset, seed):
        x = patch_embed_inputs(T, P, D, NC, NP, seed=seed, offset=offset)
        check_forward(x, n_threads, fp32=offset == 0.0)
        grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
        check_backward(x, grad_out, n_threads, fp32=offset == 0.0)


# ------------------------------------------------------------------------------------------
# masked rows
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M,K,D", [(0, 0, 5), (10, 0, 7), (10, 4, 17), (100, 30, 768), (7, 7, 1), (500, 499, 3)])
@pytest.mark.parametrize("n_threads", [1, 2, 9])
def test_gather_rows(M, K, D, n_threads):
    src = torch.randn(M, D)
    rows = torch.randint(0, max(M, 1), (K,)) if M else torch.zeros(0, dtype=torch.int64)
    out = torch.full((K, D), float("nan"))
    C.gather_rows(src.numpy(), rows.numpy(), out.numpy(), n_threads)
    assert torch.equal(out, src.index_select(0, rows))


def _scatter_case(M, K, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(M, generator=g)[:K].sort().values
    source_rows = torch.full((M,), -1, dtype=torch.int64)
    source_rows[keep] = torch.randperm(K, generator=g)
    return torch.randn(K, D, generator=g), source_rows, torch.randn(D, generator=g)


def _torch_scatter(src, source_rows, fill):
    kept = source_rows >= 0
    out = fill.expand(source_rows.shape[0], fill.shape[0]).clone()
    out[kept] = src.index_select(0, source_rows[kept])
    return out


@pytest.mark.parametrize("M,K,D", [(0, 0, 5), (10, 0, 7), (10, 4, 17), (100, 30, 768), (7, 7, 1), (500, 499, 3), (4000, 1000, 96)])
@pytest.mark.parametrize("n_threads", [1, 2, 9])
def test_scatter_rows_fill_and_backward(M, K, D, n_threads):
    src, source_rows, fill = _scatter_case(M, K, D, seed=M + K + D)
    out = torch.full((M, D), float("nan"))
    C.scatter_rows_fill(src.numpy(), source_rows.numpy(), fill.numpy(), out.numpy(), n_threads)
    assert torch.equal(out, _torch_scatter(src, source_rows, fill))

    src_l = src.clone().requires_grad_(True)
    fill_l = fill.clone().requires_grad_(True)
    grad_out = torch.randn(M, D, generator=torch.Generator().manual_seed(M * 31 + D))
    _torch_scatter(src_l, source_rows, fill_l).backward(grad_out)
    grad_src = torch.full((K, D), float("nan"))
    grad_fill = torch.full((D,), float("nan"))
    C.scatter_rows_fill_backward(grad_out.numpy(), source_rows.numpy(), grad_src.numpy(),
                                 grad_fill.numpy(), n_threads)
    assert torch.equal(grad_src, src_l.grad if src_l.grad is not None else torch.zeros(K, D))
    ref_fill = fill_l.grad if fill_l.grad is not None else torch.zeros(D)
    # ours sums in double: compare with the float64 sum, and loosely with torch's fp32 one
    # (whose own rounding over thousands of rows can exceed 1e-5)
    ref64 = grad_out.double()[source_rows < 0].sum(0)
    torch.testing.assert_close(grad_fill.double(), ref64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fill, ref_fill, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offset", ["aligned", 1, 333])
@pytest.mark.parametrize("D", [768, 771])
def test_large_outputs_are_written_whole_and_nothing_beside_them(offset, D):
    """Outputs of 4 MiB or more are advised onto huge pages before the first write (csrc/memory.h),
    and of 8 MiB or more with 64-byte aligned rows (D = 768 at an aligned start) written by
    non-temporal stores (csrc/simd.h): every row is still written, at any alignment and width,
    and the memory around the output is untouched."""
    M, K = 6000, 1500  # out [M, D] = 18 MB, kept [K, D] = 4.6 MB
    src, source_rows, fill = _scatter_case(M, K, D, seed=D + (offset if isinstance(offset, int) else 0))
    kept_rows = torch.nonzero(source_rows >= 0).flatten()
    for name, rows, run in (
        ("scatter_rows_fill", M, lambda out: C.scatter_rows_fill(src.numpy(), source_rows.numpy(), fill.numpy(), out, 2)),
        ("gather_rows", K, lambda out: C.gather_rows(_torch_scatter(src, source_rows, fill).numpy(),
                                                     kept_rows.numpy(), out, 2)),
    ):
        buf = np.full(rows * D + 16 + 333 + 7, np.nan, np.float32)
        start = (-buf.ctypes.data // 4) % 16 if offset == "aligned" else offset  # 16 floats = 64 B
        out = buf[start:start + rows * D].reshape(rows, D)
        run(out)
        assert np.isnan(buf[:start]).all() and np.isnan(buf[start + rows * D:]).all(), name
        expected = _torch_scatter(src, source_rows, fill) if name == "scatter_rows_fill" else \
            _torch_scatter(src, source_rows, fill)[kept_rows]
        assert torch.equal(torch.from_numpy(out), expected), name


def test_scatter_backward_zeroes_unreferenced_rows_and_is_deterministic():
    grad_out = torch.randn(6, 4)
    source_rows = torch.tensor([-1, 2, -1, 0, -1, -1])
    grad_src = torch.full((4, 4), float("nan"))
    grad_fill = torch.full((4,), float("nan"))
    C.scatter_rows_fill_backward(grad_out.numpy(), source_rows.numpy(), grad_src.numpy(), grad_fill.numpy(), 3)
    assert torch.equal(grad_src[0], grad_out[3]) and torch.equal(grad_src[2], grad_out[1])
    assert torch.equal(grad_src[[1, 3]], torch.zeros(2, 4))
    torch.testing.assert_close(grad_fill, grad_out[[0, 2, 4, 5]].sum(0))

    grad_out = torch.randn(20000, 33)
    source_rows = torch.full((20000,), -1, dtype=torch.int64)
    a, b = torch.empty(33), torch.empty(33)
    C.scatter_rows_fill_backward(grad_out.numpy(), source_rows.numpy(), torch.empty(0, 33).numpy(), a.numpy(), 2)
    C.scatter_rows_fill_backward(grad_out.numpy(), source_rows.numpy(), torch.empty(0, 33).numpy(), b.numpy(), 2)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, grad_out.double().sum(0).float(), rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def _fwd_args(x, out=None, eps=EPS, n_threads=2):
    T, D = x["patches"].shape[0], x["weight"].shape[0]
    arrays = {k: x[k].numpy() if isinstance(x[k], torch.Tensor) else x[k] for k in ARG_ORDER}
    out = torch.empty(T, D).numpy() if out is None else out
    return [arrays[k] for k in ARG_ORDER] + [eps, out, n_threads]


@pytest.mark.parametrize("name,bad,match", [
    ("patches", lambda v: v.double(), "patches.*float32"),
    ("patches", lambda v: v.t().contiguous().t(), "patches.*C-contiguous"),
    ("weight", lambda v: v.t().contiguous(), r"weight.*shape"),
    ("weight", lambda v: v.t(), r"weight.*shape"),
    ("token_chan", lambda v: v.int(), "token_chan.*int64"),
    ("token_pos", lambda v: v[:-1], "token_pos.*shape"),
    ("ln_p_w", lambda v: v[:-1], "ln_p_w.*shape"),
    ("ln_d_b", lambda v: torch.cat([v, v]), "ln_d_b.*shape"),
    ("bias", lambda v: torch.stack([v, v], 1)[:, 0], "bias.*C-contiguous"),
    ("chan_emb", lambda v: v[:, :-1], "chan_emb.*shape"),
    ("pos_emb", lambda v: v.half(), "pos_emb.*float32"),
])
def test_patch_embed_forward_rejects_bad_arrays(name, bad, match):
    x = patch_embed_inputs(8, 25, 32, 3, 6)
    x[name] = bad(x[name])
    with pytest.raises(ValueError, match=match):
        C.patch_embed_forward(*_fwd_args(x))


def test_patch_embed_forward_rejects_bad_out_and_threads():
    x = patch_embed_inputs(8, 25, 32, 3, 6)
    with pytest.raises(ValueError, match="out.*shape"):
        C.patch_embed_forward(*_fwd_args(x, out=np.empty((8, 31), np.float32)))
    with pytest.raises(ValueError, match="out.*float32"):
        C.patch_embed_forward(*_fwd_args(x, out=np.empty((8, 32), np.float64)))
    with pytest.raises(ValueError, match="out.*C-contiguous"):
        C.patch_embed_forward(*_fwd_args(x, out=np.empty((32, 8), np.float32).T))
    ro = np.empty((8, 32), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out.*writeable"):
        C.patch_embed_forward(*_fwd_args(x, out=ro))
    with pytest.raises(ValueError, match="n_threads"):
        C.patch_embed_forward(*_fwd_args(x, n_threads=0))
    with pytest.raises(TypeError):
        C.patch_embed_forward(*_fwd_args(x, out=[[0.0] * 32] * 8))


@pytest.mark.parametrize("name,value,nmax", [("token_chan", 3, 3), ("token_chan", -1, 3), ("token_pos", 6, 6)])
def test_patch_embed_rejects_out_of_range_index(name, value, nmax):
    x = patch_embed_inputs(8, 25, 32, 3, 6)
    x[name] = x[name].clone()
    x[name][5] = value
    with pytest.raises(IndexError, match=rf"{name}\[5\] = {value}"):
        C.patch_embed_forward(*_fwd_args(x))
    with pytest.raises(IndexError, match=name):
        ours_backward(x, torch.randn(8, 32), 2)


def test_patch_embed_backward_rejects_bad_grad_arrays():
    x = patch_embed_inputs(8, 25, 32, 3, 6)
    grads = {k: torch.empty_like(x[k]) for k in ["patches"] + PATCH_PARAM_NAMES}
    grads["weight"] = torch.empty(25, 32)
    with pytest.raises(ValueError, match=r"grad_weight.*\[32, 25\].*\[25, 32\]"):
        C.patch_embed_backward(torch.randn(8, 32).numpy(), *[x[k].numpy() for k in ARG_ORDER], EPS,
                               *[grads[k].numpy() for k in ["patches"] + PATCH_PARAM_NAMES], 2)
    grads["weight"] = torch.empty(32, 25)
    with pytest.raises(ValueError, match="grad_out.*shape"):
        C.patch_embed_backward(torch.randn(8, 33).numpy(), *[x[k].numpy() for k in ARG_ORDER], EPS,
                               *[grads[k].numpy() for k in ["patches"] + PATCH_PARAM_NAMES], 2)


def test_masked_rows_reject_bad_input():
    src = np.zeros((5, 4), np.float32)
    with pytest.raises(IndexError, match=r"rows\[1\] = 5"):
        C.gather_rows(src, np.array([0, 5]), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(IndexError, match="rows"):
        C.gather_rows(src, np.array([-1]), np.zeros((1, 4), np.float32), 1)
    with pytest.raises(ValueError, match="rows.*int64"):
        C.gather_rows(src, np.array([0, 1], np.int32), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(ValueError, match="out.*shape"):
        C.gather_rows(src, np.array([0, 1]), np.zeros((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="src.*C-contiguous"):
        C.gather_rows(np.zeros((4, 5), np.float32).T, np.array([0, 1]), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(IndexError, match=r"source_rows\[0\] = -2"):
        C.scatter_rows_fill(src, np.array([-2, 0]), np.zeros(4, np.float32), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(IndexError, match="source_rows"):
        C.scatter_rows_fill(src, np.array([5, 0]), np.zeros(4, np.float32), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(ValueError, match="fill.*shape"):
        C.scatter_rows_fill(src, np.array([1, 0]), np.zeros(3, np.float32), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(IndexError, match="source_rows"):
        C.scatter_rows_fill_backward(np.zeros((2, 4), np.float32), np.array([0, 5]), src,
                                     np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="repeats"):
        C.scatter_rows_fill_backward(np.zeros((2, 4), np.float32), np.array([1, 1]), src,
                                     np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="grad_fill.*float32"):
        C.scatter_rows_fill_backward(np.zeros((2, 4), np.float32), np.array([1, 0]), src,
                                     np.zeros(4, np.float64), 1)


def test_module_info():
    h = C.source_hash()
    assert isinstance(h, str) and len(h) == 16 and int(h, 16) >= 0
    assert C.n_threads_default() >= 1


def test_kernel_inputs_view_tensors_without_pinning_their_storage():
    """as_float32_array: the tensor's own memory (no copy for contiguous float32), and the storage
    stays resizable (Tensor.numpy() would fix it; FSDP frees parameter storages by resizing)."""
    from csfm_kernels._ext import as_float32_array

    t = torch.randn(3, 4)
    a = as_float32_array(t)
    t[1, 2] = 7.0
    assert a[1, 2] == 7.0 and a.dtype == np.float32 and a.flags.c_contiguous
    t.untyped_storage().resize_(0)  # raises "not resizable" after t.numpy()
    half = torch.randn(2, 5, dtype=torch.float16)
    np.testing.assert_array_equal(as_float32_array(half), half.float().numpy())  # converted copy
    np.testing.assert_array_equal(as_float32_array(torch.randn(4, 6)[:, ::2]).shape, (4, 3))
    assert as_float32_array(torch.zeros(0, 25)).shape == (0, 25)
