"""AF detection benchmark on the PhysioNet/CinC Challenge 2017 records: every model in one
harness, on one set of folds: ``python -m csfm.benchmark --config configs/cinc2017_af.yaml``.

Rows (each a ``rows`` entry of the config, run in order):

- ``handcrafted``: XQRS R-peaks -> RR-irregularity, amplitude and quality features
  (:mod:`csfm.benchmarks.cinc2017.rr_features`) -> ``model`` logistic regression or gradient boosting;
- ``probe``: the encoder of ``checkpoint`` (a checkpoint or a ``csfm.training.loop`` run directory;
  ``random_init: true`` keeps its architecture but not its weights, the floor pretraining
  must clear) embeds every 10 s window (``token_pooling`` cls, mean, or mean+std of the
  window's tokens); a record is the mean
  of its windows (``pooling: mean``) or their mean and max side by side (``mean+max``);
  then a standardised logistic regression with C chosen by inner CV;
- ``finetune``: the encoder of ``checkpoint`` plus a linear head, trained on every window of
  the training records (layer-wise lr decay, early stopping on an inner validation tenth of
  them; ``stride_s``, a multiple of the benchmark's, spaces the training windows further
  apart; ``class_weight: balanced`` weights the cross-entropy by inverse class frequency);
  a record's class probabilities are the mean over all its windows.

Stratified ``n_folds``-fold cross-validation over records, the fold of each record saved to
``out/folds.json`` and reused. Each row gets the challenge score (mean F1 of N, A, O from the
4-class confusion matrix) with a bootstrap 95 % CI, per-class F1, AUROC AF-vs-rest, the
confusion matrix, a reliability diagram PNG and its wall time; all go to ``out/results.json``
and ``out/results.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from csfm.model.checkpoint import atomic_write
from csfm.benchmarks.cinc2017.scoring import (LABELS, MODELS, feature_probabilities, load_features, read_reference, record_folds,
                           results_table, score_predictions)
from csfm.data.windows import Sample
from csfm.evaluation.embedding import encode_windows, load_encoder
from csfm.evaluation.finetune import FineTuneConfig, finetune, predict
from csfm.model.heads import ClassificationHead
from csfm.evaluation.metrics import reliability_plot, save_results
from csfm.model.encoder import TOKEN_POOLINGS, CSFMEncoder, pooled_width
from csfm.data.preprocess import PreprocessConfig, make_windows, preprocess_signal
from csfm.data.readers import WfdbDirectory

ROW_KINDS = ("handcrafted", "probe", "finetune")
RECORD_POOLINGS = ("mean", "mean+max")
_ROW_KEYS = {
    "handcrafted": {"name", "kind", "model"},
    "probe": {"name", "kind", "checkpoint", "random_init", "token_pooling", "pooling"},
    "finetune": {"name", "kind", "checkpoint", "random_init", "token_pooling", "epochs", "batch_size", "lr",
                 "layer_decay", "weight_decay", "patience", "stride_s", "class_weight"},
}


@dataclass
class BenchmarkConfig:
    """data: folder with REFERENCE.csv and the WFDB records; out: results folder; stride_s:
    step between the 10 s windows of a record (seconds); limit: only the first records of
    REFERENCE.csv (quick runs); rows: the models, see the module docstring."""

    data: str = "../shared/data/cinc2017"
    out: str = "runs/cinc2017_af"
    n_folds: int = 5
    seed: int = 0
    n_boot: int = 1000
    stride_s: float = 5.0
    limit: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> "BenchmarkConfig":
        """Reads a YAML config; ValueError naming the file and the unknown or bad key."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
        config = cls(**values)
        for i, row in enumerate(config.rows):
            kind = row.get("kind")
            if kind not in ROW_KINDS or "name" not in row:
                raise ValueError(f"{path}: rows[{i}] needs a name and a kind in {ROW_KINDS}, got {row}")
            bad = sorted(set(row) - _ROW_KEYS[kind])
            if bad:
                raise ValueError(f"{path}: rows[{i}] ({row['name']}): unknown keys {bad} for kind {kind}")
            if kind != "handcrafted" and "checkpoint" not in row:
                raise ValueError(f"{path}: rows[{i}] ({row['name']}): a {kind} row needs a checkpoint")
            choices = {"model": MODELS, "pooling": RECORD_POOLINGS, "class_weight": ("none", "balanced"),
                       "token_pooling": TOKEN_POOLINGS}
            for key, allowed in choices.items():
                if key in row and row[key] not in allowed:
                    raise ValueError(f"{path}: rows[{i}] ({row['name']}): {key} must be one of {allowed}, "
                                     f"got {row[key]!r}")
        return config


