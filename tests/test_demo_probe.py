"""Demonstration: embeddings of a short demo pretraining recover the generator's rhythm
labels and heart rate well above chance (seeded, patient-level held-out records)."""
from __future__ import annotations

import numpy as np
import pytest

from csfm.data.demo import RHYTHMS, DemoDataset
from csfm.evaluation.embedding import embed_source, load_encoder
from csfm.evaluation.probe import linear_probe
from csfm.training.loop import parse_config, train


@pytest.mark.slow
def test_probe_on_pretrained_demo_embeddings(tmp_path):
    checkpoint = train(parse_config(["--demo-records", "240", "--epochs", "2", "--precision", "fp32", "--quiet",
                                     "--out-dir", str(tmp_path / "run")]))
    records = DemoDataset(240, seed=5)  # other records than the pretraining ones (seed 0)
    rhythm = np.array([RHYTHMS.index(records[i].metadata["rhythm"]) for i in range(len(records))])
    rate = np.array([records[i].metadata["heart_rate"] for i in range(len(records))])
    patients = np.array(records.patient_ids)
    x = embed_source(load_encoder(checkpoint), records, progress=False).embeddings
    train_rows, test_rows = np.arange(180), np.arange(180, 240)  # 3 records per patient: no patient crosses
    assert not set(patients[train_rows]) & set(patients[test_rows])

    classes = linear_probe(x[train_rows], rhythm[train_rows], x[test_rows], "multiclass", groups=patients[train_rows])
    accuracy = (classes.predictions.argmax(1) == rhythm[test_rows]).mean()
    majority = np.bincount(rhythm[test_rows]).max() / len(test_rows)
    assert accuracy >= majority + 0.2, (accuracy, majority)

    rates = linear_probe(x[train_rows], rate[train_rows], x[test_rows], "regression", groups=patients[train_rows])
    mae = np.abs(rates.predictions - rate[test_rows]).mean()
    mean_guess = np.abs(rate[test_rows] - rate[train_rows].mean()).mean()
    assert mae < 0.6 * mean_guess, (mae, mean_guess)
