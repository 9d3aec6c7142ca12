"""Packed, padding-free multi-head attention over records of different lengths (forward + backward).

A CSFM batch mixes records of 1..13 leads: a 1-lead ECG is 101 tokens ([CLS] + 100 patches),
ECG+PPG 201, a 12-lead record 1201 (+ text tokens). Instead of padding every record to the
longest, the tokens of all records are concatenated ("packed") and attention runs inside each
record only, so a batch costs the sum of its records' attention, not B x the longest.

Shapes (the ``flash_attn_varlen_func`` convention, non-causal, bidirectional):
    q, k, v:     [total_tokens, heads, head_dim], same shape, dtype and device (dtypes per backend:
                 csfm_kernels._dispatch.TABLE)
    cu_seqlens:  [B + 1] int32, cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = total_tokens;
                 record i owns tokens cu_seqlens[i] : cu_seqlens[i + 1] (zero-length records allowed)
    max_seqlen:  int >= the longest record, in tokens
    out:         [total_tokens, heads, head_dim], dtype of q
    softmax_scale defaults to 1 / sqrt(head_dim); dropout_p is the probability (0 <= p < 1) of
    zeroing an attention weight, the kept weights scaled by 1 / (1 - p).
    log-sum-exp (Triton path): [heads, total_tokens] fp32, natural log of the scaled scores.

Backends (``backend=``):
    "reference"     per-record loop of ``scaled_dot_product_attention`` in fp32 (half inputs upcast;
                    fp64 stays fp64).
    "cpu"           length buckets through PyTorch's CPU flash-attention kernel, forward and backward:
                    short records (< 256 tokens) of equal length are gathered into one [b, heads, L, d]
                    batch, long ones and runs of adjacent equal-length records are strided views of the
                    packed tensors (no copy). With dropout: a bucketed explicit softmax (any device).
    "triton"        FlashAttention-2 style tiled online-softmax kernels over cu_seqlens (GPU, or CPU
                    tensors under TRITON_INTERPRET=1 set before this module is imported).
    "torch_varlen"  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's bundled FlashAttention, CUDA).
    "flash_attn"    ``flash_attn.flash_attn_varlen_func`` when installed (CUDA, fp16/bf16).
    "auto"          CPU tensors: "cpu"; CUDA: "flash_attn" if installed (half dtypes), else "triton",
                    else "torch_varlen", else "reference"; with dropout the first that can apply it
                    (the "cpu" path where a generator is given). The one table is
                    ``csfm_kernels._dispatch.AUTO``; a backend named explicitly that cannot run the
                    call (device, dtype, head_dim, dropout) raises ``BackendUnavailable``.

``seqlens_host`` (the record lengths as host ints, which a packed batch knows) lets a CUDA call
run without reading cu_seqlens back: no host sync, so it can be captured in a CUDA graph.

Dropout masks are drawn record by record, in record order, as ``torch.rand((heads, L, L),
generator=generator) < dropout_p`` (``_drop_mask``); the reference and the "cpu" path share that
order, so the same generator seed gives the same output on both.
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from csfm_kernels import _dispatch
from csfm_kernels._checks import check_values
from csfm_kernels.segments import cu_seqlens_from_lengths, host_to_device
from csfm_kernels._triton import device_arch, interpreter_enabled, tl, triton  # triton, tl: None where not installed

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

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference math runs in: fp32 for fp32 and half inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


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
        # [L, h, d] -> [h, L, d], half inputs upcast so the reference accumulates in fp32.
        qi, ki, vi = (x[start:end].transpose(0, 1).to(_compute_dtype(q.dtype)) for x in (q, k, v))
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


@dataclass(frozen=True)
class _Tiles:
    """One attention kernel's launch: BLOCK_M q rows x BLOCK_N k/v rows, warps, pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_args(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# (architecture family, half precision, BLOCK_D) -> tiles of the forward, dK/dV and dQ kernels;
