"""Masked pretraining: ``python -m csfm.train`` (also ``csfm-train``).

With no arguments it pretrains the ``demo`` preset on generated demo records on the CPU
in a few minutes, writing to ``runs/demo``: a CSV and TensorBoard log, a PNG of original
vs reconstructed signal, checkpoints (atomic, last N kept) and the effective config.

Every option is checked before the run writes a file. A new run refuses an ``--out-dir``
that holds a run unless ``--overwrite`` (start over) or ``--resume`` (continue) says what to
do. ``--resume auto`` continues a killed run exactly where its last checkpoint left it (or
starts afresh where it has none yet); the options that set the data order or the schedule
must then be the checkpoint's, only --threads, --workers, --quiet, --device, --precision,
--cache-mb, --save-every, --keep-last and --out-dir may change.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import glob
import io
import itertools
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from csfm import cli
from csfm.files import atomic_write
from csfm.model.checkpoint import (CONFIG, STATE, WEIGHTS, latest_checkpoint, load_state_dict_checked,
                             load_train_state, load_weights, read_config, save_checkpoint)
from csfm.cli import NON_NEGATIVE, POSITIVE, OptionError, at_least, flag, in_range
from csfm.model.config import PRESETS, ModelConfig, preset
from csfm.data.splits import split_by_patient
from csfm.data.windows import (PretrainWindows, UnusableRecordsError, check_usable, collate, collate_views,
                               find_unusable)
from csfm.training.optim import make_optimizer, warmup_cosine
from csfm.training.precision import PRECISIONS, Precision, choose_precision
from csfm.training.sharding import SHARDED, full_weights, gradient_sync_paused, load_sharded, save_sharded, shard_model
from csfm.data.preprocess import PreprocessConfig
from csfm.model.pretrain import RHYTHM_INPUTS, MaskedPretrainer, PretrainOutput
from csfm.data.sources import MixedSource, open_sources, parse_spec
from csfm.data.tokenizer import ReportTokenizer
from csfm_kernels import PATCH_LEN


@dataclass
class TrainConfig:
    """Every option of a pretraining run (CLI flags of the same names, or a YAML/JSON file).
    Building one checks each value's type, choices and range (``metadata["valid"]``) and
    the --data specs: OptionError names the option and what it takes."""

    preset: str = field(default="demo", metadata={"help": "model size", "choices": tuple(PRESETS)})
    data: list[str] = field(default_factory=list, metadata={
        "help": "data sources, mixed: 'demo[:N][@WEIGHT]' or 'KIND:PATH[@WEIGHT]' with KIND "
                "wfdb|mimic3|mimic4|ptbxl|code15|files|shards (a csfm.prepare folder); empty = demo"})
    demo_records: int = field(default=600, metadata={"help": "demo records to generate (3 per patient)",
                                                     "valid": at_least(1)})
    out_dir: str = field(default="runs/demo", metadata={
        "help": "where logs and checkpoints go", "valid": ((lambda v: bool(v.strip())), "a folder name")})
    # epochs and lr: the demo run's values (306 steps of 16 records, about 3 minutes on 2 cores)
    epochs: int = field(default=9, metadata={"help": "passes over the training records", "valid": at_least(1)})
    batch_size: int = field(default=16, metadata={"help": "records per micro-batch", "valid": at_least(1)})
    accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "valid": at_least(1)})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate", "valid": POSITIVE})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "final lr as a fraction of the peak",
                                                        "valid": in_range(0, 1)})
    warmup_fraction: float = field(default=0.05, metadata={"help": "share of steps with linear warmup",
                                                           "valid": in_range(0, 1)})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay (not on norms, biases, embeddings)", "valid": NON_NEGATIVE})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)", "valid": NON_NEGATIVE})
    signal_mask_ratio: float = field(default=0.75, metadata={"help": "share of signal patches masked",
                                                             "valid": in_range(0, 1, True, True)})
    contrastive_weight: float = field(default=0.0, metadata={
        "help": "weight of a contrastive loss between two random 10 s windows of each record (InfoNCE over the "
                "batch on the mean encoded patch token; each step then encodes both); 0 = off, the published "
                "recipe; one process only", "valid": NON_NEGATIVE})
    rhythm_weight: float = field(default=0.0, metadata={
        "help": "weight of an auxiliary loss: a linear head on the mean encoded patch token predicts the "
                "autocorrelation of each window's signal envelope at lags 0.2-2 s (beat timing and its "
                "regularity, which masked-patch reconstruction alone never needs); 0 = off, the published recipe",
        "valid": NON_NEGATIVE})
    rhythm_input: str = field(default="mean", metadata={
        "help": "what the rhythm head reads: mean (the mean encoded patch token) or tokens (how alike the visible "
                "patch tokens are 0.1-2.5 s apart and how steadily, as mean+std+rhythm pooling reads them)",
        "choices": RHYTHM_INPUTS})
    mask_span_s: float = field(default=0.0, metadata={
        "help": "masked patches come in runs of this many seconds per channel (0 = each 0.1 s patch on its own, "
                "the published recipe)", "valid": NON_NEGATIVE})
    window_s: float = field(default=10.0, metadata={
        "help": "seconds of signal in each training window (10 = the published model's); a longer window gives "
                "the encoder more beats at once: its position table grows to one position per 0.1 s patch, the "
                "first 100 being the published 10 s layout (csfm.model.checkpoint.load_pretrained keeps those to "
                "load the encoder as a 10 s model)",
        "valid": ((lambda v: 1 <= v <= 60 and abs(v * 10 - round(v * 10)) < 1e-9),
                  "a whole number of 0.1 s patches from 1 to 60 s")})
    text_mask_ratio: float = field(default=0.5, metadata={"help": "share of text tokens masked",
                                                          "valid": in_range(0, 1)})
    lead_subset_prob: float = field(default=0.5, metadata={
        "help": "chance of training a sample on a random lead subset", "valid": in_range(0, 1)})
    val_fraction: float = field(default=0.1, metadata={"help": "share of patients held out for validation",
                                                       "valid": in_range(0, 1, True, True)})
    vocab: str = field(default="", metadata={
        "help": "BERT-style vocab.txt; empty = build one from the training reports"})
    precision: str = field(default="auto", metadata={
        "help": "auto measures whether bf16 is fast here", "choices": PRECISIONS})
    device: str = field(default="auto", metadata={"help": "auto = cuda where available",
                                                  "choices": ("auto", "cpu", "cuda")})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes", "valid": at_least(0)})
    sharding: str = field(default="ddp", metadata={
        "help": "with several processes (torchrun): ddp replicates the model in each; fsdp shards parameters, "
                "gradients and optimizer state over them (FSDP2), checkpointing the sharded state with "
                "torch.distributed.checkpoint", "choices": ("ddp", "fsdp")})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads per process (0 = torch's default); 1 keeps a small model fast on a busy machine",
        "valid": at_least(0)})
    cache_mb: float = field(default=1024.0, metadata={
        "help": "memory (MiB; training and validation set each, per process and worker) for "
                "preprocessed records of up to 10 min, so each is read and filtered once; 0 = off",
        "valid": NON_NEGATIVE})
    seed: int = field(default=0, metadata={"help": "seed of data order, masking, dropout and init",
                                           "valid": ((lambda v: 0 <= v < 2 ** 32), "an integer in [0, 2**32)")})
    save_every: int = field(default=0, metadata={
        "help": "also checkpoint every N optimizer steps (0 = each epoch only)", "valid": at_least(0)})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept (the newest always)", "valid": at_least(1)})
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0 = all epochs)",
                                                "valid": at_least(0)})
    resume: str = field(default="", metadata={
        "help": "continue from a checkpoint directory of --out-dir, or 'auto' = its latest (a fresh start "
                "where it has none yet); options that set the data order or schedule must be the run's"})
    overwrite: bool = field(default=False, metadata={
        "help": "start a new run in an --out-dir that holds one, deleting that run's checkpoints, logs, "
                "vocab.txt and train_config.json (other files are left alone)"})
    skip_unusable: bool = field(default=False, metadata={
        "help": "leave out, with a warning listing them, the records the model cannot use (no valid "
                "ECG/PPG sample, or no 10 s window with enough valid samples); without it such records "
                "stop the run before it starts, each named with its reason"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        cli.check_fields(self)
        for spec in self.data:
            try:
                parse_spec(spec, self.demo_records)
            except ValueError as exc:
                raise OptionError(str(exc)) from None
        if self.resume and self.overwrite:
            raise OptionError("--resume continues the run in --out-dir and --overwrite deletes it: give one")


RESUME_MAY_CHANGE = ("out_dir", "resume", "overwrite", "threads", "workers", "quiet", "device", "precision",
                     "cache_mb", "save_every", "keep_last")
"""Options a resumed run may change: they set neither the data order nor the schedule
(--precision changes the numerics, so the losses no longer match an uninterrupted run)."""


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the --config file, then explicit flags (see csfm.cli.parse_config)."""
    return cli.parse_config(TrainConfig, argv, "python -m csfm.train", __doc__)


