"""Full fine-tuning of the encoder with a task head (DESIGN.md §3).

AdamW with layer-wise lr decay (0.75 per layer from the head down), no weight decay on
norms, biases, embeddings and the CLS token, 10 % linear warmup then linear decay, and
early stopping on the validation loss (the best weights are restored at the end).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from csfm.batch import Batch
from csfm.data import Sample, collate
from csfm.heads import head_loss
from csfm.model import CSFMEncoder
from csfm.optim import layerwise_param_groups, warmup_linear


@dataclass
class FineTuneConfig:
    """epochs: at most this many passes; patience: epochs without a better validation loss
    before stopping; layer_decay: lr factor per encoder layer below the head."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    patience: int = 3
    pooling: str = "cls"
    seed: int = 0


@dataclass
class FineTuneResult:
    """best_epoch (0-based) and best_val_loss of the restored weights; per-epoch losses."""

    best_epoch: int
    best_val_loss: float
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


class EncoderWithHead(nn.Module):
    """Encoder -> pooled embedding (CLS or mean) -> head: Batch -> head output."""

    def __init__(self, encoder: CSFMEncoder, head: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder, self.head, self.pooling = encoder, head, pooling

    def forward(self, batch: Batch) -> torch.Tensor:
        out = self.encoder(batch)
        return self.head(out.cls if self.pooling == "cls" else out.mean)


def _batches(samples: Sequence[Sample], batch_size: int, rng: np.random.Generator | None) -> list[list[int]]:
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    return [order[i:i + batch_size].tolist() for i in range(0, len(samples), batch_size)]


def _loss_of(model: EncoderWithHead, samples: Sequence[Sample], rows: list[int], task: str,
             target_of: Callable[[Sequence[Sample]], object], **loss_kw) -> torch.Tensor:
    chosen = [samples[i] for i in rows]
    return head_loss(task, model(collate(chosen)), target_of(chosen), **loss_kw)


def finetune(encoder: CSFMEncoder, head: nn.Module, task: str, train: Sequence[Sample], val: Sequence[Sample],
             target_of: Callable[[Sequence[Sample]], object], config: FineTuneConfig | None = None,
             progress: bool = True, **loss_kw) -> tuple[EncoderWithHead, FineTuneResult]:
    """Fine-tunes ``encoder`` + ``head`` on ``train`` samples (windows with metadata);
    ``target_of(samples)`` gives the targets head_loss expects for ``task``. Returns the
    model with the weights of its best validation epoch."""
    config = config or FineTuneConfig()
    if not train or not val:
        raise ValueError(f"fine-tuning needs training and validation samples, got {len(train)} and {len(val)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = EncoderWithHead(encoder, head, config.pooling)
    optimizer = torch.optim.AdamW(layerwise_param_groups(encoder, head, encoder.config.depth, config.lr,
                                                         config.weight_decay, config.layer_decay),
                                  betas=(0.9, 0.999))
    steps_per_epoch = len(_batches(train, config.batch_size, None))
    total = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear(s, total, max(1, int(config.warmup_fraction * total))))
    result, best_state, stale = FineTuneResult(-1, float("inf")), None, 0
    for epoch in tqdm(range(config.epochs), disable=not progress, desc="fine-tuning", unit="epoch"):
        model.train()
        losses = []
        for rows in _batches(train, config.batch_size, rng):
            loss = _loss_of(model, train, rows, task, target_of, **loss_kw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        result.train_loss.append(float(np.mean(losses)))
        result.val_loss.append(_validation_loss(model, val, config.batch_size, task, target_of, **loss_kw))
        if result.val_loss[-1] < result.best_val_loss:
            result.best_epoch, result.best_val_loss, stale = epoch, result.val_loss[-1], 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    return model, result


@torch.no_grad()
def _validation_loss(model: EncoderWithHead, samples: Sequence[Sample], batch_size: int, task: str,
                     target_of, **loss_kw) -> float:
    """Mean loss over ``samples``, weighted by batch size."""
    model.eval()
    total = 0.0
    for rows in _batches(samples, batch_size, None):
        total += _loss_of(model, samples, rows, task, target_of, **loss_kw).item() * len(rows)
    return total / len(samples)
