"""The CinC 2017 AF benchmark harness: config checks, labels, folds, pooling, and the whole
harness (hand-crafted, probe and fine-tuning rows) on a 40-record subset of the real data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from csfm.benchmarks.cinc2017.harness import BenchmarkConfig, main, pool_records
from csfm.benchmarks.cinc2017.scoring import labelled_records
from csfm.model.checkpoint import save_checkpoint
from csfm.benchmarks.cinc2017.scoring import LABELS
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder
from tests.fixtures import CINC2017, write_wfdb

needs_cinc = pytest.mark.skipif(not (CINC2017 / "REFERENCE.csv").exists(),
                                reason=f"CinC 2017 records absent: {CINC2017}")


def _write_folder(tmp_path, labels: dict[str, str]):
    t = np.arange(3000) / 300.0
    for name in ("A00001", "A00002"):
        write_wfdb(tmp_path, name, np.sin(2 * np.pi * 1.1 * t)[:, None], 300, ["ECG"])
    (tmp_path / "REFERENCE.csv").write_text("".join(f"{r},{label}\n" for r, label in labels.items()))
    return tmp_path


def test_unlabelled_or_missing_records_are_named(tmp_path):
    folder = _write_folder(tmp_path, {"A00001": "N"})
    with pytest.raises(ValueError, match=r"\['A00002'\] have no label in REFERENCE.csv"):
        labelled_records(folder)
    (folder / "REFERENCE.csv").write_text("A00001,N\nA00002,A\nA09999,O\n")
    with pytest.raises(ValueError, match=r"labelled record\(s\) \['A09999'\] are not in the folder"):
        labelled_records(folder)
    (folder / "REFERENCE.csv").write_text("A00001,N\nA00002,A\n")
    _, ids, codes = labelled_records(folder)
    assert ids == ["A00001", "A00002"] and codes.tolist() == [LABELS.index("N"), LABELS.index("A")]


def test_pool_records_mean_and_mean_max():
    windows = (np.array([[1.0, 5.0], [2.0, 2.0], [3.0, -1.0]], np.float32), np.array([0, 1, 0]))
    mean = pool_records(windows, 2, "mean")
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, [[2.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(pool_records(windows, 2, "mean+max"), [[2.0, 2.0, 3.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_records(windows, 2, "max")


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "unknown options \\['bogus'\\]"),
    ("rows: [{name: a, kind: probe}]\n", "a probe row needs a checkpoint"),
    ("rows: [{name: a, kind: handcrafted, model: gbm, lr: 1}]\n", "unknown keys \\['lr'\\] for kind handcrafted"),
    ("rows: [{name: a, kind: magic}]\n", "needs a name and a kind"),
    ("rows: [{name: a, kind: finetune, checkpoint: c, token_pooling: max}]\n", "token_pooling must be one of"),
    ("rows: [{name: a, kind: probe, checkpoint: c, pooling: max}]\n", "pooling must be one of"),
    ("rows: [{name: a, kind: finetune, checkpoint: c, class_weight: inverse}]\n", "class_weight must be one of"),
    ("rows: [{name: a, kind: random_cnn, width: 0}]\n", "width must be an integer >= 1, got 0"),
    ("rows: [{name: a, kind: random_cnn, checkpoint: c}]\n", "unknown keys \\['checkpoint'\\] for kind random_cnn"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig.from_file(path)


def test_shipped_config_parses():
    from pathlib import Path

    config = BenchmarkConfig.from_file(Path(__file__).resolve().parents[1] / "configs" / "cinc2017_af.yaml")
    kinds = {row["kind"] for row in config.rows}
    assert kinds == {"handcrafted", "probe", "random_cnn", "finetune"} and config.n_folds == 5
    assert any(row.get("random_init") for row in config.rows)  # the random-weight floor


@pytest.mark.data
@needs_cinc
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_harness_on_40_records(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, CSFMEncoder(preset("demo", depth=1)), preset("demo", depth=1))
    config = tmp_path / "af.yaml"
    config.write_text(f"""
data: {CINC2017}
out: {tmp_path / 'out'}
n_folds: 5
n_boot: 50
rows:
  - {{name: hand, kind: handcrafted, model: logistic}}
  - {{name: floor, kind: probe, checkpoint: {checkpoint}, random_init: true, pooling: mean+max}}
  - {{name: cnn, kind: random_cnn, width: 8, depth: 2}}
  - {{name: tuned, kind: finetune, checkpoint: {checkpoint}, stride_s: 10.0, epochs: 1, batch_size: 16,
      class_weight: balanced, token_pooling: mean+std+rhythm, head_init: probe}}
