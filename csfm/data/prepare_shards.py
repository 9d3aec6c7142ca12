"""``python -m csfm.prepare``: preprocess every record once and store it in shards.

Source records [k R, (k + 1) R) (R = ``records_per_shard``) become shard k: each record, or
each part of at most PART_WINDOWS windows of a long one (read part by part, as pretraining
reads them), preprocessed as pretraining does (250 Hz, band-pass, z-score, channels with a
valid sample), is one row, its report tokenised with ``vocab`` when one is given (training with
the same vocabulary then reads the stored ids instead of tokenising each window's report); a
record that gives no usable window, or that cannot be read, is
listed in ``unusable.csv`` with the reason and left out. Shards are written in parallel
(``workers`` processes), each file atomically with a sidecar listing its rows, so a prepare
that is stopped continues where it stopped when run again with the same options;
``index.json`` is written last, once every shard is there.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import json
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from csfm import cli
from csfm.cli import OptionError, at_least
from csfm.data.preprocess import PreprocessConfig, RecordCheck, make_windows
from csfm.files import atomic_write
from csfm.data.shards import INDEX, SHARD_LAYOUT, PreparedRecord, shard_name, write_shard
from csfm.data.sources import MixedSource, open_sources, parse_spec
from csfm.data.tokenizer import ReportTokenizer
from csfm.data.windows import record_name, record_parts

SETTINGS = "prepare.json"
ALL_TOKENS = 1 << 30  # store every word piece of a report: training cuts them to its model's text positions
UNUSABLE = "unusable.csv"


@dataclass
class PrepareConfig:
    """Options of ``python -m csfm.prepare`` (flags of the same names, or a YAML/JSON file)."""

    data: list[str] = field(default_factory=list, metadata={
        "help": "data sources as for csfm.train ('KIND:PATH[@WEIGHT]' or 'demo[:N]'; weights are applied "
                "when training on the shards, not here)"})
    out: str = field(default="", metadata={"help": "folder the shards go to (created; a stopped prepare "
                                                   "there continues)", "valid": ((lambda v: bool(v.strip())), "a folder name")})
    records_per_shard: int = field(default=512, metadata={"help": "source records per shard file",
                                                          "valid": at_least(1)})
    workers: int = field(default=0, metadata={"help": "processes preparing shards (0 = this process)",
                                              "valid": at_least(0)})
    vocab: str = field(default="", metadata={
        "help": "vocab.txt (or a folder holding it) to tokenise reports with; train with the same --vocab to use "
                "the stored ids (default: reports stored as text only)"})
    demo_records: int = field(default=600, metadata={"help": "records of a 'demo' source", "valid": at_least(1)})
    seed: int = field(default=0, metadata={"help": "seed of the demo records", "valid": at_least(0)})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        cli.check_fields(self)
        if not self.data:
            raise OptionError("--data: give at least one source to prepare")
        for spec in self.data:
            try:
                parse_spec(spec, self.demo_records)
            except ValueError as exc:
                raise OptionError(str(exc)) from None
        if self.vocab:
            try:
                _tokenizer(self.vocab)
            except (OSError, ValueError) as exc:
                raise OptionError(f"--vocab {self.vocab}: {exc}") from None


@functools.lru_cache(maxsize=2)
def _tokenizer(vocab: str) -> ReportTokenizer:
    """The vocabulary at ``vocab``, read once per process."""
    return ReportTokenizer.from_vocab(vocab)


def _vocab_fingerprint(config: PrepareConfig) -> str:
    return _tokenizer(config.vocab).fingerprint if config.vocab else ""


def _settings(config: PrepareConfig) -> dict[str, Any]:
    """What fixes the shards' contents: a stopped prepare may only continue with the same (as
    JSON gives it back: tuples are lists)."""
    return json.loads(json.dumps({"layout": SHARD_LAYOUT, "data": list(config.data),
                                  "records_per_shard": config.records_per_shard,
                                  "demo_records": config.demo_records, "seed": config.seed,
                                  "vocab_fingerprint": _vocab_fingerprint(config),
                                  "preprocess": dataclasses.asdict(PreprocessConfig())}))


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(value, indent=1)))


def _record_rows(records, index: int, config: PreprocessConfig,
                 tokenizer: ReportTokenizer | None) -> tuple[list[PreparedRecord], str]:
    """(rows of record ``index``: one per part with a usable window, or []; why it is unusable, or
    ""). With a tokenizer, each row also holds its report's word-piece ids, all of them."""
    check, rows, ids_of = RecordCheck(config), [], {}
    vocab = tokenizer.fingerprint if tokenizer is not None else ""
    for part, start_s, skip_s, span_s in record_parts(records, index, config):
        x, valid, used = check.span(part, skip_s, span_s)
        windows = len(make_windows(x, valid, config).x) if used else 0
        check.n_windows += windows  # what check.problem judges the record by
        if windows:
            if tokenizer is not None and part.text not in ids_of:  # a long record's parts share one report
                ids_of[part.text] = np.asarray(tokenizer.encode(part.text, ALL_TOKENS).ids if part.text else [],
                                               np.int32)
            ids = ids_of.get(part.text)
            rows.append(PreparedRecord(part.record_id, part.patient_id, start_s, [part.channel_types[c] for c in used],
                                       x, valid, part.text, dict(part.metadata), text_ids=ids, text_vocab=vocab))
    return rows, check.problem


