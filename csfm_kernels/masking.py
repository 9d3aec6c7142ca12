"""MAE-style random masking: keep a random subset of each sample's tokens, restore with a mask token.

``random_masking`` draws per-sample noise, argsorts it and keeps the first
``K_b = int(N_b * (1 - ratio))`` tokens of sample b (N_b differs per sample when lead counts
differ). ``gather_kept`` gives the encoder its kept tokens; ``scatter_with_mask_token``
puts the decoder's kept tokens back in place and fills masked positions with a learned
mask token. Both take padded ``[B, N, d]`` tensors with index tensors, or packed
``[sum N_b, d]`` tensors with a ``MaskPlan``. The kernels see only global row indices:
keep sets are permutations, so no backward needs atomics; the mask-token grad is a
sum over masked rows.

Sections: reference, Triton kernel, CPU kernel, autograd.Function, dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from csfm_kernels import _dispatch, _ext
from csfm_kernels._checks import check_float_tensor, check_index_range, check_index_tensor, check_values
from csfm_kernels.segments import cu_seqlens_from_lengths, host_segment_positions, host_to_device
from csfm_kernels._triton import column_block, dummy_if_empty, split_grid, tl, triton


@dataclass(frozen=True)
class MaskPlan:
    """Which tokens each of B samples keeps, packed over samples (N_b tokens, K_b kept).

    ids_keep [sum K] int64: kept token indices within each sample, in noise order.
    ids_restore [sum N] int64: position of each token in its sample's (kept, masked) order.
    mask [sum N] bool: True where the token is masked (removed from the encoder).
    cu_seqlens, cu_seqlens_keep [B+1] int32: token / kept-token offsets per sample.
    keep_rows [sum K] int64: global row of each kept token in the packed tokens.
    source_rows [sum N] int64: global row in the packed kept tokens, -1 where masked.
    masked_rows [sum (N - K)] int64: global row of each masked token, in noise order.
    n_tokens, n_kept: N_b and K_b as host ints, so no count is read back from the device.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_keep: torch.Tensor
    keep_rows: torch.Tensor
    source_rows: torch.Tensor
    masked_rows: torch.Tensor
    n_tokens: tuple[int, ...]
    n_kept: tuple[int, ...]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids_keep [B, K], ids_restore [B, N], mask [B, N]) where every sample has N tokens."""
        n = self.n_tokens
        if len(set(n)) > 1:
            raise ValueError(f"padded() needs equal token counts per sample, got {list(n)}")
        b = len(n)
        return (self.ids_keep.reshape(b, -1), self.ids_restore.reshape(b, -1), self.mask.reshape(b, -1))


def _prefix_positions(counts: Sequence[int], width: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows b of a [B, width] table with their first counts[b] columns (host ints) ->
    (owner [sum counts], flat index b * width + column [sum counts]), row by row."""
    owner, within = host_segment_positions(counts, device)
    return owner, owner * width + within


