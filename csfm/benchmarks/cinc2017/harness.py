"""AF detection benchmark on the PhysioNet/CinC Challenge 2017 records: every model in one
harness, on one set of folds: ``python -m csfm.benchmark --config configs/cinc2017_af.yaml``.

Rows (each a ``rows`` entry of the config, run in order):

- ``handcrafted``: XQRS R-peaks -> RR-irregularity, amplitude and quality features
  (:mod:`csfm.benchmarks.cinc2017.rr_features`) -> ``model`` logistic regression or gradient boosting;
- ``probe``: the encoder of ``checkpoint`` (a checkpoint or a ``csfm.training.loop`` run directory;
  ``random_init: true`` keeps its architecture but not its weights, the floor pretraining
  must clear) embeds every 10 s window (``token_pooling`` cls, mean, mean+std of the
  window's tokens, or mean+std+rhythm: also their correlations 0.1-2.5 s apart and the
  spread of those along the window); a record is the mean of its windows (``pooling:
  mean``) or their mean and max side by side (``mean+max``);
  then a standardised logistic regression with C chosen by inner CV;
- ``random_cnn``: the floor of random features: an untrained 1-D CNN (``depth`` strided
  convolutions of ``width`` channels, :mod:`csfm.benchmarks.cinc2017.random_cnn`) gives each
  window the mean and standard deviation of its last layer; records pooled as for ``probe``,
  then the same logistic regression;
- ``finetune``: the encoder of ``checkpoint`` plus a linear head, trained on every window of
  the training records (layer-wise lr decay, early stopping on an inner validation tenth of
  them; ``stride_s``, a multiple of the benchmark's, spaces the training windows further
  apart; ``class_weight: balanced`` weights the cross-entropy by inverse class frequency;
  ``head_epochs`` first trains the head alone on the frozen encoder; ``head_init: probe`` starts
  the head as the ``probe`` row's logistic regression fitted on the training records, its
  standardisation folded into the weights, so fine-tuning starts from the probe: LP-FT;
  ``unit: record`` gives the head each record's mean window embedding, as the probe does, so
  with ``head_init: probe`` training starts at the probe's predictions); a record's class
  probabilities are the mean over all its windows' (unit ``window``, the default) or its
  mean embedding's.

Stratified ``n_folds``-fold cross-validation over records, the fold of each record saved to
``out/folds.json`` and reused. Each row gets the challenge score (mean F1 of N, A, O from the
4-class confusion matrix) with a bootstrap 95 % CI, per-class F1, AUROC AF-vs-rest, the
confusion matrix, a reliability diagram PNG and its wall time; all go to ``out/results.json``
and ``out/results.md``.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from csfm.cli import POSITIVE, OptionError, at_least, check_fields, read_config_file, run_command
from csfm.files import atomic_write
from csfm.benchmarks.cinc2017.random_cnn import random_cnn_features
from csfm.benchmarks.cinc2017.scoring import (LABELS, MODELS, feature_probabilities, labelled_records, load_features,
                                               make_model, results_table, score_predictions)
from csfm.data.splits import folds_or_load
from csfm.data.windows import RecordWindows, Sample, all_windows
from csfm.evaluation.embedding import embed_windows, load_encoder
from csfm.evaluation.finetune import FineTuneConfig, finetune
from csfm.evaluation.finetuned import UNITS, predict_records
from csfm.model.heads import ClassificationHead
from csfm.evaluation.metrics import reliability_plot, save_results
from csfm.model.encoder import RECORD_POOLINGS, TOKEN_POOLINGS, CSFMEncoder, pool_by_owner, pooled_width
from csfm.data.preprocess import PreprocessConfig, RecordCheck

ROW_KINDS = ("handcrafted", "probe", "random_cnn", "finetune")
_ROW_KEYS = {
    "handcrafted": {"name", "kind", "model"},
    "probe": {"name", "kind", "checkpoint", "random_init", "token_pooling", "pooling"},
    "random_cnn": {"name", "kind", "width", "depth", "pooling"},
    "finetune": {"name", "kind", "checkpoint", "random_init", "token_pooling", "epochs", "batch_size", "lr",
                 "layer_decay", "weight_decay", "patience", "stride_s", "class_weight", "head_epochs", "head_init",
                 "unit"},
}


@dataclass
class BenchmarkConfig:
    """Options of ``python -m csfm.benchmark`` (flags of the same names, ``rows`` only in the
    ``--config`` file, e.g. configs/cinc2017_af.yaml), checked when made: an OptionError
    names the option, or the row and key."""

    data: str = field(default="../shared/data/cinc2017",
                      metadata={"help": "folder with REFERENCE.csv and the WFDB records"})
    out: str = field(default="runs/cinc2017_af", metadata={"help": "results folder"})
    n_folds: int = field(default=5, metadata={"help": "stratified cross-validation folds over records",
                                              "valid": at_least(2)})
    seed: int = field(default=0, metadata={"help": "seed of the folds, the models and the bootstrap"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95 % CIs",
                                                "valid": at_least(1)})
    stride_s: float = field(default=5.0, metadata={"help": "step between the 10 s windows of a record (seconds)",
                                                   "valid": POSITIVE})
    limit: int | None = field(default=None, metadata={
        "help": "only the first LIMIT records of REFERENCE.csv (quick runs; default: all)", "valid": at_least(1)})
    rows: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "the models, run in order: mappings with a name, a kind (handcrafted, probe, random_cnn, finetune) and "
                "its settings (see python -m csfm.benchmarks.cinc2017.harness's docstring)", "file_only": True})
    only: list[str] = field(default_factory=list, metadata={
        "help": "run only the rows with these names (the others' earlier results are kept)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.rows:
            raise OptionError("no rows to run: give --config FILE with rows, e.g. configs/cinc2017_af.yaml")
        for i, row in enumerate(self.rows):
            _check_row(i, row)
        unknown = sorted(set(self.only) - {row["name"] for row in self.rows})
        if unknown:
            raise OptionError(f"--only: {unknown} are not rows of the --config file")

    @classmethod
    def from_file(cls, path: str | Path) -> "BenchmarkConfig":
        """The config of a YAML or JSON file; OptionError naming the file and the unknown or bad key."""
        values = read_config_file(cls, path)
        try:
            return cls(**values)
        except OptionError as error:
            raise OptionError(f"{path}: {error}") from None


_ROW_CHOICES = {"model": MODELS, "pooling": RECORD_POOLINGS, "class_weight": ("none", "balanced"),
                "token_pooling": TOKEN_POOLINGS, "head_init": ("random", "probe"), "unit": UNITS}


def _check_row(i: int, row: dict[str, Any]) -> None:
    """OptionError naming ``rows[i]`` and the key unless the row has a name, a known kind,
    only that kind's keys, a checkpoint where the kind needs one, and allowed choices."""
    kind = row.get("kind")
    if kind not in ROW_KINDS or "name" not in row:
        raise OptionError(f"rows[{i}] needs a name and a kind in {ROW_KINDS}, got {row}")
    bad = sorted(set(row) - _ROW_KEYS[kind])
    if bad:
        raise OptionError(f"rows[{i}] ({row['name']}): unknown keys {bad} for kind {kind}")
    if kind in ("probe", "finetune") and "checkpoint" not in row:
        raise OptionError(f"rows[{i}] ({row['name']}): a {kind} row needs a checkpoint")
    for key in ("width", "depth"):
        if key in row and not (isinstance(row[key], int) and row[key] >= 1):
            raise OptionError(f"rows[{i}] ({row['name']}): {key} must be an integer >= 1, got {row[key]!r}")
    for key, allowed in _ROW_CHOICES.items():
        if key in row and row[key] not in allowed:
            raise OptionError(f"rows[{i}] ({row['name']}): {key} must be one of {allowed}, got {row[key]!r}")


