"""Packed, padding-free multi-head attention over records of different lengths (forward + backward).

A CSFM batch mixes records of 1..13 leads: a 1-lead ECG is 101 tokens ([CLS] + 100 patches),
ECG+PPG 201, a 12-lead record 1201 (+ text tokens). Instead of padding every record to the
longest, the tokens of all records are concatenated ("packed") and attention runs inside each
record only, so a batch costs the sum of its records' attention, not B x the longest.

Shapes (the ``flash_attn_varlen_func`` convention, non-causal, bidirectional):
    q, k, v:     [total_tokens, heads, head_dim], fp32 / fp16 / bf16, same shape, dtype, device
    cu_seqlens:  [B + 1] int32, cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = total_tokens;
                 record i owns tokens cu_seqlens[i] : cu_seqlens[i + 1] (zero-length records allowed)
    max_seqlen:  int >= the longest record, in tokens
    out:         [total_tokens, heads, head_dim], dtype of q
    softmax_scale defaults to 1 / sqrt(head_dim); dropout_p is the probability (0 <= p < 1) of
    zeroing an attention weight, the kept weights scaled by 1 / (1 - p).
    log-sum-exp (Triton path): [heads, total_tokens] fp32, natural log of the scaled scores.

Backends (``backend=``):
    "reference"     per-record loop of ``scaled_dot_product_attention`` in fp32 (half inputs upcast).
    "cpu"           length buckets through PyTorch's CPU flash-attention kernel, forward and backward:
                    short records (< 256 tokens) of equal length are gathered into one [b, heads, L, d]
                    batch, long ones and runs of adjacent equal-length records are strided views of the
                    packed tensors (no copy). With dropout: a bucketed explicit softmax (any device).
    "triton"        FlashAttention-2 style tiled online-softmax kernels over cu_seqlens (GPU, or CPU
                    tensors under TRITON_INTERPRET=1 set before this module is imported).
    "torch_varlen"  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's bundled FlashAttention, CUDA).
    "flash_attn"    ``flash_attn.flash_attn_varlen_func`` when installed (CUDA, fp16/bf16).
    "auto"          CPU tensors: "cpu"; CUDA: "flash_attn" if installed (half dtypes), else "triton",
                    else "torch_varlen", else "reference". Dropout goes to a backend that honours the
                    generator ("cpu" path) with a one-time warning when the pick cannot.

Dropout masks are drawn record by record, in record order, as ``torch.rand((heads, L, L),
generator=generator) < dropout_p`` (``_drop_mask``); the reference and the "cpu" path share that
order, so the same generator seed gives the same output on both.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from csfm_kernels._triton import interpreter_enabled, tl, triton  # triton, tl: None where not installed

try:  # flash-attn is an optional GPU extra, never required.
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_varlen_func = None

try:  # PyTorch's bundled FlashAttention varlen (torch >= 2.9, CUDA only).
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
    _TORCH_VARLEN_HAS_SCALE = "scale" in inspect.signature(_torch_varlen_attn).parameters
except Exception:
    _torch_varlen_attn = None
    _TORCH_VARLEN_HAS_SCALE = False

BACKENDS = ("reference", "cpu", "triton", "torch_varlen", "flash_attn")
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def _drop_mask(heads: int, length: int, p: float, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """Dropped attention weights of one record: bool [heads, L, L], True with probability ``p``."""
    rand_device = generator.device if generator is not None else device
    return (torch.rand((heads, length, length), generator=generator, device=rand_device) < p).to(device)


def _softmax_dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               p: float, dropped: torch.Tensor) -> torch.Tensor:
    """Explicit attention with dropout on the weights: q, k, v [..., L, d] fp32, dropped [..., L, L]."""
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    weights = weights.masked_fill(dropped, 0.0) * (1.0 / (1.0 - p))
    return torch.matmul(weights, v)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int],
                         scale: float, dropout_p: float,
                         generator: torch.Generator | None) -> torch.Tensor:
    """Per-record dense attention in fp32; cu is cu_seqlens as a Python list."""
    outs = []
    for start, end in zip(cu[:-1], cu[1:]):
        if end == start:
            continue
        # [L, h, d] -> [h, L, d], upcast half inputs so the reference accumulates in fp32.
        qi, ki, vi = (x[start:end].transpose(0, 1).float() for x in (q, k, v))
        if dropout_p > 0.0:
            dropped = _drop_mask(q.shape[1], end - start, dropout_p, generator, q.device)
            oi = _softmax_dropout_attention(qi, ki, vi, scale, dropout_p, dropped)
        else:
            oi = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
        outs.append(oi.transpose(0, 1).to(q.dtype))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------------------------------------
# Triton kernels (FlashAttention-2 style; pointer arithmetic + masks only)
# ---------------------------------------------------------------------------------------------

# Triton decides compiled vs interpreted when a kernel is decorated, i.e. when this module is imported.
_INTERPRETED = interpreter_enabled()

if triton is not None:
    @triton.jit
    def _record_span(CU, rec):
        """First packed row (int64) and length (int32) of record ``rec``."""
        start = tl.load(CU + rec).to(tl.int64)
        return start, (tl.load(CU + rec + 1) - tl.load(CU + rec)).to(tl.int32)

    @triton.jit
    def _load_tile(X, rows, stride_t, head, stride_h, offs_d, mask):
        """X[rows, head, offs_d] as a [len(rows), len(offs_d)] tile, 0 outside ``mask``."""
        return tl.load(X + rows[:, None] * stride_t + head * stride_h + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b with fp32 accumulation; IEEE: full-precision fp32 products (no tf32)."""
        if IEEE:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, CU,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_lh, qk_scale_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """One (q-block, record, head): online softmax over the record's key blocks."""
        pid_m = tl.program_id(0)
        rec = tl.program_id(1)
        head = tl.program_id(2)
        start, seqlen = _record_span(CU, rec)
        # Blocks past the record's end skip the loop (stores are masked off) instead of returning.
        kv_end = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen
        d_valid = offs_d < HEAD_DIM
        rows = start + offs_m

        q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, kv_end, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < seqlen
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + (start + cols)[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale_log2
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (start + cols)[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        tl.store(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # log2 -> natural log
        tl.store(LSE + head * stride_lh + rows, lse, mask=m_valid)

    @triton.jit
    def _bwd_preprocess_kernel(O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh,
                               stride_dh, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32, over blocks of packed tokens."""
        pid = tl.program_id(0)
        head = tl.program_id(1)
        rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = _load_tile(O, rows, stride_ot, head, stride_oh, offs_d, mask).to(tl.float32)
        do = _load_tile(DO, rows, stride_dot, head, stride_doh, offs_d, mask).to(tl.float32)
        tl.store(DELTA + head * stride_dh + rows, tl.sum(o * do, 1), mask=rows < total)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                         stride_lh, sm_scale, qk_scale_log2,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """One (k-block, record, head): dK, dV accumulated over the record's q blocks (no atomics)."""
        pid_n = tl.program_id(0)
        rec = tl.program_id(1)
        head = tl.program_id(2)
        start, seqlen = _record_span(CU, rec)
        q_end = tl.where(pid_n * BLOCK_N < seqlen, seqlen, 0)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < seqlen
        d_valid = offs_d < HEAD_DIM
        cols = start + offs_n
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = _load_tile(K, cols, stride_kt, head, stride_kh, offs_d, kv_mask)
        v = _load_tile(V, cols, stride_vt, head, stride_vh, offs_d, kv_mask)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, q_end, BLOCK_M):
            rows_in = start_m + offs_m
            m_valid = rows_in < seqlen
            rows = start + rows_in
            q_mask = m_valid[:, None] & d_valid[None, :]
            q = _load_tile(Q, rows, stride_qt, head, stride_qh, offs_d, q_mask)
            do = _load_tile(DO, rows, stride_dot, head, stride_doh, offs_d, q_mask)
            lse = tl.load(LSE + head * stride_lh + rows, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + head * stride_lh + rows, mask=m_valid, other=0.0)
            # Transposed tiles [BLOCK_N, BLOCK_M] so dV = P^T dO and dK = dS^T Q need no transposes.
            s_t = _dot(k, tl.trans(q), IEEE)
            p_t = tl.exp2(s_t * qk_scale_log2 - lse[None, :] * 1.4426950408889634)
            p_t = tl.where(n_valid[:, None] & m_valid[None, :], p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            dp_t = _dot(v, tl.trans(do), IEEE)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, IEEE)
        dk = dk * sm_scale
        tl.store(DK + cols[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + cols[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_dqt, stride_dqh,
                       stride_lh, sm_scale, qk_scale_log2,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """One (q-block, record, head): dQ accumulated over the record's key blocks (no atomics)."""
        pid_m = tl.program_id(0)
        rec = tl.program_id(1)
        head = tl.program_id(2)
        start, seqlen = _record_span(CU, rec)
        kv_end = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen
        d_valid = offs_d < HEAD_DIM
        rows = start + offs_m
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = _load_tile(Q, rows, stride_qt, head, stride_qh, offs_d, q_mask)
        do = _load_tile(DO, rows, stride_dot, head, stride_doh, offs_d, q_mask)
        lse = tl.load(LSE + head * stride_lh + rows, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + head * stride_lh + rows, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, kv_end, BLOCK_N):
            cols_in = start_n + offs_n
            n_valid = cols_in < seqlen
            cols = start + cols_in
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = _load_tile(K, cols, stride_kt, head, stride_kh, offs_d, kv_mask)
            v = _load_tile(V, cols, stride_vt, head, stride_vh, offs_d, kv_mask)
            s = _dot(q, tl.trans(k), IEEE)
            p = tl.exp2(s * qk_scale_log2 - lse[:, None] * 1.4426950408889634)
            p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        dq = dq * sm_scale
        tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


def _triton_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for one launch; no autotune (see DESIGN.md §5)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _INTERPRETED:
        return 32, 32, block_d, 4
    if dtype in _HALF and block_d <= 64:
        return 64, 64, block_d, 4
    return 32, 32, block_d, 4 if block_d <= 64 else 8


def _row_strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    block_m, block_n, block_d, warps = _triton_config(head_dim, q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(max(max_seqlen, 1), block_m), cu_seqlens.numel() - 1, heads)
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens,
                      *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(out),
                      lse.stride(0), scale * 1.4426950408889634,
                      HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      IEEE=q.dtype == torch.float32, num_warps=warps)
    return out, lse


def _triton_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    block_m, block_n, block_d, warps = _triton_config(head_dim, q.dtype)
    batch = cu_seqlens.numel() - 1
    delta = torch.empty_like(lse)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(max(total, 1), block_t), heads)](
        out, grad_out, delta, total, *_row_strides(out), *_row_strides(grad_out), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=block_d)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  IEEE=q.dtype == torch.float32, num_warps=warps)  # fp32: no tf32 (1e-4 contract)
    _bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen, 1), block_n), batch, heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out),
        *_row_strides(dk), *_row_strides(dv), lse.stride(0), scale, scale * 1.4426950408889634,
        **common)
    _bwd_dq_kernel[(triton.cdiv(max(max_seqlen, 1), block_m), batch, heads)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out),
        *_row_strides(dq), lse.stride(0), scale, scale * 1.4426950408889634,
        **common)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# CPU path: length buckets through PyTorch's CPU flash-attention kernel
