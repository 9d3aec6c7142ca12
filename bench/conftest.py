"""Side-by-side timing harness shared by every bench suite, on CPU and, where present, CUDA.

A suite calls ``side_by_side(case, shape, baselines={...}, ours={...}, flops=..., device=...)``:
each variant runs on the same inputs. On CPU the variants are warmed up and timed in interleaved
rounds (so drift in the machine's speed hits all alike) and the median is kept; on CUDA each is
timed by ``triton.testing.do_bench`` (CUDA events, median). A baseline given as None (e.g. a
torch.compile that failed here, see bench/common.py) is listed as not run, with the reason in
the case's notes.

Tests that take a ``device`` argument run once per device: "cpu", and "cuda" (skipped without
a GPU); ``CSFM_BENCH_DEVICES=cuda`` (comma-separated) runs only those.

At the end of the session one table prints every case (variant, time, GFLOP/s where FLOPs are
given, ratio = best baseline / variant, > 1 means faster than the best baseline), then every
goal of bench/goals.py met or missed. With ``CSFM_BENCH_JSON=path`` each case is appended to
that file as one JSON line as soon as it is measured (a first line describes the machine), so
a run cut short keeps what it finished; bench/report.py turns the file into Markdown.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/goals.py, bench/common.py

from goals import GOALS, describe, judge  # noqa: E402

_RESULTS: list["CaseResult"] = []


@dataclass
class CaseResult:
    case: str
    shape: str
    baselines: dict[str, float | None]  # name -> median seconds (None: could not run here)
    ours: dict[str, float]
    flops: float | None = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def bench_devices() -> list[str]:
    """The devices bench tests run on: CSFM_BENCH_DEVICES, or cpu and cuda."""
    return [d for d in os.environ.get("CSFM_BENCH_DEVICES", "cpu,cuda").split(",") if d]


def pytest_generate_tests(metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [
            pytest.param(d, marks=[pytest.mark.skipif(d == "cuda" and not torch.cuda.is_available(),
                                                      reason="needs a CUDA device")]) for d in bench_devices()])


def environment() -> dict[str, Any]:
    """Versions and the machine, for the report's header."""
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))), cuda=torch.version.cuda)
    return info


def _time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


MIN_TIMED_S = 0.25  # each variant is timed for at least this long in all (fast cases: more rounds)
MAX_CASE_S = 4.0  # ... unless that would take a case longer than this


