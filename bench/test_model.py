"""CSFM-Tiny on a mixed-lead batch: the packed kernel path vs the same weights with padded SDPA,
and one masked-pretraining step (tokens/s, samples/s and MFU against the same run's matmul roof).

CPU, fp32: 16 records of 10 s at 250 Hz (8 lead II = 101 tokens, 4 lead II + PPG = 201, 4
twelve-lead = 1201), no text; encoder forward and one pretraining step.
CUDA, bf16 autocast (issue #10): mixed128 (64 II, 32 II + PPG, 32 twelve-lead); one encoder
training step (forward + backward + AdamW, all tokens) of the packed path vs the padded-SDPA
model, and one full pretraining step (masking + encoder + decoder + losses); MFU against the
bf16 matmul roof measured in the same run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import csfm.model.encoder
from common import matmul_roof_tflops
from csfm.model.batch import Batch
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder, SequenceLayout
from csfm.model.pretrain import MaskedPretrainer
from csfm_kernels.varlen_attention import unpack

MIXED16 = [[1]] * 8 + [[1, 12]] * 4 + [list(range(12))] * 4
MIXED128 = [[1]] * 64 + [[1, 12]] * 32 + [list(range(12))] * 32


def mixed_batch(leads: list[list[int]], device: str, text_tokens: int = 0) -> Batch:
    g = torch.Generator().manual_seed(0)
    signals = [torch.randn(len(ids), 2500, generator=g) for ids in leads]
    batch = Batch(signals, [torch.tensor(ids) for ids in leads],
                  [torch.randint(5, 1000, (text_tokens,), generator=g) for _ in leads],
                  [torch.ones_like(s, dtype=torch.bool) for s in signals])
    return batch.to(device)


def padded_sdpa(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, generator=None, backend="auto",
                seqlens_host=None):
    """The baseline in attention only: every sequence padded to the longest, SDPA with a
    key-padding mask (varlen_attention's signature)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    pq, pk, pv = (unpack(t, cu_seqlens, max_seqlen).transpose(1, 2) for t in (q, k, v))  # [B, H, N, dh]
    keep = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)[keep]


@contextlib.contextmanager
def padded_attention():
    original = csfm.model.encoder.varlen_attention
    csfm.model.encoder.varlen_attention = padded_sdpa
    try:
        yield
    finally:
        csfm.model.encoder.varlen_attention = original


def fully_padded_forward(model: CSFMEncoder, batch: Batch) -> torch.Tensor:
    """The plain padded model: every sequence padded to the longest before the first layer,
    so norms, projections and MLPs also run on padding; SDPA with a key-padding mask. -> [B, N, d]."""
    patch_rows, n_patch = model.embed_signals(batch)
    text_rows, n_text = model.embed_text(batch)
    layout = SequenceLayout.of(n_patch, n_text, patch_rows.device)
    tokens = layout.pack(model.cls_token[0].expand(len(n_patch), -1).to(patch_rows.dtype), patch_rows,
                         text_rows.to(patch_rows.dtype))
    x = unpack(tokens, layout.cu_seqlens, layout.max_seqlen)  # [B, N, d]
    keep = torch.arange(layout.max_seqlen, device=x.device)[None, :] < torch.tensor(layout.seqlens,
                                                                                    device=x.device)[:, None]
    b, n, _ = x.shape
    for attention, feed_forward in model.transformer.layers:
        qkv = attention.to_qkv(attention.norm(x)).view(b, n, 3, attention.heads, attention.dim_head)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = attention.to_out(out.transpose(1, 2).reshape(b, n, -1)) + x
        x = feed_forward(x) + x
    return model.transformer.norm(x)


