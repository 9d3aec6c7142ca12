"""csfm.model.losses and csfm.model.heads: losses against hand / brute-force computation, head shapes,
gradients, head_loss dispatch, NaN handling and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from csfm.model.heads import (ClassificationHead, QuestionAnsweringHead, RegressionHead, SurvivalHead, head_loss)
from csfm.model.losses import asymmetric_loss, cox_partial_likelihood


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_asymmetric_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.5]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    gamma_neg, gamma_pos, clip = 4, 1, 0.05
    terms = []
    for x, y in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = _sigmoid(x)
        if y == 1:
            terms.append(-(1 - p) ** gamma_pos * math.log(p))
        else:
            shifted = max(p - clip, 0.0)
            terms.append(-shifted ** gamma_neg * math.log(1 - shifted))
    expected = sum(terms) / len(terms)
    got = asymmetric_loss(logits, targets, gamma_neg, gamma_pos, clip)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_asymmetric_loss_without_focusing_or_clip_is_bce():
    logits, targets = torch.randn(6, 5) * 3, (torch.rand(6, 5) > 0.5).float()
    torch.testing.assert_close(asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0),
                               F.binary_cross_entropy_with_logits(logits, targets))


def test_asymmetric_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([[-100.0, 100.0]], requires_grad=True)
    loss = asymmetric_loss(logits, torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def _cox_brute_force(risk, time, event) -> float:
    total, n_events = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            denominator = sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i])
            total += risk[i] - math.log(denominator)
            n_events += 1
    return -total / n_events


def test_cox_partial_likelihood_matches_brute_force_with_ties():
    generator = torch.Generator().manual_seed(0)
    risk = torch.randn(12, generator=generator, dtype=torch.float64)
    time = torch.tensor([5, 3, 3, 8, 1, 5, 9, 2, 3, 7, 7, 4], dtype=torch.float64)
    event = torch.tensor([1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    expected = _cox_brute_force(risk.tolist(), time.tolist(), event.tolist())
    assert cox_partial_likelihood(risk, time, event).item() == pytest.approx(expected, rel=1e-12)


def test_cox_without_events_or_with_bad_shapes_raises():
    with pytest.raises(ValueError, match="event"):
        cox_partial_likelihood(torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="time"):
        cox_partial_likelihood(torch.zeros(3), torch.ones(4), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("head, shape", [
    (ClassificationHead(16, 4, multilabel=False), (5, 4)),
    (ClassificationHead(16, 3, multilabel=True, dropout=0.2, layer_norm=True), (5, 3)),
    (RegressionHead(16, 2, layer_norm=True), (5, 2)),
    (SurvivalHead(16, dropout=0.1), (5,)),
])
def test_linear_heads_shapes_and_gradients(head, shape):
    x = torch.randn(5, 16, requires_grad=True)
    out = head(x)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in head.parameters())


def test_classification_head_names_its_loss_task():
    assert [ClassificationHead(8, k, multilabel=m).task for k, m in ((1, False), (4, False), (4, True))] == [
        "binary", "multiclass", "multilabel"]


def test_heads_reject_bad_embedding_shapes():
    with pytest.raises(ValueError, match="x must be"):
        ClassificationHead(16, 2)(torch.randn(5, 8))
    with pytest.raises(ValueError, match="x must be"):
        SurvivalHead(16)(torch.randn(16))


def test_head_loss_dispatch():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    torch.testing.assert_close(head_loss("multiclass", logits, labels), F.cross_entropy(logits, labels))
    multi = (torch.rand(6, 3) > 0.5).float()
    torch.testing.assert_close(head_loss("multilabel", logits, multi), F.binary_cross_entropy_with_logits(logits, multi))
    torch.testing.assert_close(head_loss("multilabel", logits, multi, asymmetric=True, gamma_neg=2),
                               asymmetric_loss(logits, multi, gamma_neg=2))
    binary = torch.tensor([1.0, 0, 0, 1, 1, 0])
    torch.testing.assert_close(head_loss("binary", logits[:, :1], binary),
                               F.binary_cross_entropy_with_logits(logits[:, 0], binary))
    values = torch.randn(6, 3)
    torch.testing.assert_close(head_loss("regression", logits, values), F.mse_loss(logits, values))
    time, event = torch.rand(6), torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(head_loss("survival", logits[:, 0], (time, event)),
                               cox_partial_likelihood(logits[:, 0], time, event))


def test_head_loss_regression_nan_targets():
    output = torch.tensor([[1.0], [2.0], [3.0]])
    target = torch.tensor([1.5, float("nan"), 2.0])
    with pytest.raises(ValueError, match="target has 1 NaN"):
        head_loss("regression", output, target)
    masked = head_loss("regression", output, target, ignore_nan=True)
    assert masked.item() == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ValueError, match="NaN everywhere"):
        head_loss("regression", output, torch.full((3,), float("nan")), ignore_nan=True)


def test_head_loss_bad_input():
    with pytest.raises(ValueError, match="task must be"):
        head_loss("ranking", torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="target"):
        head_loss("multilabel", torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="multiclass"):
        head_loss("multiclass", torch.zeros(4, 3), torch.zeros(4, 3))


def test_question_answering_head_shapes_padding_and_loss():
    head = QuestionAnsweringHead(d=16, vocab_size=50, n_answers=7, max_question_tokens=8).eval()
    x = torch.randn(3, 16)
    packed = [[5, 9, 2], [7], [3, 3, 3, 3, 4]]
    padded = torch.tensor([[5, 9, 2, 0, 0], [7, 0, 0, 0, 0], [3, 3, 3, 3, 4]])
    logits = head(x, packed)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(logits, head(x, padded))
    torch.testing.assert_close(logits, head(x, torch.cat([padded, torch.zeros(3, 20, dtype=torch.long)], 1)))
    loss = head_loss("multiclass", head.train()(x, padded), torch.tensor([0, 6, 3]))
    loss.backward()
    assert head.tokens.weight.grad is not None and head.tokens.weight.grad[0].abs().sum() == 0


def test_question_answering_head_bad_input():
    head = QuestionAnsweringHead(d=16, vocab_size=50, n_answers=7)
    with pytest.raises(ValueError, match="question token ids"):
        head(torch.randn(2, 16), torch.tensor([[1, 50], [2, 0]]))
    with pytest.raises(ValueError, match="question has 1 rows"):
        head(torch.randn(2, 16), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="question must be"):
        head(torch.randn(2, 16), torch.randn(2, 3))


def test_class_weighted_cross_entropy_is_the_weighted_mean_over_rows():
    torch.manual_seed(0)
    logits, target = torch.randn(7, 4), torch.tensor([0, 0, 0, 1, 2, 3, 3])
    weight = torch.tensor([0.5, 2.0, 1.0, 4.0])
    per_row = F.cross_entropy(logits, target, reduction="none")
    expected = (weight[target] * per_row).sum() / weight[target].sum()
    assert torch.allclose(head_loss("multiclass", logits, target, class_weight=weight), expected)
    assert torch.allclose(head_loss("multiclass", logits, target, class_weight=torch.ones(4)), per_row.mean())
    with pytest.raises(ValueError, match="class_weight must be \\[4\\]"):
        head_loss("multiclass", logits, target, class_weight=torch.ones(3))
