"""What the pruning pipeline needs from a model, whatever library trained it.

Stages 4-7 (layer dump, correlation, coarse and fine search, GLP, oracle, decoding) see a model
only through :class:`PrunableModel`: a front end (``embed``: a batch -> the input of layer 1,
layer index 0), the encoder layers (``forward_layers`` on any sequence of them), a readout
(``readout``: final norm and CTC head -> log-probabilities), its tokenizer (``decode_ids``),
physical layer removal (``prune``) and saving in the model's own format (``save``). Batches
come from the model's own ``dataset``: a map from a lhotse CutSet to a dict with at least
``ids``, ``texts``, ``targets`` (B, U) padded token ids, ``target_lens`` and ``seconds`` (the
batch's audio duration), plus whatever inputs ``embed`` reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class Hidden:
    """The state between two encoder layers: ``x`` is what enters the next layer."""

    x: torch.Tensor  # (B, T, D)
    lengths: torch.Tensor  # (B,) valid frames
    context: Any = None  # what every layer takes besides x (masks, positions): model-specific


class PrunableModel(ABC):
    """A CTC speech recogniser whose encoder layers can be evaluated in any subset."""

    model_type: ClassVar[str]

    def __init__(self, source: Path):
        self.source = Path(source)  # the directory the model was loaded from
        self.device = torch.device("cpu")

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The underlying network (for eval mode, device moves and parameter counts)."""

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    def blank_id(self) -> int:
        return 0

    @abstractmethod
    def dataset(self) -> torch.utils.data.Dataset:
        """Maps one sampler batch (a CutSet) to a batch dict (see the module docstring)."""

    @abstractmethod
    def embed(self, batch: dict) -> Hidden:
        """The input of layer 1 (layer index 0) for a batch."""

    @abstractmethod
    def forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        """Run encoder ``layers`` (1-indexed, in the order given; default all) on ``h``."""

    @abstractmethod
    def readout(self, h: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities (B, T', V) of a layer's output and their lengths."""

    @abstractmethod
    def decode_ids(self, ids: Sequence[int]) -> str:
        """Text of CTC output ids (blanks and repeats already removed)."""

    @abstractmethod
    def prune(self, layers: Sequence[int]) -> PrunableModel:
        """A new model with encoder ``layers`` (1-indexed) physically removed."""

    @abstractmethod
    def save(self, out_dir: Path, info: dict | None = None) -> None:
        """Write the model to ``out_dir`` in its own library's format."""

    def to(self, device: str | torch.device) -> PrunableModel:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def log_probs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities of the whole model for a batch."""
        return self.readout(self.forward_layers(self.embed(batch)))
