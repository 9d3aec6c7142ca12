"""Record -> model input: resample to 250 Hz, band-pass, z-score, cut 10 s windows (docs/design.md).

``preprocess_signal`` runs the numba kernels of ``csfm_kernels.signal`` on a whole record,
in one compiled call (``csfm_kernels.signal.chain``, planned once per rate, channel types
and config): resample every channel to ``target_fs``, band-pass ECG and PPG channels each
in its own band (zero-phase), z-score each channel, replace the NaN left by gaps with 0 and
return where samples are valid (the last two in one pass). ``make_windows`` cuts fixed windows
with explicit validity; ``preprocess_record`` does both for a ``Record``. ``RecordCheck``
is the one rule for what of a record the model can use (channels with no valid sample are
left out; a record without a window of enough valid samples is unusable), shared by
``csfm.evaluation.embedding`` and pretraining.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Sequence

import numpy as np

from csfm.data.record import PPG_TYPE, Record
from csfm_kernels.signal import check_signal
from csfm_kernels.signal.chain import ChainPlan, chain_plan, run_chain
from csfm_kernels.signal.resample import check_rate

MODALITIES = ("both", "ecg", "ppg")
"""Channel sets a record can be reduced to: all channels, the ECG leads, or the PPG."""

_RESAMPLE_BAND_FACTOR = 1.5
"""The resampler keeps frequencies up to this x the highest band-pass edge in use (above
that, its shorter kernel's transition band; the band-pass attenuates what lands there)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How records become model input; the defaults are the reference model's."""

    target_fs: float = 250.0
    """Sampling rate of the model input, in Hz."""
    window: int = 2500
    """Window length in samples at target_fs (2500 = 10 s at 250 Hz, 100 patches of 25)."""
    ecg_band: tuple[float, float] = (0.5, 40.0)
    """Pass band of ECG channels (types 0..11), (low, high) -3 dB edges in Hz."""
    ppg_band: tuple[float, float] = (0.5, 8.0)
    """Pass band of PPG channels (type 12), (low, high) -3 dB edges in Hz."""
    filter_order: int = 2
    """Butterworth order per band edge (the band-pass has 2 x order poles), run forward and backward."""
    std_floor: float = 1e-3
    """Smallest standard deviation the z-score divides by, in the channel's own units after
    band-pass (e.g. 1e-3 mV): a flat or near-flat channel becomes zeros, not amplified noise."""
    min_valid_fraction: float = 0.5
    """A window is kept only if at least this fraction of its samples (all channels
    together) is valid; the others are dropped and counted in ``Windows.n_dropped``."""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.target_fs) and self.target_fs > 0):
            raise ValueError(f"PreprocessConfig.target_fs must be a positive number of Hz, got {self.target_fs!r}")
        if not isinstance(self.window, (int, np.integer)) or self.window <= 0:
            raise ValueError(f"PreprocessConfig.window must be a positive number of samples, got {self.window!r}")
        for name in ("ecg_band", "ppg_band"):
            low, high = getattr(self, name)
            if not 0 < low < high < self.target_fs / 2:
                raise ValueError(f"PreprocessConfig.{name} must satisfy 0 < low < high < target_fs / 2 "
                                 f"= {self.target_fs / 2:g} Hz, got {getattr(self, name)!r}")
        if not isinstance(self.filter_order, (int, np.integer)) or self.filter_order < 1:
            raise ValueError(f"PreprocessConfig.filter_order must be a positive int, got {self.filter_order!r}")
        if not (np.isfinite(self.std_floor) and self.std_floor > 0):
            raise ValueError(f"PreprocessConfig.std_floor must be positive, got {self.std_floor!r}")
        if not 0.0 <= self.min_valid_fraction <= 1.0:
            raise ValueError(f"PreprocessConfig.min_valid_fraction must lie in [0, 1], got {self.min_valid_fraction!r}")

    def __hash__(self) -> int:
        return self._fields_hash

    @cached_property
    def _fields_hash(self) -> int:
        """The hash of the fields, made once: ``preprocess_signal`` looks its plan up by the
        config at every call."""
        return hash(astuple(self))


@dataclass
class Windows:
    """Fixed-length windows of one preprocessed record.

    x: [W, C, window] float32, z-scored samples at target_fs, 0 where not valid.
    valid: [W, C, window] bool, False at gaps and at the zero padding of a last partial window.
    start_s: [W] float64, start of each window in seconds from the start of the record.
    n_dropped: windows left out because fewer than min_valid_fraction of their samples were valid.
    """

    x: np.ndarray
    valid: np.ndarray
    start_s: np.ndarray
    n_dropped: int = 0

    @classmethod
    def none(cls, config: "PreprocessConfig") -> "Windows":
        """No window (of no channel): x, valid [0, 0, window]."""
        empty = np.zeros((0, 0, config.window), np.float32)
        return cls(empty, empty.astype(bool), np.zeros(0))


def preprocess_signal(signal: np.ndarray, fs: float, channel_types: Sequence[int],
                      config: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample -> band-pass by channel type -> z-score, gaps zero-filled.

    signal: [C, T] real array at fs Hz, NaN where samples are missing. channel_types: [C]
    ints in 0..12 (0..11 ECG leads, 12 PPG).
    Returns (x [C, T'] float32, valid [C, T'] bool) at config.target_fs, T' = round(T *
    target_fs / fs): x is z-scored and 0 wherever valid is False. Every step treats each
    channel on its own, so windows of one rate and length can be stacked as channels and done
    in one call (several times faster per window than one call each: the band-pass then runs
    four channels interleaved, and the call's fixed cost is shared). A sample is invalid when
    its resampling support touches a gap, or it lies in a finite stretch too short to
    band-pass (see ``csfm_kernels.signal.bandpass``).
    The resampler only keeps frequencies up to 1.5 x the highest band-pass edge in use
    (``band_hz`` of ``csfm_kernels.signal.resample``: a shorter kernel). After the band-pass
    the result stays within 1e-4 of the signal's range of scipy's FFT resampling +
    sosfiltfilt on PTB (1000 Hz) and MIT-BIH (360 Hz) records, within 3e-4 on MIMIC II
    ECG at 125 Hz (where 60 Hz exceeds 0.8 x the input's Nyquist, so the default kernel
    runs and the 50-62.5 Hz content it rolls off still passes the band-pass's edge), away
    from the records' ends.
    """
    config = config or PreprocessConfig()
    signal = check_signal(signal, "signal")
    if not isinstance(fs, (int, float, np.number)):  # e.g. a 0-d array; the plan checks numbers
        fs = check_rate(fs, "fs")
    plan, band_of_row = _chain_for(fs, _types_key(channel_types), config)
    if band_of_row.shape[0] != signal.shape[0]:
        raise ValueError(f"channel_types has {band_of_row.shape[0]} entries for {signal.shape[0]} channels")
    return run_chain(signal, plan, band_of_row, config.std_floor)


def make_windows(x: np.ndarray, valid: np.ndarray, config: PreprocessConfig | None = None,
                 stride: int | None = None, pad_last: bool = True) -> Windows:
    """Cuts [C, T] samples at config.target_fs into windows of config.window samples.

    Windows start at 0, stride, 2 stride, ... (stride in samples, default: the window, so
    no overlap). With pad_last, samples after the last full window get one more window,
    zero-padded with valid = False past the end (a record shorter than a window gives one
    such window). Windows whose valid fraction is below config.min_valid_fraction are
    dropped and counted.
    """
    config = config or PreprocessConfig()
    x, valid = np.asarray(x), np.asarray(valid)
    if x.ndim != 2 or valid.shape != x.shape or valid.dtype != np.bool_:
        raise ValueError(f"x must be [C, T] and valid a bool array of the same shape, got x {x.shape} "
                         f"and valid {valid.shape} {valid.dtype}")
    stride = config.window if stride is None else stride
    if not isinstance(stride, (int, np.integer)) or stride <= 0:
        raise ValueError(f"stride must be a positive number of samples, got {stride!r}")
    starts = _window_starts(x.shape[1], config.window, int(stride), pad_last)
    xw, vw = _cut(x.astype(np.float32, copy=False), starts, config.window), _cut(valid, starts, config.window)
    keep = vw.mean(axis=(1, 2)) >= config.min_valid_fraction
    return Windows(xw[keep], vw[keep], starts[keep] / config.target_fs, int((~keep).sum()))


def preprocess_record(record: Record, config: PreprocessConfig | None = None) -> Windows:
    """``record`` (signal [C, T] at record.fs, channel_types [C]) -> its windows at config.target_fs."""
    config = config or PreprocessConfig()
    x, valid = preprocess_signal(record.signal, record.fs, record.channel_types, config)
    return make_windows(x, valid, config)


def select_channels(channel_types: Sequence[int], modality: str) -> list[int]:
    """Indices of the channels of ``modality`` ("both", "ecg" or "ppg") among channel_types [C]."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return [i for i, t in enumerate(channel_types)
            if modality == "both" or (modality == "ppg") == (int(t) == PPG_TYPE)]


def keep_channels(record: Record, channels: Sequence[int]) -> Record:
    """``record`` reduced to the channels at indices ``channels`` (in that order)."""
    rows = list(channels)
    return replace(record, signal=record.signal[rows], channel_names=[record.channel_names[c] for c in rows],
                   units=[record.units[c] for c in rows], channel_types=[record.channel_types[c] for c in rows],
                   modalities=[record.modalities[c] for c in rows])


@dataclass
class RecordCheck:
    """What the model can use of one record, gathered while the record (whole, or part by
    part) is preprocessed: the rule ``csfm.evaluation.embedding`` and pretraining share.

    Of the record's channels of ``modality``, those without a single valid (finite) sample
    are left out before preprocessing: encoded they would be a flat zero signal, and they
    would count against every window's valid fraction. The others are preprocessed and cut
    into windows; those with fewer than ``config.min_valid_fraction`` valid samples are
    dropped (``make_windows``). A record is usable when it gives at least one window;
    ``problem`` says why not. Channels are told apart by name in the report.
    """

    config: PreprocessConfig = field(default_factory=PreprocessConfig)
    modality: str = "both"
    n_windows: int = 0
    seconds: float = 0.0
    """Seconds of the record looked at so far."""
    valid_seconds: float = 0.0
    """Of those, seconds (at config.target_fs) where some used channel has a valid sample."""
    channels: dict[str, bool] = field(default_factory=dict)
    """Every channel of the modality seen, by name -> whether it had a valid sample."""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")

    def usable_channels(self, part: Record) -> list[int]:
        """Indices of ``part``'s channels of the modality with at least one valid sample
        (every channel of the modality is noted, for ``empty_channels`` and ``problem``)."""
        used = []
        for c in select_channels(part.channel_types, self.modality):
            valid = bool(np.isfinite(part.signal[c]).any())
            name = part.channel_names[c]
            self.channels[name] = self.channels.get(name, False) or valid
            if valid:
                used.append(c)
        return used

    def span(self, part: Record, skip_s: float = 0.0,
             span_s: float | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(x, valid [C', T'] of the span of ``part``'s usable channels preprocessed, at
        config.target_fs; indices of those channels in ``part``); x and valid are [0, 0] when
        no channel is usable.

        part: the whole record, or a stretch of it read with ``skip_s`` seconds before the
        span of interest of ``span_s`` seconds (None: to the end of ``part``), so that the
        filters settle before the span. The channels are preprocessed together
        (``preprocess_signal``: z-scored over the whole of ``part``).
        """
        config = self.config
        first = int(round(skip_s * config.target_fs))
        length = int(round(part.signal.shape[1] * config.target_fs / part.fs))
        last = length if span_s is None else min(length, first + int(round(span_s * config.target_fs)))
        self.seconds += max(0, last - first) / config.target_fs
        used = self.usable_channels(part)
        if not used:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), bool), used
        x, valid = preprocess_signal(part.signal[used], part.fs, [part.channel_types[c] for c in used], config)
        x, valid = x[:, first:last], valid[:, first:last]
        self.valid_seconds += int(valid.any(axis=0).sum()) / config.target_fs
        return x, valid, used

    def windows(self, part: Record, skip_s: float = 0.0, span_s: float | None = None,
                stride: int | None = None) -> tuple[Windows, list[int]]:
        """(windows of ``part``'s usable channels, indices of those channels in ``part``): the
        ``span`` cut into windows, their start_s counted from the span's start. stride: samples
        between window starts (``make_windows``; default the window, no overlap).
        """
        x, valid, used = self.span(part, skip_s, span_s)
        if not used:
            return Windows.none(self.config), used
        windows = make_windows(x, valid, self.config, stride=stride)
        self.n_windows += len(windows.x)
        return windows, used

    @property
    def empty_channels(self) -> list[str]:
        """Names of the channels of the modality left out for having no valid sample."""
        return [name for name, valid in self.channels.items() if not valid]

    @property
    def problem(self) -> str:
        """Why the model can use nothing of the record ("" when some window is usable)."""
        if self.n_windows:
            return ""
        kind = {"both": "", "ecg": "ECG ", "ppg": "PPG "}[self.modality]
        if not self.channels:
            return f"no {kind}channel"
        if not any(self.channels.values()):
            return f"no valid sample in its {kind}channel(s) {', '.join(self.channels)}"
        return (f"no {self.config.window / self.config.target_fs:g} s window with at least "
                f"{self.config.min_valid_fraction:.0%} valid samples ({self.valid_seconds:.1f} s of valid "
                f"signal in {self.seconds:.1f} s)")


