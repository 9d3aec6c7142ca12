"""One dispatcher for every op: which backends each op has, the devices and dtypes each one
takes, and what ``backend="auto"`` picks, per op and per device type.

Backends (the ``backend=`` argument of every op, and of the models, which pass it through):
    "auto"          the first backend of ``AUTO[op][device type]`` that can run the call
    "reference"     plain PyTorch in the reference model's order: any device, every float dtype
    "cpu"           patch_embed / masking: the C++ kernels (fp32 inside); varlen_attention:
                    PyTorch's CPU flash-attention kernel over length buckets (with dropout: an
                    explicit-softmax path that runs on any device)
    "triton"        Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    "torch_varlen"  varlen_attention only: ``torch.nn.attention.varlen.varlen_attn`` (CUDA)
    "flash_attn"    varlen_attention only: ``flash_attn.flash_attn_varlen_func`` (CUDA)

Dtype rule, the same for every op and backend: the data tensor (x, tokens / kept, q) decides the
dtype of the call. Every other floating tensor of the call (weights, mask token, k, v) must have
that dtype (``check_same_dtype``), and the data dtype must be one the backend takes
(``TABLE``): nothing is cast silently. The fused kernels compute in fp32 and return the data
dtype, so fp16 / bf16 lose nothing inside them; float64 runs on the backends that keep it
(``reference``, and ``cpu`` attention), which is where ``auto`` sends it.

A backend named by the caller that cannot run the call raises ``BackendUnavailable`` (a
ValueError) naming the op, the backend, the device, the dtype and why: nothing falls back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from csfm_kernels import _ext
from csfm_kernels._triton import interpreter_enabled, triton_installed, triton_runs_on

OPS = ("patch_embed", "masking", "varlen_attention")

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FP32_HALF = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """What one backend of one op takes.

    devices: device types it runs on (None: any); dtypes: data dtypes it takes;
    needs: the compiled part it needs, "cpp" (csfm_kernels._C) or "triton", or None.
    """

    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    needs: str | None = None


TABLE: dict[str, dict[str, Backend]] = {
    "patch_embed": {
        "reference": Backend(None, _FLOATS),
        "cpu": Backend(("cpu",), _FP32_HALF, "cpp"),
        "triton": Backend(None, _FP32_HALF, "triton"),
    },
    "masking": {
        "reference": Backend(None, _FLOATS),
        "cpu": Backend(("cpu",), _FP32_HALF, "cpp"),
        "triton": Backend(None, _FP32_HALF, "triton"),
    },
    "varlen_attention": {
        "reference": Backend(None, _FLOATS),
        # CPU tensors; other devices only with dropout (varlen_attention states that limit)
        "cpu": Backend(None, _FLOATS),
        "triton": Backend(None, _FP32_HALF, "triton"),
        "torch_varlen": Backend(("cuda",), _HALF),
        "flash_attn": Backend(("cuda",), _HALF),
    },
}

# What "auto" tries, in order, per op and device type; the first that can run the call wins.
# Device types not listed get "reference".
AUTO: dict[str, dict[str, tuple[str, ...]]] = {
    "patch_embed": {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
    "masking": {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
    "varlen_attention": {
        "cpu": ("cpu", "reference"),
        # flash-attn where installed (fp16/bf16), else our Triton kernels; with dropout the
        # explicit-softmax "cpu" path, the one that honours a seeded generator
        "cuda": ("flash_attn", "triton", "torch_varlen", "cpu", "reference"),
    },
}


class BackendUnavailable(ValueError):
    """A backend cannot run this call here: ``op``, ``backend``, ``device``, ``dtype``, ``why``."""

    def __init__(self, op: str, backend: str, device: torch.device, dtype: torch.dtype, why: str) -> None:
        self.op, self.backend, self.device, self.dtype, self.why = op, backend, torch.device(device), dtype, why
        super().__init__(f"{op}: backend={backend!r} cannot run on {self.device.type} tensors of "
                         f"{_name(dtype)} here: {why}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def backends_of(op: str) -> tuple[str, ...]:
    """The ``backend=`` values ``op`` accepts: "auto" first, then its backends."""
    return ("auto", *TABLE[op])


def check_backend_name(op: str, backend: object) -> None:
    """ValueError unless ``backend`` is one of ``backends_of(op)``."""
    if backend not in backends_of(op):
        raise ValueError(f"{op}: backend must be one of {backends_of(op)}, got {backend!r}")


def _triton_missing(device: torch.device) -> str | None:
    if not triton_installed:
        return "the triton package is not installed (pip install -e '.[gpu]')"
    if triton_runs_on(device):
        return None
    if device.type == "cuda":
        return "TRITON_INTERPRET=1 is set, so Triton runs interpreted on CPU tensors only"
    if device.type == "cpu" and not interpreter_enabled():
        return "Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton for CPU tensors"
    return f"Triton does not run on {device.type} tensors"


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype,
            limits: Mapping[str, str] | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` with ``dtype`` data, or None if it can.

    ``limits`` maps backend names to op-specific reasons (a missing optional library, a head
    size, dropout) that the op found for this call.
    """
    spec = TABLE[op][backend]
    if spec.devices is not None and device.type not in spec.devices:
        return f"it needs {' or '.join(d.upper() for d in spec.devices)} tensors"
    if spec.needs == "cpp" and _ext.cpp is None:
        return (f"the C++ extension csfm_kernels._C is not built ({_ext.cpp_error}); rebuild with "
                "pip install --no-build-isolation --no-deps -e .")
    if spec.needs == "triton":
        missing = _triton_missing(device)
        if missing:
            return missing
    if dtype not in spec.dtypes:
        takers = [name for name, other in TABLE[op].items() if dtype in other.dtypes]
        return (f"it takes {', '.join(_name(d) for d in spec.dtypes)} data "
                f"(backends that take {_name(dtype)}: {', '.join(takers) or 'none'})")
    return (limits or {}).get(backend)


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype,
            limits: Mapping[str, str] | None = None) -> str:
    """The backend that runs this call of ``op``: ``backend`` itself if it can (else
    BackendUnavailable), or for "auto" the first of ``AUTO[op][device.type]`` that can."""
    check_backend_name(op, backend)
    if backend != "auto":
        why = why_not(op, backend, device, dtype, limits)
        if why is not None:
            raise BackendUnavailable(op, backend, device, dtype, why)
        return backend
    reasons = []
    for name in AUTO[op].get(device.type, ("reference",)):
        why = why_not(op, name, device, dtype, limits)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise BackendUnavailable(op, "auto", device, dtype, "; ".join(reasons))


