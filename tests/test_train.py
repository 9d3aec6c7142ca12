"""python -m csfm.train: options checked before anything is written, a short demo run whose
loss falls, resume rules, and kill-and-resume equality (more faults in test_train_faults.py)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import replace

import numpy as np
import pytest
import torch

from csfm.cli import OptionError
from csfm.evaluation.embedding import load_encoder
from csfm.model.batch import make_batch
from csfm.model.checkpoint import load_pretrained, load_weights
from csfm.model.token_rhythm import RHYTHM_WIDTH
from csfm.training.loop import LOG_COLUMNS, TrainConfig, parse_config, train, training_preprocess

SMALL = ["--demo-records", "24", "--batch-size", "4", "--precision", "fp32", "--quiet", "--workers", "0",
         "--val-fraction", "0.25"]


def _losses(log: Path) -> dict[int, float]:
    """step -> training loss."""
    with open(log) as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f) if row["loss"]}


def _rows(log: Path) -> list[dict[str, str]]:
    """Every row of a log.csv but its timing column."""
    with open(log) as f:
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in csv.DictReader(f)]


def test_help_shows_every_option_with_its_default():
    done = subprocess.run([sys.executable, "-m", "csfm.train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ["--preset", "--batch-size", "--accum-steps", "--resume", "--overwrite", "--precision", "--data"]:
        assert flag in done.stdout
    assert "(default: 16)" in done.stdout


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nbatch_size: 3\nlr: 2e-3\n")
    config = parse_config(["--config", str(tmp_path / "run.yaml"), "--batch-size", "5"])
    assert (config.epochs, config.batch_size, config.lr, config.preset) == (7, 5, 2e-3, "demo")
    (tmp_path / "bad.yaml").write_text("epoch: 7\n")
    with pytest.raises(OptionError, match="unknown options"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])


BAD_FLAGS = [
    (["--keep-last", "-1"], "--keep-last must be an integer >= 1, got -1"),
    (["--keep-last", "0"], "--keep-last must be an integer >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--max-steps", "-1"], "--max-steps must be an integer >= 0"),
    (["--lead-subset-prob", "7"], r"--lead-subset-prob must be a number in \[0, 1\], got 7.0"),
    (["--warmup-fraction", "3"], r"--warmup-fraction must be a number in \[0, 1\]"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--accum-steps", "0"], "--accum-steps must be an integer >= 1"),
    (["--signal-mask-ratio", "1.5"], r"--signal-mask-ratio must be a number in \(0, 1\)"),
    (["--signal-mask-ratio", "0"], r"--signal-mask-ratio must be a number in \(0, 1\)"),
    (["--text-mask-ratio", "-0.1"], r"--text-mask-ratio must be a number in \[0, 1\]"),
    (["--val-fraction", "1"], r"--val-fraction must be a number in \(0, 1\)"),
    (["--min-lr-ratio", "2"], r"--min-lr-ratio must be a number in \[0, 1\]"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number >= 0"),
    (["--mask-span-s", "-1"], "--mask-span-s must be a finite number >= 0"),
    (["--window-s", "0.5"], "--window-s must be a whole number of 0.1 s patches from 1 to 60 s, got 0.5"),
    (["--window-s", "12.34"], "--window-s must be a whole number of 0.1 s patches"),
    (["--window-s", "61"], "--window-s must be a whole number of 0.1 s patches"),
    (["--threads", "-1"], "--threads must be an integer >= 0"),
    (["--workers", "-2"], "--workers must be an integer >= 0"),
    (["--cache-mb", "-1"], "--cache-mb must be a finite number >= 0"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*32\)"),
    (["--save-every", "-1"], "--save-every must be an integer >= 0"),
    (["--demo-records", "0"], "--demo-records must be an integer >= 1"),
    (["--data", "wfdb:"], "--data 'wfdb:': expected KIND:PATH"),
    (["--data", "demo:many"], "demo takes a record count"),
    (["--data", "demo:0"], "--data gives 0 training record"),
    (["--data", "wfdb:no/such/folder"], "--data: no/such/folder: no WFDB records"),
    (["--resume", "auto", "--overwrite"], "give one"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16: .*needs a CUDA device"),
    (["--vocab", "no/such/vocab.txt"], "--vocab no/such/vocab.txt: no such file"),
    (["--resume", "elsewhere/step_00000002"], "is not a checkpoint of --out-dir"),
]


@pytest.mark.parametrize("argv, match", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_options_fail_before_anything_is_written(tmp_path, argv, match):
    out = tmp_path / "run"
    with pytest.raises(OptionError, match=match):
        train(parse_config([*SMALL, "--out-dir", str(out), *argv]))
    assert not out.exists()


@pytest.mark.parametrize("text, match", [
    ('lr: "abc"', r"lr \(--lr\) must be a number, got 'abc'"),
    ("epochs: 2.5", r"epochs \(--epochs\) must be an integer, got 2.5"),
    ("data: wfdb:x", r"data \(--data\) must be a list of strings, got 'wfdb:x'"),
    ("quiet: 1", r"quiet \(--quiet\) must be true or false, got 1"),
    ("preset: huge", r"preset \(--preset\) must be one of tiny, base, large, demo"),
    ("batch_size: 0", r"batch_size \(--batch-size\) must be an integer >= 1"),
])
def test_bad_config_file_values_name_option_and_file(tmp_path, text, match):
    (tmp_path / "run.yaml").write_text(text + "\n")
    with pytest.raises(OptionError, match=match) as info:
        parse_config(["--config", str(tmp_path / "run.yaml"), "--out-dir", str(tmp_path / "run")])
    assert str(tmp_path / "run.yaml") in str(info.value)
    assert not (tmp_path / "run").exists()


def test_cli_prints_the_error_and_exits_2_without_writing(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "csfm.train", "--out-dir", str(out), "--batch-size", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "csfm.train: error: --batch-size must be an integer >= 1, got 0"
    assert not out.exists()


def test_config_built_in_python_is_checked_too():
    with pytest.raises(OptionError, match="--threads must be an integer >= 0"):
        TrainConfig(threads=-1)
    with pytest.raises(OptionError, match="--epochs must be an integer, got 2.5"):
        TrainConfig(epochs=2.5)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 4-step run (12 training records: 3 batches per epoch; stopped in epoch 1) and its options."""
    out = tmp_path_factory.mktemp("finished") / "run"
    options = [*SMALL, "--data", "demo:15", "--epochs", "2", "--max-steps", "4", "--out-dir", str(out)]
    train(parse_config(options))
    return out, options


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, match", [
    (["--batch-size", "3"], "--batch-size 4 -> 3"),
    (["--epochs", "3", "--seed", "1"], "--epochs 2 -> 3; --seed 0 -> 1"),
    (["--preset", "tiny"], "--preset 'demo' -> 'tiny'"),
    (["--data", "demo:21"], r"--data \['demo:15'\] -> \['demo:21'\]"),
    (["--signal-mask-ratio", "0.5"], "--signal-mask-ratio 0.75 -> 0.5"),
    (["--mask-span-s", "1"], "--mask-span-s 0.0 -> 1.0"),
])
def test_resume_refuses_changed_schedule_options(finished_run, tmp_path, change, match):
    source, options = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = _snapshot(run)
    with pytest.raises(OptionError, match=match) as info:
        train(parse_config([*options, "--out-dir", str(run), "--resume", "auto", *change]))
    assert len(str(info.value).splitlines()) == 1
    assert _snapshot(run) == before


