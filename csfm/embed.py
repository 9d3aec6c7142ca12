"""Record embeddings from a pretrained encoder: ``python -m csfm.embed`` (also ``csfm-embed``).

Every record of ``--data`` is preprocessed, cut into 10 s windows, optionally reduced to its
ECG or PPG channels, encoded in packed batches, and pooled: one row per record (the mean
of its windows' CLS or mean-token embeddings), keyed by record id and patient id. Results
are cached under ``--cache-dir`` by checkpoint + data + preprocessing, so repeated probes
do not recompute.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csfm.batch import make_batch
from csfm.checkpoint import WEIGHTS, atomic_write, latest_checkpoint, load_pretrained, read_config
from csfm.cli import add_dataclass_options
from csfm.config import ModelConfig, preset
from csfm.model import CSFMEncoder, check_token_pooling, pool_tokens
from csfm.precision import choose_precision
from csfm.preprocess import PreprocessConfig, preprocess_record
from csfm.record import PPG_TYPE
from csfm.sources import open_sources
from csfm_kernels.patch_embed import PATCH_LEN

MODALITIES = ("both", "ecg", "ppg")


@dataclass
class EmbedConfig:
    """Options of ``python -m csfm.embed`` (CLI flags of the same names)."""

    checkpoint: str = field(metadata={"help": "a csfm checkpoint directory, or a published .pth (then --preset)"})
    data: list[str] = field(metadata={"help": "data specs as for csfm.train, e.g. wfdb:PATH"})
    out: str = field(metadata={"help": "output file: .npy (+ .index.csv beside it), .npz or .parquet"})
    preset: str = field(default="", metadata={"help": "model preset of a .pth checkpoint"})
    modality: str = field(default="both", metadata={"help": "channels to embed: both, ecg or ppg"})
    pooling: str = field(default="cls", metadata={"help": "per window: cls (as the reference), mean of tokens, or mean+std (2 d wide)"})
    batch_windows: int = field(default=32, metadata={"help": "10 s windows per encoder batch"})
    keep_windows: bool = field(default=False, metadata={"help": "also save every window's embedding and start time"})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or auto"})
    cache_dir: str = field(default="", metadata={"help": "reuse embeddings computed before (empty = no cache)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})


@dataclass
class Embeddings:
    """embeddings [N, d] float32 (one row per record); record_ids, patient_ids [N];
    n_windows [N]; with keep_windows: window_embeddings [W, d], window_record [W] (row of
    the record), window_start_s [W] (seconds into the record)."""

    embeddings: np.ndarray
    record_ids: np.ndarray
    patient_ids: np.ndarray
    n_windows: np.ndarray
    window_embeddings: np.ndarray | None = None
    window_record: np.ndarray | None = None
    window_start_s: np.ndarray | None = None

    def save(self, path: Path) -> None:
        """.npz with every field; .npy (embeddings) plus ``<name>.index.csv`` (ids, windows);
        or .parquet: one row per record with record_id, patient_id, n_windows, e0..e{d-1}."""
        path = Path(path)
        if path.suffix == ".parquet":
            import pandas as pd

            table = pd.DataFrame(self.embeddings, columns=[f"e{i}" for i in range(self.embeddings.shape[1])])
            table.insert(0, "n_windows", self.n_windows)
            table.insert(0, "patient_id", self.patient_ids)
            table.insert(0, "record_id", self.record_ids)
            atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
        elif path.suffix == ".npz":
            arrays = {k: v for k, v in asdict(self).items() if v is not None}
            atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
        elif path.suffix == ".npy":
            atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), self.embeddings))
            rows = ["record_id,patient_id,n_windows"] + [
                f"{r},{p},{n}" for r, p, n in zip(self.record_ids, self.patient_ids, self.n_windows)]
            atomic_write(path.with_suffix(".index.csv"), lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
        else:
            raise ValueError(f"--out {path}: use a .npy, .npz or .parquet file")

    @classmethod
    def load(cls, path: Path) -> "Embeddings":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in data.files})


def select_channels(types: Sequence[int], modality: str) -> list[int]:
    """Indices of the channels of ``modality`` ("both", "ecg", "ppg")."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return [i for i, t in enumerate(types)
            if modality == "both" or (modality == "ppg") == (int(t) == PPG_TYPE)]


def _windows(source, preprocess: PreprocessConfig, modality: str, skipped: list[str]) -> Iterator[tuple]:
    """Yields (record row, record id, patient id, x [C, window], valid, types, start_s) per window."""
    for row in range(len(source)):
        record = source[row]
        keep = select_channels(record.channel_types, modality)
        if not keep:
            skipped.append(record.record_id)
            continue
        windows = preprocess_record(record, preprocess)
        types = [record.channel_types[c] for c in keep]
        for x, valid, start in zip(windows.x, windows.valid, windows.start_s):
            length = _valid_length(valid[keep])
            yield (row, record.record_id, record.patient_id, x[keep][:, :length], valid[keep][:, :length], types,
                   float(start))