# ----------------------------------------------------------------------------- run folder

_RUN_FILES = ("log.csv", "vocab.txt", "train_config.json", "reconstruction.png", "tensorboard", "checkpoints")
"""What a run writes into its --out-dir (and --overwrite deletes; nothing else there is touched)."""


def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the run's checkpoints, by step."""
    found = [(int(m.group(1)), d) for d in (out_dir / "checkpoints").glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", d.name)) and d.is_dir()]
    return sorted(found)


def _resume_from(config: TrainConfig, out_dir: Path) -> Path | None:
    """The checkpoint the run continues from, or None for a fresh start; an OptionError
    when --out-dir holds a run and neither --resume nor --overwrite says what to do, or the
    checkpoint cannot be continued with these options. Reads only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"--out-dir {out_dir} is a file, not a folder")
    held = [name for name in _RUN_FILES if (out_dir / name).exists()]
    if not config.resume:
        if held and not config.overwrite:
            raise OptionError(f"--out-dir {out_dir} holds a run ({', '.join(held)}): continue it with --resume auto, "
                              f"start it over with --overwrite, or choose another --out-dir")
        return None
    if config.resume == "auto":
        try:
            directory = latest_checkpoint(out_dir)
        except FileNotFoundError as exc:
            raise OptionError(f"--resume auto: {exc}; name a checkpoint with --resume PATH or start over "
                              f"with --overwrite") from None
        if directory is None:
            return None  # no checkpoint yet: the files of an attempt killed before it are replaced
    else:
        directory = Path(config.resume)
        if directory.resolve().parent != (out_dir / "checkpoints").resolve():
            raise OptionError(f"--resume {directory} is not a checkpoint of --out-dir {out_dir} "
                              f"(expected {out_dir / 'checkpoints'}/step_N): pass the --out-dir of its run")
    missing = [name for name in (WEIGHTS, CONFIG, STATE) if not (directory / name).is_file()]
    if missing:
        raise OptionError(f"--resume: checkpoint {directory} lacks {', '.join(missing)}")
    _check_stored_options(directory, config)
    return directory


def mask_span_patches(config: TrainConfig) -> int:
    """--mask-span-s in patches of the model input (25 samples at 250 Hz: 0.1 s), at least 1."""
    return max(1, round(config.mask_span_s * PreprocessConfig().target_fs / PATCH_LEN))


def training_preprocess(config: TrainConfig) -> PreprocessConfig:
    """The reference preprocessing with windows of --window-s seconds."""
    fs = PreprocessConfig().target_fs
    return PreprocessConfig(window=round(config.window_s * fs / PATCH_LEN) * PATCH_LEN)


def training_model_config(config: TrainConfig, vocab_size: int | None) -> ModelConfig:
    """The --preset's sizes with the tokenizer's vocabulary and a position for every patch
    of a --window-s window (never fewer than the preset's)."""
    base = preset(config.preset)
    positions = training_preprocess(config).window // PATCH_LEN
    return replace(base, n_positions=max(base.n_positions, positions),
                   **({"vocab_size": vocab_size} if vocab_size else {}))


def _check_stored_options(directory: Path, config: TrainConfig) -> None:
    """OptionError listing each option (old -> new) that differs from the checkpoint's run
    and may not change on resume."""
    try:
        stored = read_config(directory).get("train")
    except (OSError, ValueError) as exc:
        raise OptionError(f"--resume: {exc}") from None
    if not isinstance(stored, dict):
        raise OptionError(f"--resume: {directory / CONFIG} has no \"train\" options: not a csfm.training.loop checkpoint")
    # an option the run's csfm did not have yet ran with its default
    defaults = dataclasses.asdict(TrainConfig())
    changed = [f"{flag(name)} {stored.get(name, defaults[name])!r} -> {value!r}"
               for name, value in dataclasses.asdict(config).items()
               if name not in RESUME_MAY_CHANGE and stored.get(name, defaults[name]) != value]
    if changed:
        raise OptionError(
            f"--resume {directory}: these options differ from the run's and set its data order or schedule: "
            f"{'; '.join(changed)}. Pass the run's values, or start a new run (another --out-dir or "
            f"--overwrite). Only {', '.join(flag(n) for n in RESUME_MAY_CHANGE)} may change on resume")


def _load_checkpoint(directory: Path, model_config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, training state) of the checkpoint to resume from; OptionError naming each
    model setting that differs from the checkpoint's (checked before its weights are read:
    with the preset checked, only the vocabulary size can differ) or a file that cannot be
    read."""
    stored = read_config(directory)["model"]
    changed = [f"{name} {stored.get(name)!r} -> {value!r}" for name, value in model_config.to_dict().items()
               if stored.get(name) != value]
    if changed:
        raise OptionError(f"--resume {directory}: the model would differ from the checkpoint's ({'; '.join(changed)}); "
                          f"is vocab.txt of --out-dir (or --vocab) the run's?")
    try:
        weights, state = load_weights(directory), load_train_state(directory)
    except (OSError, ValueError) as exc:
        raise OptionError(f"--resume: {exc}") from None
    has_optimizer = "optimizer" in state or (state.get("optimizer_sharded") == SHARDED and (directory / SHARDED).is_dir())
    if not has_optimizer or not {"scheduler", "position", "history"} <= set(state) or "val" not in state["history"]:
        raise OptionError(f"--resume {directory}: {STATE} lacks the optimizer, scheduler, position or validation "
                          f"history of this csfm.training.loop (an older version's?); start a new run")
    return weights, state


def _remove_temp_files(folder: Path, names: Sequence[str]) -> None:
    """Deletes the temporary files a kill during ``atomic_write(folder / name)`` leaves behind."""
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _clear_run(out_dir: Path) -> None:
    """Deletes the files a run wrote into ``out_dir`` (the ``latest`` pointer first, so a kill
    part-way leaves nothing that looks resumable)."""
    (out_dir / "checkpoints" / "latest").unlink(missing_ok=True)
    for name in _RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data

def _open_sources(config: TrainConfig) -> MixedSource:
    """The record sources of the run (demo data unless --data names others)."""
    return open_sources(config.data or ["demo"], seed=config.seed, demo_records=config.demo_records)


def _tokenizer(config: TrainConfig, records, train_idx: list[int], out_dir: Path,
               resuming: bool) -> tuple[ReportTokenizer | None, bool]:
    """(tokenizer, learned here): the user's vocabulary, the run's own on resume, else one
    learned from the training reports (None when there are none)."""
    if config.vocab:
        return ReportTokenizer.from_vocab(config.vocab), False
    if resuming and (out_dir / "vocab.txt").is_file():
        return ReportTokenizer.from_vocab(out_dir / "vocab.txt"), False
    texts = [records[i].text for i in train_idx[: min(len(train_idx), 2000)]]
    texts = [t for t in texts if t]
    return (ReportTokenizer.train(texts, vocab_size=2048), True) if texts else (None, False)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1) -> list[list[int]]:
    """The epoch's global batches of record indices (a last batch smaller than the number of
    processes is dropped: every process needs a record)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size) if len(order[i:i + batch_size]) >= world]


