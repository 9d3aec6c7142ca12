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

from csfm_kernels import _ext
from csfm_kernels._checks import check_channel_ids, check_float_tensor
from csfm_kernels.segments import cu_seqlens_from_lengths, segment_positions
from csfm_kernels._triton import default_max_programs, next_pow2, require_triton, split_grid, tl, triton, triton_runs_on

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

if triton is not None:

    @triton.jit
    def _pe_load_weights(lnp_w_ptr, lnp_b_ptr, w_ptr, b_ptr, offs_p, pmask, offs_d, dmask, P):
        """LayerNorm_P affine [BLOCK_P], W^T [BLOCK_P, BLOCK_D] and bias [BLOCK_D] in fp32, 0 where padded."""
        lnp_w = tl.load(lnp_w_ptr + offs_p, mask=pmask, other=0.0).to(tl.float32)
        lnp_b = tl.load(lnp_b_ptr + offs_p, mask=pmask, other=0.0).to(tl.float32)
        wT = tl.load(w_ptr + offs_d[None, :] * P + offs_p[:, None], mask=pmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        return lnp_w, lnp_b, wT, bias

    @triton.jit
    def _pe_tile_forward(
        x_ptr,
        offs_t,
        tmask,
        offs_p,
        pmask,
        dmask,
        lnp_w,
        lnp_b,
        wT,
        bias,
        P,
        D,
        eps,
    ):
        """Forward of one [BLOCK_T] token tile up to the normalised output of LayerNorm_D.

        Returns (xhat_p, rstd_p, h, zhat, rstd_d); padded rows / columns of xhat_p, h and zhat are 0
        (padded token rows of h equal ln_p_b, which is harmless since they are never stored and
        their incoming gradient is masked to 0).
        """
        m2 = tmask[:, None] & pmask[None, :]
        x = tl.load(x_ptr + offs_t[:, None] * P + offs_p[None, :], mask=m2, other=0.0)
        x = x.to(tl.float32)
        mean_p = tl.sum(x, axis=1) / P
        xc = tl.where(pmask[None, :], x - mean_p[:, None], 0.0)
        var_p = tl.sum(xc * xc, axis=1) / P
        rstd_p = 1.0 / tl.sqrt(var_p + eps)
        xhat = xc * rstd_p[:, None]
        h = xhat * lnp_w[None, :] + lnp_b[None, :]  # padded P columns: 0 (lnp_w/lnp_b loaded 0)
        # y = h @ W^T ; "ieee" keeps fp32 accuracy on GPUs that would otherwise use TF32.
        y = tl.dot(h, wT, input_precision="ieee")
        y = y + bias[None, :]  # padded D columns stay 0 (wT and bias loaded 0 there)
        mean_d = tl.sum(y, axis=1) / D
        yc = tl.where(dmask[None, :], y - mean_d[:, None], 0.0)
        var_d = tl.sum(yc * yc, axis=1) / D
        rstd_d = 1.0 / tl.sqrt(var_d + eps)
        zhat = yc * rstd_d[:, None]
        return xhat, rstd_p, h, zhat, rstd_d

    @triton.jit
    def _pe_fwd_kernel(
        x_ptr,
        chan_ptr,
        pos_ptr,
        lnp_w_ptr,
        lnp_b_ptr,
        w_ptr,
        b_ptr,
        lnd_w_ptr,
        lnd_b_ptr,
        cemb_ptr,
        pemb_ptr,
        out_ptr,
        T,
        P,
        D,
        eps,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        tmask = offs_t < T
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D

        lnp_w, lnp_b, wT, bias = _pe_load_weights(lnp_w_ptr, lnp_b_ptr, w_ptr, b_ptr, offs_p, pmask,
                                                  offs_d, dmask, P)

        xhat, rstd_p, h, zhat, rstd_d = _pe_tile_forward(
            x_ptr, offs_t, tmask, offs_p, pmask, dmask, lnp_w, lnp_b, wT, bias, P, D, eps
        )

        lnd_w = tl.load(lnd_w_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        lnd_b = tl.load(lnd_b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        z = zhat * lnd_w[None, :] + lnd_b[None, :]

        md = tmask[:, None] & dmask[None, :]
        chan = tl.load(chan_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
        ce = tl.load(cemb_ptr + chan[:, None] * D + offs_d[None, :], mask=md, other=0.0)
        pe = tl.load(pemb_ptr + pos[:, None] * D + offs_d[None, :], mask=md, other=0.0)
        out = z + ce.to(tl.float32) + pe.to(tl.float32)
        tl.store(
            out_ptr + offs_t[:, None] * D + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=md,
        )

    @triton.jit
    def _pe_bwd_kernel(
        go_ptr,
        x_ptr,
        chan_ptr,
        pos_ptr,
        lnp_w_ptr,
        lnp_b_ptr,
        w_ptr,
        b_ptr,
        lnd_w_ptr,
        lnd_b_ptr,
        gx_ptr,
        gcemb_ptr,
        gpemb_ptr,
        part_w_ptr,
        part_d_ptr,
        part_p_ptr,
        T,
        P,
        D,
        eps,
        blocks_per_prog,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Each program handles ``blocks_per_prog`` consecutive token blocks and writes its
        parameter-gradient partial sums to row ``pid`` of the partial buffers:

        part_w [n_prog, D, P]  : dL/dweight
        part_d [n_prog, 3, D]  : dL/dbias, dL/dln_d_w, dL/dln_d_b
        part_p [n_prog, 2, P]  : dL/dln_p_w, dL/dln_p_b
        """
        pid = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D

        lnp_w, lnp_b, wT, bias = _pe_load_weights(lnp_w_ptr, lnp_b_ptr, w_ptr, b_ptr, offs_p, pmask,
                                                  offs_d, dmask, P)
        lnd_w = tl.load(lnd_w_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)

        acc_w = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_lnd_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_lnd_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_lnp_w = tl.zeros((BLOCK_P,), dtype=tl.float32)
        acc_lnp_b = tl.zeros((BLOCK_P,), dtype=tl.float32)

        for i in range(0, blocks_per_prog):
            blk = pid.to(tl.int64) * blocks_per_prog + i
            offs_t = blk * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
            tmask = offs_t < T
            md = tmask[:, None] & dmask[None, :]

            xhat, rstd_p, h, zhat, rstd_d = _pe_tile_forward(
                x_ptr, offs_t, tmask, offs_p, pmask, dmask, lnp_w, lnp_b, wT, bias, P, D, eps
            )

            # dL/dout == dL/dz ; padded rows / columns are 0, so they contribute nothing below.
            dz = tl.load(go_ptr + offs_t[:, None] * D + offs_d[None, :], mask=md, other=0.0)
            dz = dz.to(tl.float32)

            # Embedding tables: rows chosen by data -> fp32 atomics.
            chan = tl.load(chan_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
            pos = tl.load(pos_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
            tl.atomic_add(gcemb_ptr + chan[:, None] * D + offs_d[None, :], dz, mask=md, sem="relaxed")
            tl.atomic_add(gpemb_ptr + pos[:, None] * D + offs_d[None, :], dz, mask=md, sem="relaxed")

            # LayerNorm_D backward.
            acc_lnd_w += tl.sum(dz * zhat, axis=0)
            acc_lnd_b += tl.sum(dz, axis=0)
            dzhat = dz * lnd_w[None, :]
            m1 = tl.sum(dzhat, axis=1) / D
            m2 = tl.sum(dzhat * zhat, axis=1) / D
            dy = rstd_d[:, None] * (dzhat - m1[:, None] - zhat * m2[:, None])
            dy = tl.where(md, dy, 0.0)

            # Linear backward.
            acc_b += tl.sum(dy, axis=0)
            acc_w = tl.dot(tl.trans(dy), h, acc_w, input_precision="ieee")  # [BLOCK_D, BLOCK_P]
            dh = tl.dot(dy, tl.trans(wT), input_precision="ieee")  # [BLOCK_T, BLOCK_P]

            # LayerNorm_P backward.
            acc_lnp_w += tl.sum(dh * xhat, axis=0)
            acc_lnp_b += tl.sum(dh, axis=0)
            dxhat = dh * lnp_w[None, :]
            q1 = tl.sum(dxhat, axis=1) / P
            q2 = tl.sum(dxhat * xhat, axis=1) / P
            dx = rstd_p[:, None] * (dxhat - q1[:, None] - xhat * q2[:, None])
            mp = tmask[:, None] & pmask[None, :]
            tl.store(
                gx_ptr + offs_t[:, None] * P + offs_p[None, :],
                dx.to(gx_ptr.dtype.element_ty),
                mask=mp,
            )

        pid64 = pid.to(tl.int64)
        tl.store(
            part_w_ptr + pid64 * D * P + offs_d[:, None] * P + offs_p[None, :],
            acc_w,
            mask=dmask[:, None] & pmask[None, :],
        )
        base_d = part_d_ptr + pid64 * 3 * D
        tl.store(base_d + offs_d, acc_b, mask=dmask)
        tl.store(base_d + D + offs_d, acc_lnd_w, mask=dmask)
        tl.store(base_d + 2 * D + offs_d, acc_lnd_b, mask=dmask)
        base_p = part_p_ptr + pid64 * 2 * P
        tl.store(base_p + offs_p, acc_lnp_w, mask=pmask)
        tl.store(base_p + P + offs_p, acc_lnp_b, mask=pmask)


def _pe_blocks(P: int, D: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_P, BLOCK_D, num_warps) for the patch-embedding kernels.

    The full D row lives in registers; BLOCK_T keeps a [BLOCK_T, BLOCK_D] fp32 tile at about 8K
    (forward) / 4K (backward, several tiles live) elements, clamped to [16, 64] (tl.dot needs
    every block dimension >= 16).
    """
    BLOCK_P = max(16, next_pow2(P))
    BLOCK_D = max(16, next_pow2(D))
    budget = 4096 if backward else 8192
    BLOCK_T = min(64, max(16, budget // BLOCK_D))
    tile = BLOCK_T * BLOCK_D
    if backward:
        # acc_w [BLOCK_D, BLOCK_P] is also carried through the loop.
        tile = max(tile, BLOCK_D * BLOCK_P)
    if tile <= 2048:
        num_warps = 4
    elif tile <= 8192:
        num_warps = 8
    else:
        num_warps = 16
    return BLOCK_T, BLOCK_P, BLOCK_D, num_warps


def _triton_forward(patches: torch.Tensor, token_chan: torch.Tensor, token_pos: torch.Tensor,
                    tensors: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm_P -> Linear(P, D) -> LayerNorm_D -> + chan_emb[chan] + pos_emb[pos].

    Returns ``out`` [T, D] in ``patches.dtype``; all arithmetic is fp32.
    """
    ln_p_w, ln_p_b, weight, bias, ln_d_w, ln_d_b, chan_emb, pos_emb = tensors
    (T, P), D = patches.shape, weight.shape[0]
    out = torch.empty((T, D), dtype=patches.dtype, device=patches.device)
    if T == 0 or D == 0:
        return out
    BLOCK_T, BLOCK_P, BLOCK_D, num_warps = _pe_blocks(P, D, backward=False)
    grid = (triton.cdiv(T, BLOCK_T),)
    _pe_fwd_kernel[grid](
        patches.contiguous(),
        token_chan.contiguous(),
        token_pos.contiguous(),
        ln_p_w.contiguous(),
        ln_p_b.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        ln_d_w.contiguous(),
        ln_d_b.contiguous(),
        chan_emb.contiguous(),
        pos_emb.contiguous(),
        out,
        T,
        P,
        D,
        float(eps),
        BLOCK_T=BLOCK_T,
        BLOCK_P=BLOCK_P,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return out


def _triton_backward(grad_out: torch.Tensor, patches: torch.Tensor, token_chan: torch.Tensor,
                     token_pos: torch.Tensor, tensors: Sequence[torch.Tensor], eps: float,
                     max_programs: int | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of ``_triton_forward``.

    Returns ``(grad_patches, grad_ln_p_w, grad_ln_p_b, grad_weight, grad_bias, grad_ln_d_w,
    grad_ln_d_b, grad_chan_emb, grad_pos_emb)``, each with the shape and dtype of its input.

    ``max_programs`` caps the grid (each program then loops over several token blocks, which
    bounds the partial buffers); default: 2 per SM on CUDA, one program per block elsewhere.
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

    BLOCK_T, BLOCK_P, BLOCK_D, num_warps = _pe_blocks(P, D, backward=True)
    n_blocks = triton.cdiv(T, BLOCK_T)
    if max_programs is None:
        max_programs = default_max_programs(dev, per_sm=2)
    n_prog, blocks_per_prog = split_grid(n_blocks, max_programs)

    part_w = torch.empty((n_prog, D, P), dtype=f32, device=dev)
    part_d = torch.empty((n_prog, 3, D), dtype=f32, device=dev)
    part_p = torch.empty((n_prog, 2, P), dtype=f32, device=dev)

    _pe_bwd_kernel[(n_prog,)](
        grad_out.contiguous(),  # expanded (stride-0) grads become dense here
        patches.contiguous(),
        token_chan.contiguous(),
        token_pos.contiguous(),
        ln_p_w.contiguous(),
        ln_p_b.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        ln_d_w.contiguous(),
        ln_d_b.contiguous(),
        grad_patches,
        gcemb,
        gpemb,
        part_w,
        part_d,
        part_p,
        T,
        P,
        D,
        float(eps),
        blocks_per_prog,
        BLOCK_T=BLOCK_T,
        BLOCK_P=BLOCK_P,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )

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

def _as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _cpu_forward(patches: torch.Tensor, token_chan: torch.Tensor, token_pos: torch.Tensor,
                 tensors: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """C++ kernel, fp32 inside; output in ``patches.dtype``. patches [T, 25] -> [T, d]."""
    d = tensors[2].shape[0]
    out = torch.empty(patches.shape[0], d, dtype=torch.float32)
    _ext.cpp.patch_embed_forward(
        _as_f32(patches).numpy(), token_chan.numpy(), token_pos.numpy(),
        *(_as_f32(t).numpy() for t in tensors), float(eps), out.numpy(), _ext.cpu_threads())
    return out.to(patches.dtype)


def _cpu_backward(grad_out: torch.Tensor, patches: torch.Tensor, token_chan: torch.Tensor,
                  token_pos: torch.Tensor, tensors: Sequence[torch.Tensor],
                  eps: float) -> tuple[torch.Tensor, ...]:
    """C++ kernel: grads of patches and of the eight weight tensors, each in its input's dtype."""
    inputs = (patches, *tensors)
    grads = [torch.empty(t.shape, dtype=torch.float32) for t in inputs]
    _ext.cpp.patch_embed_backward(
        _as_f32(grad_out).numpy(), _as_f32(patches).numpy(), token_chan.numpy(), token_pos.numpy(),
        *(_as_f32(t).numpy() for t in tensors), float(eps),
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

BACKENDS = ("auto", "reference", "cpu", "triton")


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if triton_runs_on(device) and device.type == "cuda":
            return "triton"
        if device.type == "cpu" and _ext.cpp is not None:
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device.type}")
        if _ext.cpp is None:
            raise RuntimeError(f"backend='cpu' needs the C++ extension: {_ext.cpp_error}")
    if backend == "triton":
        require_triton(device)
    return backend


def _check_params(params: PatchEmbedParams, device: torch.device) -> tuple[int, int, int]:
    """Checks every weight's shape and device; returns (d, channel types, positions)."""
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
        check_float_tensor(f"params.{name}", tensor, device)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"params.{name} must have shape {shape} (d={d}), got {tuple(tensor.shape)}")
    return d, chan_emb.shape[0], pos_emb.shape[0]


def _embed_channels(channels: torch.Tensor, chan_ids: torch.Tensor, n_patches: torch.Tensor,
                    params: PatchEmbedParams, backend: str) -> torch.Tensor:
    """channels [M, Lmax] flat lead rows (row m uses its first 25*n_patches[m] samples),
    chan_ids [M] -> tokens [sum n_patches, d] in channel order."""
    token_chan, token_pos = patch_token_ids(chan_ids, n_patches)
    if bool((n_patches * PATCH_LEN == channels.shape[1]).all()):
        patches = channels.reshape(-1, PATCH_LEN)  # every row is used whole: a view
    else:
        row_of_patch, _ = segment_positions(n_patches)
        patches = channels.reshape(channels.shape[0], -1, PATCH_LEN)[row_of_patch, token_pos]
    if backend == "reference":
        return patch_embed_tokens_reference(patches, token_chan, token_pos, params)
    return _PatchEmbedFunction.apply(backend, params.eps, patches.contiguous(), token_chan,
                                     token_pos, *params.flat())


def patch_token_ids(channel_ids: torch.Tensor, n_patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-type id and position of every token of channels with ``n_patches`` [M]
    patches each: channel_ids [M] -> (token_chan [sum n_patches], token_pos [sum n_patches])."""
    row_of_patch, token_pos = segment_positions(n_patches)
    return channel_ids.to(torch.int64)[row_of_patch], token_pos


def patch_embed(x: torch.Tensor, channel_ids: torch.Tensor, params: PatchEmbedParams,
                backend: str = "auto") -> torch.Tensor:
    """x [B, C, L] float (L a multiple of 25), channel_ids [B, C] int in 0..12 -> [B, C*L/25, d].

    backend: "auto" (Triton on CUDA, the C++ kernel on CPU where built, else reference),
    "reference", "cpu" or "triton".
    """
    check_float_tensor("x", x, x.device)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, C, L], got shape {tuple(x.shape)}")
    b, c, length = x.shape
    d, n_types, n_pos = _check_params(params, x.device)
    n_patches = _check_length("x", length, n_pos)
    check_channel_ids("channel_ids", channel_ids, (b, c), n_types, x.device)
    chosen = _pick_backend(backend, x.device)
    counts = torch.full((b * c,), n_patches, dtype=torch.int64, device=x.device)
    tokens = _embed_channels(x.reshape(b * c, length), channel_ids.reshape(-1), counts, params, chosen)
    return tokens.reshape(b, c * n_patches, d)


def patch_embed_packed(records: Sequence[torch.Tensor], channel_ids: Sequence[torch.Tensor],
                       params: PatchEmbedParams,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lead counts: records[i] [C_i, L_i], channel_ids[i] [C_i] ->
    (tokens [sum_i C_i*L_i/25, d], cu_seqlens int32 [B+1] of token offsets per record)."""
    if len(records) == 0 or len(records) != len(channel_ids):
        raise ValueError(f"records and channel_ids must be non-empty lists of equal length, "
                         f"got {len(records)} and {len(channel_ids)}")
    device = records[0].device
    _, n_types, n_pos = _check_params(params, device)
    rows, ids, counts = [], [], []
    for i, (rec, ids_i) in enumerate(zip(records, channel_ids)):
        check_float_tensor(f"records[{i}]", rec, device)
        if rec.dim() != 2 or rec.dtype != records[0].dtype:
            raise ValueError(f"records[{i}] must be [C, L] of dtype {records[0].dtype}, "
                             f"got shape {tuple(rec.shape)} dtype {rec.dtype}")
        n_i = _check_length(f"records[{i}]", rec.shape[1], n_pos)
        check_channel_ids(f"channel_ids[{i}]", ids_i, (rec.shape[0],), n_types, device)
        rows.append(rec)
        ids.append(ids_i.reshape(-1))
        counts.extend([n_i] * rec.shape[0])
    longest = max(r.shape[1] for r in rows)
    channels = torch.cat([F.pad(r, (0, longest - r.shape[1])) for r in rows])
    n_patches = torch.tensor(counts, dtype=torch.int64, device=device)
    tokens = _embed_channels(channels, torch.cat(ids), n_patches, params,
                             _pick_backend(backend, device))
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