def random_masking(n_tokens: Sequence[int] | torch.Tensor, ratio: float,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None,
                   noise: torch.Tensor | None = None) -> MaskPlan:
    """Masks ``ratio`` of each sample's tokens at random. n_tokens [B] (tokens per sample).

    Deterministic for a given generator state; with equal N it draws ``rand(B, N)`` and
    keeps exactly the tokens MAE's ``random_masking`` keeps for the same noise. ``noise``
    [B, >= max N] in [0, 1) replaces the draw (its first N_b columns rank sample b's
    tokens), so a batch split across processes can mask each sample as the whole would.
    Given host ints (a list, or a CPU tensor) nothing is read back from the device.
    """
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    n = [int(v) for v in (n_tokens.reshape(-1).tolist() if isinstance(n_tokens, torch.Tensor) else n_tokens)]
    if len(n) == 0 or min(n) < 0:
        raise ValueError(f"n_tokens must be a non-empty list of counts >= 0, got {n}")
    k = [int(v * (1 - float(ratio))) for v in n]
    b, n_max = len(n), max(n)
    if noise is None:
        noise = torch.rand(b, n_max, generator=generator, device=device)
    elif noise.dim() != 2 or noise.shape[0] != b or noise.shape[1] < n_max:
        raise ValueError(f"noise must be [B={b}, >= {n_max}], got {tuple(noise.shape)}")
    valid = torch.arange(n_max, device=device)[None, :] < host_to_device(n, device)[:, None]
    noise = noise[:, :n_max].to(device, non_blocking=True).masked_fill(~valid, 2.0)  # padding sorts last
    ids_shuffle = torch.argsort(noise, dim=1, stable=True).reshape(-1)
    ids_restore = torch.argsort(ids_shuffle.reshape(b, n_max), dim=1, stable=True).reshape(-1)
    keep_owner, keep_flat = _prefix_positions(k, n_max, device)
    token_owner, token_flat = _prefix_positions(n, n_max, device)
    masked_owner, masked_within = host_segment_positions([a - c for a, c in zip(n, k)], device)
    ids_keep = ids_shuffle[keep_flat]
    ids_restore = ids_restore[token_flat]
    k_dev = host_to_device(k, device)
    mask = ids_restore >= k_dev[token_owner]
    cu_seqlens = cu_seqlens_from_lengths(n, device)
    cu_seqlens_keep = cu_seqlens_from_lengths(k, device)
    starts = cu_seqlens[:-1].to(torch.int64)
    keep_rows = ids_keep + starts[keep_owner]
    masked_ids = ids_shuffle[masked_owner * n_max + k_dev[masked_owner] + masked_within]
    masked_rows = masked_ids + starts[masked_owner]
    source_rows = torch.where(mask, -1, ids_restore + cu_seqlens_keep[:-1].to(torch.int64)[token_owner])
    return MaskPlan(ids_keep, ids_restore, mask, cu_seqlens, cu_seqlens_keep, keep_rows, source_rows,
                    masked_rows, tuple(n), tuple(k))


# ----------------------------------------------------------------------------- reference

def gather_kept_reference(tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """MAE: tokens [B, N, d], ids_keep [B, K] -> [B, K, d]."""
    index = ids_keep.to(torch.int64).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)


def scatter_with_mask_token_reference(kept: torch.Tensor, ids_restore: torch.Tensor,
                                      mask_token: torch.Tensor) -> torch.Tensor:
    """MAE decoder input: kept [B, K, d], ids_restore [B, N], mask_token (d values) -> [B, N, d]."""
    b, k, d = kept.shape
    fill = mask_token.reshape(1, 1, d).to(kept.dtype).expand(b, ids_restore.shape[1] - k, d)
    index = ids_restore.to(torch.int64).unsqueeze(-1).expand(-1, -1, d)
    return torch.gather(torch.cat([kept, fill], dim=1), 1, index)


def _packed_reference(op, rows: torch.Tensor, counts: Sequence[int], ids: torch.Tensor,
                      id_counts: Sequence[int], *extra: torch.Tensor) -> torch.Tensor:
    """Runs a padded reference op sample by sample: sample b owns the next counts[b] rows and
    the next id_counts[b] indices (host ints)."""
    pieces = [op(r.unsqueeze(0), i.unsqueeze(0), *extra)[0]
              for r, i in zip(rows.split(list(counts)), ids.split(list(id_counts)))]
    return torch.cat(pieces)


