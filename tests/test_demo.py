"""Demo data: determinism, physiological consistency of leads, beats and pulses, labels and reports."""
import numpy as np
import pytest
from scipy.signal import butter, find_peaks, sosfiltfilt

from csfm.data.demo import RECORDS_PER_PATIENT, RHYTHMS, DemoDataset, make_demo_record, make_demo_records
from csfm.data.record import CHANNEL_TYPE_NAMES
from csfm.data.tokenizer import clean_report

N_CHECKED = 60  # records whose beats are measured: every rhythm occurs among them
LEAD = {name: i for i, name in enumerate(CHANNEL_TYPE_NAMES)}


@pytest.fixture(scope="module")
def records():
    return make_demo_records(N_CHECKED, seed=3)


def r_peaks(record) -> np.ndarray:
    """R-peak sample indices from lead II: 5-30 Hz band-pass (QRS energy), then peaks above
    40 % of the largest at least 0.25 s apart."""
    sos = butter(2, [5.0, 30.0], btype="band", fs=record.fs, output="sos")
    x = sosfiltfilt(sos, record.signal[LEAD["II"]].astype(np.float64))
    return find_peaks(x, height=0.4 * x.max(), distance=int(0.25 * record.fs))[0]


def rr_cv(record) -> float:
    """Coefficient of variation of the RR intervals between detected R peaks."""
    rr = np.diff(r_peaks(record))
    return float(rr.std() / rr.mean())


def test_same_seed_and_index_give_identical_records():
    a, b = make_demo_record(7, seed=1), make_demo_record(7, seed=1)
    np.testing.assert_array_equal(a.signal, b.signal)
    assert (a.text, a.metadata, a.patient_id) == (b.text, b.metadata, b.patient_id)


@pytest.mark.parametrize("other", [dict(index=8, seed=1), dict(index=7, seed=2)], ids=["index", "seed"])
def test_other_index_or_seed_gives_another_record(other):
    assert not np.array_equal(make_demo_record(7, seed=1).signal, make_demo_record(**other).signal)


def test_record_layout():
    record = make_demo_record(4, duration_s=10.0, fs=500.0)
    assert record.signal.shape == (13, 5000) and record.signal.dtype == np.float32
    assert np.isfinite(record.signal).all()
    assert record.channel_names == list(CHANNEL_TYPE_NAMES)
    assert record.channel_types == list(range(13))
    assert record.units == ["mV"] * 12 + ["NU"] and record.modalities == ["ECG"] * 12 + ["PPG"]
    assert record.record_id == "demo000004" and record.fs == 500.0


@pytest.mark.parametrize("duration_s, fs", [(5.0, 250.0), (2.5, 125.0), (30.0, 360.0)])
def test_other_lengths_and_rates(duration_s, fs):
    record = make_demo_record(2, duration_s=duration_s, fs=fs)
    assert record.signal.shape == (13, round(duration_s * fs)) and record.fs == fs


def test_records_of_one_patient_share_id_age_and_sex():
    group = [make_demo_record(i) for i in range(RECORDS_PER_PATIENT)]
    assert len({(r.patient_id, r.metadata["age"], r.metadata["sex"]) for r in group}) == 1
    assert make_demo_record(RECORDS_PER_PATIENT).patient_id != group[0].patient_id
    assert group[0].metadata["patient_id"] == group[0].patient_id


def test_lead_identities_hold(records):
    for r in records[:10]:
        s = {name: r.signal[i].astype(np.float64) for name, i in LEAD.items()}
        np.testing.assert_allclose(s["III"], s["II"] - s["I"], atol=1e-5)  # Einthoven
        np.testing.assert_allclose(s["aVR"] + s["aVL"] + s["aVF"], 0.0, atol=1e-5)
        np.testing.assert_allclose(s["aVR"], -(s["I"] + s["II"]) / 2, atol=1e-5)
        np.testing.assert_allclose(s["aVL"], s["I"] - s["II"] / 2, atol=1e-5)
        np.testing.assert_allclose(s["aVF"], s["II"] - s["I"] / 2, atol=1e-5)


