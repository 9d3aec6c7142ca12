"""Which on-disk format for prepared pretraining shards: write, size and random-access read speed.

Writes N synthetic prepared records (float16 [C, T] at 250 Hz with NaN runs, plus ids, channel
types, report and JSON metadata; 60 % 12 x 2500, 20 % 1 x 7500, 20 % 2 x 15000; fixed seed) in
each candidate format, in shards of about 64 MiB under a temp folder, then reads them back the
way pretraining does, in one process with one torch thread: item i uniform at random, a random
2500-sample crop, float32 and a valid mask (not NaN). The first pass runs right after the
format's files are dropped from the page cache (cold), the second on the same open reader
(warm). webdataset has no access by index: its passes read the tar stream in order.

The candidates are optional packages that the project does not install; put them in a scratch
venv (torch pinned to the local CPU wheel) and run the script with that venv's python:

    python3 -m venv /tmp/fmtvenv
    /tmp/fmtvenv/bin/pip install torch==2.13.0 numpy pyarrow zarr mosaicml-streaming litdata webdataset h5py
    /tmp/fmtvenv/bin/python bench/shard_formats.py --out /tmp/formats/results.md --install-logs /tmp/formats/deplogs

A candidate whose package does not import is skipped with the reason in the table. The "extra
packages" column counts what pip would add for the package next to torch and numpy: for each
pip name, DIR/NAME.log holds the output of `pip install --dry-run torch==2.13.0 NAME` in a venv
that has only torch==2.13.0 and numpy (or of a real install: its 'Successfully installed' line).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import platform
import re
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

FS = 250
WINDOW = 2500                       # samples of one training crop (10 s at 250 Hz)
SHARD_BYTES = 64 << 20              # target shard size
MIX = ((12, 2500, 0.6), (1, 7500, 0.2), (2, 15000, 0.2))   # (channels, samples, share of records)
WORDS = "sinus rhythm normal axis left bundle branch block atrial fibrillation st elevation t wave inversion".split()

Item = tuple[Any, np.ndarray]
"""One stored record as read back: signal float16 [C, T] (numpy array, or an h5py dataset sliced
lazily) and channel_types int8 [C]."""


@dataclass
class Record:
    """One prepared record: signal float16 [C, T] at 250 Hz, NaN where a sample is invalid."""

    signal: np.ndarray
    record_id: str
    patient_id: str
    channel_types: list[int]
    report: str
    metadata: str


def make_records(n: int, seed: int) -> list[Record]:
    """``n`` synthetic records: gaussian float16 signals (std 0.5) with 0-3 NaN runs of 10-500
    samples each; shapes drawn from MIX."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(MIX), size=n, p=[share for *_, share in MIX])
    records = []
    for i, kind in enumerate(kinds):
        channels, samples, _ = MIX[kind]
        signal = (rng.standard_normal((channels, samples), np.float32) * 0.5).astype(np.float16)
        for _ in range(rng.integers(0, 4)):
            start, length = rng.integers(0, samples - 10), rng.integers(10, 501)
            signal[rng.integers(0, channels), start:start + length] = np.nan
        channel_types = list(range(12)) if channels == 12 else sorted(rng.choice(12, channels, replace=False).tolist())
        report = " ".join(rng.choice(WORDS, rng.integers(5, 40)))
        metadata = json.dumps({"fs": FS, "age": int(rng.integers(18, 95)), "sex": "MF"[i % 2], "site": "synthetic"})
        records.append(Record(signal, f"rec{i:07d}", f"pat{i // 3:06d}", channel_types, report, metadata))
    return records


def shard_groups(records: list[Record]) -> list[list[Record]]:
    """Consecutive records cut into groups of about SHARD_BYTES signal bytes."""
    groups: list[list[Record]] = [[]]
    size = 0
    for record in records:
        if size >= SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(record)
        size += record.signal.nbytes
    return groups