# no autotune (the interpreter cannot run it). Checked on every commit by tests/kernels/test_compile.py
# (no spills; wgmma on sm_90 and tcgen05 on sm_100, which need >= 64 rows per warpgroup MMA: the
# forward and dQ tile rows are q rows, the dK/dV tile rows k rows, so those are the >= 64 sides).
# fp32 runs IEEE products on CUDA cores (the 1e-4 contract rules out tf32): small tiles, no spills.
_ATTENTION_TILES: dict[tuple[str, bool, int], tuple[_Tiles, _Tiles, _Tiles]] = {
    # Half precision. dK/dV: 64 k rows per program, 32 q rows per step (FlashAttention-2's Triton
    # backward shape); 8 warps at head dim 128, where dK and dV are two 64 x 128 fp32 accumulators.
    ("sm80", True, 32): (_Tiles(64, 64, 4, 3), _Tiles(32, 64, 4, 3), _Tiles(64, 32, 4, 3)),
    ("sm80", True, 64): (_Tiles(64, 64, 4, 3), _Tiles(32, 64, 4, 3), _Tiles(64, 32, 4, 3)),
    ("sm80", True, 128): (_Tiles(64, 64, 8, 2), _Tiles(32, 64, 8, 2), _Tiles(64, 32, 8, 2)),
    ("sm90", True, 32): (_Tiles(64, 64, 4, 3), _Tiles(32, 64, 4, 3), _Tiles(64, 32, 4, 3)),
    ("sm90", True, 64): (_Tiles(64, 64, 4, 3), _Tiles(32, 64, 4, 3), _Tiles(64, 32, 4, 3)),
    ("sm90", True, 128): (_Tiles(64, 64, 4, 2), _Tiles(32, 64, 8, 2), _Tiles(64, 32, 4, 2)),
    ("sm100", True, 32): (_Tiles(64, 64, 4, 3), _Tiles(32, 64, 4, 3), _Tiles(64, 32, 4, 3)),
    ("sm100", True, 64): (_Tiles(64, 64, 4, 3), _Tiles(32, 64, 4, 3), _Tiles(64, 32, 4, 3)),
    ("sm100", True, 128): (_Tiles(64, 64, 8, 2), _Tiles(32, 64, 8, 2), _Tiles(64, 32, 4, 2)),
    # fp32: the dK/dV kernel keeps two fp32 accumulators and its CUDA-core products hold whole
    # operand rows per thread, so 16 q rows a step and 8 warps; the same tiles on every architecture.
    **{(family, False, block_d): (_Tiles(32, 32, 4, 2), _Tiles(16, 32, 8, 2), _Tiles(32, 32, 4, 2))
       for family in ("sm80", "sm90", "sm100") for block_d in (32, 64)},
    **{(family, False, 128): (_Tiles(32, 32, 8, 2), _Tiles(16, 32, 8, 2), _Tiles(32, 32, 8, 3))
       for family in ("sm80", "sm90", "sm100")},
    # Interpreter: small tiles keep interpreted grids cheap; q and k blocks differ, as on devices.
    ("interpreter", False, 0): (_Tiles(32, 16, 4, 1), _Tiles(16, 32, 4, 1), _Tiles(32, 16, 4, 1)),
}


def _arch_family(arch: int | None) -> str:
    """"sm90" (wgmma), "sm100" (tcgen05: sm_100..sm_11x), "sm80" (mma.sync: Ampere, Ada, sm_120),
    or "interpreter" (arch None: small tiles keep interpreted grids cheap)."""
    if arch is None:
        return "interpreter"
    if 90 <= arch < 100:
        return "sm90"
    if 100 <= arch < 120:
        return "sm100"
    return "sm80"


@dataclass(frozen=True)
class _AttentionConfig:
    """Launch configuration of the attention kernels for one head dim, dtype and architecture."""
    block_d: int
    forward: _Tiles
    dkdv: _Tiles
    dq: _Tiles


