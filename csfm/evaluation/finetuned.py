"""A fine-tuned model as a product: encoder + head, and a self-describing model directory
(``model.safetensors`` + ``config.json``) that says what the outputs are, how records were
prepared and which leads the model saw, so ``csfm.predict`` can apply it to new recordings.

A model's unit says what its head sees. ``window``: each 10 s window's pooled embedding, and a
record's prediction is the mean of its windows' predictions (probabilities, or values).
``record``: the mean of a record's window embeddings (as ``csfm.embed`` and the linear probe
pool a record), one prediction per record. The same for fine-tuning's own evaluation, the
CinC benchmark and ``csfm.predict``.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from csfm.data.preprocess import MODALITIES, PreprocessConfig
from csfm.data.record import CHANNEL_TYPE_NAMES
from csfm.data.windows import RecordWindows, Sample, collate
from csfm.model.batch import Batch
from csfm.model.checkpoint import load_state_dict_checked, load_weights, read_config, save_checkpoint
from csfm.model.config import ModelConfig
from csfm.model.encoder import CSFMEncoder, check_token_pooling, pool_by_owner, pool_tokens, pooled_width
from csfm.model.heads import ClassificationHead, RegressionHead
from csfm.tasks import ONE_LABEL_TASKS

MODEL_DIR_VERSION = 1  # the layout of config.json's "finetuned" entry; bumped on any change


UNITS = ("window", "record")
"""What a head is given: one window's embedding, or the mean of a record's window embeddings."""


def check_unit(unit: str) -> None:
    """ValueError unless ``unit`` is one of UNITS."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


class EncoderWithHead(nn.Module):
    """Encoder -> pooled embedding (:func:`csfm.model.encoder.pool_tokens`: any TOKEN_POOLINGS, the
    head's input width from :func:`csfm.model.encoder.pooled_width`) -> head. unit: what the
    head is given (UNITS; see the module doc)."""

    def __init__(self, encoder: CSFMEncoder, head: nn.Module, pooling: str = "cls", unit: str = "window") -> None:
        super().__init__()
        check_token_pooling(pooling)
        check_unit(unit)
        self.encoder, self.head, self.pooling, self.unit = encoder, head, pooling, unit

    def embed(self, batch: Batch) -> torch.Tensor:
        """Windows of at most 10 s -> pooled embeddings [B, width]; patches without a valid
        sample are left out as embedding leaves them out (``CSFMEncoder.encode_valid``)."""
        return pool_tokens(self.encoder.encode_valid(batch), self.pooling)

    def forward(self, batch: Batch, owner: torch.Tensor | None = None, n_owners: int = 0) -> torch.Tensor:
        """Head output [B, K] of the windows of ``batch``; with owner [B] (int64 on the CPU, the
        record each window belongs to, 0..n_owners-1), the head output [n_owners, K] of each
        record's mean window embedding."""
        pooled = self.embed(batch)
        if owner is not None:
            pooled = pool_by_owner(pooled, owner, n_owners)
        return self.head(pooled)


def make_head(task: str, n_labels: int, width: int) -> nn.Module:
    """The head of ``task`` over ``width``-wide embeddings: one logit (binary), one per label
    (multiclass) or one value (regression)."""
    if task == "regression":
        return RegressionHead(width)
    return ClassificationHead(width, 1 if task == "binary" else n_labels)


@dataclass
class ModelCard:
    """What a fine-tuned model directory says about its model.

    task: binary, multiclass or regression; labels: the label values in output order (binary:
    [negative, positive]; regression: []); pooling: token pooling into the head; label_key: the
    record metadata key it was trained on; channel_types: the channel types (0..12, I..V6, PPG)
    seen in training; modality: both, ecg or ppg; unit: what the head is given (UNITS);
    preprocess: the PreprocessConfig fields; csfm_version and format_version: what wrote it."""

    task: str
    labels: list[str]
    pooling: str
    label_key: str
    channel_types: list[int]
    modality: str = "both"
    unit: str = "window"
    preprocess: dict[str, Any] = field(default_factory=lambda: asdict(PreprocessConfig()))
    csfm_version: str = field(default_factory=lambda: importlib.metadata.version("csfm"))
    format_version: int = MODEL_DIR_VERSION

    def __post_init__(self) -> None:
        if self.task not in ONE_LABEL_TASKS:
            raise ValueError(f"task must be one of {ONE_LABEL_TASKS}, got {self.task!r}")
        check_token_pooling(self.pooling)
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        check_unit(self.unit)
        expected = {"binary": 2, "regression": 0}.get(self.task)
        if (expected is not None and len(self.labels) != expected) or (expected is None and len(self.labels) < 2):
            raise ValueError(f"a {self.task} model needs {expected if expected is not None else '>= 2'} labels, "
                             f"got {self.labels}")

    @property
    def lead_names(self) -> list[str]:
        return [CHANNEL_TYPE_NAMES[t] for t in self.channel_types]

    def preprocess_config(self) -> PreprocessConfig:
        values = dict(self.preprocess)
        for name in ("ecg_band", "ppg_band"):
            values[name] = tuple(values[name])
        return PreprocessConfig(**values)


