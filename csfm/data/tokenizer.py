"""Report text → WordPiece ids: the reference's report cleaning and a BERT-style tokenizer.

The reference model embeds reports with the 30522-token BERT-base-uncased WordPiece
vocabulary (docs/design.md, "Model layout"). Nothing is downloaded here: load a ``vocab.txt`` you supply
(``ReportTokenizer.from_vocab``), or train a small vocabulary from your own reports
(``ReportTokenizer.train``, e.g. on the demo reports).

Encoding returns the report's word pieces only, without [CLS] or [SEP]: the model puts
its own CLS token at the front of the whole signal + text sequence. Every text is cleaned
with ``clean_report`` first, as the reference does; cleaning twice changes nothing, so
already-cleaned text may be passed too. Truncation to ``max_tokens`` is always reported.
"""
from __future__ import annotations

import functools
import hashlib
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_MAX_TOKENS = 64  # text positions of the reference model
VOCAB_FILE = "vocab.txt"

# A clause ends at a comma, a newline or a period that is not a decimal point.
_CLAUSE_END = r"(?:,|\n|\r|(?<!\d)\.|\.(?!\d))"
_CLAUSE_END_RE = re.compile(_CLAUSE_END)
_COMPARISON = re.compile(
    r"(?:(?:when|since|as)\s+(?:the\s+)?)?"
    r"(?:compared\s+(?:to|with)|in\s+comparison\s+(?:to|with)|(?:previous|prior|last)\s+(?:tracing|ecg|ekg)"
    r"|tracing\s*#\s*\d+)"
    rf"(?:(?!{_CLAUSE_END}).)*"
)
_SPACES = re.compile(r"\s+")
_COMMAS = re.compile(r"\s*(?:,\s*)+")


class ReportTruncationWarning(UserWarning):
    """Some reports were longer than max_tokens word pieces and lost their tail."""


@dataclass(frozen=True)
class EncodedText:
    """One report's word-piece ids (no [CLS]/[SEP]), at most max_tokens of them.

    truncated: whether the report had more pieces than max_tokens; n_dropped: how many were cut.
    """

    ids: list[int]
    truncated: bool
    n_dropped: int


@dataclass(frozen=True)
class EncodedBatch:
    """B reports packed back to back, the flash-attn varlen convention.

    ids: [N] int64, the pieces of report b are ids[cu_seqlens[b]:cu_seqlens[b + 1]].
    cu_seqlens: [B + 1] int32 offsets, starting at 0; a report may have no pieces.
    n_truncated: how many of the B reports were cut to max_tokens.
    """

    ids: np.ndarray
    cu_seqlens: np.ndarray
    n_truncated: int

    @property
    def max_seqlen(self) -> int:
        """Length (pieces) of the longest report in the batch, 0 for an empty batch."""
        return int(np.diff(self.cu_seqlens).max(initial=0))


def clean_report(text: str) -> str:
    """The reference's report cleaning: lower-case; drop comparison clauses ("compared to ...",
    "previous tracing", "when compared with ecg of ...", "tracing #n", ...) from the phrase
    to the end of its clause; newlines and periods become commas (decimal points such as
    "0.12" are kept); whitespace and repeated commas collapse; ends are stripped.

    >>> clean_report("Sinus rhythm.\\nCompared to previous tracing, no change.")
    'sinus rhythm, no change'
    """
    return _clean(text, "text")


