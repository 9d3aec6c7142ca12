"""Fused CPU kernels vs the eager torch reference on CSFM-Tiny shapes (d = 768), same run.

patch embedding: 16 records, 8 single-lead, 4 two-lead, 4 twelve-lead, 2500 samples each
(64 channels, 6400 tokens). masking: MAE gather of the kept 25 % and mask-token scatter,
padded B 16 x N 1200 and packed mixed (8 x 100, 4 x 200, 4 x 1200 tokens).
"""
from __future__ import annotations

import pytest
import torch

from csfm_kernels import PatchEmbedding, gather_kept, random_masking, scatter_with_mask_token
from csfm_kernels import _ext

D = 768
LEAD_COUNTS = [1] * 8 + [2] * 4 + [12] * 4

pytestmark = pytest.mark.skipif(_ext.cpp is None, reason=f"C++ extension not built: {_ext.cpp_error}")


@pytest.fixture(scope="module")
def mixed_records():
    g = torch.Generator().manual_seed(0)
    records = [torch.randn(c, 2500, generator=g) for c in LEAD_COUNTS]
    ids = [torch.tensor([1]) if c == 1 else torch.tensor([1, 12]) if c == 2 else torch.arange(12)
           for c in LEAD_COUNTS]
    return records, ids


def _forward(module, records, ids):
    def run():
        with torch.no_grad():
            module.forward_packed(records, ids)
    return run


def _forward_backward(module, records, ids, grad):
    def run():
        tokens, _ = module.forward_packed(records, ids)
        tokens.backward(grad)
    return run


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_patch_embed(side_by_side, mixed_records, mode):
    records, ids = mixed_records
    reference = PatchEmbedding(D, backend="reference")
    fused = PatchEmbedding(D, backend="cpu")
    fused.load_state_dict(reference.state_dict())
    n_tokens = sum(c * 100 for c in LEAD_COUNTS)
    shape = f"16 rec (8x1,4x2,4x12 leads) L2500 d{D} T{n_tokens}"
    if mode == "fwd":
        baseline, ours = _forward(reference, records, ids), _forward(fused, records, ids)
    else:
        records = [r.requires_grad_() for r in records]
        grad = torch.randn(n_tokens, D)
        baseline = _forward_backward(reference, records, ids, grad)
        ours = _forward_backward(fused, records, ids, grad)
    side_by_side(f"patch_embed {mode}", shape, {"torch eager reference": baseline},
                 {"fused C++": ours}, flops=2.0 * n_tokens * 25 * D * (1 if mode == "fwd" else 3))


def _masking_case(tokens, keep, restore, mask_token, backend, backward, grads):
    def run():
        kept = gather_kept(tokens, keep, backend=backend)
        full = scatter_with_mask_token(kept, restore, mask_token, backend=backend)
        if backward:
            full.backward(grads)
    return run


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masking(side_by_side, layout, mode):
    n_tokens = [1200] * 16 if layout == "padded" else [c * 100 for c in LEAD_COUNTS]
    plan = random_masking(n_tokens, 0.75, torch.Generator().manual_seed(0))
    backward = mode == "fwd+bwd"
    tokens = torch.randn(sum(n_tokens), D, requires_grad=backward)
    mask_token = torch.zeros(1, 1, D, requires_grad=backward)
    grads = torch.randn(sum(n_tokens), D)
    if layout == "padded":
        ids_keep, ids_restore, _ = plan.padded()
        tokens = tokens.detach().reshape(16, 1200, D).requires_grad_(backward)
        grads = grads.reshape(16, 1200, D)
        keep, restore = ids_keep, ids_restore
    else:
        keep = restore = plan
    shape = f"{layout} N={'16x1200' if layout == 'padded' else 'mixed 8x100,4x200,4x1200'} d{D} keep25%"
    context = torch.enable_grad() if backward else torch.no_grad()
    with context:
        side_by_side(f"mask gather+scatter {mode}", shape,
                     {"torch eager reference": _masking_case(tokens, keep, restore, mask_token, "reference",
                                                             backward, grads)},
                     {"fused C++": _masking_case(tokens, keep, restore, mask_token, "cpu", backward, grads)})