""")
    summary = main(["--config", str(config), "--limit", "40", "--quiet"])
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_records"] == 40 and sum(saved["fold_sizes"]) == 40
    assert list(saved["rows"]) == ["hand", "floor", "cnn", "tuned"]
    for name, row in saved["rows"].items():
        assert 0.0 <= row["cinc_score"]["low"] <= row["cinc_score"]["value"] <= row["cinc_score"]["high"] <= 1.0
        assert np.asarray(row["confusion"]).sum() == 40 and set(row["per_class_f1"]) == set(LABELS)
        assert (out / row["reliability_png"].split("/")[-1]).is_file() and row["seconds"] >= 0
        assert f"| {name} |" in (out / "results.md").read_text()
    assert saved["rows"]["floor"]["n_features"] == 2 * 128  # mean and max side by side
    assert saved["rows"]["cnn"]["n_features"] == 2 * 8  # mean and std of 8 channels
    # a rerun of one row reuses the saved folds, replaces that row and keeps the others
    folds = json.loads((out / "folds.json").read_text())["fold"]
    # an earlier file with the rows out of config order and "hand" to be replaced
    (out / "results.json").write_text(json.dumps({**saved, "rows": {"tuned": saved["rows"]["tuned"], "hand": {},
                                                                     "floor": saved["rows"]["floor"],
                                                                     "cnn": saved["rows"]["cnn"]}}))
    again = main(["--config", str(config), "--limit", "40", "--quiet", "--only", "hand"])
    assert json.loads((out / "folds.json").read_text())["fold"] == folds
    assert list(again["rows"]) == ["hand", "floor", "cnn", "tuned"] and again["rows"]["tuned"] == saved["rows"]["tuned"]
    assert again["rows"]["hand"]["cinc_score"] == summary["rows"]["hand"]["cinc_score"]
    assert "| tuned |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--only", "nope"])
    assert exit_info.value.code == 2 and "--only: ['nope'] are not rows of" in capsys.readouterr().err


def test_a_head_set_to_the_probe_predicts_what_the_probe_predicts():
    """LP-FT's start: the head's softmax equals the fitted probe's probabilities; a class the
    training rows lack is never predicted."""
    from csfm.benchmarks.cinc2017.harness import _set_to_probe
    from csfm.benchmarks.cinc2017.scoring import make_model
    from csfm.model.heads import ClassificationHead

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, 90)  # classes 0..2: the noisy class (3) is absent
    x = (rng.standard_normal((90, 5)) * [1.0, 5.0, 0.1, 2.0, 1.0] + [0, 3, -1, 0, 10]
         + np.eye(5)[codes] * 2.0).astype(np.float32)
    head = ClassificationHead(5, len(LABELS))
    _set_to_probe(head, x, codes, seed=0)
    probe = make_model("logistic", 0).fit(x, codes)
    with torch.no_grad():
        ours = torch.softmax(head(torch.from_numpy(x)).double(), dim=1).numpy()
    np.testing.assert_allclose(ours[:, :3], probe.predict_proba(x), atol=1e-5)
    assert ours[:, 3].max() < 1e-10


def test_random_cnn_features_are_seeded_and_need_one_channel_count():
    from csfm.benchmarks.cinc2017.random_cnn import random_cnn_features
    from csfm.data.windows import RecordWindows

    g = np.random.default_rng(0)

    def part(n_windows, channels=1):
        x = g.standard_normal((n_windows, channels, 2500)).astype(np.float32)
        return RecordWindows(x, np.ones_like(x, bool), np.arange(n_windows) * 10.0, [1] * channels, "r", "p")

    parts = [part(2), part(3)]
    features, owner = random_cnn_features(parts, width=8, depth=3, seed=1)
    again, _ = random_cnn_features(parts, width=8, depth=3, seed=1, batch_windows=2)
    assert features.shape == (5, 16) and owner.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(features, again, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features, random_cnn_features(parts, width=8, depth=3, seed=2)[0])
    with pytest.raises(ValueError, match=r"one channel count, got records with \[1, 2\]"):
        random_cnn_features([part(1), part(1, channels=2)])