def shard_of(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Items per shard -> (shard number, row in shard) of every global item index, int64 [N] each."""
    shard = np.repeat(np.arange(len(counts)), counts)
    row = np.arange(len(shard)) - np.repeat(np.cumsum([0, *counts[:-1]]), counts)
    return shard, row


def flat_blocks(records: list[Record], block: int) -> Iterator[np.ndarray]:
    """All signals flattened (C order) and concatenated, cut into float16 blocks of ``block``
    samples (the last one shorter); the same buffer is yielded each time."""
    buffer, fill = np.empty(block, np.float16), 0
    for record in records:
        flat = record.signal.ravel()
        while flat.size:
            take = min(block - fill, flat.size)
            buffer[fill:fill + take], fill, flat = flat[:take], fill + take, flat[take:]
            if fill == block:
                yield buffer
                fill = 0
    if fill:
        yield buffer[:fill]


# --- Arrow IPC (the layout of csfm/data/shards.py: one row per record, signal as large_binary) ---

def write_arrow(records: list[Record], folder: Path) -> None:
    """One Arrow IPC file (one record batch) per shard group."""
    import pyarrow as pa

    schema = pa.schema([("record_id", pa.string()), ("patient_id", pa.string()),
                        ("channel_types", pa.list_(pa.int8())), ("n_samples", pa.int64()),
                        ("signal", pa.large_binary()), ("report", pa.string()), ("metadata", pa.string())])
    for number, group in enumerate(shard_groups(records)):
        table = pa.table({"record_id": [r.record_id for r in group], "patient_id": [r.patient_id for r in group],
                          "channel_types": [r.channel_types for r in group],
                          "n_samples": [r.signal.shape[1] for r in group],
                          "signal": [r.signal.tobytes() for r in group], "report": [r.report for r in group],
                          "metadata": [r.metadata for r in group]}, schema=schema)
        with pa.OSFile(str(folder / f"shard-{number:05d}.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as out:
            out.write_table(table)


def open_arrow(folder: Path) -> Callable[[int], Item]:
    """Memory-maps every shard; item i is a zero-copy float16 view of its row's signal bytes."""
    import pyarrow as pa

    shards = []
    for path in sorted(folder.glob("*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        signal, types_ = table.column("signal").combine_chunks(), table.column("channel_types").combine_chunks()
        offsets = np.frombuffer(signal.buffers()[1], np.int64)[signal.offset:signal.offset + len(signal) + 1]
        shards.append((offsets, np.frombuffer(signal.buffers()[2], np.uint8),
                        np.asarray(types_.offsets), types_.values.to_numpy()))
    shard, row = shard_of([len(s[0]) - 1 for s in shards])

    def get(i: int) -> Item:
        offsets, data, type_offsets, type_values = shards[shard[i]]
        r = row[i]
        types_ = type_values[type_offsets[r]:type_offsets[r + 1]]
        return data[offsets[r]:offsets[r + 1]].view(np.float16).reshape(len(types_), -1), types_
    return get


# --- zarr v3: one ragged store (flat float16 samples + offsets/shape index), sharded ---

def write_zarr(records: list[Record], folder: Path, compressed: bool) -> None:
    """Flat ``signal`` float16 [sum C*T] in 1 MiB chunks inside 64 MiB shards (zarr's default
    compressor, or none), plus ``offsets`` int64 [N+1], ``shape`` int32 [N, 2], ``channel_types``
    int8 [N, 12] (-1 padded) and the strings as variable-length string arrays."""
    import zarr

    chunk, shard = (1 << 20) // 2, SHARD_BYTES // 2
    sizes = np.array([r.signal.size for r in records], np.int64)
    group = zarr.open_group(str(folder / "store.zarr"), mode="w")
    signal = group.create_array("signal", shape=(int(sizes.sum()),), dtype="float16", chunks=(chunk,),
                                shards=(shard,), compressors="auto" if compressed else None, fill_value=0)
    for number, block in enumerate(flat_blocks(records, shard)):
        signal[number * shard:number * shard + block.size] = block
    group.create_array("offsets", data=np.concatenate([[0], np.cumsum(sizes)]))
    group.create_array("shape", data=np.array([r.signal.shape for r in records], np.int32))
    types_ = np.full((len(records), 12), -1, np.int8)
    for k, r in enumerate(records):
        types_[k, :len(r.channel_types)] = r.channel_types
    group.create_array("channel_types", data=types_)
    for name in ("record_id", "patient_id", "report", "metadata"):
        group.create_array(name, shape=(len(records),), dtype=str)[:] = np.array([getattr(r, name) for r in records],
                                                                                 dtype=object)


def open_zarr(folder: Path) -> Callable[[int], Item]:
    """Loads the small index into memory; item i reads its slice of the flat signal array."""
    import zarr

    group = zarr.open_group(str(folder / "store.zarr"), mode="r")
    signal, offsets = group["signal"], group["offsets"][:]
    shapes, types_ = group["shape"][:], group["channel_types"][:]

    def get(i: int) -> Item:
        return signal[offsets[i]:offsets[i + 1]].reshape(shapes[i]), types_[i, :shapes[i][0]]
    return get


# --- mosaicml-streaming: MDS shards, StreamingDataset[i] on a local folder ---

def import_streaming() -> str:
    """Imports ``streaming``; where torchvision does not import (PyPI's torchvision wheel links
    CUDA torch, this venv has the CPU wheel) it first puts in the two torchvision names that
    streaming.vision imports and never calls here. Returns a note on that, or ''."""
    try:
        importlib.import_module("torchvision")
        note = ""
    except Exception as exc:  # broken binary extension: RuntimeError, OSError, ImportError
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        stubs = {"torchvision": {"__version__": "0"}, "torchvision.datasets": {"VisionDataset": object},
                 "torchvision.transforms": {}, "torchvision.transforms.functional": {"to_tensor": None}}
        for name, attrs in stubs.items():
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            vars(module).update(attrs)
            sys.modules[name] = module
        note = f"`import streaming` needs torchvision, which fails here ({type(exc).__name__}); stubbed. "
    started = time.perf_counter()
    importlib.import_module("streaming")
    return note + f"`import streaming` {time.perf_counter() - started:.1f} s (imports transformers). "


def write_mds(records: list[Record], folder: Path) -> None:
    """MDSWriter, uncompressed, size_limit SHARD_BYTES; signal as ``ndarray:float16``."""
    from streaming import MDSWriter

    columns = {"signal": "ndarray:float16", "channel_types": "ndarray:int8", "record_id": "str",
               "patient_id": "str", "report": "str", "metadata": "str"}
    with MDSWriter(out=str(folder), columns=columns, size_limit=SHARD_BYTES) as out:
        for r in records:
            out.write({"signal": r.signal, "channel_types": np.array(r.channel_types, np.int8),
                       "record_id": r.record_id, "patient_id": r.patient_id, "report": r.report,
                       "metadata": r.metadata})


def open_mds(folder: Path) -> Callable[[int], Item]:
    """StreamingDataset on the local folder (no remote); item i = dataset[i], every column decoded."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(folder), remote=None, shuffle=False, batch_size=1)

    def get(i: int) -> Item:
        sample = dataset[i]
        return sample["signal"], sample["channel_types"]
    return get


# --- litdata: optimize() into chunks, StreamingDataset[i] ---

def litdata_item(record: Record) -> dict[str, Any]:
    """optimize()'s fn: one record as a dict of numpy arrays and strings."""
    return {"signal": record.signal, "channel_types": np.array(record.channel_types, np.int8),
            "record_id": record.record_id, "patient_id": record.patient_id, "report": record.report,
            "metadata": record.metadata}


def write_litdata(records: list[Record], folder: Path) -> None:
    """litdata.optimize with one worker process (its default start method, spawn: the write time
    includes starting it) and chunk_bytes SHARD_BYTES."""
    import litdata

    for variable, name in (("DATA_OPTIMIZER_CACHE_FOLDER", "chunks"), ("DATA_OPTIMIZER_DATA_CACHE_FOLDER", "data")):
        os.environ[variable] = str(folder.parent / f"litdata_{name}")   # else it stages in the system's temp folder
    litdata.optimize(fn=litdata_item, inputs=records, output_dir=str(folder), chunk_bytes=SHARD_BYTES,
                     num_workers=1, verbose=False)


def open_litdata(folder: Path, batch_decode: bool | str) -> Callable[[int], Item]:
    """litdata.StreamingDataset on the local folder; item i = dataset[i], every field decoded.
    batch_decode 'auto' (the default) decodes a window of the following items on each read."""
    import litdata

    dataset = litdata.StreamingDataset(str(folder), batch_decode=batch_decode)

    def get(i: int) -> Item:
        sample = dataset[i]
        return sample["signal"], sample["channel_types"]
    return get


# --- webdataset: tar shards, read in order only ---

def write_webdataset(records: list[Record], folder: Path) -> None:
    """ShardWriter with maxsize SHARD_BYTES; per record signal.npy, types.npy, report.txt, json."""
    import webdataset

    with webdataset.ShardWriter(str(folder / "shard-%05d.tar"), maxsize=SHARD_BYTES, verbose=0) as out:
        for r in records:
            out.write({"__key__": r.record_id, "signal.npy": r.signal,
                       "types.npy": np.array(r.channel_types, np.int8), "report.txt": r.report,
                       "json": {"patient_id": r.patient_id, "metadata": r.metadata}})


def stream_webdataset(folder: Path) -> Iterator[Item]:
    """Every record in stored order, decoded by webdataset's default decoders."""
    import webdataset

    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        yield sample["signal.npy"], sample["types.npy"]


# --- h5py: one HDF5 file per shard, one contiguous dataset per record ---

def write_h5py(records: list[Record], folder: Path) -> None:
    """Dataset ``str(row)`` float16 [C, T] per record (contiguous, uncompressed), the rest as attributes."""
    import h5py

    for number, group in enumerate(shard_groups(records)):
        with h5py.File(folder / f"shard-{number:05d}.h5", "w") as out:
            for row, r in enumerate(group):
                dataset = out.create_dataset(str(row), data=r.signal)
                dataset.attrs.update({"record_id": r.record_id, "patient_id": r.patient_id, "report": r.report,
                                      "metadata": r.metadata, "channel_types": np.array(r.channel_types, np.int8)})


def open_h5py(folder: Path) -> Callable[[int], Item]:
    """Opens every shard file; item i is its h5py dataset (the crop reads only its slice)."""
    import h5py

    files = [h5py.File(path, "r") for path in sorted(folder.glob("*.h5"))]
    shard, row = shard_of([len(f) for f in files])

    def get(i: int) -> Item:
        dataset = files[shard[i]][str(row[i])]
        return dataset, dataset.attrs["channel_types"]
    return get


# --- reference without a library: raw float16 file + numpy index per shard, np.memmap ---

def write_numpy(records: list[Record], folder: Path) -> None:
    """Per shard: ``.f16`` (signals concatenated), ``.idx.npy`` (offset, C, T, channel_types
    int8[12] per record) and ``.meta.jsonl`` (ids, report, metadata)."""
    index_dtype = np.dtype([("offset", np.int64), ("channels", np.int16), ("samples", np.int32),
                            ("types", np.int8, 12)])
    for number, group in enumerate(shard_groups(records)):
        stem = folder / f"shard-{number:05d}"
        index = np.zeros(len(group), index_dtype)
        with open(stem.with_suffix(".f16"), "wb") as out:
            for row, r in enumerate(group):
                index[row] = (out.tell() // 2, *r.signal.shape, (r.channel_types + [-1] * 12)[:12])
                out.write(r.signal.tobytes())
        np.save(stem.with_suffix(".idx.npy"), index)
        stem.with_suffix(".meta.jsonl").write_text("".join(
            json.dumps({"record_id": r.record_id, "patient_id": r.patient_id, "report": r.report,
                        "metadata": r.metadata}) + "\n" for r in group))


def open_numpy(folder: Path) -> Callable[[int], Item]:
    """np.memmap of every ``.f16`` file; item i is a view of its samples."""
    shards = [(np.memmap(path, np.float16, "r"), np.load(path.with_suffix(".idx.npy")))
              for path in sorted(folder.glob("*.f16"))]
    shard, row = shard_of([len(index) for _, index in shards])

    def get(i: int) -> Item:
        samples, index = shards[shard[i]]
        offset, channels, length, types_ = index[row[i]]
        return samples[offset:offset + channels * length].reshape(channels, length), types_[:channels]
    return get


# --- the benchmark ---

@dataclass(frozen=True)
class Candidate:
    """A format: pip name (version, install log), how to import it (returns a note), write, and
    either ``open`` (random access: item index -> Item) or ``stream`` (stored order only)."""

    name: str
    dist: str | None
    load: Callable[[], str]
    index_access: str
    write: Callable[[list[Record], Path], None]
    open: Callable[[Path], Callable[[int], Item]] | None = None
    stream: Callable[[Path], Iterator[Item]] | None = None


def imports(*modules: str) -> Callable[[], str]:
    """A ``load`` that imports ``modules`` and has nothing to note."""
    def load() -> str:
        for module in modules:
            importlib.import_module(module)
        return ""
    return load


CANDIDATES = (
    Candidate("Arrow IPC, memory-mapped", "pyarrow", imports("pyarrow", "pyarrow.ipc"),
              "yes: row of a memory-mapped batch", write_arrow, open=open_arrow),
    Candidate("zarr v3, uncompressed", "zarr", imports("zarr"), "yes: slice of a ragged array (own offsets index)",
              lambda records, folder: write_zarr(records, folder, compressed=False), open=open_zarr),
    Candidate("zarr v3, default compressor", "zarr", imports("zarr"),
              "yes: slice of a ragged array (own offsets index)",
              lambda records, folder: write_zarr(records, folder, compressed=True), open=open_zarr),
    Candidate("mosaicml-streaming MDS", "mosaicml-streaming", import_streaming, "yes: StreamingDataset[i]",
              write_mds, open=open_mds),
    Candidate("litdata, batch_decode=False", "litdata", imports("litdata"), "yes: StreamingDataset[i]",
              write_litdata, open=lambda folder: open_litdata(folder, batch_decode=False)),
    Candidate("litdata, default batch_decode='auto'", "litdata", imports("litdata"), "yes: StreamingDataset[i]",
              write_litdata, open=lambda folder: open_litdata(folder, batch_decode="auto")),
    Candidate("webdataset tar", "webdataset", imports("webdataset"), "no: sequential tar stream",
              write_webdataset, stream=stream_webdataset),
    Candidate("HDF5 (h5py), dataset per record", "h5py", imports("h5py"), "yes: dataset by name",
              write_h5py, open=open_h5py),
    Candidate("reference: raw .f16 + numpy index, np.memmap", None, imports("numpy"),
              "yes: own offsets index", write_numpy, open=open_numpy),
)


def crop(item: Item, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random WINDOW-sample crop of an item -> (x float32 [C, WINDOW], valid bool [C, WINDOW])."""
    signal, _ = item
    start = int(rng.integers(0, signal.shape[1] - WINDOW + 1))
    x = torch.from_numpy(np.asarray(signal[:, start:start + WINDOW], dtype=np.float32))
    return x, ~torch.isnan(x)


def read_pass(items: Iterator[Item], seed: int) -> tuple[float, float]:
    """Crops every item of ``items`` -> (items/s, 12-lead 10 s windows/s = channel crops / 12 / s)."""
    rng = np.random.default_rng(seed)
    count = channels = 0
    started = time.perf_counter()
    for item in items:
        x, _ = crop(item, rng)
        count, channels = count + 1, channels + x.shape[0]
    seconds = time.perf_counter() - started
    return count / seconds, channels / 12 / seconds


def evict(folder: Path) -> None:
    """Flushes every file under ``folder`` and drops it from the page cache (the cold pass)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: Path) -> int:
    """Bytes of all files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def extra_packages(dist: str | None, logs: Path | None) -> str:
    """Names on the last 'Would install' / 'Successfully installed' line of ``logs/DIST.log``,
    less ``dist`` itself -> 'N' (with any of torch/numpy/torchvision it changes), or why not known."""
    if dist is None:
        return "0"
    path = logs / f"{dist}.log" if logs else None
    if path is None or not path.is_file():
        return "? (no install log)"
    lines = [line for line in path.read_text().splitlines()
             if line.startswith(("Would install ", "Successfully installed "))]
    if not lines:
        return "? (no install line in log)"
    tokens = [t for t in lines[-1].split()[2:] if pip_name(t) != pip_name(dist)]
    heavy = [t for t in tokens if pip_name(t) in ("torch", "numpy", "torchvision")]
    return f"{len(tokens)}" + (f" (incl. {', '.join(heavy)})" if heavy else "")


def pip_name(token: str) -> str:
    """'PyYAML-6.0.4' or 'pyyaml' -> 'pyyaml' (normalized name, version dropped)."""
    return re.sub(r"[-_.]+", "-", re.sub(r"-\d[^-]*$", "", token)).lower()


def version_of(dist: str | None) -> str:
    """Installed version of pip distribution ``dist`` (numpy's for the library-free reference)."""
    if dist is None:
        return f"numpy {np.__version__}"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_candidate(candidate: Candidate, records: list[Record], root: Path, reads: int, seed: int,
                  logs: Path | None) -> dict[str, str]:
    """One table row: write, size, cold and warm read passes; a skip or failure goes to notes."""
    row = {"format": candidate.name, "version": version_of(candidate.dist),
           "extra packages": extra_packages(candidate.dist, logs), "random access by index": candidate.index_access,
           "write s": "-", "size vs float16": "-", "items/s random": "-", "12-lead windows/s random": "-"}
    try:
        note = candidate.load()
    except Exception as exc:  # not installed, or its import fails: skipped with the reason
        return {**row, "notes": f"skipped: import failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}
    folder = root / re.sub(r"\W+", "_", candidate.name)
    folder.mkdir()
    try:
        started = time.perf_counter()
        candidate.write(records, folder)
        row["write s"] = f"{time.perf_counter() - started:.2f}"
        raw = sum(r.signal.nbytes for r in records)
        row["size vs float16"] = f"{folder_bytes(folder) / raw:.3f}x"
        evict(folder)
        started = time.perf_counter()
        if candidate.open is not None:
            get = candidate.open(folder)
            opened = time.perf_counter() - started
            order = np.random.default_rng(seed + 1).integers(0, len(records), reads)
            cold, warm = (read_pass((get(int(i)) for i in order), seed + 2) for _ in range(2))
            row["items/s random"], row["12-lead windows/s random"] = f"{warm[0]:,.0f}", f"{warm[1]:,.0f}"
            note += f"cold pass {cold[0]:,.0f} items/s; open {opened:.2f} s. "
        else:
            cold, warm = (read_pass(candidate.stream(folder), seed + 2) for _ in range(2))
            row["items/s random"] = f"n/a (in order: {warm[0]:,.0f})"
            row["12-lead windows/s random"] = f"n/a (in order: {warm[1]:,.0f})"
            note += f"cold pass in order {cold[0]:,.0f} items/s. "
        row["notes"] = note + f"{len(list(folder.rglob('*')))} files."
    except Exception as exc:  # a library error: reported in the row, the others still run
        row["notes"] = note + f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
    return row


def markdown(rows: list[dict[str, str]], header: str) -> str:
    """``header``, a blank line and the rows as a Markdown table (columns: the first row's keys)."""
    columns = list(rows[0])
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown table written here (and printed)")
    parser.add_argument("--records", type=int, default=2000, help="synthetic records written per format")
    parser.add_argument("--reads", type=int, default=2000, help="random item reads per pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install-logs", type=Path, help="folder of pip logs NAME.log for the extra-packages column")
    parser.add_argument("--tmp", type=Path, help="parent of the temp folder for the shards (default: the system's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = make_records(args.records, args.seed)
    raw_mb = sum(r.signal.nbytes for r in records) / 2 ** 20
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="shard_formats_") as root:
        rows = []
        for candidate in CANDIDATES:
            rows.append(run_candidate(candidate, records, Path(root), args.reads, args.seed, args.install_logs))
            print(f"{candidate.name}: {rows[-1]['items/s random']} items/s ({rows[-1]['notes']})", flush=True)
    header = (f"Shard formats, {dt.datetime.now():%Y-%m-%d %H:%M}: {args.records} records ({raw_mb:.0f} MiB of "
              f"float16 signal), {args.reads} random reads per pass, shards ~{SHARD_BYTES >> 20} MiB, one process, "
              f"torch {torch.__version__} with 1 thread, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at the end. Throughput: warm (second) pass; notes: cold pass "
              "(page cache dropped for the format's files first).")
    text = markdown(rows, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
