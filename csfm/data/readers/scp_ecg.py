"""Read an SCP-ECG file (EN 1064 / ISO 11073-91064) into a Record.

Parsed from the standard; no maintained Python library reads the format. Checked against
a real version 2.0 file; the sections read here have the same layout in 1.x. Layout (all
integers little-endian): record CRC (2 bytes), record length (4), then sections, each
with a 16-byte ID header: CRC (2), section id (2), section length incl. header (4),
section version (1), protocol version (1), reserved (6; "SCPECG" in section 0 from
version 2.0). Both CRCs are CRC-CCITT (polynomial 0x1021, initial value 0xFFFF) over
everything after the CRC field. Bytes after the stated record length are ignored.

What is read:

- section 0: pointers (id, length, 1-based byte index) to the other sections;
- section 1: header tags 2 (patient id), 4 (age), 8 (sex), 14 (acquiring device:
  model description), 25/26 (acquisition date/time), 27/28 (high-pass in 0.01 Hz,
  low-pass in Hz);
- section 2: Huffman tables. Count 19999 = the standard's default table (19 codes:
  ``0`` = 0, then n ones, a zero and a sign bit = +-n for n = 1..8, and the two escape
  codes ``1111111110`` + 8-bit / ``1111111111`` + 16-bit two's complement original
  value); count 0 or no section 2 = not Huffman-encoded (16-bit signed samples). Custom
  tables (any other count) are refused with a FileFormatError;
- section 3: leads (start/end sample numbers, lead code), "reference beat subtraction
  used" flag;
- section 4: reference beat length (ms), its fiducial sample, and per QRS the beat type
  and the subtraction zone (start, fiducial, end sample numbers, 1-based);
- sections 5 / 6: reference beat / rhythm data: AVM (nV per unit), sample interval (µs),
  difference coding (0 none, 1 first, 2 second difference), bimodal flag (section 6),
  byte count per lead, then the streams;
- section 8: interpretation statements -> ``Record.text``.

Where section 3 says reference beat subtraction was used, section 6 holds residuals and
the reference beat of section 5 is added back at every type-0 QRS of section 4: residual
sample s (1-based, s in [start, end] of the zone) gets reference sample s - fiducial +
reference fiducial (1-based), in nanovolts so the two sections' AVMs may differ. Both
sections must share their sample interval. Bimodal compression (rhythm decimated outside
protected zones) is refused with a FileFormatError rather than decoded approximately.

A CRC that does not match is an error naming the section (or the record): the data it
covers cannot be trusted, and SCP writers have no reason to leave CRCs wrong.

Leads the file stores come out under their standard names. When I and II are stored but
some of III, aVR, aVL, aVF are not, those are derived (III = II - I, aVR = -(I + II)/2,
aVL = I - II/2, aVF = II - I/2) and listed in ``metadata["derived_leads"]``.
"""
from __future__ import annotations

import binascii
import struct
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np

from csfm.data.leads import SCP_LEAD_CODES, LeadMapping, derive_limb_leads
from csfm.data.readers.safe_io import FileFormatError, check_count, read_bytes, record_of
from csfm.data.record import Record

FORMAT = "SCP-ECG"

_ID_HEADER = struct.Struct("<HHIBB6s")  # CRC, section id, section length, version, protocol version, reserved
_POINTER = struct.Struct("<HII")  # section id, length, 1-based byte index
_RECORD_HEADER = 6  # record CRC + record length
_DEFAULT_TABLE = 19999
_NOT_ENCODED = 0
_ESCAPE_8, _ESCAPE_16 = "1111111110", "1111111111"
_PREFIX_BITS = 10  # longest prefix of the default table
_MAX_CODE_BITS = _PREFIX_BITS + 16

_SEX = {1: "M", 2: "F"}
_AGE_UNIT_YEARS = {1: 1.0, 2: 1 / 12, 3: 7 / 365.25, 4: 1 / 365.25, 5: 1 / 8766}