# ----------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _gather_rows_kernel(
        src_ptr,
        rows_ptr,
        out_ptr,
        K,
        D,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = offs_r < K
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < D
        rows = tl.load(rows_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
        m = rmask[:, None] & cmask[None, :]
        v = tl.load(src_ptr + rows[:, None] * D + offs_c[None, :], mask=m)
        tl.store(out_ptr + offs_r[:, None] * D + offs_c[None, :], v, mask=m)

    @triton.jit
    def _scatter_fill_kernel(
        src_ptr,
        rows_ptr,
        fill_ptr,
        out_ptr,
        M,
        D,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = offs_r < M
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < D
        rows = tl.load(rows_ptr + offs_r, mask=rmask, other=-1).to(tl.int64)
        has_src = rows >= 0
        m = rmask[:, None] & cmask[None, :]
        v = tl.load(
            src_ptr + tl.where(has_src, rows, 0)[:, None] * D + offs_c[None, :],
            mask=m & has_src[:, None],
            other=0.0,
        )
        f = tl.load(fill_ptr + offs_c, mask=cmask, other=0.0).to(out_ptr.dtype.element_ty)
        out = tl.where(has_src[:, None], v.to(out_ptr.dtype.element_ty), f[None, :])
        tl.store(out_ptr + offs_r[:, None] * D + offs_c[None, :], out, mask=m)

    @triton.jit
    def _scatter_fill_bwd_kernel(
        go_ptr,
        rows_ptr,
        gsrc_ptr,
        part_fill_ptr,
        M,
        D,
        blocks_per_prog,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (pid_r, pid_c) handles ``blocks_per_prog`` consecutive row blocks of one column
        block; rows with a source are copied to grad_src, the others summed into
        part_fill[pid_r, cols] (fp32)."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < D
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for i in range(0, blocks_per_prog):
            blk = pid_r.to(tl.int64) * blocks_per_prog + i
            offs_r = blk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = offs_r < M
            rows = tl.load(rows_ptr + offs_r, mask=rmask, other=-1).to(tl.int64)
            has_src = rows >= 0
            m = rmask[:, None] & cmask[None, :]
            g = tl.load(go_ptr + offs_r[:, None] * D + offs_c[None, :], mask=m, other=0.0)
            tl.store(
                gsrc_ptr + tl.where(has_src, rows, 0)[:, None] * D + offs_c[None, :],
                g.to(gsrc_ptr.dtype.element_ty),
                mask=m & has_src[:, None],
            )
            acc += tl.sum(tl.where(m & (rows < 0)[:, None], g.to(tl.float32), 0.0), axis=0)
        tl.store(part_fill_ptr + pid_r.to(tl.int64) * D + offs_c, acc, mask=cmask)


def _row_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for the row copy kernels: ~4K elements per program, column
    blocks that divide the model widths (768 -> 3 x 256, no masked-off lanes). Memory-bound copies
    with ~40-90 registers and no spills on sm_80 / sm_90 / sm_100: one configuration for all."""
    BLOCK_C = column_block(D, 512)
    BLOCK_R = min(64, max(1, 4096 // BLOCK_C))
    return BLOCK_R, BLOCK_C, 4


def _triton_gather(src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[i] = src[rows[i]]``; src [M, D] (any dtype), rows int [K] in [0, M)."""
    K = rows.shape[0]
    M, D = src.shape
    out = torch.empty((K, D), dtype=src.dtype, device=src.device)
    if K == 0 or D == 0:
        return out
    BLOCK_R, BLOCK_C, num_warps = _row_blocks(D)
    grid = (triton.cdiv(K, BLOCK_R), triton.cdiv(D, BLOCK_C))
    _gather_rows_kernel[grid](
        src.contiguous(), rows.contiguous(), out, K, D,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return out


def _triton_scatter(
    src: torch.Tensor, source_rows: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """``out[i] = src[source_rows[i]]`` if ``source_rows[i] >= 0`` else ``fill``.

    src [K, D], source_rows int [M] in [-1, K), fill [D]; returns [M, D] in ``src.dtype``.
    """
    D = src.shape[1]
    M = source_rows.shape[0]
    out = torch.empty((M, D), dtype=src.dtype, device=src.device)
    if M == 0 or D == 0:
        return out
    BLOCK_R, BLOCK_C, num_warps = _row_blocks(D)
    grid = (triton.cdiv(M, BLOCK_R), triton.cdiv(D, BLOCK_C))
    _scatter_fill_kernel[grid](
        dummy_if_empty(src.contiguous()), source_rows.contiguous(), fill.contiguous(), out, M, D,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return out


def _triton_scatter_backward(
    grad_out: torch.Tensor,
    source_rows: torch.Tensor,
    n_src: int,
    *,
    max_programs: int | None = None,
):
    """Adjoint of ``_triton_scatter``.

    Returns ``(grad_src [n_src, D], grad_fill [D])``, both in ``grad_out.dtype`` (grad_fill is
    accumulated in fp32; the caller casts it to the fill dtype).  Every source row is assumed to
    be referenced at most once; unreferenced rows of grad_src are zero.  ``max_programs`` caps the
    number of row-programs (per column block); default 256 on CUDA, unlimited elsewhere.
    """
    M, D = grad_out.shape
    n_src = int(n_src)
    dev = grad_out.device
    grad_src = torch.zeros((n_src, D), dtype=grad_out.dtype, device=dev)
    if M == 0 or D == 0:
        return grad_src, torch.zeros((D,), dtype=grad_out.dtype, device=dev)
    BLOCK_R, BLOCK_C, num_warps = _row_blocks(D)
    n_blocks = triton.cdiv(M, BLOCK_R)
    if max_programs is None and dev.type == "cuda":
        max_programs = 256
    n_prog, blocks_per_prog = split_grid(n_blocks, max_programs)
    part_fill = torch.empty((n_prog, D), dtype=torch.float32, device=dev)
    grid = (n_prog, triton.cdiv(D, BLOCK_C))
    _scatter_fill_bwd_kernel[grid](
        grad_out.contiguous(), source_rows.contiguous(), dummy_if_empty(grad_src), part_fill,
        M, D, blocks_per_prog,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return grad_src, part_fill.sum(0).to(grad_out.dtype)


# ----------------------------------------------------------------------------- CPU kernel

def _cpu_gather(src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """src [M, d], rows [K] -> src[rows] [K, d] (C++ row copies)."""
    out = torch.empty(len(rows), src.shape[1], dtype=torch.float32)
    _ext.cpp.gather_rows(_ext.as_float32_array(src), rows.numpy(), out.numpy(), _ext.cpu_threads())
    return out.to(src.dtype)


def _cpu_scatter(src: torch.Tensor, source_rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """out[i] = src[source_rows[i]], or ``fill`` where source_rows[i] == -1. -> [M, d]."""
    out = torch.empty(len(source_rows), src.shape[1], dtype=torch.float32)
    _ext.cpp.scatter_rows_fill(_ext.as_float32_array(src), source_rows.numpy(), _ext.as_float32_array(fill), out.numpy(),
                               _ext.cpu_threads())
    return out.to(src.dtype)


def _cpu_scatter_backward(grad_out: torch.Tensor, source_rows: torch.Tensor,
                          n_src: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_src [n_src, d], grad_fill [d]), one pass over grad_out."""
    grad_src = torch.empty(n_src, grad_out.shape[1], dtype=torch.float32)
    grad_fill = torch.empty(grad_out.shape[1], dtype=torch.float32)
    _ext.cpp.scatter_rows_fill_backward(_ext.as_float32_array(grad_out), source_rows.numpy(), grad_src.numpy(),
                                        grad_fill.numpy(), _ext.cpu_threads())
    return grad_src.to(grad_out.dtype), grad_fill.to(grad_out.dtype)


# ----------------------------------------------------------------------------- autograd

_KERNELS = {
    "cpu": (_cpu_gather, _cpu_scatter, _cpu_scatter_backward),
    "triton": (_triton_gather, _triton_scatter, _triton_scatter_backward),
}


class _GatherRowsFunction(torch.autograd.Function):
    """out = src[rows]; rows are unique, so the grad is a scatter with zero fill via ``inverse``."""

    @staticmethod
    def forward(ctx, backend: str, src: torch.Tensor, rows: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        ctx.backend = backend
        ctx.save_for_backward(inverse)
        return _KERNELS[backend][0](src, rows)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        zeros = grad_out.new_zeros(grad_out.shape[1])
        return None, _KERNELS[ctx.backend][1](grad_out.contiguous(), inverse, zeros), None, None


class _ScatterRowsFillFunction(torch.autograd.Function):
    """out[i] = src[source_rows[i]] or fill; grads: src by a gather, fill by a masked row sum."""

    @staticmethod
    def forward(ctx, backend: str, src: torch.Tensor, source_rows: torch.Tensor,
                fill: torch.Tensor) -> torch.Tensor:
        ctx.backend, ctx.n_src, ctx.fill_dtype = backend, src.shape[0], fill.dtype
        ctx.save_for_backward(source_rows)
        return _KERNELS[backend][1](src, source_rows, fill)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (source_rows,) = ctx.saved_tensors
        grad_src, grad_fill = _KERNELS[ctx.backend][2](grad_out.contiguous(), source_rows, ctx.n_src)
        return None, grad_src, None, grad_fill.to(ctx.fill_dtype)


# ----------------------------------------------------------------------------- dispatch

BACKENDS = _dispatch.backends_of("masking")


def _rows_of_padded_keep(ids_keep: torch.Tensor, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_keep [B, K] -> (keep_rows [B*K], inverse [B*N] with -1 where not kept)."""
    k = ids_keep.shape[1]
    keep_rows = (ids_keep.to(torch.int64) + n * torch.arange(b, device=ids_keep.device)[:, None]).reshape(-1)
    inverse = torch.full((b * n,), -1, dtype=torch.int64, device=ids_keep.device)
    inverse.scatter_(0, keep_rows, torch.arange(b * k, device=ids_keep.device))  # ~1000x index_put_ on CPU
    check_values((inverse >= 0).sum() == b * k,
                 "ids_keep repeats a token index within a sample; keep sets must not repeat")
    return keep_rows, inverse


def _rows_of_padded_restore(ids_restore: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """ids_restore [B, N] -> source_rows [B*N]: kept row b*K + r where r < K, else -1."""
    ids = ids_restore.to(torch.int64)
    kept = ids < k
    hits = torch.zeros(b, k + 1, dtype=torch.int64, device=ids.device)
    hits.scatter_add_(1, torch.where(kept, ids, k), torch.ones_like(ids))  # column k counts the masked
    check_values((hits[:, :k] == 1).all(),
                 "ids_restore must name each of the K kept tokens exactly once per sample "
                 "(a permutation of 0..N-1, as random_masking returns)")
    return torch.where(kept, ids + k * torch.arange(b, device=ids.device)[:, None], -1).reshape(-1)


def _resolve(backend: str, data_name: str, data: torch.Tensor,
             others: dict[str, torch.Tensor] | None = None) -> str:
    """The backend that runs this call (see csfm_kernels._dispatch); ``others`` must share data's dtype."""
    _dispatch.check_same_dtype("masking", data_name, data, others or {})
    return _dispatch.resolve("masking", backend, data.device, data.dtype)


def gather_kept(tokens: torch.Tensor, keep: torch.Tensor | MaskPlan, backend: str = "auto") -> torch.Tensor:
    """Kept tokens for the encoder.

    Padded: tokens [B, N, d], keep = ids_keep [B, K] -> [B, K, d].
    Packed: tokens [sum N, d], keep = MaskPlan -> [sum K, d].
    backend: one of BACKENDS; "auto" picks per device and dtype (csfm_kernels._dispatch.AUTO).
    """
    check_float_tensor("tokens", tokens, tokens.device)
    chosen = _resolve(backend, "tokens", tokens)
    if isinstance(keep, MaskPlan):
        total = sum(keep.n_tokens)
        if tokens.dim() != 2 or tokens.shape[0] != total:
            raise ValueError(f"packed tokens must be [{total}, d] for this MaskPlan, got {tuple(tokens.shape)}")
        if chosen == "reference":
            return _packed_reference(gather_kept_reference, tokens, keep.n_tokens, keep.ids_keep, keep.n_kept)
        # source_rows is the inverse permutation of keep_rows (-1 at masked rows).
        return _GatherRowsFunction.apply(chosen, tokens, keep.keep_rows, keep.source_rows)
    if tokens.dim() != 3:
        raise ValueError(f"padded tokens must be [B, N, d], got {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[1] > n:
        raise ValueError(f"ids_keep must be [B={b}, K<={n}], got "
                         f"{tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    check_index_tensor("ids_keep", keep, (b, keep.shape[1]), tokens.device)
    check_index_range("ids_keep", keep, 0, n)
    if chosen == "reference":
        return gather_kept_reference(tokens, keep)
    keep_rows, inverse = _rows_of_padded_keep(keep, b, n)
    out = _GatherRowsFunction.apply(chosen, tokens.reshape(b * n, d), keep_rows, inverse)
    return out.reshape(b, keep.shape[1], d)


def scatter_with_mask_token(kept: torch.Tensor, restore: torch.Tensor | MaskPlan,
                            mask_token: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Decoder input: kept tokens back in place, ``mask_token`` (d values) at masked positions.

    Padded: kept [B, K, d], restore = ids_restore [B, N] -> [B, N, d].
    Packed: kept [sum K, d], restore = MaskPlan -> [sum N, d].
    mask_token must have kept's dtype; backend as in ``gather_kept``.
    """
    check_float_tensor("kept", kept, kept.device)
    check_float_tensor("mask_token", mask_token, kept.device)
    d = kept.shape[-1]
    if mask_token.numel() != d or mask_token.shape[-1] != d:
        raise ValueError(f"mask_token must hold d={d} values (shape [d] or [1, 1, d]), "
                         f"got {tuple(mask_token.shape)}")
    chosen = _resolve(backend, "kept", kept, {"mask_token": mask_token})
    if isinstance(restore, MaskPlan):
        total_kept = sum(restore.n_kept)
        if kept.dim() != 2 or kept.shape[0] != total_kept:
            raise ValueError(f"packed kept must be [{total_kept}, d] for this MaskPlan, got {tuple(kept.shape)}")
        if chosen == "reference":
            return _packed_reference(scatter_with_mask_token_reference, kept, restore.n_kept,
                                     restore.ids_restore, restore.n_tokens, mask_token)
        return _ScatterRowsFillFunction.apply(chosen, kept, restore.source_rows, mask_token.reshape(d))
    if kept.dim() != 3:
        raise ValueError(f"padded kept must be [B, K, d], got {tuple(kept.shape)}")
    b, k, _ = kept.shape
    if not isinstance(restore, torch.Tensor) or restore.dim() != 2 or restore.shape[0] != b:
        raise ValueError(f"ids_restore must be [B={b}, N], got "
                         f"{tuple(restore.shape) if isinstance(restore, torch.Tensor) else type(restore).__name__}")
    n = restore.shape[1]
    if n < k:
        raise ValueError(f"ids_restore has N={n} positions but kept has K={k} > N tokens")
    check_index_tensor("ids_restore", restore, (b, n), kept.device)
    check_index_range("ids_restore", restore, 0, n)
    if chosen == "reference":
        return scatter_with_mask_token_reference(kept, restore, mask_token)
    source_rows = _rows_of_padded_restore(restore, b, k)
    out = _ScatterRowsFillFunction.apply(chosen, kept.reshape(b * k, d), source_rows, mask_token.reshape(d))
    return out.reshape(b, n, d)
