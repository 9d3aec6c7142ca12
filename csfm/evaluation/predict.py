"""Apply a fine-tuned model to new recordings: ``python -m csfm.predict`` (also ``csfm-predict``).

``--model`` is the model directory ``csfm.finetune`` wrote (``--out-dir/model``); ``--data``
takes the specs every command takes (``files:FOLDER`` for a folder of GE MUSE, Philips, HL7
aECG, DICOM, SCP-ECG, EDF and WFDB files in any mix). Each record is prepared as the model's
training records were (its card's preprocessing and modality), cut into 10 s windows, and
predicted: the mean of its windows' probabilities (or values). The CSV has one row per
record: record_id, one column per label holding its probability (regression: ``value``),
``predicted``, ``n_windows``.

Records that cannot be read or used are listed at the end and left out; records with leads
the model never saw in training are named in a warning. ``--strict`` makes the first of
either an error.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from csfm.cli import OptionError, at_least, check_fields, run_command
from csfm.data.record import CHANNEL_TYPE_NAMES, RecordSource
from csfm.data.preprocess import RecordCheck
from csfm.data.sources import open_sources
from csfm.data.windows import RecordWindows, all_windows, record_name
from csfm.evaluation.finetuned import EncoderWithHead, ModelCard, load_model_dir, predict_records
from csfm.files import atomic_write

RESERVED_COLUMNS = ("record_id", "value", "predicted", "n_windows")
RECORDS_PER_CHUNK = 64


@dataclass
class PredictConfig:
    """Options of ``python -m csfm.predict`` (flags of the same names)."""

    model: str = field(metadata={"help": "a model directory written by csfm.finetune (its --out-dir/model)"})
    data: list[str] = field(metadata={"help": "data specs as for csfm.train, e.g. files:FOLDER or wfdb:PATH"})
    out: str = field(metadata={"help": "predictions .csv, in an existing folder"})
    batch_windows: int = field(default=32, metadata={"help": "10 s windows per model batch",
                                                     "valid": at_least(1)})
    strict: bool = field(default=False, metadata={
        "help": "stop at the first record that cannot be read or used, or has leads the model never saw"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.data:
            raise OptionError("--data: give at least one data spec, e.g. files:FOLDER")
        if Path(self.out).suffix != ".csv":
            raise OptionError(f"--out {self.out}: use a .csv file")


@dataclass
class Predictions:
    """table: one row per predicted record; unusable: {record: why} for those left out;
    unseen_leads: {record: lead names the model was not trained on}."""

    table: pd.DataFrame
    unusable: dict[str, str]
    unseen_leads: dict[str, list[str]]


def prediction_table(card: ModelCard, record_ids: Sequence[str], outputs: np.ndarray,
                     n_windows: Sequence[int]) -> pd.DataFrame:
    """The CSV rows: record_id, per label its probability (binary: 1 - p and p; regression: one
    ``value`` column), predicted (the most probable label, or the value), n_windows."""
    clash = sorted(set(map(str, card.labels)) & set(RESERVED_COLUMNS))
    if clash:
        raise ValueError(f"labels {clash} would clash with the columns {RESERVED_COLUMNS}")
    table = pd.DataFrame({"record_id": list(record_ids)})
    if card.task == "regression":
        table["value"] = outputs
        table["predicted"] = outputs
    else:
        probs = np.stack([1.0 - outputs, outputs], 1) if card.task == "binary" else outputs
        for k, label in enumerate(card.labels):
            table[str(label)] = probs[:, k]
        table["predicted"] = np.asarray(card.labels, dtype=object)[probs.argmax(1)]
    table["n_windows"] = np.asarray(n_windows, dtype=np.int64)
    return table


def predict_source(model: EncoderWithHead, card: ModelCard, source: RecordSource, strict: bool = False,
                   batch_windows: int = 32, progress: bool = True) -> Predictions:
    """Predicts every record of ``source`` (see the module doc). ValueError at the first record
    that cannot be read or used, or that has unseen leads, when ``strict``."""
    preprocess = card.preprocess_config()
    unusable: dict[str, str] = {}
    unseen: dict[str, list[str]] = {}
    chunks: list[pd.DataFrame] = []
    pending: list[RecordWindows] = []

    def flush() -> None:
        outputs = predict_records(model, pending, card.task, batch_windows)
        chunks.append(prediction_table(card, [w.record_id for w in pending], outputs, [len(w.x) for w in pending]))
        pending.clear()

    for index in tqdm(range(len(source)), disable=not progress, desc="predicting", unit="record"):
        try:
            windows = all_windows(source, index, RecordCheck(preprocess, card.modality))
        except (ValueError, OSError) as error:
            if strict:
                raise ValueError(f"{error} (--strict stops at the first record that cannot be used)") from error
            unusable[record_name(source, index)] = str(error)
            continue
        extra = sorted(set(windows.channel_types) - set(card.channel_types))
        if extra:
            unseen[windows.record_id] = [CHANNEL_TYPE_NAMES[t] for t in extra]
            if strict:
                raise ValueError(f"record {windows.record_id}: leads {unseen[windows.record_id]} were not among "
                                 f"the model's training leads {card.lead_names} (--strict)")
        pending.append(windows)
        if len(pending) == RECORDS_PER_CHUNK:
            flush()
    if pending:
        flush()
    if unseen:
        listing = "\n".join(f"  {name}: {', '.join(leads)}" for name, leads in unseen.items())
        warnings.warn(f"{len(unseen)} record(s) have leads the model was not trained on (it saw "
                      f"{', '.join(card.lead_names)}):\n{listing}", stacklevel=2)
    empty = np.zeros((0, len(card.labels)) if card.task == "multiclass" else 0)
    table = pd.concat(chunks, ignore_index=True) if chunks else prediction_table(card, [], empty, [])
    return Predictions(table, unusable, unseen)


def run(config: PredictConfig) -> Predictions:
    """Loads the model, predicts, writes ``config.out``; lists the records left out at the end."""
    out = Path(config.out)
    if not out.parent.is_dir():
        raise OptionError(f"--out {out}: folder {out.parent} does not exist")
    try:
        model, card = load_model_dir(config.model)
    except (OSError, ValueError) as error:
        raise OptionError(f"--model {config.model}: {error}") from error
    try:
        source = open_sources(config.data)
    except (ValueError, OSError) as error:
        raise OptionError(f"--data {' '.join(config.data)}: {error}") from error
    result = predict_source(model, card, source, config.strict, config.batch_windows, progress=not config.quiet)
    atomic_write(out, lambda tmp: result.table.to_csv(tmp, index=False))
    print(f"csfm.predict: {len(result.table)} records -> {out}")
    if result.unusable:
        listing = "\n".join(f"  {name}: {why}" for name, why in result.unusable.items())
        print(f"csfm.predict: {len(result.unusable)} of {len(source)} records left out:\n{listing}", file=sys.stderr)
    if result.table.empty:
        raise ValueError(f"none of the {len(source)} records could be predicted")
    return result


def main(argv: Sequence[str] | None = None) -> Predictions:
    """Runs the CLI: a bad option ends with exit status 2, no record predicted with 1."""
    return run_command(run, PredictConfig, argv, "python -m csfm.predict", __doc__, failures=(ValueError,))
