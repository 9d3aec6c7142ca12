"""Prepared shards: ``python -m csfm.prepare`` and ``--data shards:DIR``."""
from __future__ import annotations

import json
import multiprocessing
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csfm.cli import OptionError
from csfm.data.demo import DemoDataset
from csfm.data.prepare_shards import PrepareConfig, prepare, prepare_shard
from csfm.data.preprocess import PreprocessConfig, RecordCheck
from csfm.data.shards import INDEX, FLOAT16_MAX, SHARD_LAYOUT, ShardFormatError, ShardSource, shard_name
from csfm.data.sources import open_sources
from csfm.data.windows import PretrainWindows
from csfm.training.loop import main as train_main

sys.path.insert(0, str(Path(__file__).parent))
from test_embed_faults import four_records  # noqa: E402
from test_train_faults import _latest_step, _rows, _wait  # noqa: E402


def _prepare(out: Path, *data: str, per_shard: int = 5, workers: int = 0) -> Path:
    return prepare(PrepareConfig(data=list(data), out=str(out), records_per_shard=per_shard, workers=workers,
                                 quiet=True))


def _assert_same_end(killed: Path, straight: Path) -> None:
    """The killed and resumed run ends with the uninterrupted run's last weights and log rows."""
    last = sorted((straight / "checkpoints").glob("step_*"))[-1].name
    ours = load_file(killed / "checkpoints" / last / "model.safetensors")
    theirs = load_file(straight / "checkpoints" / last / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert _rows(killed / "log.csv") == _rows(straight / "log.csv")


def test_rows_hold_the_preprocessed_records(tmp_path):
    index = _prepare(tmp_path / "shards", "demo:12")
    shards = ShardSource(index.parent)
    demo = DemoDataset(12)
    assert len(shards) == 12 and len(list(index.parent.glob("shard-*.arrow"))) == 3
    for i in (0, 7, 11):
        record = demo[i]
        x, valid, used = RecordCheck(PreprocessConfig()).span(record)
        row = shards.prepared(i)
        assert row.x.dtype == np.float16 and row.x.shape == x.shape
        assert row.record_id == record.record_id and row.channel_types == [record.channel_types[c] for c in used]
        assert row.text == record.text and row.start_s == 0.0
        np.testing.assert_array_equal(row.valid, valid)
        # float16 keeps ~3 decimal digits of the z-scored samples
        np.testing.assert_allclose(row.x[valid].astype(np.float32), x[valid], rtol=1e-3, atol=1e-3)
    assert shards.record_ids == [demo.record_ids[i] for i in range(12)]
    assert shards.patient_ids == open_sources(["demo:12"]).patient_ids
    assert shards[3].fs == 250.0 and shards[3].signal.dtype == np.float32


def test_storage_is_the_float16_bytes_and_invalid_samples_stay_invalid(tmp_path):
    from csfm.data.shards import PreparedRecord, write_shard

    x = np.random.default_rng(0).standard_normal((3, 5000)).astype(np.float32)
    x[0, 10] = 1e6  # beyond float16: clipped, not inf
    valid = np.ones_like(x, dtype=bool)
    valid[1, 100:300] = False
    rows = [PreparedRecord(f"r{i}", "p", 0.0, [0, 1, 12], x, valid, "report", {"age": 50}) for i in range(8)]
    size = write_shard(tmp_path / shard_name(0), rows)
    assert size <= 8 * x.size * 2 + 4096  # the float16 bytes, plus a few KiB of schema and small columns
    (tmp_path / INDEX).write_text(json.dumps({"layout": SHARD_LAYOUT, "fs": 250.0, "shards": [
        {"file": shard_name(0), "rows": 8, "record_ids": [r.record_id for r in rows], "patient_ids": ["p"] * 8}]}))
    row = ShardSource(tmp_path).prepared(5)
    np.testing.assert_array_equal(row.valid, valid)
    assert row.x[0, 10] == FLOAT16_MAX and row.metadata == {"age": 50} and row.record_id == "r5"


def test_pretraining_windows_from_shards_match_the_cached_path(tmp_path):
    """A shard-backed PretrainWindows draws the same crops (same rng) as the in-memory cache of
    the raw records, to float16 precision."""
    _prepare(tmp_path / "shards", "demo:6")
    raw = PretrainWindows(open_sources(["demo:6"]), None, subset_prob=0.5, cache_mb=64, seed=3)
    stored = PretrainWindows(open_sources([f"shards:{tmp_path / 'shards'}"]), None, subset_prob=0.5, seed=3)
    for epoch in (0, 1):
        raw.set_epoch(epoch), stored.set_epoch(epoch)
        for i in range(6):
            a, b = raw[i], stored[i]
            assert a.record_id == b.record_id and a.channel_types == b.channel_types
            np.testing.assert_array_equal(a.valid, b.valid)
            assert b.x.dtype == np.float32 and np.isfinite(b.x).all()
            np.testing.assert_allclose(b.x, a.x, rtol=1e-3, atol=2e-3)


def test_reports_tokenised_once_give_the_ids_training_would_make(tmp_path):
    """Prepared with --vocab, each row holds its report's word pieces; pretraining with that
    vocabulary takes them (cut to the model's text positions) instead of tokenising, and gets
    the ids tokenising gives; another vocabulary tokenises the report itself."""
    from csfm.data.tokenizer import ReportTokenizer

    demo = DemoDataset(6)
    vocab = ReportTokenizer.train([demo[i].text for i in range(6)], vocab_size=300)
    other = ReportTokenizer.train([demo[i].text for i in range(6)], vocab_size=300, min_frequency=1)
    vocab.save(tmp_path / "vocab.txt")
    index = prepare(PrepareConfig(data=["demo:6"], out=str(tmp_path / "shards"), vocab=str(tmp_path / "vocab.txt"),
                                  quiet=True))
    assert json.loads(index.read_text())["vocab_fingerprint"] == vocab.fingerprint != other.fingerprint
    shards = ShardSource(index.parent)
    for i in range(6):
        row = shards.prepared(i)
        assert row.text_ids.tolist() == vocab.encode(demo[i].text, 10_000).ids and row.text_vocab == vocab.fingerprint
    raw_spec, shard_spec = "demo:6", f"shards:{index.parent}"
    for tokenizer in (vocab, other):
        raw = PretrainWindows(open_sources([raw_spec]), tokenizer, max_text_tokens=4, cache_mb=64)
        stored = PretrainWindows(open_sources([shard_spec]), tokenizer, max_text_tokens=4)
        for i in range(6):
            a, b = raw[i], stored[i]
            assert b.text_ids.dtype == np.int64 and len(b.text_ids) == 4  # demo reports are longer: cut
            np.testing.assert_array_equal(a.text_ids, b.text_ids)
        assert all((row.text_ids is not None) == (tokenizer is vocab) for row in stored._prepared.values())
        copy = pickle.loads(pickle.dumps(stored))  # as a worker gets it: no copies of mapped rows
        assert stored._prepared and not copy._prepared
        np.testing.assert_array_equal(copy[2].x, stored[2].x)
    with pytest.raises(OptionError, match="--vocab .*nowhere"):
        PrepareConfig(data=["demo:6"], out=str(tmp_path / "x"), vocab=str(tmp_path / "nowhere"))
    with pytest.raises(OptionError, match="vocab_fingerprint"):  # a stopped prepare continues with its vocabulary only
        prepare(PrepareConfig(data=["demo:6"], out=str(tmp_path / "shards"), quiet=True))


def test_unusable_records_are_listed_not_fatal(tmp_path):
    folder = four_records(tmp_path / "data")
    index = _prepare(tmp_path / "shards", f"wfdb:{folder}", per_shard=3)
    shards = ShardSource(index.parent)
    assert shards.record_ids == ["good"]
    listed = (index.parent / "unusable.csv").read_text().splitlines()
    assert listed[0] == "record_id,why" and sorted(line.split(",")[0] for line in listed[1:]) == \
        ["all_nan", "gappy", "short"]
    assert "no valid sample" in next(line for line in listed if line.startswith("all_nan"))


def test_a_stopped_prepare_continues_and_ends_as_one_run(tmp_path):
    straight = _prepare(tmp_path / "straight", "demo:11", per_shard=4)
    stopped = tmp_path / "stopped"
    config = PrepareConfig(data=["demo:11"], out=str(stopped), records_per_shard=4, quiet=True)
    with pytest.raises(KeyboardInterrupt):  # stopped after its first shard
        import csfm.data.prepare_shards as module
        original = module.prepare_shard

        def first_then_stop(cfg, number, out):
            if number > 0:
                raise KeyboardInterrupt
            return original(cfg, number, out)
        module.prepare_shard = first_then_stop
        try:
            prepare(config)
        finally:
            module.prepare_shard = original
    assert (stopped / shard_name(0)).is_file() and not (stopped / INDEX).exists()
    with pytest.raises(ShardFormatError, match="continues when run again"):
        ShardSource(stopped)
    (stopped / f".{shard_name(1)}.123.tmp").write_bytes(b"half a shard")  # what a killed write leaves
    prepare(config)
    assert json.loads((stopped / INDEX).read_text()) == json.loads(straight.read_text())
    assert (stopped / shard_name(0)).read_bytes() == (straight.parent / shard_name(0)).read_bytes()
    with pytest.raises(OptionError, match="other settings \\(records_per_shard\\)"):
        prepare(PrepareConfig(data=["demo:11"], out=str(stopped), records_per_shard=5, quiet=True))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="not a csfm.prepare folder"):
        _prepare(tmp_path / "other", "demo:3")


