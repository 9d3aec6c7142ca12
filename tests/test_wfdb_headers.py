"""WFDB headers whose fields break the syntax: wfdb.rdheader reads many of them silently as
something else (a non-numeric fs as its 250 Hz default, a non-numeric gain as 200 with the
units pushed into the signal name); the readers must refuse each one, naming the header
file and the field. Records are written here with wfdb.wrsamp (no shared data needed),
then their header text is corrupted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb

from csfm.data.readers import WfdbDirectory, read_multisegment, read_wfdb, record_files

pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")  # wfdb 4.3 on pandas 3: not ours


def _write(directory: Path, name: str = "r", fs: float = 360, seconds: float = 30,
           names: tuple[str, ...] = ("II", "V1")) -> Path:
    """A record of sines [seconds * fs, len(names)] in mV, format 16, gain 200; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(fs * seconds))) / fs
    signal = np.stack([np.sin(2 * np.pi * 1.2 * t + k) for k in range(len(names))], axis=1)
    n = len(names)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * n, sig_name=list(names), p_signal=signal, fmt=["16"] * n,
                adc_gain=[200] * n, baseline=[0] * n, write_dir=str(directory))
    return directory / name


def _set_field(path: Path, line: int, field: int, value: str | None) -> None:
    """Header edit: field ``field`` (0-based, split on white space) of line ``line`` becomes
    ``value``; None removes it and every field after it."""
    hea = Path(f"{path}.hea")
    lines = hea.read_text().splitlines()
    fields = lines[line].split()
    fields[field:] = [] if value is None else [value, *fields[field + 1:]]
    lines[line] = " ".join(fields)
    hea.write_text("\n".join(lines) + "\n")


def test_non_numeric_fs_is_refused_instead_of_read_as_250_hz(tmp_path):
    path = _write(tmp_path)
    record = read_wfdb(path)
    assert record.fs == 360 and record.signal.shape[1] / record.fs == 30.0
    _set_field(path, 0, 2, "abc")
    assert wfdb.rdheader(str(path)).fs == 250  # what wfdb makes of it: 10800 samples would read as 43.2 s
    with pytest.raises(ValueError, match=rf"{path}\.hea: record line 'r 2 abc 10800': field fs \(sampling "
                                         r"frequency\) must be > 0 Hz, written as a number"):
        read_wfdb(path)


@pytest.mark.parametrize("field, value, match", [
    (2, None, r"field fs \(sampling frequency\) is absent \(wfdb would assume 250 Hz\)"),
    (2, "2S0", r"field fs .* got '2S0'"),  # wfdb: 2 Hz
    (2, "360Hz", r"field fs .* got '360Hz'"),  # wfdb: 360 Hz, but sig_len lost
    (2, "3.6e2", r"field fs .* got '3.6e2'"),  # wfdb: 3.6 Hz
    (2, "nan", r"field fs .* got 'nan'"),
    (2, "-360", r"field fs .* got '-360'"),  # wfdb: 250 Hz with counter frequency -360
    (2, "360.5.1", r"field fs .* got '360.5.1'"),
    (1, "2x", r"field n_sig \(number of signals\) must be a whole number, got '2x'"),
    (1, "two", r"field n_sig .* got 'two'"),
    (1, "1", r"field n_sig is 1 but the header has 2 signal line\(s\)"),
    (1, "3", r"field n_sig is 3 but the header has 2 signal line\(s\)"),
    (3, "abc", r"field sig_len \(samples per signal\) must be a whole number, got 'abc'"),
    (3, "108.5", r"field sig_len .* got '108.5'"),
    (3, "1e4", r"field sig_len .* got '1e4'"),  # wfdb: 1 sample
    (0, "r/x", r"field record name \[/n_seg\] is 'r/x'"),
])
def test_bad_record_line_fields_are_named(tmp_path, field, value, match):
    path = _write(tmp_path)
    _set_field(path, 0, field, value)
    with pytest.raises(ValueError, match=rf"{path}\.hea: record line '.*': {match}"):
        read_wfdb(path)


