"""Side-by-side timing harness shared by every bench suite.

A suite calls ``side_by_side(case, shape, baselines={...}, ours={...}, flops=...)``: each
variant runs on the same inputs, warmed up, timed in interleaved rounds (so drift in the
machine's speed hits all alike), and the median is kept. At the end of the session one
table prints every case: variant, time, GFLOP/s where FLOPs are given, and the ratio
best-baseline / variant (> 1 means faster than the best baseline).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

_RESULTS: list["CaseResult"] = []


@dataclass
class CaseResult:
    case: str
    shape: str
    baselines: dict[str, float]  # name -> median seconds
    ours: dict[str, float]
    flops: float | None = None
    notes: list[str] = field(default_factory=list)


def _time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_variants(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per variant over ``rounds`` interleaved rounds after ``warmup`` calls each."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_time_once(fn))
    return {name: statistics.median(times) for name, times in samples.items()}


@pytest.fixture
def side_by_side(benchmark):
    """Returns ``run(case, shape, baselines, ours, flops=None, rounds=5, warmup=1)``."""

    def run(case: str, shape: str, baselines: dict[str, Callable[[], Any]],
            ours: dict[str, Callable[[], Any]], flops: float | None = None,
            rounds: int = 5, warmup: int = 1) -> CaseResult:
        medians = time_variants({**baselines, **ours}, rounds, warmup)
        result = CaseResult(case, shape, {k: medians[k] for k in baselines},
                            {k: medians[k] for k in ours}, flops)
        _RESULTS.append(result)
        # Give pytest-benchmark its own record of our first variant.
        first = next(iter(ours.values()))
        benchmark.pedantic(first, rounds=max(1, rounds // 2), iterations=1, warmup_rounds=0)
        best = min(result.baselines.values())
        benchmark.extra_info.update({
            "case": case, "shape": shape,
            **{f"baseline_{k}_s": v for k, v in result.baselines.items()},
            **{f"ours_{k}_s": v for k, v in result.ours.items()},
            **{f"ratio_{k}": best / v for k, v in result.ours.items()},
        })
        return result

    return run


def _row(case: str, shape: str, kind: str, name: str, seconds: float, flops: float | None,
         best: float) -> str:
    gflops = f"{flops / seconds / 1e9:9.1f}" if flops else "        -"
    return f"{case:<28} {shape:<40} {kind:<8} {name:<26} {seconds * 1e3:10.3f} {gflops} {best / seconds:7.2f}x"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("csfm side-by-side (ratio = best baseline time / variant time)")
    tr.write_line(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
                  f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    tr.write_line(f"{'case':<28} {'shape':<40} {'kind':<8} {'variant':<26} {'ms':>10} {'GFLOP/s':>9} {'ratio':>8}")
    for res in _RESULTS:
        best = min(res.baselines.values())
        for name, sec in res.baselines.items():
            tr.write_line(_row(res.case, res.shape, "baseline", name, sec, res.flops, best))
        for name, sec in res.ours.items():
            tr.write_line(_row(res.case, res.shape, "ours", name, sec, res.flops, best))
        for note in res.notes:
            tr.write_line(f"{'':<28} note: {note}")