def time_variants(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    """CPU: median seconds per variant over interleaved rounds after ``warmup`` calls each:
    at least ``rounds``, more for millisecond cases (until the fastest variant has run for
    MIN_TIMED_S, within MAX_CASE_S per case), so a single slow call does not decide a median."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    estimate = {name: _time_once(fn) for name, fn in variants.items()}
    wanted = math.ceil(MIN_TIMED_S / max(min(estimate.values()), 1e-6))
    affordable = int(MAX_CASE_S / max(sum(estimate.values()), 1e-6))
    rounds = max(rounds, min(wanted, affordable))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_time_once(fn))
    return {name: statistics.median(times) for name, times in samples.items()}


def time_variants_cuda(variants: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """CUDA: median seconds per variant by triton.testing.do_bench (events; 25 ms warm-up, 100 ms of repeats)."""
    from triton.testing import do_bench

    return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3 for name, fn in variants.items()}


def _append_json(result: CaseResult) -> None:
    path = os.environ.get("CSFM_BENCH_JSON")
    if not path:
        return
    target = Path(path)
    first = not target.exists()
    with target.open("a") as f:
        if first:
            f.write(json.dumps({"environment": environment()}) + "\n")
        f.write(json.dumps(asdict(result)) + "\n")


@pytest.fixture
def side_by_side(benchmark):
    """Returns ``run(case, shape, baselines, ours, flops=None, rounds=5, warmup=1, device="cpu",
    notes=(), counts=None, roof_tflops=None)``. ``counts`` (e.g. {"tokens": n}) are per call of
    the first "ours" variant: the result's metrics get their rates ("tokens_per_s"), and with
    ``flops`` and ``roof_tflops`` (the same run's matmul roof) its MFU."""

    def run(case: str, shape: str, baselines: dict[str, Callable[[], Any] | None],
            ours: dict[str, Callable[[], Any]], flops: float | None = None, rounds: int = 5,
            warmup: int = 1, device: str = "cpu", notes: tuple[str, ...] = (),
            counts: dict[str, float] | None = None, roof_tflops: float | None = None) -> CaseResult:
        runnable = {k: v for k, v in {**baselines, **ours}.items() if v is not None}
        if device == "cuda":
            medians = time_variants_cuda(runnable)
        else:
            medians = time_variants(runnable, rounds, warmup)
        result = CaseResult(case, shape, {k: medians.get(k) for k in baselines},
                            {k: medians[k] for k in ours}, flops, device, list(notes))
        seconds = next(iter(result.ours.values()))
        result.metrics.update({f"{name}_per_s": n / seconds for name, n in (counts or {}).items()})
        if flops and roof_tflops:
            result.metrics.update(mfu=flops / seconds / 1e12 / roof_tflops, roof_tflops=roof_tflops)
        _RESULTS.append(result)
        # Give pytest-benchmark its own record of our first variant.
        first = next(iter(ours.values()))
        benchmark.pedantic(first, rounds=1, iterations=1, warmup_rounds=0)
        best = min(v for v in result.baselines.values() if v is not None)
        benchmark.extra_info.update({
            "case": case, "shape": shape, "device": device,
            **{f"baseline_{k}_s": v for k, v in result.baselines.items()},
            **{f"ours_{k}_s": v for k, v in result.ours.items()},
            **{f"ratio_{k}": best / v for k, v in result.ours.items()},
        })
        _append_json(result)
        return result

    return run


def _row(case: str, shape: str, kind: str, name: str, seconds: float | None, flops: float | None,
         best: float) -> str:
    if seconds is None:
        return f"{case:<40} {shape:<44} {kind:<8} {name:<28} {'not run':>10}"
    gflops = f"{flops / seconds / 1e9:9.1f}" if flops else "        -"
    return (f"{case:<40} {shape:<44} {kind:<8} {name:<28} {seconds * 1e3:10.3f} {gflops} "
            f"{best / seconds:7.2f}x")


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("csfm side-by-side (ratio = best baseline time / variant time)")
    env = environment()
    tr.write_line(", ".join(f"{k} {v}" for k, v in env.items()))
    tr.write_line(f"{'case':<40} {'shape':<44} {'kind':<8} {'variant':<28} {'ms':>10} {'GFLOP/s':>9} {'ratio':>8}")
    for res in _RESULTS:
        best = min(v for v in res.baselines.values() if v is not None)
        label = f"[{res.device}] {res.case}"
        for name, sec in res.baselines.items():
            tr.write_line(_row(label, res.shape, "baseline", name, sec, res.flops, best))
        for name, sec in res.ours.items():
            tr.write_line(_row(label, res.shape, "ours", name, sec, res.flops, best))
        for note in [*res.notes, *(f"{k} = {v:.4g}" for k, v in res.metrics.items())]:
            tr.write_line(f"{'':<40} note: {note}")
    tr.section("csfm goals (bench/goals.py), each figure from this one run")
    for goal in GOALS:
        for res in (r for r in _RESULTS if r.case == goal.case and r.device == goal.device):
            verdict = judge(goal, asdict(res))
            if verdict["met"] is None:
                continue
            ratio = f"{verdict['ratio']:.2f}x {verdict['versus']}" if verdict["ratio"] is not None else "no ratio"
            metric = "" if verdict["metric"] is None else f", {goal.min_metric[0]} {verdict['metric']:.3f}"
            tr.write_line(f"[{goal.device}] {goal.case:<38} {goal.ours}: {verdict['ours_ms']:.3f} ms, {ratio}"
                          f"{metric} | goal {describe(goal)}: {'MET' if verdict['met'] else 'MISSED'}")
