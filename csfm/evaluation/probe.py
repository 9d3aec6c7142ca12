"""Linear probes on record embeddings: ``python -m csfm.probe``.

Joins a labels CSV to an embeddings .npz of ``csfm.evaluation.embedding`` by record id, then runs a
patient-level K-fold cross-validation (no patient in both a training and a test fold). In
every fold a standardised logistic regression (classification) or ridge regression
(regression) is fitted, its C or alpha chosen by an inner patient-level CV on the training
fold. Prints per-fold and mean metrics (AUROC and accuracy, or MAE and Pearson r) and writes
them as JSON. Rows whose label is empty are dropped (the count is reported).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.impute import SimpleImputer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from csfm.cli import OptionError, at_least, check_fields, run_command
from csfm.files import atomic_write
from csfm.data.splits import fold_of_records, kfold
from csfm.evaluation.embedding import Embeddings
from csfm.evaluation.metrics import UndefinedMetricError, accuracy, auroc, mae, pearson_r
from csfm.tasks import ONE_LABEL_TASKS, PROBE_TASKS

C_GRID = tuple(np.logspace(-3, 2, 6))  # inverse L2 strength of LogisticRegression
ALPHA_GRID = tuple(np.logspace(-2, 3, 6))  # L2 strength of Ridge
_SCORING = {"binary": "roc_auc", "multiclass": "neg_log_loss", "regression": "neg_mean_squared_error"}


@dataclass
class ProbeResult:
    """model: the fitted Pipeline (multilabel: a list, None for a skipped label).
    predictions: for test_x [M, d] — binary [M] probability of the larger class label;
    multiclass [M, K] probabilities in ``model.classes_`` order; multilabel [M, L] (NaN
    columns for skipped labels); regression [M] values.
    chosen_C_or_alpha: the C (logistic) or alpha (ridge) picked by the inner CV (multilabel: a
    list, None for skipped labels). n_dropped: training labels dropped as missing (multilabel:
    row x label entries). skipped_labels: multilabel columns with a single class."""

    model: Any
    predictions: np.ndarray
    chosen_C_or_alpha: float | list
    n_dropped: int = 0
    skipped_labels: list[int] = field(default_factory=list)


def linear_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, task: str, cv: int = 5,
                 seed: int = 0, groups: Sequence | None = None, drop_missing: bool = False) -> ProbeResult:
    """Fits a standardised linear model on train_x [N, d], train_y and predicts test_x [M, d].

    task: "binary" / "multiclass" (train_y [N] labels) -> LogisticRegression, C from C_GRID;
    "multilabel" (train_y [N, L] in {0, 1}) -> one logistic regression per label, labels with a
    single class skipped (warned, listed in ``skipped_labels``); "regression" (train_y [N]) ->
    Ridge, alpha from ALPHA_GRID. The regularisation is chosen by an inner ``cv``-fold CV:
    grouped by ``groups`` [N] (patient ids) when given, stratified for classification.
    Missing labels (NaN / None) raise a ValueError unless ``drop_missing=True`` drops them.
    """
    if task not in PROBE_TASKS:
        raise ValueError(f"task must be one of {PROBE_TASKS}, got {task!r}")
    train_x, test_x = _features(train_x, "train_x"), _features(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"test_x has {test_x.shape[1]} features but train_x has {train_x.shape[1]}")
    train_y = np.asarray(train_y, dtype=object if task != "regression" else float)
    if len(train_y) != len(train_x):
        raise ValueError(f"train_y has {len(train_y)} rows but train_x has {len(train_x)}")
    if groups is not None and len(groups) != len(train_x):
        raise ValueError(f"groups has {len(groups)} entries but train_x has {len(train_x)} rows")
    groups = None if groups is None else np.asarray(groups)
    if task == "multilabel":
        return _multilabel_probe(train_x, train_y, test_x, cv, seed, groups, drop_missing)
    return _probe(train_x, train_y, test_x, task, cv, seed, groups, drop_missing)


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty [N, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has {int((~np.isfinite(x)).sum())} non-finite value(s)")
    return x


def _probe(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, task: str, cv: int, seed: int,
           groups: np.ndarray | None, drop_missing: bool, name: str = "train_y") -> ProbeResult:
    """One binary, multiclass or regression probe (y [N])."""
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D for task {task!r}, got shape {y.shape}")
    labelled = ~pd.isna(y)
    if not labelled.all():
        if not drop_missing:
            raise ValueError(f"{name} has {int((~labelled).sum())} missing label(s) (NaN/None); "
                             "pass drop_missing=True to drop those rows")
        x, y = x[labelled], y[labelled]
        groups = None if groups is None else groups[labelled]
    if task != "regression":
        y = np.asarray(y.tolist())  # object -> int / str labels, as scikit-learn needs
        _check_classes(y, task, name)
    search = probe_search(task, _inner_splitter(task, y, groups, cv, seed))
    search.fit(x, y, groups=groups)
    model = search.best_estimator_
    chosen = float(next(iter(search.best_params_.values())))
    return ProbeResult(model, _predict(model, test_x, task), chosen, int((~labelled).sum()))


def _check_classes(y: np.ndarray, task: str, name: str) -> None:
    n_classes = len(np.unique(y))
    if n_classes < 2:
        raise ValueError(f"{name} has a single class ({y[0]!r}): a classifier needs at least two")
    if task == "binary" and n_classes != 2:
        raise ValueError(f"{name} has {n_classes} classes; task 'binary' needs exactly two (use 'multiclass')")


def _multilabel_probe(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, cv: int, seed: int,
                      groups: np.ndarray | None, drop_missing: bool) -> ProbeResult:
    if y.ndim != 2:
        raise ValueError(f"train_y must be [N, L] for task 'multilabel', got shape {y.shape}")
    models, chosen, skipped, n_dropped = [], [], [], 0
    predictions = np.full((len(test_x), y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        column = y[:, j]
        if len(np.unique(column[~pd.isna(column)].astype(str))) < 2:
            skipped.append(j)
            models.append(None)
            chosen.append(None)
            continue
        result = _probe(x, column, test_x, "binary", cv, seed, groups, drop_missing, name=f"train_y[:, {j}]")
        models.append(result.model)
        chosen.append(result.chosen_C_or_alpha)
        predictions[:, j] = result.predictions
        n_dropped += result.n_dropped
    if skipped:
        warnings.warn(f"multilabel probe: label column(s) {skipped} have a single class and were skipped",
                      stacklevel=3)
    return ProbeResult(models, predictions, chosen, n_dropped, skipped)


def probe_search(task: str, cv: Any, grid: Sequence[float] | None = None, scoring: Any = None,
                 impute: bool = False) -> GridSearchCV:
    """The probe pipeline, unfitted: [median imputation of NaN features, when ``impute``] ->
    standardisation -> LogisticRegression (binary, multiclass) or Ridge (regression), its C or
    alpha chosen from ``grid`` (default C_GRID / ALPHA_GRID) by grid search over the
    cross-validation ``cv`` (a splitter or fold count) scored by ``scoring`` (default: ROC AUC,
    log loss or MSE by task). Fit it on x [N, d], y [N] (and ``groups`` for a grouped ``cv``)."""
    if task not in ONE_LABEL_TASKS:
        raise ValueError(f"a probe pipeline fits one of {ONE_LABEL_TASKS}, got {task!r}")
    regression = task == "regression"
    steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True))] if impute else []
    steps += [("scale", StandardScaler()), ("model", Ridge() if regression else LogisticRegression(max_iter=2000))]
    grid = list((ALPHA_GRID if regression else C_GRID) if grid is None else grid)
    return GridSearchCV(Pipeline(steps), {"model__alpha" if regression else "model__C": grid},
                        scoring=_SCORING[task] if scoring is None else scoring, cv=cv)


def _inner_splitter(task: str, y: np.ndarray, groups: np.ndarray | None, cv: int, seed: int):
    """K-fold splitter of the inner CV: grouped when ``groups`` is given, stratified for
    classification; K = ``cv``, lowered to the number of groups or of the smallest class."""
    limit = len(y) if groups is None else len(np.unique(groups))
    if task != "regression":
        limit = min(limit, int(np.unique(y, return_counts=True)[1].min()))
    n_splits = min(cv, limit)
    if n_splits < 2:
        raise ValueError(f"too few rows, patients or members of a class for a {cv}-fold inner CV (at most "
                         f"{limit} folds possible)")
    return kfold(n_splits, seed, stratified=task != "regression", grouped=groups is not None)


def _predict(model: Pipeline, x: np.ndarray, task: str) -> np.ndarray:
    if task == "regression":
        return model.predict(x)
    probabilities = model.predict_proba(x)
    return probabilities[:, 1] if task == "binary" else probabilities


# ----------------------------------------------------------------------------- command line


def join_labels(embeddings: Embeddings, labels: pd.DataFrame, label_column: str,
                id_column: str = "record_id") -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows of ``embeddings`` that have a label: (x [n, d], y [n], patient ids [n], number of
    labels rows dropped because ``label_column`` is empty). Every id of ``labels`` must be
    in the embeddings, and appear once."""
    for column in (id_column, label_column):
        if column not in labels.columns:
            raise ValueError(f"labels have no column {column!r}; columns: {list(labels.columns)}")
    ids = labels[id_column].astype(str)
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"labels column {id_column!r} repeats {len(duplicated)} id(s): {list(duplicated[:5])}")
    row_of = {str(r): i for i, r in enumerate(embeddings.record_ids)}
    unmatched = [r for r in ids if r not in row_of]
    if unmatched:
        raise ValueError(f"{len(unmatched)} id(s) of labels column {id_column!r} are not in the embeddings, "
                         f"e.g. {unmatched[:5]}")
    present = labels[label_column].notna().to_numpy()
    if not present.any():
        raise ValueError(f"labels column {label_column!r} is empty in all {len(labels)} row(s): nothing to probe")
    rows = np.array([row_of[r] for r in ids[present]], dtype=int)
    return (embeddings.embeddings[rows], labels[label_column].to_numpy()[present], embeddings.patient_ids[rows],
            int((~present).sum()))