# ----------------------------------------------------------------------------- data


@dataclass
class LabelledWindows:
    """Every record of the benchmark, preprocessed once: record_ids [N], codes [N] (index
    into LABELS), windows[i] = (x [W_i, C_i, 2500] float32, valid [W_i, C_i, 2500] bool),
    channel_types[i] [C_i] (CinC: one lead, II)."""

    record_ids: list[str]
    codes: np.ndarray
    windows: list[tuple[np.ndarray, np.ndarray]]
    channel_types: list[list[int]]


def labelled_records(data_dir: str | Path, limit: int | None = None) -> tuple[WfdbDirectory, list[str], np.ndarray]:
    """(reader, record ids, label codes [N]) of the records of ``data_dir`` listed in its
    REFERENCE.csv (the first ``limit``). A record without a label raises a ValueError naming
    it, as does a labelled record missing from the folder."""
    data_dir = Path(data_dir)
    reference = read_reference(data_dir / "REFERENCE.csv")
    reader = WfdbDirectory(data_dir)
    on_disk = {r: i for i, r in enumerate(reader.record_ids)}
    unlabelled = sorted(set(on_disk) - set(reference))
    if unlabelled:
        raise ValueError(f"{data_dir}: record(s) {unlabelled[:10]} have no label in REFERENCE.csv")
    ids = list(reference)[:limit]
    missing = [r for r in ids if r not in on_disk]
    if missing:
        raise ValueError(f"{data_dir}/REFERENCE.csv: labelled record(s) {missing[:10]} are not in the folder")
    return reader, ids, np.asarray([LABELS.index(reference[r]) for r in ids], np.int64)


def load_windows(data_dir: str | Path, stride_s: float, limit: int | None = None,
                 preprocess: PreprocessConfig | None = None, progress: bool = True) -> LabelledWindows:
    """Reads, preprocesses (250 Hz, band-pass, z-score) and cuts every labelled record into
    10 s windows ``stride_s`` apart (a last partial window zero-padded, valid False there)."""
    preprocess = preprocess or PreprocessConfig()
    reader, ids, codes = labelled_records(data_dir, limit)
    index = {r: i for i, r in enumerate(reader.record_ids)}
    stride = max(1, int(round(stride_s * preprocess.target_fs)))
    windows, types = [], []
    for record_id in tqdm(ids, disable=not progress, desc="reading records", unit="record"):
        record = reader[index[record_id]]
        x, valid = preprocess_signal(record.signal, record.fs, record.channel_types, preprocess)
        cut = make_windows(x, valid, preprocess, stride=stride)
        if len(cut.x) == 0:
            raise ValueError(f"{Path(data_dir) / record_id}: no 10 s window with enough valid signal")
        windows.append((cut.x, cut.valid))
        types.append(list(record.channel_types))
    return LabelledWindows(ids, codes, windows, types)


# ----------------------------------------------------------------------------- embeddings


def _encoder(row: dict[str, Any], seed: int) -> CSFMEncoder:
    """The row's encoder: the checkpoint's weights, or its architecture freshly initialised."""
    encoder = load_encoder(row["checkpoint"])
    if row.get("random_init", False):
        torch.manual_seed(seed)
        encoder = CSFMEncoder(encoder.config)
    return encoder


def window_embeddings(encoder: CSFMEncoder, data: LabelledWindows, token_pooling: str = "mean",
                      batch_windows: int = 64, progress: bool = True) -> list[np.ndarray]:
    """[W_i, d] embeddings of every record's windows (eval mode)."""
    encoder.eval()
    flat = [(i, x, v) for i, (xs, vs) in enumerate(data.windows) for x, v in zip(xs, vs)]
    vectors = []
    for start in tqdm(range(0, len(flat), batch_windows), disable=not progress, desc="embedding", unit="batch"):
        chunk = flat[start:start + batch_windows]
        vectors.append(encode_windows(encoder, [c[1] for c in chunk], [data.channel_types[c[0]] for c in chunk],
                                      [c[2] for c in chunk], token_pooling))
    stacked = np.concatenate(vectors)
    owner = np.asarray([c[0] for c in flat])
    return [stacked[owner == i] for i in range(len(data.windows))]


def pool_records(per_record: Sequence[np.ndarray], pooling: str) -> np.ndarray:
    """Window embeddings [W_i, d] of each record -> record features [N, d] (mean) or
    [N, 2 d] (mean+max)."""
    if pooling not in RECORD_POOLINGS:
        raise ValueError(f"pooling must be one of {RECORD_POOLINGS}, got {pooling!r}")
    mean = np.stack([w.mean(axis=0) for w in per_record])
    return mean if pooling == "mean" else np.concatenate([mean, np.stack([w.max(axis=0) for w in per_record])], 1)


