"""Kernel-level tests of the Triton sections of patch_embed, masking and varlen attention against
plain torch (the grid-looping ``max_programs`` paths, strided and empty inputs, and the tiles a
GPU launches, named by architecture; op-level tests of every backend live in test_patch_embed.py,
test_masking.py and test_varlen_attention.py).

Runs under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors unless the environment
already says otherwise (then CUDA tensors are used when a GPU is present).
"""
import importlib
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import PATCH_PARAM_NAMES, assert_close_by_rule, patch_embed_inputs, patch_embed_torch

pytest.importorskip("triton")
masking = importlib.import_module("csfm_kernels.masking")
patch_embed = importlib.import_module("csfm_kernels.patch_embed")  # the package re-exports a function of that name
varlen = importlib.import_module("csfm_kernels.varlen_attention")
DEVICE_ARCHS = (80, 90, 100)  # the architectures whose launch configurations tests/kernels/test_compile.py checks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.interpreter

NC, NP = 13, 100
EPS = 1e-5
D_CHOICES = [16, 24, 40, 64, 100]
P_CHOICES = [1, 25]
DTYPES = [torch.float32, torch.float16]
# The "fp32" reference is torch in float64: torch's own fp32 LayerNorm backward is noisy where the
# math is exactly 0 (e.g. d ln_p_w for P = 1, where x - mean == 0 but torch's CPU backward forms
# x * rstd - mean * rstd with rstd = 1 / sqrt(eps) and gets ~1e-4 of rounding).
REF = torch.float64
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _make_inputs(T, P, D, dtype, seed):
    """Patch-embedding inputs on DEVICE with the patches in ``dtype`` (parameters fp32)."""
    inp = patch_embed_inputs(T, P, D, NC, NP, seed, device=DEVICE)
    inp["patches"] = inp["patches"].to(dtype)
    return inp


GRAD_NAMES = ["patches"] + PATCH_PARAM_NAMES


def _cast(inp, dtype):
    """All float tensors to ``dtype`` (index tensors untouched)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}


def _torch_grads(inp, grad_out):
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v)
        for k, v in inp.items()
    }
    out = patch_embed_torch(leaves)
    out.backward(grad_out.to(out.dtype))
    return [leaves[n].grad for n in GRAD_NAMES]


def _triton_forward(inp):
    return patch_embed._triton_forward(inp["patches"], inp["token_chan"], inp["token_pos"],
                                       [inp[n] for n in PATCH_PARAM_NAMES], EPS)


def _triton_backward(grad_out, inp, **kw):
    return patch_embed._triton_backward(grad_out, inp["patches"], inp["token_chan"], inp["token_pos"],
                                        [inp[n] for n in PATCH_PARAM_NAMES], EPS, **kw)


def _maxerr(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _check_low_precision(name, got, ref32, ref_low):
    """Error of ``got`` vs the fp32 reference <= 2 x torch's own low-precision error + 1e-3."""
    err = _maxerr(got, ref32)
    err_torch = _maxerr(ref_low, ref32)
    assert err <= 2.0 * err_torch + 1e-3, f"{name}: err {err:.3e} vs torch fp16 err {err_torch:.3e}"


