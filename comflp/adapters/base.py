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

from comflp.asr.ctc import ctc_greedy_search, ctc_loss, ctc_prefix_beam_search
from comflp.registry import Registry
from comflp.settings import REQUIRED, option
from comflp.utils import eval_mode, resolve_device

# Model types by the name ``--model_type`` takes; each adapter module of this package registers
# its class (docs/DESIGN.md, "Adding a model type").
MODEL_TYPES: Registry[type[PrunableModel]] = Registry("model type", "comflp.adapters")
CTC_DECODING = ("ctc_greedy_search", "ctc_prefix_beam_search")


@dataclass
class Hidden:
    """The state between two encoder layers: ``x`` is what enters the next layer."""

    x: torch.Tensor  # (B, T, D)
    lengths: torch.Tensor  # (B,) valid frames
    context: Any = None  # what every layer takes besides x (masks, positions): model-specific


class PrunableModel(ABC):
    """A speech recogniser whose encoder layers can be evaluated in any subset."""

    model_type: ClassVar[str]
    # What decode() can do with this model (stage 7's --decoding_method).
    decoding_methods: ClassVar[tuple[str, ...]] = CTC_DECODING
    # The layer stacks stages 4-8 can prune (--stack).
    stacks: ClassVar[tuple[str, ...]] = ("encoder",)

    def __init__(self, source: Path):
        self.source = Path(source)  # the directory the model was loaded from
        self.device = torch.device("cpu")

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path) -> PrunableModel:
        """The model saved in ``model_dir``; ConfigError (a ValueError) says what is wrong."""

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

    @property
    def interctc_layers(self) -> tuple[int, ...]:
        """Layers trained to be read out by the CTC head (intermediate CTC); empty if none."""
        return ()

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

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Fine-tuning loss of a batch (stage 8) and its parts for logging: CTC of the whole
        model, summed over the utterances and divided by their number, as stage 3's loss.
        Models with a decoder train it too (their own override)."""
        log_probs, lengths = self.log_probs(batch)
        loss = ctc_loss(
            log_probs, lengths, batch["targets"], batch["target_lens"], self.blank_id
        ) / len(batch["ids"])
        return loss, {"loss": loss.item()}

    def transcribe(self, h: Hidden, batch: dict) -> tuple[list[list[int]], float]:
        """Greedy hypotheses (token ids) and the summed task loss (CTC) of a batch, from the
        last kept encoder layer's output ``h``: what every metric search scores."""
        log_probs, lengths = self.readout(h)
        loss = ctc_loss(log_probs, lengths, batch["targets"], batch["target_lens"], self.blank_id)
        return ctc_greedy_search(log_probs, lengths, self.blank_id), loss.item()

    def check_decoding(self, method: str, beam_size: int, ctc_weight: float) -> None:
        """ValueError for options :meth:`decode` cannot use with this model."""
        if method not in self.decoding_methods:
            raise ValueError(
                f"decoding method {method!r} is not available for a {self.model_type} model "
                f"{self.source}; choose one of {', '.join(self.decoding_methods)}"
            )
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if not 0 <= ctc_weight <= 1:
            raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")

    @torch.no_grad()
    def decode(
        self,
        batch: dict,
        method: str = "ctc_greedy_search",
        beam_size: int = 10,
        ctc_weight: float = 0.3,
    ) -> list[list[int]]:
        """Token ids per utterance of a batch, the encoder run once, in eval mode (restored
        after). ``ctc_prefix_beam_search`` prunes each frame's tokens to the top ``beam_size``;
        models with a decoder add methods of their own (``decoding_methods``)."""
        self.check_decoding(method, beam_size, ctc_weight)
        with eval_mode(self.module):
            log_probs, lengths = self.log_probs(batch)
            if method == "ctc_greedy_search":
                return ctc_greedy_search(log_probs, lengths, self.blank_id)
            return [
                ctc_prefix_beam_search(log_probs[i, :n], beam_size, beam_size, self.blank_id)[0][0]
                for i, n in enumerate(lengths.tolist())
            ]


def load_prunable(model_type: str, model_dir: Path) -> PrunableModel:
    """Load the model in ``model_dir`` as a :class:`PrunableModel` of ``model_type``."""
    return MODEL_TYPES[model_type].load(Path(model_dir))


@dataclass(kw_only=True)
class ModelSettings:
    """The model a stage works on, and where its outputs go."""

    exp_dir: Path = option(REQUIRED, "experiment directory: every stage's outputs")
    model_type: str = option("native", "library of the model", choices=lambda: MODEL_TYPES.names())
    model_dir: Path | None = option(None, "the model to prune (default: --exp_dir, a native model)")
    stack: str = option("encoder", "the layer stack to prune", choices=("encoder", "decoder"))
    device: str = option("auto", "auto | cpu | cuda[:N]")

    @property
    def source(self) -> Path:
        return self.model_dir or self.exp_dir

    def load_model(self) -> PrunableModel:
        """The model, on ``device``."""
        return load_prunable(self.model_type, self.source).to(resolve_device(self.device))
