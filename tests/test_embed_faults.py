"""csfm.evaluation.embedding on bad input (issue 20): stale caches, unusable records, missing samples,
long records, bad options. Each test reproduces the reported fault and checks the fix."""
from __future__ import annotations

import os
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import csfm.data.windows as data_module
import csfm.evaluation.embedding as embed_module
from csfm.model.checkpoint import save_checkpoint
from csfm.cli import OptionError
from csfm.model.config import preset
from csfm.data.windows import find_unusable
from csfm.evaluation.embedding import EmbedConfig, Embeddings, embed_source, encode_windows, load_encoder, main, run
from csfm.model.encoder import pool_tokens
from csfm.data.preprocess import PreprocessConfig, preprocess_signal
from csfm.model.pretrain import MaskedPretrainer
from csfm.data.record import Record
from csfm_kernels.modules import patch_embed_params
from csfm_kernels.patch_embed import PATCH_LEN, patch_embed_tokens_reference
from fixtures import PHYSIONET, need, write_wfdb

FS = 250


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(directory, MaskedPretrainer(preset("demo")), preset("demo"))
    return directory


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_encoder(checkpoint).eval()


def ecg(seconds: float, fs: float = FS, channels: int = 2, seed: int = 0) -> np.ndarray:
    """[T, channels] float64 ECG-like signal (mV): sharp beats at 72 bpm plus a little noise."""
    t = np.arange(int(round(seconds * fs))) / fs
    rng = np.random.default_rng(seed)
    beat = np.sin(2 * np.pi * 1.2 * t) ** 31
    return np.stack([(1 + 0.3 * c) * beat + 0.05 * rng.standard_normal(len(t)) for c in range(channels)], axis=1)


def record(signal: np.ndarray, names=("II", "V5"), types=(1, 10), record_id: str = "r") -> Record:
    """A Record of signal [T, C] at FS Hz."""
    modalities = ["PPG" if t == 12 else "ECG" for t in types]
    return Record(np.ascontiguousarray(signal.T, dtype=np.float32), float(FS), list(names), ["mV"] * len(names),
                  list(types), modalities, record_id=record_id, patient_id=record_id)


def four_records(directory: Path) -> Path:
    """A WFDB folder of 4 records where only ``good`` can be used: ``all_nan`` (every sample
    missing), ``short`` (3 s: no window half valid) and ``gappy`` (25 s with 4 s of signal)."""
    write_wfdb(directory, "good", ecg(20), FS, ["II", "V5"])
    write_wfdb(directory, "all_nan", np.full((FS * 20, 2), np.nan), FS, ["II", "V5"])
    write_wfdb(directory, "short", ecg(3), FS, ["II", "V5"])
    gappy = ecg(25)
    gappy[: FS * 21] = np.nan
    write_wfdb(directory, "gappy", gappy, FS, ["II", "V5"])
    return directory


# ----------------------------------------------------------------------------- 5: unusable records


