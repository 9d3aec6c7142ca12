"""Downstream heads over a pooled record embedding x: [N, d] float32, and their losses.

Tasks of :func:`head_loss`: every one of :data:`csfm.tasks.TASKS`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from csfm.model.losses import asymmetric_loss, cox_partial_likelihood
from csfm.tasks import TASKS


def _check_embedding(x: torch.Tensor, d: int) -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must be [N, {d}], got {tuple(x.shape)}")


class _LinearHead(nn.Module):
    """[optional LayerNorm] -> [optional Dropout] -> Linear(d, n_out): x [N, d] -> [N, n_out]."""

    def __init__(self, d: int, n_out: int, dropout: float = 0.0, layer_norm: bool = False):
        super().__init__()
        self.d = d
        self.net = nn.Sequential(nn.LayerNorm(d) if layer_norm else nn.Identity(),
                                 nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(d, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_embedding(x, self.d)
        return self.net(x)


class ClassificationHead(_LinearHead):
    """Class logits: x [N, d] -> [N, n_classes]. ``multilabel`` marks independent sigmoid
    outputs (loss "multilabel"); otherwise softmax classes (loss "multiclass"). For a binary
    task use n_classes=1 and the loss "binary"."""

    def __init__(self, d: int, n_classes: int, multilabel: bool = False, dropout: float = 0.0,
                 layer_norm: bool = False):
        super().__init__(d, n_classes, dropout, layer_norm)
        self.multilabel = multilabel

    @property
    def task(self) -> str:
        """The :func:`head_loss` task of this head's logits."""
        if self.multilabel:
            return "multilabel"
        return "binary" if self.net[-1].out_features == 1 else "multiclass"


class RegressionHead(_LinearHead):
    """Regression values: x [N, d] -> [N, n_targets]."""

    def __init__(self, d: int, n_targets: int = 1, dropout: float = 0.0, layer_norm: bool = False):
        super().__init__(d, n_targets, dropout, layer_norm)


class SurvivalHead(_LinearHead):
    """Cox risk score (log hazard ratio): x [N, d] -> [N]."""

    def __init__(self, d: int, dropout: float = 0.0, layer_norm: bool = False):
        super().__init__(d, 1, dropout, layer_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)


