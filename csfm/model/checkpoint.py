"""Checkpoints: our own (safetensors weights + JSON config + training state), written
atomically, and the published model's ``.pth`` (``encoder.``-prefixed keys), loaded safely.

Every loader raises FileNotFoundError or ValueError naming the file and what it expected.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from csfm.files import atomic_write
from csfm.model.config import ModelConfig
from csfm.model.encoder import CSFMEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "train_state.pt"
_SHOWN = 5  # keys listed per kind of mismatch in load_state_dict_checked


def save_checkpoint(directory: Path, model: nn.Module, config: ModelConfig,
                    train_state: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """Writes model.safetensors, config.json and (if given) train_state.pt into ``directory``.
    train_state holds only tensors, numbers, strings, lists and dicts (loadable with
    ``weights_only=True``). weights: the full weights where ``model`` holds only its shard of
    them (FSDP); default ``model.state_dict()``."""
    directory = Path(directory)
    weights = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    payload = {"model": config.to_dict(), **(extra_config or {})}
    atomic_write(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    if train_state is not None:
        atomic_write(directory / STATE, lambda tmp: torch.save(train_state, tmp))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory ``run_dir/checkpoints/latest`` points to (a run of
    ``csfm.training.loop``), or None when there is no such pointer. FileNotFoundError when the
    pointer names a directory that is gone."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or not (pointer.parent / name).is_dir():
        raise FileNotFoundError(f"{pointer} points to checkpoint {name!r}, but {pointer.parent / name} "
                                f"is not a directory")
    return pointer.parent / name


def _checkpoint_dir(directory: str | Path) -> Path:
    """``directory`` as a Path; FileNotFoundError when it is not an existing directory."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not" if directory.exists() else "does not exist: expected"
        raise FileNotFoundError(f"checkpoint {directory} {what} a csfm checkpoint directory "
                                f"({WEIGHTS} + {CONFIG})")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The JSON object in ``directory/config.json``, checked to hold a ``"model"`` object that
    ModelConfig accepts (FileNotFoundError / ValueError naming the file otherwise)."""
    path = _checkpoint_dir(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG} (is {directory} a csfm checkpoint directory?)")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object with a \"model\" entry, got a {type(payload).__name__}")
    if not isinstance(payload.get("model"), dict):
        got = "no \"model\" entry" if "model" not in payload else f"a {type(payload['model']).__name__}"
        raise ValueError(f"{path}: expected \"model\" to be a JSON object of ModelConfig fields, got {got}")
    try:
        ModelConfig.from_dict(payload["model"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: \"model\" is not a valid ModelConfig: {exc}") from exc
    return payload


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """{name: tensor} from ``directory/model.safetensors`` (on the CPU)."""
    path = _checkpoint_dir(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file {WEIGHTS} in checkpoint directory {directory}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the weights (corrupt or truncated file?): {exc}") from exc


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """The training state dict of ``directory/train_state.pt``, loaded with ``weights_only=True``."""
    path = _checkpoint_dir(directory) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state {STATE} in checkpoint directory {directory} "
                                f"(a checkpoint saved without one cannot be resumed)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling errors of every kind
        raise ValueError(f"{path}: cannot read the training state (corrupt file?): {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of training state, got a {type(state).__name__}")
    return state


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                            ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Strict ``module.load_state_dict(state)`` that fails with a short report instead of
    torch's error: ValueError naming ``source`` (a file) for a key that is not a string or
    a value that is not a tensor, and listing the missing keys, the unexpected ones (both
    grouped by numbered block, e.g. ``transformer.layers.3.*``) and the shape mismatches,
    at most a few of each. Keys starting with one of ``ignore_prefixes`` are left out."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} holds a {type(value).__name__}, expected a tensor "
                             f"under a string key (is this a state dict?)")
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong = sorted(f"{k} {list(state[k].shape)} in the checkpoint, {list(expected[k].shape)} in the model"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model (tensors: {len(missing)} missing, {len(unexpected)} "
                 f"unexpected, {len(wrong)} of another shape; was it saved with other model settings, e.g. "
                 f"another preset?)"]
        for title, items, join in (("missing", _blocks(missing), ", "), ("unexpected", _blocks(unexpected), ", "),
                                   ("shape mismatch", wrong, "; ")):
            if items:
                more = f"{join}... ({len(items)} in all)" if len(items) > _SHOWN else ""
                lines.append(f"  {title}: {join.join(items[:_SHOWN])}{more}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)


def _blocks(keys: set[str]) -> list[str]:
    """Sorted keys with those inside a numbered block merged: ``a.layers.3.0.w`` and
    ``a.layers.3.1.b`` -> ``a.layers.3.*``."""
    return sorted({(f"{m.group(1)}.*" if (m := re.match(r"(.*?\.\d+)\.", key)) else key) for key in keys})


def load_pretrained(path: str | Path, config: ModelConfig, backend: str = "auto") -> CSFMEncoder:
    """The published encoder from its ``.pth`` (keys prefixed ``encoder.``; ``mlp_head`` ignored),
    or from one of our checkpoint directories. Loaded with ``weights_only=True``.
    FileNotFoundError when ``path`` does not exist; ValueError naming it when it holds no
    state dict of tensors matching ``config``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: expected a .pth file or a csfm checkpoint "
                                f"directory ({WEIGHTS} + {CONFIG})")
    encoder = CSFMEncoder(config, backend)
    if path.is_dir():
        state = load_weights(path)
        prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        try:
            raw = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise ValueError(f"{path}: not a readable torch checkpoint: {exc}") from exc
        raw = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
        state = {k.removeprefix("encoder.") if isinstance(k, str) else k: v for k, v in raw.items()}
    load_state_dict_checked(encoder, first_positions(state, config.n_positions), str(path),
                            ignore_prefixes=("mlp_head",))
    return encoder


def first_positions(state: dict[str, torch.Tensor], n_positions: int) -> dict[str, torch.Tensor]:
    """An encoder state whose position table ``ts_pos_embedding`` [1, P, d] holds more than
    ``n_positions`` positions (pretrained on windows longer than 10 s: ``--window-s``) cut to
    its first ``n_positions``: each position is one 0.1 s patch in either, so the encoder
    then embeds windows of up to ``n_positions`` patches as it did in training. Any other
    state is returned as it is."""
    table = state.get("ts_pos_embedding")
    if not isinstance(table, torch.Tensor) or table.dim() != 3 or table.shape[1] <= n_positions:
        return state
    return {**state, "ts_pos_embedding": table[:, :n_positions].contiguous()}
