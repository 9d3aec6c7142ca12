"""MAE masking: random_masking's plan, and gather/scatter of every backend against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from csfm_kernels import gather_kept, random_masking, scatter_with_mask_token
from helpers import ALL_BACKENDS, backends_here

RATIOS = [0.0, 0.5, 0.75, 0.99]


@settings(max_examples=40, deadline=None)
@given(n_tokens=st.lists(st.integers(0, 300), min_size=1, max_size=6),
       ratio=st.sampled_from(RATIOS + [1.0]), seed=st.integers(0, 2**16))
def test_plan_is_a_consistent_permutation(n_tokens, ratio, seed):
    plan = random_masking(n_tokens, ratio, torch.Generator().manual_seed(seed))
    kept = [int(n * (1 - ratio)) for n in n_tokens]
    assert plan.n_tokens == tuple(n_tokens) and plan.n_kept == tuple(kept)
    assert (plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]).tolist() == n_tokens
    assert (plan.cu_seqlens_keep[1:] - plan.cu_seqlens_keep[:-1]).tolist() == kept
    assert plan.mask.sum().item() == sum(n_tokens) - sum(kept)
    for b, n in enumerate(n_tokens):
        keep = plan.ids_keep[plan.cu_seqlens_keep[b]:plan.cu_seqlens_keep[b + 1]]
        restore = plan.ids_restore[plan.cu_seqlens[b]:plan.cu_seqlens[b + 1]]
        assert sorted(restore.tolist()) == list(range(n))
        assert len(set(keep.tolist())) == len(keep) and all(0 <= i < n for i in keep.tolist())
        assert restore[keep].tolist() == list(range(len(keep)))  # kept tokens come first, in order
    # source_rows inverts keep_rows; -1 exactly where masked
    assert plan.source_rows[plan.keep_rows].tolist() == list(range(sum(kept)))
    assert torch.equal(plan.source_rows < 0, plan.mask)
    # masked_rows: every masked row once, sample by sample, in noise order (after the kept ones)
    assert sorted(plan.masked_rows.tolist()) == torch.nonzero(plan.mask).flatten().tolist()
    for b in range(len(n_tokens)):
        start, n_masked = int(plan.cu_seqlens[b]), n_tokens[b] - kept[b]
        first = sum(n - k for n, k in zip(n_tokens[:b], kept[:b]))
        rows = plan.masked_rows[first:first + n_masked] - start
        assert plan.ids_restore[start + rows].tolist() == list(range(kept[b], n_tokens[b]))


def test_plan_is_deterministic_and_matches_mae():
    """Equal N: the kept set is MAE's for the same rand(B, N) draw."""
    plan = random_masking([50] * 4, 0.75, torch.Generator().manual_seed(3))
    again = random_masking([50] * 4, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(plan.ids_keep, again.ids_keep) and torch.equal(plan.mask, again.mask)
    noise = torch.rand(4, 50, generator=torch.Generator().manual_seed(3))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep, ids_restore, mask = plan.padded()
    assert torch.equal(ids_keep, ids_shuffle[:, :12])
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))
    assert mask.sum(1).tolist() == [38] * 4
    other = random_masking([50] * 4, 0.75, torch.Generator().manual_seed(4))
    assert not torch.equal(plan.ids_keep, other.ids_keep)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _gather_scatter(tokens, keep, restore, mask_token, grad_kept, grad_full, backend):
    """Values of gather_kept and scatter_with_mask_token, and the grads of tokens, kept, mask_token."""
    tokens, kept_in, mask_token = _leaf(tokens), _leaf(torch.full_like(grad_kept, 1.5, dtype=tokens.dtype)), _leaf(mask_token)
    kept = gather_kept(tokens, keep, backend=backend)
    kept.backward(grad_kept.to(kept.dtype))
    full = scatter_with_mask_token(kept_in, restore, mask_token, backend=backend)
    full.backward(grad_full.to(full.dtype))
    return kept.detach(), full.detach(), tokens.grad, kept_in.grad, mask_token.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@settings(max_examples=10, deadline=None)
