"""Lead contract: map a recording's channel names to the model's 13 channel types.

The model knows 13 channel types (``csfm.data.record.CHANNEL_TYPE_NAMES``): 0..11 are the
12 standard ECG leads I, II, III, aVR, aVL, aVF, V1..V6 and 12 is PPG. Every reader
passes its channel names through :func:`resolve_channels`, which keeps the channels
that have a type and lists the others as dropped. It never invents channels: one
lead stays one channel (no broadcasting of a single lead over twelve).

Names are matched case-insensitively after normalisation: ``_`` and ``-`` count as
spaces, runs of spaces collapse, a leading ``lead``, ``ecg`` or ``ekg`` word (EDF+ type
words) is removed when something follows it, and the remaining spaces are removed. So
``"Lead II"``, ``"ECG II"``, ``"EKG II"``, ``"ecg_ii"``, ``"II"`` and ``"ii"`` are all lead II.

``ALIASES`` (normalised name -> type) holds the standard 12-lead names, the
Portuguese-style names of CODE (``DI``, ``DII``, ``DIII``) and the PPG names:

    i ii iii avr avl avf v1..v6   -> I .. V6 (0..11)
    di dii diii                   -> I, II, III (CODE / CODE-15 lead names)
    pleth ppg spo2wave ...        -> PPG (12)

A bare ``SpO2`` is *not* an alias: in MIMIC numerics records (``...n.hea``) it is the
saturation trend in %, not the photoplethysmogram waveform.

``MONITOR_LEADS`` (normalised name -> type) holds bedside-monitor, Holter and
wearable names that have no exact 12-lead equivalent; each maps to the 12-lead type
whose electrical axis it approximates. These are modelling choices:

    mli, mlii, mliii -> I, II, III   modified limb leads (electrodes on the torso)
    mcl1 -> V1, mcl6 -> V6           modified chest leads (MIT-BIH, MIMIC II)
    cm5 -> V5                        Holter bipolar chest lead approximating V5
    v -> V1                          the monitor's single precordial lead ("V" in
                                     MIMIC and CinC 2015); monitors place it at V1
                                     by default for arrhythmia monitoring, so V1 is
                                     its closest 12-lead type
    ecg, ekg -> II                   a lone "ECG" is a single wearable / handheld
                                     lead (e.g. CinC 2017, AliveCor); docs/design.md, "Model layout"
                                     treats a single wearable lead as lead II

Everything else (ABP, ART, PAP, CVP, RESP, Frank vx/vy/vz, numerics, ...) is dropped.
A user ``mapping`` (name -> type name, type int, or ``None`` to drop) overrides both
tables, e.g. ``{"ECG": "I"}`` for a device known to record lead I. When two channels
resolve to one type, the first is kept and the other is listed as dropped with the
note ``"<name> (duplicate of <type>)"``. A record with no usable channel is an error.
Channels that are kept but hold no finite sample are not removed here; they are
listed in ``metadata["empty_channels"]`` by :func:`record_from_channels`.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from csfm.data.record import CHANNEL_TYPE_NAMES, PPG_TYPE, Record

_TYPE = {name.lower(): index for index, name in enumerate(CHANNEL_TYPE_NAMES)}

ALIASES: dict[str, int] = {
    **{name: index for name, index in _TYPE.items() if index != PPG_TYPE},
    "di": _TYPE["i"], "dii": _TYPE["ii"], "diii": _TYPE["iii"],
    **{name: PPG_TYPE for name in ("ppg", "pleth", "plethysmogram", "spo2wave", "spo2pleth",
                                   "pulseoximetry", "pulseox")},
}

MONITOR_LEADS: dict[str, int] = {
    "mli": _TYPE["i"], "mlii": _TYPE["ii"], "mliii": _TYPE["iii"],
    "mcl1": _TYPE["v1"], "mcl6": _TYPE["v6"], "cm5": _TYPE["v5"],
    "v": _TYPE["v1"],
    "ecg": _TYPE["ii"], "ekg": _TYPE["ii"],
}

_PREFIX = re.compile(r"^(lead|ecg|ekg) (?=\S)")

LeadMapping = dict[str, str | int | None]


def normalize_name(name: str) -> str:
    """The lookup key of a channel name: ``"ECG Lead_II"`` -> ``"ii"`` (see module doc)."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()
    while _PREFIX.match(key):
        key = _PREFIX.sub("", key, count=1)
    return key.replace(" ", "")


def channel_type(name: str, mapping: LeadMapping | None = None) -> int | None:
    """Channel type 0..12 of one channel name, or None when it has none (see module doc).

    mapping: user overrides, name -> type name ("II", "PPG", ...), type int, or None
    (drop); keys match case-insensitively after the same normalisation as the tables.
    """
    return _lookup(name, _normalized_mapping(mapping))


def resolve_channels(names: list[str], mapping: LeadMapping | None = None, *,
                     where: str = "") -> tuple[list[tuple[int, int]], list[str]]:
    """Apply the lead contract to a record's channel names.

    names: the channel names in file order. mapping: user overrides (see channel_type).
    where: the record or file named in errors.
    Returns (kept, dropped): kept is [(index into names, channel type)] in file order,
    at most one channel per type (the first one wins); dropped lists the other names
    as given, a second channel of an already kept type as ``"<name> (duplicate of
    <type>)"``. Raises ValueError naming ``where`` and all channel names when no
    channel is kept.
    """
    overrides = _normalized_mapping(mapping, where)
    kept: list[tuple[int, int]] = []
    dropped: list[str] = []
    taken: set[int] = set()
    for index, name in enumerate(names):
        ctype = _lookup(name, overrides)
        if ctype is None:
            dropped.append(name)
        elif ctype in taken:
            dropped.append(f"{name} (duplicate of {CHANNEL_TYPE_NAMES[ctype]})")
        else:
            taken.add(ctype)
            kept.append((index, ctype))
    if not kept:
        raise ValueError(f"{where or 'record'}: no usable ECG/PPG channel among {list(names)} "
                         f"(pass mapping={{name: type}} to map a channel, types {list(CHANNEL_TYPE_NAMES)})")
    return kept, dropped


