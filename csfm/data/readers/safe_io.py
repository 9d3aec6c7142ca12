"""What every reader of an exported file shares: one error type that names the file, the
format it was read as and the field that failed, and parsing that never trusts the file.

XML goes through ``defusedxml``: entity declarations (the "billion laughs" bomb), external
entities and DTD fetches are refused before anything expands, and a declaration that states an
encoding the bytes do not have is refused by name. ``xml_root_name`` tells an XML format from
a file's first bytes (UTF-8 or UTF-16, with or without a byte-order mark) for ``sniff``. Sizes
and counts that a file states are checked against the bytes it holds before anything is
allocated. ``record_of`` applies the lead contract to what a reader decoded.
"""
from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import numpy as np

from csfm.data.leads import LeadMapping, record_from_channels, resolve_channels
from csfm.data.record import Record

MAX_FILE_BYTES = 512 * 2 ** 20  # no single ECG export is near this; a bigger file is refused unread
# mV per UCUM voltage unit; UCUM is case-sensitive ("MV" is megavolt, not millivolt)
MV_PER_UCUM_UNIT = {"V": 1e3, "mV": 1.0, "uV": 1e-3, "nV": 1e-6}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
# byte-order marks, and the first bytes of "<" in UTF-16 without one
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
_UTF16_NO_BOM = ((b"<\x00", "utf-16-le"), (b"\x00<", "utf-16-be"))
_DECLARATION_BYTES = 400  # an XML declaration with its encoding fits well within this
# what may precede the root element: declaration, processing instructions, comments, DOCTYPE
_PROLOG = re.compile(r"\s*(?:(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>)\s*)*", re.S)
_START_TAG = re.compile(r"<([A-Za-z_][\w.\-]*(?::[A-Za-z_][\w.\-]*)?)")
_DECLARED_ENCODING = re.compile(r"""<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


class FileFormatError(ValueError):
    """A file that could not be read as ``fmt``: ``path``, ``fmt``, ``field`` (where in the file,
    e.g. an XML path or a header field) and ``why``."""

    def __init__(self, path: str | Path, fmt: str, field: str, why: str) -> None:
        self.path, self.fmt, self.field, self.why = Path(path), fmt, field, why
        super().__init__(f"{path} (read as {fmt}): {field}: {why}")


def read_bytes(path: str | Path, fmt: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``; FileFormatError when it is missing or larger than ``max_bytes``."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, fmt, "file", "does not exist or is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise FileFormatError(path, fmt, "file", f"{size} bytes, more than the {max_bytes} an export may hold")
    return path.read_bytes()


def parse_xml(path: str | Path, fmt: str, data: bytes | None = None) -> Element:
    """The root element of the XML file ``path`` (or of ``data``, its bytes), parsed by
    defusedxml. FileFormatError naming the file when the XML is malformed, declares entities,
    refers to external ones or states an encoding its bytes do not have."""
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    data = read_bytes(path, fmt) if data is None else data
    check_declared_encoding(data, path, fmt)
    try:
        return fromstring(data)
    except DefusedXmlException as exc:
        raise FileFormatError(path, fmt, "XML", f"refused: {type(exc).__name__} ({exc}); entity "
                              "declarations and external references are not read") from exc
    except (ParseError, UnicodeError, ValueError) as exc:
        raise FileFormatError(path, fmt, "XML", f"not well-formed XML ({exc})") from exc


def xml_head_text(head: bytes) -> str:
    """The first bytes of an XML file as text: without a byte-order mark, decoded by the
    encoding the bytes show (see ``_byte_encoding``; UTF-8 for 8-bit files, enough for markup
    names). Undecodable bytes are skipped; never raises."""
    skip, encoding = _byte_encoding(head)
    return head[skip:].decode(encoding or "utf-8", errors="ignore")


def xml_root_name(head: bytes) -> str | None:
    """The local name (no prefix) of the root element of an XML document, judged from its
    first bytes: the first start tag after the prolog (declaration, comments, processing
    instructions, DOCTYPE). None when the bytes do not start so. Never raises."""
    text = xml_head_text(head)
    match = _START_TAG.match(text, _PROLOG.match(text).end())
    return None if match is None else match.group(1).rpartition(":")[2]


def check_declared_encoding(data: bytes, path: str | Path, fmt: str) -> None:
    """FileFormatError naming the XML declaration when it states a UTF-16 encoding for 8-bit
    bytes or an 8-bit one for UTF-16 bytes (a file re-encoded without updating its
    declaration; the parser would only say the encoding "is incorrect")."""
    declared = _DECLARED_ENCODING.search(xml_head_text(data[:_DECLARATION_BYTES]))
    if declared is None:
        return
    actual = _byte_encoding(data)[1]
    says_utf16 = declared.group(1).lower().replace("_", "-").startswith(("utf-16", "utf16", "ucs-2"))
    is_utf16 = actual is not None and actual.startswith("utf-16")
    if says_utf16 != is_utf16:
        shown = actual.upper() if actual else "8-bit (ASCII-compatible)"
        raise FileFormatError(path, fmt, "XML declaration encoding",
                              f"the declaration says {declared.group(1)!r} but the bytes are {shown}; "
                              "the file was re-encoded without updating its declaration")


def _byte_encoding(data: bytes) -> tuple[int, str | None]:
    """(length of the byte-order mark, the encoding the first bytes show): a byte-order mark's,
    else UTF-16 from the NUL byte beside a leading ``<``, else None (an 8-bit encoding)."""
    for mark, encoding in _BOMS:
        if data.startswith(mark):
            return len(mark), encoding
    return 0, next((encoding for start, encoding in _UTF16_NO_BOM if data.startswith(start)), None)


def decode_base64(text: str | None, path: str | Path, fmt: str, field: str) -> bytes:
    """The bytes of a base64 block; FileFormatError naming ``field`` when it is absent,
    truncated or holds characters outside base64."""
    if text is None or not text.strip():
        raise FileFormatError(path, fmt, field, "empty: expected base64-encoded samples")
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FileFormatError(path, fmt, field, f"not valid base64 ({exc}); is the block truncated?") from exc


def samples_from_bytes(raw: bytes, dtype: str, count: int, path: str | Path, fmt: str, field: str) -> np.ndarray:
    """``count`` samples of ``dtype`` (e.g. "<i2") from ``raw``; FileFormatError when the bytes
    hold fewer (the count a header states is checked before anything is allocated)."""
    itemsize = np.dtype(dtype).itemsize
    check_count(count, len(raw) // itemsize, path, fmt, field, "samples")
    return np.frombuffer(raw, dtype=dtype, count=count)


def check_count(claimed: int, available: int, path: str | Path, fmt: str, field: str, what: str) -> int:
    """``claimed`` when 0 <= claimed <= available, else FileFormatError naming ``field``."""
    if not 0 <= claimed <= available:
        raise FileFormatError(path, fmt, field, f"states {claimed} {what} but the file holds {available}")
    return claimed


def number(text: str | None, path: str | Path, fmt: str, field: str, positive: bool = False) -> float:
    """A finite number read from a field's text; FileFormatError naming ``field`` otherwise."""
    try:
        value = float(text) if text is not None else float("nan")
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or (positive and value <= 0):
        kind = "a positive number" if positive else "a number"
        raise FileFormatError(path, fmt, field, f"expected {kind}, got {text!r}")
    return value


def unit_factor(unit: str | None, table: dict[str, float], path: str | Path, fmt: str, field: str) -> float:
    """``table[unit]`` (e.g. mV per unit from MV_PER_UCUM_UNIT); FileFormatError naming ``field``
    and the known units when the unit is absent or not in the table."""
    if unit not in table:
        raise FileFormatError(path, fmt, field, f"unknown unit {unit!r}, expected one of {list(table)}")
    return table[unit]


def sex_code(text: str | None) -> str | None:
    """"M" or "F" from a file's sex field ("M", "male", "F", "female" in any case), else None."""
    return _SEX.get((text or "").strip().lower())


def record_of(path: str | Path, fmt: str, field: str, signal: np.ndarray, fs: float, names: list[str],
              mapping: LeadMapping | None, *, unread: list[str] | None = None,
              metadata: dict[str, Any] | None = None, **fields: Any) -> Record:
    """The Record of a decoded file: the channels the lead contract keeps, in mV.

    signal: [C, T] in mV, one row per name of ``names`` (the file's channel names); fs: Hz.
    mapping: lead-contract overrides (csfm.data.leads). field: the file's field of the channel
    names, named when no channel is usable. unread: names of channels the reader did not
    decode, listed as dropped after those the contract drops. metadata: the reader's facts,
    after "format" and "source_file". fields: text, patient_id. record_id is the file name
    without its extension. FileFormatError when the contract keeps no channel or ``mapping``
    is malformed.
    """
    try:
        kept, dropped = resolve_channels(names, mapping, where=str(path))
    except ValueError as exc:
        raise FileFormatError(path, fmt, field, str(exc)) from exc
    rows = [index for index, _ in kept]
    return record_from_channels(signal[rows], fs, [names[index] for index in rows], ["mV"] * len(rows),
                                [ctype for _, ctype in kept], dropped + list(unread or []),
                                record_id=Path(path).stem,
                                metadata={"format": fmt, "source_file": str(path), **(metadata or {})}, **fields)
