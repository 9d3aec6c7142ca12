"""Compute kernels of csfm: each op has a reference, a Triton kernel, a CPU kernel and one
dispatching entry point (the backends, dtypes and "auto" choices of all ops are in
``csfm_kernels._dispatch``). Knows nothing of ``csfm``. The numba signal kernels of the
preprocessing are in ``csfm_kernels.signal`` (not imported here, so importing the torch ops
does not compile or load numba)."""
from csfm_kernels._dispatch import BackendUnavailable, op_backends
from csfm_kernels.build_info import build_info
from csfm_kernels.masking import (
    MaskPlan,
    gather_kept,
    gather_kept_reference,
    random_masking,
    scatter_with_mask_token,
    scatter_with_mask_token_reference,
)
from csfm_kernels.modules import PatchEmbedding, add_patch_embedding, patch_embed_params
from csfm_kernels.segments import cu_seqlens_from_lengths, host_segment_positions, host_to_device, segment_positions
from csfm_kernels.varlen_attention import pack, unpack, varlen_attention
from csfm_kernels.patch_embed import (
    PATCH_LEN,
    PatchEmbedParams,
    patch_embed,
    patch_embed_packed,
    patch_embed_tokens_reference,
    patch_token_ids,
)

__all__ = [
    "PATCH_LEN", "BackendUnavailable", "MaskPlan", "PatchEmbedParams", "PatchEmbedding", "add_patch_embedding",
    "build_info", "cu_seqlens_from_lengths", "gather_kept", "gather_kept_reference", "host_segment_positions",
    "host_to_device", "op_backends", "pack", "patch_embed", "patch_embed_packed", "patch_embed_params",
    "patch_embed_tokens_reference", "patch_token_ids", "random_masking", "scatter_with_mask_token",
    "scatter_with_mask_token_reference", "segment_positions", "unpack", "varlen_attention",
]
