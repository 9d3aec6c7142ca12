"""SCP-ECG reader: the real ECGToolkit example file, crafted round trips through a
test-side encoder (second/first/no difference, default Huffman table or none, reference
beat subtraction, 8 stored leads, leads recorded one after another), and hostile files.

The test-side encoder and decoder below work on strings of '0'/'1' characters, a
deliberately different implementation from the reader's prefix-table decoder.
"""
from __future__ import annotations

import binascii
import struct
from pathlib import Path

import numpy as np
import pytest
from fixtures import SHARED, need
from helpers import assert_ecg_record, assert_refused_early, assert_lead_matches, assert_median_beats
from scipy.signal import find_peaks

from csfm.data.readers.safe_io import FileFormatError
from csfm.data.readers.scp_ecg import FORMAT, read_scp_ecg, sniff

VENDOR = SHARED / "vendor"
EXAMPLE = VENDOR / "scp_ecg" / "ECGToolkit_Example.scp"
TWELVE_CODES = {"I": 1, "II": 2, "V1": 3, "V2": 4, "V3": 5, "V4": 6, "V5": 7, "V6": 8,
                "III": 61, "aVR": 62, "aVL": 63, "aVF": 64}


# ---------------------------------------------------------------- test-side SCP writer

def _crc(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)


def _huffman_bits(values: np.ndarray) -> str:
    """Default-table code of each value: 0 -> '0'; +-n (n <= 8) -> n ones, '0', sign bit;
    else '1111111110' + 8-bit or '1111111111' + 16-bit two's complement."""
    codes = []
    for v in (int(x) for x in values):
        if v == 0:
            codes.append("0")
        elif abs(v) <= 8:
            codes.append("1" * abs(v) + "0" + ("1" if v < 0 else "0"))
        elif -128 <= v <= 127:
            codes.append("1111111110" + format(v & 0xFF, "08b"))
        else:
            codes.append("1111111111" + format(v & 0xFFFF, "016b"))
    return "".join(codes)