# ----------------------------------------------------------------------------- data


@dataclass
class LabelledWindows:
    """Every record of the benchmark, preprocessed and cut once: record_ids [N], codes [N]
    (index into LABELS), windows[i]: record i's windows (``csfm.data.windows.RecordWindows``;
    CinC: one lead, II)."""

    record_ids: list[str]
    codes: np.ndarray
    windows: list[RecordWindows]


def load_windows(data_dir: str | Path, stride_s: float, limit: int | None = None,
                 preprocess: PreprocessConfig | None = None, progress: bool = True) -> LabelledWindows:
    """Reads, preprocesses (250 Hz, band-pass, z-score) and cuts every labelled record into
    10 s windows ``stride_s`` apart (a last partial window zero-padded, valid False there),
    as embedding does (``csfm.data.windows.record_windows``); ValueError naming a record
    without a usable window."""
    preprocess = preprocess or PreprocessConfig()
    reader, ids, codes = labelled_records(data_dir, limit)
    index = {r: i for i, r in enumerate(reader.record_ids)}
    windows = []
    for record_id in tqdm(ids, disable=not progress, desc="reading records", unit="record"):
        try:
            windows.append(all_windows(reader, index[record_id], RecordCheck(preprocess), stride_s))
        except ValueError as error:
            raise ValueError(f"{Path(data_dir)}: {error}") from error
    return LabelledWindows(ids, codes, windows)


