"""Compute kernels of csfm: each op has a reference, a Triton kernel, a CPU kernel and one
dispatching entry point (the backends, dtypes and "auto" choices of all ops are in
``csfm_kernels._dispatch``). Knows nothing of ``csfm``."""
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
from csfm_kernels.modules import PatchEmbedding
from csfm_kernels.varlen_attention import pack, unpack, varlen_attention
from csfm_kernels.patch_embed import (
    PatchEmbedParams,
    patch_embed,
    patch_embed_packed,
    patch_embed_tokens_reference,
)

__all__ = [
    "BackendUnavailable", "MaskPlan", "PatchEmbedParams", "PatchEmbedding", "build_info", "gather_kept",
    "gather_kept_reference", "op_backends", "patch_embed", "patch_embed_packed", "patch_embed_tokens_reference",
    "pack", "random_masking", "scatter_with_mask_token", "scatter_with_mask_token_reference", "unpack",
    "varlen_attention",
]