# ----------------------------------------------------------------------------- fine-tuning


def _samples(data: LabelledWindows, rows: np.ndarray, every: int = 1) -> list[Sample]:
    """One Sample per ``every``-th window of the records ``rows`` (no text)."""
    return [Sample(x, v, data.channel_types[i], np.zeros(0, np.int64), data.record_ids[i], data.record_ids[i])
            for i in rows for x, v in zip(data.windows[i][0][::every], data.windows[i][1][::every])]


def finetune_probabilities(row: dict[str, Any], data: LabelledWindows, fold: np.ndarray, seed: int,
                           stride_s: float, progress: bool = True) -> np.ndarray:
    """Out-of-fold class probabilities [N, 4]: per fold, the row's encoder + a linear head
    fine-tuned on the training records' windows, early-stopped on a stratified tenth of those
    records, then each test record's window probabilities averaged. stride_s: the spacing of
    data's windows (seconds)."""
    from sklearn.model_selection import train_test_split

    every = int(round(row.get("stride_s", stride_s) / stride_s))
    if every < 1 or abs(every * stride_s - row.get("stride_s", stride_s)) > 1e-6:
        raise ValueError(f"row {row['name']!r}: stride_s must be a multiple of the benchmark's {stride_s} s, "
                         f"got {row['stride_s']}")

    settings = {k: row[k] for k in ("epochs", "batch_size", "lr", "layer_decay", "weight_decay", "patience")
                if k in row}
    config = FineTuneConfig(pooling=row.get("token_pooling", "mean"), seed=seed, **settings)
    base = _encoder(row, seed)
    by_record = dict(zip(data.record_ids, data.codes.tolist()))

    def target_of(samples: Sequence[Sample]) -> torch.Tensor:
        return torch.tensor([by_record[s.record_id] for s in samples], dtype=torch.int64)

    prob = np.zeros((len(data.codes), len(LABELS)))
    for k in np.unique(fold):
        train_rows = np.flatnonzero(fold != k)
        counts = np.bincount(data.codes[train_rows], minlength=len(LABELS))
        loss_kw = {}
        if row.get("class_weight", "none") == "balanced":  # n / (K n_c) of the training fold, 0 for absent classes
            weight = np.divide(len(train_rows), len(LABELS) * counts, out=np.zeros(len(LABELS)), where=counts > 0)
            loss_kw["class_weight"] = torch.tensor(weight, dtype=torch.float32)
        stratify = data.codes[train_rows] if counts[counts > 0].min() >= 2 else None  # sklearn needs 2 per class
        fit_rows, val_rows = train_test_split(train_rows, test_size=0.1, random_state=seed, stratify=stratify)
        torch.manual_seed(seed)
        head = ClassificationHead(pooled_width(base.config.dim, config.pooling), len(LABELS))
        model, history = finetune(copy.deepcopy(base), head, "multiclass", _samples(data, fit_rows, every),
                                  _samples(data, val_rows, every), target_of, config, progress=progress, **loss_kw)
        test_rows = np.flatnonzero(fold == k)
        test = _samples(data, test_rows)
        window_prob = predict(model, test, "multiclass", batch_size=64)
        row_of = {data.record_ids[i]: i for i in test_rows}
        owner = np.asarray([row_of[s.record_id] for s in test])
        for i in test_rows:
            prob[i] = window_prob[owner == i].mean(axis=0)
        if progress:
            tqdm.write(f"fold {k}: best epoch {history.best_epoch}, validation loss {history.best_val_loss:.4f}")
    return prob


# ----------------------------------------------------------------------------- the harness


