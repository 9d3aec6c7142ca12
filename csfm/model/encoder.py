"""The CSFM encoder: [CLS] + 100 patch tokens per channel + text tokens, pre-norm transformer.

Parameter names follow the published model (docs/design.md, "Model layout") so its checkpoints load. Every
sequence of a batch is packed: tokens ``[sum_b T_b, d]`` with ``cu_seqlens [B+1]``, so a
batch mixing a 1-lead and a 12-lead record costs the sum of their attention, not B times
the longest. ``backend`` picks the kernels of every op (``csfm_kernels.op_backends``: one name
for all ops, or {op: name}); ``backend="reference"`` runs the plain-torch reference of every
op (same weights, same outputs within 1e-5 in fp32) for testing.

Token counts come from the batch's shapes, on the host: the forward reads nothing back from
the device (no host sync on CUDA), so a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from csfm.model.batch import Batch
from csfm.model.config import ModelConfig
from csfm.model.token_rhythm import RHYTHM_WIDTH, PatchPlaces, token_rhythm
from csfm_kernels import (PATCH_LEN, add_patch_embedding, cu_seqlens_from_lengths, host_segment_positions,
                          host_to_device, op_backends, patch_embed_packed, patch_embed_params, segment_positions,
                          varlen_attention)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over packed sequences (``transformer.layers.N.0``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout_p = heads, dim_head, dropout
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                backend: str = "auto", seqlens_host: Sequence[int] | None = None) -> torch.Tensor:
        """x [T, d] packed, cu_seqlens int32 [B+1] (seqlens_host: its lengths as host ints) -> [T, d]."""
        qkv = self.to_qkv(self.norm(x)).view(x.shape[0], 3, self.heads, self.dim_head)
        q, k, v = qkv.unbind(1)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen,
                               dropout_p=self.dropout_p if self.training else 0.0,
                               backend=backend, seqlens_host=seqlens_host)
        return self.to_out(out.reshape(x.shape[0], -1))


class FeedForward(nn.Module):
    """Pre-norm MLP with GELU (``transformer.layers.N.1.net``)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """``depth`` pre-norm blocks and a final LayerNorm (``transformer.layers``, ``transformer.norm``)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                backend: str = "auto", seqlens_host: Sequence[int] | None = None) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = attention(x, cu_seqlens, max_seqlen, backend, seqlens_host=seqlens_host) + x
            x = feed_forward(x) + x
        return self.norm(x)


@dataclass
class EncoderOutput:
    """tokens [T, d] packed final states of every sequence; layout: where CLS, patches and
    text sit in them; cls [B, d] (pooled = CLS, as in the reference); mean [B, d] (mean of
    non-CLS tokens). A record longer than 10 s is encoded as consecutive 10 s windows
    (window_owner [W] gives each sequence's record) and its cls / mean are the means over
    its windows."""

    tokens: torch.Tensor
    layout: "SequenceLayout"
    cls: torch.Tensor
    mean: torch.Tensor
    window_owner: torch.Tensor | None = None
    patch_places: PatchPlaces | None = None
    """Where each patch token sits (``token_rhythm.patch_places``), where the encoder was given
    the batch (``encode_valid``, ``forward``)."""


def sincos_table(n_positions: int, dim: int) -> torch.Tensor:
    """[n_positions, dim] sine/cosine position table (Transformer / MAE style), the initial
    value of the learned position embeddings: patches at the same time in different
    channels start out alike, so attention can line channels up from the first step."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    freq = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float64) * (torch.log(torch.tensor(10000.0)) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table.float()


@dataclass
class SequenceLayout:
    """Where each part of every sample sits in the packed [CLS, patches, text] sequences.

    cls_rows [B], patch_rows [sum n_patch], text_rows [sum n_text]: int64 row indices into
    the packed tokens; cu_seqlens int32 [B+1]; max_seqlen: the longest sequence; seqlens: every
    sequence's length as host ints (what varlen attention needs to skip a device read).
    """

    cls_rows: torch.Tensor
    patch_rows: torch.Tensor
    text_rows: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seqlens: tuple[int, ...]

    @classmethod
    def of(cls, n_patch: Sequence[int] | torch.Tensor, n_text: Sequence[int] | torch.Tensor,
           device: torch.device | str | None = None) -> "SequenceLayout":
        """Token counts per sample, n_patch [B] and n_text [B] (host ints; a tensor is read
        once) -> the layout on ``device`` of 1 + n_patch + n_text rows each."""
        n_patch, n_text = _host_ints(n_patch), _host_ints(n_text)
        lengths = [1 + p + t for p, t in zip(n_patch, n_text)]
        start = list(itertools.accumulate(lengths[:-1], initial=0))
        return cls(host_to_device(start, device), _rows_after([s + 1 for s in start], n_patch, device),
                   _rows_after([s + 1 + p for s, p in zip(start, n_patch)], n_text, device),
                   cu_seqlens_from_lengths(lengths, device), max(lengths), tuple(lengths))

    def pack(self, cls_rows: torch.Tensor, patch_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        """cls [B, d], patches [sum n_patch, d], text [sum n_text, d] -> packed [T, d]."""
        target = torch.cat([self.cls_rows, self.patch_rows, self.text_rows])
        source = torch.cat([cls_rows, patch_rows, text_rows])
        return torch.empty_like(source).index_copy(0, target, source)

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """packed [T, d] -> (cls [B, d], patches [sum n_patch, d], text [sum n_text, d])."""
        return tokens[self.cls_rows], tokens[self.patch_rows], tokens[self.text_rows]


def _host_ints(counts: Sequence[int] | torch.Tensor) -> list[int]:
    """Counts as host ints (a tensor is read back once: pass host ints to avoid that)."""
    return [int(n) for n in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]


def positions_within(counts: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    """0, 1, ..., counts[b]-1 for every b (host ints), concatenated: int64 [sum counts] on ``device``."""
    return host_segment_positions(counts, device)[1]


def _rows_after(first: Sequence[int], counts: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    """Rows first[b], first[b]+1, ..., first[b]+counts[b]-1 for every b (host ints), concatenated,
    int64 on ``device``."""
    owner, within = host_segment_positions(counts, device)
    return host_to_device(first, device)[owner] + within


def segment_mean(tokens: torch.Tensor, cu_seqlens: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """Mean of each packed sequence's rows after its first ``skip_first``: [T, d] -> [B, d].
    A sequence with no such rows gives zeros. Reads nothing back from the device."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    owner, within = segment_positions(lengths, total=tokens.shape[0])
    keep = (within >= skip_first)[:, None]
    sums = torch.zeros(len(lengths), tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
    sums.index_add_(0, owner, torch.where(keep, tokens, 0))
    counts = (lengths - skip_first).clamp(min=1).to(tokens.dtype)
    return sums / counts[:, None]


TOKEN_POOLINGS = ("cls", "mean", "mean+std", "mean+std+rhythm")


def check_token_pooling(pooling: str) -> None:
    """ValueError unless ``pooling`` is one of TOKEN_POOLINGS."""
    if pooling not in TOKEN_POOLINGS:
        raise ValueError(f"pooling must be one of {TOKEN_POOLINGS}, got {pooling!r}")


def pooled_width(dim: int, pooling: str) -> int:
    """Width of :func:`pool_tokens`'s vectors for an encoder of width ``dim``."""
    check_token_pooling(pooling)
    return {"mean+std": 2 * dim, "mean+std+rhythm": 2 * dim + RHYTHM_WIDTH}.get(pooling, dim)


def pool_tokens(out: "EncoderOutput", pooling: str) -> torch.Tensor:
    """One float32 vector per sample: "cls" [B, d], "mean" of the non-CLS tokens [B, d],
    "mean+std" [B, 2 d], their mean and standard deviation side by side, or "mean+std+rhythm"
    [B, 2 d + RHYTHM_WIDTH], those and how alike the patch tokens are 0.1-2.5 s apart, and how
    steadily (``csfm.model.token_rhythm``; needs out.patch_places). The last two take samples of at most
    one window; the std is floored at 1e-6 so its gradient stays finite."""
    check_token_pooling(pooling)
    if pooling in ("cls", "mean"):
        return (out.cls if pooling == "cls" else out.mean).float()
    if out.window_owner is not None:
        raise ValueError(f"{pooling} pooling takes windows of at most 10 s")
    tokens, mean = out.tokens.float(), out.mean.float()
    variance = segment_mean(tokens * tokens, out.layout.cu_seqlens) - mean ** 2
    pooled = [mean, variance.clamp(min=1e-12).sqrt()]
    if pooling == "mean+std+rhythm":
        if out.patch_places is None:
            raise ValueError("mean+std+rhythm pooling needs the patch tokens' places: encode with "
                             "encode_valid or forward")
        pooled.append(token_rhythm(out.tokens[out.layout.patch_rows], out.patch_places))
    return torch.cat(pooled, dim=1)


RECORD_POOLINGS = ("mean", "mean+max")


def pool_by_owner(rows: torch.Tensor, owner: torch.Tensor, n: int, pooling: str = "mean") -> torch.Tensor:
    """Window vectors -> one vector per owner (the windows of a long sample, of a record).

    rows [W, d]; owner [W] int64 (on the CPU) in 0..n-1. pooling "mean": [n, d] the mean of
    each owner's rows; "mean+max": [n, 2 d] their mean and elementwise max side by side.
    Computed in rows' dtype (pass float64 for exact record means); an owner without rows
    gets zeros."""
    if pooling not in RECORD_POOLINGS:
        raise ValueError(f"pooling must be one of {RECORD_POOLINGS}, got {pooling!r}")
    counts = torch.bincount(owner, minlength=n).clamp(min=1).to(rows.device, rows.dtype, non_blocking=True)
    owner = owner.to(rows.device, non_blocking=True)
    sums = torch.zeros(n, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add(0, owner, rows)
    mean = sums / counts[:, None]
    if pooling == "mean":
        return mean
    index = owner[:, None].expand_as(rows)
    top = torch.zeros_like(mean).scatter_reduce(0, index, rows, "amax", include_self=False)
    return torch.cat([mean, top], dim=1)


class CSFMEncoder(nn.Module):
    """The published encoder's layout; takes a Batch of any lead sets, lengths and texts.

    backend: one name for every op, or {op: name} (ops left out: "auto"); checked here and
    passed to each op as it is, so the backend named is the one that runs (or the op raises
    BackendUnavailable). ``backends`` holds the choice per op.
    """

    def __init__(self, config: ModelConfig, backend: str | Mapping[str, str] = "auto") -> None:
        super().__init__()
        self.config, self.backends = config, op_backends(backend)
        d = config.dim
        add_patch_embedding(self, d, config.n_channel_types, config.n_positions)
        self.text_to_embedding = nn.Sequential(nn.Embedding(config.vocab_size, d), nn.LayerNorm(d))
        self.text_pos_embedding = nn.Parameter(torch.randn(1, config.max_text_tokens, d))
        self.text_type_embedding = nn.Parameter(torch.randn(1, 1, d))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.transformer = Transformer(d, config.depth, config.heads, config.dim_head, config.mlp_dim,
                                       config.dropout)
        with torch.no_grad():  # a published checkpoint replaces all of these
            self.ts_pos_embedding.copy_(sincos_table(config.n_positions, d)[None])
            self.text_pos_embedding.copy_(sincos_table(config.max_text_tokens, d)[None])
            for table in (self.ts_channel_type_embedding, self.text_type_embedding, self.cls_token):
                table.normal_(0.0, 0.02)

    def embed_signals(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """-> (patch tokens [sum_b C_b*L_b/25, d], tokens per sample [B] as host ints)."""
        tokens, _ = patch_embed_packed(batch.signals, batch.channel_ids, patch_embed_params(self),
                                       backend=self.backends["patch_embed"])
        return tokens, [x.shape[0] * (x.shape[1] // PATCH_LEN) for x in batch.signals]

    def embed_text(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """-> (text tokens [sum_b M_b, d], tokens per sample [B] as host ints)."""
        n_text = [len(t) for t in batch.text_ids]
        if max(n_text) > self.config.max_text_tokens:
            raise ValueError(f"a report has {max(n_text)} text tokens; the model takes at most "
                             f"{self.config.max_text_tokens} (truncate with the tokenizer's max_tokens)")
        ids = torch.cat(batch.text_ids).to(self.cls_token.device, non_blocking=True)
        position = positions_within(n_text, ids.device)
        # F.embedding, not indexing: its CPU backward is deterministic (index_put_ accumulate is not)
        rows = (self.text_to_embedding(ids) + F.embedding(position, self.text_pos_embedding[0])
                + self.text_type_embedding[0])
        return rows, n_text

    def encode(self, patch_rows: torch.Tensor, n_patch: Sequence[int] | torch.Tensor, text_rows: torch.Tensor,
               n_text: Sequence[int] | torch.Tensor, patch_places: PatchPlaces | None = None) -> EncoderOutput:
        """Runs the transformer over [CLS, patches, text] of every sample (any subsets of them);
        n_patch, n_text: rows per sample, host ints (a tensor is read back once); patch_places:
        where the patch rows sit, kept in the output for poolings that need it."""
        layout = SequenceLayout.of(n_patch, n_text, patch_rows.device)
        cls_rows = self.cls_token[0].expand(len(n_patch), -1).to(patch_rows.dtype)
        tokens = layout.pack(cls_rows, patch_rows, text_rows.to(patch_rows.dtype))
        states = self.transformer(tokens, layout.cu_seqlens, layout.max_seqlen,
                                  backend=self.backends["varlen_attention"], seqlens_host=layout.seqlens)
        return EncoderOutput(states, layout, states[layout.cls_rows], segment_mean(states, layout.cu_seqlens),
                             patch_places=patch_places)

    def encode_valid(self, batch: Batch, rows: torch.Tensor | None = None,
                     n_kept: Sequence[int] | None = None) -> EncoderOutput:
        """Encodes a batch of windows (each at most 10 s) leaving out the patches without a
        valid sample; the others keep their channel type and position, so a gap is encoded
        as if those patches had not been given, never as zeros. rows, n_kept: the batch's
        ``valid_patches()``, computed before it moved to a device (else computed here, which
        reads the masks back from the device)."""
        if rows is None or n_kept is None:
            rows, n_kept = batch.valid_patches()
        patch_rows, _ = self.embed_signals(batch)
        text_rows, n_text = self.embed_text(batch)
        kept = patch_rows.index_select(0, rows.to(patch_rows.device, non_blocking=True))
        return self.encode(kept, n_kept, text_rows, n_text, batch.patch_places(rows))

    def forward(self, batch: Batch) -> EncoderOutput:
        window = self.config.n_positions * PATCH_LEN
        if max(x.shape[1] for x in batch.signals) <= window:
            patch_rows, n_patch = self.embed_signals(batch)
            text_rows, n_text = self.embed_text(batch)
            return self.encode(patch_rows, n_patch, text_rows, n_text, batch.patch_places(torch.arange(sum(n_patch))))
        windows, owner = batch.split_windows(window)
        out = self.forward(windows)
        return EncoderOutput(out.tokens, out.layout, pool_by_owner(out.cls, owner, len(batch)),
                             pool_by_owner(out.mean, owner, len(batch)),
                             owner.to(out.cls.device, non_blocking=True))
