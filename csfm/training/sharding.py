"""``--sharding fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) for pretraining.

Each attention and feed-forward module of the encoder and decoder is sharded on its own, then
the whole pretrainer (its embeddings and heads): every process holds 1/N of the parameters,
gradients and optimizer state, gathering a block's parameters only while it runs. On CUDA
with bf16/fp16, blocks compute in that dtype and reduce gradients in fp32.

Checkpoints: the full weights gathered on rank 0 as ``model.safetensors`` (what embedding and
fine-tuning load, in one process, as for any run) and the sharded model and optimizer state in
``sharded/`` (``torch.distributed.checkpoint``, every rank writing its part; a temp folder
renamed once all are done), which a resumed run of any number of processes loads back.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from csfm.model.encoder import Transformer
from csfm.training.precision import Precision

SHARDED = "sharded"
"""Folder of a checkpoint holding the sharded model and optimizer state."""


def shard_model(model: nn.Module, precision: Precision, device: torch.device) -> None:
    """Applies fully_shard in place: the attention and the feed-forward module of each layer of
    every ``Transformer`` in ``model``, then ``model`` itself. Call before building the
    optimizer (the parameters become sharded DTensors)."""
    half = device.type == "cuda" and precision.dtype is not None
    policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32) if half else \
        MixedPrecisionPolicy()
    for transformer in [m for m in model.modules() if isinstance(m, Transformer)]:
        for attention, feed_forward in transformer.layers:
            fully_shard(attention, mp_policy=policy)
            fully_shard(feed_forward, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU, on rank 0 (empty elsewhere). Every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Writes the sharded model and optimizer state to ``directory/sharded`` (every rank its
    part, into a temp folder that rank 0 renames once all have written). Every rank must call it."""
    temp, final = directory / f".{SHARDED}.tmp", directory / SHARDED
    if dist.get_rank() == 0:
        shutil.rmtree(temp, ignore_errors=True)  # a killed run's unfinished write
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(temp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
    dist.barrier()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Loads ``directory/sharded`` into the sharded model and its optimizer (resharded to this
    run's number of processes). Every rank must call it."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def gradient_sync_paused(trained: nn.Module) -> Iterator[None]:
    """No gradient reduction in the block (micro-batches before the last of a step): DDP's
    ``no_sync``, or FSDP's ``set_requires_gradient_sync(False)``."""
    if isinstance(trained, FSDPModule):
        trained.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trained.set_requires_gradient_sync(True)
    else:
        with trained.no_sync():
            yield
