"""The one dispatcher: backend names, what "auto" picks, the error for a backend that cannot run,
the dtype rule for every op x backend, and that the backend asked for (of an op or of a model)
is the one whose implementation runs."""
from __future__ import annotations

import importlib

import pytest
import torch

from csfm.model.batch import Batch
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder
from csfm.model.pretrain import MaskedPretrainer
from csfm_kernels import (BackendUnavailable, _dispatch, _ext, gather_kept, op_backends, random_masking,
                          scatter_with_mask_token)
from csfm_kernels.patch_embed import PATCH_LEN, PatchEmbedParams, patch_embed
from helpers import backends_here

pe = importlib.import_module("csfm_kernels.patch_embed")  # the package re-exports functions of these names
mk = importlib.import_module("csfm_kernels.masking")
va = importlib.import_module("csfm_kernels.varlen_attention")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HERE = ["reference", *backends_here()]  # backends that can run on CPU tensors in this session


# ----------------------------------------------------------------------------- names and "auto"

def test_every_op_has_one_backends_convention():
    for op, module in (("patch_embed", pe), ("masking", mk), ("varlen_attention", va)):
        assert module.BACKENDS == _dispatch.backends_of(op) == ("auto", *_dispatch.TABLE[op])
        assert set(_dispatch.AUTO[op]) == {"cpu", "cuda"}
        for device_type, order in _dispatch.AUTO[op].items():
            assert set(order) <= set(_dispatch.TABLE[op]), (op, device_type)
    assert set(_dispatch.TABLE) == set(_dispatch.OPS)


@pytest.mark.parametrize("op", _dispatch.OPS)
def test_unknown_backend_names_the_op_and_the_choices(op):
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of \('auto', 'reference'"):
        _dispatch.resolve(op, "cuda", CPU, torch.float32)


def test_auto_table_on_cpu():
    cpu_built = _ext.cpp is not None
    for op in ("patch_embed", "masking"):
        assert _dispatch.resolve(op, "auto", CPU, torch.float32) == ("cpu" if cpu_built else "reference")
        assert _dispatch.resolve(op, "auto", CPU, torch.float64) == "reference"  # the C++ kernels are fp32
    assert _dispatch.resolve("varlen_attention", "auto", CPU, torch.float64) == "cpu"
    assert _dispatch.resolve("patch_embed", "auto", torch.device("mps"), torch.float32) == "reference"


def test_auto_table_on_cuda(monkeypatch):
    """What "auto" picks on CUDA, with Triton compiled there (interpreter off)."""
    monkeypatch.setattr(_dispatch, "triton_installed", True)
    monkeypatch.setattr(_dispatch, "triton_runs_on", lambda device: device.type == "cuda")
    for op in ("patch_embed", "masking"):
        assert _dispatch.resolve(op, "auto", CUDA, torch.bfloat16) == "triton"
        assert _dispatch.resolve(op, "auto", CUDA, torch.float64) == "reference"
    op, installed = "varlen_attention", {}
    assert _dispatch.resolve(op, "auto", CUDA, torch.bfloat16, installed) == "flash_attn"
    no_flash = {"flash_attn": "not installed"}
    assert _dispatch.resolve(op, "auto", CUDA, torch.bfloat16, no_flash) == "triton"
    assert _dispatch.resolve(op, "auto", CUDA, torch.float32, installed) == "triton"  # flash-attn: half only
    dropout = {"flash_attn": "generator", "triton": "no dropout", "torch_varlen": "no dropout"}
    assert _dispatch.resolve(op, "auto", CUDA, torch.bfloat16, dropout) == "cpu"
    no_triton = {**no_flash, "triton": "head_dim", "cpu": "needs CPU tensors"}
    assert _dispatch.resolve(op, "auto", CUDA, torch.bfloat16, no_triton) == "torch_varlen"
    assert _dispatch.resolve(op, "auto", CUDA, torch.float64, no_triton) == "reference"


# ----------------------------------------------------------------------------- BackendUnavailable

@pytest.mark.parametrize("op", ["patch_embed", "masking"])
def test_cpu_backend_on_cuda_tensors_is_one_error_type(op):
    """Once RuntimeError in masking and ValueError in patch embedding: now one ValueError subclass."""
    with pytest.raises(BackendUnavailable) as caught:
        _dispatch.resolve(op, "cpu", CUDA, torch.float32)
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.op, err.backend, err.device, err.dtype) == (op, "cpu", CUDA, torch.float32)
    assert str(err) == f"{op}: backend='cpu' cannot run on cuda tensors of float32 here: it needs CPU tensors"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_backend_on_cuda_tensors_at_every_entry_point():
    g = torch.Generator().manual_seed(0)
    x, params = torch.randn(1, 1, 50, generator=g).cuda(), _params(16, torch.float32)
    params = PatchEmbedParams(*(t.detach().cuda() for t in params[:8]))
    with pytest.raises(BackendUnavailable, match="patch_embed: backend='cpu' cannot run on cuda"):
        patch_embed(x, torch.tensor([[1]]).cuda(), params, backend="cpu")
    plan = random_masking([4], 0.5, device="cuda")
    with pytest.raises(BackendUnavailable, match="masking: backend='cpu' cannot run on cuda"):
        gather_kept(torch.randn(4, 8, device="cuda"), plan, backend="cpu")
    q = torch.randn(5, 1, 16, device="cuda")
    with pytest.raises(BackendUnavailable, match="varlen_attention: backend='cpu' cannot run on cuda"):
        va.varlen_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32, device="cuda"), 5, backend="cpu")


