"""The speed goals the bench cases are judged by, in one place (read by bench/conftest.py's
summary and by bench/report.py's Markdown report).

CPU (issue #15 item 7): the fused C++ patch embedding and masking at least 1.5x the best
PyTorch baseline of the same run (eager reference, vectorised eager, torch.compile of it),
forward + backward; attention never below 0.95x the best baseline.

Data (issue #18): prepared shards at least 20x the windows per loader worker of reading on the
fly, and 10,000 twelve-lead windows/s per core; one 10 s window through preprocess_signal at
least 30x the published style (scipy FFT resample + neurokit2 clean + z-score per channel).

CUDA (issue #10, bf16 attention with 8 heads x 64; figures measured on an H200 with
triton.testing.do_bench medians): absolute times for our path, with the PyTorch best and its
time quoted there, and never slower than the best baseline of the same run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Goal:
    """One goal: ``ours`` of ``case`` on ``device`` must reach ``min_ratio`` (best baseline time,
    or the time of baseline ``versus``, over ours) and/or take at most ``max_ms``, and/or reach
    ``min_metric`` (name, value) in the case's metrics. ``quoted``: issue #10's PyTorch best and
    its time in ms, for the report."""

    device: str
    case: str
    ours: str = "ours (auto)"
    min_ratio: float | None = None
    versus: str | None = None
    max_ms: float | None = None
    min_metric: tuple[str, float] | None = None
    quoted: tuple[str, float] | None = None


CPU_ATTENTION_CASES = ("mixed16", "uniform64", "ecgtext4")
CUDA_ATTENTION = {  # case -> (issue #10's PyTorch best, its ms, our goal in ms), forward + backward
    "mixed16": ("varlen_attn", 0.425, 0.30),
    "mixed128": ("length buckets", 1.67, 1.40),
    "uniform64": ("padded SDPA, no mask", 0.088, 0.09),
    "ecgtext4": ("padded SDPA, no mask", 0.250, 0.25),
    "masked75": ("varlen_attn", 0.654, 0.40),
}

GOALS: list[Goal] = [
    Goal("cpu", "patch_embed fwd+bwd", min_ratio=1.5),
    Goal("cpu", "mask gather+scatter fwd+bwd padded", min_ratio=1.5),
    Goal("cpu", "mask gather+scatter fwd+bwd packed", min_ratio=1.5),
    *(Goal("cpu", f"attention {case} {mode}", min_ratio=0.95)
      for case in CPU_ATTENTION_CASES for mode in ("fwd", "fwd+bwd")),
    *(Goal("cuda", f"attention {case} fwd+bwd", min_ratio=1.0, max_ms=goal, quoted=(best, ms))
      for case, (best, ms, goal) in CUDA_ATTENTION.items()),
    Goal("cuda", "attention mixed128 fwd", min_ratio=0.9, versus="torch varlen_attn"),
    Goal("cuda", "patch_embed fwd", max_ms=0.025, quoted=("torch.compile", 0.052)),
    Goal("cuda", "patch_embed fwd+bwd", min_ratio=1.0, max_ms=0.20, quoted=("torch.compile", 1.261)),
    Goal("cuda", "mask gather+scatter fwd+bwd padded", min_ratio=1.0, max_ms=0.12, quoted=("eager", 0.475)),
    Goal("cuda", "tiny encoder train step mixed128", max_ms=32.0, min_ratio=2.0, versus="padded SDPA model",
         min_metric=("mfu", 0.35)),
    # issue #18: prepared shards per loader worker vs reading on the fly, and 12-lead windows per core
    *(Goal("cpu", f"loader {case}", ours="prepared shards", min_ratio=20.0, min_metric=("windows_per_s", 10_000.0))
      for case in ("wfdb_12lead_500Hz", "code15_12lead_400Hz")),
    Goal("cpu", "loader mimic3_multisegment_125Hz", ours="prepared shards", min_ratio=20.0),
    # issue #18: one 10 s window at least 30x the published preprocessing style
    *(Goal("cpu", f"window {case}", ours="numba preprocess_signal", min_ratio=30.0)
      for case in ("cinc2017_1lead_300Hz", "mitdb_2lead_360Hz", "challenge2015_2ecg_ppg_250Hz", "ptb_12lead_1000Hz")),
    # the same, windows batched per call (16 windows of a record stacked as channels)
    *(Goal("cpu", f"windows x16 {case}", ours="numba preprocess_signal, windows stacked", min_ratio=30.0)
      for case in ("cinc2017_1lead_300Hz", "mitdb_2lead_360Hz", "challenge2015_2ecg_ppg_250Hz", "ptb_12lead_1000Hz")),
]


def judge(goal: Goal, result: dict[str, Any]) -> dict[str, Any]:
    """A result record (bench/conftest.py's JSON) against ``goal`` -> {ours_ms, ratio, versus,
    metric, met: bool | None (None: the variant was not measured)}."""
    ours = result["ours"].get(goal.ours)
    baselines = {k: v for k, v in result["baselines"].items() if v is not None}
    if ours is None or not baselines:
        return {"ours_ms": None, "ratio": None, "versus": goal.versus, "metric": None, "met": None}
    if goal.versus is not None:
        versus = goal.versus if goal.versus in baselines else None
    else:
        versus = min(baselines, key=baselines.get)
    ratio = baselines[versus] / ours if versus is not None else None
    metric = result.get("metrics", {}).get(goal.min_metric[0]) if goal.min_metric else None
    checks = []
    if goal.min_ratio is not None:
        checks.append(ratio is not None and ratio >= goal.min_ratio)
    if goal.max_ms is not None:
        checks.append(ours * 1e3 <= goal.max_ms)
    if goal.min_metric is not None:
        checks.append(metric is not None and metric >= goal.min_metric[1])
    return {"ours_ms": ours * 1e3, "ratio": ratio, "versus": versus, "metric": metric, "met": all(checks)}


def describe(goal: Goal) -> str:
    """The goal in words: ">= 1.5x the best baseline, <= 0.30 ms"."""
    parts = []
    if goal.min_ratio is not None:
        parts.append(f">= {goal.min_ratio:g}x {goal.versus or 'the best baseline'}")
    if goal.max_ms is not None:
        parts.append(f"<= {goal.max_ms:g} ms")
    if goal.min_metric is not None:
        parts.append(f"{goal.min_metric[0]} >= {goal.min_metric[1]:g}")
    return ", ".join(parts)
