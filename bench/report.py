"""Markdown report of one device run (bench/gpu.sh): the machine, the GPU tests, issue #10's goal
tables and every bench case, from the bench's JSON lines and pytest's JUnit XML.

    python bench/report.py --bench bench.jsonl --tests gpu-tests.xml --phase install=41 --out report.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # bench/goals.py when run as a script

from goals import CUDA_ATTENTION, GOALS, Goal, describe, judge  # noqa: E402


def read_bench(path: Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench/conftest.py's JSON lines -> (environment, case results); nothing if the file is absent."""
    if path is None or not path.is_file():
        return {}, []
    env, results = {}, []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "environment" in record:
            env = record["environment"]
        else:
            results.append(record)
    return env, results


def read_junit(path: Path | None) -> dict[str, Any] | None:
    """pytest's JUnit XML -> {passed, failed, skipped, failures: [(test, first line)], skips}."""
    if path is None or not path.is_file():
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": {}}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            counts["failures"].append((name, (bad.get("message") or bad.text or "").strip().splitlines()[0][:200]
                                       if (bad.get("message") or bad.text) else ""))
        elif skip is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "").strip()[:120]
            counts["skips"][reason] = counts["skips"].get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _find(results: list[dict[str, Any]], device: str, case: str) -> dict[str, Any] | None:
    found = [r for r in results if r["device"] == device and r["case"] == case]
    return found[-1] if found else None


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**missed**")


def goal_rows(results: list[dict[str, Any]], device: str) -> list[str]:
    """One Markdown table row per goal of ``device``: PyTorch's best here, ours, the goal, met?"""
    rows = []
    for goal in (g for g in GOALS if g.device == device):
        result = _find(results, device, goal.case)
        if result is None:
            rows.append(f"| {goal.case} | - | - | {_quoted(goal)} | {describe(goal)} | - | - | not measured |")
            continue
        verdict = judge(goal, result)
        baselines = {k: v for k, v in result["baselines"].items() if v is not None}
        best = min(baselines, key=baselines.get) if baselines else None
        ratio = "-" if verdict["ratio"] is None else f"{verdict['ratio']:.2f}x {verdict['versus']}"
        metric = "" if verdict["metric"] is None else f", {goal.min_metric[0]} {verdict['metric']:.3f}"
        rows.append(f"| {goal.case} | {best or '-'} | {_ms(baselines.get(best))} | {_quoted(goal)} | "
                    f"{describe(goal)} | {_ms(result['ours'].get(goal.ours))} | {ratio}{metric} | "
                    f"{_verdict(verdict['met'])} |")
    return rows


def _quoted(goal: Goal) -> str:
    return "-" if goal.quoted is None else f"{goal.quoted[0]}: {goal.quoted[1]:g} ms"


def case_rows(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        known = [v for v in r["baselines"].values() if v is not None]
        best = min(known) if known else None
        for kind, variants in (("baseline", r["baselines"]), ("ours", r["ours"])):
            for name, seconds in variants.items():
                rate = f"{r['flops'] / seconds / 1e9:.1f}" if r.get("flops") and seconds else "-"
                ratio = f"{best / seconds:.2f}x" if best and seconds else "-"
                rows.append(f"| {r['device']} | {r['case']} | {r['shape']} | {kind} | {name} | {_ms(seconds)} | "
                            f"{rate} | {ratio} |")
    return rows


def render(env: dict[str, Any], results: list[dict[str, Any]], tests: dict[str, Any] | None,
           phases: dict[str, float], title: str) -> str:
    """The whole report as Markdown."""
    lines = [f"# {title}", ""]
    if env:
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
    if phases:
        total = sum(phases.values())
        lines.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
                     + f" (total {total / 60:.1f} min).")
    lines += ["", "## GPU tests (`pytest -m gpu`)", ""]
    if tests is None:
        lines.append("No test results (the test phase did not run or was cut short before writing them).")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped.")
        for name, message in tests["failures"]:
            lines.append(f"- FAILED `{name}`: {message}")
        for reason, n in tests["skips"].items():
            lines.append(f"- skipped x{n}: {reason}")
    header = ["| case | PyTorch's best here | its ms | issue #10's best (H200) | goal | ours ms | ours vs | met |",
              "|---|---|---|---|---|---|---|---|"]
    for device, heading in (("cuda", "Issue #10 goals on this device (bf16 attention, 8 heads x 64; "
                                     "forward + backward unless the case says fwd)"),
                            ("cpu", "CPU goals (issue #15 item 7), this run")):
        if any(r["device"] == device for r in results) or device == "cuda":
            lines += ["", f"## {heading}", "", *header, *goal_rows(results, device)]
    attention_cases = ", ".join(CUDA_ATTENTION)
    lines += ["", f"Attention cases: {attention_cases} (lengths in bench/test_attention.py).", "",
              "## Every case", "", "| device | case | shape | kind | variant | ms | GFLOP/s | ratio to best baseline |",
              "|---|---|---|---|---|---|---|---|", *case_rows(results)]
    notes = [(r["device"], r["case"], n) for r in results for n in r.get("notes", [])]
    notes += [(r["device"], r["case"], f"{k} = {v:.4g}") for r in results for k, v in r.get("metrics", {}).items()]
    if notes:
        lines += ["", "## Notes", "", *(f"- [{d}] {c}: {n}" for d, c, n in notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, help="bench JSON lines (CSFM_BENCH_JSON of the bench run)")
    parser.add_argument("--tests", type=Path, help="JUnit XML of the GPU test run")
    parser.add_argument("--phase", action="append", default=[], metavar="NAME=SECONDS",
                        help="wall time of a phase of the run, repeatable")
    parser.add_argument("--title", default=None, help="report title (default: device and date)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    args = parser.parse_args(argv)
    phases = {}
    for item in args.phase:
        name, _, seconds = item.partition("=")
        try:
            phases[name] = float(seconds)
        except ValueError:
            parser.error(f"--phase {item!r}: expected NAME=SECONDS")
    env, results = read_bench(args.bench)
    title = args.title or f"Device run: {env.get('gpu', 'no GPU')}, {dt.date.today().isoformat()}"
    args.out.write_text(render(env, results, read_junit(args.tests), phases, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
