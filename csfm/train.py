"""Masked pretraining: ``python -m csfm.train`` (also ``csfm-train``).

With no arguments it pretrains the ``demo`` preset on generated demo records on the CPU
in a few minutes, writing to ``runs/demo``: a CSV and TensorBoard log, a PNG of original
vs reconstructed signal, checkpoints (atomic, last N kept) and the effective config.
``--resume`` continues a killed run exactly where its last checkpoint left it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from csfm.checkpoint import atomic_write, latest_checkpoint, load_train_state, load_weights, save_checkpoint
from csfm.cli import add_dataclass_options
from csfm.config import PRESETS, preset
from csfm.data import PretrainWindows, collate, split_by_patient
from csfm.optim import make_optimizer, warmup_cosine
from csfm.precision import PRECISIONS, choose_precision
from csfm.preprocess import PreprocessConfig
from csfm.pretrain import MaskedPretrainer
from csfm.sources import MixedSource, open_sources
from csfm.tokenizer import ReportTokenizer


@dataclass
class TrainConfig:
    """Every option of a pretraining run (CLI flags of the same names, or a YAML/JSON file)."""

    preset: str = field(default="demo", metadata={"help": f"model size: {', '.join(PRESETS)}"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "data sources, mixed: 'demo[:N][@WEIGHT]' or 'KIND:PATH[@WEIGHT]' with KIND "
                "wfdb|mimic3|mimic4|ptbxl|code15; empty = demo"})
    demo_records: int = field(default=600, metadata={"help": "demo records to generate (3 per patient)"})
    out_dir: str = field(default="runs/demo", metadata={"help": "where logs and checkpoints go"})
    epochs: int = field(default=4, metadata={"help": "passes over the training records"})
    batch_size: int = field(default=16, metadata={"help": "records per micro-batch"})
    accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "final lr as a fraction of the peak"})
    warmup_fraction: float = field(default=0.05, metadata={"help": "share of steps with linear warmup"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)"})
    signal_mask_ratio: float = field(default=0.75, metadata={"help": "share of signal patches masked"})
    text_mask_ratio: float = field(default=0.5, metadata={"help": "share of text tokens masked"})
    lead_subset_prob: float = field(default=0.5, metadata={"help": "chance of training a sample on a random lead subset"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of patients held out for validation"})
    vocab: str = field(default="", metadata={"help": "BERT-style vocab.txt; empty = build one from the training reports"})
    precision: str = field(default="auto", metadata={"help": f"{'/'.join(PRECISIONS)}; auto measures whether bf16 is fast here"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads per process (0 = torch's default); 1 keeps a small model fast on a busy machine"})
    cache_mb: float = field(default=1024.0, metadata={
        "help": "memory (MiB; training and validation set each, per process and worker) for "
                "preprocessed records of up to 10 min, "
                "so each is read and filtered once; 0 = off"})
    seed: int = field(default=0, metadata={"help": "seed of data order, masking, dropout and init"})
    save_every: int = field(default=0, metadata={"help": "also checkpoint every N optimizer steps (0 = each epoch only)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept"})
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0 = all epochs)"})
    resume: str = field(default="", metadata={"help": "checkpoint directory to continue from, or 'auto' = latest in out_dir"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})


# ----------------------------------------------------------------------------- config

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csfm.train", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="YAML or JSON file of options (flags override it)")
    add_dataclass_options(parser, TrainConfig)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the --config file, then explicit flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text()
        loaded = yaml.safe_load(text) if args.config.endswith((".yaml", ".yml")) else json.loads(text)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(loaded) - known
        if unknown:
            raise ValueError(f"{args.config}: unknown options {sorted(unknown)}")
        values.update(loaded)
    explicit = {k: v for k, v in vars(args).items() if k != "config" and v != parser.get_default(k)}
    values.update(explicit)
    return TrainConfig(**{**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}, **values})


# ----------------------------------------------------------------------------- data

def _open_sources(config: TrainConfig) -> MixedSource:
    """The record sources of the run (demo data unless --data names others)."""
    return open_sources(config.data or ["demo"], seed=config.seed, demo_records=config.demo_records)


def _tokenizer(config: TrainConfig, records, train_idx: list[int], out_dir: Path,
               resuming: bool, write: bool) -> ReportTokenizer | None:
    """The user's vocabulary, the run's own on resume, else one learned from the training reports."""
    if config.vocab:
        return ReportTokenizer.from_vocab(config.vocab)
    if resuming and (out_dir / "vocab.txt").is_file():
        return ReportTokenizer.from_vocab(out_dir / "vocab.txt")
    texts = [records[i].text for i in train_idx[: min(len(train_idx), 2000)]]
    texts = [t for t in texts if t]
    if not texts:
        return None
    tokenizer = ReportTokenizer.train(texts, vocab_size=2048)
    if write:
        tokenizer.save(out_dir / "vocab.txt")
    return tokenizer


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1) -> list[list[int]]:
    """The epoch's global batches of record indices (a last batch smaller than the number of
    processes is dropped: every process needs a record)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size) if len(order[i:i + batch_size]) >= world]


