"""The Triton kernels compiled for sm_80 / sm_90 / sm_100 without a GPU (csfm_kernels.gpu_report).

Each launch the ops' launchers make is compiled for the three architectures and read from its
cubin and PTX. Checked: everything compiles; no spills (stack 0) in fp16 / bf16 anywhere, none in
fp32 on sm_90 / sm_100; fp16 / bf16 attention at head dim 64 and 128 uses the architecture's own
tensor-core instructions (mma.sync / wgmma / tcgen05); shared memory fits each architecture's
per-block limit; patch embedding and masking tile the model width without padded columns.

Compiling all 216 distinct launches takes ~2.3 CPU-minutes, over 3 minutes of wall time on this
shared 2-core machine, so the session compiles a representative subset once (a module fixture
shared by every assertion, 75 compilations, ~1 CPU-minute): every kernel of every op on all three
architectures; bf16 (fp16 compiles the same tiles with another element type) and fp32, except the
masking row copies (bf16 only); attention at head dim 64 and 128 (32 shares 64's tiles); patch
embedding and masking at d = 768 (every width gets the same patch-embedding chunks; the column
blocks of every width are checked below without compiling). ``python -m csfm_kernels.gpu_report``
covers every workload (bench/results/gpu-compile-2026-12-06.md). Triton's own cache
(~/.triton/cache) makes reruns fast.
"""
from __future__ import annotations

import importlib

import pytest

pytest.importorskip("triton", reason="compiling kernels for GPUs needs the triton package")

from csfm_kernels import gpu_report  # noqa: E402

pytestmark = pytest.mark.compile

masking = importlib.import_module("csfm_kernels.masking")
patch_embed = importlib.import_module("csfm_kernels.patch_embed")

OWN_TENSOR_CORES = {80: "mma", 90: "wgmma", 100: "tcgen05"}
ATTENTION_MMA_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
KERNELS = {"_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
           "_pe_fwd_kernel", "_pe_bwd_rows_kernel", "_pe_bwd_cols_kernel",
           "_gather_rows_kernel", "_scatter_fill_kernel", "_scatter_fill_bwd_kernel"}
SUBSET = [w for w in gpu_report.workloads()
          if w.dtype in (("bf16",) if w.op == "masking" else ("bf16", "fp32"))
          and w.size in ((64, 128) if w.op == "varlen_attention" else (768,))]


@pytest.fixture(scope="module")
def rows() -> list[gpu_report.ReportRow]:
    return gpu_report.compile_report(gpu_report.ARCHS, cases=SUBSET)


def _where(bad: list[gpu_report.ReportRow]) -> list[str]:
    return sorted({f"{r.result.kernel} sm_{r.result.arch} {r.workload.dtype} {r.workload.size_name}="
                   f"{r.workload.size} [{r.result.config}]: {r.result.regs} regs, {r.result.stack} B stack, "
                   f"{r.result.shared} B shared, {r.result.tensor_cores}" for r in bad})


def test_every_kernel_compiles_for_every_architecture(rows):
    for arch in gpu_report.ARCHS:
        compiled = {r.result.kernel for r in rows if r.result.arch == arch}
        assert compiled == KERNELS, f"sm_{arch}: missing {KERNELS - compiled}, unexpected {compiled - KERNELS}"
    for case in SUBSET:
        archs = {r.result.arch for r in rows if r.workload == case}
        assert archs == set(gpu_report.ARCHS), f"{case.label()}: compiled for {sorted(archs)}"


def test_no_spills_in_half_precision(rows):
    bad = [r for r in rows if r.workload.dtype != "fp32" and r.result.stack]
    assert not bad, _where(bad)


def test_no_spills_in_fp32_on_sm90_and_sm100(rows):
    bad = [r for r in rows if r.workload.dtype == "fp32" and r.result.arch >= 90 and r.result.stack]
    assert not bad, _where(bad)


def test_half_precision_attention_uses_the_architectures_tensor_cores(rows):
    attention = [r for r in rows if r.workload.op == "varlen_attention" and r.workload.dtype != "fp32"
                 and r.result.kernel in ATTENTION_MMA_KERNELS]
    assert {r.workload.size for r in attention} == {64, 128}
    bad = [r for r in attention if r.result.tensor_cores != OWN_TENSOR_CORES[r.result.arch]]
    assert not bad, _where(bad)


def test_shared_memory_within_each_architectures_limit(rows):
    bad = [r for r in rows if r.result.shared > gpu_report.LIMITS[r.result.arch].shared_per_block]
    assert not bad, _where(bad)
    assert all(r.result.resident_warps >= r.result.warps for r in rows), "a kernel that cannot be resident"


def test_column_tiles_have_no_dead_columns(rows):
    """The launches at d = 768 tile it exactly (not padded to 1024), and so do the launch
    configurations at every model width."""
    for r in rows:
        if r.workload.op in ("patch_embed", "masking"):
            width = r.result.constexprs.get("BLOCK_D", r.result.constexprs.get("BLOCK_C"))
            assert r.workload.size % width == 0, _where([r])
    for d in gpu_report.WIDTHS:
        assert d % masking._row_blocks(d)[1] == 0, d
        for arch in gpu_report.ARCHS:
            blocks = patch_embed._pe_blocks(patch_embed.PATCH_LEN, d, arch)
            for _, block_d, _ in (blocks.forward, blocks.rows, blocks.cols):
                assert d % block_d == 0, (d, arch, block_d)


def test_report_renders_goals_and_every_kernel(rows):
    text = gpu_report.render_markdown(rows)
    assert "## Goals" in text and f"triton {gpu_report.triton.__version__}" in text
    assert all(name in text for name in KERNELS)
    assert all(held for _, held, _ in gpu_report.goal_checks(rows)), gpu_report.goal_checks(rows)


@pytest.mark.parametrize("regs, shared, warps, arch, expected", [
    (255, 0, 4, 90, (8, "registers")),            # 256 x 32 per warp: 8 warps fill 64K registers
    (32, 0, 4, 90, (64, "registers")),            # 16 blocks of 4 warps: registers and warps tie at 64
    (128, 100 * 1024, 4, 80, (4, "shared memory")),   # 101 KB per block: one block in 164 KB
    (128, 100 * 1024, 4, 90, (8, "shared memory")),   # two in 228 KB
    (64, 200 * 1024, 8, 80, (0, "shared memory")),    # over sm_80's 163 KB per block: cannot launch
])
def test_occupancy(regs, shared, warps, arch, expected):
    assert gpu_report.occupancy(regs, shared, warps, gpu_report.LIMITS[arch]) == expected


def test_tensor_core_family_reads_predicated_ptx():
    assert gpu_report.tensor_core_family("\t@%p7 tcgen05.mma.cta_group::1.kind::f16 [%r1], ...;") == "tcgen05"
    assert gpu_report.tensor_core_family("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16 ...;") == "wgmma"
    assert gpu_report.tensor_core_family("\tmma.sync.aligned.m16n8k16.row.col.f32.f16 ...;") == "mma"
    assert gpu_report.tensor_core_family("\tfma.rn.f32 %f1, %f2, %f3, %f4;") == "-"