# ---------------------------------------------------------------------------------------------

# Records shorter than this are batched per length: one kernel call on a view when they are
# adjacent in the packed tensors, else on an index_select gather. Longer ones run on views, one call
# per run of adjacent records: the gather + scatter copies cost them more than extra calls do.
# Measured on the 2-core CPU, 8 heads x 64, mixed16 forward: gathering the 1201-token records
# instead is ~12 % slower; on 64 x 101 tokens, one call per record is ~20 % slower than one.
_GATHER_BELOW = 256


@dataclass(frozen=True)
class _Bucket:
    """One kernel call: ``count`` records of ``length`` tokens.

    ``start`` >= 0 when their tokens are one contiguous run of the packed tensor (a view gathers
    them), else ``index`` holds the packed token ids, int64 [count * length], in record order.
    ``records`` are the record numbers, ascending.
    """
    length: int
    count: int
    start: int
    index: torch.Tensor | None
    records: tuple[int, ...]


def _length_buckets(cu: list[int], device: torch.device) -> list[_Bucket]:
    """Splits the non-empty records of cu_seqlens (a list) into kernel calls."""
    groups: dict[int, list[int]] = {}
    for rec, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b > a:
            groups.setdefault(b - a, []).append(rec)
    buckets = []
    for length, recs in groups.items():
        runs = [[recs[0]]]  # maximal runs of records adjacent in memory (empty records between are fine)
        for rec in recs[1:]:
            if cu[rec] == cu[runs[-1][-1]] + length:
                runs[-1].append(rec)
            else:
                runs.append([rec])
        if len(runs) == 1 or length >= _GATHER_BELOW:
            buckets += [_Bucket(length, len(run), cu[run[0]], None, tuple(run)) for run in runs]
        else:
            index = (torch.tensor([cu[r] for r in recs], dtype=torch.int64, device=device)[:, None]
                     + torch.arange(length, dtype=torch.int64, device=device)).reshape(-1)
            buckets.append(_Bucket(length, len(recs), -1, index, tuple(recs)))
    return buckets


