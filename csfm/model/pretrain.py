"""Generative masked pretraining (MAE style) of the encoder on signals and reports.

Per sample, 75 % of the signal patch tokens and 50 % of the text tokens are masked; the
encoder sees CLS + the kept tokens only; a light transformer decoder gets every position
back (mask tokens where masked) and predicts the masked patches (MSE against the
channel-z-scored samples, or with ``norm_patch_targets`` against each patch normalised to
zero mean and unit variance as MAE does for images) and the masked text tokens
(cross-entropy).

Per-patch normalisation turns the near-flat 0.1 s patches between beats into unit-variance
noise that no context predicts, so by default the targets are the z-scored signal itself.

Token counts travel as host ints (from the batch's shapes and the mask plans), so up to the
losses nothing is read back from the device; the one host read of a step is the count of
scored signal samples (``n_signal``), which depends on the validity masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from csfm.data.preprocess import PreprocessConfig
from csfm.model.batch import Batch
from csfm.model.config import ModelConfig
from csfm.model.token_rhythm import RHYTHM_WIDTH, token_rhythm
from csfm.model.encoder import (CSFMEncoder, SequenceLayout, Transformer, pool_by_owner, positions_within,
                                sincos_table)
from csfm_kernels import (PATCH_LEN, MaskPlan, gather_kept, host_segment_positions, patch_token_ids, random_masking,
                          scatter_with_mask_token)


@dataclass
class PretrainOutput:
    """signal_sse: summed squared error over the n_signal scored patch samples; text_ce:
    summed cross-entropy over the n_text masked text tokens (both scalars with grad);
    pred_patches [sum P, 25] decoder output for every patch (target units);
    patch_mask [sum P] bool: which patches were masked; n_patch [B] patches per sample (host ints).
    The losses are means over this batch; ``weighted_loss`` normalises by other counts
    (those of a batch split across processes)."""

    signal_sse: torch.Tensor
    n_signal: int
    text_ce: torch.Tensor
    n_text: int
    signal_weight: float
    text_weight: float
    pred_patches: torch.Tensor
    patch_mask: torch.Tensor
    n_patch: list[int]
    contrast_ce: torch.Tensor | float = 0.0
    n_contrast: int = 0
    contrast_weight: float = 0.0
    rhythm_sse: torch.Tensor | float = 0.0
    n_rhythm: int = 0
    rhythm_weight: float = 0.0

    def weighted_loss(self, n_signal: int, n_text: int, n_rhythm: int | None = None) -> torch.Tensor:
        """signal_weight * SSE / n_signal + text_weight * CE / n_text + rhythm_weight *
        rhythm SSE / n_rhythm (a zero count adds 0; n_rhythm defaults to this batch's), plus
        contrast_weight * the mean contrastive cross-entropy of this batch."""
        n_rhythm = self.n_rhythm if n_rhythm is None else n_rhythm
        return (self.signal_weight * self.signal_sse / max(1, n_signal)
                + self.text_weight * self.text_ce / max(1, n_text) + self.contrast_weight * self.contrast_loss
                + self.rhythm_weight * self.rhythm_sse / max(1, n_rhythm))

    @property
    def rhythm_loss(self) -> torch.Tensor | float:
        """Mean over samples of the rhythm head's mean squared error over lags (0 when off)."""
        return self.rhythm_sse / max(1, self.n_rhythm)

    @property
    def contrast_loss(self) -> torch.Tensor | float:
        return self.contrast_ce / max(1, self.n_contrast)

    @property
    def signal_loss(self) -> torch.Tensor:
        return self.signal_sse / max(1, self.n_signal)

    @property
    def text_loss(self) -> torch.Tensor:
        return self.text_ce / max(1, self.n_text)

    @property
    def loss(self) -> torch.Tensor:
        return self.weighted_loss(self.n_signal, self.n_text)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance: [P, 25] -> [P, 25] (MAE's normalised targets)."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, unbiased=False, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps)


def paired_info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed InfoNCE (NT-Xent) cross-entropy of 2 P embeddings z [2 P, k] whose rows 2 i and
    2 i + 1 are two views of one record: each row's positive is its pair, the other 2 P - 2 rows
    are its negatives; cosine similarity over ``temperature``."""
    if z.shape[0] % 2 or z.shape[0] < 2:
        raise ValueError(f"paired_info_nce needs an even number >= 2 of rows (pairs side by side), got {z.shape[0]}")
    z = F.normalize(z.float(), dim=-1)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    partner = torch.arange(z.shape[0], device=z.device) ^ 1
    return F.cross_entropy(logits, partner, reduction="sum")


INPUT_FS = PreprocessConfig().target_fs  # Hz of every Batch signal (the preprocessing's output)
RHYTHM_LAGS_S = (0.2, 2.0, 0.04)
"""Lags of the rhythm target (``envelope_autocorrelation``): first, last, step, in seconds
(beat-to-beat intervals of 30-300 bpm)."""
RHYTHM_INPUTS = ("mean", "tokens")
"""What the rhythm head reads: the mean visible patch token, or their ``token_rhythm``."""
ENVELOPE_SMOOTH_S = 0.04
"""Moving-average width of the signal envelope (about one QRS), seconds."""


def rhythm_lags(fs: float) -> torch.Tensor:
    """The lags of RHYTHM_LAGS_S in samples at ``fs`` Hz: [n_lags] int64."""
    first, last, step = RHYTHM_LAGS_S
    return torch.round(torch.arange(first, last + step / 2, step, dtype=torch.float64) * fs).to(torch.int64)


def envelope_autocorrelation(x: torch.Tensor, valid: torch.Tensor, lags: torch.Tensor,
                             smooth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rhythm descriptor of channels: x, valid [C, L] (z-scored samples, bool) ->
    (acf [C, n_lags], used [C] bool).

    Per channel, the envelope |x[t] - x[t-1]| (beats stand out: QRS complexes, pulse upstrokes)
    is smoothed over ``smooth`` samples, centred over its valid samples and zeroed elsewhere;
    its autocorrelation at ``lags`` (samples, >= 1) over the one at lag 0 is high at multiples
    of a steady beat interval and flat for an irregular rhythm; lags >= L read 0. ``used`` is
    False (and acf 0) for a channel without valid samples or with a flat envelope."""
    x = torch.where(valid, x.float(), 0.0)
    envelope = torch.diff(x, dim=1, prepend=x[:, :1]).abs()
    if smooth > 1:
        envelope = F.avg_pool1d(envelope[:, None], smooth, 1, padding=smooth // 2,
                                count_include_pad=False)[:, 0, :x.shape[1]]
    n_valid = valid.sum(1, keepdim=True)
    centred = torch.where(valid, envelope - (envelope * valid).sum(1, keepdim=True) / n_valid.clamp(min=1), 0.0)
    length = x.shape[1]
    spectrum = torch.fft.rfft(centred, n=2 * length)
    acf = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * length)[:, :length]
    acf = F.pad(acf, (0, max(0, int(lags.max()) + 1 - length)))[:, lags.to(acf.device)]
    zero_lag = (centred ** 2).sum(1)
    used = (n_valid[:, 0] > 0) & (zero_lag > 0)
    return torch.where(used[:, None], acf / zero_lag.clamp(min=1e-12)[:, None], 0.0), used


def rhythm_targets(batch: Batch, lags: torch.Tensor, smooth: int) -> torch.Tensor:
    """Each sample's mean over its used channels of ``envelope_autocorrelation`` -> [B, n_lags]
    float32 (zeros for a sample with no used channel); samples of one length share one FFT."""
    targets = torch.zeros(len(batch), len(lags))
    by_length: dict[int, list[int]] = {}
    for b, x in enumerate(batch.signals):
        by_length.setdefault(x.shape[1], []).append(b)
    for members in by_length.values():
        acf, used = envelope_autocorrelation(torch.cat([batch.signals[b] for b in members]).cpu(),
                                             torch.cat([batch.valid[b] for b in members]).cpu(), lags.cpu(), smooth)
        owner = torch.cat([torch.full((batch.signals[b].shape[0],), k) for k, b in enumerate(members)])
        sums = torch.zeros(len(members), len(lags)).index_add_(0, owner, acf)
        counts = torch.zeros(len(members)).index_add_(0, owner, used.float()).clamp(min=1)
        targets[members] = sums / counts[:, None]
    return targets


def span_noise(noise: torch.Tensor, shapes: Sequence[tuple[int, int]], span: int) -> torch.Tensor:
    """Masking noise whose values are shared by runs of ``span`` consecutive patches of a channel:
    noise [B, >= N_b] (N_b = C_b * P_b patches of sample b, packed channel by channel), shapes
    [(C_b, P_b)] -> [B, max N_b], where patch p of channel c takes the value of the run's first
    patch, c * P_b + (p // span) * span. ``random_masking`` keeps the lowest-noise patches, so
    whole runs are kept or masked together (but the one at the cut), at the same overall ratio."""
    width = max(c * p for c, p in shapes)
    if noise.dim() != 2 or noise.shape[0] != len(shapes) or noise.shape[1] < width:
        raise ValueError(f"noise must be [B={len(shapes)}, >= {width}], got {tuple(noise.shape)}")
    index = torch.zeros(len(shapes), width, dtype=torch.int64)
    for b, (channels, positions) in enumerate(shapes):
        starts = (torch.arange(positions) // span) * span
        index[b, :channels * positions] = (torch.arange(channels)[:, None] * positions + starts).reshape(-1)
    return noise.gather(1, index.to(noise.device, non_blocking=True))


def add_same_time_mean(tokens: torch.Tensor, plan: MaskPlan, pos: torch.Tensor, n_positions: int) -> torch.Tensor:
    """tokens [sum P, d] (kept rows filled, masked rows = mask token) -> [sum P, d] where every
    masked row also gets the mean of its record's kept rows at the same position ``pos``
    [sum P] int64 (patch index within the channel, < n_positions); a position with no kept row
    in its record adds 0."""
    record = host_segment_positions(plan.n_tokens, tokens.device)[0]
    group = record * n_positions + pos
    kept = (~plan.mask).to(tokens.dtype)[:, None]  # weights, not boolean indexing: no device sync
    n_groups = len(plan.n_tokens) * n_positions
    sums = tokens.new_zeros(n_groups, tokens.shape[1]).index_add(0, group, tokens * kept)
    counts = tokens.new_zeros(n_groups, 1).index_add(0, group, kept).clamp(min=1)
    return tokens + (1 - kept) * (sums / counts)[group]


def _token_ids(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-type id and position of every patch token: ([sum P], [sum P]) int64, on the
    channel ids' device."""
    per_channel = [x.shape[1] // PATCH_LEN for x in batch.signals for _ in range(x.shape[0])]
    return patch_token_ids(torch.cat(batch.channel_ids), per_channel)


class MaskedPretrainer(nn.Module):
    """The encoder plus the pretraining decoder and its heads."""

    def __init__(self, config: ModelConfig, backend: str | Mapping[str, str] = "auto", signal_weight: float = 1.0,
                 text_weight: float = 0.5, norm_patch_targets: bool = False, mask_span: int = 1,
                 contrastive_weight: float = 0.0, temperature: float = 0.1, rhythm_weight: float = 0.0,
                 rhythm_input: str = "mean") -> None:
        """mask_span: masked signal patches come in runs of this many consecutive patches of a
        channel (``span_noise``; 1: each patch on its own, the published recipe).
        contrastive_weight > 0 adds, for batches of pairs (``forward(paired=True)``), an
        InfoNCE loss (``paired_info_nce``, ``temperature``) on a projection of each sample's
        mean encoded patch token: two views of a record should agree, other records not.
        rhythm_weight > 0 adds the MSE of a linear head predicting the window's
        ``envelope_autocorrelation`` at ``rhythm_lags`` (beat timing over seconds, which
        reconstructing 0.1 s patches from their neighbours never needs) from ``rhythm_input``:
        "mean", that same mean token, or "tokens", the visible patch tokens' correlations 0.1-2.5 s
        apart (``csfm.model.token_rhythm``, what ``mean+std+rhythm`` pooling reads), so the
        encoder is pushed to place beats in its tokens."""
        super().__init__()
        if not isinstance(mask_span, int) or mask_span < 1:
            raise ValueError(f"mask_span must be a whole number of patches >= 1, got {mask_span!r}")
        if not rhythm_weight >= 0:
            raise ValueError(f"rhythm_weight must be >= 0, got {rhythm_weight}")
        if rhythm_input not in RHYTHM_INPUTS:
            raise ValueError(f"rhythm_input must be one of {RHYTHM_INPUTS}, got {rhythm_input!r}")
        if not contrastive_weight >= 0 or not temperature > 0:
            raise ValueError(f"contrastive_weight must be >= 0 and temperature > 0, got {contrastive_weight} "
                             f"and {temperature}")
        self.config, self.signal_weight, self.text_weight = config, signal_weight, text_weight
        self.norm_patch_targets, self.mask_span = norm_patch_targets, mask_span
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.rhythm_weight, self.rhythm_input = rhythm_weight, rhythm_input
        if rhythm_weight > 0:
            self.register_buffer("rhythm_lags", rhythm_lags(INPUT_FS), persistent=False)
            width = config.dim if rhythm_input == "mean" else RHYTHM_WIDTH
            self.rhythm_head = nn.Linear(width, len(self.rhythm_lags))
        if contrastive_weight > 0:
            self.projection = nn.Sequential(nn.Linear(config.dim, config.dim), nn.GELU(), nn.Linear(config.dim, 128))
        self.encoder = CSFMEncoder(config, backend)
        dd = config.decoder_dim
        self.decoder_embed = nn.Linear(config.dim, dd)
        self.signal_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.text_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_channel_embedding = nn.Parameter(0.02 * torch.randn(config.n_channel_types, dd))
        self.decoder_pos_embedding = nn.Parameter(sincos_table(config.n_positions, dd))
        self.decoder_text_pos_embedding = nn.Parameter(sincos_table(config.max_text_tokens, dd))
        self.decoder = Transformer(dd, config.decoder_depth, config.decoder_heads, dd // config.decoder_heads,
                                   config.decoder_mlp_dim, dropout=0.0)
        self.patch_head = nn.Linear(dd, PATCH_LEN)
        self.text_head = nn.Linear(dd, config.vocab_size)

    def forward(self, batch: Batch, signal_ratio: float = 0.75, text_ratio: float = 0.5,
                generator: torch.Generator | None = None, signal_noise: torch.Tensor | None = None,
                text_noise: torch.Tensor | None = None, paired: bool = False) -> PretrainOutput:
        """Masks, encodes, decodes and scores one batch. signal_noise [B, >= max patches] and
        text_noise [B, >= max text tokens] fix the masks (see random_masking); else they come
        from ``generator``. paired: samples 2 i and 2 i + 1 are views of one record (the
        contrastive loss is scored when contrastive_weight > 0)."""
        enc = self.encoder
        masking, attention = enc.backends["masking"], enc.backends["varlen_attention"]
        patch_rows, n_patch = enc.embed_signals(batch)
        text_rows, n_text = enc.embed_text(batch)
        if self.mask_span > 1:
            if signal_noise is None:  # the draw random_masking would make
                signal_noise = torch.rand(len(n_patch), max(n_patch), generator=generator,
                                          device=generator.device if generator is not None else "cpu")
            shapes = [(x.shape[0], x.shape[1] // PATCH_LEN) for x in batch.signals]
            signal_noise = span_noise(signal_noise, shapes, self.mask_span)
        signal_plan = random_masking(n_patch, signal_ratio, generator, device=patch_rows.device,
                                     noise=signal_noise)
        text_plan = random_masking(n_text, text_ratio, generator, device=patch_rows.device,
                                   noise=text_noise)
        kept_patch = gather_kept(patch_rows, signal_plan, backend=masking)
        kept_text = gather_kept(text_rows.to(patch_rows.dtype), text_plan, backend=masking)
        encoded = enc.encode(kept_patch, signal_plan.n_kept, kept_text, text_plan.n_kept)

        cls_rows, kept_patch, kept_text = encoded.layout.split(self.decoder_embed(encoded.tokens))
        chan, pos = _token_ids(batch)
        # the mask tokens join the decoder's tokens in their dtype (bf16 under autocast)
        full_patch = scatter_with_mask_token(kept_patch, signal_plan, self.signal_mask_token.to(kept_patch.dtype),
                                             backend=masking)
        if self.config.decoder_same_time_mean:
            full_patch = add_same_time_mean(full_patch, signal_plan, pos, self.config.n_positions)
        # F.embedding: deterministic CPU backward, unlike indexing
        full_patch = full_patch + F.embedding(chan, self.decoder_channel_embedding) + F.embedding(pos, self.decoder_pos_embedding)
        full_text = scatter_with_mask_token(kept_text, text_plan, self.text_mask_token.to(kept_text.dtype),
                                            backend=masking)
        full_text = full_text + F.embedding(positions_within(n_text, full_text.device), self.decoder_text_pos_embedding)

        layout = SequenceLayout.of(n_patch, n_text, full_patch.device)
        states = self.decoder(layout.pack(cls_rows, full_patch, full_text), layout.cu_seqlens,
                              layout.max_seqlen, backend=attention, seqlens_host=layout.seqlens)
        _, patch_states, text_states = layout.split(states)
        pred = self.patch_head(patch_states)
        signal_sse, n_signal = self._signal_sse(batch, pred, signal_plan)
        text_ce, n_text_scored = self._text_ce(batch, text_states, text_plan)
        out = PretrainOutput(signal_sse, n_signal, text_ce, n_text_scored, self.signal_weight,
                             self.text_weight, pred, signal_plan.mask, n_patch)
        contrast = paired and self.contrastive_weight > 0
        if contrast or self.rhythm_weight > 0:
            _, patch_tokens, _ = encoded.layout.split(encoded.tokens)
            pooled = None  # the mean visible patch token of each sample, where something reads it
            if contrast or self.rhythm_input == "mean":
                pooled = pool_by_owner(patch_tokens, host_segment_positions(signal_plan.n_kept, "cpu")[0], len(n_patch))
            if contrast:
                out.contrast_ce = paired_info_nce(self.projection(pooled), self.temperature)
                out.n_contrast, out.contrast_weight = len(n_patch), self.contrastive_weight
            if self.rhythm_weight > 0:
                read = pooled if self.rhythm_input == "mean" else \
                    token_rhythm(patch_tokens, batch.patch_places(signal_plan.keep_rows))
                out.rhythm_sse = self._rhythm_sse(batch, read)
                out.n_rhythm, out.rhythm_weight = len(n_patch), self.rhythm_weight
        return out

    def _rhythm_sse(self, batch: Batch, pooled: torch.Tensor) -> torch.Tensor:
        """Over samples, the summed mean squared error (over lags) of the rhythm head on its
        input [B, d or RHYTHM_WIDTH] against each window's ``envelope_autocorrelation``."""
        smooth = max(1, round(ENVELOPE_SMOOTH_S * INPUT_FS))
        with torch.no_grad():
            target = rhythm_targets(batch, self.rhythm_lags, smooth).to(pooled.device, non_blocking=True)
        return ((self.rhythm_head(pooled).float() - target) ** 2).mean(1).sum()

    def _signal_sse(self, batch: Batch, pred: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, int]:
        """Squared error summed over the samples of masked, mostly valid patches, and their count
        (the step's one host read)."""
        rows = plan.masked_rows
        patches = torch.cat([x.reshape(-1, PATCH_LEN) for x in batch.signals]).to(pred.device, non_blocking=True)
        valid = torch.cat([v.reshape(-1, PATCH_LEN) for v in batch.valid]).to(pred.device, non_blocking=True)
        use = valid[rows].float().mean(-1) >= 0.5
        target = patches[rows].float()
        if self.norm_patch_targets:
            target = normalise_patches(target)
        error = torch.where(use[:, None], pred[rows].float() - target, 0.0)
        return (error ** 2).sum(), int(use.sum()) * PATCH_LEN

    def _text_ce(self, batch: Batch, text_states: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, int]:
        """Cross-entropy summed over the masked text tokens, and their count (the head is
        always in the graph, so every process of a distributed run has a grad for it)."""
        targets = torch.cat(batch.text_ids).to(text_states.device, non_blocking=True)[plan.masked_rows]
        logits = self.text_head(text_states[plan.masked_rows]).float()
        return F.cross_entropy(logits, targets, reduction="sum"), len(plan.masked_rows)
