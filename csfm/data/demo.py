"""Synthetic ECG + PPG records with known labels: the built-in demo data of ``python -m csfm.train``.

Records are generated on demand, never stored. Record ``index`` of ``seed`` comes from
``numpy.random.default_rng([seed, index])`` (plus a per-patient stream shared by the
records of one patient), so the same (seed, index) always gives the same record.

How a record is made (all times in seconds, amplitudes in mV unless stated):

1. Beats: R-peak times from an RR series. Sinus-type rhythms get heart-rate variability
   (respiratory sinus arrhythmia at the breathing frequency plus a 0.04-0.15 Hz LF
   component); atrial fibrillation gets independent, irregular RR intervals.
2. Heart: a 3-D cardiac dipole (X leftward, Y footward, Z anterior) built the way ECGSYN
   (McSharry et al. 2003) builds its trajectory: every beat adds P, Q, R, S and T Gaussian
   bumps at fixed offsets from its R peak; here each wave has its own 3-D direction, so
   the QRS vector loop turns as the beat goes on. The T offset scales with sqrt(RR) (QT
   follows Bazett). AF beats have no P wave; fibrillatory f-waves (4-9 Hz) run instead.
3. Leads: the dipole is projected onto the 8 independent leads (I, II, V1..V6), noise is
   added there (as it would be at the electrodes), and III, aVR, aVL, aVF are derived from
   I and II, so Einthoven's and Goldberger's identities hold exactly.
4. Noise: baseline wander (breathing + slow drift), 50/60 Hz powerline, white noise.
5. PPG: per beat a systolic wave peaking one pulse arrival time (150-300 ms) after the
   R peak and a smaller diastolic wave after it (the dicrotic notch is the dip between).

Labels in ``Record.metadata``: ``rhythm`` (one of RHYTHMS), ``heart_rate`` (bpm, from the
R peaks inside the record), ``age`` (years), ``sex`` ("M"/"F"), ``qrs_axis`` (degrees),
``pulse_arrival_s`` (seconds) and ``patient_id``; ``Record.text`` is a short report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csfm.data.record import CHANNEL_TYPE_NAMES, PPG_TYPE, Record

RHYTHMS = ("sinus", "af", "brady", "tachy")
RECORDS_PER_PATIENT = 3  # record i belongs to patient i // RECORDS_PER_PATIENT

_RHYTHM_PROBS = (0.4, 0.2, 0.2, 0.2)
# Target heart rates (bpm) per rhythm, kept away from the 60 / 100 bpm class borders
# so heart-rate variability cannot carry the measured rate across them.
_RATE_RANGES = {"sinus": (64.0, 96.0), "brady": (40.0, 55.0), "tachy": (106.0, 150.0), "af": (70.0, 140.0)}
_MIN_RR_S = 0.28  # shortest RR interval (s) any rhythm makes: the AF refractory limit
_PATIENT_STREAM = 7919  # third seed word of the per-patient random stream

# Waves of one beat, in order P, Q, R, S, T: offset from the R peak (s, T at RR = 1 s),
# Gaussian width (s) and dipole direction and size (X, Y, Z in mV).
_WAVE_NAMES = ("P", "Q", "R", "S", "T")
_WAVE_OFFSET_S = np.array([-0.165, -0.028, 0.0, 0.028, 0.30])
_WAVE_WIDTH_S = np.array([0.024, 0.010, 0.011, 0.011, 0.055])
_WAVE_VECTOR_MV = np.array([
    [0.08, 0.11, 0.03],     # P: leftward, inferior
    [-0.07, -0.03, 0.12],   # Q: septal, rightward and anterior
    [0.70, 0.65, -0.05],    # R: main ventricular force, left-inferior
    [-0.12, -0.18, -0.30],  # S: terminal, posterior and superior
    [0.20, 0.18, 0.12],     # T: concordant with R
])
_N_WAVES = len(_WAVE_NAMES)
_F_WAVE_DIRECTION = np.array([[-0.3], [0.5], [0.8]])  # [3, 1] atrial activity: rightward, inferior, anterior
_P, _T = 0, 4
_QRS = slice(1, 4)

# Directions of the independent leads on the dipole axes: I, II in the frontal plane
# (0 and 60 degrees), V1..V6 in the horizontal plane (angle from leftward toward
# anterior) with gains for their closeness to the heart.
_PRECORDIAL_DEG = np.array([120.0, 90.0, 75.0, 60.0, 30.0, 0.0])
_PRECORDIAL_GAIN = np.array([1.4, 2.2, 2.6, 2.6, 2.1, 1.5])
_LEAD_DIRECTIONS = np.vstack([
    [1.0, 0.0, 0.0],
    [0.5, np.sqrt(3.0) / 2.0, 0.0],
    np.column_stack([np.cos(np.radians(_PRECORDIAL_DEG)), np.zeros(6), np.sin(np.radians(_PRECORDIAL_DEG))])
    * _PRECORDIAL_GAIN[:, None],
])  # [8, 3]: I, II, V1..V6
# The 12 leads from the 8 independent ones: III = II - I, aVR = -(I + II) / 2,
# aVL = I - II / 2, aVF = II - I / 2; V1..V6 pass through.
_LEAD_MIX = np.zeros((12, 8))
_LEAD_MIX[:6, :2] = [[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [-0.5, -0.5], [1.0, -0.5], [-0.5, 1.0]]
_LEAD_MIX[6:, 2:] = np.eye(6)

_CHANNEL_NAMES = list(CHANNEL_TYPE_NAMES)
_UNITS = ["mV"] * 12 + ["NU"]
_MODALITIES = ["ECG"] * 12 + ["PPG"]


@dataclass(frozen=True)
class _Patient:
    """What stays the same across one patient's records."""

    age: int
    sex: str
    wave_vectors: np.ndarray  # [5, 3] mV, rows P, Q, R, S, T
    wave_widths: np.ndarray  # [5] s
    pr_scale: float  # stretches the P offset (PR interval)
    pulse_arrival_s: float  # R peak to PPG systolic peak
    diastolic_ratio: float  # diastolic / systolic PPG wave height