def _valid_length(valid: np.ndarray) -> int:
    """Samples up to the last valid one, rounded up to whole 25-sample patches: the zero
    padding after a record's end is cut off, not encoded (the encoder takes any length)."""
    columns = np.flatnonzero(valid.any(axis=0))
    end = int(columns[-1]) + 1 if len(columns) else valid.shape[1]
    return min(valid.shape[1], -(-end // PATCH_LEN) * PATCH_LEN)


@torch.no_grad()
def encode_windows(encoder: CSFMEncoder, signals: Sequence[np.ndarray], channel_types: Sequence[Sequence[int]],
                   valid: Sequence[np.ndarray], pooling: str = "cls", autocast=contextlib.nullcontext) -> np.ndarray:
    """One packed encoder batch of windows -> their embeddings [B, d] float32.

    signals[b], valid[b]: [C_b, T_b] preprocessed samples and validity (T_b a multiple of 25,
    at most 10 s); channel_types[b]: [C_b]; pooling: "cls", "mean" (of the non-CLS tokens) or
    "mean+std" (their mean and standard deviation side by side: [B, 2 d]); autocast: a context
    manager factory (e.g. a Precision's ``autocast``). Call with the encoder in eval mode.
    """
    check_token_pooling(pooling)
    device = next(encoder.parameters()).device
    batch = make_batch(list(signals), [list(t) for t in channel_types], valid=list(valid))
    with autocast():
        out = encoder(batch.to(device))
    return pool_tokens(out, pooling).cpu().numpy()


@torch.no_grad()
def embed_source(encoder: CSFMEncoder, source, modality: str = "both", pooling: str = "cls",
                 batch_windows: int = 32, keep_windows: bool = False, precision: str = "fp32",
                 preprocess: PreprocessConfig | None = None, progress: bool = True) -> Embeddings:
    """Embeds every record of ``source`` (len / [i] -> Record). Deterministic (eval mode)."""
    check_token_pooling(pooling)
    encoder.eval()
    autocast = choose_precision(precision, next(encoder.parameters()).device).autocast
    preprocess = preprocess or PreprocessConfig()
    skipped: list[str] = []
    rows, starts, vectors, ids = [], [], [], {}
    pending: list[tuple] = []

    def flush() -> None:
        vectors.append(encode_windows(encoder, [w[3] for w in pending], [w[5] for w in pending],
                                      [w[4] for w in pending], pooling, autocast))
        pending.clear()

    bar = tqdm(total=len(source), disable=not progress, unit="record", desc="embedding")
    last_row = -1
    for window in _windows(source, preprocess, modality, skipped):
        row, record_id, patient_id = window[:3]
        if row != last_row:
            bar.update(row - last_row)
            last_row = row
        ids[row] = (record_id, patient_id)
        rows.append(row)
        starts.append(window[6])
        pending.append(window)
        if len(pending) == batch_windows:
            flush()
    if pending:
        flush()
    bar.close()
    if skipped:
        warnings.warn(f"{len(skipped)} record(s) have no {modality} channel and were not embedded: "
                      f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
    if not rows:
        raise ValueError(f"no record has a {modality} channel with enough valid signal to embed")
    return _pool(np.concatenate(vectors), np.asarray(rows), np.asarray(starts), ids, keep_windows)


def _pool(window_vectors: np.ndarray, rows: np.ndarray, starts: np.ndarray, ids: dict,
          keep_windows: bool) -> Embeddings:
    """Mean of each record's window embeddings, rows in record order."""
    order = sorted(ids)
    index = {row: i for i, row in enumerate(order)}
    owner = np.array([index[r] for r in rows])
    counts = np.bincount(owner, minlength=len(order))
    sums = np.zeros((len(order), window_vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, window_vectors)
    extra = (window_vectors, owner, starts) if keep_windows else (None, None, None)
    return Embeddings((sums / counts[:, None]).astype(np.float32), np.array([ids[r][0] for r in order]),
                      np.array([ids[r][1] for r in order]), counts, *extra)


def load_encoder(checkpoint: str | Path, preset_name: str = "") -> CSFMEncoder:
    """The encoder of one of our checkpoint directories (or of the latest checkpoint of a
    ``csfm.train`` run directory), or of a published .pth (needs a preset)."""
    path = Path(checkpoint)
    path = latest_checkpoint(path) or path
    if path.is_dir():
        config = ModelConfig.from_dict(read_config(path)["model"])
    elif preset_name:
        config = preset(preset_name)
    else:
        raise ValueError(f"{path}: a .pth checkpoint needs --preset (tiny, base or large)")
    return load_pretrained(path, config)


def cache_key(config: EmbedConfig, preprocess: PreprocessConfig) -> str:
    """Hash of the checkpoint's weights file, the data specs and every setting that changes rows."""
    digest = hashlib.sha256()
    checkpoint = latest_checkpoint(config.checkpoint) or Path(config.checkpoint)
    weights = checkpoint / WEIGHTS if checkpoint.is_dir() else checkpoint
    digest.update(hashlib.sha256(weights.read_bytes()).digest())
    settings = {"data": config.data, "preset": config.preset, "modality": config.modality, "pooling": config.pooling,
                "keep_windows": config.keep_windows, "precision": config.precision, "preprocess": asdict(preprocess)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def run(config: EmbedConfig) -> Embeddings:
    """Embeds (or reads from the cache) and writes ``config.out``."""
    preprocess = PreprocessConfig()
    cached = Path(config.cache_dir) / f"{cache_key(config, preprocess)}.npz" if config.cache_dir else None
    if cached is not None and cached.is_file():
        result = Embeddings.load(cached)
        print(f"csfm.embed: {len(result.embeddings)} records from the cache {cached}", file=sys.stderr)
    else:
        encoder = load_encoder(config.checkpoint, config.preset)
        source = open_sources(config.data)
        result = embed_source(encoder, source, config.modality, config.pooling, config.batch_windows,
                              config.keep_windows, config.precision, preprocess, progress=not config.quiet)
        if cached is not None:
            result.save(cached)
    result.save(Path(config.out))
    print(f"csfm.embed: {len(result.embeddings)} records x {result.embeddings.shape[1]} -> {config.out}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m csfm.embed", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_options(parser, EmbedConfig)
    run(EmbedConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