def _triton_config(head_dim: int, dtype: torch.dtype, arch: int | None) -> _AttentionConfig:
    """Tiles for ``head_dim`` (<= 128) and ``dtype`` on compute capability ``arch`` (80, 90, 100, ...;
    None under the interpreter)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    family = _arch_family(arch)
    key = (family, dtype in _HALF, max(32, block_d)) if family != "interpreter" else (family, False, 0)
    return _AttentionConfig(block_d, *_ATTENTION_TILES[key])


def _row_strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    max_seqlen: int, scale: float, arch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, h, d] in q's dtype and the fp32 log-sum-exp [h, T]. ``arch`` (compute capability,
    e.g. 90) picks that architecture's tiles instead of the tensors' device's: the compile report,
    and tests of a device's tiles under the interpreter."""
    total, heads, head_dim = q.shape
    config = _triton_config(head_dim, q.dtype, arch if arch is not None else device_arch(q.device))
    tiles = config.forward
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(max(max_seqlen, 1), tiles.block_m), cu_seqlens.numel() - 1, heads)
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens,
                      *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(out),
                      lse.stride(0), scale * 1.4426950408889634,
                      HEAD_DIM=head_dim, BLOCK_D=config.block_d, IEEE=q.dtype == torch.float32,
                      **tiles.launch_args())
    return out, lse