def _loader(dataset, batches: list[list[int]], workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                       persistent_workers=False)


# ----------------------------------------------------------------------------- steps

def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Masking randomness of one micro-batch; dropout is seeded from the same numbers."""
    torch.manual_seed(seed * 1_000_003 + step * 101 + micro)
    return torch.Generator().manual_seed(seed * 7_919 + step * 131 + micro)


def _n_tokens(batch) -> int:
    return int(sum(x.numel() for x in batch.signals) // 25 + batch.n_text_tokens().sum() + len(batch))


@torch.no_grad()
def validate(model: MaskedPretrainer, loader, config: TrainConfig, precision, device) -> float:
    """Mean validation loss with fixed masking (same masks every epoch)."""
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        generator = torch.Generator().manual_seed(10_000 + i)
        with precision.autocast():
            out = model(batch.to(device), config.signal_mask_ratio, config.text_mask_ratio, generator)
        total += float(out.loss) * len(batch)
        count += len(batch)
    model.train()
    return total / max(1, count)


def _save_reconstruction_png(model: MaskedPretrainer, batch, config: TrainConfig, path: Path, device) -> None:
    """Original vs reconstructed (masked patches) for the first record's first channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad():
        out = model(batch.to(device), config.signal_mask_ratio, config.text_mask_ratio,
                    torch.Generator().manual_seed(123))
    model.train()
    n_first = batch.signals[0].shape[1] // 25  # patches of the first channel
    patches = batch.signals[0][0].reshape(-1, 25)
    scale = patches.var(-1, unbiased=False, keepdim=True).add(1e-6).sqrt()
    pred = out.pred_patches[:n_first].float().cpu()
    if model.norm_patch_targets:
        pred = pred * scale + patches.mean(-1, keepdim=True)
    target, pred = patches.reshape(-1).numpy(), pred.reshape(-1).numpy()
    masked = np.repeat(out.patch_mask[:n_first].cpu().numpy(), 25)
    t = np.arange(len(target)) / 250.0
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

def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step_*"))