def _gather(x: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
    """Packed [T, h, d] -> [b, h, L, d] (memory laid out [b, L, h, d]; a view when contiguous)."""
    n = bucket.count * bucket.length
    rows = x.narrow(0, bucket.start, n) if bucket.index is None else x.index_select(0, bucket.index)
    return rows.unflatten(0, (bucket.count, bucket.length)).transpose(1, 2)


def _scatter(dst: torch.Tensor, bucket: _Bucket, src: torch.Tensor) -> None:
    """Writes src [b, h, L, d] into the bucket's rows of packed dst [T, h, d]."""
    rows = src.transpose(1, 2).flatten(0, 1)
    if bucket.index is None:
        dst.narrow(0, bucket.start, rows.shape[0]).copy_(rows)
    else:
        dst.index_copy_(0, bucket.index, rows)


def _covers_all(buckets: list[_Bucket], total: int) -> bool:
    """One contiguous bucket holding every packed token: its result is the packed result."""
    return len(buckets) == 1 and buckets[0].index is None and buckets[0].count * buckets[0].length == total


def _bucketed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list[_Bucket],
                      scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Packed out [T, h, d] and, per bucket, (q_b, k_b, v_b, out_b, lse_b) for the backward.

    Saving the gathered q_b, k_b, v_b (in place of the packed inputs) and out_b spares the
    backward four gathers per bucket; for adjacent records they are views, costing nothing.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    saved = []
    out = None if _covers_all(buckets, q.shape[0]) else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for bucket in buckets:
        qb, kb, vb = _gather(q, bucket), _gather(k, bucket), _gather(v, bucket)
        out_b, lse = flash(qb, kb, vb, 0.0, False, scale=scale)
        if out is None:  # one bucket is the whole batch: its output, re-viewed, is the packed output
            out = out_b.transpose(1, 2).reshape(q.shape)
        else:
            _scatter(out, bucket, out_b)
        saved += [qb, kb, vb, out_b, lse]
    return out, saved


def _bucketed_backward(grad_out: torch.Tensor, saved: Sequence[torch.Tensor], buckets: list[_Bucket],
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv [T, h, d] from the packed grad_out and what _bucketed_forward saved."""
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    shape, dtype = grad_out.shape, saved[0].dtype
    if _covers_all(buckets, shape[0]):
        parts = flash_bwd(_gather(grad_out, buckets[0]), *saved, 0.0, False, scale=scale)
        return tuple(g.transpose(1, 2).reshape(shape) for g in parts)
    grads = [torch.empty(shape, dtype=dtype, device=grad_out.device) for _ in range(3)]
    for i, bucket in enumerate(buckets):
        parts = flash_bwd(_gather(grad_out, bucket), *saved[5 * i: 5 * i + 5], 0.0, False, scale=scale)
        for dst, part in zip(grads, parts):
            _scatter(dst, bucket, part)
    return tuple(grads)


def _bucketed_dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                buckets: list[_Bucket], scale: float, p: float,
                                generator: torch.Generator | None) -> torch.Tensor:
    """Dropout path (autograd through plain ops, any device); masks drawn in record order."""
    heads = q.shape[1]
    dropped = [torch.empty((bucket.count, heads, bucket.length, bucket.length), dtype=torch.bool,
                           device=q.device) for bucket in buckets]
    slot = {rec: (i, j) for i, bucket in enumerate(buckets) for j, rec in enumerate(bucket.records)}
    for rec in sorted(slot):  # record order: the reference draws its masks in the same order
        i, j = slot[rec]
        dropped[i][j] = _drop_mask(heads, buckets[i].length, p, generator, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for bucket, drop in zip(buckets, dropped):
        qb, kb, vb = (_gather(x, bucket).float() for x in (q, k, v))
        out_b = _softmax_dropout_attention(qb, kb, vb, scale, p, drop)
        _scatter(out, bucket, out_b.to(q.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------------

class _BucketedAttention(torch.autograd.Function):
    """CPU length-bucket path: saves each bucket's q, k, v, output and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, buckets, scale):
        out, saved = _bucketed_forward(q, k, v, buckets, scale)
        ctx.save_for_backward(*saved)
        ctx.buckets = buckets
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = _bucketed_backward(grad_out, ctx.saved_tensors, ctx.buckets, ctx.scale)
        return dq, dk, dv, None, None


class _TritonAttention(torch.autograd.Function):
    """Triton path: saves q, k, v, out and the fp32 log-sum-exp [heads, total]; backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse = _triton_forward(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _triton_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens,
                                      ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------
# Dispatch and public API
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)  # the caller of varlen_attention


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int, dropout_p: float) -> list[int]:
    """Checks the arguments; returns cu_seqlens as a Python list (one host read on GPU)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim], got {shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be an int32 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    drops = [i for i in range(len(cu) - 1) if cu[i + 1] < cu[i]]
    if drops:
        i = drops[0]
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens[-1] = {cu[-1]} must equal total_tokens = q.shape[0] = {q.shape[0]}")
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    if int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({longest})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return cu


def _pick_backend(q: torch.Tensor, backend: str, dropout_p: float,
                  generator: torch.Generator | None) -> str:
    """Resolves "auto", then reroutes dropout away from backends that cannot honour it."""
    if backend == "auto":
        if not q.is_cuda:
            backend = "cpu"
        elif _flash_attn_varlen_func is not None and q.dtype in _HALF:
            backend = "flash_attn"
        elif triton is not None:
            backend = "triton"
        elif _torch_varlen_attn is not None and q.dtype in _HALF:
            backend = "torch_varlen"
        else:
            backend = "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    no_dropout = backend in ("triton", "torch_varlen") or (backend == "flash_attn" and generator is not None)
    if dropout_p > 0.0 and no_dropout:
        _warn_once(f"varlen_attention: backend {backend!r} cannot apply dropout with a seeded generator; "
                   "using the length-bucketed 'cpu' path (explicit softmax) for dropout")
        backend = "cpu"
    return backend


def _check_backend(backend: str, q: torch.Tensor, dropout_p: float) -> None:
    """Availability, device, dtype and head_dim limits of the chosen backend."""
    head_dim = q.shape[-1]
    if backend == "cpu" and dropout_p == 0.0 and q.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors without dropout, got q on {q.device}")
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' needs the triton package")
        if not q.is_cuda and not _INTERPRETED:
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "csfm_kernels is imported")
        if head_dim > 128:
            raise ValueError(f"head_dim = {head_dim} is unsupported by backend='triton' (at most 128)")
        if q.dtype not in (torch.float32, *_HALF):
            raise ValueError(f"backend='triton' supports fp32/fp16/bf16, got {q.dtype}")
    if backend in ("torch_varlen", "flash_attn"):
        if backend == "torch_varlen" and _torch_varlen_attn is None:
            raise ValueError("backend='torch_varlen' needs torch.nn.attention.varlen (torch >= 2.9)")
        if backend == "flash_attn" and _flash_attn_varlen_func is None:
            raise ValueError("backend='flash_attn' needs the flash-attn package")
        if not q.is_cuda:
            raise ValueError(f"backend={backend!r} needs CUDA tensors, got q on {q.device}")
        if q.dtype not in _HALF:
            raise ValueError(f"backend={backend!r} supports fp16/bf16 only, got {q.dtype}")
        if head_dim % 8 != 0 or head_dim > 256:
            raise ValueError(f"head_dim = {head_dim} is unsupported by backend={backend!r} "
                             "(a multiple of 8, at most 256)")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, softmax_scale: float | None = None, dropout_p: float = 0.0,
                     generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """Bidirectional attention inside each packed record.

    q, k, v: [total_tokens, heads, head_dim]; cu_seqlens: int32 [B + 1] record boundaries;
    max_seqlen: the longest record in tokens. Returns out [total_tokens, heads, head_dim] in q's
    dtype. See the module docstring for backends, dropout and the validation rules.
    """
    cu = _validate(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = _pick_backend(q, backend, dropout_p, generator)
    _check_backend(backend, q, dropout_p)

    if backend == "reference":
        return _reference_attention(q, k, v, cu, scale, dropout_p, generator)
    if backend == "cpu":
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        buckets = _length_buckets(cu, q.device)
        if not buckets:  # no tokens at all: an empty output
            return q.clone()
        if dropout_p > 0.0:
            return _bucketed_dropout_attention(q, k, v, buckets, scale, dropout_p, generator)
        return _BucketedAttention.apply(q, k, v, buckets, scale)
    cu_seqlens = cu_seqlens.to(q.device).contiguous()  # the GPU kernels read it on the device
    if backend == "triton":
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return _TritonAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)
    if backend == "torch_varlen":
        if not _TORCH_VARLEN_HAS_SCALE:  # older varlen_attn: fold the scale into q (default 1/sqrt(d))
            q = q * (scale * math.sqrt(q.shape[-1]))
            return _torch_varlen_attn(q, k, v, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen))
        return _torch_varlen_attn(q, k, v, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen),
                                  scale=scale)
    return _flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen),
                                   dropout_p=dropout_p, softmax_scale=scale, causal=False)


