"""Patch embedding and MAE masking: our fused path ("auto": the C++ kernels on CPU, Triton on
CUDA) against PyTorch's best in the same run, on CSFM-Tiny shapes (d = 768), fp32.

PyTorch's best is the fastest of: the eager reference (the published modules, embedding tables
gathered per token; masking per sample with torch.gather), a vectorised eager version written as
a good PyTorch user would (all channels through the modules at once with the channel-type and
position tables broadcast; masking as flat index_select / torch.gather), and torch.compile of
that vectorised version (skipped with its reason where it fails to compile).

patch embedding: 16 records, 8 single-lead, 4 two-lead, 4 twelve-lead, 2500 samples each (64
channels, 6400 tokens); forward + backward gives the weights' grads (signals are data, as in
training). masking: MAE gather of the kept 25 % and mask-token scatter, padded B 16 x N 1200
and packed mixed (8 x 100, 4 x 200, 4 x 1200 tokens).

    python -m pytest bench/test_kernels.py --benchmark-only -q -s
"""
from __future__ import annotations

import pytest
import torch

from common import try_compile
from csfm_kernels import PatchEmbedding, gather_kept, random_masking, scatter_with_mask_token
from csfm_kernels._dispatch import resolve

D = 768
LEAD_COUNTS = [1] * 8 + [2] * 4 + [12] * 4


def _mixed_records(device: str):
    g = torch.Generator().manual_seed(0)
    records = [torch.randn(c, 2500, generator=g).to(device) for c in LEAD_COUNTS]
    ids = [torch.tensor([1]) if c == 1 else torch.tensor([1, 12]) if c == 2 else torch.arange(12)
           for c in LEAD_COUNTS]
    return records, [i.to(device) for i in ids]


def vectorised_patch_embed(module: PatchEmbedding, records: list[torch.Tensor],
                           ids: list[torch.Tensor]) -> torch.Tensor:
    """All channels (equal lengths) through the modules at once; tables broadcast per channel
    and per position instead of gathered per token -> tokens [sum C * L / 25, d], channel-major."""
    x = torch.cat(records)  # [M, L]
    h = module.ts_to_patch_embedding(x)  # [M, L / 25, d]
    h = h + module.ts_channel_type_embedding[0, torch.cat(ids)][:, None, :] + module.ts_pos_embedding[0, :h.shape[1]]
    return h.flatten(0, 1)


def _params(module: PatchEmbedding) -> list[torch.Tensor]:
    return [p for p in module.parameters()]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_patch_embed(side_by_side, device, mode):
    records, ids = _mixed_records(device)
    reference = PatchEmbedding(D, backend="reference").to(device)
    fused = PatchEmbedding(D).to(device)
    fused.load_state_dict(reference.state_dict())
    n_tokens = sum(c * 100 for c in LEAD_COUNTS)
    grad = torch.randn(n_tokens, D, device=device)
    with torch.no_grad():  # every variant computes the same tokens
        expected = reference.forward_packed(records, ids)[0]
        torch.testing.assert_close(vectorised_patch_embed(reference, records, ids), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused.forward_packed(records, ids)[0], expected, atol=1e-4, rtol=1e-4)
    compiled, why = try_compile(vectorised_patch_embed, reference, records, ids)
    backward = mode == "fwd+bwd"

    def variant(fn, module):
        def run():
            if not backward:
                with torch.no_grad():
                    return fn()
            return torch.autograd.grad(fn(), _params(module), grad)
        return run

    baselines = {
        "torch eager reference": variant(lambda: reference.forward_packed(records, ids)[0], reference),
        "torch vectorised": variant(lambda: vectorised_patch_embed(reference, records, ids), reference),
        "torch.compile vectorised": compiled and variant(lambda: compiled(reference, records, ids), reference),
    }
    chosen = resolve("patch_embed", "auto", torch.device(device), torch.float32)
    side_by_side(f"patch_embed {mode}", f"16 rec (8x1,4x2,4x12 leads) L2500 d{D} T{n_tokens} fp32",
                 baselines, {"ours (auto)": variant(lambda: fused.forward_packed(records, ids)[0], fused)},
                 flops=2.0 * n_tokens * 25 * D * (1 if mode == "fwd" else 3), device=device,
                 notes=(f"ours (auto) = backend {chosen!r}", *([why] if why else [])))


