"""Model configuration: one dataclass, named presets (docs/design.md, "Model layout")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and pretraining-decoder sizes.

    dim: token width d; depth: encoder layers; heads x dim_head: attention width;
    mlp_dim: hidden width of each MLP; vocab_size: text token ids (BERT-base-uncased: 30522);
    max_text_tokens: text positions (64); n_positions: patches per channel (100 = 10 s at
    250 Hz in 25-sample patches); decoder_*: the light MAE decoder used only in pretraining.
    decoder_same_time_mean: each masked patch token enters the decoder with the mean of its
    record's kept tokens at the same time position (the other channels) added, so the decoder
    starts with the concurrent leads in hand instead of having to learn to find them by
    position (off in the published recipe; the demo preset turns it on to learn in minutes).
    """

    dim: int = 768
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 1024
    dim_head: int = 64
    dropout: float = 0.1
    vocab_size: int = 30522
    max_text_tokens: int = 64
    n_channel_types: int = 13
    n_positions: int = 100
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 512
    decoder_same_time_mean: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "decoder_same_time_mean":
                if not isinstance(value, bool):
                    raise ValueError(f"ModelConfig.decoder_same_time_mean must be a bool, got {value!r}")
            elif f.name == "dropout":
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {value}")
            elif not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{f.name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # Published sizes: Tiny 42.5 M, Base 108.6 M, Large 266.5 M encoder parameters.
    "tiny": ModelConfig(dim=768, depth=6, heads=8, mlp_dim=1024),
    "base": ModelConfig(dim=768, depth=12, heads=12, mlp_dim=3072, decoder_dim=512, decoder_depth=4,
                        decoder_heads=8, decoder_mlp_dim=1024),
    "large": ModelConfig(dim=1024, depth=16, heads=24, mlp_dim=4096, decoder_dim=512, decoder_depth=4,
                         decoder_heads=8, decoder_mlp_dim=1024),
    # Small enough to pretrain on 2 CPU cores in minutes; its vocabulary comes from the demo reports.
    # No dropout: MAE-style pretraining needs none, and attention dropout is the slow CPU path.
    # Same-time mean in the decoder: a plain MAE decoder sits at "predict zero" (MSE 1.0) for
    # the whole demo run, because its attention has not yet learned to find the concurrent leads.
    "demo": ModelConfig(dim=128, depth=3, heads=4, mlp_dim=256, dim_head=32, vocab_size=2048, dropout=0.0,
                        decoder_dim=96, decoder_depth=1, decoder_heads=3, decoder_mlp_dim=192,
                        decoder_same_time_mean=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
