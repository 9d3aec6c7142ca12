"""Report cleaning and the WordPiece tokenizer: known ids, round trips, truncation, bad input."""
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csfm.data.demo import make_demo_records
from csfm.data.tokenizer import (
    DEFAULT_MAX_TOKENS, SPECIAL_TOKENS, EncodedBatch, ReportTokenizer, ReportTruncationWarning, clean_report,
)

# A tiny BERT-style vocabulary: the specials where BERT has them relative to each other,
# an [unused0] row in between, and pieces that spell "sinus" as "sin" + "##us".
TINY_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".",
              "sin", "##us", "rhythm", "rate", "normal", "axis", "7", "##2"]
TINY_ID = {token: i for i, token in enumerate(TINY_VOCAB)}


@pytest.fixture
def tiny_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo_reports():
    return [r.text for r in make_demo_records(120, seed=11, duration_s=2.0, fs=100.0)]


@pytest.fixture(scope="module")
def trained(demo_reports):
    return ReportTokenizer.train(demo_reports, vocab_size=300, min_frequency=2)


@pytest.mark.parametrize("raw, cleaned", [
    ("Sinus rhythm.\nCompared to previous tracing, no change.", "sinus rhythm, no change"),
    ("Sinus rhythm. When compared with ECG of 01-JAN-2020 10:30, T wave inversion now present.",
     "sinus rhythm, t wave inversion now present"),
    ("Atrial fibrillation\nSince the previous tracing rate faster. Tracing #2 ,, low voltage..",
     "atrial fibrillation, low voltage"),
    ("  ,, Sinus Bradycardia\r\nPrevious tracing unchanged.  Normal   ECG ", "sinus bradycardia, normal ecg"),
    ("In comparison with prior ECG, ventricular rate increased", "ventricular rate increased"),
    ("Sinus rhythm. QRS 0.12 s.", "sinus rhythm, qrs 0.12 s"),
    ("sinus rhythm, rate 72, normal axis", "sinus rhythm, rate 72, normal axis"),
    ("", ""),
    ("...\n", ""),
])
def test_clean_report_examples(raw, cleaned):
    assert clean_report(raw) == cleaned


_words = st.sampled_from(["sinus", "Rhythm", "compared", "to", "with", "previous", "tracing", "#3", "0.5", "ECG",
                          "when", "of", "rate", "72", ".", ",", "\n", " ", "  ", "\t", "since", "the", "prior"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_words, max_size=20).map("".join), st.lists(_words, max_size=20).map(" ".join))
def test_clean_report_is_idempotent_and_tidy(glued, spaced):
    for text in (glued, spaced):
        once = clean_report(text)
        assert clean_report(once) == once
        assert once == once.strip(" ,") and "\n" not in once and "  " not in once and ",," not in once
        assert not re.search(r"compared\s+(to|with)|(previous|prior)\s+(tracing|ecg)|tracing\s*#\s*\d", once)
        assert not re.search(r"(?<!\d)\.|\.(?!\d)", once), "only decimal points may remain"


def test_bert_vocab_gives_expected_ids(tiny_vocab):
    tok = ReportTokenizer.from_vocab(tiny_vocab)
    assert tok.vocab_size == len(TINY_VOCAB)
    assert (tok.pad_token_id, tok.mask_token_id) == (TINY_ID["[PAD]"], TINY_ID["[MASK]"])
    expected = [TINY_ID["sin"], TINY_ID["##us"], TINY_ID["rhythm"]]
    assert tok.encode("sinus rhythm").ids == expected
    assert tok.encode("Sinus Rhythm.").ids == expected  # lower-cased, trailing period cleaned away
    assert tok.encode("sinus rhythm, rate 72").ids == expected + [TINY_ID[","], TINY_ID["rate"], TINY_ID["7"],
                                                                   TINY_ID["##2"]]
    assert tok.encode("sinus bradycardia").ids == [TINY_ID["sin"], TINY_ID["##us"], TINY_ID["[UNK]"]]
    assert ReportTokenizer.from_vocab(tiny_vocab.parent).vocab_size == len(TINY_VOCAB)  # a folder works too


def test_encode_adds_no_cls_or_sep(tiny_vocab):
    ids = ReportTokenizer.from_vocab(tiny_vocab).encode("rate").ids
    assert ids == [TINY_ID["rate"]]


def test_special_token_text_is_not_a_special_token(tiny_vocab):
    ids = ReportTokenizer.from_vocab(tiny_vocab).encode("[MASK]").ids
    assert TINY_ID["[MASK]"] not in ids


