"""Losses of the downstream heads: asymmetric multi-label loss and Cox partial likelihood."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) for multi-label classification, mean over elements.

    logits, targets: [N, K]; targets in {0, 1}. With p = sigmoid(logits) and the shifted
    probability p_m = max(p - clip, 0):
    positives: -(1 - p)^gamma_pos log(p); negatives: -p_m^gamma_neg log(1 - p_m).
    gamma_neg = gamma_pos = clip = 0 gives binary cross-entropy with logits.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must have the shape of logits {tuple(logits.shape)}")
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    positive = (1 - p).pow(gamma_pos) * F.logsigmoid(logits)
    if clip > 0:
        p_neg = (p - clip).clamp(min=0)
        log_not_p = torch.log((1 - p_neg).clamp(min=clip))  # 1 - p_m >= clip: the log is finite
    else:
        p_neg, log_not_p = p, F.logsigmoid(-logits)
    negative = p_neg.pow(gamma_neg) * log_not_p
    return -(targets * positive + (1 - targets) * negative).mean()


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Breslow partial log-likelihood of a Cox model, averaged over events.

    risk: [N] log hazard ratios; time: [N] follow-up times; event: [N] bool (True = event,
    False = censored). The risk set of an event at time t is every sample with time >= t, so
    tied times share one risk set (Breslow). Uses an [N, N] mask: meant for batch-sized N.
    """
    for name, value in (("risk", risk), ("time", time), ("event", event)):
        if value.ndim != 1 or len(value) != len(risk):
            raise ValueError(f"{name} must be 1-D with the length of risk ({len(risk)}), got {tuple(value.shape)}")
    event = event.bool()
    if not event.any():
        raise ValueError("event has no True entry: the Cox partial likelihood needs at least one event")
    at_risk = time[None, :] >= time[:, None]  # [i, j]: j is in the risk set of i
    log_denominator = risk[None, :].masked_fill(~at_risk, float("-inf")).logsumexp(dim=1)
    return -(risk - log_denominator)[event].mean()