@functools.lru_cache(maxsize=1)
def _sources(data: tuple[str, ...], seed: int, demo_records: int) -> tuple[MixedSource, list[str]]:
    """(the sources, their source-prefixed patient ids, as training splits on them), made once
    per process: a worker prepares many shards of them."""
    records = open_sources(list(data), seed, demo_records)
    return records, records.patient_ids


def prepare_shard(config: PrepareConfig, number: int, out: Path) -> dict[str, Any]:
    """Writes shard ``number`` (its sidecar first, then the Arrow file) and returns the sidecar:
    rows, record_ids / patient_ids per row, unusable [(record, why)]."""
    records, patients = _sources(tuple(config.data), config.seed, config.demo_records)
    preprocess, tokenizer = PreprocessConfig(), _tokenizer(config.vocab) if config.vocab else None
    first = number * config.records_per_shard
    rows, row_patients, unusable = [], [], []
    for index in range(first, min(len(records), first + config.records_per_shard)):
        try:
            record_rows, problem = _record_rows(records, index, preprocess, tokenizer)
        except ValueError as error:  # readers raise ValueError naming the file and what is wrong
            record_rows, problem = [], f"cannot be read: {error}"
        if problem:
            unusable.append((record_name(records, index), problem))
        rows.extend(record_rows)
        row_patients.extend([patients[index]] * len(record_rows))
    sidecar = {"file": shard_name(number), "rows": len(rows), "record_ids": [r.record_id for r in rows],
               "patient_ids": row_patients, "unusable": unusable}
    _write_json(out / f"{shard_name(number)}.json", sidecar)
    write_shard(out / shard_name(number), rows)
    return sidecar


def _shard_records(number: int, config: PrepareConfig, n_records: int) -> int:
    """Source records shard ``number`` covers."""
    first = number * config.records_per_shard
    return max(0, min(n_records, first + config.records_per_shard) - first)


def _check_folder(config: PrepareConfig, out: Path) -> None:
    """Creates ``out`` with its settings, or checks a stopped prepare's settings match."""
    settings = _settings(config)
    path = out / SETTINGS
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            changed = [k for k in settings if stored.get(k) != settings[k]]
            raise OptionError(f"--out {out}: it holds a prepare with other settings ({', '.join(changed)}); "
                              "pass the same options to continue it, or another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise OptionError(f"--out {out}: folder exists and is not a csfm.prepare folder (no {SETTINGS})")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


def prepare(config: PrepareConfig) -> Path:
    """Prepares every record of ``config.data`` into ``config.out`` (see the module docstring);
    returns the path of the index."""
    out = Path(config.out)
    _check_folder(config, out)
    _sources.cache_clear()  # list the sources anew (a long-lived process may call prepare again)
    n_records = len(_sources(tuple(config.data), config.seed, config.demo_records)[0])
    n_shards = -(-n_records // config.records_per_shard)
    done = {k for k in range(n_shards) if (out / shard_name(k)).is_file() and (out / f"{shard_name(k)}.json").is_file()}
    todo = [k for k in range(n_shards) if k not in done]
    progress = tqdm(total=n_records, initial=sum(_shard_records(k, config, n_records) for k in done),
                    disable=config.quiet, unit="record", desc="preparing")
    if config.workers:
        spawn = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads have run
        with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=spawn) as pool:
            futures = {pool.submit(prepare_shard, config, k, out): k for k in todo}
            for future in concurrent.futures.as_completed(futures):
                future.result()
                progress.update(_shard_records(futures[future], config, n_records))
    else:
        for k in todo:
            prepare_shard(config, k, out)
            progress.update(_shard_records(k, config, n_records))
    progress.close()
    sidecars = [json.loads((out / f"{shard_name(k)}.json").read_text()) for k in range(n_shards)]
    unusable = [row for s in sidecars for row in s.pop("unusable")]
    with open(out / UNUSABLE, "w", newline="") as f:
        csv.writer(f).writerows([("record_id", "why"), *unusable])
    index = {"layout": SHARD_LAYOUT, "fs": PreprocessConfig().target_fs, "n_source_records": n_records,
             "vocab_fingerprint": _vocab_fingerprint(config), "shards": sidecars}
    _write_json(out / INDEX, index)
    rows = sum(s["rows"] for s in sidecars)
    print(f"csfm.prepare: {rows} rows from {n_records} records in {n_shards} shard(s) at {out}"
          + (f"; {len(unusable)} unusable record(s) listed in {out / UNUSABLE}" if unusable else ""))
    return out / INDEX


def main(argv: Sequence[str] | None = None) -> Path:
    return cli.run_command(prepare, PrepareConfig, argv, "python -m csfm.prepare",
                           "Preprocess records once into Arrow shards for `--data shards:DIR`.")
