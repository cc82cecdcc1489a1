"""What the pruning pipeline needs from a model, whatever library trained it.

Stages 4-7 (layer dump, correlation, coarse and fine search, GLP, oracle, decoding) see a model
only through :class:`PrunableModel`: a front end (``embed``: a batch -> the input of layer 1,
layer index 0), the encoder layers (``forward_layers`` on any sequence of them), a readout
(``readout``: final norm and CTC head -> log-probabilities), its tokenizer (``decode_ids``),
physical layer removal (``prune``) and saving in the model's own format (``save``). Batches
come from the model's own ``dataset``: a map from a lhotse CutSet to a dict with at least
``ids``, ``texts``, ``targets`` (B, U) padded token ids, ``target_lens`` and ``seconds`` (the
batch's audio duration), plus whatever inputs ``embed`` reads.

An encoder-decoder model is a :class:`DecoderModel`: it adds the decoder stack (``stacks``
lists ``decoder``), teacher forcing, batched greedy autoregressive decoding with any subset of
its decoder layers, and ``attention_greedy_search`` among its decoding methods.
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
ATTENTION_DECODING = "attention_greedy_search"
IGNORE = -100  # a teacher-forced position that predicts nothing (a prompt token, padding)
DECODE_BEAM_SIZE = 10  # beam of the beam searches (stage 7's --decode_beam_size)
CTC_WEIGHT = 0.3  # attention rescoring's CTC score weight (--ctc_weight)


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
    # ModelSettings fields that ``load`` takes as keyword arguments (e.g. ct2_quantization).
    load_options: ClassVar[tuple[str, ...]] = ()
    # Classes ``load`` may return besides this one (hf: Whisper), for checks made before loading.
    also_loads: ClassVar[tuple[type[PrunableModel], ...]] = ()

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
        beam_size: int = DECODE_BEAM_SIZE,
        ctc_weight: float = CTC_WEIGHT,
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


class DecoderModel(PrunableModel):
    """An encoder-decoder model: a :class:`PrunableModel` whose attention decoder is a second
    prunable stack (``--stack decoder``).

    Decoder layer numbering (docs/DESIGN.md): index 0 is what enters decoder layer 1 (token
    embeddings + positions), index k the output of decoder layer k before the decoder's final
    norm. Under teacher forcing the decoder reads the prompt (:meth:`decoder_prefix`: ``<sos>``,
    or Whisper's start-of-transcript and task tokens) followed by the reference tokens; each
    position predicts the next token, the last one ``<eos>``. The decoder's memory is the
    encoder's output after its final norm (:meth:`memory`), so an encoder layer subset is
    decoded exactly as its pruned model would be.
    """

    stacks: ClassVar[tuple[str, ...]] = ("encoder", "decoder")

    @property
    @abstractmethod
    def num_decoder_layers(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @abstractmethod
    def decoder_prefix(self) -> list[int]:
        """The tokens every hypothesis starts with (greedy decoding and teacher forcing)."""

    @abstractmethod
    def memory(self, h: Hidden) -> Hidden:
        """What the decoder attends to, from an encoder layer's output (the final norm)."""

    @abstractmethod
    def decoder_embed(self, memory: Hidden, tokens: torch.Tensor, lengths: torch.Tensor) -> Hidden:
        """Decoder index 0 for ``tokens`` (B, U) from position 0 (``lengths`` valid), with the
        memory and the causal masks in its ``context``."""

    @abstractmethod
    def decoder_forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        """Run decoder ``layers`` (1-indexed, in the order given; default all) on ``h``."""

    @abstractmethod
    def decoder_readout(self, h: Hidden) -> torch.Tensor:
        """Next-token log-probabilities (B, U, V) of a decoder layer's output: the decoder's
        final norm and output projection."""

    @abstractmethod
    def decoder_start(self, memory: Hidden, layers: Sequence[int]) -> Any:
        """A fresh incremental state (key/value caches) for decoding with ``layers``."""

    @abstractmethod
    def decoder_step(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (B, n) after those ``state`` has seen; log-probabilities (B, V) of
        the token that follows them."""

    @abstractmethod
    def prune_decoder(self, layers: Sequence[int]) -> PrunableModel:
        """A new model with decoder ``layers`` (1-indexed) physically removed."""

    @abstractmethod
    def max_new_tokens(self, memory: Hidden) -> int | torch.Tensor:
        """The most tokens greedy decoding emits (``<eos>`` included): for the whole batch, or
        (B,) one per utterance."""

    def suppress(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """Scores (B, V) of the ``step``-th emitted token with the tokens the model never emits
        there set to -inf (Whisper's suppressed tokens); none by default."""
        return scores

    def encode(self, batch: dict) -> Hidden:
        """The memory of the whole encoder for a batch."""
        return self.memory(self.forward_layers(self.embed(batch)))

    def teacher_forcing(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder inputs (B, P + U): the prompt, then the reference tokens (padded with
        ``<eos>``); what each position predicts (the reference tokens and ``<eos>`` from the
        prompt's last position on, :data:`IGNORE` elsewhere); the valid inputs, P + U_b."""
        prefix = torch.tensor(self.decoder_prefix(), dtype=torch.long)
        targets, lens = batch["targets"], batch["target_lens"]
        b, p = len(lens), len(prefix)
        inputs = torch.full((b, p + targets.size(1)), self.eos_id, dtype=torch.long)
        outputs = torch.full_like(inputs, IGNORE)
        inputs[:, :p] = prefix
        for i, n in enumerate(lens.tolist()):
            inputs[i, p : p + n] = targets[i, :n]
            outputs[i, p - 1 : p - 1 + n] = targets[i, :n]
            outputs[i, p - 1 + n] = self.eos_id
        return inputs.to(self.device), outputs.to(self.device), (lens + p).to(self.device)

    def decoder_nll(self, h: Hidden, outputs: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of the predicted tokens ``outputs`` (teacher forcing)
        from a decoder layer's output."""
        log_probs = self.decoder_readout(h)
        return torch.nn.functional.nll_loss(
            log_probs.flatten(0, 1).float(), outputs.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def teacher_forced_nll(self, memory: Hidden, batch: dict) -> torch.Tensor:
        """Summed negative log-likelihood of the references with every decoder layer."""
        inputs, outputs, lengths = self.teacher_forcing(batch)
        h = self.decoder_forward_layers(self.decoder_embed(memory, inputs, lengths))
        return self.decoder_nll(h, outputs)

    @torch.no_grad()
    def greedy_decode(
        self, memory: Hidden, layers: Sequence[int] | None = None, max_tokens: Any = None
    ) -> list[list[int]]:
        """Batched greedy autoregressive decoding with decoder ``layers`` (default all): token
        ids per utterance, ``<eos>`` and the prompt left out; ``max_tokens`` (an int or (B,))
        caps each utterance below the model's own limit."""
        layers = list(layers) if layers is not None else list(range(1, self.num_decoder_layers + 1))
        b = memory.x.size(0)
        prefix = torch.tensor([self.decoder_prefix()], device=self.device).expand(b, -1)
        state = self.decoder_start(memory, layers)
        log_probs = self.decoder_step(state, prefix)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        limits = torch.as_tensor(self.max_new_tokens(memory), device=self.device).expand(b)
        if max_tokens is not None:
            limits = torch.minimum(limits, torch.as_tensor(max_tokens, device=self.device))
        emitted = []
        for step in range(int(limits.max())):
            token = self.suppress(log_probs, step).argmax(-1).masked_fill(done, self.eos_id)
            emitted.append(token)
            done |= (token == self.eos_id) | (limits <= step + 1)
            if bool(done.all()):
                break
            log_probs = self.decoder_step(state, token[:, None])
        rows = torch.stack(emitted, 1).tolist() if emitted else [[] for _ in range(b)]
        return [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in rows]

    def transcribe_with_decoder(self, h: Hidden, batch: dict) -> tuple[list[list[int]], float]:
        """:meth:`PrunableModel.transcribe` for a model without CTC: the greedy hypotheses of
        the whole decoder and the teacher-forced negative log-likelihood."""
        memory = self.memory(h)
        return self.greedy_decode(memory), self.teacher_forced_nll(memory, batch).item()

    @torch.no_grad()
    def decode(
        self,
        batch: dict,
        method: str = "ctc_greedy_search",
        beam_size: int = DECODE_BEAM_SIZE,
        ctc_weight: float = CTC_WEIGHT,
    ) -> list[list[int]]:
        """As :meth:`PrunableModel.decode`, and ``attention_greedy_search``: the attention
        decoder alone, greedy, batched (the decoder runs once per output token)."""
        if method != ATTENTION_DECODING:
            return super().decode(batch, method, beam_size, ctc_weight)
        self.check_decoding(method, beam_size, ctc_weight)
        with eval_mode(self.module):
            return self.greedy_decode(self.encode(batch))


def load_prunable(model_type: str, model_dir: Path, **options) -> PrunableModel:
    """Load the model in ``model_dir`` as a :class:`PrunableModel` of ``model_type``
    (``options``: the model type's ``load_options``)."""
    return MODEL_TYPES[model_type].load(Path(model_dir), **options)


@dataclass(kw_only=True)
class ModelSettings:
    """The model a stage works on, and where its outputs go."""

    exp_dir: Path = option(REQUIRED, "experiment directory: every stage's outputs")
    model_type: str = option("native", "library of the model", choices=lambda: MODEL_TYPES.names())
    model_dir: Path | None = option(None, "the model to prune (default: --exp_dir, a native model)")
    stack: str = option("encoder", "the layer stack to prune", choices=("encoder", "decoder"))
    device: str = option("auto", "auto | cpu | cuda[:N]")
    ct2_quantization: str = option(
        "auto",
        "--model_type ctranslate2: weights of the CTranslate2 models written (auto: as the input)",
        choices=lambda: MODEL_TYPES["ctranslate2"].quantizations,
    )

    @property
    def source(self) -> Path:
        return self.model_dir or self.exp_dir

    def load_model(self) -> PrunableModel:
        """The model, on ``device``."""
        options = {k: getattr(self, k) for k in MODEL_TYPES[self.model_type].load_options}
        return load_prunable(self.model_type, self.source, **options).to(
            resolve_device(self.device)
        )