def test_unusable_records_fail_by_name_and_reason_and_train_agrees(checkpoint, tmp_path, capsys):
    folder = four_records(tmp_path / "data")
    out = tmp_path / "e.npz"
    args = ["--checkpoint", str(checkpoint), "--data", f"wfdb:{folder}", "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and not out.exists()
    message = capsys.readouterr().err
    assert "3 of 4 records cannot be used (--skip-unusable leaves them out)" in message
    assert "all_nan: no valid sample in its channel(s) II, V5" in message
    assert "short: no 10 s window with at least 50% valid samples (3.0 s of valid signal in 3.0 s)" in message
    assert "gappy: no 10 s window with at least 50% valid samples" in message and "good" not in message

    with pytest.warns(UserWarning, match="3 of 4 records cannot be used; left out") as caught:
        main([*args, "--skip-unusable"])
    result = Embeddings.load(out)
    assert list(result.record_ids) == ["good"] and result.n_windows.tolist() == [2]
    assert sorted(result.unusable_ids) == ["all_nan", "gappy", "short"]
    assert "short: no 10 s window" in str(caught[0].message)

    # pretraining reads the same records by the same rule: same records, same reasons
    source = embed_module.open_sources([f"wfdb:{folder}"])
    unusable = find_unusable(source, range(len(source)), PreprocessConfig())
    assert {name: why for name, why in unusable.values()} == dict(zip(result.unusable_ids, result.unusable_reasons))
    training = data_module.PretrainWindows(source, None, subset_prob=0.0)
    short = source.sources[0].record_ids.index("short")
    with pytest.raises(ValueError, match="record short: no 10 s window with at least 50% valid samples"):
        training[short]


# ----------------------------------------------------------------------------- 6: missing samples


def test_gap_patches_are_left_out_and_the_others_keep_their_positions(encoder):
    """A gap is encoded as if its patches were not given: the expected embedding is built
    from the kept patches alone (reference patch embedding, each at its own position)."""
    signal = ecg(10)
    signal[1000:1250, 0] = np.nan  # patches 40..49 of channel II
    gapped = record(signal)
    out = embed_source(encoder, [gapped], progress=False)

    x, valid = preprocess_signal(gapped.signal, FS, gapped.channel_types)
    assert not valid[0, 1000:1250].any() and valid[0, :1000].all() and valid[1].all()
    patches = torch.as_tensor(x).reshape(-1, PATCH_LEN)  # channel by channel, patch by patch
    keep = torch.as_tensor(valid).reshape(-1, PATCH_LEN).any(1)
    channel = torch.tensor(gapped.channel_types).repeat_interleave(100)
    position = torch.arange(100).repeat(2)
    with torch.no_grad():
        tokens = patch_embed_tokens_reference(patches[keep], channel[keep], position[keep], patch_embed_params(encoder))
        expected = encoder.encode(tokens, [int(keep.sum())], torch.zeros(0, 128), [0]).cls[0]
        as_zeros = encoder(embed_module.make_batch([x], [gapped.channel_types])).cls[0]
    assert int(keep.sum()) == 190
    np.testing.assert_allclose(out.embeddings[0], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(out.embeddings[0] - as_zeros.numpy()).max() > 1e-3  # what encoding the gap as zeros gave


def test_a_gap_at_the_end_equals_the_record_cut_there(encoder):
    """The same record with its last 3 s missing or cut off: the same embedding."""
    signal = ecg(10)
    gapped = signal.copy()
    gapped[FS * 7:] = np.nan
    with_gap = embed_source(encoder, [record(gapped)], progress=False)
    cut = embed_source(encoder, [record(signal[:FS * 7])], progress=False)
    np.testing.assert_allclose(with_gap.embeddings, cut.embeddings, rtol=1e-5, atol=1e-6)


def test_an_all_nan_channel_is_left_out_and_named(encoder):
    signal = ecg(20, channels=3)
    signal[:, 2] = np.nan
    three = record(signal, ("II", "V5", "PLETH"), (1, 10, 12), "rec")
    two = record(signal[:, :2], record_id="rec")
    left_out = "1 record\\(s\\) have channels without a valid sample, left out:\n  rec: PLETH"
    with pytest.warns(UserWarning, match=left_out):
        out = embed_source(encoder, [three], progress=False)
    np.testing.assert_allclose(out.embeddings, embed_source(encoder, [two], progress=False).embeddings,
                               rtol=1e-5, atol=1e-6)
    assert out.empty_channels.tolist() == ["PLETH"]
    with pytest.raises(ValueError, match="rec: no valid sample in its PPG channel\\(s\\) PLETH"):
        embed_source(encoder, [three], modality="ppg", progress=False)


def test_a_window_without_any_valid_sample_is_refused(encoder):
    x = np.zeros((1, 2500), np.float32)
    with pytest.raises(ValueError, match="windows \\[0\\] of the batch have no valid sample"):
        encode_windows(encoder, [x], [[1]], [np.zeros_like(x, dtype=bool)])


# ----------------------------------------------------------------------------- 4: the cache


def test_cache_follows_the_files_it_was_computed_from(checkpoint, tmp_path):
    folder = tmp_path / "data"
    for k in range(3):
        write_wfdb(folder, f"r{k}", ecg(12, seed=k), FS, ["II", "V5"])
    config = EmbedConfig(str(checkpoint), [f"wfdb:{folder}"], str(tmp_path / "e.npz"), cache_dir=str(tmp_path / "c"),
                         quiet=True)
    first = run(config)
    assert list(first.record_ids) == ["r0", "r1", "r2"] and len(list((tmp_path / "c").iterdir())) == 1

    for suffix in ("hea", "dat"):
        (folder / f"r1.{suffix}").unlink()
    after_delete = run(config)
    assert list(after_delete.record_ids) == ["r0", "r2"]
    np.testing.assert_array_equal(after_delete.embeddings, first.embeddings[[0, 2]])

    write_wfdb(folder, "r2", ecg(12, seed=7), FS, ["II", "V5"])  # same name and size, another signal
    os.utime(folder / "r2.dat", ns=(1, 1))
    after_edit = run(config)
    assert np.abs(after_edit.embeddings[1] - first.embeddings[2]).max() > 1e-3
    np.testing.assert_array_equal(after_edit.embeddings[0], first.embeddings[0])
    assert len(list((tmp_path / "c").iterdir())) == 3


def test_cache_with_a_missing_checkpoint_names_the_option(tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(missing), "--data", "demo:2", "--out", str(tmp_path / "e.npz"),
              "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert exit_info.value.code == 2
    assert f"--checkpoint {missing}: no such file or directory" in capsys.readouterr().err
    with pytest.raises(OptionError, match="no_such_checkpoint: no such file or directory"):
        load_encoder(missing)


# ----------------------------------------------------------------------------- 11: options


@pytest.mark.parametrize("change, message", [
    ({"out": "x.csv"}, "--out x.csv: use a .npy, .npz or .parquet file"),
    ({"batch_windows": 0}, "--batch-windows must be >= 1, got 0"),
    ({"batch_windows": -1}, "--batch-windows must be >= 1, got -1"),
    ({"modality": "eeg"}, "--modality must be one of both, ecg, ppg"),
    ({"pooling": "max"}, "--pooling must be one of cls, mean, mean\\+std"),
    ({"precision": "fp8"}, "--precision must be one of"),
    ({"preset": "huge"}, "--preset must be one of"),
    ({"data": []}, "--data: give at least one data spec"),
])
def test_every_option_is_checked_when_the_config_is_made(checkpoint, tmp_path, change, message):
    base = {"checkpoint": str(checkpoint), "data": ["demo:2"], "out": str(tmp_path / "e.npz")}
    with pytest.raises(OptionError, match=message):
        EmbedConfig(**{**base, **change})


def test_bad_output_paths_are_refused_before_any_work(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embed_module, "embed_source", lambda *a, **k: pytest.fail("embedded before checking"))
    monkeypatch.setattr(embed_module, "load_encoder", lambda *a, **k: pytest.fail("loaded before checking"))
    for out, message in ((tmp_path / "x.csv", "use a .npy, .npz or .parquet file"),
                         (tmp_path / "missing" / "x.npz", f"folder {tmp_path / 'missing'} does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(checkpoint), "--data", "demo:2", "--out", str(out)])
        assert exit_info.value.code == 2 and f"--out {out}: {message}" in capsys.readouterr().err
    (tmp_path / "file").touch()
    with pytest.raises(OptionError, match="--cache-dir .*file: not a folder"):
        run(EmbedConfig(str(checkpoint), ["demo:2"], str(tmp_path / "e.npz"), cache_dir=str(tmp_path / "file")))


def test_a_pth_needs_a_preset_and_data_must_exist_before_any_work(checkpoint, tmp_path):
    (tmp_path / "published.pth").touch()
    with pytest.raises(OptionError, match="published.pth: a .pth checkpoint needs --preset"):
        run(EmbedConfig(str(tmp_path / "published.pth"), ["demo:2"], str(tmp_path / "e.npz")))
    with pytest.raises(OptionError, match="--data wfdb:.*nowhere: .*nowhere: no WFDB records"):
        run(EmbedConfig(str(checkpoint), [f"wfdb:{tmp_path / 'nowhere'}"], str(tmp_path / "e.npz")))


# ----------------------------------------------------------------------------- 13: long records


class LongSource:
    """One synthetic record of ``minutes`` at 500 Hz with 12 leads, generated on read: the
    whole of it for ``[0]`` (as a reader would load it), only the asked span for read_window."""

    fs, leads = 500.0, 12

    def __init__(self, minutes: float) -> None:
        self.seconds = 60.0 * minutes

    def __len__(self) -> int:
        return 1

    def duration_s(self, index: int) -> float:
        return self.seconds

    def read_window(self, index: int, start_s: float, window_s: float) -> Record:
        first = int(round(start_s * self.fs))
        last = min(int(round(self.seconds * self.fs)), int(round((start_s + window_s) * self.fs)))
        t = np.arange(first, last, dtype=np.float64)[None] / self.fs
        gains = 1.0 + 0.1 * np.arange(self.leads)[:, None]
        signal = (gains * np.sin(2 * np.pi * 1.2 * t) ** 31 + 0.1 * np.sin(2 * np.pi * 0.2 * t)).astype(np.float32)
        names = [f"L{c}" for c in range(self.leads)]
        return Record(signal, self.fs, names, ["mV"] * self.leads, list(range(self.leads)), ["ECG"] * self.leads,
                      record_id="long", patient_id="p")

    def __getitem__(self, index: int) -> Record:
        return self.read_window(index, 0.0, self.seconds)


def test_long_records_are_embedded_part_by_part_in_flat_memory(monkeypatch):
    """Peak Python-heap memory (numpy arrays) of embedding a 12-lead 500 Hz record: the
    same for 12 and 36 min with 1 min parts (13 MB here); read whole, the record took 71
    and 214 MB. The encoder is replaced by a stub (torch memory is not traced)."""
    monkeypatch.setattr(data_module, "PART_WINDOWS", 6)
    monkeypatch.setattr(embed_module, "encode_windows",
                        lambda encoder, signals, *a: np.zeros((len(signals), 4), np.float32))
    embed_source(torch.nn.Linear(1, 1), LongSource(1), progress=False)  # one-time costs (compiled kernels) first
    peaks = {}
    for minutes in (12, 36):
        tracemalloc.start()
        out = embed_source(torch.nn.Linear(1, 1), LongSource(minutes), progress=False, keep_windows=True)
        peaks[minutes] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert out.n_windows.tolist() == [6 * minutes]
        np.testing.assert_array_equal(out.window_start_s, np.arange(6 * minutes) * 10.0)
    assert peaks[36] < 1.25 * peaks[12] and peaks[36] < 40, peaks


def test_parts_give_the_windows_of_the_whole_record(encoder, monkeypatch):
    """Parts are read with 5 s of margin for the filters; only their z-scoring is their own.
    On a steady signal, part-by-part and whole-record embeddings agree closely."""
    source = LongSource(1.0)
    source.leads = 2
    whole = embed_source(encoder, [source[0]], keep_windows=True, progress=False)
    monkeypatch.setattr(data_module, "PART_WINDOWS", 2)
    parts = embed_source(encoder, source, keep_windows=True, progress=False)
    np.testing.assert_array_equal(parts.window_start_s, whole.window_start_s)
    np.testing.assert_allclose(parts.window_embeddings, whole.window_embeddings, atol=2e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a part is no record of its own: nothing to report
        embed_source(encoder, source, progress=False)


def test_pooled_tokens_of_kept_patches_match_a_batch_of_shorter_windows(encoder):
    """encode_windows on windows padded with invalid samples == the windows cut short."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2500)).astype(np.float32)
    valid = np.ones_like(x, dtype=bool)
    valid[:, 1500:] = False
    padded = encode_windows(encoder, [x], [[1, 12]], [valid], "mean+std")
    with torch.no_grad():
        short = pool_tokens(encoder(embed_module.make_batch([x[:, :1500]], [[1, 12]])), "mean+std")
    np.testing.assert_allclose(padded, short.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.data
def test_a_real_multisegment_record_in_parts_skips_its_gaps(monkeypatch):
    """MIMIC-III s25047 (72 min at 125 Hz) starts with 206 s of gap: 100 s parts in the gap
    have nothing recorded (NoSignalError) and give no windows; the windows are those of the
    record read whole. Numerics records in the folder cannot be read: listed, not embedded."""
    folder = need(PHYSIONET / "mimic3wdb" / "s25047")
    monkeypatch.setattr(embed_module, "encode_windows",
                        lambda encoder, signals, *a: np.zeros((len(signals), 4), np.float32))
    source = embed_module.open_sources([f"wfdb:{folder}?pattern=s25047-2704-05-04-10-44.hea"])
    whole = embed_source(torch.nn.Linear(1, 1), source, keep_windows=True, progress=False)
    monkeypatch.setattr(data_module, "PART_WINDOWS", 10)
    parts = embed_source(torch.nn.Linear(1, 1), source, keep_windows=True, progress=False)
    assert parts.n_windows.tolist() == whole.n_windows.tolist() == [414]
    np.testing.assert_array_equal(parts.window_start_s, whole.window_start_s)
    assert parts.window_start_s[0] == 210.0
    everything = embed_module.open_sources([f"wfdb:{folder}"])
    unusable = find_unusable(everything, range(len(everything)), PreprocessConfig())
    assert any("s25047-2704-05-04-10-44n.hea: no usable ECG/PPG channel" in why for _, why in unusable.values())
