"""python -m csfm.train never loses a run's data: checked by running the command line in
another process and looking at the run folder afterwards (checkpoints kept, a refused run
leaves the folder byte for byte, SIGKILLs at random times change nothing in the end)."""
from __future__ import annotations

import csv
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csfm.cli import OptionError
from csfm.training.loop import main, parse_config, train

TINY = ["--data", "demo:30", "--epochs", "2", "--save-every", "1", "--precision", "fp32", "--quiet", "--workers", "0"]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m csfm.train ARGV --threads 1`` in another process."""
    return subprocess.run([sys.executable, "-m", "csfm.train", *argv, "--threads", "1"], capture_output=True,
                          text=True, timeout=600)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(log: Path) -> list[dict[str, str]]:
    """Every row of a log.csv but its timing column."""
    with open(log) as f:
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step demo run with --keep-last 1 (its "done." line checked here)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = _cli(*TINY, "--keep-last", "1", "--out-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    final = Path(re.search(r"done\. checkpoint (\S+),", done.stdout).group(1))
    assert final == out / "checkpoints" / "step_00000004" and (final / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000004"]
    return out


def test_keep_last_below_one_is_refused_before_anything_is_written(tmp_path):
    done = _cli(*TINY, "--keep-last", "-1", "--out-dir", str(tmp_path / "kl_neg"))
    assert done.returncode == 2 and "--keep-last must be an integer >= 1, got -1" in done.stderr
    assert not (tmp_path / "kl_neg").exists()


def test_refused_runs_leave_the_run_folder_untouched(finished, tmp_path):
    run = tmp_path / "clobber"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    bad = _cli("--out-dir", str(run), "--data", "demo:30", "--epochs", "1", "--signal-mask-ratio", "1.5")
    assert bad.returncode == 2 and "--signal-mask-ratio must be a number in (0, 1)" in bad.stderr
    new = _cli(*TINY, "--out-dir", str(run))  # valid options, but the folder holds a run
    assert new.returncode == 2 and "holds a run" in new.stderr and "--overwrite" in new.stderr
    assert _snapshot(run) == before
    # still resumable (in this process, to spare an interpreter start; --threads may change on resume)
    final = train(parse_config([*TINY, "--keep-last", "1", "--out-dir", str(run), "--resume", "auto"]))
    assert final == run / "checkpoints" / "step_00000004"
    assert _rows(run / "log.csv") == _rows(finished / "log.csv")


# ----------------------------------------------------------------------------- SIGKILL

KILL_RUN = ["--data", "demo:36", "--batch-size", "4", "--epochs", "8", "--save-every", "1", "--keep-last", "2",
            "--val-fraction", "0.25", "--threads", "1", "--precision", "fp32", "--quiet", "--workers", "0"]
"""27 training records: 7 steps per epoch, 56 in all, a checkpoint after each."""


def _wait(child, condition, timeout_s: float = 120) -> None:
    """Polls ``condition`` every ~ms while ``child`` runs."""
    deadline = time.monotonic() + timeout_s
    while child.is_alive() and not condition():
        assert time.monotonic() < deadline, f"no progress in {timeout_s} s"
        time.sleep(0.001)


def _checkpoint_temp_files(out: Path) -> int:
    """Temporary files of unfinished writes under checkpoints/ (os.walk: folders may vanish meanwhile)."""
    return sum(name.startswith(".") and name.endswith(".tmp")
               for _, _, names in os.walk(out / "checkpoints") for name in names)


def _latest_step(out: Path) -> int:
    """The step of the checkpoint ``latest`` names (0 before the first)."""
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().removeprefix("step_")) if pointer.is_file() else 0


def _logged_validation(out: Path, step: int) -> bool:
    """Whether log.csv has the validation row of ``step``."""
    return any(row["val_loss"] and int(row["step"]) == step for row in _rows(out / "log.csv"))


def _file_id(path: Path) -> tuple[int, int] | None:
    """Inode and mtime of ``path`` (None when absent): a file replaced by a rename gets another."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _kill_at_random(context, argv: list[str], out: Path, epoch_ends: list[int], kills: int, seed: int) -> int:
    """Starts ``argv`` ``kills`` times, each time SIGKILLed at a moment of one of four kinds
    in turn: at random shortly after its first checkpoint; while a checkpoint file is being
    written; at the end of an epoch, once its validation row is logged or once its
    checkpoint (a second one of the same step) is written; at random from the start
    (set-up and log rewrite included). Returns how many kills left a checkpoint file
    half-written."""
    rng, mid_write = random.Random(seed), 0
    for kill in range(kills):
        step = _latest_step(out)
        child = context.Process(target=main, args=(argv,))
        child.start()
        if kill % 4 == 3:
            time.sleep(rng.uniform(0.0, 1.5))
        elif kill % 4 == 2:
            end = min(e for e in epoch_ends if e > step)
            _wait(child, lambda: _latest_step(out) >= end)
            if kill % 8 == 2:
                _wait(child, lambda: _logged_validation(out, end))
            else:
                state = out / "checkpoints" / f"step_{end:08d}" / "train_state.pt"
                first = _file_id(state)
                _wait(child, lambda: _file_id(state) != first)
        else:
            _wait(child, lambda: _latest_step(out) != step)
            if kill % 4 == 0:
                time.sleep(rng.uniform(0.0, 0.15))
            else:
                _wait(child, lambda: _checkpoint_temp_files(out) > 0)
        assert child.is_alive(), f"the run finished after {kill} kills: make it longer"
        child.kill()
        child.join()
        mid_write += _checkpoint_temp_files(out) > 0
    return mid_write


