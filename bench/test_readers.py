"""File readers on the real vendor exports: ours side by side with the library that reads the same
file where one exists (Philips: ``sierraecg.read_file``; DICOM: pydicom's ``waveform_array``),
and how fast hostile files are refused (goal: well under 1 s each; the tests assert only the
memory bound, timings live here).

    python -m pytest bench/test_readers.py --benchmark-only -q -s
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from csfm.data.readers import FileFormatError, read_record

VENDOR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vendor"
FILES = {
    "ge_muse": "ge_muse/muse_ecg.xml",
    "philips_1.03": "philips/129DYPRG.XML",
    "philips_1.04_utf16": "philips/3191723_ZZDEMOPTONLY_1-04_orig.xml",
    "hl7_aecg": "hl7_aecg/Example_aECG.xml",
    "dicom": "dicom_ecg/waveform_ecg.dcm",
    "scp_ecg": "scp_ecg/ECGToolkit_Example.scp",
}
HOSTILE_GOAL_S = 1.0

pytestmark = [pytest.mark.data, pytest.mark.skipif(not VENDOR.is_dir(), reason=f"vendor files absent: {VENDOR}")]


def _library(name: str, path: Path):
    """The library read of the same file, or None where no library reads it."""
    if name.startswith("philips"):
        import sierraecg

        return lambda: sierraecg.read_file(str(path))
    if name == "dicom":
        import pydicom

        return lambda: pydicom.dcmread(str(path)).waveform_array(0)
    return None


@pytest.mark.parametrize("name", list(FILES))
def test_read_vendor_file(side_by_side, benchmark, name):
    """Side by side with the library where one reads the format; else our read timed alone
    (no library to compare with: MUSE, HL7 aECG as installable here, SCP-ECG)."""
    path = VENDOR / FILES[name]
    library = _library(name, path)
    if library is None:
        benchmark.pedantic(lambda: read_record(path), rounds=5, warmup_rounds=1)
        print(f"\nread {name}: {benchmark.stats.stats.median * 1e3:.1f} ms (median of 5, no library to compare)")
        return
    side_by_side(f"read {name}", path.name, baselines={"library": library},
                 ours={"csfm.read_record": lambda: read_record(path)}, rounds=5, warmup=1)


def _hostile_files(tmp: Path) -> dict[str, Path]:
    """Crafted files that must be refused: an entity bomb, and a MUSE file claiming 10^9 samples."""
    bomb = tmp / "bomb.xml"
    entities = "".join(f'<!ENTITY e{i} "{"&e%d;" % (i - 1) * 10 if i else "lol"}">' for i in range(10))
    bomb.write_text(f'<?xml version="1.0"?><!DOCTYPE RestingECG [{entities}]><RestingECG>&e9;</RestingECG>')
    claim = tmp / "claim.xml"
    text = (VENDOR / FILES["ge_muse"]).read_text(encoding="utf-8", errors="strict")
    claim.write_text(text.replace("<LeadSampleCountTotal>2500</LeadSampleCountTotal>",
                                  "<LeadSampleCountTotal>1000000000</LeadSampleCountTotal>", 1), encoding="utf-8")
    return {"entity bomb": bomb, "10^9-sample claim": claim}


def test_hostile_files_are_refused_fast(benchmark, tmp_path):
    seconds = {}
    for case, path in _hostile_files(tmp_path).items():
        start = time.perf_counter()
        with pytest.raises(FileFormatError):
            read_record(path)
        seconds[case] = time.perf_counter() - start
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({f"{case}_s": s for case, s in seconds.items()})
    for case, s in seconds.items():
        print(f"\nhostile {case}: refused in {s * 1e3:.1f} ms (goal < {HOSTILE_GOAL_S:.0f} s: "
              f"{'MET' if s < HOSTILE_GOAL_S else 'MISSED'})")