def _types_key(channel_types: Sequence[int]) -> tuple[int, ...]:
    """channel_types [C] as a tuple of Python ints (a cache key); ValueError unless a 1-D
    sequence of integers."""
    if isinstance(channel_types, (list, tuple)) and all(type(t) is int for t in channel_types):
        return tuple(channel_types)
    types = np.asarray(channel_types)
    if types.ndim != 1 or (types.size and types.dtype.kind not in "iu"):
        raise ValueError(f"channel_types must be a list of ints, got {channel_types!r}")
    return tuple(types.tolist())


@lru_cache(maxsize=256)
def _chain_for(fs: float, types: tuple[int, ...], config: PreprocessConfig) -> tuple[ChainPlan, np.ndarray]:
    """(plan, band_of_row [C] int64) of preprocessing channels of these types at fs Hz:
    band 0 (ecg_band) for ECG channels, band 1 (ppg_band) for PPG; ValueError for a rate
    that is not a positive number or a type outside 0..PPG_TYPE."""
    fs = check_rate(fs, "fs")
    if types and not 0 <= min(types) <= max(types) <= PPG_TYPE:
        raise ValueError(f"channel_types must lie in 0..{PPG_TYPE}, got {list(types)}")
    is_ppg = np.array(types, np.int64) == PPG_TYPE
    plan = chain_plan(fs, config.target_fs, (config.ecg_band, config.ppg_band), config.filter_order,
                      _resample_band_hz(is_ppg, config))
    return plan, is_ppg.astype(np.int64)


