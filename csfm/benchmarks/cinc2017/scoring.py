"""PhysioNet/CinC Challenge 2017 (AF classification from single-lead ECG): scoring and a
hand-crafted-feature baseline.

Classes: N normal, A atrial fibrillation, O other rhythm, ~ noisy. The challenge score is
the mean F1 of N, A and O, each F1 read off the 4-class confusion matrix C (rows true,
columns predicted): F1_c = 2 C[c, c] / (row_sum_c + col_sum_c).

The baseline: :mod:`csfm.benchmarks.cinc2017.rr_features` per record, stratified k-fold cross-validation at
record level, median imputation + (logistic regression | gradient boosting), scored on
out-of-fold predictions with bootstrap 95 % intervals over records::

    python -m csfm.benchmarks.cinc2017.scoring --data ../shared/data/cinc2017 --out runs/cinc2017_baseline

Source: Clifford et al., "AF Classification from a Short Single Lead ECG Recording: the
PhysioNet/Computing in Cardiology Challenge 2017" (ODC-BY).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from csfm.data.splits import folds_or_load, kfold
from csfm.cli import OptionError, at_least, check_fields, run_command
from csfm.evaluation.metrics import UndefinedMetricError, auroc, bootstrap_ci, expected_calibration_error, save_results
from csfm.evaluation.probe import probe_search
from csfm.data.readers import WfdbDirectory, read_labels

LABELS = ("N", "A", "O", "~")
SCORED = ("N", "A", "O")
FS_HZ = 300
MODELS = ("logistic", "gbm")
LOGISTIC_CS = (0.01, 0.1, 1.0, 10.0)


# ---------------------------------------------------------------------------------------
# labels and scoring


def read_reference(path: str | Path) -> dict[str, str]:
    """Record name -> label from a ``REFERENCE.csv`` (no header, lines ``record,label``):
    ``csfm.data.readers.read_labels`` with the labels limited to :data:`LABELS`.

    Raises ValueError naming the file, line and record on a malformed line or a label
    outside :data:`LABELS`, or on a record listed twice.
    """
    return read_labels(path, LABELS)


def _codes(name: str, y: Any) -> np.ndarray:
    """Class labels [N] ('N', 'A', 'O', '~' or indices 0..3 into LABELS) -> int64 codes [N]."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype.kind in "iu":
        if y.size and (y.min() < 0 or y.max() >= len(LABELS)):
            raise ValueError(f"{name}: integer labels must lie in 0..{len(LABELS) - 1}, got {np.unique(y)[:5].tolist()}")
        return y.astype(np.int64)
    unknown = sorted(set(y.tolist()) - set(LABELS))
    if unknown:
        raise ValueError(f"{name} holds labels outside {LABELS}: {unknown[:5]}")
    lookup = {label: k for k, label in enumerate(LABELS)}
    return np.fromiter((lookup[v] for v in y.tolist()), np.int64, count=y.size)


