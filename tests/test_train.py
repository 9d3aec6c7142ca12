"""python -m csfm.train: CLI, a short demo run whose loss falls, and kill-and-resume equality."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csfm.train import TrainConfig, parse_config, train

SMALL = ["--demo-records", "24", "--batch-size", "4", "--precision", "fp32", "--quiet", "--workers", "0",
         "--val-fraction", "0.25"]


def _losses(log: Path) -> dict[int, float]:
    """step -> training loss (the last row written for a step wins, as after a resume)."""
    rows = {}
    with open(log) as f:
        for row in csv.DictReader(f):
            if row["loss"]:
                rows[int(row["step"])] = float(row["loss"])
    return rows


def test_help_shows_every_option_with_its_default():
    done = subprocess.run([sys.executable, "-m", "csfm.train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ["--preset", "--batch-size", "--accum-steps", "--resume", "--precision", "--data"]:
        assert flag in done.stdout
    assert "(default: 16)" in done.stdout


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nbatch_size: 3\n")
    config = parse_config(["--config", str(tmp_path / "run.yaml"), "--batch-size", "5"])
    assert (config.epochs, config.batch_size, config.preset) == (7, 5, "demo")
    (tmp_path / "bad.yaml").write_text("epoch: 7\n")
    with pytest.raises(ValueError, match="unknown options"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])


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
def test_killed_run_resumes_with_identical_losses(tmp_path):
    common = [*SMALL, "--epochs", "2", "--max-steps", "8", "--save-every", "2"]
    train(parse_config([*common, "--out-dir", str(tmp_path / "straight")]))
    straight = _losses(tmp_path / "straight" / "log.csv")

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
    resumed = _losses(killed / "log.csv")
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def test_config_defaults_are_the_demo_run():
    config = TrainConfig()
    assert config.preset == "demo" and config.data == [] and config.out_dir == "runs/demo"


def test_precision_choices():
    import torch

    from csfm.precision import choose_precision

    assert choose_precision("fp32", torch.device("cpu")).dtype is None
    assert choose_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16
    assert choose_precision("auto", torch.device("cpu")).name in ("fp32", "bf16")
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        choose_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp8", torch.device("cpu"))


@pytest.mark.slow
def test_two_process_run_matches_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) with the same global batch gives the same losses."""
    common = [*SMALL, "--epochs", "1", "--max-steps", "3"]
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


def test_shipped_cinc2017_config_parses_and_bad_threads_fail(tmp_path):
    config = parse_config(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "cinc2017_pretrain.yaml")])
    assert config.preset == "demo" and config.threads == 1 and config.data == ["wfdb:../shared/data/cinc2017"]
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        train(TrainConfig(out_dir=str(tmp_path), threads=-1))
