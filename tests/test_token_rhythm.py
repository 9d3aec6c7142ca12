"""Rhythm pooling of patch tokens (csfm.model.token_rhythm) against a loop over channels and
lags, on random ragged windows with gaps; what it measures on tokens with a known rhythm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csfm.model.batch import make_batch
from csfm.model.config import ModelConfig
from csfm.model.encoder import CSFMEncoder, pool_tokens, pooled_width
from csfm.model.token_rhythm import RHYTHM_LAGS, RHYTHM_WIDTH, PatchPlaces, patch_places, token_rhythm


def _loop_rhythm(grids: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """The features of each sample, channel by channel and lag by lag in float64: grids[b]
    [C, P, d], masks[b] [C, P] bool."""
    out = []
    for grid, mask in zip(grids, masks):
        sums, weights = np.zeros(4 * RHYTHM_LAGS), np.zeros(4 * RHYTHM_LAGS)
        for tokens, ok in zip(grid.astype(np.float64), mask):
            if not ok.any():
                continue
            centred = np.where(ok[:, None], tokens - tokens[ok].mean(0), 0.0)
            norm = np.linalg.norm(centred, axis=1)
            unit = centred / np.maximum(norm, 1e-6)[:, None]
            envelope = np.where(ok, norm - norm[ok].mean(), 0.0)
            envelope /= max(np.sqrt((envelope[ok] ** 2).mean()), 1e-3 * norm[ok].mean() + 1e-12)
            for lag in range(1, RHYTHM_LAGS + 1):
                both = [t for t in range(len(ok) - lag) if ok[t] and ok[t + lag]]
                if both:
                    similar = [unit[t] @ unit[t + lag] for t in both]
                    alike = [envelope[t] * envelope[t + lag] for t in both]
                    for block, values in enumerate((similar, alike, np.std(similar), np.std(alike))):
                        sums[block * RHYTHM_LAGS + lag - 1] += np.sum(values) * (len(both) if block > 1 else 1)
                weights[[block * RHYTHM_LAGS + lag - 1 for block in range(4)]] += len(both)
        out.append(sums / np.maximum(weights, 1))
    return np.stack(out)


def _packed(grids: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, PatchPlaces]:
    """The valid tokens of grids [C, P, d] in the encoder's order, and their places."""
    rows, tokens, offset = [], [], 0
    for grid, mask in zip(grids, masks):
        flat = mask.reshape(-1)
        rows.append(offset + np.flatnonzero(flat))
        tokens.append(grid.reshape(-1, grid.shape[-1])[flat])
        offset += flat.size
    places = patch_places([g.shape[1] * 25 for g in grids], [g.shape[0] for g in grids],
                          torch.from_numpy(np.concatenate(rows)))
    return torch.from_numpy(np.concatenate(tokens)), places


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.tuples(st.integers(1, 3), st.integers(1, 40)), min_size=1, max_size=4),
       st.floats(0.0, 0.6))
def test_rhythm_features_match_a_loop_over_channels_and_lags(seed, shapes, gap_fraction):
    rng = np.random.default_rng(seed)
    grids = [rng.standard_normal((c, p, 6)).astype(np.float32) for c, p in shapes]
    masks = [rng.random((c, p)) >= gap_fraction for c, p in shapes]
    for mask in masks:
        mask.reshape(-1)[0] = True  # the encoder never gets a window without a valid patch
    tokens, places = _packed(grids, masks)
    got = token_rhythm(tokens, places)
    assert got.shape == (len(grids), RHYTHM_WIDTH) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _loop_rhythm(grids, masks), atol=2e-5)


def test_patch_places_follow_the_encoders_order():
    """Sample by sample, channel by channel, patch by patch; lengths differ per sample."""
    places = patch_places([50, 75], [2, 1], torch.tensor([6, 0, 1, 2, 3, 4, 5]))
    assert places.index.tolist() == [[1, 0, 2], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]]
    assert places.grid == (2, 2, 3)


def test_a_regular_rhythm_peaks_at_its_period_and_an_irregular_one_does_not():
    """Tokens of a beat every 8 patches (0.8 s) are alike 8 and 16 patches apart, equally all
    along the window; the same beats at irregular intervals give no such peak, and their
    similarity 8 patches apart varies along the window."""
    rng = np.random.default_rng(0)
    beat, rest = rng.standard_normal(16), rng.standard_normal(16)

    def tokens_at(beats: list[int]) -> np.ndarray:
        grid = np.tile(rest, (100, 1)) + 0.05 * rng.standard_normal((100, 16))
        grid[beats] = beat
        return grid[None].astype(np.float32)

    regular = tokens_at(list(range(3, 100, 8)))
    irregular = tokens_at(list(np.cumsum(rng.integers(4, 13, 20))[:12]))
    masks = [np.ones((1, 100), bool)] * 2
    tokens, places = _packed([regular, irregular], masks)
    features = token_rhythm(tokens, places).numpy()
    lags, spreads = features[:, :RHYTHM_LAGS], features[:, 2 * RHYTHM_LAGS:3 * RHYTHM_LAGS]
    assert lags[0].argmax() + 1 in (8, 16, 24) and lags[0, 7] > 0.5
    assert lags[1, 7] < lags[0, 7] - 0.3
    assert spreads[0, 7] < 0.1 and spreads[1, 7] > spreads[0, 7] + 0.3


def test_rhythm_pooling_through_the_encoder_ignores_gaps_and_has_gradients():
    """A window with a gap gives the features of its valid patches alone (the encoder leaves
    the gap out); the pooled vector's width is pooled_width's; gradients reach the weights."""
    torch.manual_seed(0)
    encoder = CSFMEncoder(ModelConfig(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2500)).astype(np.float32)
    valid = np.ones_like(x, bool)
    valid[1, 500:1250] = False
    batch = make_batch([x, x[:1]], [[1, 7], [1]], valid=[valid, valid[:1]])
    out = encoder.encode_valid(batch)
    pooled = pool_tokens(out, "mean+std+rhythm")
    assert pooled.shape == (2, pooled_width(32, "mean+std+rhythm"))
    patches = out.tokens[out.layout.patch_rows].detach()
    grids, masks = [], []
    for b, channels in enumerate((2, 1)):
        grid, mask = np.zeros((channels, 100, 32), np.float32), np.zeros((channels, 100), bool)
        index = out.patch_places.index
        mine = (index[:, 0] == b).numpy()
        c, p = index[mine, 1].numpy(), index[mine, 2].numpy()
        grid[c, p], mask[c, p] = patches[mine].numpy(), True
        grids.append(grid), masks.append(mask)
    assert masks[0][1, 20:50].sum() == 0 and masks[0].sum() == 170
    np.testing.assert_allclose(pooled[:, 64:].detach().numpy(), _loop_rhythm(grids, masks), atol=2e-5)
    pooled[:, 64:].sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_rhythm_pooling_needs_the_patch_places():
    torch.manual_seed(0)
    encoder = CSFMEncoder(ModelConfig(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64))
    batch = make_batch([np.zeros((1, 250), np.float32)], [[1]])
    patches, n_patch = encoder.embed_signals(batch)
    text, n_text = encoder.embed_text(batch)
    with pytest.raises(ValueError, match="patch tokens' places"):
        pool_tokens(encoder.encode(patches, n_patch, text, n_text), "mean+std+rhythm")
    assert pool_tokens(encoder(batch), "mean+std+rhythm").shape == (1, 64 + RHYTHM_WIDTH)