def _loader(dataset: PretrainWindows, batches: list[list[int]], workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, persistent_workers=False,
                                       collate_fn=collate if dataset.views == 1 else collate_views)


# ----------------------------------------------------------------------------- set-up

@dataclass
class _Plan:
    """What a run will do, worked out and checked before it writes a file or joins a process
    group: every process makes the same plan."""

    config: TrainConfig
    out_dir: Path
    device: torch.device
    world: int
    precision: Precision
    records: MixedSource
    train_idx: list[int]
    val_idx: list[int]
    tokenizer: ReportTokenizer | None
    vocab_learned: bool
    model_config: ModelConfig
    resume_from: Path | None
    resume_weights: dict[str, torch.Tensor] | None
    resume_state: dict | None
    total_steps: int


def _device(config: TrainConfig) -> torch.device:
    """The device of this process (torchrun's LOCAL_RANK picks the GPU)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda, but torch sees no CUDA device (use cpu or auto)")
    cuda = torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")


def _usable_split(config: TrainConfig, records: MixedSource) -> tuple[list[int], list[int]]:
    """(training indices, weighted per source; validation indices) of the records the model
    can use: each record is checked once up front (``find_unusable``), so a record without
    usable signal is named here, not met as a crash mid-run."""
    if not len(records):
        raise OptionError("--data gives 0 training record(s): its sources hold no records")
    unusable = find_unusable(records, range(len(records)), training_preprocess(config), workers=config.workers,
                             progress=not config.quiet)
    try:
        check_usable(unusable, len(records), config.skip_unusable)
    except UnusableRecordsError as exc:
        raise OptionError(f"--data: {exc}") from None
    train_idx, val_idx = split_by_patient(records.patient_ids, config.val_fraction, config.seed)
    train_idx = [i for i in train_idx if i not in unusable]
    return records.weighted(train_idx, config.seed), [i for i in val_idx if i not in unusable]


def _plan(config: TrainConfig) -> _Plan:
    """Checks the run folder, device, precision, data and resume point against ``config``."""
    out_dir = Path(config.out_dir)
    resume_from = _resume_from(config, out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _device(config)
    try:
        precision = choose_precision(config.precision, device)
    except ValueError as exc:
        raise OptionError(f"--precision {config.precision}: {exc}") from None
    if config.vocab and not Path(config.vocab).is_file():
        raise OptionError(f"--vocab {config.vocab}: no such file")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.sharding == "fsdp" and world < 2:
        raise OptionError("--sharding fsdp shards over the processes of a torchrun job: start 2 or more "
                          "(torchrun --nproc_per_node N -m csfm.train ...), or use the default ddp")
    if config.contrastive_weight and world > 1:
        raise OptionError(f"--contrastive-weight runs in one process for now (its negatives would be each "
                          f"process's own share of the batch), got {world} processes")
    try:
        records = _open_sources(config)
    except (OSError, ValueError) as exc:  # the readers name the folder or file and what is wrong
        raise OptionError(f"--data: {exc}") from None
    train_idx, val_idx = _usable_split(config, records)
    batches = len(_epoch_batches(len(train_idx), config.batch_size, config.seed, 0, world))
    if not batches:
        raise OptionError(f"--data gives {len(train_idx)} training record(s) after the --val-fraction split: "
                          f"too few for {world} process(es)")
    tokenizer, learned = _tokenizer(config, records, train_idx, out_dir, resume_from is not None)
    model_config = training_model_config(config, tokenizer.vocab_size if tokenizer else None)
    weights, state = _load_checkpoint(resume_from, model_config) if resume_from is not None else (None, None)
    total_steps = config.epochs * -(-batches // config.accum_steps)  # the last step of an epoch may be short
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    return _Plan(config, out_dir, device, world, precision, records, train_idx, val_idx, tokenizer, learned,
                 model_config, resume_from, weights, state, total_steps)


@dataclass
class _Run:
    """This process's place in the run: rank and world size (torchrun), its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _start(plan: _Plan) -> _Run:
    """Joins the process group of a torchrun job (WORLD_SIZE, RANK): gloo on CPU, nccl on
    CUDA. A plain ``python -m csfm.train`` is rank 0 of 1."""
    if plan.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if plan.device.type == "cuda" else "gloo")
    return _Run(dist.get_rank() if plan.world > 1 else 0, plan.world, plan.device)


