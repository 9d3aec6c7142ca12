"""varlen_attention: every backend against the per-record reference, values and grads of q, k, v.

fp32: atol/rtol 1e-4. fp16 (flash-attn rule): error vs the fp32 reference <= 2x the error of the
plain attention computed in fp16, plus one fp16 ulp at max(1, largest value) (inputs are unit-scale).
Triton runs under TRITON_INTERPRET=1 on CPU tensors where no GPU is present (small shapes: each
program instance costs ~1.5 ms there).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

va = importlib.import_module("csfm_kernels.varlen_attention")  # the package re-exports a function of that name
from csfm_kernels import BackendUnavailable  # noqa: E402
from csfm_kernels.varlen_attention import pack, unpack, varlen_attention  # noqa: E402
from helpers import assert_close_by_rule  # noqa: E402

FP32 = {"atol": 1e-4, "rtol": 1e-4}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_HERE = importlib.util.find_spec("triton") is not None and (DEVICE.type == "cuda" or va._INTERPRETED)


def _cu(lengths: list[int], device: torch.device = torch.device("cpu")) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _inputs(lengths, heads, head_dim, dtype, seed=0, device=torch.device("cpu")):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v, g = (torch.randn(total, heads, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    return q, k, v, g


def _run(fn, q, k, v, g):
    """(out, dq, dk, dv) of ``fn(q, k, v)`` for output grad ``g``, all detached."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return (out.detach(), *grads)


def _plain(q, k, v, cu, scale=None):
    """Per-record attention in the inputs' own dtype (no upcast): the 'plain op' of the half rule."""
    outs = []
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))
        s = scale if scale is not None else q.shape[-1] ** -0.5
        w = torch.softmax((qi @ ki.transpose(-1, -2)) * s, dim=-1)
        outs.append((w @ vi).transpose(0, 1))
    return torch.cat(outs)


def _check_against_reference(backend, lengths, heads, head_dim, dtype, device=torch.device("cpu"), seed=0):
    q, k, v, g = _inputs(lengths, heads, head_dim, dtype, seed, device)
    cu, longest = _cu(lengths, device), max(lengths)
    ours = _run(lambda a, b, c: varlen_attention(a, b, c, cu, longest, backend=backend), q, k, v, g)
    ref32 = _run(lambda a, b, c: varlen_attention(a, b, c, cu, longest, backend="reference"),
                 q.float(), k.float(), v.float(), g.float())
    low = None
    if dtype != torch.float32:
        low = _run(lambda a, b, c: _plain(a, b, c, cu), q, k, v, g)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert ours[i].dtype == dtype, f"{name} dtype {ours[i].dtype}"
        if low is None:
            assert_close_by_rule(ours[i], ref32[i], None, name=f"{backend} {name}", **FP32)
        else:  # slack: one ulp at the inputs' unit scale or the largest value (tiny records can
            # make the plain op's own error ~0 while ours pays one rounding of O in delta)
            ulp = torch.finfo(dtype).eps * max(1.0, ref32[i].abs().max().item())
            assert_close_by_rule(ours[i], ref32[i], low[i], atol=ulp, name=f"{backend} {name}")


# --- CPU path ------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(short=st.lists(st.integers(1, 130), min_size=0, max_size=7),
       long=st.one_of(st.none(), st.integers(131, 1400)),
       heads=st.integers(1, 4), head_dim=st.sampled_from([32, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16]), where=st.integers(0, 7),
       seed=st.integers(0, 2**16))
@example(short=[1, 101, 101, 37, 1], long=1201, heads=2, head_dim=64, dtype=torch.float32, where=2, seed=0)
@example(short=[1], long=None, heads=1, head_dim=32, dtype=torch.float16, where=0, seed=1)
@example(short=[], long=1400, heads=4, head_dim=64, dtype=torch.float16, where=0, seed=2)
def test_cpu_path_matches_reference(short, long, heads, head_dim, dtype, where, seed):
    lengths = list(short)
    if long is not None:
        lengths.insert(min(where, len(lengths)), long)
    if not lengths:
        lengths = [1]
    _check_against_reference("cpu", lengths, heads, head_dim, dtype, seed=seed)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_length_records(backend):
    lengths = [0, 7, 0, 0, 12, 7, 0]
    _check_against_reference(backend, lengths, 2, 32, torch.float32)


