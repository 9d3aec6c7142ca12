"""Fused patch embedding: LayerNorm(patch) -> Linear -> LayerNorm + channel-type + position embedding.

Signals arrive as ``x: [B, C, L]`` (samples at 250 Hz, L a multiple of the 25-sample patch)
with ``channel_ids: [B, C]`` (0..11 = I..V6, 12 = PPG). Channel c's patches become tokens
``c*L/25 .. (c+1)*L/25 - 1`` of its record, so the output is ``[B, C*L/25, d]``. The packed
form takes records with different lead counts and returns ``[sum_i C_i*L_i/25, d]`` plus
``cu_seqlens``. Every backend works on the flat token form: ``patches [T, 25]``, the
channel-type row and the position row of each token.

Sections: reference, Triton kernel, CPU kernel, autograd.Function, dispatch.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from csfm_kernels import _dispatch, _ext
from csfm_kernels._checks import check_channel_ids, check_float_tensor, check_index_range, check_index_tensor
from csfm_kernels.segments import cu_seqlens_from_lengths, host_segment_positions
from csfm_kernels._triton import column_block, default_max_programs, device_arch, next_pow2, split_grid, tl, triton

PATCH_LEN = 25  # samples per patch (0.1 s at 250 Hz)


class PatchEmbedParams(NamedTuple):
    """The weights of the patch embedding (reference names in brackets), d = model width.

    ln_patch_weight/bias [25] (``ts_to_patch_embedding.1``), weight [d, 25] and bias [d]
    (``.2``), ln_embed_weight/bias [d] (``.3``), channel_type [13, d] or [1, 13, d]
    (``ts_channel_type_embedding``), position [P, d] or [1, P, d] (``ts_pos_embedding``,
    P = patches per channel the table covers), eps of both LayerNorms.
    """

    ln_patch_weight: torch.Tensor
    ln_patch_bias: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    ln_embed_weight: torch.Tensor
    ln_embed_bias: torch.Tensor
    channel_type: torch.Tensor
    position: torch.Tensor
    eps: float = 1e-5

    def flat(self) -> tuple[torch.Tensor, ...]:
        """The eight tensors with both embedding tables as 2-D ``[rows, d]``."""
        return (self.ln_patch_weight, self.ln_patch_bias, self.weight, self.bias,
                self.ln_embed_weight, self.ln_embed_bias,
                self.channel_type.reshape(-1, self.channel_type.shape[-1]),
                self.position.reshape(-1, self.position.shape[-1]))


# ----------------------------------------------------------------------------- reference

def patch_embed_tokens_reference(patches: torch.Tensor, token_chan: torch.Tensor,
                                 token_pos: torch.Tensor, params: PatchEmbedParams) -> torch.Tensor:
    """Plain torch, in the reference model's module order. patches [T, 25] -> [T, d]."""
    ln_p_w, ln_p_b, weight, bias, ln_d_w, ln_d_b, chan_emb, pos_emb = params.flat()
    h = F.layer_norm(patches, (patches.shape[-1],), ln_p_w, ln_p_b, params.eps)
    h = F.linear(h, weight, bias)
    h = F.layer_norm(h, (h.shape[-1],), ln_d_w, ln_d_b, params.eps)
    return h + chan_emb[token_chan] + pos_emb[token_pos]


# ----------------------------------------------------------------------------- Triton kernel
#
# Token blocks of BLOCK_T rows; the d output columns in chunks of BLOCK_D (``column_block``: no
# padded columns at the model widths, e.g. 768 = 12 x 64), so no [BLOCK_T, d] tile is ever live.
# LayerNorm_D needs whole-row statistics: they are combined chunk by chunk (Chan et al.'s pairwise
# mean / squared-deviation update) and y = h @ W^T + b is recomputed per pass (K = 25: cheap).
# Backward, two kernels: "rows" (one pass over the chunks per token block: dx, LayerNorm_P grads and
# the per-row sums LayerNorm_D's backward needs) and "cols" (a grid over token programs x column
# chunks: the column reductions dW, db, LayerNorm_D grads and the embedding-table grads).

