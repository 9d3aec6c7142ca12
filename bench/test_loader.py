"""Pretraining windows per loader worker: on-the-fly reading (read, resample, band-pass, z-score
a random 10 s window per draw, no cache) against prepared shards of the same records
(``python -m csfm.prepare``: memory-mapped float16, a random crop per draw), in one process with
one torch thread, as a DataLoader worker runs.

Sources, written into a temp folder at the start (the signals are the project's synthetic demo
ECGs; real-record formats, synthetic content):
- ``wfdb_12lead_500Hz``: 64 WFDB records, 12 leads, 10 s at 500 Hz (MIMIC-IV-ECG / PTB-XL style);
- ``code15_12lead_400Hz``: one CODE-15-style HDF5 part of 64 tracings [4096, 12] at 400 Hz;
- ``mimic3_multisegment_125Hz``: the shared MIMIC-III waveform record s25047 (18 segments with
  gaps, 125 Hz; skipped when ../shared/data is absent), a random 10 s window per draw.
Each call draws DRAWS windows of random records (fixed seed), as PretrainWindows items.
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import wfdb

from csfm.data.demo import make_demo_record
from csfm.data.prepare_shards import PrepareConfig, prepare
from csfm.data.sources import open_sources
from csfm.data.windows import PretrainWindows, find_unusable

DRAWS = 64
N_RECORDS = 64
MIMIC3 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "physionet" / "mimic3wdb" / "s25047"
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def _write_wfdb(folder: Path) -> str:
    folder.mkdir(parents=True)
    for i in range(N_RECORDS):
        record = make_demo_record(i, duration_s=10.0, fs=500.0)
        wfdb.wrsamp(f"r{i:03d}", fs=500, units=["mV"] * 12, sig_name=list(LEADS),
                    p_signal=record.signal[:12].T.astype(np.float64), fmt=["16"] * 12, adc_gain=[200.0] * 12,
                    baseline=[0] * 12, write_dir=str(folder))
    return f"wfdb:{folder}"


def _write_code15(folder: Path) -> str:
    folder.mkdir(parents=True)
    tracings = np.zeros((N_RECORDS, 4096, 12), np.float32)
    for i in range(N_RECORDS):
        tracings[i, 48:4048] = make_demo_record(i, duration_s=10.0, fs=400.0).signal[:12].T
    with h5py.File(folder / "exams_part0.hdf5", "w") as f:
        f.create_dataset("tracings", data=tracings)
        f.create_dataset("exam_id", data=np.arange(1, N_RECORDS + 1, dtype=np.int64))
    pd.DataFrame({"exam_id": np.arange(1, N_RECORDS + 1), "patient_id": np.arange(N_RECORDS) // 2,
                  "trace_file": ["exams_part0.hdf5"] * N_RECORDS}).to_csv(folder / "exams.csv", index=False)
    return f"code15:{folder}"


def _mimic3(folder: Path) -> str:
    if not MIMIC3.is_dir():
        pytest.skip(f"shared recording {MIMIC3} not present")
    return f"mimic3:{MIMIC3}"


SOURCES = {"wfdb_12lead_500Hz": _write_wfdb, "code15_12lead_400Hz": _write_code15,
           "mimic3_multisegment_125Hz": _mimic3}


@lru_cache(maxsize=None)
def _sources(name: str) -> tuple[str, str]:
    """(raw spec, shards spec) of a case, written once per session into a temp folder."""
    root = Path(tempfile.mkdtemp(prefix=f"csfm-bench-{name}-"))
    raw = SOURCES[name](root / "raw")
    prepare(PrepareConfig(data=[raw], out=str(root / "shards"), quiet=True))
    return raw, f"shards:{root / 'shards'}"


def _draws(spec: str) -> tuple[PretrainWindows, list[int]]:
    """A cache-free PretrainWindows over ``spec``'s usable records (as training keeps them:
    ``find_unusable``) and DRAWS random item numbers."""
    records = open_sources([spec])
    unusable = find_unusable(records, range(len(records)))
    windows = PretrainWindows(records, None, subset_prob=0.5, cache_mb=0,
                              indices=[i for i in range(len(records)) if i not in unusable])
    return windows, np.random.default_rng(0).integers(0, len(windows), DRAWS).tolist()


@pytest.mark.parametrize("case", list(SOURCES))
def test_loader_windows_per_worker(side_by_side, case):
    raw_spec, shard_spec = _sources(case)
    raw, raw_items = _draws(raw_spec)
    shards, shard_items = _draws(shard_spec)
    torch.set_num_threads(1)
    # the same records: one window each way, equal shapes
    assert raw[raw_items[0]].x.shape[1] == shards[shard_items[0]].x.shape[1] == 2500
    side_by_side(f"loader {case}", f"{DRAWS} random 10 s windows per call, 1 process, 1 thread",
                 {"on-the-fly read + preprocess": lambda: [raw[i] for i in raw_items]},
                 {"prepared shards": lambda: [shards[i] for i in shard_items]},
                 rounds=3, counts={"windows": DRAWS})