@pytest.mark.parametrize("lengths", [
    [300, 5, 0, 300, 5, 300, 300, 7, 5],  # long records: runs of views; short ones: gathered
    [101] * 6,                            # one bucket that is the whole batch: no copies
    [101, 101, 201, 201, 0, 101],         # adjacent records of one length share a view
], ids=["interleaved", "uniform", "runs"])
def test_cpu_path_layouts(lengths):
    _check_against_reference("cpu", lengths, 2, 32, torch.float32)


def test_strided_inputs_from_a_qkv_split():
    """q, k, v as views of one [T, 3, h, d] projection (how the encoder produces them)."""
    lengths = [101, 33, 101, 201]
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(sum(lengths), 3, 4, 64, generator=gen)
    g = torch.randn(sum(lengths), 4, 64, generator=gen)
    cu = _cu(lengths)
    ours = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 201, backend="cpu"), *qkv.unbind(1), g)
    ref = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 201, backend="reference"),
               *qkv.unbind(1), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32)
    # out.sum().backward() hands the backward a stride-0 (expanded) grad
    qkv.requires_grad_()
    varlen_attention(*qkv.unbind(1), cu, 201, backend="cpu").sum().backward()
    ones = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 201, backend="reference"),
                *qkv.detach().unbind(1), torch.ones_like(g))
    torch.testing.assert_close(qkv.grad, torch.stack(ones[1:], 1), **FP32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mixed_batch_equals_each_record_alone(backend):
    """One 12-lead record (1201 tokens) among seven 1-lead records (101) = each run alone."""
    lengths = [101, 101, 101, 1201, 101, 101, 101, 101]
    q, k, v, g = _inputs(lengths, 8, 64, torch.float32, seed=3)
    cu = _cu(lengths)
    together = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 1201, backend=backend), q, k, v, g)
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        one = _cu([b - a])
        alone = _run(lambda x, y, z: varlen_attention(x, y, z, one, b - a, backend=backend),
                     q[a:b], k[a:b], v[a:b], g[a:b])
        for t, s in zip(together, alone):
            torch.testing.assert_close(t[a:b], s, atol=1e-6, rtol=1e-6)


def test_auto_picks_cpu_on_cpu_tensors():
    lengths = [5, 9]
    q, k, v, _ = _inputs(lengths, 2, 32, torch.float32)
    out = varlen_attention(q, k, v, _cu(lengths), 9)
    torch.testing.assert_close(out, varlen_attention(q, k, v, _cu(lengths), 9, backend="cpu"), atol=0, rtol=0)


# --- packing -------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8), extra=st.integers(0, 5),
       trailing=st.sampled_from([(), (3,), (2, 4)]))
def test_pack_unpack_round_trip(lengths, extra, trailing):
    width = max(lengths) + extra
    padded = torch.randn(len(lengths), width, *trailing)
    packed, cu, max_seqlen = pack(padded, lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == _cu(lengths).tolist()
    assert max_seqlen == max(lengths) and packed.shape == (sum(lengths), *trailing)
    back = unpack(packed, cu, width)
    valid = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).reshape(len(lengths), width,
                                                                                    *([1] * len(trailing)))
    torch.testing.assert_close(back, padded * valid, atol=0, rtol=0)
    assert unpack(packed, cu, max_seqlen).shape == (len(lengths), max_seqlen, *trailing)
    torch.testing.assert_close(pack(back, lengths)[0], packed, atol=0, rtol=0)


def test_pack_and_unpack_are_differentiable():
    padded = torch.randn(3, 6, 2, requires_grad=True)
    packed, cu, m = pack(padded, [2, 6, 0])
    (unpack(packed * 2, cu, m) ** 2).sum().backward()
    expected = 8 * padded.detach() * (torch.arange(6)[None, :] < torch.tensor([2, 6, 0])[:, None])[..., None]
    torch.testing.assert_close(padded.grad, expected)


# --- dropout -------------------------------------------------------------------------------------

def _dropout_run(backend, seed, p, lengths=(11, 40, 1, 40, 23)):
    q, k, v, g = _inputs(list(lengths), 3, 32, torch.float32, seed=9)
    cu = _cu(list(lengths))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return _run(lambda a, b, c: varlen_attention(a, b, c, cu, 40, dropout_p=p, generator=gen,
                                                 backend=backend), q, k, v, g)


