"""Compile every Triton kernel of csfm_kernels for NVIDIA GPUs, without a GPU, and report resources.

Each op's Triton launcher is driven on meta tensors (shapes and dtypes, no data) with the op's
kernels swapped for recorders, so the launches compiled here are exactly the ones the launcher
makes on a device of that architecture: same kernels, arguments, constexprs, ``num_warps`` and
``num_stages``. Each launch is specialised as Triton's JIT specialises it at run time (pointers
16-byte aligned, integers divisible by 16 marked so, integers equal to 1 made constants), compiled
with ``triton.compile`` for the target, and its cubin read with ``cuobjdump --dump-resource-usage``:
registers per thread, stack bytes (where spills go), shared memory per block. The PTX names the
tensor-core instruction family; occupancy follows from the architecture's limits.

The workloads cover what the CUDA dispatcher can choose: dtype fp32 / fp16 / bf16 (every float
tensor of the op in that dtype), attention head dim 32 / 64 / 128, model width d 256 / 384 / 512 /
768 / 1024 for patch embedding and masking, forward and backward.

    python -m csfm_kernels.gpu_report [--arch 80 90 100] [--markdown PATH] [--json PATH] [--jobs N] [--check]

(``--check``: exit status 1 when a goal of the report's Goals table does not hold.) Masking's row
copies have one launch configuration for every architecture; attention and patch embedding pick
theirs by architecture.

Kernels compile only in a process where Triton is not interpreting: under TRITON_INTERPRET=1 the
ops' kernels are interpreter objects, so ``compile_report`` then runs this module in a child
process without that variable.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from csfm_kernels._triton import triton

ARCHS = (80, 90, 100)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)
WIDTHS = (256, 384, 512, 768, 1024)

# A packed CSFM batch: 1-lead (101 tokens), 2-lead (201), 12-lead (1201) and 13-lead + text records.
# 6580 tokens is not a multiple of 16, like most real batches, so the token-count arguments get the
# JIT's unaligned specialisation.
RECORD_LENGTHS = (101,) * 8 + (201,) * 4 + (1201,) * 3 + (1365,)
HEADS = 8
TOKENS = sum(RECORD_LENGTHS)
# Reduction grids capped as on a device (2 programs per SM of a 132-SM H100, several token blocks
# each), so the loop count is a run-time integer as on a GPU, not the constant 1 of one block a program.
MAX_PROGRAMS = 264
MASK_RATIO = 0.75

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TENSOR_CORE_PTX = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
_OP_MODULES = ("varlen_attention", "patch_embed", "masking")


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of one compute capability (CUDA Programming Guide, per-capability table).

    shared_per_sm is the largest carve-out; every resident block also holds ``reserved_shared``
    bytes the driver keeps for itself. Registers are allocated per warp in units of 256.
    """

    name: str
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 0
    shared_per_block: int = 0
    reserved_shared: int = 1024
    reg_unit: int = 256
    shared_unit: int = 128


