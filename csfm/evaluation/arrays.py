"""Arrays in, embeddings out: recordings held in memory go through the same lead contract,
preprocessing, windows and pooling as every reader and ``csfm.embed``.

    encoder = csfm.load_encoder("runs/demo")          # a checkpoint or training run folder
    vector = csfm.embed_array(encoder, signal, fs=500, leads=["I", "II", "V1"])   # [d]
    matrix = csfm.embed_arrays(encoder, signals, fs=[500, 250], leads=[twelve, ["II"]])  # [N, d]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from csfm.data.leads import LeadMapping, record_from_channels, resolve_channels
from csfm.data.record import Record
from csfm.evaluation.embedding import embed_source, load_encoder
from csfm.model.encoder import CSFMEncoder

TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}  # ECG amplitude units -> factor to mV


def record_from_array(signal: np.ndarray, fs: float, leads: Sequence[str], units: str = "mV",
                      record_id: str = "array", mapping: LeadMapping | None = None) -> Record:
    """A Record of ``signal`` [C, T] (channels in the order of ``leads``; NaN where samples are
    missing) sampled at ``fs`` Hz. ECG channels in ``units`` (mV, uV or V) come out in mV; PPG
    keeps its values. Every lead must be one the lead contract knows (I..V6, PPG, aliases):
    ValueError naming the others, and for a [T, C] array or a lead count that differs."""
    where = f"record {record_id}"
    signal = np.asarray(signal)
    if signal.ndim != 2 or not np.issubdtype(signal.dtype, np.number):
        raise ValueError(f"{where}: signal must be a numeric [C, T] array, got shape {signal.shape} "
                         f"of {signal.dtype}")
    leads = [str(name) for name in leads]
    if signal.shape[0] != len(leads):
        hint = " (it looks like [T, C]: pass signal.T)" if signal.shape[1] == len(leads) else ""
        raise ValueError(f"{where}: {len(leads)} lead names for {signal.shape[0]} channels of a {signal.shape} "
                         f"array{hint}")
    if units.lower() not in TO_MV:
        raise ValueError(f"{where}: units must be one of mV, uV, V, got {units!r}")
    kept, dropped = resolve_channels(leads, mapping, where=where)
    if dropped:
        raise ValueError(f"{where}: leads {dropped} are not ECG/PPG channels the model knows (or repeat one); "
                         f"leave them out of the array, or map them with mapping={{name: type}}")
    rows = [index for index, _ in kept]
    types = [ctype for _, ctype in kept]
    scale = np.array([1.0 if ctype == 12 else TO_MV[units.lower()] for ctype in types])[:, None]
    return record_from_channels(signal[rows].astype(np.float64) * scale, fs, [leads[r] for r in rows],
                                ["NU" if t == 12 else "mV" for t in types], types, [], record_id=record_id,
                                patient_id=record_id)


def _per_record(value, n: int, name: str) -> list:
    """``value`` for each of n records: a sequence of n values, or one value for all."""
    if isinstance(value, (list, tuple)) and (name != "leads" or value and not isinstance(value[0], str)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} entries for {n} signals")
        return list(value)
    return [value] * n


def embed_arrays(encoder: CSFMEncoder | str | Path, signals: Sequence[np.ndarray], fs: float | Sequence[float],
                 leads: Sequence[str] | Sequence[Sequence[str]], units: str = "mV", pooling: str = "cls",
                 modality: str = "both", batch_windows: int = 32, record_pooling: str = "mean",
                 progress: bool = False) -> np.ndarray:
    """Embeddings [N, pooled_width(d, pooling)] of N in-memory recordings, as
    ``csfm.embed`` makes them: each [C_n, T_n] signal (any fs, any lead subset, any length of
    at least 5 s of valid samples) is preprocessed, cut into 10 s windows, encoded and pooled.
    encoder: a CSFMEncoder, or a checkpoint / training run folder. fs and leads: one for all
    signals, or one per signal."""
    if not isinstance(encoder, CSFMEncoder):
        encoder = load_encoder(encoder)
    rates, names = _per_record(fs, len(signals), "fs"), _per_record(leads, len(signals), "leads")
    records = [record_from_array(x, f, n, units, record_id=f"array{i}")
               for i, (x, f, n) in enumerate(zip(signals, rates, names))]
    return embed_source(encoder, records, modality, pooling, batch_windows, progress=progress,
                        record_pooling=record_pooling).embeddings


def embed_array(encoder: CSFMEncoder | str | Path, signal: np.ndarray, fs: float, leads: Sequence[str],
                **options) -> np.ndarray:
    """The embedding [d] of one recording ``signal`` [C, T] (see ``embed_arrays``)."""
    return embed_arrays(encoder, [signal], fs, [list(leads)], **options)[0]
