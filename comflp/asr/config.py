"""Typed configuration for the model and its training, read from and written to YAML.

A config file has two sections, ``model`` and ``train``; every key must be a field of
:class:`ModelConfig` or :class:`TrainConfig`. Unknown keys and impossible values raise
:class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comflp.errors import InputError
from comflp.utils import atomic_write_text


class ConfigError(InputError):
    """A configuration file or option that cannot be used."""


@dataclass
class ModelConfig:
    """Architecture of the Transformer or Conformer CTC (+ optional attention decoder) model."""

    input_dim: int = 80
    vocab_size: int = 0  # filled in from the tokenizer by stage 3
    d_model: int = 144
    num_heads: int = 4
    ffn_dim: int = 576
    num_layers: int = 12
    dropout: float = 0.1
    subsampling_channels: int = 64
    interctc_layers: list[int] = field(default_factory=list)
    interctc_weight: float = 0.0
    stochastic_depth_rate: float | list[float] = 0.0
    # CTC output frames per encoder frame: the CTC head maps each encoder frame to this many
    # label distributions, so dense labels (characters of fast speech) fit the x4 frame rate.
    ctc_upsample: int = 1
    decoder_layers: int = 0  # 0: CTC only
    ctc_weight: float = 1.0  # weight of the CTC loss when a decoder is present
    lsm_weight: float = 0.1  # label smoothing of the attention decoder
    # Provenance of a pruned model: the original layer numbers it kept (1-indexed), of the
    # encoder and of the decoder.
    kept_layers: list[int] | None = None
    decoder_kept_layers: list[int] | None = None
    encoder_type: str = "transformer"  # transformer | conformer
    conv_kernel: int = 15  # depthwise convolution kernel of the Conformer (odd, >= 3)
    # Per-layer module sizes of a structurally pruned encoder, one mapping per layer (see
    # LAYER_SHAPE_KEYS); 0 removes that module. None: every layer has the uniform shape.
    layer_shapes: list[dict] | None = None

    def layer_shape(self, k: int) -> dict[str, int]:
        """Module sizes of encoder layer ``k`` (1-indexed): attention heads (of
        d_model // num_heads dimensions each), feed-forward units and, for the Conformer,
        convolution channels."""
        if not 1 <= k <= self.num_layers:
            raise IndexError(f"layer {k} is outside 1..{self.num_layers}")
        if self.layer_shapes is not None:
            return dict(self.layer_shapes[k - 1])
        if self.encoder_type == "conformer":
            return {
                "heads": self.num_heads,
                "ffn1": self.ffn_dim,
                "ffn2": self.ffn_dim,
                "conv": self.d_model,
            }
        return {"heads": self.num_heads, "ffn": self.ffn_dim}

    def layer_drop_rates(self) -> list[float]:
        """Per-layer stochastic depth probabilities p_1..p_L."""
        rate = self.stochastic_depth_rate
        if isinstance(rate, list):
            return [float(r) for r in rate]
        return [float(rate) * layer / self.num_layers for layer in range(1, self.num_layers + 1)]

    def validate(self, where: str = "model") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: '{key}' {why}")

        for key in ("input_dim", "d_model", "num_heads", "ffn_dim", "num_layers"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.num_heads:
            raise bad(
                "d_model", f"({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0 <= self.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.input_dim < 7:
            raise bad("input_dim", "must be >= 7 for the x4 convolutional subsampling")
        for k in self.interctc_layers:
            if not isinstance(k, int) or not 1 <= k < self.num_layers:
                raise bad(
                    "interctc_layers",
                    f"entries must be layer numbers in 1..{self.num_layers - 1} "
                    f"(num_layers={self.num_layers}), got {k}",
                )
        if not 0 <= self.interctc_weight < 1:
            raise bad("interctc_weight", f"must be in [0, 1), got {self.interctc_weight}")
        if self.interctc_weight > 0 and not self.interctc_layers:
            raise bad("interctc_weight", "is > 0 but interctc_layers is empty")
        rate = self.stochastic_depth_rate
        if isinstance(rate, list) and len(rate) != self.num_layers:
            raise bad(
                "stochastic_depth_rate",
                f"as a list needs one rate per layer ({self.num_layers}), got {len(rate)}",
            )
        for p in self.layer_drop_rates():
            if not 0 <= p < 1:
                raise bad("stochastic_depth_rate", f"rates must be in [0, 1), got {p}")
        if not isinstance(self.ctc_upsample, int) or self.ctc_upsample < 1:
            raise bad("ctc_upsample", f"must be an integer >= 1, got {self.ctc_upsample}")
        if self.decoder_layers < 0:
            raise bad("decoder_layers", f"must be >= 0, got {self.decoder_layers}")
        if not 0 <= self.ctc_weight <= 1:
            raise bad("ctc_weight", f"must be in [0, 1], got {self.ctc_weight}")
        if self.decoder_layers == 0 and self.ctc_weight != 1.0:
            raise bad("ctc_weight", "must be 1.0 for a CTC-only model (decoder_layers: 0)")
        if self.decoder_layers > 0 and self.ctc_weight == 1.0:
            raise bad("ctc_weight", "is 1.0, so the attention decoder would never be trained")
        if self.kept_layers is not None and len(self.kept_layers) != self.num_layers:
            raise bad("kept_layers", f"must list {self.num_layers} layers")
        if self.decoder_kept_layers is not None and (
            len(self.decoder_kept_layers) != self.decoder_layers
        ):
            raise bad("decoder_kept_layers", f"must list {self.decoder_layers} layers")
        if self.encoder_type not in LAYER_SHAPE_KEYS:
            raise bad(
                "encoder_type",
                f"must be one of {', '.join(map(repr, LAYER_SHAPE_KEYS))}, got {self.encoder_type!r}",
            )
        kernel = self.conv_kernel
        if not _is_int(kernel) or kernel < 3 or kernel % 2 == 0:
            raise bad("conv_kernel", f"must be an odd integer >= 3, got {kernel!r}")
        self._validate_layer_shapes(bad)

    def _validate_layer_shapes(self, bad) -> None:
        shapes = self.layer_shapes
        if shapes is None:
            return
        if not isinstance(shapes, list) or len(shapes) != self.num_layers:
            got = len(shapes) if isinstance(shapes, list) else repr(shapes)
            raise bad(
                "layer_shapes",
                f"needs one shape per layer (num_layers={self.num_layers}), got {got}",
            )
        expected = LAYER_SHAPE_KEYS[self.encoder_type]
        for k, shape in enumerate(shapes, start=1):
            if not isinstance(shape, dict) or set(shape) != set(expected):
                got = ", ".join(map(str, shape)) if isinstance(shape, dict) else repr(shape)
                raise bad(
                    "layer_shapes",
                    f"layer {k}: a {self.encoder_type} layer needs exactly the keys "
                    f"{', '.join(expected)}, got {got or 'none'}",
                )
            for name, value in shape.items():
                if not _is_int(value) or value < 0:
                    raise bad(
                        "layer_shapes",
                        f"layer {k}: '{name}' must be an integer >= 0, got {value!r}",
                    )


# The entries of a ``layer_shapes`` mapping, per encoder type.
LAYER_SHAPE_KEYS = {
    "transformer": ("heads", "ffn"),
    "conformer": ("heads", "ffn1", "ffn2", "conv"),
}


@dataclass
class TrainConfig:
    """Optimisation, batching, augmentation and checkpointing of stage 3 (and 8)."""

    num_epochs: int = 10
    max_duration: float = 100.0  # seconds of audio per optimiser step, over all DDP processes
    num_buckets: int = 10
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 500
    lr_schedule: str = (
        "noam"  # after warm-up: noam (inverse square root) | cosine (to min_lr at the end)
    )
    min_lr: float = 1e-5  # floor of the decay after warm-up
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    spec_augment: bool = True
    num_frame_masks: int = 2
    frames_mask_size: int = 40
    num_feature_masks: int = 2
    features_mask_size: int = 15
    time_warp_factor: int = 0
    average_checkpoints: int = 5
    average_by: str = "last"  # last | best (lowest dev loss)
    save_every_n_steps: int = 0  # 0: only at the end of each epoch
    keep_last_n: int = 0  # 0: keep every epoch checkpoint
    num_workers: int = 1
    seed: int = 42
    max_utterance_duration: float = 20.0

    def validate(self, where: str = "train") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: '{key}' {why}")

        if self.num_epochs < 1:
            raise bad("num_epochs", f"must be >= 1, got {self.num_epochs}")
        if self.max_duration <= 0:
            raise bad("max_duration", f"must be > 0, got {self.max_duration}")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in ("noam", "cosine"):
            raise bad("lr_schedule", f"must be 'noam' or 'cosine', got {self.lr_schedule!r}")
        if self.average_by not in ("last", "best"):
            raise bad("average_by", f"must be 'last' or 'best', got {self.average_by!r}")
        if self.average_checkpoints < 1:
            raise bad("average_checkpoints", f"must be >= 1, got {self.average_checkpoints}")
        if self.num_workers < 0:
            raise bad("num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, where: str = "config") -> None:
        self.model.validate(f"{where}: model")
        self.train.validate(f"{where}: train")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Field type (as written in the dataclasses above) -> check of a YAML value.
_TYPE_CHECKS = {
    "int": _is_int,
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list[int]": lambda v: isinstance(v, list) and all(map(_is_int, v)),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int] | None": lambda v: v is None or (isinstance(v, list) and all(map(_is_int, v))),
    "list[dict] | None": lambda v: (
        v is None or (isinstance(v, list) and all(isinstance(d, dict) for d in v))
    ),
    "float | list[float]": lambda v: (
        _is_number(v) or (isinstance(v, list) and all(map(_is_number, v)))
    ),
}


def build_section(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """One config section as the dataclass ``cls``, each value type-checked."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(names))}"
        )
    obj = cls(**values)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if not _TYPE_CHECKS[f.type](value):
            raise ConfigError(f"{where}: '{f.name}' must be {f.type}, got {value!r}")
        if f.type == "float":
            setattr(obj, f.name, float(value))
    return obj


def config_from_dict(data: dict[str, Any], where: str = "config") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a ``{model:, train:}`` mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'model' and 'train' sections")
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {', '.join(unknown)}; expected 'model' and 'train'"
        )
    cfg = ExperimentConfig(
        model=build_section(ModelConfig, data.get("model"), f"{where}: model"),
        train=build_section(TrainConfig, data.get("train"), f"{where}: train"),
    )
    cfg.validate(where)
    return cfg


def read_sections(
    path: str | Path, sections: tuple[str, ...], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A YAML config file as a mapping of ``sections``; ``overrides`` maps ``"section.key"``
    to a value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    expected = " and ".join(f"'{s}'" for s in sections)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with {expected} sections")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; expected {expected}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or not key:
            keys = " or ".join(f"{s}.KEY" for s in sections)
            raise ConfigError(f"override '{dotted}': expected {keys}")
        data.setdefault(section, {})[key] = value
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config; ``overrides`` maps ``"section.key"`` to a value."""
    return config_from_dict(read_sections(path, ("model", "train"), overrides), str(path))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
