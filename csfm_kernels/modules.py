"""nn.Module wrappers of the ops, with the reference model's parameter names."""
from __future__ import annotations

import torch
from torch import nn

from csfm_kernels._dispatch import check_backend_name
from csfm_kernels.patch_embed import PATCH_LEN, PatchEmbedParams, patch_embed, patch_embed_packed

N_CHANNEL_TYPES = 13  # I, II, III, aVR, aVL, aVF, V1..V6, PPG
N_POSITIONS = 100  # patches per channel in a 10 s, 250 Hz window


class Patchify(nn.Module):
    """[B, C, L] -> [B, C, L/25, 25]; index 0 of ``ts_to_patch_embedding`` (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, PATCH_LEN))


def add_patch_embedding(module: nn.Module, dim: int, n_channel_types: int = N_CHANNEL_TYPES,
                        n_positions: int = N_POSITIONS) -> None:
    """Registers the reference's patch-embedding weights on ``module`` under their names:
    ``ts_to_patch_embedding`` (Patchify, LayerNorm(25), Linear(25, d), LayerNorm(d)),
    ``ts_channel_type_embedding`` [1, 13, d], ``ts_pos_embedding`` [1, 100, d]."""
    module.ts_to_patch_embedding = nn.Sequential(
        Patchify(), nn.LayerNorm(PATCH_LEN), nn.Linear(PATCH_LEN, dim), nn.LayerNorm(dim))
    module.ts_channel_type_embedding = nn.Parameter(torch.randn(1, n_channel_types, dim))
    module.ts_pos_embedding = nn.Parameter(torch.randn(1, n_positions, dim))


def patch_embed_params(module: nn.Module) -> PatchEmbedParams:
    """The op's weights, read from a module set up by ``add_patch_embedding``."""
    _, ln_patch, linear, ln_embed = module.ts_to_patch_embedding
    return PatchEmbedParams(ln_patch.weight, ln_patch.bias, linear.weight, linear.bias,
                            ln_embed.weight, ln_embed.bias, module.ts_channel_type_embedding,
                            module.ts_pos_embedding, ln_embed.eps)


class PatchEmbedding(nn.Module):
    """Signal patches -> tokens, with the reference's parameter names (see add_patch_embedding)."""

    def __init__(self, dim: int, n_channel_types: int = N_CHANNEL_TYPES,
                 n_positions: int = N_POSITIONS, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name("patch_embed", backend)
        add_patch_embedding(self, dim, n_channel_types, n_positions)
        self.backend = backend

    def params(self) -> PatchEmbedParams:
        return patch_embed_params(self)

    def forward(self, x: torch.Tensor, channel_ids: torch.Tensor) -> torch.Tensor:
        """x [B, C, L] (L a multiple of 25), channel_ids [B, C] -> [B, C*L/25, d]."""
        return patch_embed(x, channel_ids, self.params(), self.backend)

    def forward_packed(self, records: list[torch.Tensor],
                       channel_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """records[i] [C_i, L_i] -> (tokens [sum C_i*L_i/25, d], cu_seqlens int32 [B+1])."""
        return patch_embed_packed(records, channel_ids, self.params(), self.backend)
