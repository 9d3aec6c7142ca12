"""csfm.evaluation.probe: linear probes on synthetic embeddings, regularisation choice, bad input and
the command line end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from csfm.data.splits import kfold
from csfm.evaluation.probe import ALPHA_GRID, C_GRID, linear_probe, main, probe_search


def _separable(n: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x [n, d] whose first feature shifts with the binary label y [n]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d))
    x[:, 0] += 3.0 * y
    return x, y


def test_binary_probe_separates_separable_embeddings():
    x, y = _separable(400)
    result = linear_probe(x[:300], y[:300], x[300:], "binary", groups=np.arange(300) // 3)
    assert roc_auc_score(y[300:], result.predictions) > 0.9
    assert result.chosen_C_or_alpha in C_GRID


def test_binary_probe_on_random_labels_is_near_chance():
    x, _ = _separable(800, seed=1)
    y = np.random.default_rng(2).integers(0, 2, 800)
    result = linear_probe(x[:400], y[:400], x[400:], "binary")
    assert abs(roc_auc_score(y[400:], result.predictions) - 0.5) < 0.1


def test_multiclass_probe_returns_probabilities():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 8)) + 3.0 * np.eye(8)[y]
    result = linear_probe(x[:200], np.array(["a", "b", "c"])[y[:200]], x[200:], "multiclass")
    assert result.predictions.shape == (100, 3)
    np.testing.assert_allclose(result.predictions.sum(1), 1.0)
    assert (result.predictions.argmax(1) == y[200:]).mean() > 0.9


def test_regression_probe_chooses_alpha_from_the_grid():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 10))
    y = x @ rng.normal(size=10) + 0.1 * rng.normal(size=200)
    result = linear_probe(x[:150], y[:150], x[150:], "regression", groups=np.arange(150) % 30)
    assert result.chosen_C_or_alpha in ALPHA_GRID
    assert np.corrcoef(result.predictions, y[150:])[0, 1] > 0.95


def test_multilabel_probe_skips_single_class_labels():
    x, y = _separable(200, seed=5)
    labels = np.stack([y, np.zeros(200), 1 - y], axis=1)
    with pytest.warns(UserWarning, match=r"\[1\]"):
        result = linear_probe(x[:150], labels[:150], x[150:], "multilabel")
    assert result.skipped_labels == [1] and result.model[1] is None and result.chosen_C_or_alpha[1] is None
    assert np.isnan(result.predictions[:, 1]).all()
    assert roc_auc_score(y[150:], result.predictions[:, 0]) > 0.9


def test_missing_labels_raise_or_are_dropped():
    x, y = _separable(100, seed=6)
    labels = y.astype(object)
    labels[[3, 7]] = None
    with pytest.raises(ValueError, match="train_y has 2 missing"):
        linear_probe(x, labels, x[:5], "binary")
    result = linear_probe(x, labels, x[:5], "binary", drop_missing=True)
    assert result.n_dropped == 2 and result.predictions.shape == (5,)


@pytest.mark.parametrize("kwargs, match", [
    ({"train_y": np.zeros(60)}, "single class"),
    ({"train_y": np.arange(60) % 3}, "exactly two"),
    ({"train_y": np.arange(59) % 2}, "train_y has 59 rows"),
    ({"test_x": np.zeros((5, 3))}, "test_x has 3 features"),
    ({"groups": np.arange(10)}, "groups has 10"),
    ({"task": "ranking"}, "task must be"),
    ({"task": "survival"}, "task must be one of .*'multilabel', 'regression'\\)"),
])
def test_bad_input_raises(kwargs, match):
    x, y = _separable(60, seed=7)
    arguments = {"train_x": x, "train_y": y, "test_x": x[:5], "task": "binary", **kwargs}
    with pytest.raises(ValueError, match=match):
        linear_probe(**arguments)


def test_probe_search_imputes_and_scores_as_asked():
    x, y = _separable(120, d=4, seed=3)
    x[::7, 0] = np.nan  # imputed with the training median, as the CinC baseline needs
    calls = []

    def scorer(estimator, x_val, y_val):
        calls.append(estimator.get_params()["model__C"])
        return -abs(np.log10(estimator.get_params()["model__C"]))  # best: C = 1

    search = probe_search("binary", kfold(3, seed=0), grid=(0.01, 1.0, 100.0), scoring=scorer, impute=True)
    search.fit(x, y)
    assert search.best_params_ == {"model__C": 1.0} and sorted(set(calls)) == [0.01, 1.0, 100.0]
    assert search.predict_proba(x).shape == (120, 2)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        probe_search("binary", 3).fit(x, y)  # without impute NaN features are refused
    with pytest.raises(ValueError, match="one of \\('binary', 'multiclass', 'regression'\\), got 'multilabel'"):
        probe_search("multilabel", 3)


@pytest.fixture
def synthetic_files(tmp_path):
    """An embeddings .npz of 120 records of 40 patients and a labels CSV (one label missing)."""
    x, y = _separable(40, d=4, seed=8)
    x[:, 0] += 2.0 * y
    patients = np.repeat(np.arange(40), 3)
    embeddings = np.repeat(x, 3, axis=0) + 0.3 * np.random.default_rng(9).normal(size=(120, x.shape[1]))
    record_ids = np.array([f"rec{i:03d}" for i in range(120)])
    np.savez(tmp_path / "emb.npz", embeddings=embeddings.astype(np.float32), record_ids=record_ids,
             patient_ids=np.array([f"p{p}" for p in patients]), n_windows=np.ones(120, dtype=int))
    age = embeddings[:, 0] * 10 + 50
    labels = pd.DataFrame({"record_id": record_ids, "af": np.repeat(y, 3).astype(float), "age": age})
    labels.loc[5, "af"] = np.nan
    labels.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def test_cli_binary_end_to_end(synthetic_files, capsys):
    out = synthetic_files / "results.json"
    results = main(["--embeddings", str(synthetic_files / "emb.npz"), "--labels", str(synthetic_files / "labels.csv"),
                    "--label-column", "af", "--task", "binary", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    assert results["n_records"] == 119 and results["n_unlabelled_dropped"] == 1 and len(results["folds"]) == 5
    assert results["mean"]["auroc"] > 0.9 and results["mean"]["accuracy"] > 0.8
    assert "fold 4" in capsys.readouterr().out


def test_cli_regression_end_to_end(synthetic_files):
    results = main(["--embeddings", str(synthetic_files / "emb.npz"), "--labels", str(synthetic_files / "labels.csv"),
                    "--label-column", "age", "--task", "regression", "--folds", "3"])
    assert len(results["folds"]) == 3 and results["mean"]["pearson"] > 0.95
    assert all(fold["chosen_C_or_alpha"] in ALPHA_GRID for fold in results["folds"])


def test_cli_multiclass_end_to_end(synthetic_files):
    labels = pd.read_csv(synthetic_files / "labels.csv")
    labels["rhythm"] = np.where(labels["age"] > 65, "AF", np.where(labels["age"] > 45, "SR", "other"))
    labels.to_csv(synthetic_files / "rhythm.csv", index=False)
    results = main(["--embeddings", str(synthetic_files / "emb.npz"), "--labels", str(synthetic_files / "rhythm.csv"),
                    "--label-column", "rhythm", "--task", "multiclass", "--folds", "3"])
    assert results["n_records"] == 120 and results["mean"]["accuracy"] > 0.8 and results["mean"]["auroc"] > 0.9


def test_cli_folds_keep_patients_apart(synthetic_files, monkeypatch):
    import csfm.evaluation.probe as probe_module
    seen = []
    real = probe_module.linear_probe

    def spy(train_x, train_y, test_x, task, cv, seed, groups):
        seen.append(set(groups))
        return real(train_x, train_y, test_x, task, cv=cv, seed=seed, groups=groups)

    monkeypatch.setattr(probe_module, "linear_probe", spy)
    main(["--embeddings", str(synthetic_files / "emb.npz"), "--labels", str(synthetic_files / "labels.csv"),
          "--label-column", "af", "--task", "binary", "--folds", "2"])
    assert len(seen) == 2 and not seen[0] & seen[1]  # 2 folds: each patient trains in exactly one


def test_cli_unmatched_ids_and_missing_column(synthetic_files):
    labels = pd.read_csv(synthetic_files / "labels.csv")
    labels.loc[0, "record_id"] = "nope"
    labels.to_csv(synthetic_files / "bad.csv", index=False)
    common = ["--embeddings", str(synthetic_files / "emb.npz"), "--task", "binary"]
    with pytest.raises(ValueError, match=r"1 id\(s\).*'nope'"):
        main(common + ["--labels", str(synthetic_files / "bad.csv"), "--label-column", "af"])
    with pytest.raises(ValueError, match="no column 'sex'"):
        main(common + ["--labels", str(synthetic_files / "labels.csv"), "--label-column", "sex"])


def test_cli_help_shows_defaults():
    out = subprocess.run([sys.executable, "-m", "csfm.probe", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    assert "(default: record_id)" in text and "(default: 5)" in text


def test_cli_non_numeric_or_missing_regression_labels_are_named(synthetic_files):
    labels = pd.read_csv(synthetic_files / "labels.csv")
    labels["age"] = labels["age"].astype(object)
    labels.loc[[4, 9], "age"] = ["unknown", "inf"]
    labels["none"] = np.nan
    labels.to_csv(synthetic_files / "odd.csv", index=False)
    common = ["--embeddings", str(synthetic_files / "emb.npz"), "--labels", str(synthetic_files / "odd.csv"),
              "--task", "regression", "--folds", "3"]
    with pytest.raises(ValueError, match=r"odd\.csv, --label-column age: task 'regression' needs numeric labels, "
                                         r"but 2 of 120 are not finite numbers, e.g. \['unknown', 'inf'\]"):
        main(common + ["--label-column", "age"])
    with pytest.raises(ValueError, match=r"--label-column none: labels column 'none' is empty in all 120 row\(s\)"):
        main(common + ["--label-column", "none"])


def test_cli_out_is_checked_before_the_probes_run(synthetic_files, capsys, monkeypatch):
    import csfm.evaluation.probe as probe_module
    monkeypatch.setattr(probe_module, "cross_validate", lambda *a, **k: pytest.fail("probes ran"))
    common = ["--embeddings", str(synthetic_files / "emb.npz"), "--labels", str(synthetic_files / "labels.csv"),
              "--label-column", "af", "--task", "binary"]
    missing = synthetic_files / "no_such_folder" / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--out", str(missing)])
    assert exit_info.value.code == 2
    assert f"--out {missing}: folder {missing.parent} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--out", str(synthetic_files)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "is a folder, expected a JSON file name" in captured.err
    assert captured.out == ""