def fold_metrics(task: str, y_true: np.ndarray, predictions: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """binary / multiclass: auroc (one-vs-rest macro; NaN when a class is absent from
    y_true) and accuracy; regression: mae and pearson r (NaN for a constant input).
    predictions as of ProbeResult, multiclass columns in the order of ``classes``."""
    if task == "regression":
        return {"mae": mae(y_true, predictions), "pearson": _or_nan(pearson_r, y_true, predictions)}
    if task == "binary":
        predicted = np.where(predictions >= 0.5, classes[1], classes[0])
        auc = _or_nan(auroc, (y_true == classes[1]).astype(np.int64), predictions)
    else:
        predicted = classes[predictions.argmax(1)]
        present = set(np.unique(y_true)) == set(classes)
        one_hot = (y_true[:, None] == classes[None, :]).astype(np.int64)
        auc = _or_nan(auroc, one_hot, predictions) if present else float("nan")
    return {"auroc": auc, "accuracy": accuracy(y_true, predicted)}


def _or_nan(metric, *arrays: np.ndarray) -> float:
    """metric(*arrays), or NaN where it is undefined on this fold."""
    try:
        return float(metric(*arrays))
    except UndefinedMetricError:
        return float("nan")


def cross_validate(x: np.ndarray, y: np.ndarray, patients: np.ndarray, task: str, folds: int = 5,
                   seed: int = 0) -> list[dict]:
    """Patient-level ``folds``-fold CV of :func:`linear_probe` (x [n, d], y [n], patients [n]):
    one dict per fold with n_train, n_test, the chosen C / alpha and :func:`fold_metrics`.
    Regression labels must be finite numbers (ValueError quoting the others)."""
    y = _regression_labels(y) if task == "regression" else y.astype(str)
    classes = np.unique(y) if task != "regression" else np.array([])
    results = []
    fold_of = fold_of_records(len(y), folds, seed, labels=None if task == "regression" else y, groups=patients)
    for fold in range(folds):
        train, test = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        probe = linear_probe(x[train], y[train], x[test], task, cv=folds, seed=seed, groups=patients[train])
        predictions = probe.predictions
        if task == "multiclass":  # a class absent from a training fold has no column: add a zero one
            full = np.zeros((len(test), len(classes)))
            full[:, np.searchsorted(classes, probe.model.classes_)] = predictions
            predictions = full
        results.append({"fold": fold, "n_train": len(train), "n_test": len(test),
                        "chosen_C_or_alpha": probe.chosen_C_or_alpha,
                        **fold_metrics(task, y[test], predictions, classes)})
    return results


def _regression_labels(y: np.ndarray) -> np.ndarray:
    """y [n] as float64; ValueError quoting the values that are not finite numbers."""
    values = pd.to_numeric(pd.Series(y, dtype=object), errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"task 'regression' needs numeric labels, but {int(bad.sum())} of {len(y)} are not "
                         f"finite numbers, e.g. {[y[i] for i in np.flatnonzero(bad)[:5]]}")
    return values


def _mean_metrics(results: list[dict]) -> dict[str, float]:
    names = [k for k in results[0] if k not in ("fold", "n_train", "n_test", "chosen_C_or_alpha")]
    return {k: float(np.nanmean([r[k] for r in results])) for k in names}


@dataclass
class ProbeConfig:
    """Options of ``python -m csfm.probe`` (flags of the same names), checked when made
    (OptionError naming the flag); the files are checked by ``run`` before any probe."""

    embeddings: str = field(metadata={"help": "a .npz written by python -m csfm.embed"})
    labels: str = field(metadata={"help": "CSV with a record id column and the label column"})
    label_column: str = field(metadata={"help": "column of --labels to predict"})
    task: str = field(metadata={"help": "kind of label", "choices": ONE_LABEL_TASKS})
    id_column: str = field(default="record_id", metadata={"help": "column of --labels holding the record ids"})
    folds: int = field(default=5, metadata={"help": "patient-level CV folds (outer and inner)",
                                            "valid": at_least(2)})
    seed: int = field(default=0, metadata={"help": "seed of the fold shuffling"})
    out: str = field(default="", metadata={
        "help": "JSON file for the results, in an existing folder (empty = do not write)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if Path(self.embeddings).suffix != ".npz":
            raise OptionError(f"--embeddings {self.embeddings}: expected a .npz written by python -m csfm.embed")


def run(config: ProbeConfig) -> dict:
    """Joins the labels to the embeddings, cross-validates the probe, prints the per-fold and
    mean metrics; returns the results dict, also written to ``config.out`` when given.
    ValueError naming --labels and --label-column for labels that cannot be used."""
    if config.out:
        check_out(Path(config.out))
    embeddings = Embeddings.load(Path(config.embeddings))
    labels = pd.read_csv(config.labels, dtype={config.id_column: str})
    try:
        x, y, patients, n_dropped = join_labels(embeddings, labels, config.label_column, config.id_column)
        folds = cross_validate(x, y, patients, config.task, config.folds, config.seed)
    except ValueError as exc:
        raise ValueError(f"--labels {config.labels}, --label-column {config.label_column}: {exc}") from exc
    results = {"embeddings": config.embeddings, "labels": config.labels, "label_column": config.label_column,
               "task": config.task, "n_records": len(y), "n_patients": len(np.unique(patients)),
               "n_unlabelled_dropped": n_dropped, "folds": folds, "mean": _mean_metrics(folds)}
    _report(results)
    if config.out:
        atomic_write(Path(config.out), lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns the results dict that --out receives. A bad option ends with
    exit status 2 and a message naming it."""
    return run_command(run, ProbeConfig, argv, "python -m csfm.probe", __doc__)


def check_out(path: Path) -> None:
    """OptionError naming --out when a results file could not be written at ``path``
    (checked before the work, so no result is computed and then lost)."""
    if path.is_dir():
        raise OptionError(f"--out {path}: is a folder, expected a JSON file name")
    if not path.parent.is_dir():
        raise OptionError(f"--out {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise OptionError(f"--out {path}: folder {path.parent} is not writable")


def _report(results: dict) -> None:
    print(f"csfm.probe: {results['task']} {results['label_column']!r}: {results['n_records']} records, "
          f"{results['n_patients']} patients ({results['n_unlabelled_dropped']} unlabelled rows dropped)")
    for fold in results["folds"]:
        metrics = "  ".join(f"{k} {fold[k]:.4f}" for k in results["mean"])
        print(f"  fold {fold['fold']}: n_test {fold['n_test']}  {metrics}  C/alpha {fold['chosen_C_or_alpha']:.3g}")
    print("  mean:   " + "  ".join(f"{k} {v:.4f}" for k, v in results["mean"].items()))


if __name__ == "__main__":
    main()