# ----------------------------------------------------------------------------- embeddings


def _encoder(row: dict[str, Any], seed: int) -> CSFMEncoder:
    """The row's encoder: the checkpoint's weights, or its architecture freshly initialised."""
    encoder = load_encoder(row["checkpoint"])
    if row.get("random_init", False):
        torch.manual_seed(seed)
        encoder = CSFMEncoder(encoder.config)
    return encoder


def window_embeddings(encoder: CSFMEncoder, data: LabelledWindows, token_pooling: str = "mean",
                      batch_windows: int = 64, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [W, d] of every window of every record, owner [W]: the record's position
    in data), encoded as ``csfm.evaluation.embedding.embed_windows`` does (eval mode)."""
    encoder.eval()
    windows = tqdm(enumerate(data.windows), total=len(data.windows), disable=not progress, desc="embedding",
                   unit="record")
    vectors, owner, _ = embed_windows(encoder, windows, token_pooling, batch_windows)
    return vectors, owner


def pool_records(embedded: tuple[np.ndarray, np.ndarray], n_records: int, pooling: str) -> np.ndarray:
    """``window_embeddings``' (vectors [W, d], owner [W]) -> record features [N, d] (mean of
    each record's windows) or [N, 2 d] (mean+max), float32 (``pool_by_owner`` in float64)."""
    vectors, owner = embedded
    return pool_by_owner(torch.from_numpy(vectors).double(), torch.from_numpy(owner), n_records,
                         pooling).float().numpy()


# ----------------------------------------------------------------------------- fine-tuning