def pack(padded: torch.Tensor, lengths: torch.Tensor | Sequence[int]
         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded [B, N, ...] + per-record lengths [B] -> (packed [sum L, ...], cu_seqlens, max_seqlen).

    cu_seqlens is int32 [B + 1] on padded's device; max_seqlen an int. Records keep their order;
    tokens past each length are dropped. Differentiable in ``padded``.
    """
    if padded.dim() < 2:
        raise ValueError(f"padded must be [B, N, ...], got shape {tuple(padded.shape)}")
    lens = torch.as_tensor(lengths, dtype=torch.int64).cpu().reshape(-1)
    if lens.numel() != padded.shape[0]:
        raise ValueError(f"lengths has {lens.numel()} entries for a batch of {padded.shape[0]}")
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > padded.shape[1]):
        raise ValueError(f"lengths must lie in [0, {padded.shape[1]}], got {lens.tolist()}")
    cu_seqlens = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lens, 0)
    keep = torch.arange(padded.shape[1])[None, :] < lens[:, None]
    packed = padded[keep.to(padded.device)]
    max_seqlen = int(lens.max()) if lens.numel() else 0
    return packed, cu_seqlens.to(padded.device), max_seqlen


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """packed [sum L, ...] -> padded [B, max_seqlen, ...], zeros beyond each record's length.

    Differentiable in ``packed``.
    """
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[-1]) != packed.shape[0]:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] ending at packed.shape[0] = {packed.shape[0]}")
    lens = cu[1:] - cu[:-1]
    if lens.numel() and int(lens.max()) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence "
                         f"({int(lens.max())})")
    keep = (torch.arange(max_seqlen)[None, :] < lens[:, None]).to(packed.device)
    padded = packed.new_zeros((lens.numel(), max_seqlen, *packed.shape[1:]))
    padded[keep] = packed
    return padded