LIMITS = {
    80: ArchLimits("sm_80 (A100)", shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    90: ArchLimits("sm_90 (H100/H200)", shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
    100: ArchLimits("sm_100 (B200)", shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
}


@dataclass(frozen=True)
class Workload:
    """One case the dispatcher can meet: op, direction, dtype name and size (head dim or width d)."""

    op: str
    direction: str
    dtype: str
    size: int

    @property
    def size_name(self) -> str:
        return "head_dim" if self.op == "varlen_attention" else "d"

    def label(self) -> str:
        return f"{self.op} {self.direction} {self.dtype} {self.size_name}={self.size}"


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the JIT kernel, its positional and keyword arguments."""

    kernel: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclass(frozen=True)
class KernelResult:
    """Resources of one compiled kernel for one architecture.

    regs: registers per thread; stack: bytes of stack frame (spills and local arrays); shared:
    bytes of shared memory per block (static + dynamic); tensor_cores: "tcgen05", "wgmma", "mma"
    or "-" (none in the PTX); resident_warps: warps per SM at full occupancy of this kernel alone,
    limited by ``limiter`` ("registers", "shared memory", "warps" or "blocks").
    """

    kernel: str
    arch: int
    constexprs: dict
    warps: int
    stages: int
    regs: int
    stack: int
    shared: int
    tensor_cores: str
    resident_warps: int
    limiter: str

    @property
    def config(self) -> str:
        """The launch's constexprs (block sizes, flags), warps and pipeline stages, as text."""
        consts = [f"{k}={v}" for k, v in self.constexprs.items()]
        return " ".join(consts + [f"warps={self.warps}", f"stages={self.stages}"])


@dataclass(frozen=True)
class ReportRow:
    """A workload's kernel compiled for one architecture."""

    workload: Workload
    result: KernelResult


# ---------------------------------------------------------------------------------------------
# Workloads and their launches
# ---------------------------------------------------------------------------------------------

def workloads() -> list[Workload]:
    """Every (op, direction, dtype, size) the report covers."""
    cases = []
    for dtype in DTYPES:
        name = _DTYPE_NAMES[dtype]
        for direction in ("forward", "backward"):
            cases += [Workload("varlen_attention", direction, name, hd) for hd in HEAD_DIMS]
            cases += [Workload(op, direction, name, d) for op in ("patch_embed", "masking") for d in WIDTHS]
    return cases


def _module(name: str):
    """The op module (the package re-exports functions under the same names as the modules)."""
    return importlib.import_module(f"csfm_kernels.{name}")


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` appends a Launch."""

    def __init__(self, kernel, sink: list[Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(module) -> Iterator[list[Launch]]:
    """Swaps every JIT kernel of ``module`` for a recorder for the duration of the block."""
    from triton.runtime.jit import JITFunction

    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    if not kernels:
        raise RuntimeError(f"{module.__name__} has no compiled Triton kernels: Triton is interpreting "
                           "in this process (TRITON_INTERPRET=1) or not installed")
    sink: list[Launch] = []
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(kernel, sink))
        yield sink
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _drive(workload: Workload, arch: int) -> None:
    """Calls the op's Triton launcher for ``workload`` on meta tensors, as on an ``arch`` device."""
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}[workload.dtype]
    backward = workload.direction == "backward"
    if workload.op == "varlen_attention":
        va = _module("varlen_attention")
        q = _meta((TOKENS, HEADS, workload.size), dtype)
        cu = _meta((len(RECORD_LENGTHS) + 1,), torch.int32)
        scale = workload.size ** -0.5
        if not backward:
            va._triton_forward(q, q, q, cu, max(RECORD_LENGTHS), scale, arch=arch)
        else:
            lse = _meta((HEADS, TOKENS), torch.float32)
            va._triton_backward(q, q, q, q, q, lse, cu, max(RECORD_LENGTHS), scale, arch=arch)
    elif workload.op == "patch_embed":
        pe = _module("patch_embed")
        p, d = pe.PATCH_LEN, workload.size
        params = [_meta(s, dtype) for s in ((p,), (p,), (d, p), (d,), (d,), (d,), (13, d), (100, d))]
        patches, ids = _meta((TOKENS, p), dtype), _meta((TOKENS,), torch.int64)
        if not backward:
            pe._triton_forward(patches, ids, ids, params, 1e-5, arch=arch)
        else:
            grad = _meta((TOKENS, d), dtype)
            pe._triton_backward(grad, patches, ids, ids, params, 1e-5, max_programs=MAX_PROGRAMS, arch=arch)
    elif workload.op == "masking":
        mk = _module("masking")
        kept = int(TOKENS * (1 - MASK_RATIO))
        rows = _meta((TOKENS,), torch.int64)
        if not backward:  # the encoder's gather and the decoder's scatter
            mk._triton_gather(_meta((TOKENS, workload.size), dtype), _meta((kept,), torch.int64))
            mk._triton_scatter(_meta((kept, workload.size), dtype), rows, _meta((workload.size,), dtype))
        else:  # the gather's grad is a scatter with zero fill; the scatter's has its own kernel
            mk._triton_scatter(_meta((kept, workload.size), dtype), rows, _meta((workload.size,), dtype))
            mk._triton_scatter_backward(_meta((TOKENS, workload.size), dtype), rows, kept,
                                        max_programs=MAX_PROGRAMS)
    else:
        raise ValueError(f"unknown op {workload.op!r}")


def launches(workload: Workload, arch: int) -> list[Launch]:
    """The kernel launches the op's launcher makes for ``workload`` on an ``arch`` device."""
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(_recording(_module(name))) for name in _OP_MODULES]
        _drive(workload, arch)
    return [launch for sink in sinks for launch in sink]


# ---------------------------------------------------------------------------------------------
# Compiling and reading the cubin
# ---------------------------------------------------------------------------------------------

def _specialise(launch: Launch, arch: int):
    """(target, signature, constexprs, attrs, options) as Triton's JIT would compile ``launch``
    on an ``arch`` device (mirrors JITFunction.run: the same binder, alignment and constant rules)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, kwargs = binder(*launch.args, **launch.kwargs)
    options = backend.parse_options(kwargs)
    names = [p.name for p in fn.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization)}
    values = list(bound.values())
    constexprs = {(i,): values[i] for i, spec in enumerate(specialization) if spec[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec[1]) for i, spec in enumerate(specialization)
             if spec[0] != "constexpr" and isinstance(spec[1], str)}
    return target, signature, constexprs, attrs, options


def compile_key(launch: Launch, arch: int) -> str:
    """Identifies one compilation: launches with equal keys compile to the same binary."""
    _, signature, constexprs, attrs, options = _specialise(launch, arch)
    return repr((launch.name, arch, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), options.num_warps, options.num_stages))


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the one kernel in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {k: int(v) for k, v in usage.items()}


def tensor_core_family(ptx: str) -> str:
    """The tensor-core MMA family a PTX uses: "tcgen05", "wgmma", "mma", or "-" for none."""
    for family, mnemonic in _TENSOR_CORE_PTX:
        if re.search(rf"^\s*(@!?%\w+\s+)?{re.escape(mnemonic)}\b", ptx, re.MULTILINE):
            return family
    return "-"


def occupancy(regs: int, shared: int, warps: int, limits: ArchLimits) -> tuple[int, str]:
    """(resident warps per SM, the limiting resource) for a kernel alone on one SM.

    regs: registers per thread; shared: bytes per block; warps: warps per block.
    """
    regs_per_warp = math.ceil(max(regs, 1) * 32 / limits.reg_unit) * limits.reg_unit
    shared_per_block = math.ceil((shared + limits.reserved_shared) / limits.shared_unit) * limits.shared_unit
    blocks = {
        "registers": limits.regs_per_sm // regs_per_warp // warps,
        "shared memory": (limits.shared_per_sm // shared_per_block
                          if shared <= limits.shared_per_block else 0),
        "warps": limits.max_warps_per_sm // warps,
        "blocks": limits.max_blocks_per_sm,
    }
    limiter = min(blocks, key=blocks.get)
    return blocks[limiter] * warps, limiter


def compile_launch(launch: Launch, arch: int) -> KernelResult:
    """Compiles ``launch`` for ``arch`` and reads its resources from the cubin and PTX."""
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = _specialise(launch, arch)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    shared = usage.get("SHARED", 0) + int(compiled.metadata.shared)
    resident, limiter = occupancy(usage["REG"], shared, options.num_warps, LIMITS[arch])
    constexprs = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
    return KernelResult(launch.name, arch, constexprs, options.num_warps, options.num_stages, usage["REG"],
                        usage.get("STACK", 0), shared, tensor_core_family(compiled.asm["ptx"]), resident,
                        limiter)


def _compile_job(job: tuple[Workload, int, int]) -> KernelResult:
    """Worker entry: compiles launch ``index`` of ``workload`` for ``arch`` (recorded afresh here)."""
    workload, arch, index = job
    return compile_launch(launches(workload, arch)[index], arch)


def _kernels_compile_here() -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(_module("varlen_attention"), "_fwd_kernel", None), JITFunction)


def compile_report(archs: Sequence[int] = ARCHS, jobs: int | None = None,
                   cases: Sequence[Workload] | None = None) -> list[ReportRow]:
    """Compiles every launch of ``cases`` (default: all workloads) for each of ``archs``.

    Each distinct compilation runs once (``jobs`` worker processes, default one per CPU) and is
    shared by every workload that launches it. Under TRITON_INTERPRET=1 the work runs in a child
    process without it. Raises RuntimeError when triton is not installed.
    """
    if triton is None:
        raise RuntimeError("the compile report needs the triton package")
    cases = list(workloads() if cases is None else cases)
    for arch in archs:
        if arch not in LIMITS:
            raise ValueError(f"arch must be one of {sorted(LIMITS)}, got {arch}")
    if not _kernels_compile_here():
        return _report_in_child(archs, jobs, cases)
    planned: list[tuple[Workload, int, str]] = []
    first_job: dict[str, tuple[Workload, int, int]] = {}
    for arch in archs:
        for case in cases:
            for index, launch in enumerate(launches(case, arch)):
                key = compile_key(launch, arch)
                first_job.setdefault(key, (case, arch, index))
                planned.append((case, arch, key))
    keys = list(first_job)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(keys)))
    if jobs == 1 or "fork" not in multiprocessing.get_all_start_methods():
        results = [_compile_job(first_job[k]) for k in keys]
    else:  # forked workers (nothing compiled yet in this process) need no importable __main__
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, [first_job[k] for k in keys]))
    by_key = dict(zip(keys, results))
    return [ReportRow(case, by_key[key]) for case, _, key in planned]


def _report_in_child(archs: Sequence[int], jobs: int | None, cases: Sequence[Workload]) -> list[ReportRow]:
    """compile_report in a fresh interpreter without TRITON_INTERPRET; rows come back as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        cases_path, out_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "rows.json")
        with open(cases_path, "w") as f:
            json.dump([dataclasses.asdict(c) for c in cases], f)
        cmd = [sys.executable, "-m", "csfm_kernels.gpu_report", "--arch", *map(str, archs),
               "--cases", cases_path, "--json", out_path]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compile report child process failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return rows_from_json(out_path)


def rows_to_json(rows: Sequence[ReportRow], path: str) -> None:
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)


def rows_from_json(path: str) -> list[ReportRow]:
    with open(path) as f:
        return [ReportRow(Workload(**r["workload"]), KernelResult(**r["result"])) for r in json.load(f)]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def goal_checks(rows: Sequence[ReportRow]) -> list[tuple[str, bool, str]]:
    """(goal, held, detail) for the goals the compile report answers."""
    half = [r for r in rows if r.workload.dtype != "fp32"]
    fp32_new = [r for r in rows if r.workload.dtype == "fp32" and r.result.arch >= 90]
    own = {80: "mma", 90: "wgmma", 100: "tcgen05"}
    attn = [r for r in half if r.workload.op == "varlen_attention" and r.workload.size in (64, 128)
            and r.result.kernel != "_bwd_preprocess_kernel"]
    over = [r for r in rows if r.result.shared > LIMITS[r.result.arch].shared_per_block]

    def names(bad):
        found = sorted({f"{r.result.kernel} sm_{r.result.arch} {r.workload.dtype} "
                        f"{r.workload.size_name}={r.workload.size} ({r.result.stack} B stack, "
                        f"{r.result.tensor_cores})" for r in bad})
        return "; ".join(found[:12]) + (f"; ... {len(found) - 12} more" if len(found) > 12 else "")

    checks = []
    for goal, bad in (
        ("no spills (stack 0) in any fp16/bf16 configuration", [r for r in half if r.result.stack]),
        ("no spills in fp32 on sm_90 and sm_100", [r for r in fp32_new if r.result.stack]),
        ("fp16/bf16 attention at head dim 64 and 128 uses the architecture's own tensor cores",
         [r for r in attn if r.result.tensor_cores != own[r.result.arch]]),
        ("shared memory within each architecture's per-block limit", over),
    ):
        checks.append((goal, not bad, names(bad) if bad else "held"))
    return checks


def render_markdown(rows: Sequence[ReportRow], archs: Sequence[int] = ARCHS) -> str:
    """The report: limits, goal checks and one table per op (one row per kernel x dtype x size)."""
    compiles = {(r.result.arch, r.result.kernel, r.result.config, r.workload.dtype) for r in rows}
    lines = [
        "# Triton kernels compiled for sm_80 / sm_90 / sm_100 (no GPU needed)",
        "",
        f"Generated by `python -m csfm_kernels.gpu_report` on {datetime.date.today().isoformat()} "
        f"with triton {triton.__version__}, torch {torch.__version__}. Every launch the ops' Triton "
        "launchers make for the workloads below, compiled with `triton.compile` for each architecture "
        "and read with `cuobjdump --dump-resource-usage` (registers per thread, stack bytes = spills, "
        "shared memory per block) and the PTX (tensor-core family: `mma` = mma.sync, `wgmma` = Hopper "
        "warpgroup MMA, `tcgen05` = Blackwell 5th-gen tensor core MMA).",
        "",
        f"Workloads: a packed batch of {len(RECORD_LENGTHS)} records ({TOKENS} tokens, {HEADS} heads), "
        f"dtypes {', '.join(_DTYPE_NAMES.values())}, head dims {', '.join(map(str, HEAD_DIMS))}, "
        f"widths d {', '.join(map(str, WIDTHS))}, forward and backward: {len(rows)} (workload, kernel, "
        f"architecture) rows, {len(compiles)} distinct compilations.",
        "",
        "Occupancy = resident warps per SM for the kernel alone, the least of: registers (64K per SM, "
        "allocated per warp in units of 256), shared memory (per-SM carve-out, plus 1 KB the driver "
        "reserves per block), 64 warps and 32 blocks per SM.",
        "",
        "| architecture | regs / SM | max warps / SM | shared memory / SM | / block |",
        "|---|---|---|---|---|",
    ]
    for arch in archs:
        lim = LIMITS[arch]
        lines.append(f"| {lim.name} | {lim.regs_per_sm // 1024}K | {lim.max_warps_per_sm} | "
                     f"{lim.shared_per_sm // 1024} KB | {lim.shared_per_block // 1024} KB |")
    lines += ["", "## Goals", "", "| goal | held | where not |", "|---|---|---|"]
    for goal, held, detail in goal_checks(rows):
        lines.append(f"| {goal} | {'yes' if held else '**no**'} | {detail if not held else ''} |")
    lines += ["", "## Occupancy by kernel", "",
              "Resident warps per SM, least and most over the kernel's configurations (dtype, size).", "",
              "| kernel | " + " | ".join(f"sm_{a}" for a in archs) + " |", "|---|" + "---|" * len(archs)]
    for kernel in dict.fromkeys(r.result.kernel for r in rows):
        cells = []
        for a in archs:
            warps = [r.result.resident_warps for r in rows if r.result.kernel == kernel and r.result.arch == a]
            cells.append(f"{min(warps)}–{max(warps)}" if warps else "")
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    low = sorted({f"{r.result.kernel} {r.workload.dtype} {r.workload.size_name}={r.workload.size} "
                  f"({r.result.resident_warps})" for r in rows if r.result.arch == 90 and r.result.resident_warps < 8})
    lines += ["", "Below 8 resident warps on sm_90: " + ("; ".join(low) if low else "none") + "."]
    lines += ["", "Cell: registers / stack bytes / shared KB / tensor cores / warps per block → resident "
              "warps per SM (limiter: r = registers, s = shared memory, w = warps).", ""]
    short = {"registers": "r", "shared memory": "s", "warps": "w", "blocks": "b"}
    for op in _OP_MODULES:
        table: dict[tuple, dict[int, KernelResult]] = {}
        for r in rows:
            if r.workload.op == op:
                key = (r.workload.direction, r.result.kernel, r.workload.dtype, r.workload.size)
                table.setdefault(key, {})[r.result.arch] = r.result
        if not table:
            continue
        lines += [f"## {op}", "", "| kernel | dtype | size | config (" + ", ".join(f"sm_{a}" for a in archs)
                  + ") | " + " | ".join(f"sm_{a}" for a in archs) + " |",
                  "|---|---|---|---|" + "---|" * len(archs)]
        size_name = "head_dim" if op == "varlen_attention" else "d"
        for (direction, kernel, dtype, size), per_arch in table.items():
            by_config: dict[str, list[str]] = {}
            for a in archs:
                if a in per_arch:
                    by_config.setdefault(per_arch[a].config, []).append(f"sm_{a}")
            configs = list(by_config) if len(by_config) == 1 else [
                f"{'/'.join(names)}: {config}" for config, names in by_config.items()]
            cells = []
            for a in archs:
                k = per_arch.get(a)
                if k is None:
                    cells.append("")
                    continue
                stack = f"**{k.stack}**" if k.stack else "0"
                cells.append(f"{k.regs} / {stack} / {k.shared / 1024:.0f} / {k.tensor_cores} / "
                             f"{k.warps}→{k.resident_warps} {short[k.limiter]}")
            lines.append(f"| {kernel} | {dtype} | {size_name}={size} | {'; '.join(configs)} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m csfm_kernels.gpu_report",
        description="Compile every Triton kernel launch of csfm_kernels for NVIDIA architectures "
                    "(no GPU needed) and report registers, spills, shared memory, tensor cores, occupancy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(LIMITS),
                        help="compute capabilities to compile for (major * 10 + minor)")
    parser.add_argument("--markdown", help="write the Markdown report to this file instead of printing it")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes; None: one per CPU")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a goal in the report's Goals table does not hold")
    parser.add_argument("--cases", help=argparse.SUPPRESS)  # JSON list of workloads (child process)
    args = parser.parse_args(argv)
    # Triton 3.9 warns once per process that its fp-fusion default changes in 3.10; the report
    # compiles with the default a launch gets, as the launchers pass no enable_fp_fusion.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    cases = None
    if args.cases:
        with open(args.cases) as f:
            cases = [Workload(**c) for c in json.load(f)]
    rows = compile_report(args.arch, args.jobs, cases)
    if args.json:
        rows_to_json(rows, args.json)
    if args.markdown or not args.json:
        text = render_markdown(rows, args.arch)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        else:
            print(text)
    return 1 if args.check and not all(held for _, held, _ in goal_checks(rows)) else 0


if __name__ == "__main__":
    sys.exit(main())
