"""Metrics: hand-computed cases, agreement with scikit-learn, brute-force C-index,
bootstrap determinism and grouping, calibration, reports and input errors."""
import functools
import itertools
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from csfm.evaluation.metrics import (UndefinedMetricError, accuracy, auprc, auroc, bootstrap_ci, concordance_index, evaluate,
                          expected_calibration_error, macro_f1, mae, pearson_r, reliability_plot, results_markdown,
                          rmse, save_results)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def binary_scores(draw, min_size=2, max_size=60):
    """(y [N] 0/1 with both classes, score [N] with ties) drawn from a seed."""
    n = draw(st.integers(min_size, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    score = np.round(rng.normal(size=n) + y, draw(st.integers(0, 2)))  # rounding makes ties
    return y, score


# --------------------------------------------------------------------------- hand-computed


def test_hand_computed_values():
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(y, s) == pytest.approx(0.75)                     # 3 of 4 pairs ordered
    assert auprc(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)     # precision 1 at rank 1, 2/3 at rank 3
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)         # tie counts 1/2
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    # class 0: F1 1; class 1: tp 1, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 2/3
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2], labels=[1]) == pytest.approx(2 / 3)
    assert mae([1.0, 2.0, 3.0], [2.0, 2.0, 5.0]) == pytest.approx(1.0)
    assert rmse([1.0, 2.0, 3.0], [2.0, 2.0, 5.0]) == pytest.approx(np.sqrt(5 / 3))
    assert pearson_r([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson_r([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)


def test_concordance_hand_computed():
    # comparable pairs: (0,1), (0,2), (0,3), (2,3); subject 1 is censored.
    time, event = [1, 2, 3, 4], [1, 0, 1, 0]
    risk = [4, 3, 2, 2]  # (0,*) concordant x3, (2,3) risk tie -> 0.5
    assert concordance_index(time, event, risk) == pytest.approx(3.5 / 4)
    assert concordance_index([1, 1, 2], [1, 1, 0], [1, 2, 0]) == pytest.approx(1.0)  # equal times not compared


def test_multilabel_macro_skips_single_class_labels():
    y = np.array([[0, 1, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1]])
    s = np.array([[0.1, 0.2, 0.9], [0.8, 0.3, 0.1], [0.3, 0.5, 0.2], [0.6, 0.9, 0.7]])
    with pytest.warns(UserWarning, match=r"labels \[1\]"):
        value = auroc(y, s)
    assert value == pytest.approx((auroc(y[:, 0], s[:, 0]) + auroc(y[:, 2], s[:, 2])) / 2)
    assert value == pytest.approx(roc_auc_score(y[:, [0, 2]], s[:, [0, 2]], average="macro"))


# --------------------------------------------------------------------------- vs scikit-learn


@SETTINGS
@given(binary_scores())
def test_auroc_auprc_match_sklearn(data):
    y, score = data
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score))
    assert auprc(y, score) == pytest.approx(average_precision_score(y, score))


@SETTINGS
@given(st.integers(1, 80), st.integers(2, 5), st.integers(0, 2 ** 32 - 1))
def test_macro_f1_matches_sklearn(n, n_classes, seed):
    rng = np.random.default_rng(seed)
    y, pred = rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
    assert macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    labels = np.arange(n_classes)
    assert macro_f1(y, pred, labels=labels) == pytest.approx(
        f1_score(y, pred, labels=labels, average="macro", zero_division=0))


def _brute_force_cindex(time, event, risk):
    concordant = comparable = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        if event[i] and time[i] < time[j]:
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


@SETTINGS
@given(st.integers(2, 40), st.integers(0, 2 ** 32 - 1))
def test_concordance_matches_brute_force_with_ties(n, seed):
    rng = np.random.default_rng(seed)
    time, risk = rng.integers(0, 6, n), rng.integers(0, 4, n)  # small ranges: ties in both
    event = rng.integers(0, 2, n)
    time[:2], event[0] = [0, 1], 1  # at least one comparable pair
    assert concordance_index(time, event, risk) == pytest.approx(_brute_force_cindex(time, event, risk))


# --------------------------------------------------------------------------- bootstrap


def _binary_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=n) + y