# ----------------------------------------------------------------------------------------------
# patch embedding forward / backward
# ----------------------------------------------------------------------------------------------
@SETTINGS
@given(
    T=st.integers(1, 70),
    D=st.sampled_from(D_CHOICES),
    P=st.sampled_from(P_CHOICES),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_patch_embed_forward(T, D, P, dtype, seed):
    inp = _make_inputs(T, P, D, dtype, seed)
    out = _triton_forward(inp)
    assert out.shape == (T, D) and out.dtype == dtype
    if dtype == torch.float32:
        ref = patch_embed_torch(_cast(inp, REF)).float()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        ref32 = patch_embed_torch(_cast(inp, REF))
        ref_low = patch_embed_torch(_cast(inp, dtype))
        _check_low_precision("out", out, ref32, ref_low)


@SETTINGS
@given(
    T=st.integers(1, 70),
    D=st.sampled_from(D_CHOICES),
    P=st.sampled_from(P_CHOICES),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    max_programs=st.sampled_from([None, 1, 2]),
)
def test_patch_embed_backward(T, D, P, dtype, seed, max_programs):
    inp = _make_inputs(T, P, D, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(T, D, generator=g).to(DEVICE).to(dtype)
    got = _triton_backward(grad_out, inp, max_programs=max_programs)
    assert len(got) == len(GRAD_NAMES)
    for name, gv in zip(GRAD_NAMES, got):
        assert gv.shape == inp[name].shape, name
        assert gv.dtype == inp[name].dtype, name
    if dtype == torch.float32:
        ref = _torch_grads(_cast(inp, REF), grad_out.to(REF))
        for name, gv, rv in zip(GRAD_NAMES, got, ref):
            rv = rv.float()
            tol = 1e-5 if name == "patches" else 1e-4
            torch.testing.assert_close(gv, rv, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    else:
        ref32 = _torch_grads(_cast(inp, REF), grad_out.to(REF))
        ref_low = _torch_grads(_cast(inp, dtype), grad_out)
        for name, gv, r32, rlow in zip(GRAD_NAMES, got, ref32, ref_low):
            _check_low_precision(name, gv, r32, rlow)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("P", P_CHOICES)
@pytest.mark.parametrize("D", D_CHOICES)
def test_patch_embed_grid(D, P, dtype):
    """Every (D, P, dtype) combination once, with a ragged last block and a looping grid."""
    T = 53
    inp = _make_inputs(T, P, D, dtype, 1000 * D + P)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(D)).to(DEVICE).to(dtype)
    out = _triton_forward(inp)
    got = _triton_backward(grad_out, inp, max_programs=2)
    ref_out = patch_embed_torch(_cast(inp, REF))
    ref = _torch_grads(_cast(inp, REF), grad_out.to(REF))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=1e-5)
        for name, gv, rv in zip(GRAD_NAMES, got, ref):
            tol = 1e-5 if name == "patches" else 1e-4
            torch.testing.assert_close(gv, rv.float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"{name}: {m}")
    else:
        _check_low_precision("out", out, ref_out, patch_embed_torch(_cast(inp, dtype)))
        ref_low = _torch_grads(_cast(inp, dtype), grad_out)
        for name, gv, r32, rlow in zip(GRAD_NAMES, got, ref, ref_low):
            _check_low_precision(name, gv, r32, rlow)


def test_patch_embed_expanded_grad_and_strided_inputs():
    """Stride-0 grad_out (from expand / sum) and non-contiguous patches."""
    T, P, D = 37, 25, 40
    inp = _make_inputs(T, P, D, torch.float32, 7)
    inp["patches"] = inp["patches"].t().contiguous().t()  # column-major view
    row = torch.randn(D).to(DEVICE)
    grad_out = row.expand(T, D)
    got = _triton_backward(grad_out, inp)
    ref = _torch_grads(_cast(inp, REF), grad_out.to(REF))
    for name, gv, rv in zip(GRAD_NAMES, got, ref):
        torch.testing.assert_close(gv, rv.float(), atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    ref_out = patch_embed_torch(_cast(inp, REF)).float()
    torch.testing.assert_close(_triton_forward(inp), ref_out, atol=1e-5, rtol=1e-5)


def test_patch_embed_empty():
    inp = _make_inputs(0, 25, 24, torch.float32, 0)
    out = _triton_forward(inp)
    assert out.shape == (0, 24)
    got = _triton_backward(torch.empty(0, 24, device=DEVICE), inp)
    for name, gv in zip(GRAD_NAMES, got):
        assert gv.shape == inp[name].shape and gv.dtype == inp[name].dtype
        assert gv.numel() == 0 or torch.count_nonzero(gv) == 0, name


def test_patch_embed_fp16_params_fp16_patches():
    """All-fp16 storage (no autocast): grads come back in fp16 for every input."""
    T, P, D = 20, 25, 24
    inp = _cast(_make_inputs(T, P, D, torch.float32, 3), torch.float16)
    grad_out = torch.randn(T, D).to(DEVICE).half()
    got = _triton_backward(grad_out, inp)
    ref32 = _torch_grads(_cast(inp, REF), grad_out.to(REF))
    ref_low = _torch_grads(inp, grad_out)
    for name, gv, r32, rlow in zip(GRAD_NAMES, got, ref32, ref_low):
        assert gv.dtype == torch.float16
        _check_low_precision(name, gv, r32, rlow)


# ----------------------------------------------------------------------------------------------
# row gather / scatter
# ----------------------------------------------------------------------------------------------
@SETTINGS
@given(
    M=st.integers(1, 50),
    K_=st.integers(0, 70),
    D=st.sampled_from(D_CHOICES + [1, 600]),
    dtype=st.sampled_from(DTYPES + [torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gather_rows(M, K_, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(M, D, generator=g).to(dtype).to(DEVICE)
    rows = torch.randint(0, M, (K_,), generator=g).to(DEVICE)
    out = masking._triton_gather(src, rows)
    assert out.dtype == dtype and out.shape == (K_, D)
    assert torch.equal(out, src[rows])


def _scatter_case(K_, M, D, dtype, seed):
    """source_rows [M]: each of the K_ source rows appears exactly once (K_ <= M), rest -1."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(K_, D, generator=g).to(dtype).to(DEVICE)
    fill = torch.randn(D, generator=g).to(DEVICE)  # fp32 parameter
    source_rows = torch.full((M,), -1, dtype=torch.int64)
    slots = torch.randperm(M, generator=g)[:K_]
    source_rows[slots] = torch.randperm(K_, generator=g)
    return src, source_rows.to(DEVICE), fill


def _scatter_ref(src, source_rows, fill):
    M, D = source_rows.shape[0], src.shape[1]
    out = fill.to(src.dtype).expand(M, D).clone()
    has = source_rows >= 0
    out[has] = src[source_rows[has]]
    return out


@SETTINGS
@given(
    M=st.integers(0, 70),
    frac=st.floats(0.0, 1.0),
    D=st.sampled_from(D_CHOICES + [1]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_scatter_rows_fill(M, frac, D, dtype, seed):
    K_ = int(round(frac * M))
    src, source_rows, fill = _scatter_case(K_, M, D, dtype, seed)
    out = masking._triton_scatter(src, source_rows, fill)
    assert out.dtype == dtype and out.shape == (M, D)
    assert torch.equal(out, _scatter_ref(src, source_rows, fill))


@SETTINGS
@given(
    M=st.integers(0, 70),
    frac=st.floats(0.0, 1.0),
    D=st.sampled_from(D_CHOICES + [1]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    max_programs=st.sampled_from([None, 1, 2]),
)
def test_scatter_rows_fill_backward(M, frac, D, dtype, seed, max_programs):
    K_ = int(round(frac * M))
    src, source_rows, fill = _scatter_case(K_, M, D, dtype, seed)
    grad_out = torch.randn(M, D).to(dtype).to(DEVICE)
    gsrc, gfill = masking._triton_scatter_backward(
        grad_out, source_rows, K_, max_programs=max_programs
    )
    assert gsrc.shape == (K_, D) and gsrc.dtype == dtype
    assert gfill.shape == (D,) and gfill.dtype == dtype

    # torch autograd reference (fill used in src dtype, grad accumulated in fp32 for the check)
    s = src.detach().float().requires_grad_(True)
    f = fill.detach().float().requires_grad_(True)
    out = _scatter_ref(s, source_rows, f)
    out.backward(grad_out.float())
    assert torch.equal(gsrc, s.grad.to(dtype))  # pure copies
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(gfill.float(), f.grad, atol=tol, rtol=tol)


def test_row_ops_empty():
    src = torch.randn(0, 24, device=DEVICE)
    assert masking._triton_gather(src, torch.empty(0, dtype=torch.long, device=DEVICE)).shape == (0, 24)
    fill = torch.randn(24, device=DEVICE)
    rows = torch.full((5,), -1, dtype=torch.long, device=DEVICE)
    out = masking._triton_scatter(src, rows, fill)  # K = 0: all fill
    assert torch.equal(out, fill.expand(5, 24))
    gsrc, gfill = masking._triton_scatter_backward(torch.ones(5, 24, device=DEVICE), rows, 0)
    assert gsrc.shape == (0, 24)
    torch.testing.assert_close(gfill, torch.full((24,), 5.0, device=DEVICE))
    gsrc, gfill = masking._triton_scatter_backward(
        torch.empty(0, 24, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE), 3
    )
    assert gsrc.shape == (3, 24) and torch.count_nonzero(gsrc) == 0
    assert gfill.shape == (24,) and torch.count_nonzero(gfill) == 0


def test_row_ops_model_width():
    """d = 768 in 256-column blocks (three per row, none padded), every row op once."""
    M, K_, D = 40, 30, 768
    src, source_rows, fill = _scatter_case(K_, M, D, torch.float32, 11)
    out = masking._triton_scatter(src, source_rows, fill)
    assert torch.equal(out, _scatter_ref(src, source_rows, fill))
    rows = torch.randperm(K_, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    assert torch.equal(masking._triton_gather(src, rows), src[rows])
    grad_out = torch.randn(M, D, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    gsrc, gfill = masking._triton_scatter_backward(grad_out, source_rows, K_, max_programs=2)
    has = source_rows >= 0
    expected = torch.zeros_like(src)
    expected[source_rows[has]] = grad_out[has]
    assert torch.equal(gsrc, expected)
    torch.testing.assert_close(gfill, grad_out[~has].sum(0), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# a GPU's launch configurations, run by the interpreter (it ignores warps and stages: one
# architecture per distinct set of block shapes)
# ----------------------------------------------------------------------------------------------
def _distinct_archs(shapes_of) -> list[int]:
    """The first architecture of DEVICE_ARCHS for each distinct value of ``shapes_of(arch)``."""
    first = {}
    for arch in DEVICE_ARCHS:
        first.setdefault(shapes_of(arch), arch)
    return sorted(first.values())


def _pe_shapes(D):
    return lambda arch: patch_embed._pe_blocks(25, D, arch)[1:]  # (BLOCK_T, BLOCK_D, warps) per kernel


@pytest.mark.parametrize("D, arch", [(D, arch) for D in (384, 768) for arch in _distinct_archs(_pe_shapes(D))])
def test_patch_embed_device_blocks(D, arch):
    """fp32 against float64 torch with the chunks a GPU uses (d = 768: twelve 64-column chunks,
    24 in the backward rows pass), a ragged last token block and a looping grid."""
    T = 45
    inp = _make_inputs(T, 25, D, torch.float32, D)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(D)).to(DEVICE)
    params = [inp[n] for n in PATCH_PARAM_NAMES]
    out = patch_embed._triton_forward(inp["patches"], inp["token_chan"], inp["token_pos"], params, EPS,
                                      arch=arch)
    got = patch_embed._triton_backward(grad_out, inp["patches"], inp["token_chan"], inp["token_pos"], params,
                                       EPS, max_programs=2, arch=arch)
    torch.testing.assert_close(out, patch_embed_torch(_cast(inp, REF)).float(), atol=1e-5, rtol=1e-5)
    for name, gv, rv in zip(GRAD_NAMES, got, _torch_grads(_cast(inp, REF), grad_out.to(REF))):
        tol = 1e-5 if name == "patches" else 1e-4
        torch.testing.assert_close(gv, rv.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _attention_shapes(head_dim, dtype):
    def shapes(arch):
        config = varlen._triton_config(head_dim, dtype, arch)
        return tuple((t.block_m, t.block_n) for t in (config.forward, config.dkdv, config.dq))
    return shapes


def _attention_torch(q, k, v, grad_out, lengths, dtype, scale):
    """(out, dq, dk, dv) of per-record softmax attention computed in ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    outs, start = [], 0
    for n in lengths:
        qi, ki, vi = (x[start:start + n].transpose(0, 1) for x in leaves)
        weights = torch.softmax((qi @ ki.transpose(-1, -2)) * scale, dim=-1)
        outs.append((weights @ vi).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return (out.detach(), *grads)


@pytest.mark.parametrize("head_dim, dtype, arch", [
    (hd, dt, arch) for hd in (64, 128) for dt in DTYPES for arch in _distinct_archs(_attention_shapes(hd, dt))])
def test_attention_device_tiles(head_dim, dtype, arch):
    """Forward and backward with a GPU's tiles (q blocks of 64 / 32 rows, dK/dV blocks of 64 / 32 k
    rows stepping 32 / 16 q rows): records shorter than one tile, exactly one, and spanning three."""
    lengths, heads = [1, 64, 130], 2
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v, grad_out = (torch.randn(sum(lengths), heads, head_dim, generator=gen).to(DEVICE, dtype)
                         for _ in range(4))
    cu = torch.tensor([0, 1, 65, 195], dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out, lse = varlen._triton_forward(q, k, v, cu, max(lengths), scale, arch=arch)
    ours = (out, *varlen._triton_backward(grad_out, q, k, v, out, lse, cu, max(lengths), scale, arch=arch))
    ref = _attention_torch(q, k, v, grad_out, lengths, REF, scale)
    low = _attention_torch(q, k, v, grad_out, lengths, dtype, scale) if dtype != torch.float32 else (None,) * 4
    for name, got, r, lo in zip(("out", "dq", "dk", "dv"), ours, ref, low):
        assert got.dtype == dtype, name
        ulp = torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        assert_close_by_rule(got, r, lo, atol=1e-4 if lo is None else ulp, rtol=1e-4, name=f"sm_{arch} {name}")
