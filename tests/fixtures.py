"""Small fixture corpora written into a test's tmp_path from the real shared recordings.

MIMIC-IV-ECG, PTB-XL and CODE-15 are not on this machine, so these helpers write
fixtures in exactly their on-disk layouts. The signals are REAL: 10 s chunks of the
12 standard leads of PTB Diagnostic ECG Database record s0010_re (1000 Hz),
resampled with scipy.signal.resample_poly to 500 Hz / 100 Hz / 400 Hz and re-saved
with wfdb.wrsamp or h5py. Ids, reports and labels in the tables are invented for
the fixtures and say so. Nothing here is written into the repository.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import wfdb
from scipy.signal import resample_poly

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHYSIONET = SHARED / "physionet"
CINC2017 = SHARED / "cinc2017"
PTB_RECORD = PHYSIONET / "ptbdb" / "s0010_re"
PTB_FS = 1000
TWELVE = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_IV_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")  # MIMIC-IV-ECG's order
CHUNKS_S = (0, 10, 20)  # three 10 s chunks of s0010_re (38.4 s long)


def need(path: Path) -> Path:
    """``path`` if the shared data has it, else skip the test with the reason."""
    if not path.exists() and not Path(f"{path}.hea").exists():
        pytest.skip(f"shared recording {path} not present (tests read ../shared/data)")
    return path


def ptb_chunk(start_s: int, fs: int, order: tuple[str, ...] = TWELVE) -> np.ndarray:
    """10 s of s0010_re's 12 leads from start_s, resampled to fs Hz: [10 * fs, 12] float64 mV."""
    record = wfdb.rdrecord(str(need(PTB_RECORD)), sampfrom=start_s * PTB_FS, sampto=(start_s + 10) * PTB_FS,
                           channels=list(range(12)))
    by_name = dict(zip([name.lower() for name in record.sig_name], record.p_signal.T))
    gcd = np.gcd(fs, PTB_FS)
    return np.stack([resample_poly(by_name[name.lower()], fs // gcd, PTB_FS // gcd) for name in order], axis=1)


def write_wfdb(directory: Path, name: str, signal: np.ndarray, fs: float, names: list[str],
               units: list[str] | None = None, fmt: str = "16", gain: float = 200.0,
               comments: list[str] | None = None) -> Path:
    """wfdb.wrsamp ``signal`` [T, C] (physical, NaN allowed) as record ``directory/name``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    channels = signal.shape[1]
    wfdb.wrsamp(name, fs=fs, units=units or ["mV"] * channels, sig_name=list(names), p_signal=signal,
                fmt=[fmt] * channels, adc_gain=[gain] * channels, baseline=[0] * channels,
                comments=comments, write_dir=str(directory))
    return directory / name


def copy_record(source: Path, directory: Path, edit_header: Callable[[str], str] | None = None) -> Path:
    """Copy a shared record (path without ``.hea``) to directory, optionally editing the header text."""
    header = need(source).parent / f"{source.name}.hea"
    directory.mkdir(parents=True, exist_ok=True)
    text = header.read_text()
    for line in text.splitlines()[1:]:
        if line and not line.startswith("#"):
            signal_file = source.parent / line.split()[0]
            if signal_file.is_file() and not (directory / signal_file.name).exists():
                shutil.copyfile(signal_file, directory / signal_file.name)
    (directory / header.name).write_text(edit_header(text) if edit_header else text)
    return directory / header.stem


def write_ptbxl(root: Path) -> Path:
    """PTB-XL layout: records100/00000/0000N_lr, records500/00000/0000N_hr + ptbxl_database.csv.

    Three records (ecg_id 1..3 = s0010_re chunks at 0, 10, 20 s); ecg 1 and 2 share
    patient 15709. Reports, SCP codes and folds are fixture values.
    """
    rows = []
    for ecg_id, start in enumerate(CHUNKS_S, start=1):
        for sampling, fs in (("lr", 100), ("hr", 500)):
            folder = f"records{fs}/00000"
            write_wfdb(root / folder, f"{ecg_id:05d}_{sampling}", ptb_chunk(start, fs), fs,
                       [name.upper() for name in TWELVE], gain=1000.0)
        rows.append({"ecg_id": ecg_id, "patient_id": 15709.0 if ecg_id < 3 else 13243.0,
                     "age": 81.0, "sex": 1, "report": f"fixture report {ecg_id}: sinus rhythm, inferolateral mi",
                     "scp_codes": "{'IMI': 100.0, 'SR': 0.0}", "strat_fold": ecg_id,
                     "filename_lr": f"records100/00000/{ecg_id:05d}_lr",
                     "filename_hr": f"records500/00000/{ecg_id:05d}_hr"})
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    return root


def write_mimic_iv(root: Path, with_record_list: bool = True) -> Path:
    """MIMIC-IV-ECG layout: files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN + machine_measurements.csv.

    Three studies at 500 Hz in MIMIC-IV's lead order (aVF before aVL); subject
    10000032 has two. Reports are fixture text with empty fields, as in the real table.
    """
    studies = [(10000032, 40689238), (10000032, 44458630), (10000117, 45090959)]
    listing, measurements = [], []
    for (subject, study), start in zip(studies, CHUNKS_S):
        relative = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        write_wfdb(root / Path(relative).parent, str(study), ptb_chunk(start, 500, MIMIC_IV_ORDER), 500,
                   list(MIMIC_IV_ORDER))
        listing.append({"subject_id": subject, "study_id": study, "file_name": study,
                        "ecg_time": "2180-07-23 08:44:00", "path": relative})
        reports = {f"report_{k}": "" for k in range(18)}
        reports.update({"report_0": "Sinus rhythm", "report_2": "Inferior infarct - age undetermined",
                        "report_3": f"Fixture study {study}"})
        measurements.append({"subject_id": subject, "study_id": study, "cart_id": 6848296, **reports,
                             "rr_interval": 659, "qrs_axis": 81})
    if with_record_list:
        pd.DataFrame(listing).to_csv(root / "record_list.csv", index=False)
    pd.DataFrame(measurements).to_csv(root / "machine_measurements.csv", index=False)
    return root


def write_code15(root: Path) -> Path:
    """CODE-15 layout: exams_part0.hdf5 (tracings [4, 4096, 12] float32 mV at 400 Hz, exam_id [4]) + exams.csv.

    Exams 1001 and 1003 are 10 s (4000 samples, 48 zeros of padding each side), exam
    1002 is 7 s (2800 samples, 648 zeros each side); the last row is all zeros with
    exam_id 0, as in the real parts. Labels and outcomes are fixture values.
    """
    root.mkdir(parents=True, exist_ok=True)
    tracings = np.zeros((4, 4096, 12), dtype=np.float32)
    for row, (start, seconds) in enumerate(zip(CHUNKS_S, (10, 7, 10))):
        chunk = ptb_chunk(start, 400)[: seconds * 400]
        pad = (4096 - len(chunk)) // 2
        tracings[row, pad:pad + len(chunk)] = chunk
    with h5py.File(root / "exams_part0.hdf5", "w") as f:
        f.create_dataset("tracings", data=tracings)
        f.create_dataset("exam_id", data=np.array([1001, 1002, 1003, 0], dtype=np.int64))
    exams = pd.DataFrame({"exam_id": [1001, 1002, 1003], "age": [81, 81, 62], "is_male": [False, False, True],
                          "nn_predicted_age": [79.5, 80.1, 60.0], "1dAVb": [False] * 3, "RBBB": [False, True, False],
                          "LBBB": [False] * 3, "SB": [False] * 3, "ST": [False] * 3, "AF": [False] * 3,
                          "patient_id": [501, 501, 502], "death": [True, True, False], "timey": [0.8, 0.8, 3.2],
                          "normal_ecg": [False, False, True],
                          "trace_file": ["exams_part0.hdf5"] * 3})
    exams.to_csv(root / "exams.csv", index=False)
    return root
