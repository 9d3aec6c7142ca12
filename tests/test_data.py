"""Pretraining samples: cached records give the windows the uncached path gives, random
crops stay inside the record, and records without enough signal fail by name."""
from __future__ import annotations

import numpy as np
import pytest

import csfm.data.windows as data_module
from csfm.data.windows import (ItemRandom, PretrainWindows, UnusableRecordsError, check_usable, find_unusable,
                               lead_subset, random_crop, record_parts)
from csfm.data.demo import DemoDataset
from csfm.data.preprocess import PreprocessConfig, RecordCheck, preprocess_signal
from csfm.data.readers.mimic3 import NoSignalError
from csfm.data.record import Record


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
    with pytest.raises(ValueError, match="record rec9: no 2500-sample window with at least 50% valid samples"):
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


def test_random_crop_finds_the_only_usable_stretch_of_a_long_record():
    """6 s of signal in 60 s: about 1 start in 10 qualifies, so 8 random tries alone would
    fail on about 4 seeds in 10; the crop is drawn among the qualifying starts."""
    config = PreprocessConfig()
    x = np.ones((1, 15000), np.float32)
    valid = np.zeros_like(x, dtype=bool)
    valid[:, 5000:6500] = True
    for seed in range(20):
        _, crop_valid = random_crop(x, valid, config, np.random.default_rng(seed))
        assert crop_valid.mean() >= 0.5


def test_channels_without_a_valid_sample_are_left_out_of_samples():
    base = LongRecords().signals[0]
    signal = np.concatenate([base, np.full_like(base, np.nan), base])

    class Source(LongRecords):
        def __getitem__(self, i):
            return Record(signal, 300.0, ["II", "V1", "PLETH"], ["mV"] * 3, [1, 6, 12], ["ECG", "ECG", "PPG"],
                          record_id="rec", patient_id="p")

    for cache_mb in (0, 16):
        sample = PretrainWindows(Source(), None, subset_prob=0.0, indices=[0], cache_mb=cache_mb)[0]
        assert sample.channel_types == [1, 12] and sample.valid.mean() >= 0.5


class PartsSource:
    """One 25 min single-lead record at 250 Hz with nothing recorded from 400 s to 1100 s (a
    multi-segment reader raises NoSignalError for a read within that); reads are logged."""

    fs = 250.0

    def __init__(self) -> None:
        self.reads: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return 1

    def duration_s(self, i: int) -> float:
        return 1500.0

    def read_window(self, i: int, start_s: float, window_s: float) -> Record:
        self.reads.append((start_s, window_s))
        stop_s = min(1500.0, start_s + window_s)
        if start_s >= 400.0 and stop_s <= 1100.0:
            raise NoSignalError("nothing recorded")
        t = np.arange(int(round(start_s * self.fs)), int(round(stop_s * self.fs))) / self.fs
        signal = np.sin(2 * np.pi * 1.2 * t)[None].astype(np.float32)
        signal[:, (t >= 400.0) & (t < 1100.0)] = np.nan
        return Record(signal, self.fs, ["II"], ["mV"], [1], ["ECG"], record_id="long", patient_id="p")

    def __getitem__(self, i: int) -> Record:
        return self.read_window(i, 0.0, 1500.0)


def test_long_records_come_in_parts_with_filter_margins(monkeypatch):
    monkeypatch.setattr(data_module, "PART_WINDOWS", 30)  # 5 min parts
    source, config = PartsSource(), PreprocessConfig()
    parts = list(record_parts(source, 0, config))
    assert [(start, skip, span) for _, start, skip, span in parts] == [
        (0.0, 0.0, 300.0), (300.0, 5.0, 300.0), (900.0, 5.0, 300.0), (1200.0, 5.0, 300.0)]  # none at 600 s
    assert source.reads[:3] == [(0.0, 305.0), (295.0, 310.0), (595.0, 310.0)] and len(source.reads) == 5
    check = RecordCheck(config)
    windows = [check.windows(part, skip, span)[0] for part, _, skip, span in parts]
    assert [len(w.x) for w in windows] == [30, 10, 10, 30]
    np.testing.assert_array_equal(windows[2].start_s, np.arange(200.0, 300.0, 10.0))  # 1100..1200 s of the record
    assert check.problem == "" and check.n_windows == 80
    assert find_unusable(source, [0], config) == {}
    assert len(source.reads) == 6  # checking stops at the first usable window


def test_unusable_records_are_found_alike_with_worker_processes():
    records = LongRecords()
    records.signals.append(np.full((1, 3000), np.nan, np.float32))
    expected = {1: ("rec1", "no 10 s window with at least 50% valid samples (5.0 s of valid signal in 25.0 s)"),
                2: ("rec2", "no valid sample in its channel(s) II")}  # rec1: 20 s missing, 5 s minus the edges left
    assert find_unusable(records, range(3), PreprocessConfig()) == expected
    assert find_unusable(records, [2, 0, 1, 2], PreprocessConfig(), workers=1) == expected
    with pytest.raises(UnusableRecordsError, match="2 of 3 records cannot be used .*\n  rec1: .*\n  rec2: no valid"):
        check_usable(expected, 3, skip_unusable=False)
    with pytest.warns(UserWarning, match="2 of 3 records cannot be used; left out"):
        check_usable(expected, 3, skip_unusable=True)


class SparseSource(PartsSource):
    """PartsSource's record with signal only from 700 s to 720 s (NaN elsewhere)."""

    def read_window(self, i: int, start_s: float, window_s: float) -> Record:
        self.reads.append((start_s, window_s))
        t = np.arange(int(round(start_s * self.fs)), int(round(min(1500.0, start_s + window_s) * self.fs))) / self.fs
        signal = np.where((t >= 700.0) & (t < 720.0), np.sin(2 * np.pi * 1.2 * t), np.nan)[None].astype(np.float32)
        return Record(signal, self.fs, ["II"], ["mV"], [1], ["ECG"], record_id="sparse", patient_id="p")


