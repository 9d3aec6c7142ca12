"""Fused patch embedding: every backend against the reference, values and grads."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from csfm_kernels import PatchEmbedding, PatchEmbedParams, patch_embed, patch_embed_packed
from csfm_kernels._dispatch import resolve
from csfm_kernels.patch_embed import PATCH_LEN
from helpers import ALL_BACKENDS, assert_close_by_rule


def make_params(d: int, dtype: torch.dtype = torch.float32, n_types: int = 13, n_pos: int = 100,
                seed: int = 0) -> PatchEmbedParams:
    """Random weights (LayerNorm affines away from 1/0 so their grads matter), all leaves."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).requires_grad_()

    return PatchEmbedParams(leaf(PATCH_LEN, scale=0.2, shift=1.0), leaf(PATCH_LEN, scale=0.1),
                            leaf(d, PATCH_LEN, scale=0.2), leaf(d, scale=0.1),
                            leaf(d, scale=0.2, shift=1.0), leaf(d, scale=0.1),
                            leaf(1, n_types, d), leaf(1, n_pos, d))


def cast_params(params: PatchEmbedParams, dtype: torch.dtype, device: str = "cpu") -> PatchEmbedParams:
    """Detached copies of every weight in ``dtype`` on ``device`` that require grad."""
    leaf = lambda t: t.detach().to(device, dtype).requires_grad_()  # noqa: E731
    return PatchEmbedParams(*(leaf(t) for t in params.flat()[:6]), leaf(params.channel_type),
                            leaf(params.position), params.eps)