def test_a_run_of_a_csfm_without_an_option_resumes_with_its_default(finished_run, tmp_path):
    source, options = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    for config in (run / "checkpoints").glob("step_*/config.json"):  # as an older csfm wrote them
        payload = json.loads(config.read_text())
        del payload["train"]["mask_span_s"]
        config.write_text(json.dumps(payload))
    with pytest.raises(OptionError, match=r"--mask-span-s 0.0 -> 0.5"):
        train(parse_config([*options, "--out-dir", str(run), "--resume", "auto", "--mask-span-s", "0.5"]))
    assert train(parse_config([*options, "--out-dir", str(run), "--resume", "auto"])).name == "step_00000004"


def test_resume_may_change_run_time_options(finished_run, tmp_path):
    source, options = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    rows = _rows(run / "log.csv")
    final = train(parse_config([*options, "--out-dir", str(run), "--resume", "auto", "--keep-last", "1",
                                "--save-every", "5", "--cache-mb", "0"]))
    assert final == run / "checkpoints" / "step_00000004" and final.is_dir()
    assert _rows(run / "log.csv") == rows
    assert json.loads((run / "train_config.json").read_text())["keep_last"] == 1


def test_log_has_separate_validation_losses(finished_run):
    source, _ = finished_run
    with open(source / "log.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == LOG_COLUMNS
        rows = list(reader)
    val = [row for row in rows if row["val_loss"]]
    assert [(row["step"], row["epoch"]) for row in val] == [("3", "0")]  # epoch 1 stopped at step 4
    loss, signal, text = (float(val[0][k]) for k in ("val_loss", "val_signal_loss", "val_text_loss"))
    assert 0 < signal < 5 and 0 < text < 20
    assert loss == pytest.approx(signal + 0.5 * text, abs=2e-5)  # MaskedPretrainer's weights 1 and 0.5


def test_overwrite_replaces_only_the_run(finished_run, tmp_path):
    source, options = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step_00000099").mkdir()
    final = train(parse_config([*options, "--out-dir", str(run), "--max-steps", "1", "--overwrite"]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert final.is_dir() and (run / "notes.txt").read_text() == "mine"
    assert sorted(_losses(run / "log.csv")) == [1]


@pytest.mark.slow
def test_demo_pretraining_loss_falls(tmp_path):
    out = tmp_path / "run"
    config = parse_config([*SMALL, "--epochs", "3", "--lr", "2e-3", "--out-dir", str(out)])
    final = train(config)
    losses = list(_losses(out / "log.csv").values())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    for name in ["reconstruction.png", "train_config.json", "vocab.txt"]:
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())


@pytest.mark.slow
def test_killed_run_resumes_with_identical_log(tmp_path):
    """SIGKILL right after the epoch-0 checkpoint (step 4, with its validation row), resume:
    every row, validation rows included, as in an uninterrupted run."""
    common = [*SMALL, "--epochs", "2", "--max-steps", "8", "--save-every", "2"]
    train(parse_config([*common, "--out-dir", str(tmp_path / "straight")]))

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "csfm.train", *common, "--out-dir", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_00000004").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    train(parse_config([*common, "--out-dir", str(killed), "--resume", "auto"]))
    assert sorted(_losses(killed / "log.csv")) == list(range(1, 9))
    assert _rows(killed / "log.csv") == _rows(tmp_path / "straight" / "log.csv")


def test_config_defaults_are_the_demo_run():
    config = TrainConfig()
    assert config.preset == "demo" and config.data == [] and config.out_dir == "runs/demo"


def test_precision_choices():
    import torch

    from csfm.training.precision import choose_precision

    assert choose_precision("fp32", torch.device("cpu")).dtype is None
    assert choose_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16
    assert choose_precision("auto", torch.device("cpu")).name in ("fp32", "bf16")
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        choose_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp8", torch.device("cpu"))


@pytest.mark.slow
def test_two_process_run_matches_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) with the same global batch gives the same losses,
    also with 2 micro-batches per step (gradients all-reduced on the last one only)."""
    common = [*SMALL, "--epochs", "1", "--max-steps", "3", "--accum-steps", "2", "--batch-size", "2"]
    train(parse_config([*common, "--out-dir", str(tmp_path / "one")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "csfm.train", *common, "--out-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _losses(tmp_path / "one" / "log.csv"), _losses(tmp_path / "two" / "log.csv")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_shipped_cinc2017_config_parses():
    config = parse_config(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "cinc2017_pretrain.yaml")])
    assert config.preset == "demo" and config.threads == 1 and config.data == ["wfdb:../shared/data/cinc2017"]


def test_rhythm_run_trains_the_head_and_logs_its_loss(tmp_path):
    out = tmp_path / "run"
    final = train(parse_config([*SMALL, "--data", "demo:12", "--epochs", "1", "--out-dir", str(out),
                                "--rhythm-weight", "5", "--rhythm-input", "tokens"]))
    assert load_weights(final)["rhythm_head.weight"].shape[1] == RHYTHM_WIDTH  # it read the tokens' rhythm
    rows = [row for row in _rows(out / "log.csv") if row["loss"]]
    signal, text = float(rows[0]["signal_loss"]), float(rows[0]["text_loss"])
    assert float(rows[0]["loss"]) > signal + 0.5 * text  # the rhythm term is in the logged loss
    with pytest.raises(OptionError, match="rhythm-weight"):
        parse_config([*SMALL, "--rhythm-weight", "-1"])
    with pytest.raises(SystemExit):  # argparse names the choices
        parse_config([*SMALL, "--rhythm-input", "cls"])


def test_longer_windows_grow_the_position_table_and_load_as_a_10_s_encoder(tmp_path):
    """--window-s 15: 3,750-sample windows, 150 positions in the encoder and the decoder; the
    checkpoint loads into the published 100-position layout, whose embedding of a 10 s window
    is the long encoder's."""
    config = parse_config([*SMALL, "--data", "demo:12", "--epochs", "1", "--max-steps", "2",
                           "--out-dir", str(tmp_path / "run"), "--window-s", "15"])
    assert training_preprocess(config).window == 3750
    final = train(config)
    weights = load_weights(final)
    assert weights["encoder.ts_pos_embedding"].shape[1] == 150 and weights["decoder_pos_embedding"].shape[0] == 150
    long = load_encoder(final).eval()
    published = load_pretrained(final, replace(long.config, n_positions=100)).eval()
    assert published.ts_pos_embedding.shape[1] == 100
    rng = np.random.default_rng(0)
    with torch.no_grad():
        batch = make_batch([rng.standard_normal((2, 2500))], [[0, 1]])
        torch.testing.assert_close(published(batch).mean, long(batch).mean)
        whole = long(make_batch([rng.standard_normal((1, 3750))], [[0]]))
        assert whole.tokens.shape[0] == 1 + 150  # one sequence: CLS and 150 patches, not split in two
    with pytest.raises(ValueError, match="ts_pos_embedding"):  # fewer positions than the model has: refused
        load_pretrained(final, replace(long.config, n_positions=200))


def test_contrastive_run_pairs_two_windows_of_each_record(tmp_path, monkeypatch):
    from csfm.data.demo import DemoDataset
    from csfm.data.windows import PretrainWindows, collate_views

    long = DemoDataset(2, duration_s=30.0)
    views = PretrainWindows(long, None, subset_prob=0.0, views=2, cache_mb=64)  # cached: crops at any offset
    first, second = views[0]
    assert first.record_id == second.record_id and not np.array_equal(first.x, second.x)  # two crops of one record
    assert len(collate_views([views[0], views[1]])) == 4
    out = tmp_path / "run"
    final = train(parse_config([*SMALL, "--data", "demo:12", "--epochs", "1", "--out-dir", str(out),
                                "--contrastive-weight", "0.5"]))
    weights = load_weights(final)
    assert any(name.startswith("projection.") for name in weights)
    rows = [row for row in _rows(out / "log.csv") if row["loss"]]
    signal, text = float(rows[0]["signal_loss"]), float(rows[0]["text_loss"])
    assert float(rows[0]["loss"]) > signal + 0.5 * text  # the contrastive term is in the logged loss
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OptionError, match="--contrastive-weight runs in one process for now"):
        train(parse_config([*SMALL, "--out-dir", str(tmp_path / "two"), "--contrastive-weight", "0.5"]))


