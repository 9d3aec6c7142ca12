"""One door for files: read_record tells every vendor format from its content, FileFolder takes a
folder of mixed formats, and what cannot be read is named (file, format, field), never guessed."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from csfm.data.demo import make_demo_record
from csfm.data.readers import FileFolder, detect_format, read_record
from csfm.data.readers.safe_io import FileFormatError
from csfm.data.sources import open_sources
from fixtures import SHARED, TWELVE, need, write_wfdb

VENDOR = SHARED / "vendor"
# file -> (format, fs Hz, leads, seconds): what each file states (vendor/README.md)
FILES = {
    "ge_muse/muse_ecg.xml": ("GE MUSE XML", 240.0, 12, 2500 / 240),
    "philips/129DYPRG.XML": ("Philips XML", 500.0, 12, 10.528),
    "philips/3191723_ZZDEMOPTONLY_1-04_orig.xml": ("Philips XML", 500.0, 12, 10.6),
    "hl7_aecg/Example_aECG.xml": ("HL7 aECG", 500.0, 12, 10.0),
    "dicom_ecg/waveform_ecg.dcm": ("DICOM ECG", 1000.0, 12, 10.0),
    "scp_ecg/ECGToolkit_Example.scp": ("SCP-ECG", 500.0, 12, 10.0),
}


@pytest.mark.data
@pytest.mark.parametrize("name", list(FILES))
def test_every_vendor_file_reads_through_the_one_door(name):
    path = need(VENDOR / name)
    fmt, fs, n_leads, seconds = FILES[name]
    assert detect_format(path) == fmt
    record = read_record(path)
    assert record.fs == fs and record.signal.shape[0] == n_leads
    assert record.duration_s == pytest.approx(seconds, abs=1 / fs)
    assert sorted(record.channel_names) == sorted(TWELVE) and set(record.units) == {"mV"}
    lead_two = record.signal[record.channel_names.index("II")]
    assert np.isfinite(lead_two).all() and 0.3 < np.ptp(lead_two) < 10  # a QRS of a few mV, not counts or µV


@pytest.mark.data
def test_the_format_comes_from_the_content_not_the_name(tmp_path):
    for name, (fmt, *_) in FILES.items():
        renamed = tmp_path / f"{name.replace('/', '_')}.bin"
        shutil.copyfile(need(VENDOR / name), renamed)
        assert detect_format(renamed) == fmt
    (tmp_path / "notes.xml").write_text("<?xml version='1.0'?><notes>not an ECG</notes>")
    assert detect_format(tmp_path / "notes.xml") is None
    with pytest.raises(FileFormatError, match=r"notes\.xml \(read as unknown format\): content: not a recording"):
        read_record(tmp_path / "notes.xml")


@pytest.mark.data
def test_a_folder_of_mixed_formats_names_what_it_cannot_read(tmp_path):
    folder = tmp_path / "mixed"
    for name in FILES:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(need(VENDOR / name), target)
    demo = make_demo_record(0, duration_s=12.0, fs=500.0)
    write_wfdb(folder / "wfdb", "r1", demo.signal[:12].T.astype(np.float64), 500, list(TWELVE))
    (folder / "README.md").write_text("notes")  # passed over without a word
    (folder / "mystery.bin").write_bytes(b"\x00" * 64)  # named and left out
    muse = (VENDOR / "ge_muse/muse_ecg.xml").read_bytes()
    (folder / "broken_muse.xml").write_bytes(muse[: len(muse) // 2])  # a MUSE file cut in half
    with pytest.warns(UserWarning, match=r"1 file\(s\) left out:\n  .*mystery\.bin"):
        source = FileFolder(folder)
    assert len(source) == len(FILES) + 2
    assert "wfdb/r1" in source.record_ids and "ge_muse/muse_ecg" in source.record_ids
    assert source.record_files(source.record_ids.index("wfdb/r1"))[-1].name == "r1.dat"
    broken = source.record_ids.index("broken_muse")
    with pytest.raises(FileFormatError, match=r"broken_muse\.xml \(read as GE MUSE XML\): XML: not well-formed"):
        source[broken]
    record = source[source.record_ids.index("scp_ecg/ECGToolkit_Example")]
    assert record.record_id == "scp_ecg/ECGToolkit_Example" and record.metadata["file_patient_id"]
    window = source.read_window(source.record_ids.index("dicom_ecg/waveform_ecg"), 2.0, 5.0)
    assert window.signal.shape == (12, 5000)
    with pytest.raises(FileFormatError, match=r"mystery\.bin \(read as unknown format\)"):
        FileFolder(folder, strict=True)
    with warnings.catch_warnings(record=True):
        assert len(open_sources([f"files:{folder}"])) == len(source)


def test_a_single_file_and_an_empty_folder(tmp_path):
    demo = make_demo_record(1, fs=250.0)
    path = write_wfdb(tmp_path / "one", "rec", demo.signal[[1]].T.astype(np.float64), 250, ["II"])
    single = FileFolder(f"{path}.hea")
    assert single.record_ids == ["rec"] and single.duration_s(0) == 10.0
    assert read_record(path).channel_names == ["II"]  # a WFDB record by its name, without .hea
    assert FileFolder(tmp_path / "one", strict=True).record_ids == ["rec"]  # rec.dat is the record's, not unknown
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no recording found"):
        FileFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        FileFolder(tmp_path / "absent")