@given(n_tokens=st.lists(st.integers(1, 40), min_size=1, max_size=4), d=st.sampled_from([1, 8, 24, 33]),
       ratio=st.sampled_from(RATIOS), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
@example(n_tokens=[1], d=8, ratio=0.99, dtype=torch.float32, seed=0)  # all masked
@example(n_tokens=[7, 7], d=8, ratio=0.0, dtype=torch.float32, seed=0)  # none masked
def test_gather_scatter_match_reference(backend, packed, n_tokens, d, ratio, dtype, seed):
    compare_with_reference(backend, packed, n_tokens, d, ratio, dtype, seed)


def compare_with_reference(backend, packed, n_tokens, d, ratio, dtype, seed, device="cpu"):
    """gather_kept and scatter_with_mask_token of ``backend`` vs the reference on ``device``:
    values and grads exact (pure copies), the mask-token grad (a sum) within a tolerance."""
    if not packed:
        n_tokens = [n_tokens[0]] * len(n_tokens)
    g = torch.Generator().manual_seed(seed)
    plan = random_masking(n_tokens, ratio, device=device, noise=torch.rand(len(n_tokens), max(n_tokens), generator=g))
    total, total_kept = sum(n_tokens), sum(plan.n_kept)
    tokens = torch.randn(total, d, generator=g).to(device, dtype)
    mask_token = torch.randn(1, 1, d, generator=g).to(device, dtype)
    grad_kept = torch.randn(total_kept, d, generator=g).to(device)
    grad_full = torch.randn(total, d, generator=g).to(device)
    if packed:
        keep = restore = plan
    else:
        b = len(n_tokens)
        keep, restore, _ = plan.padded()
        tokens, grad_full = tokens.reshape(b, -1, d), grad_full.reshape(b, -1, d)
        grad_kept = grad_kept.reshape(b, -1, d)
    ours = _gather_scatter(tokens, keep, restore, mask_token, grad_kept, grad_full, backend)
    ref = _gather_scatter(tokens, keep, restore, mask_token, grad_kept, grad_full, "reference")
    for name, a, r in zip(["kept", "full", "grad tokens", "grad kept"], ours[:4], ref[:4]):
        assert a.dtype == r.dtype and torch.equal(a, r), name  # pure copies: exact
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, (total / 10) ** 0.5)  # a sum over masked rows
    torch.testing.assert_close(ours[4].float(), ref[4].float(), atol=tol, rtol=tol)
    assert ours[4].dtype == mask_token.dtype
    # masked rows of the decoder input are the mask token; kept rows the kept tokens
    full = ours[1].reshape(-1, d)
    assert torch.equal(full[plan.mask], mask_token.reshape(1, d).expand(int(plan.mask.sum()), d))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_compiled_on_cuda_matches_reference(backend, packed, dtype):
    """Triton compiled for the GPU: 12-lead (1200 tokens), 1-lead (100) and one-token samples, d 768."""
    compare_with_reference(backend, packed, [1200, 100, 1, 201] if packed else [1200] * 3, 768, 0.75, dtype, seed=5,
                           device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=8, deadline=None)
@given(n_tokens=st.lists(st.integers(1, 1300), min_size=1, max_size=5), d=st.sampled_from([33, 768]),
       ratio=st.sampled_from(RATIOS), seed=st.integers(0, 2**16))
def test_compiled_on_cuda_random_shapes(n_tokens, d, ratio, seed):
    """Ragged samples of 1 to 1300 tokens (widths: odd, and the one already compiled above)."""
    compare_with_reference("triton", True, n_tokens, d, ratio, torch.float32, seed, device="cuda")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_indices_are_rejected(backend):
    tokens = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="ids_keep values must lie in"):
        gather_kept(tokens, torch.tensor([[0, 5], [1, 2]]), backend=backend)
    with pytest.raises(ValueError, match="ids_keep must be"):
        gather_kept(tokens, torch.tensor([0, 1]), backend=backend)
    with pytest.raises(ValueError, match="ids_keep must be an integer"):
        gather_kept(tokens, torch.tensor([[0.0], [1.0]]), backend=backend)
    with pytest.raises(ValueError, match="mask_token must hold d=4"):
        scatter_with_mask_token(torch.randn(2, 2, 4), torch.tensor([[0, 1, 2, 3, 4]] * 2), torch.zeros(3),
                                backend=backend)
    plan = random_masking([5, 5], 0.5)
    with pytest.raises(ValueError, match=r"packed tokens must be \[10, d\]"):
        gather_kept(torch.randn(9, 4), plan, backend=backend)
    with pytest.raises(ValueError, match=r"packed kept must be"):
        scatter_with_mask_token(torch.randn(9, 4), plan, torch.zeros(4), backend=backend)


def test_repeated_indices_are_rejected_by_fused_path():
    """The fused backward assumes permutations; a repeated index must not pass silently."""
    if "cpu" not in backends_here():
        pytest.skip("C++ extension not built")
    with pytest.raises(ValueError, match="repeats a token index"):
        gather_kept(torch.randn(1, 5, 4), torch.tensor([[1, 1]]), backend="cpu")
    with pytest.raises(ValueError, match="exactly once"):
        scatter_with_mask_token(torch.randn(1, 2, 4), torch.tensor([[0, 0, 2, 3, 4]]), torch.zeros(4),
                                backend="cpu")


def test_bad_masking_arguments():
    with pytest.raises(ValueError, match="ratio must lie in"):
        random_masking([10], 1.5)
    with pytest.raises(ValueError, match="n_tokens"):
        random_masking([10, -1], 0.5)
    with pytest.raises(ValueError, match="n_tokens"):
        random_masking([], 0.5)
    with pytest.raises(ValueError, match="equal token counts"):
        random_masking([3, 4], 0.5).padded()
