"""Optimizer groups and schedules."""
from __future__ import annotations

import pytest
import torch

from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder
from csfm.training.optim import layerwise_param_groups, param_groups, warmup_cosine, warmup_linear


def test_no_decay_groups_hold_norms_biases_embeddings_and_tokens():
    model = CSFMEncoder(preset("demo", depth=2))
    decay, rest = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.layers.0.0.to_qkv.weight" in decayed and "ts_to_patch_embedding.2.weight" in decayed
    for name in ["cls_token", "ts_pos_embedding", "ts_channel_type_embedding", "text_to_embedding.0.weight",
                 "text_pos_embedding", "transformer.norm.weight", "transformer.layers.1.1.net.1.bias"]:
        assert name not in decayed, name
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_layerwise_lr_decay():
    model = CSFMEncoder(preset("demo", depth=3))
    head = torch.nn.Linear(128, 2)
    named = [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    groups = layerwise_param_groups(model, head, depth=3, lr=1e-3, weight_decay=0.05, decay=0.75)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(named)
    assert lr_of[id(params["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["transformer.layers.2.0.to_qkv.weight"])] == pytest.approx(1e-3 * 0.75)
    assert lr_of[id(params["transformer.layers.0.0.to_qkv.weight"])] == pytest.approx(1e-3 * 0.75**3)
    assert lr_of[id(params["cls_token"])] == pytest.approx(1e-3 * 0.75**4)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_schedules():
    assert warmup_linear(0, 100, 10) == pytest.approx(0.1)
    assert warmup_linear(9, 100, 10) == pytest.approx(1.0)
    assert warmup_linear(100, 100, 10) == 0.0
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
