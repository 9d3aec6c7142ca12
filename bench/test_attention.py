"""Varlen attention, CSFM-Tiny heads (8 x 64): ours ("auto") side by side with PyTorch's best.

CPU, fp32: padded SDPA + key-padding mask, padded SDPA without a mask (uniform batches, where
that is the natural batch), a per-record SDPA loop and plain SDPA length buckets.
CUDA, bf16 (issue #10): the same padded SDPA baselines and length buckets,
``torch.nn.attention.varlen.varlen_attn`` (PyTorch's bundled FlashAttention varlen),
``flash_attn_varlen_func`` where installed, and flex_attention with a document mask (compiled)
on FLEX_CASES only: it compiles anew for every total length (20-40 s each), which the 6-minute
device run cannot afford for every case, and issue #10 measured it behind varlen_attn.

Useful FLOPs = 4 * heads * head_dim * sum(L_i^2) forward, 3.5x that forward + backward. Records
are interleaved in a fixed shuffled order (as a data loader would mix them), so equal-length
records are not adjacent.

    python -m pytest bench/test_attention.py --benchmark-only -q -s
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from csfm_kernels._dispatch import resolve
from csfm_kernels.varlen_attention import varlen_attention

va = importlib.import_module("csfm_kernels.varlen_attention")  # the package re-exports a function of that name

HEADS, HEAD_DIM = 8, 64
CASES = {
    "mixed16": [101] * 8 + [201] * 4 + [1201] * 4,
    "mixed128": [101] * 64 + [201] * 32 + [1201] * 32,
    "uniform64": [101] * 64,
    "ecgtext4": [1265] * 4,
    "masked75": [58] * 64 + [83] * 32 + [333] * 32,  # after 75 % masking of mixed128 (+ text)
}
CPU_CASES = ("mixed16", "uniform64", "ecgtext4")  # the 2-core CPU: the larger cases take minutes
FLEX_CASES = ("mixed16", "uniform64")
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
_ROOF: dict[str, float] = {}


def _lengths(case: str) -> list[int]:
    lengths = CASES[case]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    return [lengths[i] for i in order]


def _useful_flops(lengths: list[int]) -> float:
    return 4.0 * HEADS * HEAD_DIM * sum(n * n for n in lengths)


# --- baselines ---------------------------------------------------------------------------------

def _padded_sdpa(q, k, v, key_mask):
    """q, k, v [B, h, N, d] padded; key_mask bool [B, 1, 1, N], True for real tokens (None: no mask)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _loop_sdpa(q, k, v, cu):
    """One SDPA call per record on views of the packed [T, h, d] tensors."""
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        qi, ki, vi = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(outs)


def _bucket_plan(cu, device):
    """length -> int64 token index of all records of that length."""
    groups: dict[int, list[int]] = {}
    for a, b in zip(cu[:-1], cu[1:]):
        groups.setdefault(b - a, []).append(a)
    return {n: (torch.tensor(starts)[:, None] + torch.arange(n)).reshape(-1).to(device) for n, starts in groups.items()}


def _bucket_sdpa(q, k, v, plan):
    """Plain length buckets: index_select -> SDPA -> index_copy, autograd throughout."""
    out = torch.empty_like(q)
    for n, idx in plan.items():
        qb, kb, vb = (x.index_select(0, idx).unflatten(0, (-1, n)).transpose(1, 2) for x in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).flatten(0, 1)
        out.index_copy_(0, idx, ob)
    return out


