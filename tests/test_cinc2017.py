"""CinC 2017 harness: reference parsing, challenge score on hand-computed confusion
matrices, cross-validation on synthetic features, split files, real records end to end."""
import json
from pathlib import Path

import numpy as np
import pytest

from csfm.benchmarks.cinc2017.scoring import (LABELS, cinc_score, confusion, cross_validate_features, load_features, score_predictions,
                           main, per_class_f1, read_reference, results_table)

CINC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cinc2017"
needs_cinc = pytest.mark.skipif(not CINC.is_dir(), reason=f"CinC 2017 records not found at {CINC}")


# ---------------------------------------------------------------------------------------
# reference file


def test_read_reference(tmp_path):
    path = tmp_path / "REFERENCE.csv"
    path.write_text("A00001,N\nA00002,A\nA00003,O\nA00004,~\n")
    assert read_reference(path) == {"A00001": "N", "A00002": "A", "A00003": "O", "A00004": "~"}


def test_read_reference_names_line_and_record_of_unknown_label(tmp_path):
    path = tmp_path / "REFERENCE.csv"
    path.write_text("A00001,N\nA00002,X\n")
    with pytest.raises(ValueError, match=r"REFERENCE.csv:2: record 'A00002' has unknown label 'X'"):
        read_reference(path)


# ---------------------------------------------------------------------------------------
# scoring


def test_confusion_hand_computed():
    y_true = ["N", "N", "A", "O", "O", "~"]
    y_pred = ["N", "A", "A", "N", "O", "O"]
    expected = np.array([[1, 1, 0, 0],
                         [0, 1, 0, 0],
                         [1, 0, 1, 0],
                         [0, 0, 1, 0]])
    np.testing.assert_array_equal(confusion(y_true, y_pred), expected)
    # codes 0..3 give the same matrix
    codes = {c: k for k, c in enumerate(LABELS)}
    np.testing.assert_array_equal(confusion([codes[c] for c in y_true], [codes[c] for c in y_pred]), expected)


def test_cinc_score_hand_computed():
    y_true = ["N", "N", "A", "O", "O", "~"]
    y_pred = ["N", "A", "A", "N", "O", "O"]
    # F1_N = 2*1 / (2 + 2), F1_A = 2*1 / (1 + 2), F1_O = 2*1 / (2 + 2), F1_~ = 0 / (1 + 0)
    f1 = per_class_f1(y_true, y_pred)
    assert f1 == pytest.approx({"N": 0.5, "A": 2 / 3, "O": 0.5, "~": 0.0})
    assert cinc_score(y_true, y_pred) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


def test_perfect_prediction_scores_one_and_noise_class_is_not_scored():
    y = ["N", "A", "O", "~", "N"]
    assert cinc_score(y, y) == 1.0
    # mistakes on the noisy class lower F1 of the class predicted instead
    assert cinc_score(["N", "A", "O", "~"], ["N", "A", "O", "N"]) == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_always_normal_baseline():
    # 60 % normal: F1_N = 2 * 60 / (60 + 100) = 0.75, F1_A = F1_O = 0 -> score 0.25
    y_true = ["N"] * 60 + ["A"] * 10 + ["O"] * 25 + ["~"] * 5
    assert cinc_score(y_true, ["N"] * 100) == pytest.approx(0.25)
    # with the data set's class counts (885 N of 1,500): 2 * 885 / 2385 / 3
    y_true = ["N"] * 885 + ["A"] * 153 + ["O"] * 419 + ["~"] * 43
    assert cinc_score(y_true, ["N"] * 1500) == pytest.approx(2 * 885 / 2385 / 3)


def test_scoring_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        cinc_score(["N", "B"], ["N", "N"])
    with pytest.raises(ValueError, match="different lengths"):
        confusion(["N", "A"], ["N"])
    with pytest.raises(ValueError, match="0..3"):
        confusion([0, 4], [0, 1])


# ---------------------------------------------------------------------------------------
# cross-validation on synthetic features


def _synthetic(n=400, separable=True, seed=0):
    """Features [n, 5] whose first two columns place each class at its own centre (when
    ``separable``), some NaN; labels in the data set's proportions."""
    rng = np.random.default_rng(seed)
    y = rng.choice(np.array(LABELS), size=n, p=[0.55, 0.15, 0.25, 0.05])
    X = rng.standard_normal((n, 5))
    if separable:
        centres = {"N": (0, 0), "A": (6, 0), "O": (0, 6), "~": (6, 6)}
        X[:, :2] += np.array([centres[c] for c in y])
    X[rng.random(X.shape) < 0.05] = np.nan
    return X, y


@pytest.mark.parametrize("model", ["logistic", "gbm"])
def test_cv_on_separable_features_scores_high(model):
    X, y = _synthetic()
    r = cross_validate_features(X, y, model=model, n_boot=200)
    assert r["cinc_score"]["value"] > 0.9
    assert r["cinc_score"]["low"] <= r["cinc_score"]["value"] <= r["cinc_score"]["high"]
    assert r["auroc_af"]["value"] > 0.95
    assert np.sum(r["confusion"]) == len(y) and sum(r["fold_sizes"]) == len(y)
    json.dumps(r)  # JSON-able as is