def test_workers_write_the_same_shards(tmp_path):
    one = _prepare(tmp_path / "one", "demo:9", per_shard=3)
    two = _prepare(tmp_path / "two", "demo:9", per_shard=3, workers=2)
    for k in range(3):
        assert (one.parent / shard_name(k)).read_bytes() == (two.parent / shard_name(k)).read_bytes()


def test_bad_folders_are_named(tmp_path):
    index = _prepare(tmp_path / "shards", "demo:4", per_shard=2)
    folder = index.parent
    settings = json.loads(index.read_text())
    index.write_text(json.dumps({**settings, "layout": 99}))
    with pytest.raises(ShardFormatError, match="field 'layout' is 99"):
        ShardSource(folder)
    settings["shards"][1]["rows"] = 3
    index.write_text(json.dumps(settings))
    with pytest.raises(ShardFormatError, match="record_ids' and 'patient_ids' must list every row"):
        ShardSource(folder)
    settings["shards"][1]["record_ids"].append("x")
    settings["shards"][1]["patient_ids"].append("x")
    index.write_text(json.dumps(settings))
    with pytest.raises(ShardFormatError, match=f"{shard_name(1)}: 2 rows, index.json says 3"):
        ShardSource(folder).prepared(2)
    (folder / shard_name(0)).write_bytes(b"not arrow")
    with pytest.raises(ShardFormatError, match="not a readable Arrow IPC shard"):
        ShardSource(folder).prepared(0)
    with pytest.raises(OptionError, match="give at least one source"):
        PrepareConfig(out=str(folder))


