"""--data specs: parsing, mixing with weights, and a short run on real WFDB records."""
from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import write_ptbxl

from csfm.data.demo import DemoDataset
from csfm.data.sources import DataSpec, MixedSource, open_sources, parse_spec
from csfm.training.loop import parse_config, train

CINC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cinc2017"


def test_specs_parse_and_bad_ones_are_named():
    assert parse_spec("wfdb:/data/x@2") == DataSpec("wfdb", "/data/x", 2.0)
    assert parse_spec("demo", demo_records=7) == DataSpec("demo", "7", 1.0)
    assert parse_spec("demo:40@0.5") == DataSpec("demo", "40", 0.5)
    assert parse_spec("wfdb:/d/cinc?labels_csv=REFERENCE.csv@3") == DataSpec(
        "wfdb", "/d/cinc", 3.0, (("labels_csv", "REFERENCE.csv"),))
    for bad, match in [("csv:/x", "KIND one of"), ("wfdb", "KIND one of"), ("wfdb:/x@two", "not a number"),
                       ("demo:many", "record count"), ("wfdb:/x?labels", "name=value")]:
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e400", "-1", "0", "-0.0", ""])
def test_weights_that_are_not_finite_and_positive_name_the_spec(weight):
    spec = f"wfdb:/data/x@{weight}"
    match = r"--data 'wfdb:/data/x@.*': weight " + ("'' is not a number" if not weight else
                                                     "must be a finite number > 0")
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)
    with pytest.raises(ValueError, match="source 1: weight"):
        MixedSource([DemoDataset(2), DemoDataset(2)], [1.0, float(weight or "nan")])


def test_mixed_source_offsets_patients_and_weights():
    mixed = MixedSource([DemoDataset(6), DemoDataset(9, seed=1)], [2.0, 0.5])
    assert len(mixed) == 15
    assert mixed[7].record_id == DemoDataset(9, seed=1)[1].record_id
    assert mixed.patient_ids[0].startswith("0:") and mixed.patient_ids[6].startswith("1:")
    weighted = mixed.weighted(list(range(15)), seed=0)
    assert sorted(i for i in weighted if i < 6) == sorted(list(range(6)) * 2)
    second = [i for i in weighted if i >= 6]
    assert len(second) == 4 and len(set(second)) == 4  # round(0.5 * 9) distinct records
    assert weighted == mixed.weighted(list(range(15)), seed=0)
    with pytest.raises(IndexError):
        mixed[15]
    assert mixed.record_files(7) == []  # demo records are generated, read from no file
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        MixedSource([DemoDataset(2)], [1.0, 1.0])


@pytest.mark.data
def test_mixed_source_lists_the_files_of_each_record(tmp_path):
    root = write_ptbxl(tmp_path)
    mixed = open_sources(["demo:3", f"ptbxl:{root}"])
    files = mixed.record_files(4)  # record 1 of PTB-XL
    assert files == [root / "records100" / "00000" / "00002_lr.hea", root / "records100" / "00000" / "00002_lr.dat",
                     root / "ptbxl_database.csv"]
    assert all(f.is_file() for f in files)


@pytest.mark.data
@pytest.mark.skipif(not CINC.is_dir(), reason=f"real recordings not present at {CINC}")
def test_pretraining_reads_a_real_wfdb_folder(tmp_path):
    source = open_sources([f"wfdb:{CINC}?labels_csv=REFERENCE.csv"])
    assert source[0].metadata["label"] == "N"  # A00001 in REFERENCE.csv
    with pytest.raises(ValueError, match="bad option"):
        open_sources([f"wfdb:{CINC}?labels=REFERENCE.csv"])
    window = source.read_window(0, 1.0, 12.0)
    assert window.channel_types == [1] and abs(window.signal.shape[1] - 12.0 * window.fs) <= 1
    config = parse_config(["--data", f"wfdb:{CINC}", "--max-steps", "2", "--batch-size", "4", "--epochs", "1",
                           "--precision", "fp32", "--quiet", "--out-dir", str(tmp_path)])
    final = train(config)
    assert (final / "model.safetensors").is_file()