class ReportTokenizer:
    """BERT-style WordPiece tokenizer for reports: lower-casing BERT normaliser, BERT
    pre-tokeniser (splits on whitespace and punctuation), greedy longest-match WordPiece
    with "##" continuation pieces and [UNK] for what the vocabulary cannot spell.

    vocab: token → id, ids 0..V-1 each used once, holding all of SPECIAL_TOKENS.
    source: where the vocabulary came from, for error messages.
    """

    def __init__(self, vocab: Mapping[str, int], source: str = "vocabulary") -> None:
        self.source = source
        self._vocab = _checked_vocab(vocab, source)
        self._tok = _pipeline(models.WordPiece(vocab=self._vocab, unk_token="[UNK]"))

    @classmethod
    def from_vocab(cls, path: str | Path) -> ReportTokenizer:
        """Load a BERT-style vocab.txt: one token per line, id = line number (from 0).

        path: the file, or a folder holding vocab.txt (e.g. BERT-base-uncased's 30522 tokens).
        """
        file = _vocab_file(path)
        return cls(_read_vocab(file), source=str(file))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> ReportTokenizer:
        """Build a WordPiece vocabulary of at most vocab_size tokens from (cleaned) reports.

        Deterministic (the same reports give the same ids in every process, which the
        ``tokenizers`` trainer does not guarantee): the special tokens take ids 0..4 in
        SPECIAL_TOKENS order ([PAD] = 0, as in BERT); then every character seen, alone and as
        a ``##`` continuation, so any word stays spellable; then whole words seen at least
        min_frequency times, most frequent first (ties alphabetical), up to vocab_size.
        """
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        cleaned = [_clean(text, f"texts[{i}]") for i, text in enumerate(_text_list(texts))]
        if not cleaned:
            raise ValueError("texts: cannot train a vocabulary from no reports")
        words = Counter(chain.from_iterable(_words(text) for text in cleaned))
        chars = sorted({c for word in words for c in word})
        tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
        ranked = sorted((w for w, n in words.items() if n >= min_frequency and len(w) > 1), key=lambda w: (-words[w], w))
        tokens.extend(ranked[: max(0, vocab_size - len(tokens))])
        if len(tokens) > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens)} special and character tokens "
                             "these reports need")
        return cls({token: i for i, token in enumerate(tokens)}, source=f"vocabulary built from {len(cleaned)} reports")

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as vocab.txt (one token per line, in id order) and return its path.

        path: the file to write, or an existing folder to write vocab.txt into.
        """
        file = _vocab_file(path)
        file.write_text("".join(token + "\n" for token in self._tokens_by_id()), encoding="utf-8")
        return file

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex, first 16 digits) of the tokens in id order: equal exactly when two
        tokenizers give the same ids (e.g. ids stored by ``csfm.prepare`` and a training run's)."""
        return hashlib.sha256("\n".join(self._tokens_by_id()).encode("utf-8")).hexdigest()[:16]

    def _tokens_by_id(self) -> list[str]:
        """The vocabulary's tokens in id order (what vocab.txt lists)."""
        return sorted(self._vocab, key=self._vocab.__getitem__)

    @property
    def vocab_size(self) -> int:
        """Number of tokens V; ids lie in 0..V-1."""
        return len(self._vocab)

    @property
    def pad_token_id(self) -> int:
        """Id of [PAD]."""
        return self._vocab["[PAD]"]

    @property
    def mask_token_id(self) -> int:
        """Id of [MASK]."""
        return self._vocab["[MASK]"]

    def encode(self, text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> EncodedText:
        """Word-piece ids of one cleaned report, no [CLS]/[SEP], cut to the first max_tokens."""
        _check_max_tokens(max_tokens)
        return _truncated(self._tok.encode(_clean(text, "text"), add_special_tokens=False).ids, max_tokens)

    def encode_batch(self, texts: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS) -> EncodedBatch:
        """Encode B reports (as ``encode``) and pack them; warns once, with the count, when
        any were truncated (ReportTruncationWarning)."""
        _check_max_tokens(max_tokens)
        cleaned = [_clean(text, f"texts[{i}]") for i, text in enumerate(_text_list(texts))]
        pieces = [_truncated(e.ids, max_tokens) for e in self._tok.encode_batch(cleaned, add_special_tokens=False)]
        n_truncated = sum(p.truncated for p in pieces)
        if n_truncated:
            warnings.warn(f"{n_truncated} of {len(pieces)} reports had more than {max_tokens} word pieces "
                          "and were truncated", ReportTruncationWarning, stacklevel=2)
        cu_seqlens = np.zeros(len(pieces) + 1, dtype=np.int32)
        np.cumsum([len(p.ids) for p in pieces], out=cu_seqlens[1:])
        ids = np.fromiter(chain.from_iterable(p.ids for p in pieces), dtype=np.int64, count=int(cu_seqlens[-1]))
        return EncodedBatch(ids=ids, cu_seqlens=cu_seqlens, n_truncated=n_truncated)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of word-piece ids: pieces joined, "##" continuations glued to their word."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"ReportTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _clean(text: str, name: str) -> str:
    """clean_report of ``text``; ValueError naming the field ``name`` when it is not a str."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}")
    text = _COMPARISON.sub("", text.lower())
    text = _CLAUSE_END_RE.sub(",", text)
    text = _COMMAS.sub(", ", _SPACES.sub(" ", text))
    return text.strip(" ,")


def _text_list(texts: Iterable[str]) -> list[str]:
    """texts as a list; ValueError when a single str was passed where many are expected."""
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of str, got one str")
    return list(texts)


def _check_max_tokens(max_tokens: int) -> None:
    """ValueError unless max_tokens is a positive int."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")


def _words(text: str) -> list[str]:
    """The words BERT's normaliser and pre-tokeniser make of ``text`` (lower-cased, punctuation split)."""
    normalized = _NORMALIZER.normalize_str(text)
    return [word for word, _ in _PRE_TOKENIZER.pre_tokenize_str(normalized)]


def _truncated(ids: list[int], max_tokens: int) -> EncodedText:
    """The first max_tokens of ids, with what was dropped."""
    n_dropped = max(len(ids) - max_tokens, 0)
    return EncodedText(ids=list(ids[:max_tokens]), truncated=n_dropped > 0, n_dropped=n_dropped)


_NORMALIZER = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
_PRE_TOKENIZER = pre_tokenizers.BertPreTokenizer()


def _pipeline(model: models.WordPiece) -> Tokenizer:
    """A Tokenizer around ``model`` with BERT-uncased normalising, pre-tokenising and decoding
    and no post-processor (so no [CLS]/[SEP] are added)."""
    tok = Tokenizer(model)
    tok.normalizer = _NORMALIZER
    tok.pre_tokenizer = _PRE_TOKENIZER
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _checked_vocab(vocab: Mapping[str, int], source: str) -> dict[str, int]:
    """vocab as a dict after checking it: not empty, ids exactly 0..V-1, special tokens present."""
    if not vocab:
        raise ValueError(f"{source}: the vocabulary is empty")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{source}: token ids must be 0..{len(vocab) - 1}, each used once")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{source}: the vocabulary lacks the special tokens {missing} "
                         f"(a BERT-style vocab.txt holds all of {list(SPECIAL_TOKENS)})")
    return dict(vocab)


def _vocab_file(path: str | Path) -> Path:
    """path itself, or path / vocab.txt when path is a folder."""
    path = Path(path)
    return path / VOCAB_FILE if path.is_dir() else path


def _read_vocab(file: Path) -> dict[str, int]:
    """token → line number (from 0) of a vocab.txt; ValueError naming the file and line for
    undecodable, empty or repeated lines."""
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: vocab file is not UTF-8 text ({err})") from None
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    vocab: dict[str, int] = {}
    for number, line in enumerate(lines):
        token = line.rstrip("\r")
        if not token:
            raise ValueError(f"{file}: line {number + 1} is empty; a vocab file holds one token per line")
        if token in vocab:
            raise ValueError(f"{file}: line {number + 1} repeats the token {token!r} of line {vocab[token] + 1}")
        vocab[token] = number
    return vocab