def flat_gather(tokens: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
    """Kept rows of the flat tokens [M, d]: one index_select."""
    return tokens.index_select(0, keep_rows)


def flat_scatter(kept: torch.Tensor, fill_index: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Decoder input [M, d]: kept rows in place, the mask token (appended as row K) elsewhere;
    fill_index [M] holds each row's kept row, or K where masked."""
    return torch.cat([kept, mask_token.reshape(1, -1)]).index_select(0, fill_index)


def vectorised_masking(tokens: torch.Tensor, keep_rows: torch.Tensor, fill_index: torch.Tensor,
                       mask_token: torch.Tensor) -> torch.Tensor:
    return flat_scatter(flat_gather(tokens.reshape(-1, tokens.shape[-1]), keep_rows), fill_index, mask_token)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masking(side_by_side, device, layout, mode):
    if device == "cuda" and mode == "fwd":
        pytest.skip("CUDA: forward + backward only (issue #10's goal; each case compiles a baseline)")
    n_tokens = [1200] * 16 if layout == "padded" else [c * 100 for c in LEAD_COUNTS]
    plan = random_masking(n_tokens, 0.75, device=device,
                          noise=torch.rand(len(n_tokens), max(n_tokens), generator=torch.Generator().manual_seed(0)))
    backward = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(sum(n_tokens), D, generator=g).to(device).requires_grad_(backward)
    mask_token = torch.zeros(1, 1, D, device=device, requires_grad=backward)
    grads = torch.randn(sum(n_tokens), D, generator=g).to(device)
    fill_index = torch.where(plan.source_rows >= 0, plan.source_rows, sum(plan.n_kept))
    if layout == "padded":
        ids_keep, ids_restore, _ = plan.padded()
        tokens, grads = flat.reshape(16, 1200, D), grads.reshape(16, 1200, D)
        keep, restore = ids_keep, ids_restore
    else:
        tokens, keep, restore = flat, plan, plan
    leaves = [flat, mask_token]

    def variant(fn):
        def run():
            if not backward:
                with torch.no_grad():
                    return fn()
            out = fn()
            return torch.autograd.grad(out, leaves, grads.reshape(out.shape))
        return run

    def ops(backend):
        return lambda: scatter_with_mask_token(gather_kept(tokens, keep, backend=backend), restore, mask_token,
                                               backend=backend)

    expected = ops("reference")()
    torch.testing.assert_close(vectorised_masking(tokens, plan.keep_rows, fill_index, mask_token).reshape(expected.shape),
                               expected, atol=0, rtol=0)
    compiled, why = try_compile(vectorised_masking, tokens, plan.keep_rows, fill_index, mask_token)
    baselines = {
        "torch eager reference": variant(ops("reference")),
        "torch vectorised": variant(lambda: vectorised_masking(tokens, plan.keep_rows, fill_index, mask_token)),
        "torch.compile vectorised": compiled and variant(lambda: compiled(tokens, plan.keep_rows, fill_index, mask_token)),
    }
    shape = f"{'B16 x N1200' if layout == 'padded' else 'mixed 8x100,4x200,4x1200'} d{D} keep25% fp32"
    chosen = resolve("masking", "auto", torch.device(device), torch.float32)
    side_by_side(f"mask gather+scatter {mode} {layout}", shape, baselines, {"ours (auto)": variant(ops("auto"))},
                 device=device, notes=(f"ours (auto) = backend {chosen!r}", *([why] if why else [])))