def test_cuda_only_attention_backends_on_cpu_and_missing_builds(monkeypatch):
    for backend in ("torch_varlen", "flash_attn"):
        with pytest.raises(BackendUnavailable, match="it needs CUDA tensors"):
            _dispatch.resolve("varlen_attention", backend, CPU, torch.float16)
    monkeypatch.setattr(_ext, "cpp", None)
    monkeypatch.setattr(_ext, "cpp_error", "ImportError: gone")
    with pytest.raises(BackendUnavailable, match=r"C\+\+ extension csfm_kernels._C is not built \(ImportError: gone\)"):
        _dispatch.resolve("patch_embed", "cpu", CPU, torch.float32)
    assert _dispatch.resolve("masking", "auto", CPU, torch.float32) == "reference"  # auto still runs
    monkeypatch.setattr(_dispatch, "triton_installed", False)
    with pytest.raises(BackendUnavailable, match="triton package is not installed"):
        _dispatch.resolve("masking", "triton", CPU, torch.float32)


def test_auto_with_nothing_that_runs_lists_every_reason(monkeypatch):
    monkeypatch.setitem(_dispatch.AUTO["patch_embed"], "cpu", ("cpu",))
    with pytest.raises(BackendUnavailable, match=r"backend='auto'.*cpu: it takes float32, float16, bfloat16 data "
                                                 r"\(backends that take float64: reference\)"):
        _dispatch.resolve("patch_embed", "auto", CPU, torch.float64)


# ----------------------------------------------------------------------------- dtype rule

def _params(d: int, dtype: torch.dtype) -> PatchEmbedParams:
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: (torch.randn(*shape, generator=g) * 0.2 + 1).to(dtype).requires_grad_()  # noqa: E731
    return PatchEmbedParams(t(PATCH_LEN), t(PATCH_LEN), t(d, PATCH_LEN), t(d), t(d), t(d), t(13, d), t(100, d))