def _bits_to_bytes(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""


def _difference(x: np.ndarray, order: int) -> np.ndarray:
    d = x.astype(np.int64).copy()
    if order == 1:
        d[1:] = x[1:] - x[:-1]
    elif order == 2:
        d[2:] = x[2:] - 2 * x[1:-1] + x[:-2]
    return d


def _samples_body(leads: list[np.ndarray], avm: int, interval: int, order: int, huffman: bool,
                  flag: int = 0) -> bytes:
    """Section 5/6 body: AVM, interval, difference coding, flag, byte counts, streams."""
    streams = [_bits_to_bytes(_huffman_bits(_difference(x, order))) if huffman
               else _difference(x, order).astype("<i2").tobytes() for x in leads]
    return (struct.pack("<HHBB", avm, interval, order, flag) + struct.pack(f"<{len(leads)}H", *map(len, streams))
            + b"".join(streams))


def _section(section_id: int, body: bytes, reserved: bytes = bytes(6)) -> bytes:
    body += b"\0" * (len(body) % 2)
    rest = struct.pack("<HIBB6s", section_id, 16 + len(body), 20, 20, reserved) + body
    return struct.pack("<H", _crc(rest)) + rest


def _record(bodies: dict[int, bytes]) -> bytes:
    """A whole SCP record: section 0 pointing at sections 0..11 (length 0 when absent)."""
    ids = sorted(set(range(12)) | set(bodies))
    s0_length = 16 + 10 * len(ids)
    sections, index = {}, 7 + s0_length
    for sid in ids:
        if sid in bodies:
            sections[sid] = _section(sid, bodies[sid])
    pointers, offsets = b"", {}
    for sid in ids:
        if sid == 0:
            pointers += struct.pack("<HII", 0, s0_length, 7)
        elif sid in sections:
            offsets[sid] = index
            pointers += struct.pack("<HII", sid, len(sections[sid]), index)
            index += len(sections[sid])
        else:
            pointers += struct.pack("<HII", sid, 0, 0)
    body = _section(0, pointers, b"SCPECG") + b"".join(sections[sid] for sid in sorted(sections))
    rest = struct.pack("<I", 6 + len(body)) + body
    return struct.pack("<H", _crc(rest)) + rest


def _lead_table(leads: list[tuple[int, int, int]], flags: int) -> bytes:
    return bytes([len(leads), flags]) + b"".join(struct.pack("<IIB", *lead) for lead in leads)


def _tags(tags: dict[int, bytes]) -> bytes:
    return b"".join(struct.pack("<BH", t, len(v)) + v for t, v in tags.items()) + b"\xff\0\0"


def _synthetic(n: int, seed: int) -> np.ndarray:
    """Integer test signal with slow waves, 'QRS' spikes and jumps that need both escape codes."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 80 * np.sin(2 * np.pi * t / 400) + rng.integers(-3, 4, n).cumsum() % 40
    x[::500] += 600
    x[250::500] -= 5000
    return x.astype(np.int64)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _crafted(names: list[str], n: int = 2500, *, order: int = 2, huffman: bool = True, avm: int = 1000,
             interval: int = 2000, table: int | None = 19999, bimodal: int = 0,
             extra: dict[int, bytes] | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A valid record of simultaneous leads ``names`` x n samples; returns (bytes, {name: ints})."""
    signals = {name: _synthetic(n, seed) for seed, name in enumerate(names)}
    bodies = {1: _tags({2: b"PID-42\0", 25: struct.pack("<HBB", 2021, 3, 4), 26: bytes([5, 6, 7]),
                        8: b"\x02", 4: struct.pack("<HB", 61, 1)}),
              3: _lead_table([(1, n, TWELVE_CODES[name]) for name in names], 0b100 | len(names) << 3),
              6: _samples_body(list(signals.values()), avm, interval, order, huffman, bimodal)}
    if table is not None:
        bodies[2] = struct.pack("<H", table)
    bodies.update(extra or {})
    return _record(bodies), signals


def _fix_crcs(data: bytearray) -> bytes:
    """Recompute every section CRC (over the length section 0 gives) and the record CRC."""
    s0_length = struct.unpack_from("<I", data, 10)[0]
    for k in range((s0_length - 16) // 10):
        _, length, index = struct.unpack_from("<HII", data, 22 + 10 * k)
        if length:
            struct.pack_into("<H", data, index - 1, _crc(bytes(data[index + 1:index - 1 + length])))
    struct.pack_into("<H", data, 0, _crc(bytes(data[2:])))
    return bytes(data)


def _section_offset(data: bytes, section_id: int) -> int:
    s0_length = struct.unpack_from("<I", data, 10)[0]
    for k in range((s0_length - 16) // 10):
        sid, length, index = struct.unpack_from("<HII", data, 22 + 10 * k)
        if sid == section_id and length:
            return index - 1
    raise KeyError(section_id)


def _decode_bits(stream: bytes, count: int) -> list[int]:
    """Test-side default-table decoder over a '0'/'1' string."""
    bits = "".join(format(b, "08b") for b in stream)
    out, pos = [], 0
    while len(out) < count:
        ones = 0
        while ones < 10 and bits[pos + ones] == "1":
            ones += 1
        if ones == 0:
            out.append(0)
            pos += 1
        elif ones < 9:
            out.append(-ones if bits[pos + ones + 1] == "1" else ones)
            pos += ones + 2
        else:
            width = 8 if ones == 9 else 16
            raw = int(bits[pos + 10:pos + 10 + width], 2)
            out.append(raw - (1 << width) if raw >> (width - 1) else raw)
            pos += 10 + width
    return out


# ---------------------------------------------------------------- the real file

@pytest.fixture(scope="module")
def example():
    return read_scp_ecg(need(EXAMPLE))


@pytest.mark.data
def test_example_shape_rate_names_units(example):
    assert_ecg_record(example, 500.0, ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF"],
                      5000)  # 10 s
    assert example.metadata["derived_leads"] == []  # all 12 are stored
    assert np.isfinite(example.signal).all()


@pytest.mark.data
def test_example_header_fields(example):
    assert example.record_id == "ECGToolkit_Example"
    assert example.patient_id == "SBJ-123"
    meta = example.metadata
    assert meta["format"] == FORMAT and meta["source_file"] == str(EXAMPLE)
    assert meta["scp_version"] == 2.0 and meta["avm_nv"] == 2500 and meta["sample_interval_us"] == 2000
    assert meta["difference_coding"] == 2 and meta["reference_beat_subtraction"] is False
    assert meta["device"] == "ELI250" and meta["acquired"] == "2002-11-22T09:10:00" and meta["sex"] == "M"
    assert example.text == ""  # no section 8 in this file


@pytest.mark.data
def test_example_lead_ii_matches_independent_decode(example):
    """Lead II against the test-side bit-string decoder and the AVM read from section 6's
    own bytes, at every sample (>= 100 positions) and by correlation."""
    data = EXAMPLE.read_bytes()
    s6 = _section_offset(data, 6) + 16
    avm, interval, order, _ = struct.unpack_from("<HHBB", data, s6)
    sizes = struct.unpack_from("<12H", data, s6 + 6)
    start = s6 + 6 + 24 + sizes[0]  # lead II is the second stored lead
    coded = np.array(_decode_bits(data[start:start + sizes[1]], 5000), dtype=np.int64)
    assert order == 2
    ints = coded.copy()
    for n in range(2, len(ints)):
        ints[n] = coded[n] + 2 * ints[n - 1] - ints[n - 2]
    assert_lead_matches(example.signal[1], ints * avm * 1e-6, "II")


@pytest.mark.data
def test_example_einthoven_and_augmented_leads(example):
    """III, aVR, aVL, aVF are stored independently of I and II; the limb-lead laws hold."""
    lead = dict(zip(example.channel_names, example.signal.astype(np.float64)))
    assert np.corrcoef(lead["III"], lead["II"] - lead["I"])[0, 1] >= 0.999
    assert np.abs(lead["III"] - (lead["II"] - lead["I"])).max() <= 0.0025  # one AVM step
    for name, expected in (("aVR", -(lead["I"] + lead["II"]) / 2), ("aVL", lead["I"] - lead["II"] / 2),
                           ("aVF", lead["II"] - lead["I"] / 2)):
        assert np.corrcoef(lead[name], expected)[0, 1] >= 0.999, name


@pytest.mark.data
def test_example_is_physiological(example):
    """QRS amplitudes 0.1-5 mV, R peaks at a plausible and consistent rate in every chest
    lead and lead II (a mis-decoded stream drifts or turns to noise)."""
    fs = example.fs
    peaks_by_lead = {}
    for name in ("II", "V1", "V2", "V3", "V4", "V5", "V6"):
        x = example.signal[example.channel_names.index(name)].astype(np.float64)
        x = x - np.median(x)
        peaks, _ = find_peaks(np.abs(x), height=0.5 * np.abs(x).max(), distance=int(0.3 * fs))
        peaks_by_lead[name] = peaks
        rate = 60 * fs / np.median(np.diff(peaks))
        assert 40 <= rate <= 150, (name, rate)
        for p in peaks:
            window = x[max(p - 50, 0):p + 50]
            assert 0.1 <= window.max() - window.min() <= 5.0, (name, p)
    reference = peaks_by_lead["II"]
    for name, peaks in peaks_by_lead.items():
        assert abs(len(peaks) - len(reference)) <= 1, name
        nearest = np.array([np.abs(reference - p).min() for p in peaks])
        assert np.median(nearest) <= 0.05 * fs, name


@pytest.mark.data
def test_example_median_beats_are_not_the_rhythm(example):
    median = assert_median_beats(example, 500.0, example.channel_names, 599)  # 1198 ms at 2000 µs
    assert 0.1 <= np.ptp(median[1]) <= 5.0


def test_sniff_crafted_and_other_content():
    data, _ = _crafted(["I", "II"])
    assert sniff(data[:4096])
    assert not sniff(b"100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n")
    assert not sniff(b"")
    assert not sniff(data[:20])
    assert not sniff(b"\0" * 4096)
    v2_without_magic = bytearray(data)
    v2_without_magic[16:22] = bytes(6)
    assert not sniff(bytes(v2_without_magic))


# ---------------------------------------------------------------- crafted round trips

@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("huffman", [True, False])
def test_round_trip_exact(tmp_path, order, huffman):
    names = list(TWELVE_CODES)
    data, signals = _crafted(names, order=order, huffman=huffman, avm=1000, table=19999 if huffman else 0)
    record = read_scp_ecg(_write(tmp_path, "rt.scp", data))
    assert record.channel_names == names and record.fs == 500.0
    for name, ints in signals.items():
        np.testing.assert_array_equal(record.signal[names.index(name)], (ints * 1e-3).astype(np.float32))
    assert record.patient_id == "PID-42" and record.metadata["acquired"] == "2021-03-04T05:06:07"
    assert record.metadata["sex"] == "F" and record.metadata["age"] == 61.0


def test_no_section_2_means_16_bit_samples(tmp_path):
    data, signals = _crafted(["I", "II", "V1"], huffman=False, table=None)
    record = read_scp_ecg(_write(tmp_path, "raw.scp", data))
    np.testing.assert_array_equal(record.signal[0], (signals["I"] * 1e-3).astype(np.float32))


def test_eight_stored_leads_get_derived_limb_leads(tmp_path):
    names = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    data, signals = _crafted(names, avm=5000)
    record = read_scp_ecg(_write(tmp_path, "eight.scp", data))
    assert record.channel_names == names + ["III", "aVR", "aVL", "aVF"]
    assert record.metadata["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
    lead_i, lead_ii = signals["I"] * 5e-3, signals["II"] * 5e-3
    lead = dict(zip(record.channel_names, record.signal))
    for name, expected in (("III", lead_ii - lead_i), ("aVR", -(lead_i + lead_ii) / 2),
                           ("aVL", lead_i - lead_ii / 2), ("aVF", lead_ii - lead_i / 2)):
        np.testing.assert_allclose(lead[name], expected, rtol=1e-6, atol=1e-5, err_msg=name)


def test_leads_recorded_one_after_another(tmp_path):
    first, second = _synthetic(1000, 1), _synthetic(1500, 2)
    data = _record({2: struct.pack("<H", 19999),
                    3: _lead_table([(1, 1000, 1), (1001, 2500, 3)], 0),
                    6: _samples_body([first, second], 1000, 2000, 2, True)})
    record = read_scp_ecg(_write(tmp_path, "seq.scp", data))
    assert record.signal.shape == (2, 2500)
    np.testing.assert_array_equal(record.signal[0, :1000], (first * 1e-3).astype(np.float32))
    assert np.isnan(record.signal[0, 1000:]).all() and np.isnan(record.signal[1, :1000]).all()
    np.testing.assert_array_equal(record.signal[1, 1000:], (second * 1e-3).astype(np.float32))


def _subtracted(n: int = 3000, ref_interval: int = 2000, ref_avm: int = 500) -> tuple[bytes, dict, np.ndarray]:
    """Rhythm = residual + reference beat at three type-0 QRS (and one type-1 QRS that is
    left alone); the file stores the residual (section 6) and the beat (section 5)."""
    names = ["I", "II"]
    length_ms, ref_fiducial = 150 * ref_interval // 1000, 60  # 150 samples, fiducial at sample 60 (1-based)
    beat = {name: (400 * np.exp(-((np.arange(150) - 59) / (6 + k)) ** 2)).astype(np.int64)
            for k, name in enumerate(names)}
    residual = {name: _synthetic(n, 10 + k) % 50 for k, name in enumerate(names)}
    zones = [(0, 451, 500, 560), (0, 1201, 1250, 1330), (1, 1800, 1850, 1900), (0, 2941, 2990, 3000)]
    rhythm = {name: residual[name] * 1000 for name in names}  # nV, rhythm AVM 1000 nV
    for beat_type, start, fc, end in zones:
        if beat_type == 0:
            for name in names:
                first, last = start - fc + ref_fiducial, end - fc + ref_fiducial  # 1-based reference samples
                rhythm[name][start - 1:end] += beat[name][first - 1:last] * ref_avm
    s4 = struct.pack("<HHH", length_ms, ref_fiducial, len(zones)) + b"".join(
        struct.pack("<HIII", *zone) for zone in zones) + b"".join(struct.pack("<II", z[1], z[3]) for z in zones)
    data = _record({2: struct.pack("<H", 19999), 3: _lead_table([(1, n, 1), (1, n, 2)], 0b101 | 2 << 3),
                    4: s4, 5: _samples_body(list(beat.values()), ref_avm, ref_interval, 2, True),
                    6: _samples_body(list(residual.values()), 1000, 2000, 2, True)})
    return data, rhythm, np.stack(list(beat.values())) * ref_avm


def test_reference_beat_is_added_back(tmp_path):
    data, rhythm_nv, beat_nv = _subtracted()
    record = read_scp_ecg(_write(tmp_path, "ref.scp", data))
    assert record.metadata["reference_beat_subtraction"] is True
    for row, name in zip(record.signal, ["I", "II"]):
        np.testing.assert_allclose(row, rhythm_nv[name] * 1e-6, rtol=0, atol=1e-6)
    np.testing.assert_allclose(record.metadata["median_beats"]["signal"], beat_nv * 1e-6, rtol=0, atol=1e-6)
    residual_only = record.signal[0, 1800:1900] * 1e6  # type-1 QRS: nothing added
    assert np.abs(residual_only).max() < 50 * 1000


def test_reference_beat_at_another_rate_is_refused(tmp_path):
    data, _, _ = _subtracted(ref_interval=1000)
    with pytest.raises(FileFormatError, match="section 5 sample interval"):
        read_scp_ecg(_write(tmp_path, "rate.scp", data))


def test_subtraction_zone_outside_reference_beat_is_refused(tmp_path):
    data, _, _ = _subtracted()
    raw = bytearray(data)
    s4 = _section_offset(data, 4) + 16
    struct.pack_into("<I", raw, s4 + 6 + 2 + 4, 300)  # QRS 1 fiducial 300: zone 451..560 falls past the beat
    with pytest.raises(FileFormatError, match="section 4 QRS 1"):
        read_scp_ecg(_write(tmp_path, "zone.scp", _fix_crcs(raw)))


def test_bimodal_compression_is_refused(tmp_path):
    data, _ = _crafted(["I", "II"], bimodal=1)
    with pytest.raises(FileFormatError, match="bimodal"):
        read_scp_ecg(_write(tmp_path, "bimodal.scp", data))


def test_statements_become_text(tmp_path):
    statements = [(1, b"Sinus rhythm\0"), (2, b"Left axis deviation\0")]
    s8 = struct.pack("<BHBBBBB", 1, 2021, 3, 4, 5, 6, 7) + bytes([len(statements)]) + b"".join(
        struct.pack("<BH", k, len(text)) + text for k, text in statements)
    data, _ = _crafted(["I", "II"], extra={8: s8})
    assert read_scp_ecg(_write(tmp_path, "text.scp", data)).text == "Sinus rhythm; Left axis deviation"


def test_mapping_drops_a_lead(tmp_path):
    data, _ = _crafted(["I", "V1", "V2"])  # without II nothing is derived
    record = read_scp_ecg(_write(tmp_path, "map.scp", data), mapping={"V1": None})
    assert record.channel_names == ["I", "V2"] and record.dropped_channels == ["V1"]
    assert record.metadata["derived_leads"] == []


# ---------------------------------------------------------------- hostile files

def _hostile(tmp_path: Path, data: bytes, *fragments: str) -> None:
    """The file must fail with a FileFormatError naming it and ``fragments``, under 100 MB."""
    assert_refused_early(read_scp_ecg, FORMAT, _write(tmp_path, "hostile.scp", data), *fragments)


@pytest.fixture(scope="module")
def valid() -> bytes:
    return _crafted(list(TWELVE_CODES), n=5000)[0]


def test_record_length_beyond_file(tmp_path, valid):
    raw = bytearray(valid)
    struct.pack_into("<I", raw, 2, len(valid) + 1000)
    _hostile(tmp_path, bytes(raw), "record length", str(len(valid) + 1000))


def test_section_length_of_a_billion(tmp_path, valid):
    raw = bytearray(valid)
    struct.pack_into("<I", raw, _section_offset(valid, 6) + 4, 10 ** 9)
    _hostile(tmp_path, _fix_crcs(raw), "section 6 length", "1000000000")


def test_section_pointer_of_a_billion(tmp_path, valid):
    raw = bytearray(valid)
    struct.pack_into("<I", raw, 22 + 10 * 6 + 2, 10 ** 9)  # section 0's pointer to section 6
    _hostile(tmp_path, _fix_crcs(raw), "section 6 pointer")


def test_lead_sample_count_of_a_billion(tmp_path, valid):
    raw = bytearray(valid)
    struct.pack_into("<I", raw, _section_offset(valid, 3) + 16 + 2 + 4, 10 ** 9)  # lead I end sample
    _hostile(tmp_path, _fix_crcs(raw), "section 6 lead I", "1000000000")


def test_lead_start_of_a_billion(tmp_path, valid):
    """A late start keeps the lead short but would stretch the record over 10**9 samples."""
    raw = bytearray(valid)
    s3 = _section_offset(valid, 3) + 16 + 2
    struct.pack_into("<II", raw, s3, 10 ** 9, 10 ** 9 + 4999)
    _hostile(tmp_path, _fix_crcs(raw), "section 3 lead start/end samples")


def test_truncated_huffman_stream(tmp_path):
    signal = _synthetic(5000, 3)
    stream = _bits_to_bytes(_huffman_bits(_difference(signal, 2)))
    body = struct.pack("<HHBBH", 1000, 2000, 2, 0, len(stream) // 2) + stream[:len(stream) // 2]
    data = _record({2: struct.pack("<H", 19999), 3: _lead_table([(1, 5000, 2)], 0b1100), 6: body})
    _hostile(tmp_path, data, "section 6 lead II", "truncated")


def test_bad_section_crc(tmp_path, valid):
    raw = bytearray(valid)
    raw[_section_offset(valid, 6) + 100] ^= 0x55
    _hostile(tmp_path, bytes(raw), "section 6 CRC")


def test_bad_record_crc(tmp_path, valid):
    raw = bytearray(valid)
    raw[0] ^= 0xFF
    _hostile(tmp_path, bytes(raw), "record CRC")


@pytest.mark.parametrize("count", [3, 19998, 20000])
def test_unknown_huffman_table(tmp_path, count):
    data, _ = _crafted(["I", "II"], table=count)
    _hostile(tmp_path, data, "section 2 number of Huffman tables", str(count))


def test_missing_rhythm_section(tmp_path):
    data = _record({2: struct.pack("<H", 19999), 3: _lead_table([(1, 10, 1)], 0)})
    _hostile(tmp_path, data, "section 6", "absent")


def test_not_an_scp_file(tmp_path):
    _hostile(tmp_path, b"100 2 360 650000\n", "record length")
