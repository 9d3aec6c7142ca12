"""csfm.evaluation.embedding: pooled record embeddings, modality selection, windows, cache, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import csfm.evaluation.embedding as embed_module
from csfm.model.batch import make_batch
from csfm.model.checkpoint import save_checkpoint
from csfm.model.config import preset
from csfm.data.demo import DemoDataset
from csfm.evaluation.embedding import EmbedConfig, Embeddings, embed_source, load_encoder, run
from csfm.data.preprocess import PreprocessConfig, preprocess_record, select_channels
from csfm.model.pretrain import MaskedPretrainer
from csfm.data.record import Record
from csfm.data.sources import open_sources


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(directory, MaskedPretrainer(preset("demo")), preset("demo"))
    return directory


def test_embeddings_are_pooled_windows_and_deterministic(checkpoint):
    encoder = load_encoder(checkpoint)
    source = DemoDataset(4, duration_s=25.0)  # 3 windows each: 10 s, 10 s and the last 5 s (padding cut off)
    first = embed_source(encoder, source, keep_windows=True, progress=False)
    again = embed_source(encoder, source, keep_windows=True, progress=False)
    assert first.embeddings.shape == (4, 128) and np.array_equal(first.embeddings, again.embeddings)
    assert list(first.record_ids) == [source[i].record_id for i in range(4)]
    assert list(first.n_windows) == [3, 3, 3, 3]
    assert list(first.window_start_s[:3]) == [0.0, 10.0, 20.0]
    np.testing.assert_allclose(first.embeddings[1], first.window_embeddings[first.window_record == 1].mean(0),
                               rtol=1e-6, atol=1e-6)


def test_last_partial_window_is_encoded_without_its_padding(checkpoint):
    encoder = load_encoder(checkpoint)
    record = DemoDataset(1, duration_s=17.0)[0]  # windows of 10 s and 7 s (0.7 valid: kept)
    out = embed_source(encoder, [record], keep_windows=True, progress=False)
    windows = preprocess_record(record, PreprocessConfig())
    tail = make_batch([windows.x[1][:, :1750]], [record.channel_types], valid=[windows.valid[1][:, :1750]])
    np.testing.assert_allclose(out.window_embeddings[1], encoder(tail).cls[0].detach().numpy(), rtol=1e-5, atol=1e-5)


def test_modality_selection_and_records_without_it():
    assert select_channels([1, 12, 0], "ppg") == [1]
    assert select_channels([1, 12, 0], "ecg") == [0, 2]
    with pytest.raises(ValueError, match="modality must be one of"):
        select_channels([1], "eeg")


def test_ppg_only_fails_on_ecg_only_records_unless_asked_to_skip_them(checkpoint):
    encoder = load_encoder(checkpoint)
    demo = DemoDataset(2)
    ecg_only = demo[0]
    ecg_only = Record(ecg_only.signal[:12], ecg_only.fs, ecg_only.channel_names[:12], ecg_only.units[:12],
                      ecg_only.channel_types[:12], ecg_only.modalities[:12], record_id="ecg_only")
    with pytest.raises(ValueError, match="1 of 2 records cannot be used.*skip-unusable.*\n  ecg_only: no PPG channel"):
        embed_source(encoder, [ecg_only, demo[1]], modality="ppg", progress=False)
    with pytest.warns(UserWarning, match="1 of 2 records cannot be used.*\n  ecg_only: no PPG channel"):
        out = embed_source(encoder, [ecg_only, demo[1]], modality="ppg", progress=False, skip_unusable=True)
    assert list(out.record_ids) == [demo[1].record_id]
    assert list(out.unusable_ids) == ["ecg_only"] and list(out.unusable_reasons) == ["no PPG channel"]
    with pytest.raises(ValueError, match="none of the 1 records has a usable ppg window"), pytest.warns(UserWarning):
        embed_source(encoder, [ecg_only], modality="ppg", progress=False, skip_unusable=True)


def test_cli_run_writes_outputs_and_reuses_the_cache(checkpoint, tmp_path, monkeypatch):
    config = EmbedConfig(str(checkpoint), ["demo:5"], str(tmp_path / "e.npy"), cache_dir=str(tmp_path / "cache"),
                         quiet=True)
    first = run(config)
    assert np.load(tmp_path / "e.npy").shape == (5, 128)
    assert (tmp_path / "e.index.csv").read_text().splitlines()[0] == "record_id,patient_id,n_windows"
    monkeypatch.setattr(embed_module, "embed_source", lambda *a, **k: pytest.fail("the cache was not used"))
    second = run(EmbedConfig(**{**config.__dict__, "out": str(tmp_path / "e.npz")}))
    assert np.array_equal(first.embeddings, second.embeddings)
    assert np.array_equal(Embeddings.load(tmp_path / "e.npz").embeddings, first.embeddings)
    first.save(tmp_path / "e.parquet")
    table = pd.read_parquet(tmp_path / "e.parquet")
    assert list(table["record_id"]) == list(first.record_ids)
    assert np.array_equal(table[[f"e{i}" for i in range(128)]].to_numpy(np.float32), first.embeddings)


def test_bad_arguments(checkpoint, tmp_path):
    (tmp_path / "published.pth").touch()
    with pytest.raises(ValueError, match="needs --preset"):
        load_encoder(tmp_path / "published.pth")
    with pytest.raises(ValueError, match="use a .npy, .npz or .parquet"):
        Embeddings(np.zeros((1, 2), np.float32), np.array(["a"]), np.array(["p"]), np.array([1])).save(
            tmp_path / "e.csv")
    with pytest.raises(ValueError, match="pooling must be one of"):
        embed_source(load_encoder(checkpoint), DemoDataset(1), pooling="max", progress=False)


PHYSIONET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "physionet"


@pytest.mark.data
@pytest.mark.skipif(not PHYSIONET.is_dir(), reason=f"real recordings not present at {PHYSIONET}")
def test_real_alarm_and_ptb_records_end_to_end(checkpoint):
    """Windows -> embeddings -> labels from the header comments, on real PhysioNet records."""
    source = open_sources([f"wfdb:{PHYSIONET / 'challenge2015'}", f"wfdb:{PHYSIONET / 'ptbdb'}"])
    out = embed_source(load_encoder(checkpoint), source, progress=False)
    records = {source[i].record_id: source[i] for i in range(len(source))}
    assert set(out.record_ids) == set(records) and np.isfinite(out.embeddings).all()
    n_windows = dict(zip(out.record_ids, out.n_windows))
    assert n_windows["a103l"] == 33 and n_windows["s0010_re"] == 4  # 330 s and 38.4 s at 10 s windows
    labels = {r: (rec.metadata.get("alarm_type"), rec.metadata.get("true_alarm"), rec.metadata.get("age"))
              for r, rec in records.items()}
    assert labels["a103l"][:2] == ("Asystole", False) and labels["v102s"][0] == "Ventricular_Tachycardia"
    assert labels["s0010_re"][2] == 81.0


def test_mean_std_pooling_matches_each_window_alone(checkpoint):
    encoder = load_encoder(checkpoint).eval()
    rng = np.random.default_rng(5)
    signals = [rng.standard_normal((2, 2500)).astype(np.float32), rng.standard_normal((1, 1250)).astype(np.float32)]
    types, valid = [[1, 12], [1]], [np.ones(s.shape, bool) for s in signals]
    pooled = embed_module.encode_windows(encoder, signals, types, valid, "mean+std")
    assert pooled.shape == (2, 256)
    np.testing.assert_allclose(pooled[:, :128], embed_module.encode_windows(encoder, signals, types, valid, "mean"),
                               rtol=1e-5, atol=1e-5)
    for b in range(2):  # the std of a window's non-CLS token states, computed from that window alone
        with torch.no_grad():
            out = encoder(make_batch([signals[b]], [types[b]], valid=[valid[b]]))
        np.testing.assert_allclose(pooled[b, 128:], out.tokens[1:].std(0, unbiased=False).numpy(),
                                   rtol=1e-3, atol=1e-4)