@dataclass
class _Session:
    """A run in progress: the model (``trained`` is its DDP wrapper or itself), optimizer,
    data, position {step, epoch, batch}, history {"val": rows} and the main process's log."""

    plan: _Plan
    run: _Run
    model: MaskedPretrainer
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    preprocess: PreprocessConfig
    train_set: PretrainWindows
    val_set: PretrainWindows
    val_loader: torch.utils.data.DataLoader
    position: dict
    history: dict
    log: "_RunLog | None"
    progress: tqdm

    @property
    def config(self) -> TrainConfig:
        return self.plan.config


def _set_up(plan: _Plan, run: _Run) -> _Session:
    """Model, optimizer and schedule (restored on resume), data, and on the main process the
    run folder's files (the first writes of the run)."""
    config = plan.config
    torch.manual_seed(config.seed)
    model = MaskedPretrainer(plan.model_config, mask_span=mask_span_patches(config),
                             contrastive_weight=config.contrastive_weight,
                             rhythm_weight=config.rhythm_weight, rhythm_input=config.rhythm_input).to(run.device)
    if plan.resume_from is not None:
        load_state_dict_checked(model, plan.resume_weights, str(plan.resume_from / WEIGHTS))
    if config.sharding == "fsdp":
        shard_model(model, plan.precision, run.device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, plan.total_steps, max(1, int(config.warmup_fraction * plan.total_steps)), config.min_lr_ratio))
    position, history = {"step": 0, "epoch": 0, "batch": 0}, {"val": []}
    if plan.resume_from is not None:
        if config.sharding == "fsdp":
            load_sharded(model, optimizer, plan.resume_from)
        else:
            optimizer.load_state_dict(plan.resume_state["optimizer"])
        scheduler.load_state_dict(plan.resume_state["scheduler"])
        position, history = dict(plan.resume_state["position"]), dict(plan.resume_state["history"])
    preprocess = training_preprocess(config)
    train_set = PretrainWindows(plan.records, plan.tokenizer, preprocess, config.lead_subset_prob,
                                plan.model_config.max_text_tokens, config.seed, plan.train_idx, config.cache_mb,
                                views=2 if config.contrastive_weight else 1)
    val_set = PretrainWindows(plan.records, plan.tokenizer, preprocess, 0.0, plan.model_config.max_text_tokens,
                              config.seed, plan.val_idx, config.cache_mb)
    val_loader = _loader(val_set, [list(range(i, min(i + config.batch_size, len(val_set))))
                                   for i in range(0, len(val_set), config.batch_size)], config.workers)
    log = _write_run_files(plan, history, position, model) if run.main else None
    progress = tqdm(total=plan.total_steps, initial=position["step"], disable=config.quiet or not run.main,
                    unit="step", dynamic_ncols=True)
    trained = DistributedDataParallel(model) if run.world > 1 and config.sharding == "ddp" else model
    return _Session(plan, run, model, trained, optimizer, scheduler,
                    torch.amp.GradScaler(run.device.type, enabled=plan.precision.use_scaler), preprocess,
                    train_set, val_set, val_loader, position, history, log, progress)