def confusion(y_true: Any, y_pred: Any) -> np.ndarray:
    """4x4 confusion matrix, int64, rows = true class, columns = predicted, in LABELS order.

    y_true, y_pred: [N] labels ('N', 'A', 'O', '~') or their indices 0..3.
    """
    t, p = _codes("y_true", y_true), _codes("y_pred", y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred have different lengths ({t.size} vs {p.size})")
    k = len(LABELS)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def _f1_from_confusion(c: np.ndarray) -> np.ndarray:
    """[4] per-class F1 = 2 C[c, c] / (row_sum + col_sum); 0 where the class is absent and never predicted."""
    den = c.sum(axis=1) + c.sum(axis=0)
    return np.divide(2.0 * np.diag(c), den, out=np.zeros(len(c)), where=den > 0)


def per_class_f1(y_true: Any, y_pred: Any) -> dict[str, float]:
    """F1 of each class in LABELS order, from the 4-class confusion matrix.

    A class neither present nor predicted gets F1 = 0 (the challenge's convention would
    divide by zero; 0 keeps the score defined on every bootstrap resample).
    """
    return dict(zip(LABELS, _f1_from_confusion(confusion(y_true, y_pred)).tolist()))


def cinc_score(y_true: Any, y_pred: Any) -> float:
    """The challenge score: mean of F1(N), F1(A), F1(O); y_true, y_pred: [N] labels or codes."""
    f1 = per_class_f1(y_true, y_pred)
    return float(np.mean([f1[c] for c in SCORED]))


# ---------------------------------------------------------------------------------------
# cross-validation


def make_model(model: str, seed: int = 0, inner_folds: int = 3) -> Any:
    """The scikit-learn model of a baseline. "logistic": the probe pipeline
    (:func:`csfm.evaluation.probe.probe_search`: median imputation, standardisation,
    multinomial logistic regression) with C chosen from :data:`LOGISTIC_CS` by the CinC score
    over a seeded stratified ``inner_folds``-fold CV; "gbm": median imputation + a seeded
    HistGradientBoostingClassifier."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.metrics import make_scorer
    from sklearn.pipeline import Pipeline

    if model == "logistic":
        return probe_search("multiclass", kfold(inner_folds, seed), grid=LOGISTIC_CS,
                            scoring=make_scorer(cinc_score), impute=True)
    if model == "gbm":
        return Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                         ("classify", HistGradientBoostingClassifier(
                             learning_rate=0.05, max_iter=300, max_leaf_nodes=15, min_samples_leaf=10,
                             l2_regularization=1.0, early_stopping=False, random_state=seed))])
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def _interval(ci: Any) -> dict[str, float]:
    return {"value": float(ci.point), "low": float(ci.low), "high": float(ci.high)}


def _features(X: Any, n: int) -> np.ndarray:
    """X as float64 [n, F]; ValueError otherwise."""
    X = np.asarray(X, np.float64)
    if X.ndim != 2 or len(X) != n:
        raise ValueError(f"X must be [N, F] with N = len(y) = {n}, got shape {X.shape}")
    return X


def feature_probabilities(X: np.ndarray, codes: np.ndarray, fold: np.ndarray, model: str = "logistic",
                          seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities [N, 4] (LABELS order) of a classifier on features.

    X: [N, F] float (NaN imputed with the training fold's median); codes: [N] in 0..3;
    fold: [N] test fold of each record; model: "logistic" or "gbm" (:func:`make_model`).
    A class absent from a training fold gets probability 0 in that fold.
    """
    X = _features(X, len(codes))
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    prob = np.zeros((len(codes), len(LABELS)))
    # One OpenMP thread: on a few thousand rows gradient boosting gains nothing from more,
    # and on a shared, busy machine OpenMP's waiting threads slow it down many times over.
    with threadpool_limits(limits=1, user_api="openmp"):
        for k in np.unique(fold):
            train, test = fold != k, fold == k
            fitted = make_model(model, seed).fit(X[train], codes[train])
            prob[np.ix_(test, np.asarray(fitted.classes_, np.int64))] = fitted.predict_proba(X[test])
    return prob


def score_predictions(y: Any, prob: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Scores out-of-fold class probabilities prob [N, 4] (LABELS order) against y [N].

    The predicted class is the most probable one. Returns a JSON-able dict: "cinc_score" and
    "auroc_af" (AF vs rest, from P(A)) as {"value", "low", "high"} with 95 % bootstrap
    intervals over records, "per_class_f1", "confusion" (rows true, columns predicted,
    LABELS order), "class_counts", "ece" (top-label expected calibration error).
    """
    codes, prob = _codes("y", y), np.asarray(prob, np.float64)
    if prob.shape != (len(codes), len(LABELS)):
        raise ValueError(f"prob must be [N, {len(LABELS)}] with N = {len(codes)}, got {prob.shape}")
    pred = prob.argmax(axis=1)
    is_af = (codes == LABELS.index("A")).astype(np.int64)
    try:
        af = _interval(bootstrap_ci(auroc, is_af, prob[:, LABELS.index("A")], n_boot=n_boot, seed=seed))
    except UndefinedMetricError:
        af = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    return {
        "n_records": int(len(codes)), "labels": list(LABELS),
        "class_counts": dict(zip(LABELS, np.bincount(codes, minlength=len(LABELS)).tolist())),
        "cinc_score": _interval(bootstrap_ci(cinc_score, codes, pred, n_boot=n_boot, seed=seed)),
        "per_class_f1": per_class_f1(codes, pred),
        "auroc_af": af,
        "confusion": confusion(codes, pred).tolist(),
        "ece": expected_calibration_error(codes, prob),
    }


def cross_validate_features(X: Any, y: Any, model: str = "logistic", n_folds: int = 5, seed: int = 0,
                            split_path: str | Path | None = None, record_ids: Sequence[str] | None = None,
                            n_boot: int = 1000) -> dict[str, Any]:
    """Out-of-fold evaluation of a classifier on per-record features (hand-crafted or embeddings).

    X: [N, F] float features; y: [N] labels ('N', 'A', 'O', '~') or codes 0..3; model:
    "logistic" or "gbm". Folds: :func:`csfm.data.splits.folds_or_load` (seeded, stratified over
    records), saved to / reused from ``split_path`` (JSON) when given; ``record_ids`` [N] are stored with it and checked on reuse.
    Returns :func:`score_predictions`' dict plus the settings, "fold_sizes" and "fit_seconds".
    """
    codes = _codes("y", y)
    X = _features(X, len(codes))
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    fold = folds_or_load(split_path, [LABELS[k] for k in codes], n_folds, seed, record_ids)
    started = time.perf_counter()
    prob = feature_probabilities(X, codes, fold, model, seed)
    return {"model": model, "n_features": int(X.shape[1]), "n_folds": n_folds, "seed": seed,
            **score_predictions(codes, prob, n_boot, seed),
            "fold_sizes": np.bincount(fold, minlength=n_folds).tolist(),
            "fit_seconds": round(time.perf_counter() - started, 2)}


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of :func:`score_predictions` results: one result (named by its
    "model"), or a dict of them keyed by row name, with 95 % CIs, per-class F1, AF AUROC and,
    where a result has "seconds", its wall time."""
    rows = {results["model"]: results} if "cinc_score" in results else results
    timed = any("seconds" in r for r in rows.values())
    head = ("| model | CinC score (95 % CI) | " + " | ".join(f"F1 {c}" for c in LABELS)
            + " | AUROC AF (95 % CI) |" + (" time (s) |" if timed else ""))
    lines = [head, "|---" * (len(LABELS) + 3 + timed) + "|"]
    for name, r in rows.items():
        s, a = r["cinc_score"], r["auroc_af"]
        f1 = " | ".join(f"{r['per_class_f1'][c]:.3f}" for c in LABELS)
        lines.append(f"| {name} | {s['value']:.3f} ({s['low']:.3f} – {s['high']:.3f}) | {f1} | "
                     f"{a['value']:.3f} ({a['low']:.3f} – {a['high']:.3f}) |"
                     + (f" {r['seconds']:.0f} |" if "seconds" in r else " – |" if timed else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# data and command line


def labelled_records(data_dir: str | Path, limit: int | None = None) -> tuple[WfdbDirectory, list[str], np.ndarray]:
    """(reader, record ids, label codes [N]) of the records of ``data_dir`` listed in its
    REFERENCE.csv (the first ``limit``), in REFERENCE.csv order. A record without a label
    raises a ValueError naming it, as does a labelled record missing from the folder."""
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


def load_features(data_dir: str | Path, cache_path: str | Path | None = None, limit: int | None = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of the records listed in ``data_dir/REFERENCE.csv`` (first ``limit`` of them).

    Returns (X [N, F] in rr_features.FEATURE_NAMES order, labels [N] str, record ids [N]).
    With ``cache_path`` (.npz) the matrix is read from there when it holds the same records
    and feature names, and written there otherwise.
    """
    from csfm.benchmarks.cinc2017.rr_features import FEATURE_NAMES, feature_matrix

    reader, ids, codes = labelled_records(data_dir, limit)
    labels = np.asarray(LABELS)[codes]
    if cache_path is not None and Path(cache_path).exists():
        cached = np.load(cache_path, allow_pickle=False)
        if cached["record_ids"].tolist() == ids and cached["feature_names"].tolist() == list(FEATURE_NAMES):
            return cached["X"], labels, ids
    index = {r: i for i, r in enumerate(reader.record_ids)}
    signals = []
    for record_id in ids:
        record = reader[index[record_id]]
        if record.fs != FS_HZ or len(record.channel_types) != 1:
            raise ValueError(f"{Path(data_dir) / record_id}: {len(record.channel_types)} ECG channel(s) at "
                             f"{record.fs} Hz, expected 1 at {FS_HZ}")
        signals.append(record.signal[0].astype(np.float64))
    X = feature_matrix(signals, FS_HZ, progress=progress)
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_path, X=X, record_ids=np.asarray(ids), feature_names=np.asarray(FEATURE_NAMES))
    return X, labels, ids


@dataclass
class BaselineConfig:
    """Options of ``python -m csfm.benchmarks.cinc2017.scoring`` (flags of the same names)."""

    data: str = field(default="../shared/data/cinc2017", metadata={"help": "folder with REFERENCE.csv and the records"})
    out: str = field(default="runs/cinc2017_baseline", metadata={"help": "output folder"})
    models: list[str] = field(default_factory=lambda: list(MODELS), metadata={
        "help": f"baselines to cross-validate, of {', '.join(MODELS)}"})
    n_folds: int = field(default=5, metadata={"help": "cross-validation folds", "valid": at_least(2)})
    seed: int = field(default=0, metadata={"help": "seed of the folds and the models"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs", "valid": at_least(1)})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT records (default: all)",
                                                      "valid": at_least(1)})

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise OptionError(f"--models must name one or more of {', '.join(MODELS)}, got {self.models}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the CLI; returns the summary also written to results.json."""
    return run_command(run, BaselineConfig, argv, "python -m csfm.benchmarks.cinc2017.scoring", __doc__)


def run(args: BaselineConfig) -> dict[str, Any]:
    """Features (cached in ``args.out``), cross-validated baselines -> results.json / results.md."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cached = (out / "features.npz").exists()
    X, labels, ids = load_features(args.data, out / "features.npz", limit=args.limit)
    feature_seconds = time.perf_counter() - started
    results: dict[str, Any] = {}
    for model in args.models:
        results[model] = cross_validate_features(X, labels, model, args.n_folds, args.seed,
                                                 split_path=out / "folds.json", record_ids=ids,
                                                 n_boot=args.n_boot)
    from csfm.benchmarks.cinc2017.rr_features import FEATURE_NAMES

    summary = {"data": str(args.data), "n_records": len(ids), "feature_names": list(FEATURE_NAMES),
               "feature_seconds": round(feature_seconds, 1), "feature_cache_existed": cached,
               "results": results}
    save_results(summary, out / "results.json")
    table = results_table(results)
    (out / "results.md").write_text(
        f"# CinC 2017 baseline: hand-crafted RR features, {args.n_folds}-fold CV on {len(ids)} records\n\n"
        f"Data: PhysioNet/CinC Challenge 2017 training set (ODC-BY). Score: mean F1 of N, A, O "
        f"on out-of-fold predictions; 95 % bootstrap CIs over records.\n\n{table}")
    print(table, end="")
    return summary


if __name__ == "__main__":
    main()
