"""Fine-tuning: the demo rhythm labels are learnt, early stopping restores the best epoch."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from csfm.model.config import preset
from csfm.data.windows import PretrainWindows, RecordWindows, collate
from csfm.data.demo import RHYTHMS, DemoDataset
from csfm.model.checkpoint import save_checkpoint
from csfm.evaluation.embedding import encode_windows
from csfm.evaluation.finetune import FineTuneConfig, _loss_of, _units, finetune, main, validation_loss
from csfm.evaluation.finetuned import EncoderWithHead, ModelCard, load_model_dir, predict_records, save_model_dir
from csfm.model.heads import ClassificationHead
from csfm.model.encoder import CSFMEncoder, EncoderOutput, SequenceLayout, pool_tokens, pooled_width, segment_mean
from csfm.model.pretrain import MaskedPretrainer


def rhythm_targets(samples):
    return torch.tensor([RHYTHMS.index(s.metadata["rhythm"]) for s in samples])


@pytest.fixture(scope="module")
def windows():
    records = DemoDataset(48, seed=3)
    data = PretrainWindows(records, None, subset_prob=0.0)
    samples = [data[i] for i in range(len(records))]
    for s in samples:  # lead II only: a small, fast task
        s.x, s.valid, s.channel_types = s.x[1:2], s.valid[1:2], [1]
    return samples[:36], samples[36:]


@pytest.mark.slow
def test_finetuning_learns_demo_rhythms(windows):
    train, val = windows
    torch.manual_seed(0)
    encoder = CSFMEncoder(preset("demo"))
    model, result = finetune(encoder, ClassificationHead(128, len(RHYTHMS)), "multiclass", train, val,
                             rhythm_targets, FineTuneConfig(epochs=6, batch_size=12, lr=2e-3, patience=6),
                             progress=False)
    assert result.train_loss[-1] < result.train_loss[0]
    assert result.best_val_loss == min(result.val_loss)
    # the restored weights are those of the best epoch
    restored = validation_loss(model, val, 12, "multiclass", rhythm_targets)
    assert restored == pytest.approx(result.best_val_loss, rel=1e-5)


def test_early_stopping_and_bad_input(windows):
    train, val = windows
    encoder = CSFMEncoder(preset("demo", depth=1))
    _, result = finetune(encoder, ClassificationHead(128, len(RHYTHMS)), "multiclass", train[:12], val[:6],
                         rhythm_targets, FineTuneConfig(epochs=10, batch_size=12, lr=0.0, patience=1),
                         progress=False)
    assert len(result.val_loss) == 2  # lr 0: no improvement after the first epoch, patience 1
    with pytest.raises(ValueError, match="needs training and validation samples"):
        finetune(encoder, ClassificationHead(128, 4), "multiclass", train, [], rhythm_targets, progress=False)


@pytest.mark.slow
def test_finetune_cli_writes_results_and_reuses_its_split(tmp_path):
    save_checkpoint(tmp_path / "ckpt", MaskedPretrainer(preset("demo", depth=1)), preset("demo", depth=1))
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", "demo:45", "--label", "rhythm", "--task", "multiclass",
            "--out-dir", str(tmp_path / "ft"), "--epochs", "1", "--n-boot", "50"]
    main(args)
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["task"] == "multiclass" and set(results["classes"]) <= set(RHYTHMS)
    assert {"accuracy", "macro-F1"} <= set(results["metrics"])
    split = (tmp_path / "ft" / "split.json").read_text()
    main(args)
    assert (tmp_path / "ft" / "split.json").read_text() == split
    with pytest.raises(ValueError, match="no label 'nope'"):
        main([*args[:5], "nope", *args[6:]])


def test_mean_std_pooling_head_sees_the_embedding(windows):
    train, _ = windows
    encoder = CSFMEncoder(preset("demo", depth=1)).eval()
    samples = train[:4]
    model = EncoderWithHead(encoder, torch.nn.Identity(), "mean+std")
    pooled = model(collate(samples))
    assert pooled.shape == (4, pooled_width(128, "mean+std")) == (4, 256)
    with torch.no_grad():
        embedded = encode_windows(encoder, [s.x for s in samples], [s.channel_types for s in samples],
                                  [s.valid for s in samples], "mean+std")
    torch.testing.assert_close(pooled.detach(), torch.as_tensor(embedded), rtol=1e-5, atol=1e-5)
    pooled.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.transformer.parameters())
    with pytest.raises(ValueError, match="pooling must be one of"):
        EncoderWithHead(encoder, torch.nn.Identity(), "max")


def test_mean_std_of_identical_tokens_is_floored_with_a_finite_gradient():
    layout = SequenceLayout.of(torch.tensor([3, 2]), torch.tensor([0, 0]))  # CLS + 3 and CLS + 2 tokens
    tokens = torch.ones(7, 4, requires_grad=True)
    out = EncoderOutput(tokens, layout, tokens[layout.cls_rows], segment_mean(tokens, layout.cu_seqlens))
    pooled = pool_tokens(out, "mean+std")
    torch.testing.assert_close(pooled.detach(), torch.cat([torch.ones(2, 4), torch.full((2, 4), 1e-6)], 1))
    pooled.sum().backward()
    assert torch.isfinite(tokens.grad).all()


def test_head_epochs_train_the_head_alone_first(windows):
    train, val = windows
    torch.manual_seed(0)
    encoder = CSFMEncoder(preset("demo", depth=1))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    head = ClassificationHead(128, len(RHYTHMS))
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    config = FineTuneConfig(epochs=2, head_epochs=2, batch_size=12, lr=1e-2, patience=5)
    model, _ = finetune(encoder, head, "multiclass", train[:12], val[:6], rhythm_targets, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())  # frozen throughout
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    assert all(p.requires_grad for p in model.encoder.parameters())  # handed back trainable


def test_record_unit_heads_read_each_records_mean_window_embedding(windows, tmp_path):
    """--unit record: windows group by record id (in order of first appearance); the loss of a
    batch of records is the head's on each record's mean window embedding, predict_records
    gives that head's probabilities, and the model directory keeps the unit."""
    train, _ = windows
    grouped = [replace(s, record_id=f"r{i % 5}") for i, s in enumerate(train[:13])]  # 5 records of 2-3 windows
    assert _units(grouped, "record") == [[0, 5, 10], [1, 6, 11], [2, 7, 12], [3, 8], [4, 9]]
    assert _units(grouped, "window") == [[i] for i in range(13)]
    torch.manual_seed(0)
    model = EncoderWithHead(CSFMEncoder(preset("demo", depth=1)), ClassificationHead(256, len(RHYTHMS)),
                            "mean+std", unit="record").eval()
    units = _units(grouped, "record")
    with torch.no_grad():
        embedded = model.embed(collate(grouped))
        means = torch.stack([embedded[unit].mean(0) for unit in units])
        expected = torch.nn.functional.cross_entropy(model.head(means), rhythm_targets([grouped[u[0]] for u in units]))
        torch.testing.assert_close(_loss_of(model, grouped, units, "multiclass", rhythm_targets), expected)
        records = [RecordWindows(np.stack([grouped[i].x for i in unit]), np.stack([grouped[i].valid for i in unit]),
                                 np.arange(len(unit)) * 10.0, [1], f"r{k}", "p") for k, unit in enumerate(units)]
        probs = predict_records(model, records, "multiclass", batch_size=4)
        np.testing.assert_allclose(probs, torch.softmax(model.head(means), -1).numpy(), atol=1e-5)
    save_model_dir(tmp_path / "model", model, ModelCard("multiclass", list(RHYTHMS), "mean+std", "rhythm", [1],
                                                        unit="record"))
    loaded, card = load_model_dir(tmp_path / "model")
    assert card.unit == loaded.unit == "record"
    np.testing.assert_allclose(predict_records(loaded, records, "multiclass"), probs, atol=1e-6)
    with pytest.raises(ValueError, match="unit must be one of"):
        ModelCard("multiclass", list(RHYTHMS), "cls", "rhythm", [1], unit="patient")
    fitted, result = finetune(model.encoder, model.head, "multiclass", grouped, grouped[:4], rhythm_targets,
                              FineTuneConfig(epochs=1, batch_size=2, pooling="mean+std", unit="record"), progress=False)
    assert fitted.unit == "record" and len(result.val_loss) == 1