def modality(ctype: int) -> str:
    """"PPG" for channel type 12, "ECG" for 0..11."""
    return "PPG" if ctype == PPG_TYPE else "ECG"


def record_from_channels(signal: np.ndarray, fs: float, names: list[str], units: list[str],
                         types: list[int], dropped: list[str], **fields: Any) -> Record:
    """A Record of kept channels, with modalities derived and all-NaN channels flagged.

    signal: [C, T] in physical units, NaN where missing (cast to float32). fs: Hz.
    names, units, types: per kept channel. dropped: names the contract dropped.
    fields: the other Record fields (text, patient_id, record_id, metadata).
    A channel with no finite sample is kept, not removed: its name is listed in
    ``metadata["empty_channels"]`` so the caller can decide (preprocessing masks it).
    """
    signal = np.asarray(signal, dtype=np.float32)
    metadata = dict(fields.pop("metadata", {}))
    empty = [name for name, row in zip(names, signal) if not np.isfinite(row).any()]
    if empty:
        metadata["empty_channels"] = empty
    return Record(signal=signal, fs=float(fs), channel_names=list(names), units=list(units),
                  channel_types=[int(t) for t in types], modalities=[modality(t) for t in types],
                  dropped_channels=list(dropped), metadata=metadata, **fields)


def _lookup(name: str, overrides: dict[str, int | None]) -> int | None:
    """Type of a name: the user's override first, then ALIASES, then MONITOR_LEADS."""
    key = normalize_name(name)
    if key in overrides:
        return overrides[key]
    return ALIASES.get(key, MONITOR_LEADS.get(key))


def _normalized_mapping(mapping: LeadMapping | None, where: str = "") -> dict[str, int | None]:
    """User mapping with normalised keys and int values; ValueError names a bad entry."""
    result: dict[str, int | None] = {}
    for name, target in (mapping or {}).items():
        result[normalize_name(name)] = _type_of(target, f"{where + ': ' if where else ''}mapping[{name!r}]")
    return result


def _type_of(target: str | int | None, field: str) -> int | None:
    """Channel type of a mapping value: None, an int 0..12 or a type name such as "aVR"."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise ValueError(f"{field}: expected a channel type name, int or None, got {target!r}")
    if isinstance(target, int):
        if 0 <= target <= PPG_TYPE:
            return target
        raise ValueError(f"{field}: channel type {target} is outside 0..{PPG_TYPE}")
    if isinstance(target, str) and target.strip().lower() in _TYPE:
        return _TYPE[target.strip().lower()]
    raise ValueError(f"{field}: unknown channel type {target!r}, expected one of {list(CHANNEL_TYPE_NAMES)}, "
                     f"an int 0..{PPG_TYPE} or None")


# Lead identification codes n of SCP-ECG (EN 1064, section 3) -> lead name. The same numbers
# are the DICOM SCPECG codes 5.6.3-9-n and the ISO/IEEE 11073 MDC codes 2:n
# (MDC_ECG_LEAD_* = 131072 + n). Code 65 is -aVR: named so that it is never taken for aVR.
SCP_LEAD_CODES: dict[int, str] = {
    1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6", 9: "V7",
    10: "V2R", 11: "V3R", 12: "V4R", 13: "V5R", 14: "V6R", 15: "V7R", 16: "X", 17: "Y", 18: "Z",
    19: "CC5", 20: "CM5", 61: "III", 62: "aVR", 63: "aVL", 64: "aVF", 65: "aVR negated",
    66: "V8", 67: "V9", 68: "V8R", 69: "V9R",
}

# Einthoven's law and Goldberger's augmented leads as (weight of I, weight of II)
_FROM_I_II = {"III": (-1.0, 1.0), "aVR": (-0.5, -0.5), "aVL": (1.0, -0.5), "aVF": (-0.5, 1.0)}


def derive_limb_leads(signal: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Append the limb leads III, aVR, aVL, aVF that ``names`` lacks, computed from I and II:
    III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2.

    signal: [C, T], one row per name, all in one unit (NaN stays NaN). A lead counts as
    present when a name has its channel type (see channel_type); the first such row is used.
    Returns (signal [C + k, T] with the k derived rows appended, names with their standard
    names appended, the k names). Nothing is derived without both I and II.
    """
    rows: dict[int, int] = {}
    for index, name in enumerate(names):
        ctype = channel_type(name)
        if ctype is not None:
            rows.setdefault(ctype, index)
    if _TYPE["i"] not in rows or _TYPE["ii"] not in rows:
        return signal, list(names), []
    lead_i, lead_ii = signal[rows[_TYPE["i"]]], signal[rows[_TYPE["ii"]]]
    derived = [name for name in _FROM_I_II if _TYPE[name.lower()] not in rows]
    extra = [_FROM_I_II[name][0] * lead_i + _FROM_I_II[name][1] * lead_ii for name in derived]
    return np.vstack([signal, *extra]) if extra else signal, list(names) + derived, derived


def standard_order(leads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``leads`` reordered I, II, III, aVR, aVL, aVF, V1..V6, PPG by channel type; names of no
    channel type keep their order after those."""
    def rank(name: str) -> int:
        ctype = channel_type(name)
        return len(CHANNEL_TYPE_NAMES) if ctype is None else ctype

    return dict(sorted(leads.items(), key=lambda item: rank(item[0])))  # stable: ties keep their order
