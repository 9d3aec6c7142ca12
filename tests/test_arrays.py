"""Arrays in, embeddings out: embed_array equals csfm.embed on the same samples read from WFDB,
and bad arrays are refused with a message naming what is wrong."""
from __future__ import annotations

import numpy as np
import pytest

from csfm.data.demo import make_demo_record
from csfm.data.readers import read_wfdb
from csfm.evaluation.arrays import embed_array, embed_arrays, record_from_array
from csfm.evaluation.embedding import main as embed_main
from csfm.model.checkpoint import save_checkpoint
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder
from fixtures import TWELVE, write_wfdb

SMALL = preset("demo", depth=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(path, CSFMEncoder(SMALL), SMALL)
    return path


def test_embed_array_equals_csfm_embed_of_the_same_record_written_as_wfdb(tmp_path, checkpoint):
    demo = make_demo_record(3, duration_s=23.0, fs=500.0)  # 23 s: three windows, the last one partial
    path = write_wfdb(tmp_path / "wfdb", "r1", demo.signal[:12].T.astype(np.float64), 500, list(TWELVE))
    stored = read_wfdb(path).signal  # the samples WFDB holds (16-bit at 200 per mV)
    embed_main(["--checkpoint", str(checkpoint), "--data", f"wfdb:{tmp_path / 'wfdb'}",
                "--out", str(tmp_path / "e.npz"), "--quiet"])
    from_file = np.load(tmp_path / "e.npz")["embeddings"][0]
    from_array = embed_array(checkpoint, stored, fs=500, leads=TWELVE)
    np.testing.assert_allclose(from_array, from_file, atol=1e-5, rtol=0)
    assert from_array.shape == (SMALL.dim,)


def test_batched_form_units_lead_subsets_and_missing_samples(checkpoint):
    encoder = CSFMEncoder(SMALL)
    demo = make_demo_record(5, fs=250.0)
    lead_two = demo.signal[1:2].astype(np.float64)
    with_gap = lead_two.copy()
    with_gap[0, 500:800] = np.nan
    rows = embed_arrays(encoder, [demo.signal[:12], lead_two * 1000, with_gap], fs=[250, 250, 250],
                        leads=[list(TWELVE), ["ECG II"], ["II"]], units="mV", pooling="mean")
    assert rows.shape == (3, SMALL.dim) and np.isfinite(rows).all()
    in_uv = embed_array(encoder, lead_two * 1000, 250, ["II"], units="uV", pooling="mean")
    np.testing.assert_allclose(in_uv, embed_array(encoder, lead_two, 250, ["II"], pooling="mean"), atol=1e-5)
    assert not np.allclose(rows[2], in_uv, atol=1e-4)  # NaN samples are taken as missing, not dropped silently
    with_ppg = embed_array(encoder, demo.signal[[1, 12]], 250, ["II", "Pleth"])
    assert with_ppg.shape == (SMALL.dim,)


@pytest.mark.parametrize("signal, leads, options, match", [
    (np.zeros((2500, 2)), ["I", "II"], {}, r"2 lead names for 2500 channels .* looks like \[T, C\]: pass signal.T"),
    (np.zeros((3, 2500)), ["I", "II"], {}, r"2 lead names for 3 channels"),
    (np.zeros(2500), ["I"], {}, r"must be a numeric \[C, T\] array, got shape \(2500,\)"),
    (np.zeros((2, 2500)), ["I", "ABP"], {}, r"leads \['ABP'\] are not ECG/PPG channels"),
    (np.zeros((2, 2500)), ["II", "ECG II"], {}, r"duplicate of II"),
    (np.zeros((1, 2500)), ["II"], {"units": "mmHg"}, r"units must be one of mV, uV, V"),
])
def test_bad_arrays_are_refused_by_name(signal, leads, options, match):
    with pytest.raises(ValueError, match=match):
        record_from_array(signal, 250, leads, **options)


def test_arrays_the_model_cannot_use_are_named(checkpoint):
    with pytest.raises(ValueError, match=r"array0: .*no 10 s window|array0"):
        embed_array(checkpoint, np.full((1, 2500), np.nan), 250, ["II"])
    with pytest.raises(ValueError, match=r"fs: 1 entries for 2 signals"):
        embed_arrays(checkpoint, [np.zeros((1, 2500))] * 2, [250], ["II"])