def test_dropout_cpu_path_equals_reference_with_the_same_generator():
    for a, b in zip(_dropout_run("cpu", 7, 0.1), _dropout_run("reference", 7, 0.1)):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_is_seeded(backend):
    first, again, other = (_dropout_run(backend, s, 0.1) for s in (7, 7, 8))
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(first[0], other[0])
    no_drop = _dropout_run(backend, None, 0.0)
    for a, b in zip(_dropout_run(backend, 7, 0.0), no_drop):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(first[0], no_drop[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_drops_about_p_of_the_weights(backend):
    """q = k = 0 makes every weight 1/L; v[t] = e_t then exposes each kept weight in the output."""
    length, heads, p = 64, 4, 0.25
    q = torch.zeros(length, heads, 64)
    v = torch.eye(length)[:, None, :].expand(length, heads, 64).contiguous()
    out = varlen_attention(q, q, v, _cu([length]), length, dropout_p=p,
                           generator=torch.Generator().manual_seed(0), backend=backend)
    kept = out * length * (1 - p)  # [query, head, key] = 1 where kept, 0 where dropped
    assert torch.allclose(kept, kept.round(), atol=1e-4)
    dropped = (kept.round() == 0).float().mean().item()
    assert abs(dropped - p) < 0.02, dropped  # 16384 draws: sigma ~ 0.0034


def test_dropout_on_a_backend_without_it_raises_and_auto_takes_the_cpu_path():
    """Named backends never fall back: triton has no dropout, so asking for it with dropout
    raises; "auto" picks the path that honours the generator."""
    with pytest.raises(BackendUnavailable, match="backend='triton'.*no attention dropout"):
        _dropout_run("triton", 7, 0.1)
    for a, b in zip(_dropout_run("auto", 7, 0.1), _dropout_run("cpu", 7, 0.1)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- host lengths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_seqlens_host_gives_the_same_result_without_reading_cu_seqlens(backend, monkeypatch):
    lengths = [5, 0, 33, 101, 5]
    q, k, v, g = _inputs(lengths, 2, 32, torch.float32, seed=2)
    cu = _cu(lengths)
    expected = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 101, backend=backend), q, k, v, g)

    def no_read(self, *args, **kwargs):
        raise AssertionError("cu_seqlens was read back although seqlens_host was given")

    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    got = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 101, backend=backend, seqlens_host=lengths),
               q, k, v, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_seqlens_host_must_agree_with_cu_seqlens():
    q, k, v, _ = _inputs([4, 6], 2, 32, torch.float32)
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match="must equal the running sum of seqlens_host"):
        varlen_attention(q, k, v, cu, 6, seqlens_host=[6, 4])
    with pytest.raises(ValueError, match="seqlens_host has 3 lengths for the 2 records"):
        varlen_attention(q, k, v, cu, 6, seqlens_host=[4, 6, 0])
    with pytest.raises(ValueError, match=r"running sum of seqlens_host\)\[-1\] = 9"):
        varlen_attention(q, k, v, cu, 6, seqlens_host=[4, 5])
    with pytest.raises(ValueError, match="max_seqlen = 5"):
        varlen_attention(q, k, v, cu, 5, seqlens_host=[4, 6])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_is_computed_in_float64(backend):
    """No silent fp32 inside: an fp64 call matches an fp64 computation to fp64 precision."""
    lengths = [7, 19]
    q, k, v, _ = _inputs(lengths, 2, 16, torch.float64, seed=6)
    out = varlen_attention(q, k, v, _cu(lengths), 19, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _plain(q, k, v, _cu(lengths)), atol=1e-12, rtol=1e-12)


# --- validation ----------------------------------------------------------------------------------

