"""Record embeddings from a pretrained encoder: ``python -m csfm.embed`` (also ``csfm-embed``).

Every record of ``--data`` is preprocessed, cut into 10 s windows, optionally reduced to its
ECG or PPG channels, encoded in packed batches, and pooled: one row per record (the mean
of its windows' CLS or mean-token embeddings), keyed by record id and patient id.

What is encoded follows the rule pretraining applies too (csfm.data.preprocess.RecordCheck):
channels without a single valid sample are left out (and named in a warning); within a
window, 0.1 s patches without a valid sample (gaps, the padding after a record's end) are
left out of the token sequence while the other patches keep their positions, so a gap is
encoded as if those patches had not been given, never as zeros. Records the model cannot
use (no channel of the modality with a valid sample, no 10 s window with at least half of
its samples valid) are listed by name and reason before anything is encoded, and the
command fails unless ``--skip-unusable`` leaves them out.

Records longer than 10 min are read and preprocessed 10 min at a time (each part z-scored
on its own), so memory does not grow with the record. Results are cached under
``--cache-dir``, keyed by the checkpoint's weights, the path, size and modification time of
every file each record is read from, and every setting that changes rows.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csfm.model.batch import make_batch
from csfm.files import atomic_write
from csfm.model.checkpoint import WEIGHTS, latest_checkpoint, load_pretrained, read_config
from csfm.cli import OptionError, check_fields, run_command
from csfm.model.config import PRESETS, ModelConfig, preset
from csfm.data.record import RecordSource
from csfm.data.windows import (RecordWindows, UnusableRecordsError, check_usable, find_unusable,
                               record_windows)
from csfm.model.encoder import (RECORD_POOLINGS, TOKEN_POOLINGS, CSFMEncoder, check_token_pooling, pool_by_owner,
                                pool_tokens)
from csfm.training.precision import PRECISIONS, choose_precision
from csfm.data.preprocess import MODALITIES, PreprocessConfig, RecordCheck
from csfm.data.sources import open_sources

OUT_SUFFIXES = (".npy", ".npz", ".parquet")


@dataclass
class EmbedConfig:
    """Options of ``python -m csfm.embed`` (CLI flags of the same names), all checked when
    the config is made (OptionError naming the flag); files are checked by ``run`` before
    any work."""

    checkpoint: str = field(metadata={"help": "a csfm checkpoint directory (or csfm.training.loop run directory), "
                                              "or a published .pth (then --preset)"})
    data: list[str] = field(metadata={"help": "data specs as for csfm.training.loop, e.g. wfdb:PATH"})
    out: str = field(metadata={"help": "output file: .npy (+ .index.csv beside it), .npz or .parquet, "
                                       "in an existing folder"})
    preset: str = field(default="", metadata={"help": "model preset of a .pth checkpoint",
                                              "choices": ("", *PRESETS)})
    modality: str = field(default="both", metadata={"help": "channels to embed: both, ecg or ppg",
                                                    "choices": MODALITIES})
    pooling: str = field(default="cls", metadata={
        "help": "per window: cls (as the reference), mean of tokens, mean+std (2 d wide) or mean+std+rhythm "
                "(2 d + 100 wide: also how alike tokens 0.1-2.5 s apart are, and how steadily along the window)",
        "choices": TOKEN_POOLINGS})
    batch_windows: int = field(default=32, metadata={"help": "10 s windows per encoder batch (>= 1)"})
    keep_windows: bool = field(default=False, metadata={"help": "also save every window's embedding and start time"})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16, fp16 (CUDA) or auto",
                                                     "choices": PRECISIONS})
    cache_dir: str = field(default="", metadata={"help": "reuse embeddings computed before (empty = no cache)"})
    skip_unusable: bool = field(default=False, metadata={
        "help": "leave out the records the model cannot use (listed in a warning) instead of failing"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_windows < 1:
            raise OptionError(f"--batch-windows must be >= 1, got {self.batch_windows}")
        if not self.data:
            raise OptionError("--data: give at least one data spec, e.g. wfdb:PATH")
        check_out_suffix(self.out)


def check_out_suffix(path: str | Path) -> None:
    """OptionError naming --out unless ``path`` ends in one of OUT_SUFFIXES."""
    if Path(path).suffix not in OUT_SUFFIXES:
        raise OptionError(f"--out {path}: use a .npy, .npz or .parquet file")


@dataclass
class Embeddings:
    """embeddings [N, d] float32 (one row per record); record_ids, patient_ids [N];
    n_windows [N]; with keep_windows: window_embeddings [W, d], window_record [W] (row of
    the record), window_start_s [W] (seconds into the record). empty_channels [N] str: the
    channels of each record left out for having no valid sample, comma-separated ("" for
    none); unusable_ids, unusable_reasons [K] str: the records left out by --skip-unusable
    and why (.npz keeps these; files of other versions may lack them: None)."""

    embeddings: np.ndarray
    record_ids: np.ndarray
    patient_ids: np.ndarray
    n_windows: np.ndarray
    window_embeddings: np.ndarray | None = None
    window_record: np.ndarray | None = None
    window_start_s: np.ndarray | None = None
    empty_channels: np.ndarray | None = None
    unusable_ids: np.ndarray | None = None
    unusable_reasons: np.ndarray | None = None

    def save(self, path: Path) -> None:
        """.npz with every field; .npy (embeddings) plus ``<name>.index.csv`` (ids, windows);
        or .parquet: one row per record with record_id, patient_id, n_windows, e0..e{d-1}."""
        path = Path(path)
        check_out_suffix(path)
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
        else:
            atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), self.embeddings))
            rows = ["record_id,patient_id,n_windows"] + [
                f"{r},{p},{n}" for r, p, n in zip(self.record_ids, self.patient_ids, self.n_windows)]
            atomic_write(path.with_suffix(".index.csv"), lambda tmp: tmp.write_text("\n".join(rows) + "\n"))

    @classmethod
    def load(cls, path: Path) -> "Embeddings":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in data.files})


@torch.no_grad()
def encode_windows(encoder: CSFMEncoder, signals: Sequence[np.ndarray], channel_types: Sequence[Sequence[int]],
                   valid: Sequence[np.ndarray], pooling: str = "cls", autocast=contextlib.nullcontext) -> np.ndarray:
    """One packed encoder batch of windows -> their embeddings [B, d] float32.

    signals[b], valid[b]: [C_b, T_b] preprocessed samples and validity (T_b a multiple of 25,
    at most 10 s); channel_types[b]: [C_b]. Patches without a valid sample are left out of
    the token sequence and the others keep their channel type and position
    (``Batch.valid_patches``): the result is exactly that of the window with those patches
    not given, and the zeros a gap or the padding after a record's end holds are never
    encoded. ValueError for a window with no valid sample at all. pooling: "cls", "mean"
    (of the non-CLS tokens), "mean+std" (their mean and standard deviation side by side:
    [B, 2 d]) or "mean+std+rhythm" (and the tokens' rhythm, ``csfm.model.token_rhythm``);
    autocast: a context manager factory (e.g. a Precision's ``autocast``). Call with the
    encoder in eval mode.
    """
    check_token_pooling(pooling)
    device = next(encoder.parameters()).device
    batch = make_batch(list(signals), [list(t) for t in channel_types], valid=list(valid))
    rows, n_kept = batch.valid_patches()
    if not all(n_kept):
        raise ValueError(f"windows {[b for b, n in enumerate(n_kept) if not n]} of the batch have no valid sample")
    with autocast():
        out = encoder.encode_valid(batch.to(device), rows, n_kept)
    return pool_tokens(out, pooling).cpu().numpy()


@torch.no_grad()
def embed_windows(encoder: CSFMEncoder, windows: Iterable[tuple[int, RecordWindows]], pooling: str = "cls",
                  batch_windows: int = 32, autocast=contextlib.nullcontext) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """Encodes every window of ``windows`` ((owner, RecordWindows) pairs, consumed lazily, so
    a long record's parts are read one at a time) in packed batches of ``batch_windows``
    (``encode_windows``) -> (vectors [W, pooled_width(d, pooling)] float32;
    owner [W] int64, the owner given with each window; start_s [W] float64, seconds into
    its record). Call with the encoder in eval mode."""
    if batch_windows < 1:
        raise ValueError(f"batch_windows must be >= 1, got {batch_windows}")
    owners, starts, vectors, pending = [], [], [], []

    def flush() -> None:
        vectors.append(encode_windows(encoder, *zip(*pending), pooling, autocast))
        pending.clear()

    for owner, part in windows:
        for x, valid, start_s in zip(part.x, part.valid, part.start_s):
            pending.append((x, part.channel_types, valid))
            owners.append(owner)
            starts.append(float(start_s))
            if len(pending) == batch_windows:
                flush()
    if pending:
        flush()
    if not vectors:
        raise ValueError("no window to embed")
    return np.concatenate(vectors), np.asarray(owners, np.int64), np.asarray(starts)


@torch.no_grad()
def embed_source(encoder: CSFMEncoder, source: RecordSource, modality: str = "both", pooling: str = "cls",
                 batch_windows: int = 32, keep_windows: bool = False, precision: str = "fp32",
                 preprocess: PreprocessConfig | None = None, progress: bool = True,
                 skip_unusable: bool = False, stride_s: float | None = None,
                 record_pooling: str = "mean") -> Embeddings:
    """Embeds every record of ``source``: its windows ``stride_s`` apart (default: the
    window, no overlap; ``csfm.data.windows.record_windows``, so a long record of a
    WindowedSource is read in parts), each pooled over its tokens (``pooling``: cls, mean,
    mean+std or mean+std+rhythm, ``csfm.model.encoder.pool_tokens``), then over the record's windows
    (``record_pooling``: mean or mean+max, ``csfm.model.encoder.pool_by_owner``).
    Deterministic (eval mode).

    The records the model cannot use are found first (``csfm.data.windows.find_unusable``):
    ValueError listing each by id and reason, or with ``skip_unusable`` a warning, and they
    are left out (``Embeddings.unusable_*``). Channels without a valid sample are left out
    and named in a warning (``Embeddings.empty_channels``).
    """
    check_token_pooling(pooling)
    if record_pooling not in RECORD_POOLINGS:
        raise ValueError(f"record_pooling must be one of {RECORD_POOLINGS}, got {record_pooling!r}")
    encoder.eval()
    autocast = choose_precision(precision, next(encoder.parameters()).device).autocast
    preprocess = preprocess or PreprocessConfig()
    unusable = find_unusable(source, range(len(source)), preprocess, modality, progress=progress)
    check_usable(unusable, len(source), skip_unusable)
    todo = [row for row in range(len(source)) if row not in unusable]
    if not todo:
        raise ValueError(f"none of the {len(source)} records has a usable {modality} window")
    ids, empty = {}, {}

    def windows() -> Iterator[tuple[int, RecordWindows]]:
        for row in tqdm(todo, disable=not progress, unit="record", desc="embedding"):
            check = RecordCheck(preprocess, modality)
            for part in record_windows(source, row, check, stride_s):
                ids[row] = (part.record_id, part.patient_id)
                yield row, part
            if check.problem:
                raise ValueError(f"record {ids.get(row, (f'#{row}',))[0]}: {check.problem} (it was usable when "
                                 f"checked: did its files change?)")
            empty[row] = ",".join(check.empty_channels)

    vectors, rows, starts = embed_windows(encoder, windows(), pooling, batch_windows, autocast)
    order = sorted(ids)
    owner = np.searchsorted(order, rows)  # row of each window's record in the result
    pooled = pool_by_owner(torch.from_numpy(vectors).double(), torch.from_numpy(owner), len(order), record_pooling)
    extra = (vectors, owner, starts) if keep_windows else (None, None, None)
    result = Embeddings(pooled.float().numpy(), np.array([ids[r][0] for r in order]),
                        np.array([ids[r][1] for r in order]), np.bincount(owner, minlength=len(order)), *extra,
                        empty_channels=np.array([empty[row] for row in order]),
                        unusable_ids=np.array([name for name, _ in unusable.values()], dtype=str),
                        unusable_reasons=np.array([why for _, why in unusable.values()], dtype=str))
    _warn_empty_channels(result)
    return result


def _warn_empty_channels(result: Embeddings) -> None:
    """A warning naming every record that had channels left out for having no valid sample."""
    listing = [f"  {r}: {names}" for r, names in zip(result.record_ids, result.empty_channels) if names]
    if listing:
        warnings.warn(f"{len(listing)} record(s) have channels without a valid sample, left out:\n"
                      + "\n".join(listing), stacklevel=3)


def resolve_checkpoint(checkpoint: str | Path, preset_name: str = "") -> Path:
    """The checkpoint directory or published .pth file that ``checkpoint`` names (for a
    ``csfm.training.loop`` run directory, its latest checkpoint). OptionError naming --checkpoint
    when it does not exist, or is a .pth and no preset is given."""
    path = Path(checkpoint)
    if not path.exists():
        raise OptionError(f"--checkpoint {path}: no such file or directory")
    path = latest_checkpoint(path) or path
    if path.is_file() and not preset_name:
        raise OptionError(f"--checkpoint {path}: a .pth checkpoint needs --preset (one of {sorted(PRESETS)})")
    return path


def load_encoder(checkpoint: str | Path, preset_name: str = "") -> CSFMEncoder:
    """The encoder of one of our checkpoint directories (or of the latest checkpoint of a
    ``csfm.training.loop`` run directory), or of a published .pth (needs a preset)."""
    path = resolve_checkpoint(checkpoint, preset_name)
    config = ModelConfig.from_dict(read_config(path)["model"]) if path.is_dir() else preset(preset_name)
    return load_pretrained(path, config)


def cache_key(config: EmbedConfig, source, preprocess: PreprocessConfig) -> str:
    """Hash of the checkpoint's weights file, of what every record of ``source`` is read from
    (each file's path, size and modification time, record by record: a changed, added or
    deleted record changes the key) and of every setting that changes rows."""
    digest = hashlib.sha256()
    checkpoint = resolve_checkpoint(config.checkpoint, config.preset)
    with open(checkpoint / WEIGHTS if checkpoint.is_dir() else checkpoint, "rb") as weights:
        digest.update(hashlib.file_digest(weights, "sha256").digest())
    for index in range(len(source)):
        digest.update(f"record {index}\n".encode())
        for path in source.record_files(index):
            stat = path.stat() if path.is_file() else None
            size, modified = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
            digest.update(f"{path.resolve()} {size} {modified}\n".encode())
    settings = {"data": config.data, "preset": config.preset, "modality": config.modality, "pooling": config.pooling,
                "keep_windows": config.keep_windows, "precision": config.precision,
                "skip_unusable": config.skip_unusable, "preprocess": asdict(preprocess)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def run(config: EmbedConfig) -> Embeddings:
    """Embeds (or reads from the cache) and writes ``config.out``. The output folder, the
    cache folder, the checkpoint and the data are checked before anything is embedded."""
    out = Path(config.out)
    if not out.parent.is_dir():
        raise OptionError(f"--out {out}: folder {out.parent} does not exist")
    if config.cache_dir and Path(config.cache_dir).exists() and not Path(config.cache_dir).is_dir():
        raise OptionError(f"--cache-dir {config.cache_dir}: not a folder")
    encoder = load_encoder(config.checkpoint, config.preset)
    choose_precision(config.precision, next(encoder.parameters()).device)
    try:
        source = open_sources(config.data)
    except (ValueError, OSError) as error:
        raise OptionError(f"--data {' '.join(config.data)}: {error}") from error
    preprocess = PreprocessConfig()
    cached = Path(config.cache_dir) / f"{cache_key(config, source, preprocess)}.npz" if config.cache_dir else None
    if cached is not None and cached.is_file():
        result = Embeddings.load(cached)
        print(f"csfm.embed: {len(result.embeddings)} records from the cache {cached}", file=sys.stderr)
        check_usable(dict(enumerate(zip(result.unusable_ids, result.unusable_reasons))),
                     len(result.embeddings) + len(result.unusable_ids), skip_unusable=True)
        _warn_empty_channels(result)
    else:
        result = embed_source(encoder, source, config.modality, config.pooling, config.batch_windows,
                              config.keep_windows, config.precision, preprocess, progress=not config.quiet,
                              skip_unusable=config.skip_unusable)
        if cached is not None:
            result.save(cached)
    result.save(out)
    print(f"csfm.embed: {len(result.embeddings)} records x {result.embeddings.shape[1]} -> {out}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the CLI; a bad option (exit status 2) or unusable records (exit status 1) end
    with an error message naming them, without a traceback."""
    run_command(run, EmbedConfig, argv, "python -m csfm.embed", __doc__, failures=(UnusableRecordsError,))


if __name__ == "__main__":
    main()
