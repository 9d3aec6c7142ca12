"""Evaluation metrics for embeddings' downstream heads, with bootstrap confidence intervals.

Every metric has two forms. The public one (``auroc``, ``mae``, ...) takes numpy arrays,
checks them and returns a float; bad input raises ``ValueError`` naming the argument,
and data on which the metric is undefined (one class for AUROC, a constant input for
Pearson r, no comparable pair for the C-index) raise :class:`UndefinedMetricError`, a
``ValueError``. The private *core* takes the same arrays plus row weights
``w: [B, N]`` and returns ``[B]`` values, NaN where undefined; a point estimate is the
core with unit weights, and a bootstrap resample is the core with the resample's row
counts as weights. So :func:`bootstrap_ci` evaluates all resamples in a few array
operations (rank-based AUROC: no per-resample sort) and patient-level (group)
resampling is only a different way of drawing the counts.

:func:`evaluate` computes a task's metric set with 95 % intervals;
:func:`results_markdown` and :func:`save_results` report it.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from csfm.files import atomic_write
from csfm.tasks import TASKS

_BLOCK_ELEMENTS = 4_000_000  # resamples are evaluated in blocks of about this many weights
_CINDEX_CHUNK = 512          # event rows per pairwise block in the C-index


class UndefinedMetricError(ValueError):
    """The metric is undefined for these data (one class, constant input, no comparable pair)."""


# ---------------------------------------------------------------------------------------
# input checks


def _array(name: str, x: Any, ndims: tuple[int, ...] = (1,)) -> np.ndarray:
    """``x`` as an array with one of ``ndims`` dimensions, non-empty and free of NaN."""
    x = np.asarray(x)
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimension(s), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if x.dtype.kind in "fc" and np.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _same_length(**arrays: np.ndarray) -> None:
    """Raises naming the arrays when their first dimensions differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}: {n}" for name, n in lengths.items())
        raise ValueError(f"{' and '.join(lengths)} have different lengths ({described})")


