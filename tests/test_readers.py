"""Readers on the real shared recordings, on fixtures derived from them, and on broken inputs.

Expected fs, lengths and names come from wfdb.rdheader where possible; every test
needs ../shared/data (marked ``data``, skipped with the reason when it is absent).
"""
import os
import pickle

import numpy as np
import pytest
import torch
import wfdb
from fixtures import (CHUNKS_S, CINC2017, PHYSIONET, TWELVE, copy_record, need, ptb_chunk, write_code15,
                      write_mimic_iv, write_ptbxl, write_wfdb)

from csfm.data.readers import (PTBXL, Code15, MimicIVECG, WfdbDirectory, read_multisegment, read_wfdb,
                          stream_windows)
from csfm.data.record import CHANNEL_TYPE_NAMES

pytestmark = [pytest.mark.data,
              pytest.mark.filterwarnings("ignore:The inplace keyword")]  # wfdb 4.3 on pandas 3: not ours
T = {name: index for index, name in enumerate(CHANNEL_TYPE_NAMES)}
S25047 = PHYSIONET / "mimic3wdb" / "s25047" / "s25047-2704-05-04-10-44"
P000878 = PHYSIONET / "mimic3wdb" / "p000878" / "p000878-2137-10-26-16-57"
MIMIC_041S = PHYSIONET / "mimicdb" / "041s" / "041s"


# ---------------------------------------------------------------- single records
REAL = [  # record, kept names, their types, dropped names
    ("challenge2015/a103l", ["II", "V", "PLETH"], ["II", "V1", "PPG"], []),
    ("challenge2015/v102s", ["II", "V", "PLETH"], ["II", "V1", "PPG"], ["RESP"]),
    ("mimic2db/03700181", ["MCL1"], ["V1"], ["ABP", "RESP"]),
    ("multifreq/mixedsignals", ["II", "III", "V", "Pleth"], ["II", "III", "V1", "PPG"], ["ABP", "Resp"]),
    ("ptbdb/s0010_re", [n.lower() for n in TWELVE], list(TWELVE), ["vx", "vy", "vz"]),
    ("mitdb/100", ["MLII", "V5"], ["II", "V5"], []),
]


@pytest.mark.parametrize("name, kept, types, dropped", REAL, ids=[r[0] for r in REAL])
def test_real_record_reads_with_header_fs_length_and_names(name, kept, types, dropped):
    path = need(PHYSIONET / name)
    header = wfdb.rdheader(str(path))
    record = read_wfdb(path)
    spf = max(header.samps_per_frame[header.sig_name.index(n)] for n in kept)
    assert record.fs == pytest.approx(header.fs * spf)
    assert record.signal.shape == (len(kept), header.sig_len * spf)
    assert record.signal.dtype == np.float32
    assert record.channel_names == kept and record.channel_types == [T[t] for t in types]
    assert record.dropped_channels == dropped
    assert record.units == [header.units[header.sig_name.index(n)] for n in kept]
    assert record.modalities == ["PPG" if t == "PPG" else "ECG" for t in types]
    assert record.record_id == header.record_name
    reference = wfdb.rdrecord(str(path), smooth_frames=False, channels=[header.sig_name.index(kept[0])])
    np.testing.assert_allclose(record.signal[0], reference.e_p_signal[0], rtol=1e-6, atol=1e-6)


def test_mitdb_100_is_30_min_at_360_hz_with_mlii_as_ii():
    record = read_wfdb(need(PHYSIONET / "mitdb" / "100"))
    assert (record.fs, record.signal.shape[1]) == (360.0, 650000)
    assert record.channel_types == [T["II"], T["V5"]]
    assert (record.metadata["age"], record.metadata["sex"]) == (69.0, "M")
    assert record.metadata["comments"] == wfdb.rdheader(str(PHYSIONET / "mitdb" / "100")).comments


def test_ptb_header_comments_give_age_sex_and_reason_as_text():
    record = read_wfdb(need(PHYSIONET / "ptbdb" / "s0010_re"))
    assert record.metadata["age"] == 81.0 and record.metadata["sex"] == "F"
    assert record.text == "Myocardial infarction"
    assert record.metadata["additional diagnoses"] == "Diabetes mellitus"
    assert "pulmonary artery pressure (at rest) (mean)" not in record.metadata  # "n/a" left out


