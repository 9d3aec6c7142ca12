"""Patient splits and cross-validation folds: every split and fold in csfm is made here.

- :func:`patient_splits` / :func:`split_or_load`: train/val/test by patient, stratified by
  each patient's majority label (fine-tuning). Patients are dealt in a seeded random order
  sorted by majority label, each to the part furthest below its target share of records, so
  each part receives close to its share of every label and of all records.
- :func:`split_by_patient`: train/val by patient, a seeded random share of the *patients*
  (pretraining's validation split, unstratified).
- :func:`kfold` / :func:`fold_of_records` / :func:`folds_or_load`: seeded, shuffled K-fold
  cross-validation, stratified by label and / or grouped by patient (the probes' outer and
  inner CV, the CinC 2017 benchmark's folds).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from csfm.files import atomic_write

SPLIT_NAMES = ("train", "val", "test")


def _patients(patient_ids: Any, labels: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Patient index of each record [N] (0..P-1) and each patient's majority label code [P]
    (smallest label on ties), or None without labels."""
    patient_ids = np.asarray(patient_ids)
    if patient_ids.ndim != 1 or patient_ids.size == 0:
        raise ValueError(f"patient_ids must be a non-empty 1-D sequence, got shape {patient_ids.shape}")
    patient_of_record = np.unique(patient_ids, return_inverse=True)[1].ravel()
    if labels is None:
        return patient_of_record, None
    labels = np.asarray(labels)
    if labels.shape != patient_ids.shape:
        raise ValueError(f"labels and patient_ids have different shapes ({labels.shape} vs {patient_ids.shape})")
    label_code = np.unique(labels, return_inverse=True)[1].ravel()
    counts = np.zeros((patient_of_record.max() + 1, label_code.max() + 1), np.int64)
    np.add.at(counts, (patient_of_record, label_code), 1)
    return patient_of_record, counts.argmax(axis=1)