def _torchrun(argv: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "csfm.train", *argv], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_from_its_sharded_checkpoint_and_loads_in_one_process(tmp_path):
    """--sharding fsdp (FSDP2, 2 gloo processes) logs DDP's losses within 1e-5; continued from an
    earlier checkpoint (its sharded/ state, torch.distributed.checkpoint) it ends where the
    straight run ended; its model.safetensors loads into one process for embedding."""
    import torch
    from safetensors.torch import load_file

    from csfm.evaluation.embedding import load_encoder

    common = [*SMALL, "--epochs", "2", "--save-every", "2", "--keep-last", "10", "--accum-steps", "2"]
    _torchrun([*common, "--out-dir", str(tmp_path / "ddp")])
    _torchrun([*common, "--out-dir", str(tmp_path / "fsdp"), "--sharding", "fsdp"])
    ddp, fsdp = _rows(tmp_path / "ddp" / "log.csv"), _rows(tmp_path / "fsdp" / "log.csv")
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp]
    for a, b in zip(ddp, fsdp):
        for column in ("loss", "signal_loss", "text_loss", "val_loss"):
            if a[column]:
                assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-5), (a["step"], column)
    steps = sorted((tmp_path / "fsdp" / "checkpoints").glob("step_*"))
    assert all((d / "sharded").is_dir() and not (tmp_path / "ddp" / "checkpoints" / d.name / "sharded").exists()
               for d in steps)

    # continue a copy of the run from its second checkpoint
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "fsdp", again)
    for later in steps[2:]:
        shutil.rmtree(again / "checkpoints" / later.name)
    (again / "checkpoints" / "latest").write_text(steps[1].name)
    _torchrun([*common, "--out-dir", str(again), "--sharding", "fsdp", "--resume", "auto"])
    final = steps[-1].name
    ours, theirs = (load_file(d / "checkpoints" / final / "model.safetensors") for d in (again, tmp_path / "fsdp"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _rows(again / "log.csv") == fsdp

    encoder = load_encoder(tmp_path / "fsdp" / "checkpoints" / final)  # one process, no process group
    reference = load_file(tmp_path / "ddp" / "checkpoints" / final / "model.safetensors")
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, reference[f"encoder.{name}"], rtol=1e-4, atol=1e-5)


def test_fsdp_needs_several_processes(tmp_path):
    with pytest.raises(OptionError, match="--sharding fsdp shards over the processes of a torchrun job"):
        train(parse_config([*SMALL, "--out-dir", str(tmp_path / "run"), "--sharding", "fsdp"]))