def save_model_dir(directory: str | Path, model: EncoderWithHead, card: ModelCard) -> None:
    """Writes encoder + head weights and config.json ({"model": ModelConfig, "finetuned": card}),
    each atomically."""
    save_checkpoint(Path(directory), model, model.encoder.config, extra_config={"finetuned": asdict(card)})


def load_model_dir(directory: str | Path) -> tuple[EncoderWithHead, ModelCard]:
    """The model and card of a directory ``save_model_dir`` wrote; ValueError naming the file
    when it is a pretraining checkpoint, or was written by a csfm whose layout differs."""
    config_path = Path(directory) / "config.json"
    payload = read_config(directory)
    card_values = payload.get("finetuned")
    if not isinstance(card_values, dict):
        raise ValueError(f"{config_path}: no \"finetuned\" entry: this is a pretraining checkpoint, not a "
                         f"fine-tuned model (embed it with csfm.embed, or fine-tune it with csfm.finetune)")
    version = card_values.get("format_version")
    if version != MODEL_DIR_VERSION:
        writer = card_values.get("csfm_version", "an unknown version")
        raise ValueError(f"{config_path}: model directory layout {version!r} written by csfm {writer}; this csfm "
                         f"({importlib.metadata.version('csfm')}) reads layout {MODEL_DIR_VERSION}: use the "
                         f"csfm that wrote it")
    known = {f.name for f in fields(ModelCard)}
    unknown = sorted(set(card_values) - known)
    if unknown:
        raise ValueError(f"{config_path}: unknown \"finetuned\" fields {unknown}")
    try:
        card = ModelCard(**card_values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: bad \"finetuned\" entry: {exc}") from exc
    encoder = CSFMEncoder(ModelConfig.from_dict(payload["model"]))
    head = make_head(card.task, len(card.labels), pooled_width(encoder.config.dim, card.pooling))
    model = EncoderWithHead(encoder, head, card.pooling, card.unit)
    load_state_dict_checked(model, load_weights(directory), str(Path(directory) / "model.safetensors"))
    return model.eval(), card


def _outputs(out: torch.Tensor, task: str) -> np.ndarray:
    """Head outputs [N, K] -> P(class 1) [N] (binary), class probabilities [N, K] (multiclass)
    or values [N] (regression)."""
    if task == "binary":
        return torch.sigmoid(out.reshape(-1)).numpy()
    return torch.softmax(out, -1).numpy() if task == "multiclass" else out.reshape(-1).numpy()


def _in_batches(fn, samples: Sequence[Sample], batch_size: int) -> torch.Tensor:
    """fn (a Batch -> [B, ...] tensor) over ``samples`` collated ``batch_size`` at a time,
    concatenated: [N, ...]."""
    return torch.cat([fn(collate(samples[i:i + batch_size])) for i in range(0, len(samples), batch_size)])


@torch.no_grad()
def predict(model: EncoderWithHead, samples: Sequence[Sample], task: str, batch_size: int = 32) -> np.ndarray:
    """Per window: P(class 1) [N] (binary), class probabilities [N, K] (multiclass) or values [N] (regression)."""
    model.eval()
    return _outputs(_in_batches(model, samples, batch_size), task)


@torch.no_grad()
def predict_records(model: EncoderWithHead, windows: Sequence[RecordWindows], task: str,
                    batch_size: int = 32) -> np.ndarray:
    """Per record [N] or [N, K] (float64): the mean of its windows' ``predict`` outputs, or
    for a model of unit ``record`` the prediction of its mean window embedding."""
    model.eval()
    samples = [s for part in windows for s in part.samples()]
    owner = torch.tensor([r for r, part in enumerate(windows) for _ in range(len(part.x))], dtype=torch.int64)
    if model.unit == "record":
        embedded = _in_batches(model.embed, samples, batch_size)
        return _outputs(model.head(pool_by_owner(embedded, owner, len(windows))), task).astype(np.float64)
    per_window = torch.from_numpy(predict(model, samples, task, batch_size)).double()
    pooled = pool_by_owner(per_window.reshape(len(samples), -1), owner, len(windows)).numpy()
    return pooled if task == "multiclass" else pooled[:, 0]
