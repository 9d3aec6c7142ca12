"""CSFM-Tiny on a mixed-lead batch: the packed kernel path vs the same weights with padded
SDPA, and one masked-pretraining step (tokens/s and MFU against the same run's fp32 roof).

Mixed batch: 16 records of 10 s at 250 Hz, 8 lead II (101 tokens), 4 lead II + PPG (201),
4 twelve-lead (1201), no text. fp32.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import csfm.model
from csfm.batch import Batch
from csfm.config import preset
from csfm.model import CSFMEncoder, SequenceLayout
from csfm.pretrain import MaskedPretrainer
from csfm_kernels.varlen_attention import unpack

LEADS = [[1]] * 8 + [[1, 12]] * 4 + [list(range(12))] * 4


def mixed_batch(text_tokens: int = 0) -> Batch:
    g = torch.Generator().manual_seed(0)
    signals = [torch.randn(len(ids), 2500, generator=g) for ids in LEADS]
    return Batch(signals, [torch.tensor(ids) for ids in LEADS],
                 [torch.randint(5, 1000, (text_tokens,), generator=g) for _ in LEADS],
                 [torch.ones_like(s, dtype=torch.bool) for s in signals])


def padded_sdpa(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, generator=None, backend="auto"):
    """The baseline: every sequence padded to the longest, SDPA with a key-padding mask."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    pq, pk, pv = (unpack(t, cu_seqlens, max_seqlen).transpose(1, 2) for t in (q, k, v))  # [B, H, N, dh]
    keep = torch.arange(max_seqlen)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)[keep]


@contextlib.contextmanager
def padded_attention():
    original = csfm.model.varlen_attention
    csfm.model.varlen_attention = padded_sdpa
    try:
        yield
    finally:
        csfm.model.varlen_attention = original


def fully_padded_forward(model: CSFMEncoder, batch: Batch) -> torch.Tensor:
    """The plain padded model: every sequence padded to the longest before the first layer,
    so norms, projections and MLPs also run on padding; SDPA with a key-padding mask."""
    patch_rows, n_patch = model.embed_signals(batch)
    text_rows, n_text = model.embed_text(batch)
    layout = SequenceLayout.of(n_patch, n_text)
    tokens = layout.pack(model.cls_token[0].expand(len(n_patch), -1), patch_rows, text_rows)
    x = unpack(tokens, layout.cu_seqlens, layout.max_seqlen)  # [B, N, d]
    lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).to(torch.int64)
    keep = torch.arange(layout.max_seqlen)[None, :] < lengths[:, None]
    b, n, _ = x.shape
    for attention, feed_forward in model.transformer.layers:
        qkv = attention.to_qkv(attention.norm(x)).view(b, n, 3, attention.heads, attention.dim_head)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = attention.to_out(out.transpose(1, 2).reshape(b, n, -1)) + x
        x = feed_forward(x) + x
    return model.transformer.norm(x)


def matmul_roof_gflops(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def test_encoder_forward_mixed(side_by_side):
    model = CSFMEncoder(preset("tiny")).eval()
    batch = mixed_batch()

    def packed():
        with torch.no_grad():
            model(batch)

    def padded():
        with torch.no_grad(), padded_attention():
            model(batch)

    def fully_padded():
        with torch.no_grad():
            fully_padded_forward(model, batch)

    with torch.no_grad():  # the baseline computes the same states
        reference = fully_padded_forward(model, batch)
        ours = model(batch)
        lengths = (ours.layout.cu_seqlens[1:] - ours.layout.cu_seqlens[:-1]).tolist()
        torch.testing.assert_close(reference[0, :lengths[0]], ours.tokens[:lengths[0]], atol=1e-4, rtol=1e-4)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    side_by_side("tiny encoder fwd", "16 rec mixed (8x101,4x201,4x1201 tok) d768",
                 {"padded model (all layers)": fully_padded, "padded SDPA in attention only": padded},
                 {"packed kernels": packed}, flops=counter.get_total_flops(), rounds=3)


def test_pretraining_step(side_by_side):
    model = MaskedPretrainer(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = mixed_batch(text_tokens=32)

    def step(context=contextlib.nullcontext):
        def run():
            with context():
                out = model(batch, generator=torch.Generator().manual_seed(0))
                out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    with FlopCounterMode(display=False) as counter:
        model(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    roof = matmul_roof_gflops()
    result = side_by_side("tiny pretrain step", "16 rec mixed + 32 text tok, mask 75%/50%",
                          {"padded SDPA + mask": step(padded_attention)}, {"packed kernels": step()},
                          flops=flops, rounds=3)
    seconds = result.ours["packed kernels"]
    tokens = sum(len(ids) * 100 + 1 + 32 for ids in LEADS)
    result.notes.append(f"fp32 roof {roof:.0f} GFLOP/s; packed step {tokens / seconds:.0f} tokens/s, "
                        f"{len(LEADS) / seconds:.1f} samples/s, MFU {flops / seconds / 1e9 / roof:.1%}")
    print("\n" + result.notes[-1])