def test_bootstrap_covers_point_and_is_deterministic():
    y, s = _binary_data()
    point, low, high = ci = bootstrap_ci(auroc, y, s, n_boot=300, seed=3)
    assert point == auroc(y, s) and low < point < high and ci.n_skipped == 0
    assert bootstrap_ci(auroc, y, s, n_boot=300, seed=3) == ci
    assert bootstrap_ci(auroc, y, s, n_boot=300, seed=4) != ci


def test_batched_bootstrap_equals_per_resample_loop():
    """The batched core and calling the metric on each resample give the same values."""
    y, s = _binary_data(200)
    batched = bootstrap_ci(auroc, y, s, n_boot=50, seed=1)
    looped = bootstrap_ci(lambda a, b: auroc(a, b), y, s, n_boot=50, seed=1)
    assert np.allclose(batched, looped)
    f1 = functools.partial(macro_f1, labels=[1])
    pred = (s > 0.5).astype(int)
    assert np.allclose(bootstrap_ci(f1, y, pred, n_boot=50), bootstrap_ci(lambda a, b: f1(a, b), y, pred, n_boot=50))


def test_bootstrap_skips_undefined_resamples():
    y, s = np.array([0] * 9 + [1]), np.arange(10.0)  # one positive: often absent from a resample
    ci = bootstrap_ci(auroc, y, s, n_boot=200)
    assert 0 < ci.n_skipped < 200 and ci.low <= ci.point <= ci.high


def test_bootstrap_skips_constant_resamples_for_pearson():
    ci = bootstrap_ci(pearson_r, [1.0, 2.0, 4.0], [1.0, 3.0, 2.0], n_boot=200)
    assert ci.n_skipped > 0  # resamples drawing one row three times have no variance
    assert -1 <= ci.low <= ci.high <= 1


def test_group_bootstrap_resamples_whole_groups():
    """Three identical records per patient: resampling patients must give the same interval
    as resampling one record per patient; resampling records ignores the duplication and
    gives a narrower (over-confident) interval."""
    y, s = _binary_data(100, seed=5)
    groups = np.repeat(np.arange(100), 3)
    row_level = bootstrap_ci(auroc, y, s, n_boot=200, seed=7)
    grouped = bootstrap_ci(auroc, np.repeat(y, 3), np.repeat(s, 3), n_boot=200, seed=7, groups=groups)
    assert np.allclose(grouped, row_level)
    naive = bootstrap_ci(auroc, np.repeat(y, 3), np.repeat(s, 3), n_boot=200, seed=7)
    assert naive.high - naive.low < grouped.high - grouped.low  # ignoring patients understates the width


# --------------------------------------------------------------------------- calibration


def test_ece_small_when_calibrated_large_when_not():
    rng = np.random.default_rng(0)
    prob = rng.random(20000)
    y = (rng.random(20000) < prob).astype(int)
    assert expected_calibration_error(y, prob) < 0.02
    overconfident = np.where(prob > 0.5, 1.0, 0.0)
    assert expected_calibration_error(y, overconfident) > 0.2
    probs = rng.dirichlet([1, 1, 1], 5000)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    assert expected_calibration_error(labels, probs) < 0.04


def test_ece_hand_computed():
    # rows 0, 1: predict 1 with confidence 0.9, one right -> bin gap |0.5 - 0.9|, share 2/3;
    # row 2: predicts 0 with confidence 0.6, right -> bin gap |1 - 0.6|, share 1/3
    y, prob = np.array([1, 0, 0]), np.array([0.9, 0.9, 0.4])
    assert expected_calibration_error(y, prob) == pytest.approx((2 / 3) * 0.4 + (1 / 3) * 0.4)


