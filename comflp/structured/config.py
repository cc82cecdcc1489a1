"""The ``structured`` section of a structured-pruning config (``conf/structured.yaml``).

A structured-pruning config has two sections: ``structured`` (:class:`StructuredConfig`: what
is gated, the target size, the multipliers, the distillation) and ``train``
(:class:`~comflp.asr.config.TrainConfig`: epochs, batches, learning rate, as for fine-tuning).
The model section is the baseline's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comflp.asr.config import ConfigError, ModelConfig, TrainConfig, build_section, read_sections
from comflp.structured.layout import GROUPS, Layout, encoder_layout, missing_groups


@dataclass
class StructuredConfig:
    """L0 structured pruning (Jiang et al. 2023) with CoFi's Lagrangian sparsity control."""

    target_sparsity: float = 0.5  # fraction of the encoder layers' parameters to remove
    gates: list[str] = field(default_factory=lambda: list(GROUPS))
    init_log_alpha: float = 3.0  # every gate starts open: P(z != 0) = 0.96
    gate_lr: float = 0.05  # Adam learning rate of the gates' log_alpha
    lambda_lr: float = 0.2  # gradient-ascent learning rate of the two multipliers
    warmup_fraction: float = 0.3  # share of the steps over which the target ramps up from 0
    distill_layers: list[int] = field(default_factory=list)  # empty: L/3, 2L/3, L
    distill_weight: float = 1.0

    def validate(self, model: ModelConfig, where: str = "structured") -> None:
        """Checked against a native model's encoder."""
        self.check(
            encoder_layout(model), model.num_layers, where, f"the {model.encoder_type} encoder"
        )

    def check(self, layout: Layout, num_layers: int, where: str, what: str) -> None:
        """Checked against the gates' ``layout`` (:mod:`.masked`) of ``what``, whose stacks
        have at most ``num_layers`` layers."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: '{key}' {why}")

        if not 0 < self.target_sparsity < 1:
            raise bad("target_sparsity", f"must be in (0, 1), got {self.target_sparsity}")
        unknown = sorted(set(self.gates) - set(GROUPS))
        if unknown or not self.gates:
            raise bad("gates", f"must name some of {', '.join(GROUPS)}, got {self.gates}")
        lacking = missing_groups(layout, self.gates)
        if lacking:
            raise bad(
                "gates",
                f"{', '.join(lacking)}: {what} has no such module "
                "(channels are the Conformer's convolution channels)",
            )
        if not 0 <= self.warmup_fraction <= 1:
            raise bad("warmup_fraction", f"must be in [0, 1], got {self.warmup_fraction}")
        for key in ("gate_lr", "lambda_lr"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.distill_weight < 0:
            raise bad("distill_weight", f"must be >= 0, got {self.distill_weight}")
        outside = [k for k in self.distill_layers if not 1 <= k <= num_layers]
        if outside:
            raise bad("distill_layers", f"{outside} outside the layers 1..{num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_structured_config(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[StructuredConfig, TrainConfig]:
    """Read ``path``; ``overrides`` maps ``"structured.key"`` / ``"train.key"`` to a value.
    The structured section is validated against the model later (:meth:`validate`)."""
    data = read_sections(path, ("structured", "train"), overrides)
    sp = build_section(StructuredConfig, data.get("structured"), f"{path}: structured")
    train = build_section(TrainConfig, data.get("train"), f"{path}: train")
    train.validate(f"{path}: train")
    return sp, train