def _triton_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, arch: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv [T, h, d] in q's dtype; ``arch`` as in ``_triton_forward``."""
    total, heads, head_dim = q.shape
    config = _triton_config(head_dim, q.dtype, arch if arch is not None else device_arch(q.device))
    batch = cu_seqlens.numel() - 1
    delta = torch.empty_like(lse)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(max(total, 1), block_t), heads)](
        out, grad_out, delta, total, *_row_strides(out), *_row_strides(grad_out), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=config.block_d, num_warps=4)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=config.block_d,
                  IEEE=q.dtype == torch.float32)  # fp32: no tf32 (1e-4 contract)
    _bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen, 1), config.dkdv.block_n), batch, heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out),
        *_row_strides(dk), *_row_strides(dv), lse.stride(0), scale, scale * 1.4426950408889634,
        **common, **config.dkdv.launch_args())
    _bwd_dq_kernel[(triton.cdiv(max(max_seqlen, 1), config.dq.block_m), batch, heads)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out),
        *_row_strides(dq), lse.stride(0), scale, scale * 1.4426950408889634,
        **common, **config.dq.launch_args())
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
            index = (host_to_device([cu[r] for r in recs], device)[:, None]
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
        qb, kb, vb = (_gather(x, bucket).to(_compute_dtype(q.dtype)) for x in (q, k, v))
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

BACKENDS = _dispatch.backends_of("varlen_attention")


def _check_offsets(cu: list[int], total: int, max_seqlen: int, where: str) -> None:
    """Host offsets [B + 1]: start 0, non-decreasing, end at total, within max_seqlen. ``where``
    says where they came from, for the message."""
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens{where} must start at 0, got {cu[0]}")
    drops = [i for i in range(len(cu) - 1) if cu[i + 1] < cu[i]]
    if drops:
        i = drops[0]
        raise ValueError(f"cu_seqlens{where} must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens{where}[-1] = {cu[-1]} must equal total_tokens = q.shape[0] = {total}")
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    if int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({longest})")


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int, dropout_p: float, seqlens_host: Sequence[int] | None) -> list[int] | None:
    """Checks the arguments. Returns cu_seqlens as host ints where they are known without a
    device read (from ``seqlens_host``, or a CPU cu_seqlens), else None: a CUDA cu_seqlens is
    then checked on the device (a failure is a device-side assert)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim], got {shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got dtype {q.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    _dispatch.check_same_dtype("varlen_attention", "q", q, {"k": k, "v": v})
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be an int32 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    total = q.shape[0]
    if seqlens_host is not None:
        lengths = [int(n) for n in seqlens_host]
        if len(lengths) != cu_seqlens.numel() - 1:
            raise ValueError(f"seqlens_host has {len(lengths)} lengths for the {cu_seqlens.numel() - 1} "
                             "records of cu_seqlens")
        cu = list(itertools.accumulate(lengths, initial=0))
        _check_offsets(cu, total, max_seqlen, " (the running sum of seqlens_host)")
        check_values((cu_seqlens == cu_seqlens_from_lengths(lengths, cu_seqlens.device)).all(),
                     "cu_seqlens must equal the running sum of seqlens_host",
                     lambda: f": cu_seqlens {cu_seqlens.tolist()}, seqlens_host {lengths}")
        return cu
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.tolist()
        _check_offsets(cu, total, max_seqlen, "")
        return cu
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    check_values(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
    check_values((lengths >= 0).all(), "cu_seqlens must be non-decreasing")
    check_values(cu_seqlens[-1] == total, f"cu_seqlens[-1] must equal total_tokens = q.shape[0] = {total}")
    check_values((lengths <= int(max_seqlen)).all(), f"max_seqlen = {max_seqlen} is smaller than the longest sequence")
    return None


def _limits(q: torch.Tensor, dropout_p: float, generator: torch.Generator | None) -> dict[str, str]:
    """Why some backends cannot run this call (the dispatcher adds device, dtype and build checks)."""
    head_dim = q.shape[-1]
    limits: dict[str, str] = {}
    if _torch_varlen_attn is None:
        limits.setdefault("torch_varlen", "torch.nn.attention.varlen is missing (torch >= 2.9)")
    if _flash_attn_varlen_func is None:
        limits.setdefault("flash_attn", "the flash-attn package is not installed (pip install -e '.[gpu]')")
    if dropout_p > 0.0:
        for name in ("triton", "torch_varlen"):
            limits.setdefault(name, f"it has no attention dropout (dropout_p = {dropout_p}); use 'auto' or 'cpu'")
        if generator is not None:
            limits.setdefault("flash_attn", "its dropout cannot draw from a torch.Generator")
    elif q.device.type != "cpu":
        limits.setdefault("cpu", "without dropout it needs CPU tensors (with dropout it runs on any "
                                 "device, as an explicit softmax)")
    if head_dim > 128:
        limits.setdefault("triton", f"head_dim = {head_dim} is above its limit of 128")
    if head_dim % 8 != 0 or head_dim > 256:
        for name in ("torch_varlen", "flash_attn"):
            limits.setdefault(name, f"head_dim = {head_dim} must be a multiple of 8, at most 256")
    return limits


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, softmax_scale: float | None = None, dropout_p: float = 0.0,
                     generator: torch.Generator | None = None, backend: str = "auto",
                     seqlens_host: Sequence[int] | None = None) -> torch.Tensor:
    """Bidirectional attention inside each packed record.

    q, k, v: [total_tokens, heads, head_dim], one dtype; cu_seqlens: int32 [B + 1] record
    boundaries; max_seqlen: the longest record in tokens. Returns out [total_tokens, heads,
    head_dim] in q's dtype. backend: one of BACKENDS, "auto" as csfm_kernels._dispatch.AUTO says.
    seqlens_host: the B record lengths as host ints where the caller knows them (a packed batch
    does): then nothing is read back from the device (no host sync on CUDA, so the call can be
    captured in a CUDA graph). Without it a CUDA cu_seqlens is checked on the device, and only
    the "reference" and "cpu" backends read it back. See the module docstring for dropout.
    """
    cu = _validate(q, k, v, cu_seqlens, max_seqlen, dropout_p, seqlens_host)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = _dispatch.resolve("varlen_attention", backend, q.device, q.dtype, _limits(q, dropout_p, generator))
    if backend in ("reference", "cpu") and cu is None:
        cu = cu_seqlens.tolist()  # the one device read of these two backends; seqlens_host spares it

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
    cu_seqlens = cu_seqlens.to(q.device, non_blocking=True).contiguous()  # the GPU kernels read it there
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