def _save(out_dir: Path, model, optimizer, scheduler, config: TrainConfig, model_config, position: dict,
          history: dict) -> Path:
    directory = out_dir / "checkpoints" / f"step_{position['step']:08d}"
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "position": position, "history": history}
    save_checkpoint(directory, model, model_config, state, {"train": dataclasses.asdict(config)})
    atomic_write(out_dir / "checkpoints" / "latest", lambda tmp: tmp.write_text(directory.name))
    for old in _checkpoint_dirs(out_dir)[:-config.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _resume_dir(config: TrainConfig, out_dir: Path) -> Path | None:
    if not config.resume:
        return None
    return latest_checkpoint(out_dir) if config.resume == "auto" else Path(config.resume)


# ----------------------------------------------------------------------------- logs

LOG_COLUMNS = ["step", "epoch", "loss", "signal_loss", "text_loss", "lr", "tokens_per_s", "val_loss"]


def _open_log(path: Path, resume_step: int | None):
    """A fresh CSV log; on resume, the old one's rows up to the checkpoint's step are kept
    (rows a killed run wrote after its last checkpoint are replayed, not duplicated)."""
    kept: list[list[str]] = []
    if resume_step is not None and path.is_file():
        with open(path, newline="") as old:
            kept = [row for row in list(csv.reader(old))[1:]
                    if len(row) == len(LOG_COLUMNS) and row[0].isdigit() and int(row[0]) <= resume_step]
    log_file = open(path, "w", newline="")
    log = csv.writer(log_file)
    log.writerows([LOG_COLUMNS, *kept])
    log_file.flush()
    return log_file, log


# ----------------------------------------------------------------------------- main loop

@dataclass
class _Run:
    """This process's place in the run: rank and world size (torchrun), its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _start(config: TrainConfig) -> _Run:
    """Reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and joins the process
    group: gloo on CPU, nccl on CUDA. A plain ``python -m csfm.train`` is rank 0 of 1."""
    cuda = torch.cuda.is_available() if config.device == "auto" else config.device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return _Run(dist.get_rank() if world > 1 else 0, world, device)


def _all_sum(run: _Run, values: list[float]) -> list[float]:
    """Sums ``values`` over every process (identity with one process)."""
    if run.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _train_step(model, optimizer, scaler, loader, run: _Run, config: TrainConfig, precision,
                step: int, model_config) -> tuple[np.ndarray, int, int]:
    """One optimizer step over ``accum_steps`` global micro-batches, each split over the
    processes. Masks come from noise drawn for the whole global batch, and each loss is
    normalised by the global count of scored samples and tokens, so N processes give the
    gradients one process would. Returns ([loss, signal_loss, text_loss], tokens, micro-batches)."""
    max_patches = model_config.n_channel_types * model_config.n_positions
    optimizer.zero_grad(set_to_none=True)
    sums, tokens, done = np.zeros(3), 0, 0
    for micro in range(config.accum_steps):
        item = next(loader, None)
        if item is None:
            break
        global_size, batch = item
        generator = _step_generator(config.seed, step, micro)
        signal_noise = torch.rand(global_size, max_patches, generator=generator)[run.rank::run.world]
        text_noise = torch.rand(global_size, model_config.max_text_tokens, generator=generator)[run.rank::run.world]
        with precision.autocast():
            out = model(batch.to(run.device), config.signal_mask_ratio, config.text_mask_ratio,
                        signal_noise=signal_noise, text_noise=text_noise)
        n_signal, n_text = _all_sum(run, [out.n_signal, out.n_text])
        loss = out.weighted_loss(n_signal, n_text)
        # DDP averages gradients over processes: scale by the world size to get the global sum.
        scaler.scale(loss * run.world / config.accum_steps).backward()
        sse, ce, n_tok = _all_sum(run, [out.signal_sse.item(), out.text_ce.item(), _n_tokens(batch)])
        signal_loss, text_loss = sse / max(1, n_signal), ce / max(1, n_text)
        sums += [out.signal_weight * signal_loss + out.text_weight * text_loss, signal_loss, text_loss]
        tokens += int(n_tok)
        done += 1
    if config.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return sums / max(1, done), tokens, done


def _shard_loader(dataset, batches: list[list[int]], run: _Run, workers: int):
    """Yields (global batch size, this process's share of it as a Batch)."""
    shares = [b[run.rank::run.world] for b in batches]
    return zip((len(b) for b in batches), _loader(dataset, shares, workers))


def train(config: TrainConfig) -> Path:
    """Runs pretraining (one process, or each process of a torchrun job); returns the
    directory of the final checkpoint."""
    if config.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {config.threads}")
    run = _start(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = choose_precision(config.precision, run.device)
    torch.manual_seed(config.seed)

    records = _open_sources(config)
    train_idx, val_idx = split_by_patient(records.patient_ids, config.val_fraction, config.seed)
    train_idx = records.weighted(train_idx, config.seed)
    resume_from = _resume_dir(config, out_dir)
    tokenizer = _tokenizer(config, records, train_idx, out_dir, resume_from is not None, run.main)
    model_config = preset(config.preset, **({"vocab_size": tokenizer.vocab_size} if tokenizer else {}))
    model = MaskedPretrainer(model_config).to(run.device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)

    batches_per_epoch = len(_epoch_batches(len(train_idx), config.batch_size, config.seed, 0, run.world))
    total_steps = max(1, config.epochs * batches_per_epoch // config.accum_steps)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup = max(1, int(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup, config.min_lr_ratio))
    scaler = torch.amp.GradScaler(run.device.type, enabled=precision.use_scaler)

    position, history = {"step": 0, "epoch": 0, "batch": 0}, {"val_loss": []}
    if resume_from is not None:
        model.load_state_dict(load_weights(resume_from))
        state = load_train_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position, history = dict(state["position"]), dict(state["history"])
    trained = DistributedDataParallel(model) if run.world > 1 else model

    preprocess = PreprocessConfig()
    train_set = PretrainWindows(records, tokenizer, preprocess, config.lead_subset_prob,
                                model_config.max_text_tokens, config.seed, train_idx, config.cache_mb)
    val_set = PretrainWindows(records, tokenizer, preprocess, 0.0, model_config.max_text_tokens,
                              config.seed, val_idx, config.cache_mb)
    val_loader = _loader(val_set, [list(range(i, min(i + config.batch_size, len(val_set))))
                                   for i in range(0, len(val_set), config.batch_size)], config.workers)
    log_path = out_dir / "log.csv"
    log_file, log, board = None, None, None
    if run.main:
        log_file, log = _open_log(log_path, position["step"] if resume_from is not None else None)
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out_dir / "tensorboard"))
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        print(f"csfm.train: {config.preset} ({sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f} M "
              f"encoder params), {len(train_idx)} train / {len(val_idx)} val records, {total_steps} steps, "
              f"{precision.name} on {run.device} x {run.world} process(es)", file=sys.stderr)
    progress = tqdm(total=total_steps, initial=position["step"], disable=config.quiet or not run.main,
                    unit="step", dynamic_ncols=True)
    model.train()
    last_dir = None
    while position["step"] < total_steps and position["epoch"] < config.epochs:
        train_set.set_epoch(position["epoch"])
        batches = _epoch_batches(len(train_set), config.batch_size, config.seed, position["epoch"], run.world)
        loader = iter(_shard_loader(train_set, batches[position["batch"]:], run, config.workers))
        while position["batch"] < len(batches) and position["step"] < total_steps:
            started = time.perf_counter()
            losses, tokens, done = _train_step(trained, optimizer, scaler, loader, run, config, precision,
                                               position["step"], model_config)
            scheduler.step()
            position["step"] += 1
            position["batch"] += done
            if run.main:
                _log_step(log, board, progress, position, losses, tokens / (time.perf_counter() - started),
                          optimizer.param_groups[0]["lr"])
                log_file.flush()
            if config.save_every and position["step"] % config.save_every == 0:
                last_dir = _save_on_main(run, out_dir, model, optimizer, scheduler, config, model_config,
                                         position, history)
        if position["batch"] >= len(batches):
            if run.main:
                val_loss = validate(model, val_loader, config, precision, run.device) if len(val_set) else float("nan")
                history["val_loss"].append(val_loss)
                log.writerow([position["step"], position["epoch"], "", "", "", "", "", f"{val_loss:.5f}"])
                board.add_scalar("val/loss", val_loss, position["step"])
                progress.write(f"epoch {position['epoch']}: validation loss {val_loss:.4f}")
            position["epoch"] += 1
            position["batch"] = 0
            last_dir = _save_on_main(run, out_dir, model, optimizer, scheduler, config, model_config,
                                     position, history)
    progress.close()
    if last_dir is None or int(last_dir.name.split("_")[1]) != position["step"]:
        last_dir = _save_on_main(run, out_dir, model, optimizer, scheduler, config, model_config, position,
                                 history)
    if run.main:
        if len(val_set):
            _save_reconstruction_png(model, collate([val_set[0]]), config, out_dir / "reconstruction.png",
                                     run.device)
        log_file.close()
        board.close()
        print(f"csfm.train: done. checkpoint {last_dir}, logs {log_path} and {out_dir / 'tensorboard'}, "
              f"reconstruction {out_dir / 'reconstruction.png'}")
    if run.world > 1:
        # DDP's reducer holds the process group too, and its destructor keeps the GIL while the
        # group's gloo threads may still need it to free finished work: freed last, it can hang
        # the exit (pytorch/pytorch#56297). Free it first; destroy_process_group then frees the
        # group with the GIL released.
        del trained
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return last_dir


def _log_step(log, board, progress, position: dict, losses: np.ndarray, tokens_per_s: float, lr: float) -> None:
    loss, signal_loss, text_loss = losses
    step = position["step"]
    log.writerow([step, position["epoch"], f"{loss:.5f}", f"{signal_loss:.5f}", f"{text_loss:.5f}",
                  f"{lr:.3e}", f"{tokens_per_s:.0f}", ""])
    for name, value in (("loss", loss), ("signal_loss", signal_loss), ("text_loss", text_loss), ("lr", lr)):
        board.add_scalar(f"train/{name}", value, step)
    progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}")
    progress.update(1)


def _save_on_main(run: _Run, out_dir: Path, *args) -> Path:
    """Rank 0 writes the checkpoint; every process waits for it and gets its directory."""
    directory = _save(out_dir, *args) if run.main else None
    if run.world > 1:
        shared = [directory]
        dist.broadcast_object_list(shared, src=0)
        directory = shared[0]
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    train(parse_config(argv))


if __name__ == "__main__":
    main()