@dataclass(frozen=True)
class _Breathing:
    """One record's breathing: frequency (Hz) and phase (radians)."""

    freq_hz: float
    phase: float

    def at(self, t: np.ndarray) -> np.ndarray:
        """sin of the breathing phase at times t (s), same shape as t."""
        return np.sin(2.0 * np.pi * self.freq_hz * t + self.phase)


def make_demo_record(index: int, seed: int = 0, duration_s: float = 10.0, fs: float = 500.0) -> Record:
    """One synthetic 12-lead ECG + PPG record, deterministic in (seed, index).

    Returns a Record with signal [13, round(duration_s * fs)] float32 sampled at ``fs`` Hz:
    channels I..V6 in mV (channel types 0..11) then PPG in normalised units (type 12).
    """
    _check_args(index, duration_s, fs)
    rng = np.random.default_rng([seed, index])
    patient_index = index // RECORDS_PER_PATIENT
    patient = _patient(np.random.default_rng([seed, patient_index, _PATIENT_STREAM]))
    breathing = _Breathing(rng.uniform(0.15, 0.35), rng.uniform(0.0, 2.0 * np.pi))
    planned = str(rng.choice(RHYTHMS, p=_RHYTHM_PROBS))
    beats = _beat_times(rng, planned, duration_s, breathing)
    heart_rate = _measured_rate(beats, duration_s)
    rhythm = "af" if planned == "af" else _rate_class(heart_rate)
    vectors = patient.wave_vectors * rng.lognormal(0.0, 0.05, size=(_N_WAVES, 1))
    t = np.arange(int(round(duration_s * fs))) / fs
    dipole = _dipole(rng, vectors, patient, beats, rhythm == "af", breathing, t, fs)
    leads = _LEAD_MIX @ (_LEAD_DIRECTIONS @ dipole + _interference(rng, breathing, t, fs))
    pulse_arrival_s = patient.pulse_arrival_s + rng.normal(0.0, 0.01)
    ppg = _ppg(rng, patient, pulse_arrival_s, beats, breathing, t, fs)
    axis = _qrs_axis_deg(vectors, patient.wave_widths)
    patient_id = _patient_id(index)
    metadata: dict[str, Any] = {
        "rhythm": rhythm, "heart_rate": heart_rate, "age": patient.age, "sex": patient.sex,
        "qrs_axis": axis, "pulse_arrival_s": pulse_arrival_s, "patient_id": patient_id,
    }
    return Record(
        signal=np.vstack([leads, ppg[None]]).astype(np.float32), fs=float(fs),
        channel_names=list(_CHANNEL_NAMES), units=list(_UNITS), channel_types=list(range(PPG_TYPE + 1)),
        modalities=list(_MODALITIES), text=_report(rng, rhythm, heart_rate, axis),
        patient_id=patient_id, record_id=demo_record_id(index), metadata=metadata,
    )