def run_padded(x: torch.Tensor, ids: torch.Tensor, params: PatchEmbedParams, grad: torch.Tensor,
               backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the grads of x and of the eight weights for upstream grad ``grad``."""
    x = x.detach().requires_grad_()
    out = patch_embed(x, ids, params, backend=backend)
    out.backward(grad.to(out.dtype))
    leaves = [x, *params.flat()[:6], params.channel_type, params.position]
    return out.detach(), [t.grad for t in leaves]


GRAD_NAMES = ["x", "ln_patch_weight", "ln_patch_bias", "weight", "bias", "ln_embed_weight",
              "ln_embed_bias", "channel_type", "position"]


def compare_backend(backend: str, b: int, c: int, n: int, d: int, dtype: torch.dtype, seed: int,
                    device: str = "cpu") -> None:
    """``backend`` vs the fp32 reference on ``device``: values and the nine grads (half dtypes by
    the flash-attn rule against the reference computed in that dtype)."""
    g = torch.Generator().manual_seed(seed)
    x32 = (torch.randn(b, c, n * PATCH_LEN, generator=g) * 3 + 1).to(device)
    ids = torch.randint(0, 13, (b, c), generator=g).to(device)
    grad = torch.randn(b, c * n, d, generator=g).to(device)
    base = make_params(d, seed=seed)
    ref_out, ref_grads = run_padded(x32, ids, cast_params(base, torch.float32, device), grad, "reference")
    low_out, low_grads = (None, [None] * 9)
    if dtype != torch.float32:
        low_out, low_grads = run_padded(x32.to(dtype), ids, cast_params(base, dtype, device), grad, "reference")
    out, grads = run_padded(x32.to(dtype), ids, cast_params(base, dtype, device), grad, backend)
    assert out.dtype == dtype
    assert_close_by_rule(out, ref_out, low_out, atol=1e-5 if dtype == torch.float32 else 2e-3,
                         rtol=1e-5, name="out")
    for name, ours, ref, low in zip(GRAD_NAMES, grads, ref_grads, low_grads):
        assert ours is not None and ours.dtype == dtype, name
        # weight grads sum over every token: scale the tolerance with the token count
        atol = 1e-4 * (b * c * n) ** 0.5 if dtype == torch.float32 else 2e-2
        assert_close_by_rule(ours, ref, low, atol=atol, rtol=1e-4, name=f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 13), n=st.integers(1, 4),
       d=st.sampled_from([16, 24, 40, 64]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
@example(b=1, c=1, n=1, d=16, dtype=torch.float32, seed=0)  # one lead, one patch
@example(b=1, c=13, n=2, d=24, dtype=torch.float32, seed=1)  # every channel type
def test_padded_matches_reference(backend, b, c, n, d, dtype, seed):
    compare_backend(backend, b, c, n, d, dtype, seed)


@pytest.mark.parametrize("backend", [p for p in ALL_BACKENDS if p.id == "cpu"])
def test_tiny_model_width(backend):
    """d = 768, a full 10 s window of a 2-lead record: the production shape."""
    compare_backend(backend, 1, 2, 100, 768, torch.float32, seed=3)


@pytest.mark.parametrize("backend", ["reference", *ALL_BACKENDS])
def test_packed_equals_each_record_alone(backend):
    """Ragged lead counts and lengths: tokens of record i equal record i embedded alone."""
    g = torch.Generator().manual_seed(7)
    params = make_params(32)
    records = [torch.randn(1, 4 * PATCH_LEN, generator=g), torch.randn(12, 2 * PATCH_LEN, generator=g),
               torch.randn(2, 4 * PATCH_LEN, generator=g)]
    ids = [torch.tensor([1]), torch.arange(12), torch.tensor([1, 12])]
    tokens, cu = patch_embed_packed(records, ids, params, backend=backend)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 28, 36]
    for i, (rec, rec_ids) in enumerate(zip(records, ids)):
        alone = patch_embed(rec[None], rec_ids[None], params, backend="reference")[0]
        torch.testing.assert_close(tokens[cu[i]:cu[i + 1]], alone, atol=1e-5, rtol=1e-5)
    # grads flow back to every record
    tokens.sum().backward()
    assert all(p.grad is not None for p in params.flat()[:6])


def test_module_has_reference_parameter_names():
    module = PatchEmbedding(48)
    assert sorted(module.state_dict()) == sorted([
        "ts_to_patch_embedding.1.weight", "ts_to_patch_embedding.1.bias",
        "ts_to_patch_embedding.2.weight", "ts_to_patch_embedding.2.bias",
        "ts_to_patch_embedding.3.weight", "ts_to_patch_embedding.3.bias",
        "ts_channel_type_embedding", "ts_pos_embedding"])
    assert module.ts_channel_type_embedding.shape == (1, 13, 48)
    assert module.ts_pos_embedding.shape == (1, 100, 48)


def test_module_matches_its_sequential_applied_literally():
    """The fused op computes what the reference's modules compute, in their order."""
    module = PatchEmbedding(32)
    x = torch.randn(2, 3, 4 * PATCH_LEN)
    ids = torch.tensor([[0, 1, 12], [6, 7, 8]])
    literal = module.ts_to_patch_embedding(x)  # [B, C, n, d]
    literal = literal + module.ts_channel_type_embedding[0, ids][:, :, None] + module.ts_pos_embedding[0, :4]
    torch.testing.assert_close(module(x, ids), literal.flatten(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_input, match", [
    (lambda: (torch.randn(1, 2, 30), torch.zeros(1, 2, dtype=torch.long)), "multiple of the 25"),
    (lambda: (torch.randn(1, 2, 0), torch.zeros(1, 2, dtype=torch.long)), "multiple of the 25"),
    (lambda: (torch.randn(1, 2, 2525), torch.zeros(1, 2, dtype=torch.long)), "position table"),
    (lambda: (torch.randn(1, 2, 50), torch.tensor([[0, 13]])), "channel_ids values"),
    (lambda: (torch.randn(1, 2, 50), torch.tensor([[-1, 0]])), "channel_ids values"),
    (lambda: (torch.randn(1, 2, 50), torch.tensor([0, 1])), r"channel_ids must have shape \(1, 2\)"),
    (lambda: (torch.randn(2, 2, 50), torch.tensor([[0, 1]])), r"channel_ids must have shape \(2, 2\)"),
    (lambda: (torch.randn(1, 2, 50), torch.tensor([[0.0, 1.0]])), "channel_ids must be an integer"),
    (lambda: (torch.ones(1, 2, 50, dtype=torch.long), torch.tensor([[0, 1]])), "x must be a floating"),
    (lambda: (torch.randn(2, 50), torch.tensor([[0, 1]])), r"x must be \[B, C, L\]"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_names_the_argument(make_input, match, backend):
    x, ids = make_input()
    with pytest.raises(ValueError, match=match):
        patch_embed(x, ids, make_params(16), backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("b, c, n, d, dtype", [
    (1, 1, 1, 16, torch.float32),        # one lead, one patch
    *((2, 13, 100, 768, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)),  # every
    (3, 12, 7, 384, torch.bfloat16),     # channel type, full 10 s windows, CSFM-Tiny width; odd patch count
    (1, 2, 100, 1024, torch.bfloat16),   # CSFM-Large width
    (4, 3, 33, 256, torch.float16),
    (2, 5, 9, 512, torch.float32),
], ids=str)
def test_triton_compiled_on_cuda_matches_reference(b, c, n, d, dtype):
    compare_backend("triton", b, c, n, d, dtype, seed=b * 1000 + d, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_is_triton_and_packed_matches_each_record():
    params = cast_params(make_params(64), torch.float32, "cuda")
    g = torch.Generator().manual_seed(3)
    records = [torch.randn(c, L, generator=g).cuda() for c, L in ((1, 2500), (12, 1000), (2, 25))]
    ids = [torch.tensor([1]).cuda(), torch.arange(12).cuda(), torch.tensor([1, 12]).cuda()]
    tokens, cu = patch_embed_packed(records, ids, params)
    assert resolve("patch_embed", "auto", torch.device("cuda"), torch.float32) == "triton"
    offsets = cu.tolist()
    for i, (rec, rec_ids) in enumerate(zip(records, ids)):
        alone = patch_embed(rec[None], rec_ids[None], params, backend="reference")[0]
        torch.testing.assert_close(tokens[offsets[i]:offsets[i + 1]], alone, atol=1e-5, rtol=1e-5)


def test_bad_params_and_backend():
    x, ids = torch.randn(1, 1, 50), torch.zeros(1, 1, dtype=torch.long)
    params = make_params(16)._replace(bias=torch.zeros(17))
    with pytest.raises(ValueError, match=r"params.bias must have shape \(16,\)"):
        patch_embed(x, ids, params)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_embed(x, ids, make_params(16), backend="cuda")
    with pytest.raises(ValueError, match=r"records\[1\]"):
        patch_embed_packed([torch.randn(1, 50), torch.randn(1, 40)],
                           [torch.tensor([0]), torch.tensor([0])], make_params(16))