class QuestionAnsweringHead(nn.Module):
    """ECG-QA style answer classifier over a fixed answer set.

    x: [N, d] signal embedding; question: [N, M] int64 token ids padded with 0, or a list of
    N 1-D token-id sequences (padded here). Tokens past ``max_question_tokens`` are dropped.
    The non-padding token embeddings are mean-pooled, concatenated with x and passed through
    an MLP: -> answer logits [N, n_answers] (loss "multiclass", or "multilabel" for questions
    with several answers).
    """

    def __init__(self, d: int, vocab_size: int, n_answers: int, max_question_tokens: int = 64,
                 token_dim: int = 128, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.d, self.vocab_size, self.max_question_tokens = d, vocab_size, max_question_tokens
        self.tokens = nn.Embedding(vocab_size, token_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(d + token_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_answers))

    def forward(self, x: torch.Tensor, question: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        _check_embedding(x, self.d)
        ids = self._question_ids(question, x.device)
        if len(ids) != len(x):
            raise ValueError(f"question has {len(ids)} rows but x has {len(x)}")
        present = (ids != 0).unsqueeze(-1).to(x.dtype)  # [N, M, 1]
        pooled = (self.tokens(ids) * present).sum(1) / present.sum(1).clamp(min=1)
        return self.mlp(torch.cat([x, pooled.to(x.dtype)], dim=1))

    def _question_ids(self, question, device: torch.device) -> torch.Tensor:
        """[N, M'] int64 on ``device``, M' <= max_question_tokens; packed lists zero-padded."""
        if not isinstance(question, torch.Tensor):
            rows = [torch.as_tensor(q, dtype=torch.long).reshape(-1) for q in question]
            question = nn.utils.rnn.pad_sequence(rows, batch_first=True) if rows else torch.zeros(0, 1, dtype=torch.long)
        if question.ndim != 2 or question.dtype.is_floating_point:
            raise ValueError(f"question must be [N, M] integer token ids, got {tuple(question.shape)} "
                             f"{question.dtype}")
        question = question[:, :self.max_question_tokens].long().to(device)
        if question.numel() and (question.min() < 0 or question.max() >= self.vocab_size):
            raise ValueError(f"question token ids must lie in [0, {self.vocab_size}), got "
                             f"[{int(question.min())}, {int(question.max())}]")
        return question


def head_loss(task: str, output: torch.Tensor, target, *, asymmetric: bool = False, ignore_nan: bool = False,
              class_weight: torch.Tensor | None = None, **asymmetric_kwargs) -> torch.Tensor:
    """Scalar loss of a head's ``output`` for ``task``.

    - "multiclass": output [N, K] logits, target [N] int64 class indices -> cross-entropy,
      each class weighted by ``class_weight`` [K] when given (the weighted mean over rows).
    - "multilabel": output [N, K] logits, target [N, K] in {0, 1} -> BCE with logits, or the
      asymmetric loss with ``asymmetric=True`` (``asymmetric_kwargs``: gamma_neg, gamma_pos, clip).
    - "binary": output [N] or [N, 1] logits, target [N] in {0, 1} -> BCE with logits.
    - "regression": output [N, T] (or [N]), target of the same elements -> MSE. NaN targets
      raise a ValueError unless ``ignore_nan=True``, which averages over the labelled ones.
    - "survival": output [N] risk, target (time [N], event [N] bool) -> Cox partial likelihood.
    """
    if task == "multiclass":
        if output.ndim != 2 or target.shape != (len(output),):
            raise ValueError(f"multiclass: output must be [N, K] and target [N], got {tuple(output.shape)} "
                             f"and {tuple(target.shape)}")
        if class_weight is not None and class_weight.shape != (output.shape[1],):
            raise ValueError(f"multiclass: class_weight must be [{output.shape[1]}], got {tuple(class_weight.shape)}")
        return F.cross_entropy(output, target.long(),
                               weight=None if class_weight is None else class_weight.to(output))
    if task == "multilabel":
        target = _like(output, target)
        if asymmetric:
            return asymmetric_loss(output, target, **asymmetric_kwargs)
        return F.binary_cross_entropy_with_logits(output, target)
    if task == "binary":
        output = output.reshape(-1) if output.ndim == 2 and output.shape[1] == 1 else output
        return F.binary_cross_entropy_with_logits(output, _like(output, target))
    if task == "regression":
        return _masked_mse(output, _like(output, target), ignore_nan)
    if task == "survival":
        time, event = target
        return cox_partial_likelihood(output.reshape(-1) if output.ndim == 2 else output, time, event)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _like(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` as a float tensor of ``output``'s shape ([N] and [N, 1] are interchangeable)."""
    target = torch.as_tensor(target, device=output.device)
    column_or_vector = {tuple(target.shape), tuple(output.shape)} == {(len(output),), (len(output), 1)}
    if target.shape != output.shape and not column_or_vector:
        raise ValueError(f"target {tuple(target.shape)} does not match output {tuple(output.shape)}")
    return target.reshape(output.shape).to(output.dtype)


def _masked_mse(output: torch.Tensor, target: torch.Tensor, ignore_nan: bool) -> torch.Tensor:
    labelled = ~torch.isnan(target)
    if labelled.all():
        return F.mse_loss(output, target)
    if not ignore_nan:
        raise ValueError(f"target has {int((~labelled).sum())} NaN value(s); pass ignore_nan=True to mask them")
    if not labelled.any():
        raise ValueError("target is NaN everywhere: nothing to regress on")
    return F.mse_loss(output[labelled], target[labelled])
