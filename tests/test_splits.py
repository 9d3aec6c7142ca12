"""Patient splits and folds: no leakage, stratification, determinism, save/load and checks."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csfm.data.splits import (assert_no_patient_leakage, fold_of_records, folds_or_load, patient_splits, save_split,
                              split_by_patient, split_or_load)

SETTINGS = settings(max_examples=40, deadline=None)


def _cohort(n_patients=400, n_records=3000, seed=0):
    """patient_ids [N] (uneven records per patient) and labels [N] in 0..2 (imbalanced),
    constant within a patient."""
    rng = np.random.default_rng(seed)
    patient_ids = rng.integers(0, n_patients, n_records)
    patient_label = rng.choice(3, n_patients, p=[0.2, 0.3, 0.5])
    return patient_ids, patient_label[patient_ids]


def _record_patients(split, patient_ids):
    return {name: set(np.asarray(patient_ids)[idx].tolist()) for name, idx in split.items()}


@SETTINGS
@given(st.lists(st.text(alphabet="abcdef", min_size=1, max_size=2), min_size=1, max_size=80),
       st.integers(0, 2 ** 16), st.booleans())
def test_no_patient_in_two_splits(patient_ids, seed, with_labels):
    labels = [len(p) % 2 for p in patient_ids] if with_labels else None
    split = patient_splits(patient_ids, labels=labels, seed=seed)
    patients = _record_patients(split, patient_ids)
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    everything = np.sort(np.concatenate(list(split.values())))
    assert np.array_equal(everything, np.arange(len(patient_ids)))  # every record exactly once
    assert_no_patient_leakage(split, patient_ids)


def test_fractions_and_label_proportions_are_kept():
    patient_ids, labels = _cohort()
    split = patient_splits(patient_ids, fractions=(0.7, 0.15, 0.15), labels=labels, seed=1)
    overall = np.bincount(labels) / len(labels)
    for name, share in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        assert len(split[name]) / len(labels) == pytest.approx(share, abs=0.02)
        assert np.abs(np.bincount(labels[split[name]], minlength=3) / len(split[name]) - overall).max() < 0.03


def test_majority_label_stratifies_mixed_patients():
    """Records of one patient may carry different labels; every split still holds each class."""
    rng = np.random.default_rng(2)
    patient_ids = np.repeat(np.arange(200), 4)
    labels = rng.integers(0, 2, 800)
    split = patient_splits(patient_ids, labels=labels, seed=0)
    for idx in split.values():
        assert set(labels[idx].tolist()) == {0, 1}


def test_deterministic_for_a_seed():
    patient_ids, labels = _cohort()
    first = patient_splits(patient_ids, labels=labels, seed=5)
    again = patient_splits(patient_ids, labels=labels, seed=5)
    other = patient_splits(patient_ids, labels=labels, seed=6)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])


def test_grouped_stratified_folds_keep_patients_apart():
    patient_ids, labels = _cohort(seed=3)
    fold = fold_of_records(len(labels), 5, seed=0, labels=labels, groups=patient_ids)
    assert set(fold.tolist()) == set(range(5))  # each record tested in exactly one fold
    overall = np.bincount(labels) / len(labels)
    for k in range(5):
        test = fold == k
        assert not set(patient_ids[test]) & set(patient_ids[~test])
        assert test.mean() == pytest.approx(0.2, abs=0.02)
        assert np.abs(np.bincount(labels[test], minlength=3) / test.sum() - overall).max() < 0.04
    regression = fold_of_records(len(labels), 5, seed=0, groups=patient_ids)  # grouped, unstratified
    assert all(not set(patient_ids[regression == k]) & set(patient_ids[regression != k]) for k in range(5))


def test_folds_put_every_record_in_exactly_one_test_fold_stratified():
    labels = np.repeat(np.array(["N", "A", "O", "~"]), [300, 60, 120, 20])
    fold = folds_or_load(None, labels, 5, seed=3)
    assert fold.shape == labels.shape and set(fold.tolist()) == set(range(5))
    for k in range(5):
        counts = {c: int(((fold == k) & (labels == c)).sum()) for c in "NAO~"}
        assert counts == {"N": 60, "A": 12, "O": 24, "~": 4}


def test_saved_folds_are_reused_and_checked(tmp_path):
    labels = np.random.default_rng(0).choice(["N", "A", "O"], 90)
    ids = [f"r{k}" for k in range(90)]
    path = tmp_path / "folds.json"
    made = folds_or_load(path, labels, 3, seed=1, record_ids=ids)
    assert json.loads(path.read_text())["fold"] == made.tolist()
    path.write_text(path.read_text().replace('"fold": [' + str(made[0]), '"fold": [' + str((made[0] + 1) % 3)))
    reused = folds_or_load(path, labels, 3, seed=1, record_ids=ids)  # the file wins over the seed
    assert reused[0] == (made[0] + 1) % 3 and np.array_equal(reused[1:], made[1:])
    with pytest.raises(ValueError, match="folds.json.*differs in \\['seed'\\]"):
        folds_or_load(path, labels, 3, seed=2, record_ids=ids)
    with pytest.raises(ValueError, match="differs in \\['record_ids'\\]"):
        folds_or_load(path, labels, 3, seed=1, record_ids=ids[::-1])
    with pytest.raises(ValueError, match="record_ids has 89 entries"):
        folds_or_load(path, labels, 3, seed=1, record_ids=ids[1:])


def test_split_by_patient_holds_out_a_share_of_patients():
    patient_ids = [f"p{k % 7}" for k in range(50)]
    train, val = split_by_patient(patient_ids, 0.3, seed=4)
    assert sorted(train + val) == list(range(50))
    val_patients = {patient_ids[i] for i in val}
    assert len(val_patients) == 2 and not val_patients & {patient_ids[i] for i in train}
    assert (train, val) == split_by_patient(patient_ids, 0.3, seed=4)
    assert split_by_patient(["only"] * 3, 0.5) == ([0, 1, 2], [])  # one patient: nothing to hold out
    assert len({patient_ids[i] for i in split_by_patient(patient_ids[:14], 0.01)[1]}) == 1  # at least one


@pytest.mark.parametrize("call, match", [
    (lambda: patient_splits([1, 2, 3], fractions=(0.5, 0.6, 0.1)), "fractions"),
    (lambda: patient_splits([1, 2, 3], fractions=(0.5, 0.5)), "fractions"),
    (lambda: patient_splits([1, 2, 3], labels=[0, 1]), "labels"),
    (lambda: patient_splits([]), "patient_ids"),
    (lambda: fold_of_records(3, 3, 0, labels=[0, 0, 1], groups=[1, 1, 2]), "n_splits=3"),
    (lambda: split_by_patient(["a", "b"], 1.0), "val_fraction"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_leakage_assertion_catches_planted_leak():
    patient_ids = np.array(["p1", "p1", "p2", "p3"])
    with pytest.raises(ValueError, match="'p1'.*'train'.*'test'"):
        assert_no_patient_leakage({"train": np.array([0, 2]), "val": np.array([3]), "test": np.array([1])},
                                  patient_ids)


def test_save_load_round_trip(tmp_path):
    patient_ids, labels = _cohort()
    split = patient_splits(patient_ids, labels=labels)
    path = tmp_path / "splits" / "split.json"
    save_split(split, path, record_ids=[f"rec{k}" for k in range(len(patient_ids))])
    loaded = split_or_load(path, patient_ids, [f"rec{k}" for k in range(len(patient_ids))], seed=7)
    assert loaded.keys() == split.keys() and all(np.array_equal(loaded[k], split[k]) for k in split)
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left behind


def test_split_or_load_reuses_and_checks(tmp_path):
    patient_ids, labels = _cohort()
    record_ids = [f"rec{k}" for k in range(len(patient_ids))]
    path = tmp_path / "split.json"
    made = split_or_load(path, patient_ids, record_ids, labels=labels, seed=0)
    reused = split_or_load(path, patient_ids, record_ids, labels=labels, seed=99)  # seed ignored: file wins
    assert all(np.array_equal(made[k], reused[k]) for k in made)
    changed = list(record_ids)
    changed[7] = "other"
    with pytest.raises(ValueError, match="record ids do not match.*record 7"):
        split_or_load(path, patient_ids, changed)
    with pytest.raises(ValueError, match="indexes 3000 records"):
        split_or_load(path, patient_ids[:-1], record_ids[:-1])
