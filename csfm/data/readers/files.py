"""One door for recording files: ``read_record(path)`` tells the format from the file's content
(not its name) and returns a Record; ``FileFolder`` (``--data files:PATH``) is every recording
under a folder, in any mix of formats.

Formats, in the order they are tried (each module's ``sniff`` looks at the first 4096 bytes):
WFDB (a ``.hea`` header whose first record line parses), GE MUSE XML, Philips XML, HL7 aECG,
DICOM ECG waveforms, SCP-ECG, EDF/EDF+/BDF.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

from csfm.data.leads import LeadMapping
from csfm.data.readers import dicom_ecg, edf, ge_muse, hl7_aecg, philips, scp_ecg
from csfm.data.readers.datasets import read_wfdb_record
from csfm.data.readers.safe_io import FileFormatError
from csfm.data.readers.wfdb_record import read_header, record_base, record_files
from csfm.data.record import Record

HEAD_BYTES = 4096
WFDB = "WFDB"
# format -> (sniff(first bytes) -> bool, reader(path, mapping) -> Record), in the order tried
FORMATS = {module.FORMAT: (module.sniff, reader) for module, reader in (
    (ge_muse, ge_muse.read_ge_muse), (philips, philips.read_philips), (hl7_aecg, hl7_aecg.read_hl7_aecg),
    (dicom_ecg, dicom_ecg.read_dicom_ecg), (scp_ecg, scp_ecg.read_scp_ecg), (edf, edf.read_edf))}
# files a recording folder holds beside its recordings: left out of a folder without a word
NOT_RECORDINGS = {".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".yaml", ".yml", ".pdf", ".png", ".jpg",
                  ".html", ".py", ".npy", ".npz", ".parquet"}
_WFDB_RECORD_LINE = re.compile(rb"^\s*[-\w]+(?:/\d+)?\s+\d+(?:\s|$)")


def _is_wfdb_header(path: Path, head: bytes) -> bool:
    """A ``.hea`` file whose first non-comment line is a WFDB record line."""
    if path.suffix.lower() != ".hea":
        return False
    lines = [line for line in head.splitlines() if line.strip() and not line.lstrip().startswith(b"#")]
    return bool(lines) and bool(_WFDB_RECORD_LINE.match(lines[0]))


def detect_format(path: str | Path) -> str | None:
    """The format of the file ``path`` from its first bytes (WFDB, or one module's FORMAT),
    or None when no reader recognises it. FileFormatError when it cannot be opened."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError as exc:
        raise FileFormatError(path, "any", "file", f"cannot be opened ({exc.strerror or exc})") from exc
    if _is_wfdb_header(path, head):
        return WFDB
    return next((fmt for fmt, (sniff, _) in FORMATS.items() if sniff(head)), None)


def read_record(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """The recording in the file ``path`` (a WFDB record: its ``.hea``), any supported format,
    detected from content. mapping: lead-contract overrides (csfm.data.leads). FileFormatError
    naming the file, the format it was taken for and the field that failed."""
    path = Path(path)
    if path.suffix == "" and Path(f"{path}.hea").is_file():
        path = Path(f"{path}.hea")
    fmt = detect_format(path)
    if fmt is None:
        raise FileFormatError(path, "unknown format", "content", "not a recording any reader recognises (WFDB "
                              ".hea, GE MUSE / Philips / HL7 aECG XML, DICOM ECG, SCP-ECG, EDF/BDF), judged "
                              "from its first bytes")
    try:
        return (read_wfdb_record if fmt == WFDB else FORMATS[fmt][1])(path, mapping)
    except FileFormatError:
        raise
    except ValueError as exc:  # the WFDB reader's errors already name the header and field
        raise FileFormatError(path, fmt, "record", str(exc)) from exc


class FileFolder:
    """Every recording under ``root`` (or the one file ``root``), any mix of formats
    (``--data files:PATH``). A ListedSource and WindowedSource.

    WFDB records count once (their header; the signal files and segments it names are part
    of it, ``*_layout`` headers are not records). Text, tables and images (``NOT_RECORDINGS``)
    are passed over. Any other file no reader recognises is listed in ``unrecognised`` and a
    warning at the end of the listing names them all; ``strict`` makes the first one an error.
    record_id: the path relative to root without its suffix; patient_ids: the record ids
    (a folder of files names no patients; each Record still carries the file's own patient
    id in ``metadata["file_patient_id"]`` where it has one).
    """

    def __init__(self, root: str | Path, mapping: LeadMapping | None = None, strict: bool | str = False) -> None:
        root = Path(root)
        strict = str(strict).lower() in ("1", "true", "yes") if isinstance(strict, str) else strict
        if not root.exists():
            raise FileNotFoundError(f"files:{root}: no such file or folder")
        self.root, self.mapping = root, mapping
        self.unrecognised: dict[Path, str] = {}
        found: list[tuple[Path, str]] = []
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                          and not any(part.startswith(".") for part in
                                                                      p.relative_to(root).parts))
        companions: set[Path] = set()
        for path in candidates:
            fmt = detect_format(path)
            if fmt == WFDB:
                if path.stem.endswith("_layout"):
                    continue
                with contextlib.suppress(ValueError):  # a broken header: its record fails when read
                    companions.update(p.resolve() for p in record_files(record_base(path))[1:])
                found.append((path, fmt))
            elif fmt is not None:
                found.append((path, fmt))
            elif path.suffix.lower() not in NOT_RECORDINGS:
                self.unrecognised[path] = "not a recording any reader recognises"
        # a WFDB record's signal files are known only once its header is read: judged after the listing
        found = [(p, f) for p, f in found if p.resolve() not in companions]
        self.unrecognised = {p: why for p, why in self.unrecognised.items() if p.resolve() not in companions}
        if strict and self.unrecognised:
            path, why = next(iter(self.unrecognised.items()))
            raise FileFormatError(path, "unknown format", "content", why)
        if not found:
            raise ValueError(f"files:{root}: no recording found ({len(self.unrecognised)} unrecognised files)")
        if self.unrecognised:
            listing = "\n".join(f"  {p}: {why}" for p, why in self.unrecognised.items())
            warnings.warn(f"files:{root}: {len(self.unrecognised)} file(s) left out:\n{listing}", stacklevel=2)
        self._paths = [p for p, _ in found]
        self.formats = [f for _, f in found]
        base = root if root.is_dir() else root.parent
        self.record_ids = [p.relative_to(base).with_suffix("").as_posix() for p in self._paths]
        self.patient_ids = list(self.record_ids)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Record:
        return self.read_window(index, 0.0, None)

    def record_files(self, index: int) -> list[Path]:
        path = self._paths[index]
        return record_files(record_base(path)) if self.formats[index] == WFDB else [path]

    def duration_s(self, index: int) -> float | None:
        """Seconds from a WFDB header; None for other formats (known once read)."""
        if self.formats[index] != WFDB:
            return None
        header = read_header(record_base(self._paths[index]))
        return header.sig_len / header.fs if getattr(header, "sig_len", None) else None

    def read_window(self, index: int, start_s: float, window_s: float | None) -> Record:
        """Record ``index`` restricted to [start_s, start_s + window_s) seconds (None: to the end)."""
        path, fmt = self._paths[index], self.formats[index]
        if fmt == WFDB:
            stop_s = None if window_s is None else start_s + window_s
            record = read_wfdb_record(path, self.mapping, start_s, stop_s)
        else:
            record = read_record(path, self.mapping)
            first = int(round(start_s * record.fs))
            last = None if window_s is None else first + int(round(window_s * record.fs))
            record.signal = record.signal[:, first:last]
        if record.patient_id:
            record.metadata["file_patient_id"] = record.patient_id
        record.record_id, record.patient_id = self.record_ids[index], self.patient_ids[index]
        return record