def _binary(name: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int 0/1; raises naming ``name`` if it holds other values."""
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1, got values {np.unique(y)[:5].tolist()}")
    return y.astype(np.int64)


def _binary_scores(y_true: Any, score: Any, score_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``y_true`` [N] or [N, K] in {0, 1} and ``score`` of the same shape."""
    y = _binary("y_true", _array("y_true", y_true, (1, 2)))
    s = _array(score_name, score, (1, 2)).astype(np.float64)
    _same_length(y_true=y, **{score_name: s})
    if y.shape != s.shape:
        raise ValueError(f"y_true and {score_name} have different shapes ({y.shape} vs {s.shape})")
    return y, s


def _paired(y_true: Any, y_pred: Any, pred_name: str = "y_pred") -> tuple[np.ndarray, np.ndarray]:
    """Checked 1-D ``y_true`` and ``y_pred`` of equal length."""
    y = _array("y_true", y_true)
    p = _array(pred_name, y_pred)
    _same_length(y_true=y, **{pred_name: p})
    return y, p


def _point(core: Callable[..., np.ndarray], undefined: str, *arrays: np.ndarray, **kwargs: Any) -> float:
    """The core evaluated with unit weights; raises ``UndefinedMetricError(undefined)`` on NaN."""
    value = core(*arrays, np.ones((1, len(arrays[0]))), **kwargs)[0]
    if np.isnan(value):
        raise UndefinedMetricError(undefined)
    return float(value)


_CORES: dict[Callable[..., float], Callable[..., np.ndarray]] = {}


def _has_core(core: Callable[..., np.ndarray]) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Registers ``core`` as the weighted, batched form of the decorated public metric."""
    def register(metric: Callable[..., float]) -> Callable[..., float]:
        _CORES[metric] = core
        return metric
    return register


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0."""
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


# ---------------------------------------------------------------------------------------
# ranking metrics: AUROC, AUPRC (binary or macro over labels)


def _weights_by_score(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score, scores ascending.

    y: [N] 0/1, score: [N], w: [B, N] -> (w_pos, w_neg): [B, U], U distinct scores.
    """
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    positive = y[order].astype(bool)
    w_sorted = w[:, order]
    w_pos = np.add.reduceat(w_sorted * positive, starts, axis=1)
    w_neg = np.add.reduceat(w_sorted * ~positive, starts, axis=1)
    return w_pos, w_neg


def _binary_auroc_core(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC, ties counted 1/2. y, score: [N], w: [B, N] -> [B]."""
    w_pos, w_neg = _weights_by_score(y, score, w)
    negatives_below = np.cumsum(w_neg, axis=1) - w_neg
    wins = (w_pos * (negatives_below + 0.5 * w_neg)).sum(axis=1)
    return _divide(wins, w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _binary_auprc_core(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (step-wise, as scikit-learn), NaN unless both classes present.

    y, score: [N], w: [B, N] -> [B].
    """
    w_pos, w_neg = (a[:, ::-1] for a in _weights_by_score(y, score, w))  # scores descending
    true_pos = np.cumsum(w_pos, axis=1)
    precision = np.divide(true_pos, true_pos + np.cumsum(w_neg, axis=1),
                          out=np.zeros_like(true_pos), where=w_pos > 0)
    n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    return _divide((w_pos * precision).sum(axis=1), np.where(n_neg > 0, n_pos, 0))


def _macro_over_labels(binary_core: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Lifts a binary core to y, score: [N] or [N, K]; [N, K] averages the defined labels."""
    def core(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
        if y.ndim == 1:
            return binary_core(y, score, w)
        per_label = np.stack([binary_core(y[:, k], score[:, k], w) for k in range(y.shape[1])])
        defined = ~np.isnan(per_label)
        return _divide(np.where(defined, per_label, 0.0).sum(axis=0), defined.sum(axis=0))
    return core


_auroc_core = _macro_over_labels(_binary_auroc_core)
_auprc_core = _macro_over_labels(_binary_auprc_core)


def single_class_labels(y_true: Any) -> list[int]:
    """Indices of the columns of a multi-label ``y_true`` [N, K] that hold only one class."""
    y = np.asarray(y_true)
    return [k for k in range(y.shape[1]) if np.unique(y[:, k]).size < 2]


def _ranking_metric(core: Callable[..., np.ndarray], name: str, y_true: Any, score: Any) -> float:
    """Shared body of :func:`auroc` and :func:`auprc`: checks, warns on skipped labels."""
    y, s = _binary_scores(y_true, score, "score")
    if y.ndim == 2:
        skipped = single_class_labels(y)
        if len(skipped) == y.shape[1]:
            raise UndefinedMetricError(f"y_true: no label has both classes; {name} needs two")
        if skipped:
            warnings.warn(f"{name}: labels {skipped} of y_true have a single class and are left out "
                          "of the macro average", stacklevel=3)
    return _point(core, f"y_true has a single class ({y.flat[0]}); {name} needs both 0 and 1", y, s)


@_has_core(_auroc_core)
def auroc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve.

    y_true: [N] in {0, 1}, score: [N] (higher = more positive); or both [N, K] multi-label,
    then the macro average over labels with both classes (others skipped with a warning;
    :func:`single_class_labels` lists them).
    """
    return _ranking_metric(_auroc_core, "AUROC", y_true, score)


@_has_core(_auprc_core)
def auprc(y_true: Any, score: Any) -> float:
    """Area under the precision-recall curve as average precision (scikit-learn's definition).

    Shapes as :func:`auroc`; labels without both classes are skipped the same way.
    """
    return _ranking_metric(_auprc_core, "AUPRC", y_true, score)


# ---------------------------------------------------------------------------------------
# classification and regression


def _accuracy_core(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y, pred: [N], w: [B, N] -> [B] weighted fraction of y == pred."""
    return _divide(w @ (y == pred), w.sum(axis=1))


@_has_core(_accuracy_core)
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of correct predictions. y_true, y_pred: [N] class labels."""
    return _point(_accuracy_core, "accuracy undefined", *_paired(y_true, y_pred))


def _macro_f1_core(y: np.ndarray, pred: np.ndarray, w: np.ndarray, labels: Any = None) -> np.ndarray:
    """Unweighted mean over ``labels`` of per-class F1 (0 for a class never true nor predicted).

    y, pred: [N], w: [B, N] -> [B]; labels default to the classes in y or pred.
    """
    labels = np.union1d(y, pred) if labels is None else np.asarray(labels)
    f1 = []
    for label in labels:
        is_true, is_pred = y == label, pred == label
        true_pos = w @ (is_true & is_pred)
        errors = w @ (is_true ^ is_pred)
        f1.append(np.divide(2 * true_pos, 2 * true_pos + errors, out=np.zeros_like(true_pos),
                            where=(2 * true_pos + errors) > 0))
    return np.mean(f1, axis=0)


@_has_core(_macro_f1_core)
def macro_f1(y_true: Any, y_pred: Any, labels: Any = None) -> float:
    """Macro-averaged F1. y_true, y_pred: [N] class labels; ``labels`` restricts/orders the
    classes averaged (``labels=[1]`` gives binary F1 of the positive class)."""
    y, p = _paired(y_true, y_pred)
    if labels is not None and np.size(labels) == 0:
        raise ValueError("labels is empty")
    return _point(_macro_f1_core, "macro-F1 undefined", y, p, labels=labels)


def _mae_core(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y, pred: [N], w: [B, N] -> [B] weighted mean absolute error."""
    return _divide(w @ np.abs(y - pred), w.sum(axis=1))


def _rmse_core(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y, pred: [N], w: [B, N] -> [B] weighted root mean squared error."""
    return np.sqrt(_divide(w @ (y - pred) ** 2, w.sum(axis=1)))


def _regression_inputs(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked float y_true, y_pred: [N]."""
    y, p = _paired(y_true, y_pred)
    return y.astype(np.float64), p.astype(np.float64)


@_has_core(_mae_core)
def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error, in the unit of y. y_true, y_pred: [N]."""
    return _point(_mae_core, "MAE undefined", *_regression_inputs(y_true, y_pred))


@_has_core(_rmse_core)
def rmse(y_true: Any, y_pred: Any) -> float:
    """Root mean squared error, in the unit of y. y_true, y_pred: [N]."""
    return _point(_rmse_core, "RMSE undefined", *_regression_inputs(y_true, y_pred))


def _pearson_core(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y, pred: [N], w: [B, N] -> [B] weighted Pearson correlation; NaN for a constant input."""
    y, pred = y - y.mean(), pred - pred.mean()  # centring first keeps the moments accurate
    total = w.sum(axis=1)
    mean_y, mean_p = w @ y / total, w @ pred / total
    var_y = w @ y ** 2 / total - mean_y ** 2
    var_p = w @ pred ** 2 / total - mean_p ** 2
    cov = w @ (y * pred) / total - mean_y * mean_p
    constant = (var_y <= 1e-12 * np.abs(y).max() ** 2) | (var_p <= 1e-12 * np.abs(pred).max() ** 2)
    return np.where(constant, np.nan, np.clip(_divide(cov, np.sqrt(np.abs(var_y * var_p))), -1.0, 1.0))


@_has_core(_pearson_core)
def pearson_r(y_true: Any, y_pred: Any) -> float:
    """Pearson correlation between y_true and y_pred: [N]."""
    y, p = _regression_inputs(y_true, y_pred)
    for name, a in (("y_true", y), ("y_pred", p)):
        if np.ptp(a) == 0:
            raise UndefinedMetricError(f"{name} is constant; Pearson r needs variance")
    return _point(_pearson_core, "Pearson r undefined: an input is constant", y, p)


# ---------------------------------------------------------------------------------------
# survival


def _concordance_core(time: np.ndarray, event: np.ndarray, risk: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Harrell's C over weighted pairs. time, event, risk: [N], w: [B, N] -> [B].

    Pair (i, j) is comparable when time_i < time_j and i had the event; it scores 1 when
    risk_i > risk_j, 1/2 on a risk tie; the pair weight is w_i * w_j.
    """
    concordant = np.zeros(len(w))
    comparable = np.zeros(len(w))
    rows = np.flatnonzero(event.astype(bool))
    for start in range(0, len(rows), _CINDEX_CHUNK):
        i = rows[start:start + _CINDEX_CHUNK]
        pairs = (time[i, None] < time[None, :]).astype(np.float64)  # [c, N]
        score = pairs * ((risk[i, None] > risk[None, :]) + 0.5 * (risk[i, None] == risk[None, :]))
        concordant += (w[:, i] * (w @ score.T)).sum(axis=1)
        comparable += (w[:, i] * (w @ pairs.T)).sum(axis=1)
    return _divide(concordant, comparable)


@_has_core(_concordance_core)
def concordance_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's C-index: higher risk should mean an earlier event.

    time: [N] follow-up time, event: [N] 1 = event observed at ``time``, 0 = censored,
    risk: [N] predicted risk. Pairs count only when the earlier time had an event; equal
    times are not comparable; risk ties count 1/2.
    """
    t = _array("time", time).astype(np.float64)
    e = _binary("event", _array("event", event))
    r = _array("risk", risk).astype(np.float64)
    _same_length(time=t, event=e, risk=r)
    return _point(_concordance_core, "no comparable pair (needs an event before another time)", t, e, r)


# ---------------------------------------------------------------------------------------
# calibration


def _top_label(y: np.ndarray, prob: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence and correctness of the predicted class, and each row's bin.

    y: [N] labels, prob: [N] P(class 1) or [N, K] class probabilities
    -> (confidence [N] in [0, 1], correct [N] bool, bin [N] in 0..n_bins-1).
    """
    if prob.ndim == 1:
        prob = np.stack([1 - prob, prob], axis=1)
    confidence = prob.max(axis=1)
    correct = prob.argmax(axis=1) == y
    bins = np.clip((confidence * n_bins).astype(np.int64), 0, n_bins - 1)
    return confidence, correct, bins


def _ece_core(y: np.ndarray, prob: np.ndarray, w: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """y: [N], prob: [N] or [N, K], w: [B, N] -> [B] expected calibration error."""
    confidence, correct, bins = _top_label(y, prob, n_bins)
    in_bin = np.eye(n_bins)[bins]  # [N, n_bins]
    gap = w @ (in_bin * correct[:, None]) - w @ (in_bin * confidence[:, None])
    return _divide(np.abs(gap).sum(axis=1), w.sum(axis=1))


def _calibration_inputs(y_true: Any, prob: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked y_true: [N] labels and prob: [N] or [N, K] in [0, 1]."""
    y = _array("y_true", y_true).astype(np.int64)
    p = _array("prob", prob, (1, 2)).astype(np.float64)
    _same_length(y_true=y, prob=p)
    if (p < 0).any() or (p > 1).any():
        raise ValueError("prob must lie in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    return y, p


@_has_core(_ece_core)
def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = 10) -> float:
    """Top-label ECE over ``n_bins`` equal-width confidence bins: sum over bins of
    (bin share) * |accuracy - mean confidence|.

    y_true: [N] labels; prob: [N] P(y = 1) for binary, or [N, K] class probabilities.
    """
    y, p = _calibration_inputs(y_true, prob, n_bins)
    return _point(_ece_core, "ECE undefined", y, p, n_bins=n_bins)


def reliability_plot(y_true: Any, prob: Any, path: str | Path, n_bins: int = 10) -> Path:
    """Writes a reliability diagram PNG to ``path`` and returns the path.

    Top panel: accuracy per confidence bin against the diagonal (perfect calibration);
    bottom panel: the number of rows per bin. Inputs as :func:`expected_calibration_error`.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = _calibration_inputs(y_true, prob, n_bins)
    confidence, correct, bins = _top_label(y, p, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    bin_accuracy = _divide(np.bincount(bins, correct, n_bins), counts)
    centres = (np.arange(n_bins) + 0.5) / n_bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, height_ratios=(3, 1))
    top.bar(centres, np.nan_to_num(bin_accuracy), width=1 / n_bins, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set(ylabel="accuracy", ylim=(0, 1),
            title=f"ECE = {expected_calibration_error(y, p, n_bins):.3f} (n = {len(y)})")
    top.legend(loc="upper left")
    bottom.bar(centres, counts, width=1 / n_bins, edgecolor="black")
    for x, n in zip(centres, counts):
        bottom.text(x, n, str(n), ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="confidence", ylabel="rows", xlim=(0, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# bootstrap


class BootstrapCI(tuple):
    """``(point, low, high)``; ``n_skipped`` resamples were left out as undefined."""

    def __new__(cls, point: float, low: float, high: float, n_skipped: int) -> "BootstrapCI":
        ci = super().__new__(cls, (point, low, high))
        ci.n_skipped = n_skipped
        return ci

    point = property(lambda self: self[0])
    low = property(lambda self: self[1])
    high = property(lambda self: self[2])


def _row_counts(draws: np.ndarray, size: int) -> np.ndarray:
    """draws: [B, M] indices in 0..size-1 -> [B, size] float64 how often each was drawn."""
    offsets = draws + size * np.arange(len(draws))[:, None]
    return np.bincount(offsets.ravel(), minlength=len(draws) * size).reshape(len(draws), size).astype(np.float64)


def _resample_weights(rng: np.random.Generator, n_resamples: int, n: int,
                      group_of_row: np.ndarray | None) -> np.ndarray:
    """[n_resamples, n] row counts of resamples with replacement: of rows, or of whole
    groups when ``group_of_row`` ([N] ints 0..G-1) is given."""
    if group_of_row is None:
        return _row_counts(rng.integers(0, n, size=(n_resamples, n)), n)
    n_groups = int(group_of_row.max()) + 1
    return _row_counts(rng.integers(0, n_groups, size=(n_resamples, n_groups)), n_groups)[:, group_of_row]


def _core_of(metric: Callable[..., float]) -> Callable[..., np.ndarray] | None:
    """The batched core of a public metric (or a keyword-only ``functools.partial`` of one)."""
    if isinstance(metric, functools.partial) and not metric.args:
        core = _CORES.get(metric.func)
        return core and functools.partial(core, **metric.keywords)
    return _CORES.get(metric)


def _resampled_values(metric: Callable[..., float], arrays: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Metric on each resample given by row counts w: [B, N] -> [B], NaN where undefined.
    Uses the batched core when the metric has one, else calls the metric per resample."""
    core = _core_of(metric)
    if core is not None:
        return core(*arrays, w)
    values = np.full(len(w), np.nan)
    rows = np.arange(w.shape[1])
    for b, counts in enumerate(w.astype(np.int64)):
        picked = np.repeat(rows, counts)
        try:
            values[b] = metric(*(a[picked] for a in arrays))
        except UndefinedMetricError:
            pass
    return values


def bootstrap_ci(metric: Callable[..., float], *arrays: Any, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, groups: Any = None) -> BootstrapCI:
    """Percentile bootstrap interval of ``metric(*arrays)``.

    arrays: each [N, ...], resampled together by rows with replacement, or by whole groups
    when ``groups`` ([N], e.g. patient ids) is given. Resamples on which the metric is
    undefined are skipped and counted in ``n_skipped``. Deterministic for a seed.
    Returns ``BootstrapCI(point, low, high)`` (a 3-tuple) with the ``1 - alpha`` interval.
    """
    arrays = [np.asarray(a) for a in arrays]
    point = metric(*arrays)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n = len(arrays[0])
    group_of_row = None
    if groups is not None:
        groups = _array("groups", groups)
        _same_length(groups=groups, **{f"arrays[{i}]": a for i, a in enumerate(arrays)})
        group_of_row = np.unique(groups, return_inverse=True)[1].ravel()
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    values = np.concatenate([
        _resampled_values(metric, arrays, _resample_weights(rng, min(block, n_boot - start), n, group_of_row))
        for start in range(0, n_boot, block)])
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        raise UndefinedMetricError(f"the metric is undefined on all {n_boot} bootstrap resamples")
    low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(point, float(low), float(high), n_skipped=n_boot - defined.size)


# ---------------------------------------------------------------------------------------
# task-level evaluation and reporting


def _survival_columns(y_true: Any) -> tuple[np.ndarray, np.ndarray]:
    """(time, event) from a tuple of two [N] arrays or an [N, 2] array."""
    if isinstance(y_true, tuple):
        return y_true
    y = _array("y_true", y_true, (2,))
    if y.shape[1] != 2:
        raise ValueError(f"y_true for survival must be [N, 2] (time, event), got shape {y.shape}")
    return y[:, 0], y[:, 1]


def _metric_plan(task: str, y_true: Any, output: Any) -> dict[str, tuple[Callable[..., float], tuple]]:
    """Metric name -> (metric, arrays) for a task; see :func:`evaluate` for the inputs."""
    if task == "survival":
        time, event = _survival_columns(y_true)
        return {"C-index": (concordance_index, (time, event, output))}
    y, out = np.asarray(y_true), np.asarray(output)
    if task == "binary":
        pred = (out >= 0.5).astype(np.int64)
        return {"AUROC": (auroc, (y, out)), "AUPRC": (auprc, (y, out)),
                "F1@0.5": (functools.partial(macro_f1, labels=[1]), (y, pred)),
                "accuracy@0.5": (accuracy, (y, pred)), "ECE": (expected_calibration_error, (y, out))}
    if task == "multiclass":
        out = _array("output", out, (2,))
        pred, classes = out.argmax(axis=1), np.arange(out.shape[1])
        if not np.isin(y, classes).all():
            raise ValueError(f"y_true must hold class indices 0..{len(classes) - 1} (the columns of output)")
        one_hot = (y[:, None] == classes).astype(np.int64)
        return {"accuracy": (accuracy, (y, pred)),
                "macro-F1": (functools.partial(macro_f1, labels=classes), (y, pred)),
                "macro AUROC (OvR)": (auroc, (one_hot, out))}
    if task == "multilabel":
        return {"macro AUROC": (auroc, (y, out)), "macro AUPRC": (auprc, (y, out))}
    if task == "regression":
        return {"MAE": (mae, (y, out)), "RMSE": (rmse, (y, out)), "Pearson r": (pearson_r, (y, out))}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def evaluate(task: str, y_true: Any, output: Any, groups: Any = None, n_boot: int = 1000,
             seed: int = 0) -> dict[str, Any]:
    """A task's metrics, each with a 95 % bootstrap interval (by ``groups`` when given).

    task: "binary" (y_true [N] 0/1, output [N] P(y = 1)): AUROC, AUPRC, F1 and accuracy at
    0.5, ECE; "multiclass" (y_true [N] ints 0..K-1, output [N, K] probabilities): accuracy,
    macro-F1, macro one-vs-rest AUROC; "multilabel" (y_true, output [N, K]): macro
    AUROC/AUPRC; "regression" (y_true, output [N]): MAE, RMSE, Pearson r; "survival"
    (y_true [N, 2] or a tuple (time, event), output [N] risk): C-index.
    Returns {"task", "n", "ci_level", "metrics": {name: {"value", "low", "high", "n_skipped"}}}
    plus "skipped_labels" for multi-label tasks with single-class labels.
    """
    plan = _metric_plan(task, y_true, output)
    metrics = {}
    for name, (metric, arrays) in plan.items():
        ci = bootstrap_ci(metric, *arrays, n_boot=n_boot, seed=seed, groups=groups)
        metrics[name] = {"value": ci.point, "low": ci.low, "high": ci.high, "n_skipped": ci.n_skipped}
    results: dict[str, Any] = {"task": task, "n": len(output), "ci_level": 0.95, "metrics": metrics}
    if task == "multilabel":
        results["skipped_labels"] = single_class_labels(y_true)
    return results


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table (metric | value | CI) of :func:`evaluate`'s results."""
    level = f"{100 * results.get('ci_level', 0.95):g} % CI"
    lines = [f"| metric | value | {level} |", "|---|---|---|"]
    for name, m in results["metrics"].items():
        lines.append(f"| {name} | {m['value']:.3f} | {m['low']:.3f} – {m['high']:.3f} |")
    return "\n".join(lines) + "\n"


def save_results(results: dict[str, Any], path_json: str | Path) -> None:
    """Writes ``results`` as JSON, atomically (temporary file, then rename)."""
    atomic_write(Path(path_json), lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=_json_default)))


def _json_default(x: Any) -> Any:
    """numpy scalars and arrays as plain JSON values."""
    return x.tolist() if isinstance(x, (np.ndarray, np.generic)) else str(x)