def test_bad_arguments_raise_value_error_naming_them():
    q, k, v, _ = _inputs([4, 6], 2, 32, torch.float32)
    cu = _cu([4, 6])
    bad_cu = {
        "int64": cu.long(), "2-D": cu[None], "start": torch.tensor([1, 4, 10], dtype=torch.int32),
        "decreasing": torch.tensor([0, 6, 4, 10], dtype=torch.int32),
        "last": torch.tensor([0, 4, 9], dtype=torch.int32),
    }
    for why, c in bad_cu.items():
        with pytest.raises(ValueError, match="cu_seqlens"):
            varlen_attention(q, k, v, c, 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, 5)
    with pytest.raises(ValueError, match="3-D"):
        varlen_attention(q[:, 0], k, v, cu, 6)
    with pytest.raises(ValueError, match="same shape"):
        varlen_attention(q, k[:, :1], v, cu, 6)
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention(q, k, v, cu, 6, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, 6, backend="magic")
    if TRITON_HERE:
        big = torch.zeros(10, 1, 256, device=DEVICE)
        with pytest.raises(ValueError, match="head_dim"):
            varlen_attention(big, big, big, cu.to(DEVICE), 6, backend="triton")
    if DEVICE.type == "cpu":
        for backend in ("torch_varlen", "flash_attn"):
            with pytest.raises(BackendUnavailable, match=f"backend='{backend}' cannot run on cpu.*CUDA"):
                varlen_attention(q, k, v, cu, 6, backend=backend)
    with pytest.raises(ValueError, match="k is float64 but q is float32"):
        varlen_attention(q, k.double(), v, cu, 6)


# --- Triton ----------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_HERE, reason="triton missing, or neither CUDA nor TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_triton_matches_reference(head_dim, dtype):
    _check_against_reference("triton", [1, 37, 0, 70, 16], 2, head_dim, dtype, device=DEVICE)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_HERE, reason="triton missing, or neither CUDA nor TRITON_INTERPRET=1")
@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=3).filter(any),
       heads=st.integers(1, 2), dtype=st.sampled_from([torch.float32, torch.float16]))
@example(lengths=[32, 64, 33], heads=1, dtype=torch.float32)  # block edges
def test_triton_random_lengths(lengths, heads, dtype):
    _check_against_reference("triton", lengths, heads, 32, dtype, device=DEVICE)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_HERE, reason="triton missing, or neither CUDA nor TRITON_INTERPRET=1")
@pytest.mark.parametrize("head_dim", [48, 128])
def test_triton_pads_head_dim(head_dim):
    _check_against_reference("triton", [33, 5], 1, head_dim, torch.float32, device=DEVICE)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_HERE, reason="triton missing, or neither CUDA nor TRITON_INTERPRET=1")
def test_triton_softmax_scale_and_slack_max_seqlen():
    lengths = [20, 45]
    q, k, v, g = _inputs(lengths, 2, 32, torch.float32, seed=4, device=DEVICE)
    cu = _cu(lengths, DEVICE)
    ours = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 64, softmax_scale=0.3, backend="triton"),
                q, k, v, g)
    ref = _run(lambda a, b, c: varlen_attention(a, b, c, cu, 45, softmax_scale=0.3, backend="reference"),
               q, k, v, g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32)


# --- on a GPU ----------------------------------------------------------------------------------------

GPU_LENGTHS = [101, 201, 1, 1265, 101, 0, 77, 1201]  # 1-lead, ECG+PPG, one token, 12-lead + text, odd


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch_varlen", "flash_attn", "auto"])
def test_gpu_backends_match_reference(backend, dtype, head_dim):
    if backend == "flash_attn" and va._flash_attn_varlen_func is None:
        pytest.skip("flash-attn not installed")
    if backend == "torch_varlen" and va._torch_varlen_attn is None:
        pytest.skip("torch.nn.attention.varlen missing")
    if backend in ("torch_varlen", "flash_attn") and dtype == torch.float32:
        with pytest.raises(BackendUnavailable, match="takes float16, bfloat16"):
            _check_against_reference(backend, [5], 1, head_dim, dtype, device=DEVICE)
        return
    _check_against_reference(backend, GPU_LENGTHS, 8, head_dim, dtype, device=DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 1400), min_size=1, max_size=6).filter(any),
       heads=st.integers(1, 8), head_dim=st.sampled_from([64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_triton_on_gpu_random_lengths(lengths, heads, head_dim, dtype, seed):
    """Random record lengths (0 to 1400 tokens) on the configurations compiled above."""
    _check_against_reference("triton", lengths, heads, head_dim, dtype, device=DEVICE, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seqlens_host_call_has_no_host_sync_on_gpu():
    """With the lengths on the host, the call reads nothing back (set_sync_debug_mode raises on a sync)."""
    lengths = [101, 1201, 7]
    q, k, v, g = _inputs(lengths, 8, 64, torch.bfloat16, device=DEVICE)
    cu = _cu(lengths, DEVICE)
    expected = varlen_attention(q, k, v, cu, 1201)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(q, k, v, cu, 1201, seqlens_host=lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