def _deal(patient_ids: Any, fractions: Sequence[float], labels: Any, seed: int) -> np.ndarray:
    """Part (index into ``fractions``) of each record: [N] ints, constant within a patient."""
    fractions = np.asarray(fractions, np.float64)
    if (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    patient_of_record, patient_label = _patients(patient_ids, labels)
    n_records = np.bincount(patient_of_record)
    order = np.random.default_rng(seed).permutation(len(n_records))
    if patient_label is not None:
        order = order[np.argsort(patient_label[order], kind="stable")]
    part_of_patient = np.empty(len(n_records), np.int64)
    assigned = np.zeros(len(fractions))
    for patient in order:
        part = int(np.argmax(fractions * (assigned.sum() + n_records[patient]) - assigned))
        part_of_patient[patient] = part
        assigned[part] += n_records[patient]
    return part_of_patient[patient_of_record]


def patient_splits(patient_ids: Any, fractions: Sequence[float] = (0.8, 0.1, 0.1), labels: Any = None,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Train/val/test record indices with no patient in two splits.

    patient_ids: [N] one id per record; fractions: shares of records for train, val, test;
    labels: [N] optional class per record, stratified by each patient's majority label.
    Returns {"train", "val", "test"}: sorted int64 record indices. Deterministic for a seed.
    """
    if len(fractions) != len(SPLIT_NAMES):
        raise ValueError(f"fractions must have {len(SPLIT_NAMES)} entries (train, val, test), got {fractions}")
    part = _deal(patient_ids, fractions, labels, seed)
    return {name: np.flatnonzero(part == k) for k, name in enumerate(SPLIT_NAMES)}


def assert_no_patient_leakage(split: dict[str, np.ndarray], patient_ids: Any) -> None:
    """Raises ValueError naming a patient whose records lie in two splits.

    split: name -> record indices into patient_ids [N].
    """
    patient_ids = np.asarray(patient_ids)
    seen: dict[Any, str] = {}
    for name, indices in split.items():
        for patient in np.unique(patient_ids[np.asarray(indices, np.int64)]).tolist():
            if seen.setdefault(patient, name) != name:
                raise ValueError(f"patient {patient!r} is in both {seen[patient]!r} and {name!r}")


def save_split(split: dict[str, np.ndarray], path: str | Path, record_ids: Sequence[Any] | None = None) -> None:
    """Writes the split (and the record ids, as strings, when given) as JSON, atomically."""
    _write_json(path, {"splits": {name: np.asarray(idx, np.int64).tolist() for name, idx in split.items()},
                       "record_ids": None if record_ids is None else [str(r) for r in record_ids]})


def _write_json(path: str | Path, content: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(content)))


def _read_split(path: str | Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """(split, record ids or None) from a file written by :func:`save_split`."""
    content = json.loads(Path(path).read_text())
    split = {name: np.asarray(idx, np.int64) for name, idx in content["splits"].items()}
    return split, content["record_ids"]


def _check_saved_split(path: Path, split: dict[str, np.ndarray], saved_ids: list[str] | None,
                       patient_ids: np.ndarray, record_ids: Sequence[Any] | None) -> None:
    """Raises ValueError when a saved split does not fit the current records."""
    n_indexed = sum(len(idx) for idx in split.values())
    if n_indexed != len(patient_ids):
        raise ValueError(f"{path}: the saved split indexes {n_indexed} records, the data have {len(patient_ids)}")
    if record_ids is not None and saved_ids is not None:
        current = [str(r) for r in record_ids]
        mismatch = next((k for k, (a, b) in enumerate(zip(saved_ids, current)) if a != b), None)
        if len(saved_ids) != len(current) or mismatch is not None:
            where = f"record {mismatch}: saved {saved_ids[mismatch]!r}, now {current[mismatch]!r}" \
                if mismatch is not None else f"{len(saved_ids)} saved vs {len(current)} now"
            raise ValueError(f"{path}: the saved split's record ids do not match the current records ({where})")
    assert_no_patient_leakage(split, patient_ids)


def split_or_load(path: str | Path, patient_ids: Any, record_ids: Sequence[Any] | None = None,
                  **kwargs: Any) -> dict[str, np.ndarray]:
    """Loads the split at ``path`` if it exists, checked against the current records;
    otherwise makes one with :func:`patient_splits` (``kwargs``: fractions, labels, seed)
    and saves it there. patient_ids, record_ids: [N] per record."""
    path, patient_ids = Path(path), np.asarray(patient_ids)
    if record_ids is not None and len(record_ids) != len(patient_ids):
        raise ValueError(f"record_ids and patient_ids have different lengths ({len(record_ids)} vs {len(patient_ids)})")
    if path.exists():
        split, saved_ids = _read_split(path)
        _check_saved_split(path, split, saved_ids, patient_ids, record_ids)
        return split
    split = patient_splits(patient_ids, **kwargs)
    save_split(split, path, record_ids)
    return split


def split_by_patient(patient_ids: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Record indices (train, val) with every patient's records on one side only.

    patient_ids: [N] one id per record. A seeded random ``val_fraction`` of the *patients*
    (rounded, at least one when there are two or more) goes to val, whatever their record
    counts and labels. Returns two sorted lists of record indices.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    patient_of_record, _ = _patients(patient_ids, None)
    n_patients = int(patient_of_record.max()) + 1
    n_val = max(1, int(round(val_fraction * n_patients))) if n_patients > 1 else 0
    is_val = np.zeros(n_patients, bool)
    is_val[np.random.default_rng(seed).permutation(n_patients)[:n_val]] = True
    val = is_val[patient_of_record]
    return np.flatnonzero(~val).tolist(), np.flatnonzero(val).tolist()


def kfold(n_splits: int, seed: int, stratified: bool = True, grouped: bool = False) -> Any:
    """The seeded, shuffled scikit-learn K-fold splitter: stratified by label and / or grouped
    (no group, i.e. patient, in two folds); pass labels as ``y`` and patients as ``groups``
    to its ``split``."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    kind = {(True, True): StratifiedGroupKFold, (True, False): StratifiedKFold,
            (False, True): GroupKFold, (False, False): KFold}[(stratified, grouped)]
    return kind(n_splits, shuffle=True, random_state=seed)


def fold_of_records(n_records: int, n_folds: int, seed: int, labels: Any = None, groups: Any = None) -> np.ndarray:
    """Test fold (0..n_folds-1) of each record: [n_records] int64 from :func:`kfold`,
    stratified when ``labels`` [N] are given, grouped when ``groups`` [N] (patient ids) are."""
    fold = np.full(n_records, -1, np.int64)
    splitter = kfold(n_folds, seed, stratified=labels is not None, grouped=groups is not None)
    for k, (_, test) in enumerate(splitter.split(np.zeros((n_records, 1)), labels, groups)):
        fold[test] = k
    return fold


def folds_or_load(path: str | Path | None, labels: Sequence[str], n_folds: int, seed: int,
                  record_ids: Sequence[Any] | None = None) -> np.ndarray:
    """Stratified test fold of each record [N] (:func:`fold_of_records`, no grouping).

    Read from the JSON at ``path`` when it exists (checked to hold the same labels, record
    ids, n_folds and seed: ValueError naming the file otherwise), else made and, with a path,
    saved there. labels: [N] class names (stored as given); record_ids: [N] or None.
    """
    labels = [str(v) for v in labels]
    ids = None if record_ids is None else [str(r) for r in record_ids]
    if ids is not None and len(ids) != len(labels):
        raise ValueError(f"record_ids has {len(ids)} entries, labels has {len(labels)}")
    if path is not None and Path(path).exists():
        saved = json.loads(Path(path).read_text())
        expected = {"n_folds": n_folds, "seed": seed, "labels": labels, "record_ids": ids}
        wrong = [key for key, value in expected.items() if saved.get(key) != value]
        if wrong or len(saved.get("fold", ())) != len(labels):
            raise ValueError(f"{path}: the saved folds do not match these data "
                             f"(differs in {wrong or ['number of records']}); delete it or pass another path")
        return np.asarray(saved["fold"], np.int64)
    fold = fold_of_records(len(labels), n_folds, seed, labels=labels)
    if path is not None:
        _write_json(path, {"n_folds": n_folds, "seed": seed, "fold": fold.tolist(), "labels": labels,
                           "record_ids": ids})
    return fold
