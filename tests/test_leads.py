"""Lead contract: aliases, monitor leads, dropping, user mapping, duplicates, errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csfm.data.leads import ALIASES, MONITOR_LEADS, channel_type, record_from_channels, resolve_channels
from csfm.data.record import CHANNEL_TYPE_NAMES, PPG_TYPE

TYPE = {name: index for index, name in enumerate(CHANNEL_TYPE_NAMES)}


@pytest.mark.parametrize("name, expected", [
    ("i", "I"), ("lead i", "I"), ("I", "I"), ("DI", "I"),
    ("ii", "II"), ("lead II", "II"), ("ECG II", "II"), ("EKG II", "II"), ("EKG", "II"), ("ecg_ii", "II"), ("Lead-II", "II"), ("DII", "II"),
    ("iii", "III"), ("DIII", "III"),
    ("avr", "aVR"), ("aVR", "aVR"), ("AVR", "aVR"), ("avl", "aVL"), ("AVF", "aVF"),
    *[(f"V{k}", f"V{k}") for k in range(1, 7)], ("v6", "V6"), ("lead V2", "V2"),
    ("PLETH", "PPG"), ("Pleth", "PPG"), ("PPG", "PPG"), ("SpO2 wave", "PPG"),
])
def test_standard_aliases(name, expected):
    assert channel_type(name) == TYPE[expected]


@pytest.mark.parametrize("name, expected", [
    ("MLII", "II"), ("MLI", "I"), ("MLIII", "III"), ("ML II", "II"),
    ("MCL1", "V1"), ("MCL6", "V6"), ("CM5", "V5"),
    ("V", "V1"),    # monitor chest lead: documented choice V1
    ("ECG", "II"),  # lone single wearable lead (CinC 2017): lead II per docs/design.md, "Model layout"
])
def test_monitor_leads(name, expected):
    assert channel_type(name) == TYPE[expected]


@pytest.mark.parametrize("name", ["ABP", "ART", "RESP", "Resp", "PAP", "CVP", "vx", "vy", "vz", "SpO2", "HR",
                                  "PULSE", "NBPSys", "EEG", "lead", "V7", ""])
def test_non_cardiac_names_have_no_type(name):
    assert channel_type(name) is None


def test_tables_only_hold_valid_types():
    assert set(ALIASES.values()) | set(MONITOR_LEADS.values()) <= set(range(PPG_TYPE + 1))
    assert not set(ALIASES) & set(MONITOR_LEADS)


def test_ptb_record_keeps_twelve_drops_frank():
    names = ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6", "vx", "vy", "vz"]
    kept, dropped = resolve_channels(names)
    assert kept == [(k, k) for k in range(12)]
    assert dropped == ["vx", "vy", "vz"]


def test_icu_record_keeps_ecg_and_ppg_drops_others():
    kept, dropped = resolve_channels(["II", "V", "PLETH", "RESP", "ABP"])
    assert kept == [(0, TYPE["II"]), (1, TYPE["V1"]), (2, PPG_TYPE)]
    assert dropped == ["RESP", "ABP"]


def test_user_mapping_overrides_tables():
    kept, _ = resolve_channels(["ECG"], {"ecg": "I"})
    assert kept == [(0, TYPE["I"])]
    kept, _ = resolve_channels(["V", "II"], {"V": "V5"})
    assert kept == [(0, TYPE["V5"]), (1, TYPE["II"])]
    kept, dropped = resolve_channels(["II", "PLETH"], {"II": None})
    assert kept == [(1, PPG_TYPE)] and dropped == ["II"]
    kept, dropped = resolve_channels(["ABP", "Finger"], {"Finger": 12})
    assert kept == [(1, PPG_TYPE)] and dropped == ["ABP"]


@pytest.mark.parametrize("target", ["V7", 13, -1, True, 2.5])
def test_bad_mapping_value_names_the_entry(target):
    with pytest.raises(ValueError, match=r"rec\.hea: mapping\['ECG'\]"):
        resolve_channels(["ECG"], {"ECG": target}, where="rec.hea")


def test_duplicates_keep_first_and_note_the_rest():
    kept, dropped = resolve_channels(["MLII", "II", "lead II", "V5"])
    assert kept == [(0, TYPE["II"]), (3, TYPE["V5"])]
    assert dropped == ["II (duplicate of II)", "lead II (duplicate of II)"]


def test_no_usable_channel_names_record_and_channels():
    with pytest.raises(ValueError, match=r"a103l\.hea: no usable ECG/PPG channel among \['ABP', 'RESP'\]"):
        resolve_channels(["ABP", "RESP"], where="a103l.hea")
    with pytest.raises(ValueError, match="no usable"):
        resolve_channels([])


def test_single_lead_is_never_broadcast():
    kept, dropped = resolve_channels(["ECG"])
    assert kept == [(0, TYPE["II"])] and dropped == []


_NAMES = st.sampled_from(sorted(ALIASES) + sorted(MONITOR_LEADS) + ["ABP", "RESP", "vx", "MLII", "Lead II",
                                                                    "Pleth", "aVR"]) | st.text(max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(_NAMES, max_size=16))
def test_every_channel_is_kept_once_or_dropped(names):
    try:
        kept, dropped = resolve_channels(names)
    except ValueError:
        assert all(channel_type(name) is None for name in names)
        return
    indices = [index for index, _ in kept]
    types = [ctype for _, ctype in kept]
    assert indices == sorted(set(indices)) and len(set(types)) == len(types)
    assert len(kept) + len(dropped) == len(names)
    assert all(channel_type(names[index]) == ctype for index, ctype in kept)


def test_record_from_channels_sets_modalities_and_flags_empty_channels():
    signal = np.array([[0.1, 0.2, 0.3], [np.nan, np.nan, np.nan]])
    record = record_from_channels(signal, 250, ["II", "PLETH"], ["mV", "NU"], [TYPE["II"], PPG_TYPE], ["ABP"],
                                  record_id="x")
    assert record.signal.dtype == np.float32
    assert record.modalities == ["ECG", "PPG"] and record.dropped_channels == ["ABP"]
    assert record.metadata["empty_channels"] == ["PLETH"]