def _default_table() -> list[tuple[int, int, int]]:
    """The default Huffman table as a lookup by the next 10 bits of the stream: entry
    [prefix] = (prefix length in bits, decoded value, bits of original value after it)."""
    codes: list[tuple[str, int, int]] = [("0", 0, 0)]
    for n in range(1, 9):
        codes += [("1" * n + "0" + "0", n, 0), ("1" * n + "0" + "1", -n, 0)]
    codes += [(_ESCAPE_8, 0, 8), (_ESCAPE_16, 0, 16)]
    table: list[tuple[int, int, int]] = [(0, 0, 0)] * (1 << _PREFIX_BITS)
    for code, value, extra in codes:
        free = _PREFIX_BITS - len(code)
        first = int(code, 2) << free
        table[first:first + (1 << free)] = [(len(code), value, extra)] * (1 << free)
    return table


_TABLE = _default_table()


def sniff(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts an SCP-ECG record: a record
    length of at least one section header, then section 0's ID header (id 0, a length of
    16 + 10 per pointer, protocol version 1.0-3.x, "SCPECG" from version 2.0), whose first
    pointer is to section 0 itself at byte 7. Never raises."""
    try:
        if len(head) < 32:
            return False
        (record_length,) = struct.unpack_from("<I", head, 2)
        _, section_id, length, _, protocol, reserved = _ID_HEADER.unpack_from(head, _RECORD_HEADER)
        pointer = _POINTER.unpack_from(head, _RECORD_HEADER + _ID_HEADER.size)
        return (record_length >= _RECORD_HEADER + _ID_HEADER.size and section_id == 0
                and _ID_HEADER.size <= length <= record_length - _RECORD_HEADER
                and (length - _ID_HEADER.size) % _POINTER.size == 0
                and 10 <= protocol < 40 and (protocol < 20 or reserved == b"SCPECG")
                and pointer == (0, length, _RECORD_HEADER + 1))
    except (struct.error, TypeError):
        return False


def read_scp_ecg(path: str | Path, mapping: LeadMapping | None = None) -> Record:
    """Read the rhythm data of an SCP-ECG file.

    path: the .scp file. mapping: lead-contract overrides (csfm.data.leads).
    Returns a Record with signal [C, T] float32 in mV at fs = 1e6 / sample interval (µs)
    Hz, the stored leads (plus derived limb leads, see the module doc) that the lead
    contract keeps, NaN where a lead was not recorded (leads recorded one after another);
    patient_id from tag 2; text = the section 8 statements joined with "; ". metadata:
    format, source_file, scp_version, avm_nv, sample_interval_us, difference_coding,
    reference_beat_subtraction, derived_leads, and where present device, acquired (ISO),
    age, sex, highpass_hz, lowpass_hz, median_beats {"fs", "leads", "signal" [C, T]
    float32 mV} (the section 5 reference beats).
    Raises FileFormatError naming the file and the section/field for anything that does
    not follow the standard, a CRC mismatch, a size or count the bytes cannot hold, or a
    feature it does not decode (custom Huffman tables, bimodal compression).
    """
    data = read_bytes(path, FORMAT)
    sections, version = _sections(path, data)
    for required in (3, 6):
        if required not in sections:
            _fail(path, f"section {required}", "absent from section 0's pointers (lead definition and "
                  "rhythm data are required)")
    tags = _header_tags(path, sections.get(1, b""))
    leads, subtracted = _lead_definition(path, sections[3])
    # section 3 lead codes (csfm.data.leads.SCP_LEAD_CODES); others are named "lead code N" and dropped
    names = [SCP_LEAD_CODES.get(code, f"lead code {code}") for _, _, code in leads]
    huffman = _huffman_tables(path, sections.get(2))
    avm, interval, difference, bimodal, streams = _encoded_leads(path, sections[6], 6, len(leads))
    if bimodal:
        _fail(path, "section 6 bimodal compression", "bimodal compression (rhythm decimated outside protected "
              "zones) is not supported")
    counts = [end - start + 1 for start, end, _ in leads]
    residual = [_decode(path, f"section 6 lead {name}", stream, count, huffman, difference)
                for name, stream, count in zip(names, streams, counts)]
    rhythm_nv = [values * float(avm) for values in residual]
    metadata: dict = {"scp_version": version, "avm_nv": avm, "sample_interval_us": interval,
                      "difference_coding": difference, "reference_beat_subtraction": subtracted}
    if 4 in sections and 5 in sections:
        fiducial, zones, ref_nv, ref_interval = _reference_beats(path, sections[4], sections[5], names, huffman)
        metadata["median_beats"] = {"fs": 1e6 / ref_interval, "leads": list(names),
                                    "signal": (np.stack(ref_nv) * 1e-6).astype(np.float32)}
        if subtracted:
            if ref_interval != interval:
                _fail(path, "section 5 sample interval", f"{ref_interval} µs but the rhythm's is {interval} µs: "
                      "reference beat subtraction at another rate is not supported")
            _add_reference_beats(path, rhythm_nv, ref_nv, leads, fiducial, zones)
    elif subtracted:
        _fail(path, "section 3 flags", "reference beat subtraction is used but section 4 or 5 is absent")
    signal, names, metadata["derived_leads"] = derive_limb_leads(_place_leads(rhythm_nv, leads) * 1e-6, names)
    metadata.update(_header_metadata(tags))
    return record_of(path, FORMAT, "lead names", signal, 1e6 / interval, names, mapping, metadata=metadata,
                     patient_id=_text(tags.get(2, b"")),
                     text="; ".join(_statements(path, sections[8])) if 8 in sections else "")


def _fail(path: str | Path, field: str, why: str) -> NoReturn:
    raise FileFormatError(path, FORMAT, field, why)


def _crc(data: bytes) -> int:
    """CRC-CCITT (polynomial 0x1021, initial value 0xFFFF) as SCP-ECG computes it."""
    return binascii.crc_hqx(data, 0xFFFF)


def _sections(path: str | Path, data: bytes) -> tuple[dict[int, bytes], float]:
    """({section id: section body (the bytes after its 16-byte ID header)}, protocol
    version of section 0, e.g. 2.0). Record length, every pointer and ID header length
    are checked against the bytes present before use, then every CRC."""
    if len(data) < _RECORD_HEADER + _ID_HEADER.size:
        _fail(path, "record length", f"the file has {len(data)} bytes, fewer than a record header and one "
              "section header")
    record_crc, record_length = struct.unpack_from("<HI", data, 0)
    check_count(record_length, len(data), path, FORMAT, "record length (bytes 3-6)", "bytes")
    data = data[:record_length]
    header = _id_header(path, data, _RECORD_HEADER, 0, "section 0")
    length, protocol = header[2], header[4]
    check_count((length - _ID_HEADER.size) % _POINTER.size, 0, path, FORMAT, "section 0 length",
                f"bytes beyond whole 10-byte pointers (length {length})")
    sections = {0: data[_RECORD_HEADER + _ID_HEADER.size:_RECORD_HEADER + length]}
    for k in range((length - _ID_HEADER.size) // _POINTER.size):
        section_id, size, index = _POINTER.unpack_from(data, _RECORD_HEADER + _ID_HEADER.size + k * _POINTER.size)
        if size == 0 or section_id == 0:
            continue
        field = f"section {section_id}"
        if section_id in sections:
            _fail(path, f"section 0 pointer {k + 1}", f"a second pointer to section {section_id}")
        if index < _RECORD_HEADER + 1 or index - 1 + size > record_length:
            _fail(path, f"{field} pointer", f"index {index} + length {size} lies outside the record's "
                  f"{record_length} bytes")
        _, _, stated, _, _, _ = _id_header(path, data, index - 1, section_id, field)
        if stated != size:
            _fail(path, f"{field} length", f"{stated} bytes in its ID header but {size} in section 0")
        sections[section_id] = data[index - 1 + _ID_HEADER.size:index - 1 + size]
    if _crc(data[2:]) != record_crc:
        _fail(path, "record CRC (bytes 1-2)", f"stored 0x{record_crc:04x}, computed 0x{_crc(data[2:]):04x}: "
              "the file is corrupt")
    return sections, protocol / 10


def _id_header(path: str | Path, data: bytes, offset: int, section_id: int, field: str) -> tuple:
    """The ID header of the section at byte ``offset``, its id, length and CRC checked."""
    if offset + _ID_HEADER.size > len(data):
        _fail(path, f"{field} ID header", f"needs 16 bytes at byte {offset} but the record has {len(data)}")
    header = _ID_HEADER.unpack_from(data, offset)
    crc, found, length = header[:3]
    if found != section_id:
        _fail(path, f"{field} ID header", f"holds section id {found}, expected {section_id}")
    if length < _ID_HEADER.size:
        _fail(path, f"{field} length", f"{length} bytes, less than its 16-byte ID header")
    check_count(length, len(data) - offset, path, FORMAT, f"{field} length", "bytes")
    if _crc(data[offset + 2:offset + length]) != crc:
        _fail(path, f"{field} CRC", f"stored 0x{crc:04x}, computed 0x{_crc(data[offset + 2:offset + length]):04x}: "
              "the section is corrupt")
    return header


def _header_tags(path: str | Path, body: bytes) -> dict[int, bytes]:
    """Section 1: tag -> value bytes, up to the terminator tag 255."""
    tags: dict[int, bytes] = {}
    offset = 0
    while offset + 3 <= len(body):
        tag, length = struct.unpack_from("<BH", body, offset)
        if tag == 255:
            break
        check_count(length, len(body) - offset - 3, path, FORMAT, f"section 1 tag {tag} length", "bytes")
        tags.setdefault(tag, body[offset + 3:offset + 3 + length])
        offset += 3 + length
    return tags


def _text(value: bytes) -> str:
    """A section 1/8 string: up to its first NUL, Latin-1, stripped."""
    return value.split(b"\0", 1)[0].decode("latin-1").strip()


def _header_metadata(tags: dict[int, bytes]) -> dict:
    """Device, acquisition time, age, sex and filters from section 1 tags (a field whose
    value is malformed is left out)."""
    out: dict = {}
    device = tags.get(14, b"")
    if len(device) >= 14 and _text(device[8:14]):
        out["device"] = _text(device[8:14])  # model description
    date, time = tags.get(25, b""), tags.get(26, b"")
    if len(date) == 4 and len(time) == 3:
        year, month, day = struct.unpack("<HBB", date)
        try:
            out["acquired"] = datetime(year, month, day, *time).isoformat()
        except ValueError:
            pass
    age = tags.get(4, b"")
    if len(age) == 3 and age[2] in _AGE_UNIT_YEARS:
        out["age"] = struct.unpack_from("<H", age)[0] * _AGE_UNIT_YEARS[age[2]]
    sex = tags.get(8, b"")
    if len(sex) == 1 and sex[0] in _SEX:
        out["sex"] = _SEX[sex[0]]
    if len(tags.get(27, b"")) == 2 and struct.unpack("<H", tags[27])[0]:
        out["highpass_hz"] = struct.unpack("<H", tags[27])[0] / 100
    if len(tags.get(28, b"")) == 2 and struct.unpack("<H", tags[28])[0]:
        out["lowpass_hz"] = float(struct.unpack("<H", tags[28])[0])
    return out


def _lead_definition(path: str | Path, body: bytes) -> tuple[list[tuple[int, int, int]], bool]:
    """Section 3: [(start, end sample number, lead code)] per lead and whether reference
    beat subtraction was used (flag bit 0). The samples from the first to the last lead
    sample may not exceed the leads' samples together (leads recorded one after another
    without gaps at most), so a late start cannot stretch the record."""
    if len(body) < 2 or body[0] == 0:
        _fail(path, "section 3 number of leads", "no leads defined")
    n, flags = body[0], body[1]
    check_count(9 * n, len(body) - 2, path, FORMAT, "section 3 lead table", f"bytes for {n} leads")
    leads = [struct.unpack_from("<IIB", body, 2 + 9 * k) for k in range(n)]
    for start, end, code in leads:
        if not 1 <= start <= end:
            _fail(path, f"section 3 lead code {code} samples", f"start {start} / end {end}: expected 1 <= start <= end")
    span = max(end for _, end, _ in leads) - min(start for start, _, _ in leads) + 1
    check_count(span, sum(end - start + 1 for start, end, _ in leads), path, FORMAT,
                "section 3 lead start/end samples", "samples from the first to the last lead sample")
    return leads, bool(flags & 1)


def _huffman_tables(path: str | Path, body: bytes | None) -> bool:
    """Section 2: True for the default Huffman table, False when the data are not
    Huffman-encoded (no section 2, or a table count of 0)."""
    if body is None:
        return False
    if len(body) < 2:
        _fail(path, "section 2 number of Huffman tables", "absent: the section has no data")
    (count,) = struct.unpack_from("<H", body)
    if count not in (_DEFAULT_TABLE, _NOT_ENCODED):
        _fail(path, "section 2 number of Huffman tables", f"{count} custom tables: only the default table "
              f"({_DEFAULT_TABLE}) or none (0) is supported")
    return count == _DEFAULT_TABLE


def _encoded_leads(path: str | Path, body: bytes, section: int, n_leads: int) -> tuple:
    """Section 5 or 6: (AVM nV, sample interval µs, difference coding, bimodal flag,
    [stream bytes per lead])."""
    field = f"section {section}"
    check_count(6 + 2 * n_leads, len(body), path, FORMAT, f"{field} header", "bytes")
    avm, interval, difference, bimodal = struct.unpack_from("<HHBB", body)
    if avm == 0:
        _fail(path, f"{field} amplitude value multiplier", "0 nV: expected a positive value")
    if interval == 0:
        _fail(path, f"{field} sample time interval", "0 µs: expected a positive value")
    if difference not in (0, 1, 2):
        _fail(path, f"{field} difference data used", f"{difference}: expected 0, 1 or 2")
    sizes = struct.unpack_from(f"<{n_leads}H", body, 6)
    offset = 6 + 2 * n_leads
    check_count(sum(sizes), len(body) - offset, path, FORMAT, f"{field} lead byte counts", "bytes")
    starts = np.cumsum((offset, *sizes))
    streams = [body[a:b] for a, b in zip(starts[:-1], starts[1:])]
    return avm, interval, difference, section == 6 and bimodal != 0, streams


def _decode(path: str | Path, field: str, stream: bytes, count: int, huffman: bool, difference: int) -> np.ndarray:
    """``count`` samples of one lead: [count] int64 in AVM units, Huffman and difference
    coding undone. The count is checked against what the stream's bytes can hold (at most
    8 samples a byte with Huffman, 2 bytes a sample without) before anything is allocated."""
    if not huffman:
        check_count(count, len(stream) // 2, path, FORMAT, f"{field} sample count", "16-bit samples")
        coded = np.frombuffer(stream, dtype="<i2", count=count).astype(np.int64)
    else:
        check_count(count, 8 * len(stream), path, FORMAT, f"{field} sample count",
                    "samples (at most 8 per Huffman-coded byte)")
        coded = _huffman_decode(path, field, stream, count)
    return _undo_difference(coded, difference)


def _huffman_decode(path: str | Path, field: str, stream: bytes, count: int) -> np.ndarray:
    """Default-table Huffman decoding: [count] int64. Each step looks up the next 10 bits
    (a sliding window computed once with numpy) in the prefix table."""
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))
    n_bits = len(bits)
    padded = np.concatenate([bits, np.zeros(_MAX_CODE_BITS, dtype=np.uint8)]).astype(np.int32)
    window = np.zeros(n_bits + _PREFIX_BITS + 1, dtype=np.int32)  # window[i] = bits i..i+15 as an integer
    for k in range(16):
        window = (window << 1) | padded[k:k + len(window)]
    prefix = (window >> (16 - _PREFIX_BITS)).tolist()
    original = window.tolist()
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= n_bits:
            _fail(path, field, f"Huffman stream of {len(stream)} bytes ends after {i} of {count} samples "
                  "(truncated?)")
        length, value, extra = _TABLE[prefix[pos]]
        if extra:
            raw = original[pos + length] >> (16 - extra)
            value = raw - (1 << extra) if raw >> (extra - 1) else raw
        out[i] = value
        pos += length + extra
    if pos > n_bits:
        _fail(path, field, f"the last Huffman code of {count} samples runs past the stream's {len(stream)} bytes "
              "(truncated?)")
    return np.array(out, dtype=np.int64)


def _undo_difference(d: np.ndarray, order: int) -> np.ndarray:
    """Samples from difference-coded values: order 0 as is, 1: x[n] = d[n] + x[n-1],
    2: x[n] = d[n] + 2 x[n-1] - x[n-2]; the first ``order`` values are stored as is."""
    if order == 0 or len(d) <= order:
        return d
    if order == 1:
        return np.cumsum(d)
    step = np.cumsum(np.concatenate([[d[1] - d[0]], d[2:]]))  # x[n] - x[n-1] for n >= 1
    return np.concatenate([[d[0]], d[0] + np.cumsum(step)])


def _reference_beats(path: str | Path, s4: bytes, s5: bytes, names: list[str], huffman: bool) -> tuple:
    """Sections 4 and 5: (reference fiducial sample (1-based), [(start, fiducial, end) per
    type-0 QRS], [reference beat per lead, nV], section 5 sample interval µs)."""
    if len(s4) < 6:
        _fail(path, "section 4 header", f"{len(s4)} bytes, expected at least 6")
    length_ms, fiducial, n_qrs = struct.unpack_from("<HHH", s4)
    check_count(14 * n_qrs, len(s4) - 6, path, FORMAT, "section 4 QRS table", f"bytes for {n_qrs} QRS complexes")
    qrs = [struct.unpack_from("<HIII", s4, 6 + 14 * k) for k in range(n_qrs)]
    zones = [(k, start, fc, end) for k, (beat_type, start, fc, end) in enumerate(qrs) if beat_type == 0]
    avm, interval, difference, _, streams = _encoded_leads(path, s5, 5, len(names))
    samples = length_ms * 1000 // interval
    beats = [_decode(path, f"section 5 lead {name}", stream, samples, huffman, difference) * float(avm)
             for name, stream in zip(names, streams)]
    return fiducial, zones, beats, interval


def _add_reference_beats(path: str | Path, rhythm: list[np.ndarray], beats: list[np.ndarray],
                         leads: list[tuple[int, int, int]], fiducial: int, zones: list[tuple]) -> None:
    """Add the reference beat back into each lead's residual (nV, in place) over every
    type-0 QRS subtraction zone, aligned on the fiducial points."""
    n_ref = len(beats[0])
    for k, start, fc, end in zones:
        first, last = start - fc + fiducial, end - fc + fiducial  # 1-based reference samples
        if not (start <= fc <= end and 1 <= first and last <= n_ref):
            _fail(path, f"section 4 QRS {k + 1}", f"subtraction zone {start}..{end} around fiducial {fc} does not "
                  f"fit the {n_ref}-sample reference beat (fiducial {fiducial})")
        for values, beat, (lead_start, lead_end, code) in zip(rhythm, beats, leads):
            if not lead_start <= start <= end <= lead_end:
                _fail(path, f"section 4 QRS {k + 1}", f"subtraction zone {start}..{end} lies outside lead code "
                      f"{code}'s samples {lead_start}..{lead_end}")
            values[start - lead_start:end - lead_start + 1] += beat[first - 1:last]


def _place_leads(rhythm: list[np.ndarray], leads: list[tuple[int, int, int]]) -> np.ndarray:
    """[C, T] float64 with each lead at its sample numbers, NaN where it was not recorded;
    T spans the first to the last sample of any lead."""
    first = min(start for start, _, _ in leads)
    span = max(end for _, end, _ in leads) - first + 1
    out = np.full((len(leads), span), np.nan)
    for row, values, (start, end, _) in zip(out, rhythm, leads):
        row[start - first:end - first + 1] = values
    return out


def _statements(path: str | Path, body: bytes) -> list[str]:
    """Section 8: the interpretation statements, in order."""
    if len(body) < 9:
        _fail(path, "section 8 header", f"{len(body)} bytes, expected at least 9")
    count = body[8]
    statements, offset = [], 9
    for k in range(count):
        if offset + 3 > len(body):
            _fail(path, f"section 8 statement {k + 1}", f"the section ends before statement {k + 1} of {count}")
        length = struct.unpack_from("<H", body, offset + 1)[0]
        check_count(length, len(body) - offset - 3, path, FORMAT, f"section 8 statement {k + 1} length", "bytes")
        statements.append(_text(body[offset + 3:offset + 3 + length]))
        offset += 3 + length
    return [text for text in statements if text]
