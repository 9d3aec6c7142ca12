"""Fine-tuned models as products: the model directory describes its outputs, csfm.predict applies
it to new recordings with the training run's own numbers, and says what it could not use."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from csfm.data.demo import DemoDataset, make_demo_record
from csfm.evaluation.finetune import main as finetune_main
from csfm.evaluation.finetuned import (MODEL_DIR_VERSION, EncoderWithHead, ModelCard, load_model_dir, make_head,
                                       save_model_dir)
from csfm.evaluation.predict import main as predict_main
from csfm.evaluation.predict import predict_source, prediction_table
from csfm.model.checkpoint import save_checkpoint
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder
from csfm.model.pretrain import MaskedPretrainer
from fixtures import SHARED, TWELVE, need, write_wfdb

SMALL = preset("demo", depth=1)


def _model_dir(path, task="multiclass", labels=("af", "brady", "sinus", "tachy"), channel_types=tuple(range(13))):
    torch.manual_seed(0)
    card = ModelCard(task, list(labels), "mean", "rhythm", list(channel_types))
    encoder = CSFMEncoder(SMALL)
    save_model_dir(path, EncoderWithHead(encoder, make_head(task, len(labels), SMALL.dim), "mean"), card)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A csfm.finetune run (1 epoch on 30 demo records): its --out-dir."""
    tmp_path = tmp_path_factory.mktemp("finetuned")
    save_checkpoint(tmp_path / "ckpt", MaskedPretrainer(SMALL), SMALL)
    finetune_main(["--checkpoint", str(tmp_path / "ckpt"), "--data", "demo:30", "--label", "rhythm",
                   "--task", "multiclass", "--out-dir", str(tmp_path / "ft"), "--epochs", "1", "--n-boot", "20",
                   "--quiet"])
    return tmp_path


@pytest.mark.slow
def test_finetune_then_predict_gives_the_runs_own_test_predictions(finetuned):
    tmp_path = finetuned
    card = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["finetuned"]
    classes = json.loads((tmp_path / "ft" / "results.json").read_text())["classes"]
    assert card["labels"] == classes and card["label_key"] == "rhythm" and card["channel_types"] == list(range(13))
    predict_main(["--model", str(tmp_path / "ft" / "model"), "--data", "demo:30", "--out", str(tmp_path / "p.csv"),
                  "--quiet"])
    again = pd.read_csv(tmp_path / "p.csv").set_index("record_id")
    own = pd.read_csv(tmp_path / "ft" / "test_predictions.csv").set_index("record_id")
    assert list(again.columns) == [*classes, "predicted", "n_windows"] and len(again) == 30
    np.testing.assert_allclose(again.loc[own.index, classes].to_numpy(), own[classes].to_numpy(), atol=1e-6)
    assert (again.loc[own.index, "predicted"] == own["predicted"]).all()


@pytest.mark.slow
@pytest.mark.data
def test_a_fine_tuned_model_predicts_on_the_vendor_files(finetuned, tmp_path):
    classes = json.loads((finetuned / "ft" / "results.json").read_text())["classes"]
    predict_main(["--model", str(finetuned / "ft" / "model"), "--data", f"files:{need(SHARED / 'vendor')}",
                  "--out", str(tmp_path / "vendor.csv"), "--quiet"])
    table = pd.read_csv(tmp_path / "vendor.csv")
    assert list(table.columns) == ["record_id", *classes, "predicted", "n_windows"]
    assert len(table) == 6 and set(table["predicted"]) <= set(classes) and (table["n_windows"] == 1).all()
    np.testing.assert_allclose(table[classes].sum(axis=1), 1.0, atol=1e-6)