def test_training_on_shards_resumes_after_sigkill_with_the_same_losses(tmp_path):
    """A run on shards SIGKILLed mid-epoch and resumed ends with the weights and log rows of an
    uninterrupted one."""
    _prepare(tmp_path / "shards", "demo:24", per_shard=10)
    argv = ["--data", f"shards:{tmp_path / 'shards'}", "--batch-size", "4", "--epochs", "2", "--save-every", "1",
            "--val-fraction", "0.25", "--threads", "1", "--precision", "fp32", "--quiet", "--workers", "0",
            "--resume", "auto"]
    context = multiprocessing.get_context("forkserver")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for out in (straight, killed):
        if out == killed:
            child = context.Process(target=train_main, args=([*argv, "--out-dir", str(out)],))
            child.start()
            _wait(child, lambda: _latest_step(out) >= 2)
            assert child.is_alive()
            child.kill()
            child.join()
        child = context.Process(target=train_main, args=([*argv, "--out-dir", str(out)],))
        child.start()
        child.join(300)
        assert child.exitcode == 0
    _assert_same_end(killed, straight)


def test_embedding_windows_of_a_row_are_the_stored_samples_cut(tmp_path):
    """embed / finetune take a prepared row's windows as stored (no second filtering): those of
    the raw record, to float16 precision; a modality without channels in the row is its problem."""
    from csfm.data.windows import all_windows

    _prepare(tmp_path / "shards", "demo:3")
    shards, raw = open_sources([f"shards:{tmp_path / 'shards'}"]), open_sources(["demo:3"])
    for modality in ("both", "ecg", "ppg"):
        ours = all_windows(shards, 1, RecordCheck(PreprocessConfig(), modality), stride_s=5.0)
        theirs = all_windows(raw, 1, RecordCheck(PreprocessConfig(), modality), stride_s=5.0)
        assert ours.channel_types == theirs.channel_types and ours.record_id == theirs.record_id
        np.testing.assert_array_equal(ours.start_s, theirs.start_s)
        np.testing.assert_array_equal(ours.valid, theirs.valid)
        np.testing.assert_allclose(ours.x, theirs.x, rtol=1e-3, atol=2e-3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_shards_give_the_losses_of_one_process(tmp_path):
    """Two torchrun "nodes" (--nnodes 2, one process each, c10d rendezvous on localhost, gloo)
    training from shards log the losses of one process with the same global batch."""
    import os
    import subprocess

    _prepare(tmp_path / "shards", "demo:24", per_shard=10)
    common = ["--data", f"shards:{tmp_path / 'shards'}", "--batch-size", "4", "--epochs", "1", "--max-steps", "3",
              "--val-fraction", "0.25", "--precision", "fp32", "--quiet", "--workers", "0"]
    from csfm.training.loop import parse_config, train

    train(parse_config([*common, "--out-dir", str(tmp_path / "one")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}",
                               "--rdzv_id=csfm-two-nodes", "-m", "csfm.train", *common,
                               "--out-dir", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    one, two = _rows(tmp_path / "one" / "log.csv"), _rows(tmp_path / "two" / "log.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 3
    for a, b in zip(one, two):
        for column in ("loss", "signal_loss", "text_loss", "val_loss"):
            if a[column]:
                assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-4), (a["step"], column)


@pytest.mark.slow
def test_two_processes_on_shards_resume_after_sigkill_with_the_same_losses(tmp_path):
    """A torchrun job of 2 processes training from shards, SIGKILLed (launcher and workers)
    after a mid-epoch checkpoint and run again with --resume auto, ends with the weights and
    log rows of an uninterrupted 2-process job."""
    import os
    import signal
    import subprocess
    import time

    _prepare(tmp_path / "shards", "demo:24", per_shard=10)
    argv = ["--data", f"shards:{tmp_path / 'shards'}", "--batch-size", "4", "--epochs", "2", "--save-every", "1",
            "--val-fraction", "0.25", "--precision", "fp32", "--quiet", "--workers", "0", "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "csfm.train", *argv, "--out-dir", str(out)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    job = torchrun(killed)
    deadline = time.monotonic() + 300
    while _latest_step(killed) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both workers
    job.wait()
    for out in (killed, straight):
        job = torchrun(out)
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    _assert_same_end(killed, straight)


def test_crops_of_rows_with_gaps_and_short_rows_match_the_cached_path(tmp_path):
    """Rows with NaN gaps (crop starts found once per row, as runs) and a row shorter than the
    window give the cached raw records' crops: same starts, same valid masks."""
    from fixtures import write_wfdb
    from test_embed_faults import FS, ecg

    folder = tmp_path / "data"
    gappy = ecg(60, seed=1)
    gappy[FS * 20:FS * 28] = np.nan  # 8 s: windows mostly inside it fall below half valid
    gappy[FS * 30:FS * 33, 0] = np.nan  # one lead only
    write_wfdb(folder, "gappy", gappy, FS, ["II", "V5"])
    write_wfdb(folder, "short", ecg(8, seed=2), FS, ["II", "V5"])
    write_wfdb(folder, "whole", ecg(25, seed=3), FS, ["II", "V5"])
    across = ecg(14, seed=4)
    across[FS * 6:FS * 7] = np.nan  # a gap in every lead: zeroed by slices, not scanned for
    write_wfdb(folder, "across", across, FS, ["II", "V5"])
    _prepare(tmp_path / "shards", f"wfdb:{folder}")
    raw = PretrainWindows(open_sources([f"wfdb:{folder}"]), None, subset_prob=0.5, cache_mb=64, seed=5)
    stored = PretrainWindows(open_sources([f"shards:{tmp_path / 'shards'}"]), None, subset_prob=0.5, seed=5)
    assert [stored.records.record_ids[i] for i in range(4)] == [raw.records.record_ids[i] for i in range(4)]
    for epoch in range(6):
        raw.set_epoch(epoch), stored.set_epoch(epoch)
        for i in range(4):
            a, b = raw[i], stored[i]
            np.testing.assert_array_equal(a.valid, b.valid)
            np.testing.assert_allclose(b.x, a.x, rtol=1e-3, atol=2e-3)
    rows = {stored.records.record_ids[i]: row for i, row in stored._prepared.items()}
    assert len(rows) == 4 and any(len(row.runs) > 1 for row in rows.values())  # the gaps split the starts
    assert rows["gappy"].gaps is None and len(rows["whole"].gaps) == 0  # a one-lead gap: scanned for NaN
    assert len(rows["across"].gaps) >= 1 and rows["short"].gaps is not None  # all-lead gaps, the short row's end