def test_reliability_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random(500)
    path = reliability_plot((rng.random(500) < prob).astype(int), prob, tmp_path / "plots" / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, name", [
    (lambda: auroc([0, np.nan, 1], [0.1, 0.2, 0.3]), "y_true"),
    (lambda: auroc([0, 1, 1], [0.1, np.nan, 0.3]), "score"),
    (lambda: auroc([1, 1, 1], [0.1, 0.2, 0.3]), "y_true"),
    (lambda: auprc([0, 0], [0.1, 0.2]), "y_true"),
    (lambda: auroc([0, 1, 1], [0.1, 0.2]), "y_true and score"),
    (lambda: auroc([], []), "y_true"),
    (lambda: auroc([0, 2], [0.1, 0.2]), "y_true"),
    (lambda: mae([1.0, 2.0], [1.0]), "y_true and y_pred"),
    (lambda: rmse([1.0, np.nan], [1.0, 2.0]), "y_true"),
    (lambda: pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), "y_true"),
    (lambda: accuracy([0, 1], [0, 1, 1]), "y_true and y_pred"),
    (lambda: concordance_index([1, 2], [1, 0], [0.1]), "time and event and risk"),
    (lambda: concordance_index([1, np.nan], [1, 0], [0.1, 0.2]), "time"),
    (lambda: expected_calibration_error([0, 1], [0.5, 1.5]), "prob"),
    (lambda: bootstrap_ci(auroc, [0, 1], [0.1, 0.2], groups=[1]), "groups"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_undefined_is_a_value_error_subclass():
    with pytest.raises(UndefinedMetricError):
        concordance_index([1, 2], [0, 0], [0.1, 0.2])  # no event: no comparable pair


# --------------------------------------------------------------------------- evaluate and reports


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel", "regression", "survival"])
def test_evaluate_every_task(task, tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    y_true, output = {
        "binary": lambda: _binary_data(n)[0:1] + (rng.random(n),),
        "multiclass": lambda: (rng.integers(0, 3, n), rng.dirichlet([1, 1, 1], n)),
        "multilabel": lambda: (np.c_[rng.integers(0, 2, (n, 2)), np.zeros(n, int)], rng.random((n, 3))),
        "regression": lambda: (rng.normal(size=n), rng.normal(size=n)),
        "survival": lambda: (np.c_[rng.exponential(size=n), rng.integers(0, 2, n)], rng.normal(size=n)),
    }[task]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # multilabel: label 2 has one class
        results = evaluate(task, y_true, output, groups=np.arange(n) // 2, n_boot=50)
    for m in results["metrics"].values():
        assert m["low"] <= m["value"] <= m["high"] or m["n_skipped"] > 0
    if task == "multilabel":
        assert results["skipped_labels"] == [2]
    table = results_markdown(results)
    assert table.startswith("| metric | value | 95 % CI |") and len(table.splitlines()) == 2 + len(results["metrics"])
    save_results(results, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_evaluate_rejects_unknown_task_and_bad_classes():
    with pytest.raises(ValueError, match="task"):
        evaluate("ranking", [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="y_true"):
        evaluate("multiclass", [0, 3], [[0.5, 0.5], [0.2, 0.8]])


def test_one_task_list_and_no_model_in_numpy_modules():
    """metrics, splits and the helpers they use import neither torch nor csfm.model; every
    module names its tasks from csfm.tasks."""
    import ast
    import importlib
    from pathlib import Path

    import csfm
    from csfm.tasks import ONE_LABEL_TASKS, PROBE_TASKS, TASKS

    root = Path(csfm.__file__).parent
    for module in ("evaluation/metrics.py", "data/splits.py", "files.py", "tasks.py"):
        tree = ast.parse((root / module).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.split(".")[0] == "torch" or m.startswith("csfm.model")}, module
    assert importlib.import_module("csfm.evaluation.metrics").TASKS is TASKS
    assert importlib.import_module("csfm.model.heads").TASKS is TASKS
    assert set(ONE_LABEL_TASKS) < set(PROBE_TASKS) < set(TASKS)
