"""Full fine-tuning of the encoder with a task head (docs/design.md): ``python -m csfm.finetune``.

The command line takes a checkpoint, ``--data`` specs and a record-metadata label, makes
(or reuses) a patient-level stratified split in ``--out-dir/split.json``, fine-tunes on every
10 s window of the training records (``--unit window``: each on its own, a record's prediction
the mean of its windows'; ``--unit record``: the head reads each record's mean window
embedding), and writes test metrics with bootstrap 95 % CIs (by patient) to results.json / results.md,
and the self-describing model directory ``--out-dir/model`` that ``csfm.predict`` applies.

AdamW with layer-wise lr decay (0.75 per layer from the head down), no weight decay on
norms, biases, embeddings and the CLS token, 10 % linear warmup then linear decay, and
early stopping on the validation loss (the best weights are restored at the end).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from csfm.files import atomic_write
from csfm.cli import NON_NEGATIVE, OptionError, at_least, check_fields, in_range, run_command
from csfm.data.preprocess import MODALITIES, PreprocessConfig, RecordCheck
from csfm.data.windows import RecordWindows, Sample, all_windows, collate
from csfm.evaluation.embedding import load_encoder
from csfm.evaluation.finetuned import UNITS, EncoderWithHead, ModelCard, make_head, predict_records, save_model_dir
from csfm.evaluation.predict import prediction_table
from csfm.model.heads import head_loss
from csfm.evaluation.metrics import evaluate, reliability_plot, results_markdown, save_results
from csfm.model.config import PRESETS
from csfm.model.encoder import TOKEN_POOLINGS, CSFMEncoder, pooled_width
from csfm.training.optim import layerwise_param_groups, warmup_linear
from csfm.data.sources import open_sources
from csfm.data.splits import assert_no_patient_leakage, split_or_load
from csfm.tasks import ONE_LABEL_TASKS


@dataclass
class FineTuneConfig:
    """epochs: at most this many passes; patience: epochs without a better validation loss
    before stopping; layer_decay: lr factor per encoder layer below the head; head_epochs: the
    first epochs train the head alone (linear probing, then fine-tuning)."""

    epochs: int = field(default=20, metadata={"help": "at most this many passes over the training windows",
                                              "valid": at_least(1)})
    batch_size: int = field(default=16, metadata={"help": "windows per batch", "valid": at_least(1)})
    lr: float = field(default=1e-4, metadata={"help": "peak lr of the head (layers below: x layer_decay each)",
                                              "valid": NON_NEGATIVE})
    layer_decay: float = field(default=0.75, metadata={"help": "lr factor per encoder layer below the head",
                                                       "valid": in_range(0, 1, low_open=True)})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay (not on norms, biases, embeddings)", "valid": NON_NEGATIVE})
    warmup_fraction: float = field(default=0.1, metadata={"help": "share of steps with linear warmup",
                                                          "valid": in_range(0, 1)})
    patience: int = field(default=3, metadata={"help": "epochs without a better validation loss before stopping",
                                               "valid": at_least(1)})
    pooling: str = field(default="cls", metadata={
        "help": "token pooling into the head: cls, mean, mean+std (2 d wide) or mean+std+rhythm",
        "choices": TOKEN_POOLINGS})
    unit: str = field(default="window", metadata={
        "help": "what the head learns from: window (each 10 s window on its own; a record's prediction is the "
                "mean of its windows') or record (the mean embedding of a record's windows, as the linear "
                "probe pools them; --batch-size then counts records)", "choices": UNITS})
    head_epochs: int = field(default=0, metadata={
        "help": "first epochs that train the head alone, the encoder frozen (a probe, then fine-tuning)",
        "valid": at_least(0)})
    seed: int = field(default=0, metadata={"help": "seed of the split, data order and head init"})

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(kw_only=True)
class FineTuneRunConfig(FineTuneConfig):
    """Options of ``python -m csfm.finetune``: what to fine-tune on, and where the results go,
    besides the training options of FineTuneConfig (flags of the same names)."""

    checkpoint: str = field(metadata={"help": "csfm checkpoint directory (or .pth with --preset)"})
    data: list[str] = field(metadata={"help": "data specs as for csfm.training.loop, e.g. demo:600 or wfdb:PATH"})
    label: str = field(metadata={"help": "record metadata key holding the target"})
    task: str = field(metadata={"help": "kind of target", "choices": ONE_LABEL_TASKS})
    preset: str = field(default="", metadata={"help": "model preset of a .pth checkpoint", "choices": ("", *PRESETS)})
    out_dir: str = field(default="runs/finetune", metadata={"help": "split file, results and weights go here"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95 % CIs", "valid": at_least(1)})
    modality: str = field(default="both", metadata={"help": "channels to train on: both, ecg or ppg",
                                                    "choices": MODALITIES})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise OptionError("--data: give at least one data spec, e.g. demo:600 or wfdb:PATH")


@dataclass
class FineTuneResult:
    """best_epoch (0-based) and best_val_loss of the restored weights; per-epoch losses."""

    best_epoch: int
    best_val_loss: float
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def _units(samples: Sequence[Sample], unit: str) -> list[list[int]]:
    """Indices of ``samples`` grouped into what the head learns from: one window each, or
    every window of a record (by record id, in order of first appearance)."""
    if unit == "window":
        return [[i] for i in range(len(samples))]
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.record_id, []).append(i)
    return list(groups.values())


def _batches(units: Sequence[list[int]], batch_size: int,
             rng: np.random.Generator | None) -> list[list[list[int]]]:
    """Batches of ``batch_size`` units (shuffled when ``rng`` is given)."""
    order = rng.permutation(len(units)) if rng is not None else np.arange(len(units))
    return [[units[k] for k in order[i:i + batch_size]] for i in range(0, len(units), batch_size)]


def _loss_of(model: EncoderWithHead, samples: Sequence[Sample], batch: list[list[int]], task: str,
             target_of: Callable[[Sequence[Sample]], object], **loss_kw) -> torch.Tensor:
    """The head's loss on one batch of units (lists of sample indices: one window, or a record's)."""
    if model.unit == "window":
        chosen = [samples[unit[0]] for unit in batch]
        return head_loss(task, model(collate(chosen)), target_of(chosen), **loss_kw)
    chosen = [samples[i] for unit in batch for i in unit]
    owner = torch.tensor([k for k, unit in enumerate(batch) for _ in unit], dtype=torch.int64)
    return head_loss(task, model(collate(chosen), owner, len(batch)), target_of([samples[unit[0]] for unit in batch]),
                     **loss_kw)


def finetune(encoder: CSFMEncoder, head: nn.Module, task: str, train: Sequence[Sample], val: Sequence[Sample],
             target_of: Callable[[Sequence[Sample]], object], config: FineTuneConfig | None = None,
             progress: bool = True, **loss_kw) -> tuple[EncoderWithHead, FineTuneResult]:
    """Fine-tunes ``encoder`` + ``head`` on ``train`` samples (windows with metadata);
    ``target_of(samples)`` gives the targets head_loss expects for ``task``. Returns the
    model with the weights of its best validation epoch."""
    config = config or FineTuneConfig()
    if not train or not val:
        raise ValueError(f"fine-tuning needs training and validation samples, got {len(train)} and {len(val)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = EncoderWithHead(encoder, head, config.pooling, config.unit)
    train_units = _units(train, config.unit)
    optimizer = torch.optim.AdamW(layerwise_param_groups(encoder, head, encoder.config.depth, config.lr,
                                                         config.weight_decay, config.layer_decay),
                                  betas=(0.9, 0.999))
    steps_per_epoch = len(_batches(train_units, config.batch_size, None))
    total = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear(s, total, max(1, int(config.warmup_fraction * total))))
    result, best_state, stale = FineTuneResult(-1, float("inf")), None, 0
    for epoch in tqdm(range(config.epochs), disable=not progress, desc="fine-tuning", unit="epoch"):
        frozen = epoch < config.head_epochs  # the encoder gets no gradient, so AdamW leaves it as it is
        encoder.requires_grad_(not frozen)
        model.train()
        encoder.train(not frozen)
        losses = []
        for batch in _batches(train_units, config.batch_size, rng):
            loss = _loss_of(model, train, batch, task, target_of, **loss_kw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        result.train_loss.append(float(np.mean(losses)))
        result.val_loss.append(validation_loss(model, val, config.batch_size, task, target_of, **loss_kw))
        if result.val_loss[-1] < result.best_val_loss:
            result.best_epoch, result.best_val_loss, stale = epoch, result.val_loss[-1], 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    encoder.requires_grad_(True)
    return model, result


@torch.no_grad()
def validation_loss(model: EncoderWithHead, samples: Sequence[Sample], batch_size: int, task: str,
                     target_of, **loss_kw) -> float:
    """Mean loss over the units (``model.unit``) of ``samples``, weighted by batch size."""
    model.eval()
    units = _units(samples, model.unit)
    total = 0.0
    for batch in _batches(units, batch_size, None):
        total += _loss_of(model, samples, batch, task, target_of, **loss_kw).item() * len(batch)
    return total / len(units)


# ----------------------------------------------------------------------------- command line

def _labels(windows: Sequence[RecordWindows], key: str) -> tuple[list, list[str]]:
    """(metadata[key], record id) of every record; a clear error naming the records that lack it."""
    values = [part.metadata.get(key) for part in windows]
    missing = [part.record_id for part, value in zip(windows, values)
               if value is None or (isinstance(value, float) and np.isnan(value))]
    if missing:
        raise ValueError(f"{len(missing)} record(s) have no label '{key}' in their metadata: {missing[:10]}")
    return values, [part.record_id for part in windows]


def _task_setup(task: str, labels: list, d: int) -> tuple[nn.Module, np.ndarray, list]:
    """(head, targets [N], classes) for a task over the raw labels."""
    if task == "regression":
        return make_head(task, 0, d), np.asarray(labels, dtype=np.float32), []
    classes = sorted(set(labels), key=str)
    if task == "binary" and len(classes) != 2:
        raise ValueError(f"task 'binary' needs 2 label values, found {len(classes)}: {classes[:10]}")
    targets = np.array([classes.index(v) for v in labels])
    return make_head(task, len(classes), d), targets, classes


def run(config: FineTuneRunConfig) -> dict:
    """Patient-level split (saved, reused), fine-tuning on every 10 s window of the training
    records, test metrics (each record: the mean of its windows' predictions) with CIs ->
    results.json/.md, the test records' predictions (test_predictions.csv, as csfm.predict
    writes them) and the model directory ``model/`` that ``csfm.predict`` applies."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_sources(config.data, seed=config.seed)
    preprocess = PreprocessConfig()
    windows = [all_windows(source, i, RecordCheck(preprocess, config.modality))  # each record read once
               for i in tqdm(range(len(source)), disable=config.quiet, desc="reading records", unit="record")]
    labels, record_ids = _labels(windows, config.label)
    encoder = load_encoder(config.checkpoint, config.preset)
    head, targets, classes = _task_setup(config.task, labels, pooled_width(encoder.config.dim, config.pooling))
    split = split_or_load(out_dir / "split.json", source.patient_ids, record_ids, seed=config.seed,
                          labels=None if config.task == "regression" else targets)
    assert_no_patient_leakage(split, source.patient_ids)
    samples = {part: [s for i in rows for s in windows[int(i)].samples()] for part, rows in split.items()}
    target_of = _target_fn(config.task, dict(zip(record_ids, targets)))
    model, history = finetune(encoder, head, config.task, samples["train"], samples["val"], target_of, config,
                              progress=not config.quiet)
    y_true = np.asarray([targets[int(i)] for i in split["test"]])
    groups = np.asarray(source.patient_ids)[split["test"]]
    predictions = predict_records(model, [windows[int(i)] for i in split["test"]], config.task)
    results = evaluate(config.task, y_true, predictions, groups=groups, n_boot=config.n_boot, seed=config.seed)
    results.update({"classes": [str(c) for c in classes], "best_epoch": history.best_epoch,
                    "val_loss": history.val_loss, "train_loss": history.train_loss})
    if config.task == "binary":
        reliability_plot(y_true, predictions, out_dir / "reliability.png")
    save_results(results, out_dir / "results.json")
    atomic_write(out_dir / "results.md", lambda tmp: tmp.write_text(results_markdown(results)))
    seen = sorted({t for i in split["train"] for t in windows[int(i)].channel_types})
    card = ModelCard(config.task, [str(c) for c in classes], config.pooling, config.label, seen, config.modality,
                     config.unit, asdict(preprocess))
    table = prediction_table(card, [record_ids[int(i)] for i in split["test"]], predictions,
                             [len(windows[int(i)].x) for i in split["test"]])
    atomic_write(out_dir / "test_predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    save_model_dir(out_dir / "model", model, card)
    print(results_markdown(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns the results of ``run``. A bad option ends with exit status 2
    and a message naming it."""
    return run_command(run, FineTuneRunConfig, argv, "python -m csfm.finetune", __doc__)


def _target_fn(task: str, by_record: dict) -> Callable[[Sequence[Sample]], torch.Tensor]:
    """Samples -> the target tensor head_loss expects (found by the sample's record id)."""
    dtype = torch.int64 if task == "multiclass" else torch.float32
    return lambda samples: torch.tensor([by_record[s.record_id] for s in samples], dtype=dtype)


if __name__ == "__main__":
    main()