def _flex_document(lengths: list[int], whole: list[torch.Tensor]):
    """flex_attention (compiled) over the packed tokens as one [1, h, T, d] sequence with a
    document mask, tried once on ``whole``: (fn(), None), or (None, why it cannot run here)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        device = whole[0].device
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)

        def same_record(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        total = sum(lengths)
        block_mask = create_block_mask(same_record, None, None, total, total, device=device)
        flex = torch.compile(flex_attention)
        flex(*whole, block_mask=block_mask)
        return (lambda: flex(*whole, block_mask=block_mask)), None
    except Exception as exc:  # an old torch, or a compiler failure: reported, not run
        return None, f"flex_attention failed here: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


# --- inputs ------------------------------------------------------------------------------------

def _inputs(lengths: list[int], grad: bool, device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(3))
    cu_list = [0]
    for n in lengths:
        cu_list.append(cu_list[-1] + n)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    padded = []
    for x in (q, k, v):
        p = x.new_zeros(batch, longest, HEADS, HEAD_DIM)
        for i, (a, b) in enumerate(zip(cu_list[:-1], cu_list[1:])):
            p[i, : b - a] = x[a:b]
        padded.append(p.transpose(1, 2).contiguous())
    key_mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :].to(device)
    grad_out = torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    grad_padded = torch.randn(batch, HEADS, longest, HEAD_DIM, generator=gen).to(device, dtype)
    whole = [x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v)]  # [1, h, T, d] for flex
    grad_whole = grad_out.transpose(0, 1).unsqueeze(0).contiguous()
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        padded = [x.requires_grad_() for x in padded]
        whole = [x.requires_grad_() for x in whole]
    return q, k, v, cu, cu_list, longest, padded, key_mask, grad_out, grad_padded, whole, grad_whole


def _with_backward(fn, inputs, grad_out):
    """fwd + bwd: grads of ``inputs`` (no accumulation between rounds)."""
    return lambda: torch.autograd.grad(fn(), inputs, grad_out)


# --- cases -------------------------------------------------------------------------------------

def test_matmul_roof(side_by_side, device):
    """The dense matmul rate of the device in this run: fp32 on CPU, bf16 on CUDA."""
    size, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    res = side_by_side("matmul roof", f"{size}^3 {str(dtype)[6:]}",
                       baselines={"torch.mm": lambda: torch.mm(a, b)},
                       ours={"torch.mm (again)": lambda: torch.mm(a, b)},
                       flops=2.0 * size ** 3, rounds=5, warmup=2, device=device)
    _ROOF[device] = res.flops / min(*res.baselines.values(), *res.ours.values()) / 1e9
    print(f"\n{device} matmul roof: {_ROOF[device]:.1f} GFLOP/s ({str(dtype)[6:]})")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_attention(side_by_side, device, case, mode):
    if device == "cpu" and case not in CPU_CASES:
        pytest.skip(f"{case} is a CUDA case (minutes on the 2-core CPU)")
    if device == "cuda" and mode == "fwd" and case != "mixed128":
        pytest.skip("CUDA forward-only: the mixed128 case (issue #10: ours vs varlen_attn's forward)")
    lengths, dtype = _lengths(case), DTYPE[device]
    grad = mode == "fwd+bwd"
    q, k, v, cu, cu_list, longest, padded, key_mask, grad_out, grad_padded, whole, grad_whole = \
        _inputs(lengths, grad, device, dtype)
    packed = ((q, k, v), grad_out)
    plan = _bucket_plan(cu_list, device)
    uniform = len(set(lengths)) == 1
    notes = []
    variants = {
        "padded SDPA + key mask": (lambda: _padded_sdpa(*padded, key_mask), padded, grad_padded),
        "SDPA length buckets": (lambda: _bucket_sdpa(q, k, v, plan), *packed),
    }
    if uniform:  # the natural batch of equal lengths: no mask at all
        variants["padded SDPA, no mask"] = (lambda: _padded_sdpa(*padded, None), padded, grad_padded)
    if device == "cpu":
        variants["per-record SDPA loop"] = (lambda: _loop_sdpa(q, k, v, cu_list), *packed)
    elif case in FLEX_CASES:
        flex, why = _flex_document(lengths, whole)
        variants["flex_attention + document mask"] = flex and (flex, whole, grad_whole)
        notes += [why] if why else []
    if device == "cuda":
        if va._torch_varlen_attn is not None:
            variants["torch varlen_attn"] = (lambda: va._torch_varlen_attn(q, k, v, cu, cu, longest, longest),
                                             *packed)
        if va._flash_attn_varlen_func is not None:
            variants["flash_attn_varlen_func"] = (
                lambda: va._flash_attn_varlen_func(q, k, v, cu, cu, longest, longest), *packed)
    chosen = resolve("varlen_attention", "auto", torch.device(device), dtype, va._limits(q, 0.0, None))
    ours = {"ours (auto)": (lambda: varlen_attention(q, k, v, cu, longest, seqlens_host=lengths), *packed)}
    if chosen != "triton" and device == "cuda":
        ours["ours (triton)"] = (lambda: varlen_attention(q, k, v, cu, longest, backend="triton",
                                                          seqlens_host=lengths), *packed)

    def timed(entry):
        if entry is None:
            return None
        fn, ins, g = entry
        return _with_backward(fn, ins, g) if grad else fn

    flops = _useful_flops(lengths) * (3.5 if grad else 1.0)
    shape = f"{len(lengths)} rec, {sum(lengths)} tok, 8x64 {str(dtype)[6:]}"
    with torch.no_grad() if not grad else torch.enable_grad():
        res = side_by_side(f"attention {case} {mode}", shape,
                           baselines={n: timed(e) for n, e in variants.items()},
                           ours={n: timed(e) for n, e in ours.items()}, flops=flops, rounds=5, warmup=1,
                           device=device, notes=(f"ours (auto) = backend {chosen!r}", *notes))
    ours_s = res.ours["ours (auto)"]
    best = min(s for s in res.baselines.values() if s is not None)
    roof = _ROOF.get(device)
    rate = flops / ours_s / 1e9
    print(f"\n[{device}] {case} {mode}: ours {ours_s * 1e3:.3f} ms, {rate:.1f} GFLOP/s"
          + (f" ({100 * rate / roof:.0f}% of the {roof:.0f} GFLOP/s roof)" if roof else "")
          + f", {best / ours_s:.2f}x the best baseline")