def run_benchmark(config: BenchmarkConfig, progress: bool = True,
                  only: Collection[str] | None = None) -> dict[str, Any]:
    """Runs every row of ``config`` (or those named in ``only``) on the same folds; writes
    results.json, results.md and one reliability PNG per row under config.out, after each
    row; returns the results dict.

    Rows of an earlier run into the same folder (same data, records, folds, seed and window
    stride) are kept, and a row run again replaces its old result, so rows can be added or
    rerun one at a time (``--rows``); results.json is read again before each write, so runs
    of different rows in parallel processes add up too. Rows are listed in config order,
    then any earlier rows the config no longer has.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_windows(config.data, config.stride_s, config.limit, progress=progress)
    fold = record_folds(data.codes, config.n_folds, config.seed, out / "folds.json", data.record_ids)
    summary = {"data": config.data, "n_records": len(data.codes), "n_folds": config.n_folds, "seed": config.seed,
               "stride_s": config.stride_s, "n_windows": int(sum(len(x) for x, _ in data.windows)),
               "fold_sizes": np.bincount(fold).tolist(),
               "read_and_preprocess_s": round(time.perf_counter() - started, 1)}
    summary["rows"] = _earlier_rows(out / "results.json", summary)
    ran: dict[str, Any] = {}
    embedded: dict[tuple, list[np.ndarray]] = {}
    order = [row["name"] for row in config.rows]
    for row in config.rows:
        if only is not None and row["name"] not in only:
            continue
        started = time.perf_counter()
        prob, details = _row_probabilities(row, config, data, fold, embedded, out, progress)
        seconds = time.perf_counter() - started
        result = {"kind": row["kind"], "settings": row, **details,
                  **score_predictions(data.codes, prob, config.n_boot, config.seed), "seconds": round(seconds, 1)}
        slug = "".join(c if c.isalnum() else "_" for c in row["name"]).strip("_")
        result["reliability_png"] = str(reliability_plot(data.codes, prob, out / f"reliability_{slug}.png"))
        ran[row["name"]] = result
        rows = {**_earlier_rows(out / "results.json", summary), **ran}
        summary["rows"] = {name: rows[name] for name in sorted(rows, key=lambda n: order.index(n) if n in order
                                                                 else len(order))}
        _write_results(out, summary)
        if progress:
            tqdm.write(f"{row['name']}: CinC score {result['cinc_score']['value']:.3f} "
                       f"({result['cinc_score']['low']:.3f} - {result['cinc_score']['high']:.3f}), {seconds:.0f} s")
    if progress:
        print(results_table(summary["rows"]), end="")
    return summary


_SAME_RUN_KEYS = ("data", "n_records", "n_folds", "seed", "stride_s", "fold_sizes")


def _earlier_rows(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The rows of an earlier results.json made on the same records and folds, else {}."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = all(earlier.get(key) == summary[key] for key in _SAME_RUN_KEYS)
    return dict(earlier.get("rows", {})) if same else {}


def _write_results(out: Path, summary: dict[str, Any]) -> None:
    """results.json and results.md (atomically) from the summary so far."""
    save_results(summary, out / "results.json")
    table = results_table(summary["rows"])
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(
        f"# CinC 2017 AF benchmark: {summary['n_folds']}-fold CV on {summary['n_records']} records\n\n"
        f"Score: mean F1 of N, A, O on out-of-fold predictions, 95 % bootstrap CIs over records. "
        f"Data: PhysioNet/CinC Challenge 2017 training set (ODC-BY).\n\n{table}"))


def _row_probabilities(row: dict[str, Any], config: BenchmarkConfig, data: LabelledWindows, fold: np.ndarray,
                       embedded: dict[tuple, list[np.ndarray]], out: Path, progress: bool) -> tuple[np.ndarray, dict]:
    """(out-of-fold probabilities [N, 4], details for the results) of one row."""
    started = time.perf_counter()
    if row["kind"] == "handcrafted":
        X, _, ids = load_features(config.data, out / "features.npz", limit=config.limit, progress=progress)
        if ids != data.record_ids:
            raise ValueError(f"{out / 'features.npz'}: its records differ from {config.data}/REFERENCE.csv")
        model = row.get("model", "logistic")
    elif row["kind"] == "probe":
        key = (row["checkpoint"], bool(row.get("random_init", False)), row.get("token_pooling", "mean"))
        if key not in embedded:
            embedded[key] = window_embeddings(_encoder(row, config.seed), data, key[2], progress=progress)
        X, model = pool_records(embedded[key], row.get("pooling", "mean")), "logistic"
    else:
        return finetune_probabilities(row, data, fold, config.seed, config.stride_s, progress), {}
    features_s = round(time.perf_counter() - started, 1)  # 0 where an earlier row made them
    return feature_probabilities(X, data.codes, fold, model, config.seed), \
        {"n_features": int(X.shape[1]), "features_s": features_s}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m csfm.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML benchmark config, e.g. configs/cinc2017_af.yaml")
    parser.add_argument("--out", default="", help="results folder (overrides the config's out)")
    parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT records (quick runs)")
    parser.add_argument("--rows", nargs="+", default=None, help="run only the rows with these names")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    config = BenchmarkConfig.from_file(args.config)
    if args.out:
        config.out = args.out
    if args.limit is not None:
        config.limit = args.limit
    if args.rows:
        unknown = sorted(set(args.rows) - {r["name"] for r in config.rows})
        if unknown:
            raise ValueError(f"--rows: {unknown} are not rows of {args.config}")
    return run_benchmark(config, progress=not args.quiet, only=args.rows)


if __name__ == "__main__":
    main()