def _samples(data: LabelledWindows, rows: np.ndarray, every: int = 1) -> list[Sample]:
    """One Sample per ``every``-th window of the records ``rows`` (no text)."""
    return [sample for i in rows for sample in data.windows[i].samples(every)]


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

    settings = {k: row[k] for k in ("epochs", "batch_size", "lr", "layer_decay", "weight_decay", "patience",
                                    "head_epochs", "unit") if k in row}
    config = FineTuneConfig(pooling=row.get("token_pooling", "mean"), seed=seed, **settings)
    base = _encoder(row, seed)
    by_record = dict(zip(data.record_ids, data.codes.tolist()))

    def target_of(samples: Sequence[Sample]) -> torch.Tensor:
        return torch.tensor([by_record[s.record_id] for s in samples], dtype=torch.int64)

    records = None
    if row.get("head_init", "random") == "probe":  # the probe row's record features, made once
        records = pool_records(window_embeddings(base, data, config.pooling, progress=progress), len(data.codes),
                               "mean")
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
        if records is not None:
            _set_to_probe(head, records[fit_rows], data.codes[fit_rows], seed)
        model, history = finetune(copy.deepcopy(base), head, "multiclass", _samples(data, fit_rows, every),
                                  _samples(data, val_rows, every), target_of, config, progress=progress, **loss_kw)
        test_rows = np.flatnonzero(fold == k)
        prob[test_rows] = predict_records(model, [data.windows[i] for i in test_rows], "multiclass", batch_size=64)
        if progress:
            tqdm.write(f"fold {k}: best epoch {history.best_epoch}, validation loss {history.best_val_loss:.4f}")
    return prob


def _set_to_probe(head: ClassificationHead, x: np.ndarray, codes: np.ndarray, seed: int) -> None:
    """Sets ``head``'s linear layer to the logistic probe (``make_model("logistic")``, C chosen by
    inner CV) fitted on x [N, d] with classes ``codes`` [N]: logits = coef (x - mean) / scale +
    intercept, folded into weight and bias. A class the rows lack gets weight 0 and bias -30."""
    with threadpool_limits(limits=1, user_api="openmp"):
        pipeline = make_model("logistic", seed).fit(x, codes).best_estimator_
    scale, model = pipeline.named_steps["scale"], pipeline.named_steps["model"]
    weight = model.coef_ / scale.scale_
    linear = head.net[-1]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(-30.0)
        present = torch.as_tensor(np.asarray(model.classes_, np.int64))
        linear.weight[present] = torch.as_tensor(weight, dtype=linear.weight.dtype)
        linear.bias[present] = torch.as_tensor(model.intercept_ - weight @ scale.mean_, dtype=linear.bias.dtype)


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
    fold = folds_or_load(out / "folds.json", [LABELS[k] for k in data.codes], config.n_folds, config.seed,
                         data.record_ids)
    summary = {"data": config.data, "n_records": len(data.codes), "n_folds": config.n_folds, "seed": config.seed,
               "stride_s": config.stride_s, "n_windows": int(sum(len(w.x) for w in data.windows)),
               "fold_sizes": np.bincount(fold).tolist(),
               "read_and_preprocess_s": round(time.perf_counter() - started, 1)}
    summary["rows"] = _earlier_rows(out / "results.json", summary)
    ran: dict[str, Any] = {}
    embedded: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
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
                       embedded: dict[tuple, tuple[np.ndarray, np.ndarray]], out: Path, progress: bool) -> tuple[np.ndarray, dict]:
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
        X, model = pool_records(embedded[key], len(data.codes), row.get("pooling", "mean")), "logistic"
    elif row["kind"] == "random_cnn":
        features = random_cnn_features(data.windows, row.get("width", 64), row.get("depth", 4), config.seed)
        X, model = pool_records(features, len(data.codes), row.get("pooling", "mean")), "logistic"
    else:
        return finetune_probabilities(row, data, fold, config.seed, config.stride_s, progress), {}
    features_s = round(time.perf_counter() - started, 1)  # 0 where an earlier row made them
    return feature_probabilities(X, data.codes, fold, model, config.seed), \
        {"n_features": int(X.shape[1]), "features_s": features_s}


def run(config: BenchmarkConfig) -> dict[str, Any]:
    """``run_benchmark`` of the rows named in ``config.only`` (all when empty)."""
    return run_benchmark(config, progress=not config.quiet, only=config.only or None)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the CLI; returns the summary also written to results.json. A bad option or
    config entry ends with exit status 2 and a message naming it."""
    return run_command(run, BenchmarkConfig, argv, "python -m csfm.benchmark", __doc__)


if __name__ == "__main__":
    main()
