"""The CSFM encoder: [CLS] + 100 patch tokens per channel + text tokens, pre-norm transformer.

Parameter names follow the published model (DESIGN.md §1) so its checkpoints load. Every
sequence of a batch is packed: tokens ``[sum_b T_b, d]`` with ``cu_seqlens [B+1]``, so a
batch mixing a 1-lead and a 12-lead record costs the sum of their attention, not B times
the longest. ``backend="reference"`` runs the plain-torch reference of every op (same
weights, same outputs within 1e-5 in fp32) for testing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from csfm.batch import Batch
from csfm.config import ModelConfig
from csfm_kernels import patch_embed_packed
from csfm_kernels.modules import add_patch_embedding, patch_embed_params
from csfm_kernels.patch_embed import PATCH_LEN
from csfm_kernels.segments import cu_seqlens_from_lengths, segment_positions
from csfm_kernels.varlen_attention import varlen_attention


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
                backend: str = "auto", generator: torch.Generator | None = None) -> torch.Tensor:
        """x [T, d] packed, cu_seqlens int32 [B+1] -> [T, d]."""
        qkv = self.to_qkv(self.norm(x)).view(x.shape[0], 3, self.heads, self.dim_head)
        q, k, v = qkv.unbind(1)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen,
                               dropout_p=self.dropout_p if self.training else 0.0,
                               generator=generator, backend=backend)
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
                backend: str = "auto") -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = attention(x, cu_seqlens, max_seqlen, backend) + x
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
    the packed tokens; cu_seqlens int32 [B+1]; max_seqlen: the longest sequence.
    """

    cls_rows: torch.Tensor
    patch_rows: torch.Tensor
    text_rows: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def of(cls, n_patch: torch.Tensor, n_text: torch.Tensor) -> "SequenceLayout":
        """n_patch [B], n_text [B] int64 token counts -> the layout of 1 + n_patch + n_text rows each."""
        lengths = 1 + n_patch + n_text
        cu = cu_seqlens_from_lengths(lengths)
        start = cu[:-1].to(torch.int64)
        return cls(start, _rows_after(start + 1, n_patch), _rows_after(start + 1 + n_patch, n_text), cu,
                   int(lengths.max()))

    def pack(self, cls_rows: torch.Tensor, patch_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        """cls [B, d], patches [sum n_patch, d], text [sum n_text, d] -> packed [T, d]."""
        target = torch.cat([self.cls_rows, self.patch_rows, self.text_rows])
        source = torch.cat([cls_rows, patch_rows, text_rows])
        return torch.empty_like(source).index_copy(0, target, source)

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """packed [T, d] -> (cls [B, d], patches [sum n_patch, d], text [sum n_text, d])."""
        return tokens[self.cls_rows], tokens[self.patch_rows], tokens[self.text_rows]


def _rows_after(first: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows first[b], first[b]+1, ..., first[b]+counts[b]-1 for every b, concatenated."""
    owner, within = segment_positions(counts)
    return first[owner] + within


def segment_mean(tokens: torch.Tensor, cu_seqlens: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """Mean of each packed sequence's rows after its first ``skip_first``: [T, d] -> [B, d].
    A sequence with no such rows gives zeros."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    owner, within = segment_positions(lengths)
    keep = within >= skip_first
    sums = torch.zeros(len(lengths), tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
    sums.index_add_(0, owner[keep], tokens[keep])
    counts = (lengths - skip_first).clamp(min=1).to(tokens.dtype)
    return sums / counts[:, None]


TOKEN_POOLINGS = ("cls", "mean", "mean+std")


def check_token_pooling(pooling: str) -> None:
    """ValueError unless ``pooling`` is one of TOKEN_POOLINGS."""
    if pooling not in TOKEN_POOLINGS:
        raise ValueError(f"pooling must be one of {TOKEN_POOLINGS}, got {pooling!r}")


def pooled_width(dim: int, pooling: str) -> int:
    """Width of :func:`pool_tokens`'s vectors for an encoder of width ``dim``."""
    check_token_pooling(pooling)
    return 2 * dim if pooling == "mean+std" else dim


def pool_tokens(out: "EncoderOutput", pooling: str) -> torch.Tensor:
    """One float32 vector per sample: "cls" [B, d], "mean" of the non-CLS tokens [B, d], or
    "mean+std" [B, 2 d], their mean and standard deviation side by side (samples of at most
    one window; the std is floored at 1e-6 so its gradient stays finite)."""
    check_token_pooling(pooling)
    if pooling != "mean+std":
        return (out.cls if pooling == "cls" else out.mean).float()
    if out.window_owner is not None:
        raise ValueError("mean+std pooling takes windows of at most 10 s")
    tokens, mean = out.tokens.float(), out.mean.float()
    variance = segment_mean(tokens * tokens, out.layout.cu_seqlens) - mean ** 2
    return torch.cat([mean, variance.clamp(min=1e-12).sqrt()], dim=1)


def _mean_by_owner(rows: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """rows [W, d] -> [n, d]: the mean of the rows each of n owners has."""
    sums = torch.zeros(n, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add(0, owner, rows)
    return sums / torch.bincount(owner, minlength=n).clamp(min=1).to(rows.dtype)[:, None]


class CSFMEncoder(nn.Module):
    """The published encoder's layout; takes a Batch of any lead sets, lengths and texts."""

    def __init__(self, config: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config, self.backend = config, backend
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

    def embed_signals(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (patch tokens [sum_b C_b*L_b/25, d], tokens per sample [B] int64)."""
        tokens, cu = patch_embed_packed(batch.signals, batch.channel_ids, patch_embed_params(self),
                                        backend=self._op_backend())
        return tokens, (cu[1:] - cu[:-1]).to(torch.int64)

    def embed_text(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text tokens [sum_b M_b, d], tokens per sample [B] int64)."""
        n_text = batch.n_text_tokens()
        if len(n_text) and int(n_text.max()) > self.config.max_text_tokens:
            raise ValueError(f"a report has {int(n_text.max())} text tokens; the model takes at most "
                             f"{self.config.max_text_tokens} (truncate with the tokenizer's max_tokens)")
        ids = torch.cat(batch.text_ids) if batch.text_ids else torch.zeros(0, dtype=torch.int64)
        ids = ids.to(self.cls_token.device)
        position = torch.cat([torch.arange(int(n)) for n in n_text.tolist()]).to(ids.device) \
            if len(n_text) else ids
        # F.embedding, not indexing: its CPU backward is deterministic (index_put_ accumulate is not)
        rows = (self.text_to_embedding(ids) + F.embedding(position, self.text_pos_embedding[0])
                + self.text_type_embedding[0])
        return rows, n_text.to(ids.device)

    def encode(self, patch_rows: torch.Tensor, n_patch: torch.Tensor, text_rows: torch.Tensor,
               n_text: torch.Tensor) -> EncoderOutput:
        """Runs the transformer over [CLS, patches, text] of every sample (any subsets of them)."""
        layout = SequenceLayout.of(n_patch, n_text)
        cls_rows = self.cls_token[0].expand(len(n_patch), -1).to(patch_rows.dtype)
        tokens = layout.pack(cls_rows, patch_rows, text_rows.to(patch_rows.dtype))
        states = self.transformer(tokens, layout.cu_seqlens, layout.max_seqlen, backend=self._op_backend())
        return EncoderOutput(states, layout, states[layout.cls_rows], segment_mean(states, layout.cu_seqlens))

    def forward(self, batch: Batch) -> EncoderOutput:
        window = self.config.n_positions * PATCH_LEN
        if max(x.shape[1] for x in batch.signals) <= window:
            patch_rows, n_patch = self.embed_signals(batch)
            text_rows, n_text = self.embed_text(batch)
            return self.encode(patch_rows, n_patch, text_rows, n_text)
        windows, owner = batch.split_windows(window)
        out = self.forward(windows)
        owner = owner.to(out.cls.device)
        return EncoderOutput(out.tokens, out.layout, _mean_by_owner(out.cls, owner, len(batch)),
                             _mean_by_owner(out.mean, owner, len(batch)), owner)

    def _op_backend(self) -> str:
        return "reference" if self.backend == "reference" else "auto"
