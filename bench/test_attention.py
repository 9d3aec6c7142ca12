"""Varlen attention on CPU, CSFM-Tiny heads (8 x 64), fp32: our length-bucket path side by side
with padded SDPA + key-padding mask, a per-record SDPA loop and a plain length-bucket SDPA.

Useful FLOPs = 4 * heads * head_dim * sum(L_i^2) forward, 3.5x that forward + backward. A
2048^3 fp32 matmul timed in the same run is the roof. Records are interleaved in a fixed
shuffled order (as a data loader would mix them), so equal-length records are not adjacent.

    cd /work/main && python -m pytest bench/test_attention.py --benchmark-only -q -s
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csfm_kernels.varlen_attention import varlen_attention

HEADS, HEAD_DIM = 8, 64
CASES = {
    "mixed16": [101] * 8 + [201] * 4 + [1201] * 4,
    "uniform64": [101] * 64,
    "ecgtext4": [1265] * 4,
}
_ROOF: dict[str, float] = {}


def _lengths(case: str) -> list[int]:
    lengths = CASES[case]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    return [lengths[i] for i in order]


def _useful_flops(lengths: list[int]) -> float:
    return 4.0 * HEADS * HEAD_DIM * sum(n * n for n in lengths)


# --- baselines ---------------------------------------------------------------------------------

def _padded_sdpa(q, k, v, key_mask):
    """q, k, v [B, h, N, d] padded; key_mask bool [B, 1, 1, N], True for real tokens."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _loop_sdpa(q, k, v, cu):
    """One SDPA call per record on views of the packed [T, h, d] tensors."""
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        qi, ki, vi = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(outs)


def _bucket_plan(cu):
    """length -> int64 token index of all records of that length."""
    groups: dict[int, list[int]] = {}
    for a, b in zip(cu[:-1], cu[1:]):
        groups.setdefault(b - a, []).append(a)
    return {n: (torch.tensor(starts)[:, None] + torch.arange(n)).reshape(-1) for n, starts in groups.items()}


def _bucket_sdpa(q, k, v, plan):
    """Plain length buckets: index_select -> SDPA -> index_copy, autograd throughout."""
    out = torch.empty_like(q)
    for n, idx in plan.items():
        qb, kb, vb = (x.index_select(0, idx).unflatten(0, (-1, n)).transpose(1, 2) for x in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).flatten(0, 1)
        out.index_copy_(0, idx, ob)
    return out


# --- inputs ------------------------------------------------------------------------------------

def _inputs(lengths: list[int], grad: bool):
    gen = torch.Generator().manual_seed(1)
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    cu_list = [0]
    for n in lengths:
        cu_list.append(cu_list[-1] + n)
    cu = torch.tensor(cu_list, dtype=torch.int32)
    padded = []
    for x in (q, k, v):
        p = x.new_zeros(batch, longest, HEADS, HEAD_DIM)
        for i, (a, b) in enumerate(zip(cu_list[:-1], cu_list[1:])):
            p[i, : b - a] = x[a:b]
        padded.append(p.transpose(1, 2).contiguous())
    key_mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    grad_out = torch.randn(total, HEADS, HEAD_DIM, generator=gen)
    grad_padded = torch.randn(batch, HEADS, longest, HEAD_DIM, generator=gen)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        padded = [x.requires_grad_() for x in padded]
    return q, k, v, cu, cu_list, longest, padded, key_mask, grad_out, grad_padded


def _with_backward(fn, inputs, grad_out):
    """fwd + bwd: grads of ``inputs`` (no accumulation between rounds)."""
    return lambda: torch.autograd.grad(fn(), inputs, grad_out)


# --- cases -------------------------------------------------------------------------------------

def test_matmul_roof(side_by_side):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    res = side_by_side("matmul_roof", "2048x2048 @ 2048x2048 fp32",
                       baselines={"torch.mm": lambda: torch.mm(a, b)},
                       ours={"torch.mm (again)": lambda: torch.mm(a, b)},
                       flops=2.0 * 2048 ** 3, rounds=5, warmup=2)
    _ROOF["gflops"] = res.flops / min(*res.baselines.values(), *res.ours.values()) / 1e9
    print(f"\nfp32 matmul roof: {_ROOF['gflops']:.1f} GFLOP/s, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_attention(side_by_side, case, mode):
    lengths = _lengths(case)
    grad = mode == "fwd+bwd"
    q, k, v, cu, cu_list, longest, padded, key_mask, grad_out, grad_padded = _inputs(lengths, grad)
    plan = _bucket_plan(cu_list)
    variants = {
        "padded SDPA + key mask": (lambda: _padded_sdpa(*padded, key_mask), padded, grad_padded),
        "per-record SDPA loop": (lambda: _loop_sdpa(q, k, v, cu_list), (q, k, v), grad_out),
        "SDPA length buckets": (lambda: _bucket_sdpa(q, k, v, plan), (q, k, v), grad_out),
        "varlen_attention[cpu]": (lambda: varlen_attention(q, k, v, cu, longest, backend="cpu"),
                                  (q, k, v), grad_out),
    }
    fns = {name: (_with_backward(fn, ins, g) if grad else fn) for name, (fn, ins, g) in variants.items()}
    ours_name = "varlen_attention[cpu]"
    flops = _useful_flops(lengths) * (3.5 if grad else 1.0)
    shape = f"{len(lengths)} rec, {sum(lengths)} tok, 8x64 fp32"
    with torch.no_grad() if not grad else torch.enable_grad():
        res = side_by_side(f"{case} {mode}", shape,
                           baselines={n: f for n, f in fns.items() if n != ours_name},
                           ours={ours_name: fns[ours_name]}, flops=flops, rounds=5, warmup=1)
    ours = res.ours[ours_name]
    gflops = flops / ours / 1e9
    roof = _ROOF.get("gflops")
    print(f"\n{case} {mode}: ours {ours * 1e3:.1f} ms, {gflops:.1f} GFLOP/s"
          + (f" ({100 * gflops / roof:.0f}% of the {roof:.0f} GFLOP/s roof)" if roof else "")
          + f", {res.baselines['padded SDPA + key mask'] / ours:.2f}x padded SDPA, "
          + f"{min(res.baselines.values()) / ours:.2f}x the best baseline")