def test_cv_on_random_labels_is_near_chance():
    X, y = _synthetic(separable=False)
    r = cross_validate_features(X, y, model="logistic", n_boot=200)
    # chance level: the always-N score is about 2 * 0.55 / 1.55 / 3 = 0.24; guessing in
    # proportion to the classes about (0.55 + 0.15 + 0.25) / 3 = 0.32
    assert r["cinc_score"]["value"] < 0.4
    assert 0.3 < r["auroc_af"]["value"] < 0.7


def test_split_file_is_saved_and_reused(tmp_path):
    X, y = _synthetic(n=120)
    ids = [f"r{i}" for i in range(len(y))]
    path = tmp_path / "folds.json"
    first = cross_validate_features(X, y, model="logistic", n_folds=3, seed=1, split_path=path,
                                    record_ids=ids, n_boot=50)
    saved = json.loads(path.read_text())
    assert saved["n_folds"] == 3 and len(saved["fold"]) == len(y) and saved["record_ids"] == ids
    # the saved folds are used even though another seed would give other folds
    fold = np.array(saved["fold"])
    fold = (fold + 1) % 3  # a different but valid assignment, written in place
    path.write_text(json.dumps({**saved, "fold": fold.tolist()}))
    again = cross_validate_features(X, y, model="logistic", n_folds=3, seed=1, split_path=path,
                                    record_ids=ids, n_boot=50)
    assert again["fold_sizes"] == np.bincount(fold, minlength=3).tolist()
    assert first["fold_sizes"] == np.bincount(np.array(saved["fold"]), minlength=3).tolist()
    # a file that does not match the records is refused
    with pytest.raises(ValueError, match="do not match"):
        cross_validate_features(X, y, model="logistic", n_folds=3, seed=1, split_path=path,
                                record_ids=[f"s{i}" for i in range(len(y))], n_boot=50)
    with pytest.raises(ValueError, match="do not match"):
        cross_validate_features(X, y, model="logistic", n_folds=4, seed=1, split_path=path,
                                record_ids=ids, n_boot=50)


def test_bad_model_and_shapes_raise():
    X, y = _synthetic(n=50)
    with pytest.raises(ValueError, match="model must be one of"):
        cross_validate_features(X, y, model="svm")
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        cross_validate_features(X[:10], y)


def test_results_table_has_a_row_per_model():
    X, y = _synthetic(n=200)
    results = {m: cross_validate_features(X, y, model=m, n_boot=50) for m in ("logistic", "gbm")}
    table = results_table(results)
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| logistic |") and lines[3].startswith("| gbm |")
    assert results_table(results["gbm"]).strip().splitlines()[2].startswith("| gbm |")


# ---------------------------------------------------------------------------------------
# real records


@pytest.mark.data
@needs_cinc
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_real_records_end_to_end(tmp_path):
    X, labels, ids = load_features(CINC, tmp_path / "features.npz", limit=40, progress=False)
    assert X.shape[0] == len(labels) == len(ids) == 40 and ids[0] == "A00001"
    for model in ("logistic", "gbm"):
        r = cross_validate_features(X, labels, model=model, n_folds=3, n_boot=50,
                                    split_path=tmp_path / "folds.json", record_ids=ids)
        assert set(r["per_class_f1"]) == set(LABELS)
    # the cached matrix is read back unchanged
    X2, _, _ = load_features(CINC, tmp_path / "features.npz", limit=40, progress=False)
    np.testing.assert_array_equal(X, X2)


@pytest.mark.data
@needs_cinc
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_cli_writes_results(tmp_path):
    summary = main(["--data", str(CINC), "--out", str(tmp_path), "--limit", "20", "--n-folds", "2",
                    "--n-boot", "20", "--models", "gbm"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    assert (tmp_path / "features.npz").exists() and (tmp_path / "folds.json").exists()
    assert summary["n_records"] == 20
    assert "| gbm |" in (tmp_path / "results.md").read_text()


def test_score_predictions_from_probabilities():
    y = np.array(["N", "N", "A", "O", "~", "A"])
    prob = np.array([[0.7, 0.1, 0.1, 0.1],   # N -> N
                     [0.2, 0.6, 0.1, 0.1],   # N -> A
                     [0.1, 0.8, 0.05, 0.05],  # A -> A
                     [0.1, 0.1, 0.7, 0.1],   # O -> O
                     [0.4, 0.2, 0.2, 0.2],   # ~ -> N
                     [0.1, 0.3, 0.5, 0.1]])  # A -> O
    result = score_predictions(y, prob, n_boot=20)
    assert result["confusion"] == confusion(y, ["N", "A", "A", "O", "N", "O"]).tolist()
    assert result["cinc_score"]["value"] == pytest.approx(cinc_score(y, ["N", "A", "A", "O", "N", "O"]))
    assert result["auroc_af"]["value"] == pytest.approx(7 / 8)  # P(A) ranks 7 of the 8 (A, other) pairs right
    correct = prob.argmax(1) == np.array([0, 0, 1, 2, 3, 1])
    assert 0.0 <= result["ece"] <= 1.0 and correct.sum() == 3
    with pytest.raises(ValueError, match="prob must be"):
        score_predictions(y, prob[:, :3])