def test_long_records_are_sampled_by_reading_one_window_and_never_fail_when_usable():
    steady = PretrainWindows(PartsSource(), None, subset_prob=0.0, cache_mb=64)
    steady.set_epoch(1)
    assert steady[0].valid.all() and not steady._cache  # longer than the cache takes
    assert len(steady.records.reads) == 1 and steady.records.reads[0][1] == 20.0  # 10 s + 5 s each side
    sparse = PretrainWindows(SparseSource(), None, subset_prob=0.0)
    starts = set()
    for epoch in range(4):  # 20 s of signal in 25 min: random windows miss it, the scan finds it
        sparse.set_epoch(epoch)
        sample = sparse[0]
        assert sample.valid.all()
        starts.add(sample.x[0, :5].tobytes())
    assert len(starts) >= 2  # not always the same window


def test_sources_are_told_apart_by_protocol(tmp_path):
    from fixtures import write_wfdb

    from csfm.data.readers import WfdbDirectory
    from csfm.data.record import ListedSource, RecordSource, WindowedSource
    from csfm.data.sources import open_sources

    write_wfdb(tmp_path, "r0", np.zeros((600, 1)), 300.0, ["II"])

    demo = DemoDataset(2)
    assert isinstance(demo, RecordSource) and not isinstance(demo, WindowedSource)
    assert not isinstance(LongRecords(), WindowedSource)  # a duration but no read_window: read whole
    assert isinstance(PartsSource(), WindowedSource)
    reader = WfdbDirectory(tmp_path)
    assert isinstance(reader, WindowedSource) and isinstance(reader, ListedSource) and reader.duration_s(0) == 2.0
    mixed = open_sources(["demo:2"])
    assert mixed.duration_s(0) is None and mixed.record_files(0) == []  # demo records: no duration, no file
    assert [part[1:] for part in record_parts(mixed, 0, PreprocessConfig())] == [(0.0, 0.0, None)]


def test_record_windows_are_cut_stride_apart_and_in_parts(monkeypatch):
    from csfm.data.windows import record_windows

    records, config = LongRecords(), PreprocessConfig()
    check = RecordCheck(config)
    (whole,) = record_windows(records, 0, check, stride_s=5.0)
    np.testing.assert_array_equal(whole.start_s, [0.0, 5.0, 10.0, 15.0])  # 25 s: the last one ends at its end
    assert whole.x.shape == (4, 1, config.window) and whole.valid.all()
    x, valid = preprocess_signal(records.signals[0], 300.0, [1], config)
    np.testing.assert_array_equal(whole.x[1], x[:, 1250:3750])
    assert [s.record_id for s in whole.samples(every=2)] == ["rec0"] * 2 and check.problem == ""
    monkeypatch.setattr(data_module, "PART_WINDOWS", 30)  # 5 min parts
    parts = list(record_windows(PartsSource(), 0, RecordCheck(config)))
    assert [len(p.x) for p in parts] == [30, 10, 10, 30] and parts[2].start_s[0] == 1100.0


def test_item_streams_are_their_own_whatever_was_drawn_before():
    """Each (epoch, record, item, view) has its own stream: the same draws when asked again after
    other items, or in a pickled copy (a DataLoader worker); other items or seeds draw otherwise."""
    import pickle

    random = ItemRandom(3)
    first = random(2, 10, 4).random(8)
    keys = [(2, 10, 5), (2, 11, 4), (3, 10, 4), (2, 10, 4, 1)]
    others = [random(*key).random(8) for key in keys]
    np.testing.assert_array_equal(random(2, 10, 4).random(8), first)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(random))(2, 10, 4).random(8), first)
    assert not np.array_equal(ItemRandom(4)(2, 10, 4).random(8), first)
    assert all(not np.array_equal(o, first) for o in others)
    draws = np.concatenate([random(0, i, 0).random(4) for i in range(500)])
    assert 0.45 < draws.mean() < 0.55 and len(np.unique(draws)) == len(draws)


@pytest.mark.parametrize("types, subsets", [
    (list(range(12)), {"II", "three", "limb"}),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], {"II", "II+PPG", "three", "limb", "ECG", "PPG"}),
    ([6, 7], {"one"}),
    ([12], {"PPG"}),
])
def test_lead_subsets_drawn_are_the_ones_the_record_can_give(types, subsets):
    """Every allowed subset comes up over many draws, nothing else, with each channel once."""
    ppg, ecg = [i for i, t in enumerate(types) if t == 12], [i for i, t in enumerate(types) if t != 12]
    random, seen = ItemRandom(0), set()
    for i in range(400):
        keep = lead_subset(types, random(0, i, 0))
        assert keep == sorted(set(keep)) and keep
        if keep == ppg:
            seen.add("PPG")
        elif keep == ecg and len(ecg) > 6:
            seen.add("ECG")
        elif len(keep) == 6:
            assert [types[k] for k in keep] == [0, 1, 2, 3, 4, 5]
            seen.add("limb")
        elif len(keep) == 3:
            assert all(types[k] != 12 for k in keep)
            seen.add("three")
        elif [types[k] for k in keep] == [1]:
            seen.add("II")
        elif len(keep) == 2:
            assert [types[k] for k in keep] == [1, 12]
            seen.add("II+PPG")
        else:
            assert len(keep) == 1 and types[keep[0]] != 12
            seen.add("one")
    assert seen == subsets