def model_flops(counter: FlopCounterMode, attention: list[tuple[int, int, list[int]]], backward: bool) -> float:
    """FLOPs of a step: what ``counter`` saw outside attention (the matmuls), plus the useful
    attention FLOPs of each (layers, heads x head_dim, sequence lengths): 4 * width * sum(L^2)
    per layer forward, 3.5x that with the backward. FlopCounterMode sees neither our Triton / C++
    attention nor (on CPU) SDPA, so attention is counted the same way for every variant."""
    other = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" not in str(op))
    useful = sum(layers * 4 * width * sum(n * n for n in lengths) for layers, width, lengths in attention)
    return other + useful * (3.5 if backward else 1.0)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def test_encoder_forward_mixed(side_by_side, device):
    if device == "cuda":
        pytest.skip("CUDA: the training step below (issue #10)")
    model = CSFMEncoder(preset("tiny")).eval()
    batch = mixed_batch(MIXED16, device)

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
        first = ours.layout.seqlens[0]
        torch.testing.assert_close(reference[0, :first], ours.tokens[:first], atol=1e-4, rtol=1e-4)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    config = model.config
    flops = model_flops(counter, [(config.depth, config.heads * config.dim_head, list(ours.layout.seqlens))], False)
    side_by_side("tiny encoder fwd", "16 rec mixed (8x101,4x201,4x1201 tok) d768 fp32",
                 {"padded SDPA model": fully_padded, "padded SDPA in attention only": padded},
                 {"ours (auto)": packed}, flops=flops, rounds=3, device=device)


def test_encoder_train_step_mixed128(side_by_side, device):
    """CUDA: one training step of the encoder alone (bf16 autocast, forward + backward + AdamW)."""
    if device == "cpu":
        pytest.skip("a CUDA case (issue #10): CPU times the forward and the pretraining step")
    model = CSFMEncoder(preset("tiny", dropout=0.0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = mixed_batch(MIXED128, device)

    def step(loss_of):
        def run():
            with _autocast(device):
                loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def packed_loss():
        return model(batch).cls.float().square().mean()

    def padded_loss():
        return fully_padded_forward(model, batch)[:, 0].float().square().mean()

    def attention_only_loss():
        with padded_attention():
            return packed_loss()

    with FlopCounterMode(display=False) as counter, _autocast(device):
        packed_loss().backward()
    model.zero_grad(set_to_none=True)
    lengths = [len(ids) * 100 + 1 for ids in MIXED128]
    config = model.config
    flops = model_flops(counter, [(config.depth, config.heads * config.dim_head, lengths)], True)
    tokens = sum(lengths)
    result = side_by_side("tiny encoder train step mixed128", "128 rec (64x101,32x201,32x1201 tok) bf16 autocast",
                          {"padded SDPA model": step(padded_loss), "padded SDPA in attention only": step(attention_only_loss)},
                          {"ours (auto)": step(packed_loss)}, flops=flops, rounds=3, device=device,
                          counts={"tokens": tokens, "samples": len(MIXED128)}, roof_tflops=matmul_roof_tflops(device))
    print(f"\n{result.case}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))


def test_pretraining_step(side_by_side, device):
    model = MaskedPretrainer(preset("tiny")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    leads = MIXED16 if device == "cpu" else MIXED128
    batch = mixed_batch(leads, device, text_tokens=32)

    def step(context=contextlib.nullcontext):
        def run():
            with context(), _autocast(device):
                out = model(batch, generator=torch.Generator(device).manual_seed(0))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    with FlopCounterMode(display=False) as counter, _autocast(device):
        model(batch, generator=torch.Generator(device).manual_seed(0)).loss.backward()
    model.zero_grad(set_to_none=True)
    config = model.config
    patches = [len(ids) * 100 for ids in leads]
    encoder = [1 + int(n * 0.25) + 16 for n in patches]  # CLS + kept 25 % of patches + kept 50 % of 32 text
    decoder = [1 + n + 32 for n in patches]
    flops = model_flops(counter, [(config.depth, config.heads * config.dim_head, encoder),
                                  (config.decoder_depth, config.decoder_dim, decoder)], True)
    shape = f"{len(leads)} rec mixed + 32 text tok, mask 75%/50%, {'fp32' if device == 'cpu' else 'bf16 autocast'}"
    tokens = sum(len(ids) * 100 + 1 + 32 for ids in leads)
    result = side_by_side("tiny pretrain step", shape, {"padded SDPA in attention": step(padded_attention)},
                          {"ours (auto)": step()}, flops=flops, rounds=3, device=device,
                          counts={"tokens": tokens, "samples": len(leads)}, roof_tflops=matmul_roof_tflops(device))
    print(f"\n{result.case}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
