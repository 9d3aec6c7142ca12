"""Checkpoints: our own (safetensors weights + JSON config + training state), written
atomically, and the published model's ``.pth`` (``encoder.``-prefixed keys), loaded safely.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from csfm.config import ModelConfig
from csfm.model import CSFMEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "train_state.pt"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it over ``path``:
    a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, model: nn.Module, config: ModelConfig,
                    train_state: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None) -> None:
    """Writes model.safetensors, config.json and (if given) train_state.pt into ``directory``.
    train_state holds only tensors, numbers, strings, lists and dicts (loadable with
    ``weights_only=True``)."""
    directory = Path(directory)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    payload = {"model": config.to_dict(), **(extra_config or {})}
    atomic_write(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    if train_state is not None:
        atomic_write(directory / STATE, lambda tmp: torch.save(train_state, tmp))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory ``run_dir/checkpoints/latest`` points to (a run of
    ``csfm.train``), or None when there is no such pointer."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {directory} a csfm checkpoint directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the weights (corrupt or truncated file?): {exc}") from exc


def load_train_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling errors of every kind
        raise ValueError(f"{path}: cannot read the training state (corrupt file?): {exc}") from exc


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                            ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Strict load with a readable report of missing / unexpected keys and shape mismatches."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)


def load_pretrained(path: str | Path, config: ModelConfig, backend: str = "auto") -> CSFMEncoder:
    """The published encoder from its ``.pth`` (keys prefixed ``encoder.``; ``mlp_head`` ignored),
    or from one of our checkpoint directories. Loaded with ``weights_only=True``."""
    path = Path(path)
    encoder = CSFMEncoder(config, backend)
    if path.is_dir():
        state = load_weights(path)
        prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        try:
            raw = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: not a readable torch checkpoint: {exc}") from exc
        raw = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
        state = {k.removeprefix("encoder."): v for k, v in raw.items()}
    load_state_dict_checked(encoder, state, str(path), ignore_prefixes=("mlp_head",))
    return encoder