def make_demo_records(n: int, seed: int = 0, **kw: float) -> list[Record]:
    """Records 0..n-1 of ``seed``; ``kw`` (duration_s, fs) goes to make_demo_record."""
    return [make_demo_record(i, seed, **kw) for i in range(n)]


class DemoDataset:
    """Lazy sequence of ``n`` demo records: item i is make_demo_record(i, seed, **kw), built on access.

    Holds no signals, so it streams demo sets of any size (e.g. to a torch DataLoader).
    """

    def __init__(self, n: int, seed: int = 0, **kw: float) -> None:
        if n < 0:
            raise ValueError(f"DemoDataset: n must be >= 0 records, got {n}")
        make_demo_record(0, seed, **kw)  # fail here, not in a worker, on bad duration_s / fs
        self.n, self.seed, self.kw = int(n), seed, kw

    def __len__(self) -> int:
        return self.n

    @property
    def record_ids(self) -> list[str]:
        return [demo_record_id(i) for i in range(self.n)]

    def record_files(self, i: int) -> list[Path]:
        """No file: a demo record is generated from its seed and index."""
        return []

    @property
    def patient_ids(self) -> list[str]:
        """Patient of every record, without generating any (for subject-wise splits)."""
        return [_patient_id(i) for i in range(self.n)]

    def __getitem__(self, i: int) -> Record:
        if not -self.n <= i < self.n:
            raise IndexError(f"DemoDataset: index {i} out of range for {self.n} records")
        return make_demo_record(i % self.n, self.seed, **self.kw)


def demo_record_id(index: int) -> str:
    """The record id of demo record ``index``."""
    return f"demo{index:06d}"


def _patient_id(index: int) -> str:
    return f"demo_p{index // RECORDS_PER_PATIENT:05d}"


