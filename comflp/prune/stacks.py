"""Prunable layer stacks: what stages 4-8 prune, one stack of residual layers of a model.

Every stage works on one stack (``--stack``): its layer states for the dump, the evaluation of
its layer subsets with the task metric (the fine search, GLP, the oracle), and the model with
some of its layers removed. Layers are numbered per stack (docs/DESIGN.md, "Layer numbering").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from comflp.adapters.base import DecoderModel, PrunableModel
from comflp.errors import InputError
from comflp.prune.evaluator import DecoderPass, SubsetResult, evaluate_passes, evaluate_subsets


class LayerStack(Protocol):
    """One prunable stack of a model."""

    name: str
    model: PrunableModel

    @property
    def num_layers(self) -> int: ...

    def states(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The L+1 states (B, T, D) of a batch in layer-index order and their valid rows (B,)."""

    def evaluate(
        self,
        batches: Iterable[dict],
        subsets: Sequence[tuple[int, ...]],
        prefix_cache: bool = True,
        progress: str | None = None,
        metric: str = "cer",
    ) -> list[SubsetResult]:
        """The task metrics of each subset of kept layers (the rest of the model whole);
        ``metric``, the one the caller ranks by, may spare work the others need."""

    def prune(self, layers: Sequence[int]) -> PrunableModel:
        """The model with this stack's ``layers`` removed."""


class EncoderStack:
    """The encoder: index 0 is the front end's output, k the output of layer k."""

    name = "encoder"

    def __init__(self, model: PrunableModel):
        self.model = model

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def states(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        h = self.model.embed(batch)
        states = [h.x]
        for k in range(1, self.num_layers + 1):
            h = self.model.forward_layers(h, [k])
            states.append(h.x)
        return states, h.lengths

    def evaluate(
        self,
        batches: Iterable[dict],
        subsets: Sequence[tuple[int, ...]],
        prefix_cache: bool = True,
        progress: str | None = None,
        metric: str = "cer",
    ) -> list[SubsetResult]:
        """Every metric (the readout gives them at once)."""
        return evaluate_subsets(self.model, batches, subsets, prefix_cache, progress)

    def prune(self, layers: Sequence[int]) -> PrunableModel:
        return self.model.prune(layers)


class DecoderStack:
    """The attention decoder of a :class:`DecoderModel`: index 0 is the token embeddings +
    positions, k the output of decoder layer k (before the final norm); its rows are token
    positions under teacher forcing on the references (the prompt, then the reference tokens).
    Subsets are scored by real autoregressive decoding (:class:`DecoderPass`)."""

    name = "decoder"

    def __init__(self, model: DecoderModel):
        self.model = model

    @property
    def num_layers(self) -> int:
        return self.model.num_decoder_layers

    def states(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        inputs, _, lengths = self.model.teacher_forcing(batch)
        h = self.model.decoder_embed(self.model.encode(batch), inputs, lengths)
        states = [h.x]
        for k in range(1, self.num_layers + 1):
            h = self.model.decoder_forward_layers(h, [k])
            states.append(h.x)
        return states, h.lengths

    def evaluate(
        self,
        batches: Iterable[dict],
        subsets: Sequence[tuple[int, ...]],
        prefix_cache: bool = True,
        progress: str | None = None,
        metric: str = "cer",
    ) -> list[SubsetResult]:
        """With ``metric`` ``loss``, the teacher-forced loss alone (no decoding: CER and WER
        NaN), the trie's prefixes shared; else real greedy decoding as well."""
        return evaluate_passes(
            DecoderPass(self.model, decode=metric != "loss"),
            self.model.module,
            self.num_layers,
            batches,
            subsets,
            prefix_cache,
            progress,
        )

    def prune(self, layers: Sequence[int]) -> PrunableModel:
        return self.model.prune_decoder(layers)


_STACKS: dict[str, type] = {"encoder": EncoderStack, "decoder": DecoderStack}


def stack_of(model: PrunableModel, name: str) -> LayerStack:
    """The stack ``name`` of ``model``; InputError when the model has no such stack."""
    if name not in model.stacks:
        raise InputError(
            f"--stack {name}: a {model.model_type} model ({model.source}) has no {name} stack; "
            f"its stacks: {', '.join(model.stacks)}"
        )
    return _STACKS[name](model)