def _write_run_files(plan: _Plan, history: dict, position: dict, model: MaskedPretrainer) -> "_RunLog":
    """A fresh start clears the folder's old run; then vocab.txt (when learned here),
    train_config.json and the log; prints what the run will do."""
    config, out_dir = plan.config, plan.out_dir
    if plan.resume_from is None:
        _clear_run(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out_dir, ("log.csv", "vocab.txt", "train_config.json", "reconstruction.png"))
    if plan.vocab_learned:
        atomic_write(out_dir / "vocab.txt", plan.tokenizer.save)
    atomic_write(out_dir / "train_config.json",
                 lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2)))
    log = _RunLog(out_dir, position["step"] if plan.resume_from is not None else None, history)
    print(f"csfm.train: {config.preset} ({sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f} M "
          f"encoder params), {len(plan.train_idx)} train / {len(plan.val_idx)} val records, {plan.total_steps} "
          f"steps, {plan.precision.name} on {plan.device} x {plan.world} process(es)"
          + (f", resumed at step {position['step']}" if plan.resume_from is not None else ""), file=sys.stderr)
    return log


# ----------------------------------------------------------------------------- logs

LOG_COLUMNS = ["step", "epoch", "loss", "signal_loss", "text_loss", "lr", "tokens_per_s",
               "val_loss", "val_signal_loss", "val_text_loss"]


def _val_row(entry: dict) -> list:
    """The log row of one validation (an entry of history["val"])."""
    return [entry["step"], entry["epoch"], "", "", "", "", "",
            *(f"{entry[k]:.5f}" for k in ("loss", "signal_loss", "text_loss"))]