@pytest.mark.parametrize("name, alarm", [("a103l", "Asystole"), ("v102s", "Ventricular_Tachycardia")])
def test_challenge2015_alarm_labels(name, alarm):
    record = read_wfdb(need(PHYSIONET / "challenge2015" / name))
    assert record.metadata["alarm_type"] == alarm and record.metadata["true_alarm"] is False


def test_invalid_samples_are_nan_like_wfdb():
    path = need(PHYSIONET / "challenge2015" / "v102s")
    record = read_wfdb(path)
    reference = wfdb.rdrecord(str(path), channels=[0, 1, 2]).p_signal.T
    np.testing.assert_array_equal(np.isnan(record.signal), np.isnan(reference))
    assert np.isnan(record.signal).sum() == 3 + 2 + 17


def test_mimic2db_multifrequency_mcl1_at_four_samples_per_frame():
    path = need(PHYSIONET / "mimic2db" / "03700181")
    record = read_wfdb(path)
    raw = wfdb.rdrecord(str(path), smooth_frames=False, channels=[0]).e_p_signal[0]
    assert record.fs == 500.0 and record.channel_types == [T["V1"]]
    np.testing.assert_allclose(record.signal[0], raw, rtol=1e-6)
    assert "upsampled_channels" not in record.metadata  # ABP and RESP (1 sample/frame) are dropped


def test_multifreq_flac_record_upsamples_pleth_to_the_ecg_rate():
    path = need(PHYSIONET / "multifreq" / "mixedsignals")
    record = read_wfdb(path)
    raw = wfdb.rdrecord(str(path), smooth_frames=False).e_p_signal
    assert record.fs == pytest.approx(62.4725 * 4) and record.metadata["upsampled_channels"] == ["Pleth"]
    np.testing.assert_array_equal(record.signal[0], raw[0].astype(np.float32))  # II is read as it is
    pleth = record.signal[3]
    assert pleth.shape == (2 * raw[4].size,)
    assert np.nanmax(np.abs(pleth[::2] - raw[4])) < 0.01 * np.nanstd(raw[4])  # resample_poly keeps the samples
    np.testing.assert_array_equal(np.isnan(record.signal[:3]), np.isnan(np.stack(raw[:3])))


def test_upsampled_channel_keeps_its_invalid_samples_as_nan():
    path = need(PHYSIONET / "multifreq" / "mixedsignals")
    raw = wfdb.rdrecord(str(path), smooth_frames=False, channel_names=["ABP"]).e_p_signal[0]
    record = read_wfdb(path, mapping={"ABP": "PPG", "Pleth": None})  # ABP (2 samples/frame, 192 NaN) as a test
    abp = record.signal[record.channel_names.index("ABP")]
    np.testing.assert_array_equal(np.isnan(abp), np.repeat(np.isnan(raw), 2))
    assert np.isfinite(abp[~np.repeat(np.isnan(raw), 2)]).all()


def test_time_window_of_a_record_equals_the_slice_of_the_whole():
    path = need(PHYSIONET / "mitdb" / "100")
    whole = read_wfdb(path)
    part = read_wfdb(path, start_s=60.0, stop_s=70.0)
    np.testing.assert_array_equal(part.signal, whole.signal[:, 60 * 360:70 * 360])


def test_user_mapping_reaches_the_reader():
    record = read_wfdb(need(CINC2017 / "A00001"), mapping={"ECG": "I"})
    assert record.channel_types == [T["I"]] and record.signal.shape == (1, 9000)


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt, gain", [("16", 1000), ("80", 20), ("212", 200), ("24", 1000), ("32", 1000),
                                       ("508", 20), ("516", 1000)])
def test_formats_round_trip(tmp_path, fmt, gain):
    signal = ptb_chunk(0, 250)[:, :2]
    path = write_wfdb(tmp_path, f"f{fmt}", signal, 250, ["II", "V2"], fmt=fmt, gain=gain)
    record = read_wfdb(path)
    assert wfdb.rdheader(str(path)).fmt == [fmt, fmt]
    np.testing.assert_allclose(record.signal.T, signal, atol=0.51 / gain + 1e-6)


