"""The shared helpers of the file readers (csfm.data.readers.safe_io): the XML head helpers,
the declared-encoding check, unit and sex look-ups, record_of; the hostile XML files every
XML reader must refuse (entity bomb, external entity, a declaration that lies about the encoding);
and every reader's sniff on every real file.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from fixtures import SHARED, need
from helpers import assert_refused_early

from csfm.data.readers import ge_muse, hl7_aecg, philips
from csfm.data.readers.safe_io import (MV_PER_UCUM_UNIT, FileFormatError, check_declared_encoding, record_of,
                                       sex_code, unit_factor, xml_head_text, xml_root_name)

VENDOR = SHARED / "vendor"
# reader module -> its recordings in VENDOR / module (the folders also hold licence texts)
RECORDINGS = {
    "ge_muse": ["muse_ecg.xml"],
    "hl7_aecg": ["Example_aECG.xml"],
    "philips": ["129DYPRG.XML", "3191723_ZZDEMOPTONLY_1-04_orig.xml"],
    "dicom_ecg": ["waveform_ecg.dcm"],
    "scp_ecg": ["ECGToolkit_Example.scp"],
}
# (reader, its FORMAT, its root element)
XML_READERS = [
    pytest.param(ge_muse.read_ge_muse, ge_muse.FORMAT, "RestingECG", id="ge_muse"),
    pytest.param(hl7_aecg.read_hl7_aecg, hl7_aecg.FORMAT, "AnnotatedECG", id="hl7_aecg"),
    pytest.param(philips.read_philips, philips.FORMAT, "restingecgdata", id="philips"),
]


# ---------------------------------------------------------------- every reader's sniff on the real files

@pytest.mark.data
@pytest.mark.parametrize("module", list(RECORDINGS))
def test_sniff_tells_each_real_file_by_content(module):
    """True for the module's own recordings only: False for the other vendors' files, the
    licence texts and WFDB headers."""
    sniff = importlib.import_module(f"csfm.data.readers.{module}").sniff
    own = [need(VENDOR / module / name) for name in RECORDINGS[module]]
    files = [path for path in VENDOR.rglob("*") if path.is_file()]
    files += [need(SHARED / "physionet" / "ptbdb" / "s0010_re.hea"), *sorted(SHARED.glob("physionet/*/*.hea"))[:3]]
    assert len(files) > len(own) + 4
    for path in files:
        assert sniff(path.read_bytes()[:4096]) is (path in own), path


# ---------------------------------------------------------------- hostile XML, every XML reader

def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "hostile.xml"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("read", "fmt", "root"), XML_READERS)
def test_entity_bomb(tmp_path, read, fmt, root):
    entities = '<!ENTITY e0 "lol">' + "".join(f'<!ENTITY e{k} "{f"&e{k - 1};" * 10}">' for k in range(1, 10))
    text = f'<?xml version="1.0"?><!DOCTYPE {root} [{entities}]><{root}><a>&e9;</a></{root}>'
    assert_refused_early(read, fmt, _write(tmp_path, text.encode()), "EntitiesForbidden", field="XML")


@pytest.mark.parametrize(("read", "fmt", "root"), XML_READERS)
def test_external_entity(tmp_path, read, fmt, root):
    text = (f'<?xml version="1.0"?><!DOCTYPE {root} [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            f"<{root}><a>&x;</a></{root}>")
    error = assert_refused_early(read, fmt, _write(tmp_path, text.encode()), "refused", field="XML")
    assert "root:" not in str(error)  # /etc/passwd was not read into anything


@pytest.mark.parametrize(("read", "fmt", "root"), XML_READERS)
@pytest.mark.parametrize(("declared", "encoding", "shown"), [
    ("UTF-8", "utf-16", "UTF-16-LE"),  # BOM written by Python's utf-16 codec
    ("utf-8", "utf-16-be", "UTF-16-BE"),  # no BOM
    ("UTF-16", "utf-8", "8-bit"),
])
def test_declaration_that_lies_about_the_encoding(tmp_path, read, fmt, root, declared, encoding, shown):
    text = f'<?xml version="1.0" encoding="{declared}"?>\n<{root}><a>x</a></{root}>'
    assert_refused_early(read, fmt, _write(tmp_path, text.encode(encoding)), f"'{declared}'", shown,
                      field="XML declaration encoding")


# ---------------------------------------------------------------- XML head helpers

@pytest.mark.parametrize(("head", "root"), [
    (b'<?xml version="1.0"?><v3:AnnotatedECG xmlns:v3="urn:hl7-org:v3">', "AnnotatedECG"),
    ('<?xml version="1.0" encoding="UTF-16"?>\n<RestingECG>'.encode("utf-16"), "RestingECG"),  # BOM
    ("<restingecgdata>".encode("utf-16-be"), "restingecgdata"),  # no BOM
    (b"\xef\xbb\xbf<a/>", "a"),
    (b"<!-- <Other> in a comment -->\n<?pi x?>\n<!DOCTYPE r [<!ENTITY e 'v'>]>\n<r>", "r"),
    (b"  \n<root attr='1'>", "root"),
    (b"text before <root>", None),
    (b"# `<root>` in markdown", None),
    (b"", None), (b"\xff\xfe\x00", None), (bytes(range(256)) * 16, None),
])
def test_xml_root_name(head, root):
    assert xml_root_name(head) == root


def test_xml_head_text():
    assert xml_head_text(b"\xff\xfe" + "<a>".encode("utf-16-le")) == "<a>"
    assert xml_head_text("<a>é".encode("utf-16-be")) == "<a>é"
    assert xml_head_text(b"\xef\xbb\xbf<a>\xff") == "<a>"  # undecodable bytes are skipped, not raised


def test_check_declared_encoding_passes_honest_files(tmp_path):
    for data in (b"<a/>", b'<?xml version="1.0"?><a/>', b'<?xml version="1.0" encoding="ISO-8859-1"?><a/>',
                 '<?xml version="1.0" encoding="utf-16"?><a/>'.encode("utf-16"),
                 '<?xml version="1.0" encoding="UTF_16LE"?><a/>'.encode("utf-16-le"),
                 b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?><a/>'):
        check_declared_encoding(data, tmp_path / "f.xml", "X")
    with pytest.raises(FileFormatError, match="XML declaration encoding") as info:
        check_declared_encoding(b'\xef\xbb\xbf<?xml version="1.0" encoding="UCS-2"?><a/>', tmp_path / "f.xml", "X")
    assert info.value.fmt == "X" and info.value.path == tmp_path / "f.xml"


# ---------------------------------------------------------------- units, sex

def test_unit_factor(tmp_path):
    assert unit_factor("uV", MV_PER_UCUM_UNIT, tmp_path, "X", "scale@unit") == 1e-3
    assert unit_factor("nV", MV_PER_UCUM_UNIT, tmp_path, "X", "scale@unit") == 1e-6
    for unit in ("UV", "MV", "mm[Hg]", None):  # UCUM is case-sensitive: MV is megavolt
        with pytest.raises(FileFormatError) as info:
            unit_factor(unit, MV_PER_UCUM_UNIT, tmp_path, "X", "scale@unit")
        assert info.value.field == "scale@unit" and repr(unit) in str(info.value) and "'uV'" in str(info.value)


def test_sex_code():
    assert [sex_code(text) for text in ("M", "f", " Male ", "FEMALE", "UN", "O", "", None)] == \
        ["M", "F", "M", "F", None, None, None, None]


# ---------------------------------------------------------------- record_of

def test_record_of_applies_the_lead_contract(tmp_path):
    path = tmp_path / "rec.xml"
    signal = np.arange(12, dtype=np.float64).reshape(4, 3)
    record = record_of(path, "X", "leads", signal, 250.0, ["II", "RESP", "Lead I", "ii"], None,
                       unread=["X_RESPIRATION"], metadata={"device": "cart"},
                       patient_id="P1", text="t")
    assert record.channel_names == ["II", "Lead I"] and record.channel_types == [1, 0]
    np.testing.assert_array_equal(record.signal, signal[[0, 2]].astype(np.float32))
    assert record.signal.dtype == np.float32 and record.units == ["mV", "mV"] and record.fs == 250.0
    assert record.dropped_channels == ["RESP", "ii (duplicate of II)", "X_RESPIRATION"]
    assert record.record_id == "rec" and record.patient_id == "P1" and record.text == "t"
    assert list(record.metadata)[:2] == ["format", "source_file"] and record.metadata["source_file"] == str(path)
    assert record.metadata["device"] == "cart"


def test_record_of_without_a_usable_channel_names_the_field(tmp_path):
    signal = np.zeros((2, 3))
    with pytest.raises(FileFormatError) as info:
        record_of(tmp_path / "rec.xml", "X", "leads/code", signal, 1.0, ["RESP", "ABP"], None)
    assert info.value.field == "leads/code" and "no usable ECG/PPG channel" in str(info.value)
    with pytest.raises(FileFormatError) as info:
        record_of(tmp_path / "rec.xml", "X", "leads/code", signal, 1.0, ["I", "II"], {"I": "lead 13"})
    assert info.value.field == "leads/code" and "unknown channel type" in str(info.value)