@pytest.mark.slow
def test_twenty_random_sigkills_change_nothing(tmp_path):
    """20 SIGKILLs at random times, each followed by ``--resume auto``: the final weights and
    every log row, validation rows included (but tokens/s), are those of an uninterrupted
    run. About 90 s on 2 cores shared with other jobs."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["csfm.training.loop", "torch.utils.tensorboard"])

    def run_to_the_end(out: Path) -> None:
        child = context.Process(target=main, args=([*KILL_RUN, "--out-dir", str(out), "--resume", "auto"],))
        child.start()
        child.join(600)
        assert child.exitcode == 0

    straight, out = tmp_path / "straight", tmp_path / "killed"
    run_to_the_end(straight)
    epoch_ends = sorted({int(row["step"]) for row in _rows(straight / "log.csv") if row["val_loss"]})
    assert epoch_ends == [7, 14, 21, 28, 35, 42, 49, 56]
    mid_write = _kill_at_random(context, [*KILL_RUN, "--out-dir", str(out), "--resume", "auto"], out,
                                epoch_ends, kills=20, seed=0)
    assert mid_write >= 1, "no kill came during a checkpoint write"
    run_to_the_end(out)

    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert last.name == "step_00000056"
    ours, theirs = load_file(last / "model.safetensors"), load_file(straight / "checkpoints" / last.name /
                                                                   "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _rows(out / "log.csv") == _rows(straight / "log.csv")
    assert _checkpoint_temp_files(out) == 0  # what the killed writes left was cleaned up


def test_unusable_records_stop_training_by_name_unless_skipped(tmp_path):
    """The records embed refuses (tests/test_embed_faults.py) are refused by training too,
    before the run folder exists; --skip-unusable trains on the rest."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures import write_wfdb
    from test_embed_faults import FS, ecg, four_records

    folder = four_records(tmp_path / "data")
    for seed in range(1, 4):  # enough usable records for a training and a validation split
        write_wfdb(folder, f"good{seed}", ecg(20, seed=seed), FS, ["II", "V5"])
    out = tmp_path / "run"
    argv = ["--data", f"wfdb:{folder}", "--out-dir", str(out), "--epochs", "1",
            "--threads", "1", "--quiet"]
    with pytest.raises(OptionError, match=r"3 of 7 records cannot be used \(--skip-unusable leaves them out\)") as info:
        train(parse_config(argv))
    assert "all_nan: no valid sample in its channel(s) II, V5" in str(info.value)
    assert "short: no 10 s window" in str(info.value) and "gappy: no 10 s window" in str(info.value)
    assert not out.exists()
    with pytest.warns(UserWarning, match="3 of 7 records cannot be used; left out"):
        last = train(parse_config([*argv, "--skip-unusable"]))
    assert (last / "model.safetensors").is_file()