@pytest.mark.parametrize("path", [PHYSIONET / "challenge2015" / "a103l", CINC2017 / "A00001"])
def test_mat_signal_files_read(path):
    record = read_wfdb(need(path))
    assert record.signal.shape[1] == wfdb.rdheader(str(path)).sig_len


# ---------------------------------------------------------------- bad inputs
def _set_record_line(field_index, value):
    """Header edit: replace one field of the record line (0 name, 1 n_sig, 2 fs, 3 sig_len)."""
    def edit(text):
        lines = text.splitlines()
        fields = lines[0].split()
        fields[field_index] = value
        return "\n".join([" ".join(fields), *lines[1:]]) + "\n"
    return edit


def test_truncated_signal_file_names_file_and_field(tmp_path):
    path = copy_record(PHYSIONET / "challenge2015" / "v102s", tmp_path)
    os.truncate(tmp_path / "v102s.dat", 1000)
    with pytest.raises(ValueError, match=r"v102s\.hea: .*sig_len=75000.*v102s\.dat.*truncated") as info:
        read_wfdb(path)
    assert info.value.__cause__ is not None
    assert read_wfdb(path, stop_s=0.5).signal.shape == (3, 125)  # the part still present reads


def test_header_pointing_to_missing_signal_file(tmp_path):
    path = copy_record(PHYSIONET / "challenge2015" / "v102s", tmp_path)
    (tmp_path / "v102s.dat").unlink()
    with pytest.raises(ValueError, match=r"v102s\.hea: field file_name of channel 'II': signal file 'v102s\.dat'"):
        read_wfdb(path)