def test_round_trip_on_trained_vocab(trained, demo_reports, tmp_path):
    tokens = trained.save(tmp_path).read_text(encoding="utf-8").splitlines()
    assert len(tokens) == trained.vocab_size <= 300
    assert tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and trained.pad_token_id == 0
    unk = tokens.index("[UNK]")
    for report in demo_reports:
        encoded = trained.encode(report)
        assert unk not in encoded.ids and not encoded.truncated
        assert trained.decode(encoded.ids) == clean_report(report)


def test_save_and_reload_keeps_ids(trained, demo_reports, tmp_path):
    path = trained.save(tmp_path)
    assert path == tmp_path / "vocab.txt" and len(path.read_text().splitlines()) == trained.vocab_size
    again = ReportTokenizer.from_vocab(path)
    assert [again.encode(r).ids for r in demo_reports] == [trained.encode(r).ids for r in demo_reports]


def test_fingerprint_names_the_ids_a_vocabulary_gives(trained, tmp_path):
    """Saved and reloaded: the same fingerprint; two tokens swapped (other ids): another one."""
    reloaded = ReportTokenizer.from_vocab(trained.save(tmp_path / "vocab.txt"))
    assert reloaded.fingerprint == trained.fingerprint and len(trained.fingerprint) == 16
    lines = (tmp_path / "vocab.txt").read_text().splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    (tmp_path / "swapped.txt").write_text("\n".join(lines) + "\n")
    assert ReportTokenizer.from_vocab(tmp_path / "swapped.txt").fingerprint != trained.fingerprint


def test_truncation_at_64_is_reported(tiny_vocab):
    tok = ReportTokenizer.from_vocab(tiny_vocab)
    long_report = ", ".join(["sinus rhythm"] * 30)  # 30 * 3 pieces + 29 commas = 119
    encoded = tok.encode(long_report)
    assert len(encoded.ids) == DEFAULT_MAX_TOKENS and encoded.truncated and encoded.n_dropped == 119 - 64
    assert not tok.encode("sinus rhythm").truncated
    with pytest.warns(ReportTruncationWarning, match="2 of 3 reports"):
        batch = tok.encode_batch([long_report, "rate", long_report])
    assert batch.n_truncated == 2


def test_encode_batch_packs_like_encode(trained, demo_reports):
    texts = demo_reports[:7] + [""]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing truncated, so no warning
        batch = trained.encode_batch(texts)
    assert isinstance(batch, EncodedBatch) and batch.n_truncated == 0
    assert batch.ids.dtype == np.int64 and batch.cu_seqlens.dtype == np.int32
    assert batch.cu_seqlens.shape == (len(texts) + 1,) and batch.cu_seqlens[0] == 0
    for b, text in enumerate(texts):
        assert batch.ids[batch.cu_seqlens[b]:batch.cu_seqlens[b + 1]].tolist() == trained.encode(text).ids
    assert batch.max_seqlen == max(len(trained.encode(t).ids) for t in texts)
    empty = trained.encode_batch([])
    assert empty.ids.shape == (0,) and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("[PAD]\n[UNK]\nsin\n", r"\[CLS\].*\[MASK\]"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nsin\n\nrate\n", "line 7 is empty"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nsin\nsin\n", "line 7 repeats"),
])
def test_bad_vocab_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad_vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        ReportTokenizer.from_vocab(path)
    assert "bad_vocab.txt" in str(err.value)


def test_non_utf8_vocab_is_a_value_error(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ValueError, match="UTF-8"):
        ReportTokenizer.from_vocab(path)


def test_non_string_text_names_the_field(tiny_vocab):
    tok = ReportTokenizer.from_vocab(tiny_vocab)
    with pytest.raises(ValueError, match="text must be a str, got int"):
        tok.encode(12)
    with pytest.raises(ValueError, match="text must be a str, got NoneType"):
        clean_report(None)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        tok.encode_batch(["sinus rhythm", None])
    with pytest.raises(ValueError, match="sequence of str"):
        tok.encode_batch("sinus rhythm")
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        ReportTokenizer.train([b"sinus"])


@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, True])
def test_bad_max_tokens(tiny_vocab, max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        ReportTokenizer.from_vocab(tiny_vocab).encode("rate", max_tokens=max_tokens)


def test_bad_training_input():
    with pytest.raises(ValueError, match="no reports"):
        ReportTokenizer.train([])
    with pytest.raises(ValueError, match="vocab_size"):
        ReportTokenizer.train(["sinus rhythm"], vocab_size=5)


def test_in_memory_vocab_is_checked():
    with pytest.raises(ValueError, match="ids must be"):
        ReportTokenizer({t: 2 * i for i, t in enumerate(SPECIAL_TOKENS)})
