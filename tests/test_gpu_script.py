"""bench/gpu.sh and its report writer, everything but the GPU: the Markdown report from bench
results and JUnit XML (goals met, missed and not measured), and the script's dry run on CPU."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402  bench/report.py

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.kernels.test_masking" name="test_compiled_on_cuda_matches_reference[auto-padded-fp32]"/>
<testcase classname="tests.test_model" name="test_encoder_forward_has_no_host_sync_on_cuda[fp32]">
  <failure message="RuntimeError: called a synchronizing CUDA operation">trace</failure></testcase>
<testcase classname="tests.kernels.test_varlen_attention" name="test_gpu_backends_match_reference[flash]">
  <skipped message="flash-attn not installed"/></testcase>
</testsuite></testsuites>"""


def _case(device, case, baselines, ours, metrics=None):
    return {"case": case, "shape": "s", "baselines": baselines, "ours": ours, "flops": 1e9, "device": device,
            "notes": [], "metrics": metrics or {}}


def test_report_fills_in_the_goal_tables(tmp_path):
    lines = [{"environment": {"torch": "2.11.0", "triton": "3.6.0", "gpu": "NVIDIA H200"}},
             _case("cuda", "attention mixed16 fwd+bwd", {"torch varlen_attn": 0.43e-3, "padded SDPA + key mask": 1e-3},
                   {"ours (auto)": 0.25e-3}),
             _case("cuda", "attention uniform64 fwd+bwd", {"padded SDPA, no mask": 0.08e-3, "flex": None},
                   {"ours (auto)": 0.1e-3}),
             _case("cuda", "tiny encoder train step mixed128", {"padded SDPA model": 90e-3}, {"ours (auto)": 30e-3},
                   {"mfu": 0.4}),
             _case("cpu", "patch_embed fwd+bwd", {"torch vectorised": 0.3}, {"ours (auto)": 0.1})]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "tests.xml").write_text(JUNIT)
    out = tmp_path / "report.md"
    assert report.main(["--bench", str(bench), "--tests", str(tmp_path / "tests.xml"), "--phase", "install=40",
                        "--phase", "tests=120", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Device run: NVIDIA H200, ")
    assert "torch 2.11.0, triton 3.6.0" in text and "install 40 s, tests 120 s (total 2.7 min)" in text
    assert "1 passed, 1 failed, 1 skipped." in text
    assert "FAILED `tests.test_model::test_encoder_forward_has_no_host_sync_on_cuda[fp32]`: RuntimeError" in text
    row = next(line for line in text.splitlines() if line.startswith("| attention mixed16 fwd+bwd |"))
    assert row == ("| attention mixed16 fwd+bwd | torch varlen_attn | 0.430 | varlen_attn: 0.425 ms | "
                   ">= 1x the best baseline, <= 0.3 ms | 0.250 | 1.72x torch varlen_attn | **met** |")
    row = next(line for line in text.splitlines() if line.startswith("| attention uniform64 fwd+bwd |"))
    assert row.endswith("| 0.100 | 0.80x padded SDPA, no mask | **missed** |")
    row = next(line for line in text.splitlines() if line.startswith("| tiny encoder train step mixed128 |"))
    assert "3.00x padded SDPA model, mfu 0.400 | **met** |" in row
    assert "| attention mixed128 fwd+bwd | - | - | length buckets: 1.67 ms |" in text  # not measured
    assert "| patch_embed fwd+bwd | torch vectorised | 300.000 |" in text  # the CPU goals table
    assert "| cuda | attention uniform64 fwd+bwd | s | baseline | flex | - | - | - |" in text


def test_report_without_results_still_renders(tmp_path):
    out = tmp_path / "report.md"
    report.main(["--bench", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    text = out.read_text()
    assert "No test results" in text and "not measured" in text


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_dry_run_writes_a_report(tmp_path):
    """The whole script on CPU (~20 s: two pytest runs): GPU tests skip, the matmul-roof case
    runs, and the report lands in OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "CSFM_GPU_TESTS": "tests/kernels/test_patch_embed.py", "CSFM_BENCH_SELECT": "matmul"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.jsonl", "bench.log", "gpu-tests.log",
                                                          "gpu-tests.xml", "install.log", "report.md"]
    text = (tmp_path / "report.md").read_text()
    assert re.search(r"^0 passed, 0 failed, [1-9]\d* skipped\.$", text, re.M)  # the GPU tests skip cleanly
    assert "needs a CUDA device" in text
    assert "| cpu | matmul roof |" in text
    assert "report: " in done.stdout