class _RunLog:
    """log.csv and the TensorBoard log of the main process. On resume, log.csv keeps the
    training rows up to the checkpoint's step and gets the validation rows back from the
    checkpoint's history, so rows a killed run wrote after its checkpoint are replayed,
    never duplicated, and none up to the checkpoint is lost (the file is synced to disk
    before every checkpoint)."""

    def __init__(self, out_dir: Path, resume_step: int | None, history: dict) -> None:
        self.path = out_dir / "log.csv"
        rows: list[list] = []
        if resume_step is not None:
            rows = self._training_rows(resume_step)
            rows += [_val_row(entry) for entry in history["val"]]
            rows.sort(key=lambda row: (int(row[0]), row[2] == ""))  # a step's training row before its validation
        text = io.StringIO()
        csv.writer(text).writerows([LOG_COLUMNS, *rows])
        atomic_write(self.path, lambda tmp: tmp.write_text(text.getvalue()))
        self.file = open(self.path, "a", newline="")
        self.csv = csv.writer(self.file)
        from torch.utils.tensorboard import SummaryWriter

        self.board = SummaryWriter(str(out_dir / "tensorboard"))

    def _training_rows(self, resume_step: int) -> list[list[str]]:
        """The old log's training rows of steps 1..resume_step (a warning when some are missing)."""
        kept: dict[int, list[str]] = {}
        if self.path.is_file():
            with open(self.path, newline="") as old:
                for row in list(csv.reader(old))[1:]:
                    if len(row) == len(LOG_COLUMNS) and row[0].isdigit() and row[2] and int(row[0]) <= resume_step:
                        kept[int(row[0])] = row
        if len(kept) != resume_step:
            warnings.warn(f"{self.path}: {resume_step - len(kept)} of the training rows of steps 1..{resume_step} "
                          f"are missing (the log was edited or replaced?); the run continues without them",
                          stacklevel=3)
        return [kept[step] for step in sorted(kept)]

    def step(self, position: dict, losses: np.ndarray, tokens_per_s: float, lr: float) -> None:
        loss, signal_loss, text_loss = losses
        step = position["step"]
        self.csv.writerow([step, position["epoch"], f"{loss:.5f}", f"{signal_loss:.5f}", f"{text_loss:.5f}",
                           f"{lr:.3e}", f"{tokens_per_s:.0f}", "", "", ""])
        self.file.flush()
        for name, value in (("loss", loss), ("signal_loss", signal_loss), ("text_loss", text_loss), ("lr", lr)):
            self.board.add_scalar(f"train/{name}", value, step)

    def validation(self, entry: dict) -> None:
        self.csv.writerow(_val_row(entry))
        self.file.flush()
        for name in ("loss", "signal_loss", "text_loss"):
            self.board.add_scalar(f"val/{name}", entry[name], entry["step"])

    def sync(self) -> None:
        """Flushes the rows to the disk (before a checkpoint that counts them as written)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.board.flush()

    def close(self) -> None:
        self.file.close()
        self.board.close()


# ----------------------------------------------------------------------------- steps

def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Masking randomness of one micro-batch; dropout is seeded from the same numbers."""
    torch.manual_seed(seed * 1_000_003 + step * 101 + micro)
    return torch.Generator().manual_seed(seed * 7_919 + step * 131 + micro)


def _n_tokens(batch) -> int:
    return int(sum(x.numel() for x in batch.signals) // PATCH_LEN + batch.n_text_tokens().sum() + len(batch))


def _losses(out: PretrainOutput, signal_loss: float, text_loss: float) -> np.ndarray:
    """[weighted loss, signal MSE, text cross-entropy] from the two mean losses (the weighted
    loss includes the batch's contrastive and rhythm losses, where there are)."""
    extra = sum(weight * float(torch.as_tensor(loss).detach()) for weight, loss in
                ((out.contrast_weight, out.contrast_loss), (out.rhythm_weight, out.rhythm_loss)))
    return np.array([out.signal_weight * signal_loss + out.text_weight * text_loss + extra, signal_loss, text_loss])


@torch.no_grad()
def validate(model: MaskedPretrainer, loader, config: TrainConfig, precision: Precision,
             device: torch.device) -> np.ndarray:
    """[loss, signal MSE, text cross-entropy] over the validation set with fixed masking
    (the same masks every epoch): squared errors over all scored samples of masked
    patches, cross-entropy over all masked text tokens (NaN for an empty set)."""
    model.eval()
    sse = ce = 0.0
    n_signal = n_text = 0
    out = None
    for i, batch in enumerate(loader):
        generator = torch.Generator().manual_seed(10_000 + i)
        with precision.autocast():
            out = model(batch.to(device), config.signal_mask_ratio, config.text_mask_ratio, generator)
        sse, ce = sse + float(out.signal_sse), ce + float(out.text_ce)
        n_signal, n_text = n_signal + out.n_signal, n_text + out.n_text
    model.train()
    if out is None:
        return np.full(3, np.nan)
    return _losses(out, sse / max(1, n_signal), ce / max(1, n_text))


def _all_sum(run: _Run, values: list[float]) -> list[float]:
    """Sums ``values`` over every process (identity with one process)."""
    if run.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _train_step(s: _Session, loader) -> tuple[np.ndarray, int, int]:
    """One optimizer step over up to ``accum_steps`` global micro-batches (fewer at the end
    of an epoch), each split over the processes. Masks come from noise drawn for the whole
    global batch, and each loss is normalised by the global count of scored samples and
    tokens, so N processes give the gradients one process would; DDP all-reduces the
    gradients once, on the last micro-batch. Returns ([loss, signal_loss, text_loss],
    tokens, micro-batches). The step's micro-batches are held in memory together."""
    config, run, step = s.config, s.run, s.position["step"]
    max_patches = s.plan.model_config.n_channel_types * s.plan.model_config.n_positions
    micro_batches = list(itertools.islice(loader, config.accum_steps))
    s.optimizer.zero_grad(set_to_none=True)
    sums, tokens = np.zeros(3), 0
    for micro, (global_size, batch) in enumerate(micro_batches):
        generator = _step_generator(config.seed, step, micro)
        views = s.train_set.views  # each record gives this many samples, side by side
        signal_noise = _noise_of_share(torch.rand(global_size * views, max_patches, generator=generator), run, views)
        text_noise = _noise_of_share(torch.rand(global_size * views, s.plan.model_config.max_text_tokens,
                                                generator=generator), run, views)
        last = micro == len(micro_batches) - 1
        with contextlib.nullcontext() if last or run.world == 1 else gradient_sync_paused(s.trained):
            with s.plan.precision.autocast():
                out = s.trained(batch.to(run.device), config.signal_mask_ratio, config.text_mask_ratio,
                                signal_noise=signal_noise, text_noise=text_noise, paired=views == 2)
            n_signal, n_text, n_rhythm = _all_sum(run, [out.n_signal, out.n_text, out.n_rhythm])
            # DDP averages gradients over processes: scale by the world size to get the global sum.
            s.scaler.scale(out.weighted_loss(n_signal, n_text, n_rhythm) * run.world / config.accum_steps).backward()
        sse, ce, n_tok = _all_sum(run, [out.signal_sse.item(), out.text_ce.item(), _n_tokens(batch)])
        sums += _losses(out, sse / max(1, n_signal), ce / max(1, n_text))
        tokens += int(n_tok)
    if config.grad_clip:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), config.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    return sums / max(1, len(micro_batches)), tokens, len(micro_batches)


