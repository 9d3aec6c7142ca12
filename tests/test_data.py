"""Pretraining samples: cached records give the windows the uncached path gives, random
crops stay inside the record, and records without enough signal fail by name."""
from __future__ import annotations

import numpy as np
import pytest

from csfm.data import PretrainWindows, random_crop
from csfm.demo import DemoDataset
from csfm.preprocess import PreprocessConfig, preprocess_signal
from csfm.record import Record


class LongRecords:
    """Two 25 s single-lead records at 300 Hz with a known duration (cacheable), the second
    with its first 20 s missing."""

    def __init__(self) -> None:
        t = np.arange(25 * 300) / 300.0
        base = np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 9.0 * t)
        gappy = base.copy()
        gappy[: 20 * 300] = np.nan
        self.signals = [base.astype(np.float32)[None], gappy.astype(np.float32)[None]]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.signals)

    def duration_s(self, i: int) -> float:
        return self.signals[i].shape[1] / 300.0

    def __getitem__(self, i: int) -> Record:
        self.reads += 1
        return Record(self.signals[i], 300.0, ["II"], ["mV"], [1], ["ECG"], record_id=f"rec{i}", patient_id=f"p{i}")


def test_cached_crop_is_a_window_of_the_preprocessed_record():
    records = LongRecords()
    data = PretrainWindows(records, None, subset_prob=0.0, indices=[0], cache_mb=16)
    x_full, _ = preprocess_signal(records.signals[0], 300.0, [1])
    for epoch in range(3):
        data.set_epoch(epoch)
        sample = data[0]
        assert sample.x.shape == sample.valid.shape == (1, 2500) and sample.valid.all()
        starts = [s for s in range(x_full.shape[1] - 2499) if np.array_equal(x_full[:, s:s + 2500], sample.x)]
        assert len(starts) == 1  # an exact slice of the once-preprocessed record
    assert records.reads == 1  # read and filtered once, then served from memory


def test_cache_budget_and_long_records_fall_back_to_reading():
    records = LongRecords()
    uncached = PretrainWindows(records, None, subset_prob=0.0, indices=[0], cache_mb=0)
    uncached[0], uncached[0]
    assert records.reads == 2 and not uncached._cache
    tiny = PretrainWindows(records, None, subset_prob=0.0, indices=[0, 1], cache_mb=1e-3)
    assert tiny[0].x.shape == (1, 2500) and not tiny._cache  # over budget: served, not kept
    with pytest.raises(ValueError, match="cache_mb"):
        PretrainWindows(records, None, cache_mb=-1)


def test_gappy_record_crop_prefers_valid_windows_or_names_the_record():
    records = LongRecords()
    data = PretrainWindows(records, None, subset_prob=0.0, indices=[1], cache_mb=16)
    x, valid = preprocess_signal(records.signals[1], 300.0, [1])
    if valid.mean() * x.shape[1] >= 0.5 * 2500:  # 5 s of signal: crops reaching it qualify
        sample = data[0]
        assert sample.valid.mean() >= 0.5
    config = PreprocessConfig()
    with pytest.raises(ValueError, match="record rec9: no window with enough valid samples"):
        random_crop(x, np.zeros_like(valid), config, np.random.default_rng(0), "rec9")


def test_short_record_is_padded_with_invalid_samples():
    config = PreprocessConfig()
    x, valid = np.ones((2, 2000), np.float32), np.ones((2, 2000), bool)
    out_x, out_valid = random_crop(x, valid, config, np.random.default_rng(0))
    assert out_x.shape == (2, 2500) and out_valid[:, :2000].all() and not out_valid[:, 2000:].any()
    assert (out_x[:, 2000:] == 0).all()


def test_demo_records_are_cached_and_give_the_same_samples():
    records = DemoDataset(4, seed=1)
    cached = PretrainWindows(records, None, subset_prob=0.5, cache_mb=64)
    plain = PretrainWindows(records, None, subset_prob=0.5, cache_mb=0)
    for i in range(4):
        a, b = cached[i], plain[i]
        assert a.channel_types == b.channel_types
        np.testing.assert_allclose(a.x, b.x, atol=1e-6)
    assert len(cached._cache) == 4