def test_amplitudes_are_physiological(records):
    for r in records[:10]:
        qrs_ii = np.ptp(r.signal[LEAD["II"]])
        assert 0.4 < qrs_ii < 3.0, f"{r.record_id}: lead II spans {qrs_ii:.2f} mV"
        assert 0.5 < np.ptp(r.signal[12]) < 2.5, f"{r.record_id}: PPG spans {np.ptp(r.signal[12]):.2f} NU"


def test_every_rhythm_occurs(records):
    assert {r.metadata["rhythm"] for r in records} == set(RHYTHMS)


def test_heart_rate_from_r_peaks_matches_label(records):
    for r in records:
        measured = 60.0 * r.fs / np.diff(r_peaks(r)).mean()
        assert abs(measured - r.metadata["heart_rate"]) < 5.0, (r.record_id, r.metadata, measured)


def test_rate_labels_follow_the_rate_classes():
    for r in make_demo_records(150, seed=5, duration_s=4.0, fs=100.0):
        rate, rhythm = r.metadata["heart_rate"], r.metadata["rhythm"]
        assert rhythm in RHYTHMS
        assert {"sinus": 60 <= rate <= 100, "brady": rate < 60, "tachy": rate > 100, "af": 40 < rate < 180}[rhythm], \
            (r.record_id, rhythm, rate)


def test_af_rr_is_more_irregular_than_sinus(records):
    af = [rr_cv(r) for r in records if r.metadata["rhythm"] == "af"]
    regular = [rr_cv(r) for r in records if r.metadata["rhythm"] != "af"]
    assert min(af) > max(regular), (sorted(af), sorted(regular))
    assert max(regular) < 0.06


def test_ppg_peaks_follow_r_peaks(records):
    for r in records:
        beats = r_peaks(r) / r.fs
        pulses = find_peaks(r.signal[12], prominence=0.3, distance=int(0.25 * r.fs))[0] / r.fs
        pulses = pulses[pulses > 0.5]  # its R peak may lie before the record starts
        assert len(pulses) >= len(beats) // 2
        for p in pulses:
            delays = p - beats
            assert np.any((delays >= 0.1) & (delays <= 0.4)), (r.record_id, p, beats)


def test_reports_agree_with_labels(records):
    phrase = {"sinus": "sinus rhythm", "brady": "sinus bradycardia", "tachy": "sinus tachycardia",
              "af": "atrial fibrillation"}
    for r in records:
        text, rhythm = clean_report(r.text), r.metadata["rhythm"]
        assert phrase[rhythm] in text, (r.text, rhythm)
        assert f"rate {round(r.metadata['heart_rate'])}" in text, (r.text, r.metadata["heart_rate"])
        assert all(p not in text for k, p in phrase.items() if k != rhythm)


def test_demographics_are_plausible(records):
    for r in records:
        assert 18 <= r.metadata["age"] <= 95 and r.metadata["sex"] in ("M", "F")
        assert 0.1 < r.metadata["pulse_arrival_s"] < 0.35


def test_dataset_is_lazy_and_matches_records():
    data = DemoDataset(10, seed=2, duration_s=4.0)
    assert len(data) == 10
    np.testing.assert_array_equal(data[3].signal, make_demo_record(3, seed=2, duration_s=4.0).signal)
    assert data[-1].record_id == "demo000009"
    with pytest.raises(IndexError):
        data[10]


@pytest.mark.parametrize("kw", [dict(duration_s=0.0), dict(fs=-1.0), dict(fs=20.0), dict(duration_s=float("nan"))])
def test_bad_arguments_name_themselves(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        make_demo_record(0, **kw)
    with pytest.raises(ValueError, match=name):
        DemoDataset(3, **kw)


def test_many_records_generate():
    """Speed sanity: 50 default records (10 s at 500 Hz) generate; no timing is asserted."""
    assert len(make_demo_records(50, seed=9)) == 50