def _resample_band_hz(is_ppg: np.ndarray, config: PreprocessConfig) -> float:
    """Highest frequency (Hz) the resampler must keep for channels where is_ppg [C] (bool)
    tells PPG from ECG: _RESAMPLE_BAND_FACTOR x the highest band-pass edge among them."""
    edges = [band[1] for band, rows in ((config.ecg_band, ~is_ppg), (config.ppg_band, is_ppg)) if rows.any()]
    return _RESAMPLE_BAND_FACTOR * max(edges, default=config.ecg_band[1])


def _window_starts(n_samples: int, window: int, stride: int, pad_last: bool) -> np.ndarray:
    """[W] int64 start samples: every full window, plus one partial window when pad_last
    and samples after the last full window remain."""
    n_full = (n_samples - window) // stride + 1 if n_samples >= window else 0
    starts = np.arange(n_full, dtype=np.int64) * stride
    covered = int(starts[-1]) + window if n_full else 0
    if pad_last and max(covered, n_full * stride) < n_samples:
        starts = np.append(starts, n_full * stride)
    return starts


def _cut(a: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """a [C, T] -> [W, C, window] copies of a[:, s:s + window], zero (False) past the end."""
    if len(starts) == 0:
        return np.zeros((0, a.shape[0], window), a.dtype)
    padded = np.zeros((a.shape[0], max(int(starts[-1]) + window, a.shape[1])), a.dtype)
    padded[:, :a.shape[1]] = a
    views = np.lib.stride_tricks.sliding_window_view(padded, window, axis=1)  # [C, T', window]
    return np.ascontiguousarray(views[:, starts].transpose(1, 0, 2))