if triton is not None:

    @triton.jit
    def _pe_patch_norm(x_ptr, lnp_w_ptr, lnp_b_ptr, offs_t, tmask, offs_p, pmask, P, eps):
        """LayerNorm over the P samples of each token: (xhat, rstd_p, h = xhat * w + b), fp32
        [BLOCK_T, BLOCK_P] with padded columns 0 (padded token rows of h equal ln_p_b: harmless,
        they are never stored and their incoming gradient is 0)."""
        x = tl.load(x_ptr + offs_t[:, None] * P + offs_p[None, :], mask=tmask[:, None] & pmask[None, :],
                    other=0.0).to(tl.float32)
        mean_p = tl.sum(x, axis=1) / P
        xc = tl.where(pmask[None, :], x - mean_p[:, None], 0.0)
        rstd_p = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / P + eps)
        xhat = xc * rstd_p[:, None]
        lnp_w = tl.load(lnp_w_ptr + offs_p, mask=pmask, other=0.0).to(tl.float32)
        lnp_b = tl.load(lnp_b_ptr + offs_p, mask=pmask, other=0.0).to(tl.float32)
        return xhat, rstd_p, xhat * lnp_w[None, :] + lnp_b[None, :]

    @triton.jit
    def _pe_weight_chunk(w_ptr, b_ptr, cols, cmask, offs_p, pmask, P):
        """W[cols]^T [BLOCK_P, BLOCK_D] and bias[cols] [BLOCK_D] in fp32, 0 where padded."""
        wT = tl.load(w_ptr + cols[None, :] * P + offs_p[:, None], mask=pmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        return wT, tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)

    @triton.jit
    def _pe_project(h, wT, bias):
        """y = h @ W^T + b for one column chunk ("ieee": fp32 products, no TF32); padded columns 0."""
        return tl.dot(h, wT, input_precision="ieee") + bias[None, :]

    @triton.jit
    def _pe_row_stats(h, w_ptr, b_ptr, offs_p, pmask, P, D, eps,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Mean and 1 / std over the D columns of each row of y = h @ W^T + b, [BLOCK_T] each:
        per chunk its mean and squared deviations, merged into the running ones (Chan's update)."""
        offs_d = tl.arange(0, BLOCK_D)
        mean = tl.zeros([BLOCK_T], tl.float32)
        m2 = tl.zeros([BLOCK_T], tl.float32)
        for c in range(0, D, BLOCK_D):
            cols = c + offs_d
            cmask = cols < D
            wT, bias = _pe_weight_chunk(w_ptr, b_ptr, cols, cmask, offs_p, pmask, P)
            y = _pe_project(h, wT, bias)
            n_c = tl.minimum(D - c, BLOCK_D) * 1.0  # as fp32 (c is a plain int when interpreted)
            mean_c = tl.sum(y, axis=1) / n_c
            dev = tl.where(cmask[None, :], y - mean_c[:, None], 0.0)
            seen = c * 1.0
            delta = mean_c - mean
            mean += delta * (n_c / (seen + n_c))
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * (seen * n_c / (seen + n_c))
        return mean, 1.0 / tl.sqrt(m2 / D + eps)

    @triton.jit
    def _pe_fwd_kernel(x_ptr, chan_ptr, pos_ptr, lnp_w_ptr, lnp_b_ptr, w_ptr, b_ptr, lnd_w_ptr, lnd_b_ptr,
                       cemb_ptr, pemb_ptr, out_ptr, T, P, D, eps,
                       BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """One block of BLOCK_T tokens: row statistics over the chunks, then each chunk's output."""
        pid = tl.program_id(0)
        offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        tmask = offs_t < T
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        offs_d = tl.arange(0, BLOCK_D)

        _, _, h = _pe_patch_norm(x_ptr, lnp_w_ptr, lnp_b_ptr, offs_t, tmask, offs_p, pmask, P, eps)
        mean, rstd = _pe_row_stats(h, w_ptr, b_ptr, offs_p, pmask, P, D, eps, BLOCK_T, BLOCK_D)
        chan = tl.load(chan_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
        for c in range(0, D, BLOCK_D):
            cols = c + offs_d
            cmask = cols < D
            md = tmask[:, None] & cmask[None, :]
            wT, bias = _pe_weight_chunk(w_ptr, b_ptr, cols, cmask, offs_p, pmask, P)
            zhat = (_pe_project(h, wT, bias) - mean[:, None]) * rstd[:, None]
            lnd_w = tl.load(lnd_w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            lnd_b = tl.load(lnd_b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            ce = tl.load(cemb_ptr + chan[:, None] * D + cols[None, :], mask=md, other=0.0).to(tl.float32)
            pe = tl.load(pemb_ptr + pos[:, None] * D + cols[None, :], mask=md, other=0.0).to(tl.float32)
            out = zhat * lnd_w[None, :] + lnd_b[None, :] + ce + pe
            tl.store(out_ptr + offs_t[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=md)

    @triton.jit
    def _pe_bwd_rows_kernel(go_ptr, x_ptr, lnp_w_ptr, lnp_b_ptr, w_ptr, b_ptr, lnd_w_ptr,
                            gx_ptr, stats_ptr, part_p_ptr, T, P, D, eps, blocks_per_prog,
                            BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """Each program: ``blocks_per_prog`` consecutive token blocks. Per row, with dzhat = dz * ln_d_w,
        m1 = mean(dzhat) and m2 = mean(dzhat * zhat) over d: dy = rstd * (dzhat - m1 - zhat * m2), so
        dh = dy @ W = rstd * (dzhat @ W - m1 * colsum(W) - m2 * (zhat @ W)), all sums over the chunks.
        Writes dx, stats [4, T] (mean, rstd, m1, m2 of each row, for the cols kernel) and
        part_p [n_prog, 2, P] (the program's dL/dln_p_w, dL/dln_p_b)."""
        pid = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        offs_d = tl.arange(0, BLOCK_D)
        lnp_w = tl.load(lnp_w_ptr + offs_p, mask=pmask, other=0.0).to(tl.float32)
        colsum = tl.zeros([BLOCK_P], tl.float32)
        for c in range(0, D, BLOCK_D):
            cols = c + offs_d
            wT, _ = _pe_weight_chunk(w_ptr, b_ptr, cols, cols < D, offs_p, pmask, P)
            colsum += tl.sum(wT, axis=1)
        acc_lnp_w = tl.zeros([BLOCK_P], tl.float32)
        acc_lnp_b = tl.zeros([BLOCK_P], tl.float32)
        for i in range(0, blocks_per_prog):
            offs_t = (pid.to(tl.int64) * blocks_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
            tmask = offs_t < T
            xhat, rstd_p, h = _pe_patch_norm(x_ptr, lnp_w_ptr, lnp_b_ptr, offs_t, tmask, offs_p, pmask, P, eps)
            mean, rstd = _pe_row_stats(h, w_ptr, b_ptr, offs_p, pmask, P, D, eps, BLOCK_T, BLOCK_D)
            m1 = tl.zeros([BLOCK_T], tl.float32)
            m2 = tl.zeros([BLOCK_T], tl.float32)
            g = tl.zeros([BLOCK_T, BLOCK_P], tl.float32)  # dzhat @ W
            u = tl.zeros([BLOCK_T, BLOCK_P], tl.float32)  # zhat @ W
            for c in range(0, D, BLOCK_D):
                cols = c + offs_d
                cmask = cols < D
                md = tmask[:, None] & cmask[None, :]
                wT, bias = _pe_weight_chunk(w_ptr, b_ptr, cols, cmask, offs_p, pmask, P)
                zhat = tl.where(cmask[None, :], (_pe_project(h, wT, bias) - mean[:, None]) * rstd[:, None], 0.0)
                dz = tl.load(go_ptr + offs_t[:, None] * D + cols[None, :], mask=md, other=0.0).to(tl.float32)
                dzhat = dz * tl.load(lnd_w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                m1 += tl.sum(dzhat, axis=1)
                m2 += tl.sum(dzhat * zhat, axis=1)
                w = tl.trans(wT)
                g = tl.dot(dzhat, w, g, input_precision="ieee")
                u = tl.dot(zhat, w, u, input_precision="ieee")
            m1 = m1 / D
            m2 = m2 / D
            dh = rstd[:, None] * (g - m1[:, None] * colsum[None, :] - m2[:, None] * u)
            acc_lnp_w += tl.sum(dh * xhat, axis=0)
            acc_lnp_b += tl.sum(dh, axis=0)
            dxhat = dh * lnp_w[None, :]
            q1 = tl.sum(dxhat, axis=1) / P
            q2 = tl.sum(dxhat * xhat, axis=1) / P
            dx = rstd_p[:, None] * (dxhat - q1[:, None] - xhat * q2[:, None])
            tl.store(gx_ptr + offs_t[:, None] * P + offs_p[None, :], dx.to(gx_ptr.dtype.element_ty),
                     mask=tmask[:, None] & pmask[None, :])
            tl.store(stats_ptr + offs_t, mean, mask=tmask)
            tl.store(stats_ptr + T + offs_t, rstd, mask=tmask)
            tl.store(stats_ptr + 2 * T + offs_t, m1, mask=tmask)
            tl.store(stats_ptr + 3 * T + offs_t, m2, mask=tmask)
        base_p = part_p_ptr + pid.to(tl.int64) * 2 * P
        tl.store(base_p + offs_p, acc_lnp_w, mask=pmask)
        tl.store(base_p + P + offs_p, acc_lnp_b, mask=pmask)

    @triton.jit
    def _pe_bwd_cols_kernel(go_ptr, x_ptr, chan_ptr, pos_ptr, lnp_w_ptr, lnp_b_ptr, w_ptr, b_ptr, lnd_w_ptr,
                            stats_ptr, gcemb_ptr, gpemb_ptr, part_w_ptr, part_d_ptr, T, P, D, eps,
                            blocks_per_prog,
                            BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (pid, chunk): ``blocks_per_prog`` token blocks x the chunk's columns. Accumulates
        part_w [n_prog, D, P] (dL/dweight) and part_d [n_prog, 3, D] (dL/dbias, dL/dln_d_w, dL/dln_d_b)
        rows of its columns; embedding-table grads by fp32 atomics (rows chosen by data)."""
        pid = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        wT, bias = _pe_weight_chunk(w_ptr, b_ptr, cols, cmask, offs_p, pmask, P)
        lnd_w = tl.load(lnd_w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)
        acc_b = tl.zeros([BLOCK_D], tl.float32)
        acc_lnd_w = tl.zeros([BLOCK_D], tl.float32)
        acc_lnd_b = tl.zeros([BLOCK_D], tl.float32)
        for i in range(0, blocks_per_prog):
            offs_t = (pid.to(tl.int64) * blocks_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
            tmask = offs_t < T
            md = tmask[:, None] & cmask[None, :]
            _, _, h = _pe_patch_norm(x_ptr, lnp_w_ptr, lnp_b_ptr, offs_t, tmask, offs_p, pmask, P, eps)
            mean = tl.load(stats_ptr + offs_t, mask=tmask, other=0.0)
            rstd = tl.load(stats_ptr + T + offs_t, mask=tmask, other=0.0)
            m1 = tl.load(stats_ptr + 2 * T + offs_t, mask=tmask, other=0.0)
            m2 = tl.load(stats_ptr + 3 * T + offs_t, mask=tmask, other=0.0)
            zhat = tl.where(md, (_pe_project(h, wT, bias) - mean[:, None]) * rstd[:, None], 0.0)
            dz = tl.load(go_ptr + offs_t[:, None] * D + cols[None, :], mask=md, other=0.0).to(tl.float32)
            chan = tl.load(chan_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
            pos = tl.load(pos_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
            tl.atomic_add(gcemb_ptr + chan[:, None] * D + cols[None, :], dz, mask=md, sem="relaxed")
            tl.atomic_add(gpemb_ptr + pos[:, None] * D + cols[None, :], dz, mask=md, sem="relaxed")
            acc_lnd_w += tl.sum(dz * zhat, axis=0)
            acc_lnd_b += tl.sum(dz, axis=0)
            dy = tl.where(md, rstd[:, None] * (dz * lnd_w[None, :] - m1[:, None] - zhat * m2[:, None]), 0.0)
            acc_b += tl.sum(dy, axis=0)
            acc_w = tl.dot(tl.trans(dy), h, acc_w, input_precision="ieee")
        pid64 = pid.to(tl.int64)
        tl.store(part_w_ptr + pid64 * D * P + cols[:, None] * P + offs_p[None, :], acc_w,
                 mask=cmask[:, None] & pmask[None, :])
        base_d = part_d_ptr + pid64 * 3 * D
        tl.store(base_d + cols, acc_b, mask=cmask)
        tl.store(base_d + D + cols, acc_lnd_w, mask=cmask)
        tl.store(base_d + 2 * D + cols, acc_lnd_b, mask=cmask)


class _PatchEmbedBlocks(NamedTuple):
    """Launch configuration of the patch-embedding kernels: block_p, the P samples padded to a power
    of two (tl.dot needs >= 16), and (BLOCK_T tokens, BLOCK_D columns per chunk, num_warps) of the
    forward, the backward "rows" and the backward "cols" kernel."""
    block_p: int
    forward: tuple[int, int, int]
    rows: tuple[int, int, int]
    cols: tuple[int, int, int]


def _pe_blocks(P: int, D: int, arch: int | None) -> _PatchEmbedBlocks:
    """Blocks for P samples per patch and d = D outputs on compute capability ``arch`` (None: the
    interpreter, which gets small token blocks).

    The K = 25 products run on CUDA cores (IEEE fp32), whose dot operands each thread holds whole:
    narrow chunks (64 columns; 32 in the rows kernel, which keeps two [BLOCK_T, P] accumulators)
    and 8 warps keep every kernel under 255 registers without spills on sm_80 / sm_90 / sm_100
    alike (checked by tests/kernels/test_compile.py). Chunk widths divide every model width
    (256 .. 1024), so no column is padded.
    """
    block_p = max(16, next_pow2(P))
    chunk, rows_chunk = column_block(D, 64), column_block(D, 32)
    if arch is None:
        return _PatchEmbedBlocks(block_p, (16, chunk, 4), (16, rows_chunk, 4), (16, chunk, 4))
    return _PatchEmbedBlocks(block_p, (32, chunk, 8), (16, rows_chunk, 8), (32, chunk, 8))


def _triton_forward(patches: torch.Tensor, token_chan: torch.Tensor, token_pos: torch.Tensor,
                    tensors: Sequence[torch.Tensor], eps: float, arch: int | None = None) -> torch.Tensor:
    """LayerNorm_P -> Linear(P, D) -> LayerNorm_D -> + chan_emb[chan] + pos_emb[pos].

    Returns ``out`` [T, D] in ``patches.dtype``; all arithmetic is fp32. ``arch`` picks another
    architecture's blocks than the tensors' device's (the compile report; interpreter tests).
    """
    ln_p_w, ln_p_b, weight, bias, ln_d_w, ln_d_b, chan_emb, pos_emb = tensors
    (T, P), D = patches.shape, weight.shape[0]
    out = torch.empty((T, D), dtype=patches.dtype, device=patches.device)
    if T == 0 or D == 0:
        return out
    blocks = _pe_blocks(P, D, arch if arch is not None else device_arch(patches.device))
    block_t, block_d, num_warps = blocks.forward
    _pe_fwd_kernel[(triton.cdiv(T, block_t),)](
        patches.contiguous(), token_chan.contiguous(), token_pos.contiguous(),
        *(t.contiguous() for t in tensors), out, T, P, D, float(eps),
        BLOCK_T=block_t, BLOCK_P=blocks.block_p, BLOCK_D=block_d, num_warps=num_warps)
    return out


def _triton_backward(grad_out: torch.Tensor, patches: torch.Tensor, token_chan: torch.Tensor,
                     token_pos: torch.Tensor, tensors: Sequence[torch.Tensor], eps: float,
                     max_programs: int | None = None, arch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of ``_triton_forward``.

    Returns ``(grad_patches, grad_ln_p_w, grad_ln_p_b, grad_weight, grad_bias, grad_ln_d_w,
    grad_ln_d_b, grad_chan_emb, grad_pos_emb)``, each with the shape and dtype of its input.

    ``max_programs`` caps the token programs (each then loops over several token blocks, which
    bounds the partial buffers); default: 2 per SM on CUDA, one program per block elsewhere.
    ``arch`` as in ``_triton_forward``.
    """
    ln_p_w, ln_p_b, weight, bias, ln_d_w, ln_d_b, chan_emb, pos_emb = tensors
    (T, P), D = patches.shape, weight.shape[0]
    dev = patches.device
    f32 = torch.float32

    grad_patches = torch.empty((T, P), dtype=patches.dtype, device=dev)
    gcemb = torch.zeros(chan_emb.shape, dtype=f32, device=dev)
    gpemb = torch.zeros(pos_emb.shape, dtype=f32, device=dev)

    if T == 0 or D == 0 or P == 0:
        grad_patches.zero_()
        zeros_like = lambda t: torch.zeros_like(t, memory_format=torch.contiguous_format)  # noqa: E731
        return (
            grad_patches,
            zeros_like(ln_p_w),
            zeros_like(ln_p_b),
            zeros_like(weight),
            zeros_like(bias),
            zeros_like(ln_d_w),
            zeros_like(ln_d_b),
            gcemb.to(chan_emb.dtype),
            gpemb.to(pos_emb.dtype),
        )

    blocks = _pe_blocks(P, D, arch if arch is not None else device_arch(dev))
    if max_programs is None:
        max_programs = default_max_programs(dev, per_sm=2)
    grad_out, patches = grad_out.contiguous(), patches.contiguous()  # expanded (stride-0) grads become dense
    ln_p_w, ln_p_b, weight, bias, ln_d_w = (t.contiguous() for t in (ln_p_w, ln_p_b, weight, bias, ln_d_w))
    stats = torch.empty((4, T), dtype=f32, device=dev)

    block_t, block_d, num_warps = blocks.rows
    n_prog, blocks_per_prog = split_grid(triton.cdiv(T, block_t), max_programs)
    part_p = torch.empty((n_prog, 2, P), dtype=f32, device=dev)
    _pe_bwd_rows_kernel[(n_prog,)](
        grad_out, patches, ln_p_w, ln_p_b, weight, bias, ln_d_w, grad_patches, stats, part_p,
        T, P, D, float(eps), blocks_per_prog,
        BLOCK_T=block_t, BLOCK_P=blocks.block_p, BLOCK_D=block_d, num_warps=num_warps)

    block_t, block_d, num_warps = blocks.cols
    n_prog, blocks_per_prog = split_grid(triton.cdiv(T, block_t), max_programs)
    part_w = torch.empty((n_prog, D, P), dtype=f32, device=dev)
    part_d = torch.empty((n_prog, 3, D), dtype=f32, device=dev)
    _pe_bwd_cols_kernel[(n_prog, triton.cdiv(D, block_d))](
        grad_out, patches, token_chan.contiguous(), token_pos.contiguous(), ln_p_w, ln_p_b, weight, bias,
        ln_d_w, stats, gcemb, gpemb, part_w, part_d, T, P, D, float(eps), blocks_per_prog,
        BLOCK_T=block_t, BLOCK_P=blocks.block_p, BLOCK_D=block_d, num_warps=num_warps)

    gw = part_w.sum(0)
    gd = part_d.sum(0)
    gp = part_p.sum(0)
    return (
        grad_patches,
        gp[0].to(ln_p_w.dtype),
        gp[1].to(ln_p_b.dtype),
        gw.to(weight.dtype),
        gd[0].to(bias.dtype),
        gd[1].to(ln_d_w.dtype),
        gd[2].to(ln_d_b.dtype),
        gcemb.to(chan_emb.dtype),
        gpemb.to(pos_emb.dtype),
    )


# ----------------------------------------------------------------------------- CPU kernel

def _cpu_forward(patches: torch.Tensor, token_chan: torch.Tensor, token_pos: torch.Tensor,
                 tensors: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """C++ kernel, fp32 inside; output in ``patches.dtype``. patches [T, 25] -> [T, d]."""
    d = tensors[2].shape[0]
    out = torch.empty(patches.shape[0], d, dtype=torch.float32)
    _ext.cpp.patch_embed_forward(
        _ext.as_float32_array(patches), token_chan.numpy(), token_pos.numpy(),
        *(_ext.as_float32_array(t) for t in tensors), float(eps), out.numpy(), _ext.cpu_threads())
    return out.to(patches.dtype)


def _cpu_backward(grad_out: torch.Tensor, patches: torch.Tensor, token_chan: torch.Tensor,
                  token_pos: torch.Tensor, tensors: Sequence[torch.Tensor],
                  eps: float) -> tuple[torch.Tensor, ...]:
    """C++ kernel: grads of patches and of the eight weight tensors, each in its input's dtype."""
    inputs = (patches, *tensors)
    grads = [torch.empty(t.shape, dtype=torch.float32) for t in inputs]
    _ext.cpp.patch_embed_backward(
        _ext.as_float32_array(grad_out), _ext.as_float32_array(patches), token_chan.numpy(), token_pos.numpy(),
        *(_ext.as_float32_array(t) for t in tensors), float(eps),
        *(g.numpy() for g in grads), _ext.cpu_threads())
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


# ----------------------------------------------------------------------------- autograd

_KERNELS = {
    "cpu": (_cpu_forward, _cpu_backward),
    "triton": (_triton_forward, _triton_backward),
}


class _PatchEmbedFunction(torch.autograd.Function):
    """One Function for every fused backend; the backend's kernels recompute in backward."""

    @staticmethod
    def forward(ctx, backend: str, eps: float, patches: torch.Tensor, token_chan: torch.Tensor,
                token_pos: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.backend, ctx.eps = backend, eps
        ctx.save_for_backward(patches, token_chan, token_pos, *tensors)
        forward_kernel = _KERNELS[backend][0]
        return forward_kernel(patches, token_chan, token_pos, tensors, eps)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        patches, token_chan, token_pos, *tensors = ctx.saved_tensors
        backward_kernel = _KERNELS[ctx.backend][1]
        grads = backward_kernel(grad_out.contiguous(), patches, token_chan, token_pos, tensors, ctx.eps)
        return (None, None, grads[0], None, None, *grads[1:])


# ----------------------------------------------------------------------------- dispatch

BACKENDS = _dispatch.backends_of("patch_embed")


def _check_params(params: PatchEmbedParams, x: torch.Tensor) -> tuple[int, int, int]:
    """Checks every weight's shape, device and dtype (that of ``x``); returns (d, channel types,
    positions)."""
    if not isinstance(params, PatchEmbedParams):
        raise TypeError(f"params must be a PatchEmbedParams, got {type(params).__name__}")
    ln_p_w, ln_p_b, weight, bias, ln_d_w, ln_d_b, chan_emb, pos_emb = params.flat()
    d = weight.shape[0] if weight.dim() == 2 else -1
    expected = {
        "ln_patch_weight": (ln_p_w, (PATCH_LEN,)), "ln_patch_bias": (ln_p_b, (PATCH_LEN,)),
        "weight": (weight, (d, PATCH_LEN)), "bias": (bias, (d,)),
        "ln_embed_weight": (ln_d_w, (d,)), "ln_embed_bias": (ln_d_b, (d,)),
        "channel_type": (chan_emb, (chan_emb.shape[0], d)), "position": (pos_emb, (pos_emb.shape[0], d)),
    }
    for name, (tensor, shape) in expected.items():
        check_float_tensor(f"params.{name}", tensor, x.device)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"params.{name} must have shape {shape} (d={d}), got {tuple(tensor.shape)}")
    _dispatch.check_same_dtype("patch_embed", "x", x, {f"params.{n}": t for n, (t, _) in expected.items()})
    return d, chan_emb.shape[0], pos_emb.shape[0]


def _token_rows(channel_ids: torch.Tensor, n_patches: Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(channel row, channel-type id, position) of every token of channels with ``n_patches``
    (host ints) patches each, all int64 [sum n_patches] on channel_ids' device (no device read)."""
    row_of_patch, token_pos = host_segment_positions(n_patches, channel_ids.device)
    return row_of_patch, channel_ids.to(torch.int64)[row_of_patch], token_pos


def patch_token_ids(channel_ids: torch.Tensor, n_patches: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-type id and position of every token of channels with ``n_patches`` [M] (host
    ints) patches each: channel_ids [M] -> (token_chan [sum n_patches], token_pos [sum n_patches])."""
    return _token_rows(channel_ids, n_patches)[1:]


def _embed_channels(channels: torch.Tensor, chan_ids: torch.Tensor, n_patches: Sequence[int],
                    params: PatchEmbedParams, backend: str) -> torch.Tensor:
    """channels [M, Lmax] flat lead rows (row m uses its first 25*n_patches[m] samples; host
    ints), chan_ids [M] -> tokens [sum n_patches, d] in channel order."""
    row_of_patch, token_chan, token_pos = _token_rows(chan_ids, n_patches)
    if all(n * PATCH_LEN == channels.shape[1] for n in n_patches):
        patches = channels.reshape(-1, PATCH_LEN)  # every row is used whole: a view
    else:
        patches = channels.reshape(channels.shape[0], -1, PATCH_LEN)[row_of_patch, token_pos]
    if backend == "reference":
        return patch_embed_tokens_reference(patches, token_chan, token_pos, params)
    return _PatchEmbedFunction.apply(backend, params.eps, patches.contiguous(), token_chan,
                                     token_pos, *params.flat())


def patch_embed(x: torch.Tensor, channel_ids: torch.Tensor, params: PatchEmbedParams,
                backend: str = "auto") -> torch.Tensor:
    """x [B, C, L] float (L a multiple of 25), channel_ids [B, C] int in 0..12 -> [B, C*L/25, d].

    backend: one of BACKENDS; "auto" picks per device and dtype (csfm_kernels._dispatch.AUTO).
    Every weight must have x's dtype.
    """
    check_float_tensor("x", x, x.device)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, C, L], got shape {tuple(x.shape)}")
    b, c, length = x.shape
    d, n_types, n_pos = _check_params(params, x)
    n_patches = _check_length("x", length, n_pos)
    check_channel_ids("channel_ids", channel_ids, (b, c), n_types, x.device)
    chosen = _dispatch.resolve("patch_embed", backend, x.device, x.dtype)
    tokens = _embed_channels(x.reshape(b * c, length), channel_ids.reshape(-1), [n_patches] * (b * c),
                             params, chosen)
    return tokens.reshape(b, c * n_patches, d)


def patch_embed_packed(records: Sequence[torch.Tensor], channel_ids: Sequence[torch.Tensor],
                       params: PatchEmbedParams,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lead counts: records[i] [C_i, L_i], channel_ids[i] [C_i] ->
    (tokens [sum_i C_i*L_i/25, d], cu_seqlens int32 [B+1] of token offsets per record).
    Nothing is read back from the device: the lengths come from the records' shapes."""
    if len(records) == 0 or len(records) != len(channel_ids):
        raise ValueError(f"records and channel_ids must be non-empty lists of equal length, "
                         f"got {len(records)} and {len(channel_ids)}")
    check_float_tensor("records[0]", records[0], records[0].device)
    _, n_types, n_pos = _check_params(params, records[0])
    device = records[0].device
    rows, ids, counts = [], [], []
    for i, (rec, ids_i) in enumerate(zip(records, channel_ids)):
        check_float_tensor(f"records[{i}]", rec, device)
        if rec.dim() != 2 or rec.dtype != records[0].dtype:
            raise ValueError(f"records[{i}] must be [C, L] of dtype {records[0].dtype}, "
                             f"got shape {tuple(rec.shape)} dtype {rec.dtype}")
        n_i = _check_length(f"records[{i}]", rec.shape[1], n_pos)
        check_index_tensor(f"channel_ids[{i}]", ids_i, (rec.shape[0],), device)
        rows.append(rec)
        ids.append(ids_i.reshape(-1))
        counts.extend([n_i] * rec.shape[0])
    all_ids = torch.cat(ids)
    check_index_range("channel_ids", all_ids, 0, n_types,  # one check for the batch (a device op on CUDA)
                      lambda: ", got " + ", ".join(f"channel_ids[{i}] = {t.tolist()}" for i, t in enumerate(ids)
                                                  if bool(((t < 0) | (t >= n_types)).any())))
    chosen = _dispatch.resolve("patch_embed", backend, device, records[0].dtype)
    longest = max(r.shape[1] for r in rows)
    channels = torch.cat([r if r.shape[1] == longest else F.pad(r, (0, longest - r.shape[1])) for r in rows])
    tokens = _embed_channels(channels, all_ids, counts, params, chosen)
    per_record = [r.shape[0] * r.shape[1] // PATCH_LEN for r in rows]
    return tokens, cu_seqlens_from_lengths(per_record, device)


def _check_length(name: str, length: int, n_positions: int) -> int:
    """Patches per channel of a ``length``-sample signal, or a ValueError naming ``name``."""
    if length <= 0 or length % PATCH_LEN:
        raise ValueError(f"{name}: length {length} samples is not a positive multiple of "
                         f"the {PATCH_LEN}-sample patch")
    if length // PATCH_LEN > n_positions:
        raise ValueError(f"{name}: {length // PATCH_LEN} patches per channel but the position "
                         f"table has {n_positions} rows ({n_positions * PATCH_LEN} samples)")
    return length // PATCH_LEN