def test_predict_on_a_wfdb_folder_names_unusable_records_and_unseen_leads(tmp_path):
    model = _model_dir(tmp_path / "model", channel_types=range(12))  # ECG only: PPG never seen
    demo = make_demo_record(1, duration_s=25.0, fs=500.0)
    write_wfdb(tmp_path / "data", "twelve", demo.signal[:12].T.astype(np.float64), 500, list(TWELVE))
    write_wfdb(tmp_path / "data", "with_ppg", demo.signal[[1, 12]].T.astype(np.float64), 500, ["II", "PLETH"],
               units=["mV", "NU"])
    write_wfdb(tmp_path / "data", "empty", np.full((5000, 1), np.nan), 500, ["II"])
    out = tmp_path / "p.csv"
    with pytest.warns(UserWarning, match=r"(?s)1 record\(s\) have leads the model was not trained on.*with_ppg: PPG"):
        result = predict_main(["--model", str(model), "--data", f"wfdb:{tmp_path / 'data'}", "--out", str(out),
                               "--quiet"])
    table = pd.read_csv(out)
    assert list(table["record_id"]) == ["twelve", "with_ppg"] and list(table["n_windows"]) == [3, 3]
    np.testing.assert_allclose(table[["af", "brady", "sinus", "tachy"]].sum(axis=1), 1.0, atol=1e-6)
    assert list(result.unusable) == ["empty"] and "no valid sample" in result.unusable["empty"]
    with pytest.raises(SystemExit):
        predict_main(["--model", str(model), "--data", f"wfdb:{tmp_path / 'data'}", "--out", str(out), "--strict",
                      "--quiet"])
    (tmp_path / "only_empty").mkdir()
    for name in ("empty.hea", "empty.dat"):
        (tmp_path / "only_empty" / name).write_bytes((tmp_path / "data" / name).read_bytes())
    with pytest.raises(SystemExit) as exit_info:  # nothing predicted: exit status 1, not a crash
        predict_main(["--model", str(model), "--data", f"wfdb:{tmp_path / 'only_empty'}", "--out", str(out),
                      "--quiet"])
    assert exit_info.value.code == 1


def test_binary_and_regression_tables():
    binary = ModelCard("binary", ["no", "yes"], "cls", "af", [1])
    table = prediction_table(binary, ["a", "b"], np.array([0.2, 0.9]), [1, 2])
    assert list(table.columns) == ["record_id", "no", "yes", "predicted", "n_windows"]
    np.testing.assert_allclose(table["no"], [0.8, 0.1])
    assert list(table["predicted"]) == ["no", "yes"]
    regression = ModelCard("regression", [], "cls", "hr", [1])
    table = prediction_table(regression, ["a"], np.array([71.5]), [4])
    assert list(table.columns) == ["record_id", "value", "predicted", "n_windows"] and table["value"][0] == 71.5
    with pytest.raises(ValueError, match="would clash"):
        prediction_table(ModelCard("binary", ["predicted", "x"], "cls", "y", [1]), ["a"], np.array([0.5]), [1])
    with pytest.raises(ValueError, match="a binary model needs 2 labels"):
        ModelCard("binary", ["a", "b", "c"], "cls", "y", [1])


def test_model_directories_that_are_not_a_fine_tuned_model_of_this_layout_say_so(tmp_path):
    save_checkpoint(tmp_path / "pretrained", MaskedPretrainer(SMALL), SMALL)
    with pytest.raises(ValueError, match="pretraining checkpoint, not a fine-tuned model"):
        load_model_dir(tmp_path / "pretrained")
    path = _model_dir(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["finetuned"].update(format_version=MODEL_DIR_VERSION + 1, csfm_version="9.0")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"layout {MODEL_DIR_VERSION + 1} written by csfm 9.0"):
        load_model_dir(path)
    config["finetuned"].update(format_version=MODEL_DIR_VERSION, labels=["a", "b"])  # head has 4 outputs
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatch: head"):
        load_model_dir(path)


def test_predict_source_is_the_python_function_behind_the_command(tmp_path):
    model, card = load_model_dir(_model_dir(tmp_path / "model"))
    result = predict_source(model, card, DemoDataset(3), progress=False)
    assert list(result.table["record_id"]) == [f"demo{i:06d}" for i in range(3)]
    assert not result.unusable and not result.unseen_leads