def check_same_dtype(op: str, data_name: str, data: torch.Tensor, others: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the tensor unless every tensor of ``others`` has ``data``'s dtype."""
    for name, tensor in others.items():
        if tensor.dtype != data.dtype:
            raise ValueError(f"{op}: {name} is {_name(tensor.dtype)} but {data_name} is {_name(data.dtype)}; "
                             "every floating tensor of one call must share a dtype (cast one of them)")


def op_backends(backend: str | Mapping[str, str]) -> dict[str, str]:
    """A model's ``backend`` argument -> {op: backend name}, each checked.

    A name applies to every op (so it must be a backend of each); a mapping names backends
    per op, ops it leaves out use "auto".
    """
    if isinstance(backend, str):
        lacking = [op for op in OPS if backend not in backends_of(op)]
        if lacking:
            having = [op for op in OPS if backend in backends_of(op)]
            if not having:
                raise ValueError(f"backend must be one of {backends_of('varlen_attention')} or a mapping "
                                 f"{{op: backend}} over {OPS}, got {backend!r}")
            raise ValueError(f"backend {backend!r} exists only for {', '.join(having)}; pass a mapping "
                             f"such as {{{having[0]!r}: {backend!r}}} (other ops: 'auto')")
        return {op: backend for op in OPS}
    if not isinstance(backend, Mapping):
        raise TypeError(f"backend must be a str or a mapping {{op: backend}}, got {type(backend).__name__}")
    unknown = sorted(set(backend) - set(OPS))
    if unknown:
        raise ValueError(f"backend mapping names unknown ops {unknown}; the ops are {OPS}")
    chosen = {op: backend.get(op, "auto") for op in OPS}
    for op, name in chosen.items():
        check_backend_name(op, name)
    return chosen