@pytest.mark.parametrize("field, value, match", [
    (2, "abc(0)/mV", r"field adc_gain is 'abc', expected a number"),  # wfdb: gain 200, units 'abc'
    (2, "200x(0)/mV", r"field adc_gain is '200x'"),
    (2, "2E3(0)/mV", r"field adc_gain is '2E3', expected a number \(exponent: e\)"),  # wfdb: 2, units 'E3'
    (2, "nan/mV", r"field adc_gain is 'nan'"),
    (2, "(0)/mV", r"field adc_gain is ''"),
    (2, "200(abc)/mV", r"field baseline is 'abc', expected a whole number"),
    (2, "200(0.5)/mV", r"field baseline is '0.5'"),
    (2, "200(0)/", r"field units is ''"),
    (2, "200(0)/m&V", r"field units is 'm&V'"),
    (2, "200(0)mV", r"'200\(0\)mV' is not ADC_GAIN\[\(BASELINE\)\]\[/UNITS\]"),
    (3, "V", r"field adc_res is 'V', expected a whole number \(a description needs"),  # units 'm V'
    (4, "x0", r"field adc_zero is 'x0'"),
    (1, "16y", r"field fmt is '16y', expected FORMAT\[xSAMPLES_PER_FRAME\]"),
    (1, "999", r"field fmt 999 is not a signal format wfdb reads"),
])
def test_bad_signal_line_fields_are_named(tmp_path, field, value, match):
    path = _write(tmp_path)
    _set_field(path, 2, field, value)
    with pytest.raises(ValueError, match=rf"{path}\.hea: signal line 2 '.*': {match}"):
        read_wfdb(path)


@pytest.mark.parametrize("line, field, value", [
    (0, 2, "360/1000(0)"),  # counter frequency and base counter
    (0, 2, "360."),
    (0, 3, None),  # no sig_len: wfdb reads to the end of the signal file
    (1, 2, "200"),  # gain without baseline or units
    (1, 2, "2e+02(0)/mV"),
    (1, 2, "200/mV"),
    (1, 1, "16+0"),  # byte offset
])
def test_valid_variants_of_the_syntax_still_read(tmp_path, line, field, value):
    path = _write(tmp_path)
    expected = read_wfdb(path).signal
    _set_field(path, line, field, value)
    record = read_wfdb(path)
    assert record.fs == 360 and record.channel_names == ["II", "V1"]
    np.testing.assert_allclose(record.signal, expected, atol=1e-6)


def test_signal_without_description_is_named_as_wfdb_names_it_and_dropped(tmp_path):
    path = _write(tmp_path)
    _set_field(path, 2, 3, None)  # 'r.dat 16 200(0)/mV': no adc_res, ..., no description
    record = read_wfdb(path)
    assert record.channel_names == ["II"] and record.dropped_channels == ["record r, signal 1"]
    _set_field(path, 1, 3, None)
    with pytest.raises(ValueError, match=r"r\.hea: no usable ECG/PPG channel among \['record r, signal 0', "):
        read_wfdb(path)


def test_empty_header(tmp_path):
    (tmp_path / "e.hea").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"e\.hea: no record line \(empty header\)"):
        read_wfdb(tmp_path / "e")


def _multisegment(directory: Path) -> Path:
    """Master header m/2 over segments s1 (10 s) and s2 (10 s) at 250 Hz; its path."""
    for name in ("s1", "s2"):
        _write(directory, name, fs=250, seconds=10)
    (directory / "m.hea").write_text("m/2 2 250 5000\ns1 2500\ns2 2500\n")
    return directory / "m"


def test_multisegment_header_fields_are_checked(tmp_path):
    path = _multisegment(tmp_path)
    assert read_multisegment(path).signal.shape == (2, 5000)
    _set_field(tmp_path / "s2", 0, 2, "250Hz")
    with pytest.raises(ValueError, match=r"m\.hea: segment 's2' \(entry 1 of field seg_name\): .*s2\.hea: "
                                         r"record line .*: field fs .* got '250Hz'"):
        read_multisegment(path)
    (tmp_path / "m.hea").write_text("m/3 2 250 5000\ns1 2500\ns2 2500\n")
    with pytest.raises(ValueError, match=r"m\.hea: record line .*: field n_seg is 3 but the header has 2 segment"):
        read_multisegment(path)
    (tmp_path / "m.hea").write_text("m/2 2 250 5000\ns1 2500\ns2 25x0\n")
    with pytest.raises(ValueError, match=r"m\.hea: segment line 's2 25x0': expected NAME LENGTH"):
        read_multisegment(path)


def test_record_files_list_headers_and_signal_files(tmp_path):
    single = _write(tmp_path / "a", "r")
    assert record_files(single) == [tmp_path / "a" / "r.hea", tmp_path / "a" / "r.dat"]
    master = _multisegment(tmp_path / "b")
    (tmp_path / "b" / "s2.hea").unlink()
    (tmp_path / "b" / "m.hea").write_text("m/3 2 250 6250\ns1 2500\n~ 1250\ns2 2500\n")
    assert record_files(master) == [tmp_path / "b" / f for f in ("m.hea", "s1.hea", "s1.dat", "s2.hea")]
    directory = WfdbDirectory(tmp_path / "a")
    assert directory.record_files(0) == [tmp_path / "a" / "r.hea", tmp_path / "a" / "r.dat"]