def _check_args(index: int, duration_s: float, fs: float) -> None:
    """ValueError naming the argument when a record cannot be made from these."""
    if index < 0:
        raise ValueError(f"demo record index must be >= 0, got {index}")
    if not (np.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number of seconds, got {duration_s}")
    if not (np.isfinite(fs) and fs >= 50):
        raise ValueError(f"fs must be at least 50 Hz to hold a QRS complex, got {fs}")
    if round(duration_s * fs) < 1:
        raise ValueError(f"duration_s x fs must give at least one sample, got {duration_s} s at {fs} Hz")


def _patient(rng: np.random.Generator) -> _Patient:
    """A patient's demographics and heart: the mean electrical axis turned by up to 30 degrees
    in the frontal plane and 20 in the horizontal plane (it stays a normal axis), every wave
    scaled by its own random factor."""
    frontal, horizontal = np.radians(rng.uniform(-30.0, 30.0)), np.radians(rng.uniform(-20.0, 20.0))
    vectors = _WAVE_VECTOR_MV @ (_rotation(frontal, (0, 1)) @ _rotation(horizontal, (0, 2))).T
    return _Patient(
        age=int(np.clip(rng.normal(58.0, 16.0), 18, 95)),
        sex=str(rng.choice(["M", "F"])),
        wave_vectors=vectors * rng.lognormal(0.0, 0.15, size=(_N_WAVES, 1)),
        wave_widths=_WAVE_WIDTH_S * rng.lognormal(0.0, 0.08, size=_N_WAVES),
        pr_scale=rng.uniform(0.85, 1.2),
        pulse_arrival_s=rng.uniform(0.17, 0.28),
        diastolic_ratio=rng.uniform(0.3, 0.5),
    )


def _rotation(angle: float, axes: tuple[int, int]) -> np.ndarray:
    """[3, 3] rotation by ``angle`` radians turning axis axes[0] toward axes[1]."""
    r = np.eye(3)
    (a, b), c, s = axes, np.cos(angle), np.sin(angle)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _beat_times(rng: np.random.Generator, rhythm: str, duration_s: float, breathing: _Breathing) -> np.ndarray:
    """R-peak times [K] (s), starting over a second before 0 and ending past ``duration_s``,
    so every wave that reaches into the record is generated."""
    rr0 = 60.0 / rng.uniform(*_RATE_RANGES[rhythm])
    start = -1.2 - rng.uniform(0.0, rr0)
    n = int(np.ceil((duration_s - start + 1.0) / _MIN_RR_S)) + 2
    rr = _af_rr(rng, rr0, n) if rhythm == "af" else _sinus_rr(rng, rr0, n, start, breathing)
    beats = start + np.concatenate([[0.0], np.cumsum(rr)])
    return beats[: int(np.searchsorted(beats, duration_s + 1.0)) + 1]


def _sinus_rr(rng: np.random.Generator, rr0: float, n: int, start: float, breathing: _Breathing) -> np.ndarray:
    """[n] RR intervals (s) around rr0 with respiratory sinus arrhythmia (up to 4 %, less at
    high rates), a 0.04-0.15 Hz LF wave (up to 2.5 %) and 0.5 % beat-to-beat jitter."""
    t = start + rr0 * np.arange(n)
    rsa = rng.uniform(0.01, 0.04) * min(1.0, rr0) * breathing.at(t)
    lf = rng.uniform(0.005, 0.025) * np.sin(2.0 * np.pi * rng.uniform(0.04, 0.15) * t + rng.uniform(0, 2 * np.pi))
    return rr0 * (1.0 + rsa + lf + 0.005 * rng.standard_normal(n))


def _af_rr(rng: np.random.Generator, rr0: float, n: int) -> np.ndarray:
    """[n] irregularly irregular RR intervals (s): independent log-normal around rr0 with a
    coefficient of variation of 15-30 %, none shorter than the 0.28 s refractory period."""
    sigma = rng.uniform(0.15, 0.3)
    return np.maximum(rr0 * rng.lognormal(-0.5 * sigma**2, sigma, size=n), _MIN_RR_S)


def _measured_rate(beats: np.ndarray, duration_s: float) -> float:
    """Heart rate (bpm) from the RR intervals between R peaks inside [0, duration_s); from
    the intervals around the record when it holds fewer than two R peaks."""
    inside = beats[(beats >= 0.0) & (beats < duration_s)]
    rr = np.diff(inside) if inside.size >= 2 else np.diff(beats)
    return float(60.0 / rr.mean())


def _rate_class(heart_rate: float) -> str:
    """Sinus rhythm class of a rate in bpm: brady below 60, tachy above 100."""
    return "brady" if heart_rate < 60.0 else "tachy" if heart_rate > 100.0 else "sinus"


def _gaussian_train(centers_s: np.ndarray, heights: np.ndarray, widths_s: np.ndarray, fs: float,
                    n: int) -> np.ndarray:
    """Sum of Gaussian bumps sampled at fs Hz: [n] = sum_k heights[k] exp(-(t - centers_s[k])^2 /
    (2 widths_s[k]^2)) over t = arange(n) / fs; each bump is evaluated only within 4 widths."""
    centers_s, heights, widths_s = np.broadcast_arrays(centers_s, heights, widths_s)
    half = int(np.ceil(4.0 * widths_s.max() * fs))
    idx = np.floor(centers_s * fs).astype(np.int64)[:, None] + np.arange(-half, half + 2)  # [K, W]
    bumps = heights[:, None] * np.exp(-0.5 * ((idx / fs - centers_s[:, None]) / widths_s[:, None]) ** 2)
    inside = (idx >= 0) & (idx < n)
    return np.bincount(idx[inside], weights=bumps[inside], minlength=n)


def _dipole(rng: np.random.Generator, vectors: np.ndarray, patient: _Patient, beats: np.ndarray, af: bool,
            breathing: _Breathing, t: np.ndarray, fs: float) -> np.ndarray:
    """Cardiac dipole [3, len(t)] (mV): P, Q, R, S, T bumps of every beat along their wave
    vectors, QRS and T heights swaying 5 % with breathing; AF swaps P waves for f-waves."""
    rr = np.diff(beats, append=beats[-1] + np.diff(beats)[-1])  # [K] interval after each beat
    sway = 1.0 + 0.05 * breathing.at(beats)
    offsets = np.tile(_WAVE_OFFSET_S, (beats.size, 1))  # [K, 5]
    offsets[:, _P] *= patient.pr_scale
    offsets[:, _T] *= np.sqrt(np.clip(rr, 0.3, 1.5))
    waves = [w for w in range(_N_WAVES) if not (af and w == _P)]
    trains = np.stack([_gaussian_train(beats + offsets[:, w], sway if w != _P else 1.0, patient.wave_widths[w],
                                       fs, t.size) for w in waves])  # [W, T]
    dipole = vectors[waves].T @ trains
    if af:
        dipole += _F_WAVE_DIRECTION * _f_waves(rng, t, fs)
    return dipole


def _f_waves(rng: np.random.Generator, t: np.ndarray, fs: float) -> np.ndarray:
    """Atrial fibrillatory waves [len(t)] (mV, 0.02-0.06) at times t (s) sampled at fs Hz:
    a 4-9 Hz oscillation whose frequency (+-10 %) and amplitude (+-30 %) wander slowly."""
    f0, amp = rng.uniform(4.0, 9.0), rng.uniform(0.02, 0.06)
    wander = np.sin(2.0 * np.pi * rng.uniform(0.05, 0.2) * t + rng.uniform(0, 2 * np.pi))
    phase = 2.0 * np.pi * f0 * (t + 0.1 * np.cumsum(wander) / fs)  # frequency f0 (1 + 0.1 wander)
    return amp * (1.0 + 0.3 * wander) * np.sin(phase)


def _interference(rng: np.random.Generator, breathing: _Breathing, t: np.ndarray, fs: float) -> np.ndarray:
    """Noise on the 8 independent leads [8, len(t)] (mV): baseline wander at the breathing
    frequency (0.02-0.1) and a 0.02-0.08 Hz drift (up to 0.08), powerline at 50 or 60 Hz
    (0.002-0.015; left out when fs < 2.5 x its frequency) and white noise (sd 0.003-0.012)."""
    line_hz = float(rng.choice([50.0, 60.0]))
    freqs = [breathing.freq_hz, rng.uniform(0.02, 0.08)] + ([line_hz] if fs >= 2.5 * line_hz else [])
    amps = rng.uniform([0.02, 0.0, 0.002], [0.1, 0.08, 0.015], size=(8, 3))[:, : len(freqs)]
    phases = rng.uniform(0.0, 2.0 * np.pi, size=amps.shape)
    arg = (2.0 * np.pi * np.outer(freqs, t)).astype(np.float32)  # [F, T]; float32 trig is ~15x faster
    basis = np.concatenate([np.cos(arg), np.sin(arg)])  # [2F, T]
    coeffs = np.concatenate([amps * np.sin(phases), amps * np.cos(phases)], axis=1)  # [8, 2F]
    return coeffs @ basis + rng.uniform(0.003, 0.012) * rng.standard_normal((8, t.size))


def _ppg(rng: np.random.Generator, patient: _Patient, pulse_arrival_s: float, beats: np.ndarray,
         breathing: _Breathing, t: np.ndarray, fs: float) -> np.ndarray:
    """PPG [len(t)] (normalised units, pulse height ~1): per beat a systolic wave (width
    0.07 s) peaking pulse_arrival_s (+-5 ms) after the R peak and a diastolic wave 0.2 s x
    sqrt(RR) later; pulse height follows the preceding RR (Frank-Starling) and breathing,
    plus breathing baseline (0.03-0.08) and white noise (sd 0.003-0.01)."""
    rr_before = np.diff(beats, prepend=2 * beats[0] - beats[1])
    heights = np.clip((rr_before / np.median(rr_before)) ** 0.5, 0.8, 1.15) * (1.0 + 0.05 * breathing.at(beats))
    systolic = beats + pulse_arrival_s + rng.normal(0.0, 0.005, size=beats.size)
    diastolic = systolic + 0.2 * np.sqrt(np.diff(beats, append=2 * beats[-1] - beats[-2]))
    pulses = (_gaussian_train(systolic, heights, 0.07, fs, t.size)
              + _gaussian_train(diastolic, patient.diastolic_ratio * heights, 0.1, fs, t.size))
    baseline = rng.uniform(0.03, 0.08) * breathing.at(t + 0.5)
    return pulses + baseline + rng.uniform(0.003, 0.01) * rng.standard_normal(t.size)


def _qrs_axis_deg(vectors: np.ndarray, widths: np.ndarray) -> float:
    """Frontal-plane QRS axis (degrees, 0 = lead I, +90 = aVF) from the net QRS area vector."""
    net = (vectors[_QRS] * widths[_QRS, None]).sum(axis=0)
    return float(np.degrees(np.arctan2(net[1], net[0])))


def _axis_phrase(axis_deg: float) -> str:
    """Report wording for a frontal QRS axis in degrees (normal: -30 to +90)."""
    return "left axis deviation" if axis_deg < -30.0 else "right axis deviation" if axis_deg > 90.0 else "normal axis"


def _report(rng: np.random.Generator, rhythm: str, heart_rate: float, axis_deg: float) -> str:
    """A short templated report consistent with the labels; a third are written as
    capitalised sentences ("Sinus rhythm. Rate 72.") the way machine reports often are."""
    rate, axis = int(round(heart_rate)), _axis_phrase(axis_deg)
    marked, response = "marked " if rate < 50 else "", "rapid" if rate > 100 else "controlled"
    options = {
        "sinus": [f"sinus rhythm, rate {rate}", f"normal sinus rhythm, rate {rate}, {axis}",
                  f"sinus rhythm, rate {rate}, {axis}", f"sinus rhythm, ventricular rate {rate}, {axis}, normal ecg"],
        "brady": [f"sinus bradycardia, rate {rate}", f"sinus bradycardia, rate {rate}, {axis}",
                  f"{marked}sinus bradycardia, ventricular rate {rate}"],
        "tachy": [f"sinus tachycardia, rate {rate}", f"sinus tachycardia, rate {rate}, {axis}"],
        "af": [f"atrial fibrillation, ventricular rate {rate}", f"atrial fibrillation, ventricular rate {rate}, "
               "abnormal ecg", f"atrial fibrillation with {response} ventricular response, rate {rate}"],
    }[rhythm]
    text = options[int(rng.integers(len(options)))]
    if rng.random() < 1.0 / 3.0:
        text = "\n".join(clause.capitalize() + "." for clause in text.split(", "))
    return text