def _noise_of_share(noise: torch.Tensor, run: _Run, views: int) -> torch.Tensor:
    """The rows of this process's records (every ``run.world``-th, from ``run.rank``) of the
    masking noise drawn for a global batch of records with ``views`` samples each."""
    return noise.unflatten(0, (-1, views))[run.rank::run.world].flatten(0, 1)


def _shard_loader(dataset, batches: list[list[int]], run: _Run, workers: int):
    """Yields (global batch size, this process's share of it as a Batch)."""
    shares = [b[run.rank::run.world] for b in batches]
    return zip((len(b) for b in batches), _loader(dataset, shares, workers))


def _save_reconstruction_png(model: MaskedPretrainer, batch, config: TrainConfig, path: Path | None, device,
                             fs: float) -> None:
    """Original vs reconstructed (masked patches) for the first record's first channel
    (samples at ``fs`` Hz); path None: the forward only (a sharded model's other ranks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad():
        out = model(batch.to(device), config.signal_mask_ratio, config.text_mask_ratio,
                    torch.Generator().manual_seed(123))
    model.train()
    if path is None:
        return
    n_first = batch.signals[0].shape[1] // PATCH_LEN  # patches of the first channel
    patches = batch.signals[0][0].reshape(-1, PATCH_LEN)
    scale = patches.var(-1, unbiased=False, keepdim=True).add(1e-6).sqrt()
    pred = out.pred_patches[:n_first].float().cpu()
    if model.norm_patch_targets:
        pred = pred * scale + patches.mean(-1, keepdim=True)
    target, pred = patches.reshape(-1).numpy(), pred.reshape(-1).numpy()
    masked = np.repeat(out.patch_mask[:n_first].cpu().numpy(), PATCH_LEN)
    t = np.arange(len(target)) / fs
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.plot(t, target, color="black", lw=0.8, label="original (z-scored)")
    ax.plot(t, np.where(masked, pred, np.nan), color="tab:red", lw=0.8, label="reconstruction of masked patches")
    ax.set_xlabel("time (s)")
    ax.set_title(f"{batch.record_ids[0] if batch.record_ids else 'record 0'}, channel type "
                 f"{int(batch.channel_ids[0][0])}, {int(out.patch_mask.sum())} of {len(out.patch_mask)} patches masked")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------- checkpoints

def _step_dir(s: _Session) -> Path:
    return s.plan.out_dir / "checkpoints" / f"step_{s.position['step']:08d}"


def _save(s: _Session, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Syncs the log, writes the checkpoint of the current position, points ``latest`` at it,
    then deletes all but the ``keep_last`` newest up to it (never the one just written;
    those of later steps, left by a continuation from an older checkpoint, stay until
    overwritten). weights: the full weights of a sharded model, whose optimizer state is
    in the checkpoint's ``sharded/`` folder already (written by every rank)."""
    out_dir, step, directory = s.plan.out_dir, s.position["step"], _step_dir(s)
    s.log.sync()
    _remove_temp_files(directory, (WEIGHTS, CONFIG, STATE))
    _remove_temp_files(directory.parent, ("latest",))
    optimizer = {"optimizer_sharded": SHARDED} if weights is not None else {"optimizer": s.optimizer.state_dict()}
    state = {**optimizer, "scheduler": s.scheduler.state_dict(), "position": dict(s.position), "history": s.history}
    save_checkpoint(directory, s.model, s.plan.model_config, state, {"train": dataclasses.asdict(s.config)},
                    weights)
    atomic_write(out_dir / "checkpoints" / "latest", lambda tmp: tmp.write_text(directory.name))
    older = [d for d_step, d in _checkpoint_dirs(out_dir) if d_step < step]
    for old in older[:max(0, len(older) - (s.config.keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _save_on_main(s: _Session) -> Path:
    """Rank 0 writes the checkpoint; every process waits for it and gets its directory (with
    --sharding fsdp every process first writes its part of the sharded state)."""
    weights = None
    if s.config.sharding == "fsdp":
        weights = full_weights(s.model)
        save_sharded(s.model, s.optimizer, _step_dir(s))
    directory = _save(s, weights) if s.run.main else None
    if s.run.world > 1:
        shared = [directory]
        dist.broadcast_object_list(shared, src=0)
        directory = shared[0]
    return directory


# ----------------------------------------------------------------------------- loop and teardown

def _train_epoch(s: _Session) -> Path | None:
    """Steps through the rest of the current epoch (or up to the last step); returns the
    last checkpoint written, if any."""
    config, position, last_dir = s.config, s.position, None
    s.train_set.set_epoch(position["epoch"])
    batches = _epoch_batches(len(s.train_set), config.batch_size, config.seed, position["epoch"], s.run.world)
    loader = iter(_shard_loader(s.train_set, batches[position["batch"]:], s.run, config.workers))
    while position["batch"] < len(batches) and position["step"] < s.plan.total_steps:
        started = time.perf_counter()
        losses, tokens, done = _train_step(s, loader)
        s.scheduler.step()
        position["step"] += 1
        position["batch"] += done
        if s.log is not None:
            lr, tokens_per_s = s.optimizer.param_groups[0]["lr"], tokens / (time.perf_counter() - started)
            s.log.step(position, losses, tokens_per_s, lr)
            s.progress.set_postfix(loss=f"{losses[0]:.4f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}")
            s.progress.update(1)
        if config.save_every and position["step"] % config.save_every == 0:
            last_dir = _save_on_main(s)
    if position["batch"] >= len(batches):
        _end_epoch(s)
        last_dir = _save_on_main(s)
    return last_dir


def _end_epoch(s: _Session) -> None:
    """Validation (on the main process; on every one of a sharded model, whose forward takes
    them all) and the move to the next epoch."""
    if s.run.main or s.config.sharding == "fsdp":
        loss, signal_loss, text_loss = validate(s.model, s.val_loader, s.config, s.plan.precision, s.run.device)
    if s.run.main:
        entry = {"step": s.position["step"], "epoch": s.position["epoch"], "loss": float(loss),
                 "signal_loss": float(signal_loss), "text_loss": float(text_loss)}
        s.history["val"].append(entry)
        s.log.validation(entry)
        s.progress.write(f"epoch {entry['epoch']}: validation loss {loss:.4f} (signal MSE {signal_loss:.4f}, "
                         f"text cross-entropy {text_loss:.4f})")
    s.position["epoch"] += 1
    s.position["batch"] = 0


def _loop(s: _Session) -> Path | None:
    """Trains epoch by epoch up to the last step; returns the last checkpoint written."""
    last_dir = None
    while s.position["step"] < s.plan.total_steps and s.position["epoch"] < s.config.epochs:
        last_dir = _train_epoch(s) or last_dir
    return last_dir


def _tear_down(s: _Session, last_dir: Path | None) -> Path:
    """The final checkpoint (unless the last step has one), the reconstruction picture, closed
    logs and process group; returns the final checkpoint's directory."""
    s.progress.close()
    if last_dir is None or last_dir.name != _step_dir(s).name:
        last_dir = _save_on_main(s)
    if len(s.val_set) and (s.run.main or s.config.sharding == "fsdp"):
        _save_reconstruction_png(s.model, collate([s.val_set[0]]), s.config,
                                 s.plan.out_dir / "reconstruction.png" if s.run.main else None,
                                 s.run.device, s.preprocess.target_fs)
    if s.run.main:
        out_dir = s.plan.out_dir
        s.log.close()
        print(f"csfm.train: done. checkpoint {last_dir}, logs {s.log.path} and {out_dir / 'tensorboard'}, "
              f"reconstruction {out_dir / 'reconstruction.png'}")
    if s.run.world > 1:
        # DDP's reducer holds the process group too, and its destructor keeps the GIL while the
        # group's gloo threads may still need it to free finished work: freed last, it can hang
        # the exit (pytorch/pytorch#56297). Free it first; destroy_process_group then frees the
        # group with the GIL released.
        s.trained = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return last_dir


def train(config: TrainConfig) -> Path:
    """Runs pretraining (one process, or each process of a torchrun job); returns the
    directory of the final checkpoint. Every check (OptionError) comes before the first
    file is written and before the process group is joined."""
    plan = _plan(config)
    session = _set_up(plan, _start(plan))
    return _tear_down(session, _loop(session))


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the CLI; a bad option ends with exit status 2 and a message naming it."""
    cli.run_command(train, TrainConfig, argv, "python -m csfm.train", __doc__)


if __name__ == "__main__":
    main()