def _call(op: str, backend: str, dtype: torch.dtype, other_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One small call of ``op`` with data of ``dtype`` (and weights / k, v of ``other_dtype``);
    returns the output after a backward pass through it."""
    other = other_dtype or dtype
    g = torch.Generator().manual_seed(1)
    if op == "patch_embed":
        x = torch.randn(1, 2, 2 * PATCH_LEN, generator=g).to(dtype).requires_grad_()
        out = patch_embed(x, torch.tensor([[1, 12]]), _params(16, other), backend=backend)
    elif op == "masking":
        plan = random_masking([6, 4], 0.5, torch.Generator().manual_seed(2))
        tokens = torch.randn(10, 16, generator=g).to(dtype).requires_grad_()
        kept = gather_kept(tokens, plan, backend=backend)
        out = scatter_with_mask_token(kept, plan, torch.zeros(16, dtype=other, requires_grad=True), backend=backend)
    else:
        q = torch.randn(9, 2, 16, generator=g).to(dtype).requires_grad_()
        kv = torch.randn(9, 2, 16, generator=g).to(other)
        out = va.varlen_attention(q, kv, kv, torch.tensor([0, 4, 9], dtype=torch.int32), 5, backend=backend)
    out.float().sum().backward()
    return out


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("op", _dispatch.OPS)
def test_dtype_rule_every_op_and_backend(op, backend, dtype):
    """A dtype the table lists runs and comes back in that dtype; any other raises
    BackendUnavailable naming it (never a silent cast, never a bare torch error)."""
    if dtype in _dispatch.TABLE[op][backend].dtypes:
        if backend == "triton" and dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter cannot do bf16 arithmetic (covered by the gpu tests)")
        assert _call(op, backend, dtype).dtype == dtype
    else:
        with pytest.raises(BackendUnavailable, match=f"{op}: backend='{backend}'.*{str(dtype)[6:]}"):
            _call(op, backend, dtype)


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("op", _dispatch.OPS)
def test_mixed_dtypes_name_the_tensor(op, backend):
    """Weights, mask token, k and v must have the data's dtype: a clear ValueError otherwise
    (the reference once failed here with a bare torch error, the C++ path cast silently)."""
    name = {"patch_embed": "params.ln_patch_weight", "masking": "mask_token", "varlen_attention": "k"}[op]
    with pytest.raises(ValueError, match=f"{op}: {name} is float64 but .* is float32"):
        _call(op, backend, torch.float32, torch.float64)


def test_fp64_input_is_no_longer_computed_in_fp32():
    """Issue: the C++ patch embedding took fp64 input and computed it in fp32 without a word."""
    if "cpu" not in HERE:
        pytest.skip("C++ extension not built")
    with pytest.raises(BackendUnavailable, match="takes float32, float16, bfloat16 data"):
        _call("patch_embed", "cpu", torch.float64)
    exact = _call("patch_embed", "auto", torch.float64)  # auto: the reference, in fp64
    assert exact.dtype == torch.float64


# ----------------------------------------------------------------------------- the backend asked for runs

def _spy(record: list[str], name: str, fn):
    def wrapper(*args, **kwargs):
        record.append(name)
        return fn(*args, **kwargs)
    return wrapper


@pytest.fixture
def ran(monkeypatch):
    """Records "<op>:<backend>" each time an op's implementation for that backend runs."""
    record: list[str] = []
    for op, module in (("patch_embed", pe), ("masking", mk)):
        for backend, kernels in list(module._KERNELS.items()):
            monkeypatch.setitem(module._KERNELS, backend,
                                tuple(_spy(record, f"{op}:{backend}", k) for k in kernels))
    monkeypatch.setattr(pe, "patch_embed_tokens_reference",
                        _spy(record, "patch_embed:reference", pe.patch_embed_tokens_reference))
    for name in ("gather_kept_reference", "scatter_with_mask_token_reference"):
        monkeypatch.setattr(mk, name, _spy(record, "masking:reference", getattr(mk, name)))
    attention = {"reference": "_reference_attention", "cpu": "_length_buckets", "triton": "_triton_forward"}
    for backend, name in attention.items():
        monkeypatch.setattr(va, name, _spy(record, f"varlen_attention:{backend}", getattr(va, name)))
    return record


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("op", _dispatch.OPS)
def test_the_backend_asked_for_is_the_one_that_runs(op, backend, ran):
    _call(op, backend, torch.float32)
    assert set(ran) == {f"{op}:{backend}"}


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    signals = [torch.randn(1, 100, generator=g), torch.randn(2, 50, generator=g)]
    text = [torch.randint(0, 100, (3,), generator=g), torch.zeros(0, dtype=torch.long)]
    return Batch(signals, [torch.tensor([1]), torch.tensor([1, 12])], text,
                 [torch.ones_like(s, dtype=torch.bool) for s in signals])


@pytest.mark.parametrize("backend", HERE)
def test_encoder_passes_its_backend_through(backend, ran):
    """CSFMEncoder(cfg, backend="triton") once ran "auto" (the C++ path on CPU): now every op
    runs the backend named, in the encoder and in the pretraining step."""
    config = preset("demo", depth=1, dim=32, heads=2, dim_head=16, mlp_dim=32, dropout=0.0,
                    decoder_dim=16, decoder_heads=1, decoder_mlp_dim=16)
    CSFMEncoder(config, backend=backend).eval()(_batch())
    assert set(ran) == {f"patch_embed:{backend}", f"varlen_attention:{backend}"}
    ran.clear()
    MaskedPretrainer(config, backend=backend)(_batch(), generator=torch.Generator().manual_seed(0))
    assert set(ran) == {f"{op}:{backend}" for op in _dispatch.OPS}


def test_model_backend_is_checked_at_construction():
    config = preset("demo", depth=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        CSFMEncoder(config, backend="fast")
    with pytest.raises(ValueError, match=r"'flash_attn' exists only for varlen_attention; pass a mapping"):
        MaskedPretrainer(config, backend="flash_attn")
    with pytest.raises(ValueError, match=r"unknown ops \['attention'\]"):
        CSFMEncoder(config, backend={"attention": "cpu"})
    with pytest.raises(ValueError, match=r"masking: backend must be one of"):
        CSFMEncoder(config, backend={"masking": "flash_attn"})
    chosen = CSFMEncoder(config, backend={"varlen_attention": "flash_attn"}).backends
    assert chosen == {"patch_embed": "auto", "masking": "auto", "varlen_attention": "flash_attn"}
    assert op_backends("reference") == {op: "reference" for op in _dispatch.OPS}