def test_missing_header(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.hea: header file not found"):
        read_wfdb(tmp_path / "nothing")


def test_zero_length_record(tmp_path):
    path = copy_record(PHYSIONET / "challenge2015" / "v102s", tmp_path, _set_record_line(3, "0"))
    with pytest.raises(ValueError, match=r"v102s\.hea: field sig_len is 0"):
        read_wfdb(path)


@pytest.mark.parametrize("fs", ["0", "-250"])
def test_non_positive_fs(tmp_path, fs):
    path = copy_record(PHYSIONET / "challenge2015" / "v102s", tmp_path, _set_record_line(2, fs))
    with pytest.raises(ValueError, match=r"v102s\.hea: (record line .*: )?field fs .*must be > 0"):
        read_wfdb(path)


def test_nan_only_channel_reads_and_is_flagged(tmp_path):
    signal = ptb_chunk(0, 250)[:, :2]
    signal[:, 1] = np.nan
    record = read_wfdb(write_wfdb(tmp_path, "flat", signal, 250, ["II", "PLETH"], units=["mV", "NU"]))
    assert record.channel_names == ["II", "PLETH"] and np.isnan(record.signal[1]).all()
    assert record.metadata["empty_channels"] == ["PLETH"]


def test_unknown_leads_only_names_file_and_channels(tmp_path):
    path = write_wfdb(tmp_path, "odd", ptb_chunk(0, 250)[:, :2], 250, ["ABP", "lead7"], units=["mmHg", "mV"])
    with pytest.raises(ValueError, match=r"odd\.hea: no usable ECG/PPG channel among \['ABP', 'lead7'\]"):
        read_wfdb(path)


def test_multisegment_header_is_refused_by_read_wfdb():
    with pytest.raises(ValueError, match=r"041s\.hea: multi-segment record \(field n_seg=2\)"):
        read_wfdb(need(MIMIC_041S))


# ---------------------------------------------------------------- multi-segment records
def _segment_samples(directory, name, channel, start=0, stop=None):
    record = wfdb.rdrecord(str(directory / name), sampfrom=start, sampto=stop, channel_names=[channel])
    return record.p_signal[:, 0].astype(np.float32)


def test_mimic_041s_two_segments_read_as_one_record():
    header = wfdb.rdheader(str(need(MIMIC_041S)))
    record = read_multisegment(MIMIC_041S)
    assert record.fs == 500.0 and record.signal.shape == (4, header.sig_len * 4)
    assert record.channel_names == ["III", "I", "V", "PLETH"] and record.dropped_channels == ["ABP", "PAP", "RESP"]
    expected = np.concatenate([wfdb.rdrecord(str(MIMIC_041S.parent / s), smooth_frames=False,
                                             channels=[0]).e_p_signal[0] for s in header.seg_name])
    np.testing.assert_allclose(record.signal[0], expected, rtol=1e-6)


def test_s25047_whole_record_has_gaps_as_nan():
    header = wfdb.rdheader(str(need(S25047)))
    record = read_multisegment(S25047)
    assert record.signal.shape == (2, header.sig_len) and record.fs == header.fs
    assert record.channel_types == [T["II"], T["V1"]] and record.dropped_channels == ["ABP"]
    assert np.isnan(record.signal[:, :header.seg_len[1]]).all()  # leading "~" gap
    assert record.metadata["comments"] == header.comments


def test_s25047_window_across_segment_boundary_is_continuous():
    header = wfdb.rdheader(str(need(S25047)))
    starts = np.cumsum([0, *header.seg_len])
    boundary = int(starts[3])  # end of 3234460_0001, start of 3234460_0002
    width = 1250
    windows = dict(stream_windows(S25047, window_s=width / header.fs))
    start = boundary // width * width
    record = windows[start / header.fs]
    directory = S25047.parent
    expected = np.concatenate([_segment_samples(directory, "3234460_0001", "II", start - int(starts[2])),
                               _segment_samples(directory, "3234460_0002", "II"),
                               _segment_samples(directory, "3234460_0003", "II", 0,
                                                start + width - int(starts[4]))])
    np.testing.assert_allclose(record.signal[0], expected, rtol=1e-6)
    assert record.metadata["segments"] == ["3234460_0001", "3234460_0002", "3234460_0003"]


def test_s25047_stream_skips_gaps_and_yields_full_windows():
    header = wfdb.rdheader(str(need(S25047)))
    windows = list(stream_windows(S25047, window_s=10.0))
    assert windows[0][0] == 210.0  # the first 205.9 s are a gap; 200-210 s is only 41 % recorded
    assert all(r.signal.shape == (2, 1250) and r.record_id == header.record_name for _, r in windows)
    assert len(windows) <= header.sig_len // 1250
    assert all(r.metadata["valid_fraction"] >= 0.5 for _, r in windows)


def test_p000878_channel_set_changes_inside_a_window():
    windows = {}
    with pytest.raises(ValueError, match=r"3269321_0003"):
        for start_s, record in stream_windows(need(P000878), window_s=10.0):
            windows[start_s] = record
    straddling = windows[40.0]  # 3269321_0001 (PLETH only) then 3269321_0002 (II, PLETH)
    assert straddling.channel_names == ["PLETH", "II"]
    boundary = 3750 + 2000 - 5000
    assert np.isnan(straddling.signal[1, :boundary]).all() and np.isfinite(straddling.signal[1, boundary:]).any()
    assert windows[30.0].channel_names == ["PLETH"]


def test_p000878_missing_segment_fails_naming_the_file():
    need(P000878)
    starts = []
    with pytest.raises(ValueError, match=r"3269321_0003\.hea: header file not found"):
        for start_s, _ in stream_windows(P000878, window_s=10.0):
            starts.append(start_s)
    assert starts == [30.0, 40.0, 50.0]  # segments 1-2 read; the 4.9-day record is never loaded whole
    assert read_multisegment(P000878, stop_s=60.0).signal.shape == (2, 7500)
    with pytest.raises(ValueError, match=r"3269321_0003"):
        read_multisegment(P000878, stop_s=70.0)


# ---------------------------------------------------------------- directory datasets
def test_cinc2017_directory_with_reference_labels():
    dataset = WfdbDirectory(need(CINC2017), labels_csv="REFERENCE.csv")
    assert len(dataset) == 1500 and dataset.record_ids[0] == "A00001"
    assert dataset.record_files(0) == [CINC2017 / "A00001.hea", CINC2017 / "A00001.mat", CINC2017 / "REFERENCE.csv"]
    first = dataset[0]
    assert first.metadata["label"] == "N" and first.fs == 300.0 and first.signal.shape == (1, 9000)
    assert first.channel_types == [T["II"]] and first.record_id == "A00001"
    labels = dict(line.split(",") for line in (CINC2017 / "REFERENCE.csv").read_text().split())
    assert dataset[1499].metadata["label"] == labels[dataset.record_ids[1499]]


def test_wfdb_directory_reads_multisegment_records_by_pattern():
    dataset = WfdbDirectory(need(PHYSIONET), pattern="mimicdb/041s/041s.hea")
    assert dataset.record_ids == ["mimicdb/041s/041s"]
    assert dataset[0].signal.shape == (4, 8000) and dataset.duration_s(0) == 16.0
    folder = PHYSIONET / "mimicdb" / "041s"
    assert dataset.record_files(0) == [folder / name for name in ("041s.hea", "041s01.hea", "041s01.dat",
                                                                  "041s02.hea", "041s02.dat")]


def test_ptbxl_fixture(tmp_path):
    root = write_ptbxl(tmp_path)
    for sampling, fs in (("lr", 100), ("hr", 500)):
        dataset = PTBXL(root, sampling=sampling)
        assert len(dataset) == 3 and dataset.patient_ids == ["15709", "15709", "13243"]
        record = dataset[1]
        assert record.fs == fs and record.signal.shape == (12, 10 * fs)
        assert record.channel_types == list(range(12)) and record.channel_names[3] == "AVR"
        np.testing.assert_allclose(record.signal.T, ptb_chunk(CHUNKS_S[1], fs), atol=0.51e-3 + 1e-6)
        assert record.text.startswith("fixture report 2") and record.record_id == "2"
        assert record.metadata["scp_codes"] == {"IMI": 100.0, "SR": 0.0}
        assert record.metadata["sex"] == "F" and record.metadata["strat_fold"] == 2


def test_ptbxl_bad_sampling_and_missing_table(tmp_path):
    with pytest.raises(ValueError, match="sampling"):
        PTBXL(tmp_path, sampling="mid")
    with pytest.raises(ValueError, match=r"ptbxl_database\.csv: file not found"):
        PTBXL(tmp_path)


@pytest.mark.parametrize("with_record_list", [True, False])
def test_mimic_iv_ecg_fixture(tmp_path, with_record_list):
    dataset = MimicIVECG(write_mimic_iv(tmp_path, with_record_list))
    assert dataset.record_ids == ["40689238", "44458630", "45090959"]
    assert dataset.patient_ids == ["10000032", "10000032", "10000117"]
    record = dataset[0]
    assert record.fs == 500.0 and record.signal.shape == (12, 5000)
    assert record.channel_types == [T[n] for n in ("I", "II", "III", "aVR", "aVF", "aVL")] + list(range(6, 12))
    assert record.text == "Sinus rhythm, Inferior infarct - age undetermined, Fixture study 40689238"
    assert record.metadata["rr_interval"] == 659 and record.patient_id == "10000032"
    study = tmp_path / "files" / "p1000" / "p10000032" / "s40689238"
    assert dataset.record_files(0) == [study / "40689238.hea", study / "40689238.dat",
                                       tmp_path / "machine_measurements.csv"]


def test_code15_fixture_padding_becomes_nan(tmp_path):
    dataset = Code15(write_code15(tmp_path))
    assert len(dataset) == 3 and dataset.record_ids == ["1001", "1002", "1003"]
    assert dataset.patient_ids == ["501", "501", "502"]
    ten, seven = dataset[0], dataset[1]
    assert ten.fs == 400.0 and ten.signal.shape == (12, 4096)
    assert ten.channel_names[:3] == ["DI", "DII", "DIII"] and ten.channel_types == list(range(12))
    assert np.isnan(ten.signal[:, :48]).all() and np.isnan(ten.signal[:, -48:]).all()
    np.testing.assert_allclose(ten.signal[:, 48:-48].T, ptb_chunk(0, 400), atol=1e-5)
    assert np.isnan(seven.signal[:, :648]).all() and np.isfinite(seven.signal[:, 648:-648]).all()
    assert seven.metadata["sex"] == "F" and seven.metadata["RBBB"] is True and seven.metadata["death"] is True
    assert dataset.read_window(0, 1.0, 2.0).signal.shape == (12, 800)
    assert dataset.record_files(1) == [tmp_path / "exams_part0.hdf5", tmp_path / "exams.csv"]


def test_code15_is_fork_and_pickle_safe(tmp_path):
    dataset = Code15(write_code15(tmp_path))
    parent = dataset[2].signal  # opens a handle in this process before the workers fork
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[2].signal, parent)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list)
    records = [record for batch in loader for record in batch]
    assert len(records) == len(dataset)
    np.testing.assert_array_equal(records[2].signal, parent)


