"""Prunable layer stacks: what stages 4-8 prune, one stack of residual layers of a model.

Every stage works on one stack (``--stack``): its layer states for the dump, the evaluation of
its layer subsets with the task metric (the fine search, GLP, the oracle), and the model with
some of its layers removed. Layers are numbered per stack (docs/DESIGN.md, "Layer numbering").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from comflp.adapters.base import PrunableModel
from comflp.prune.evaluator import SubsetResult, evaluate_subsets


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
    ) -> list[SubsetResult]:
        """The task metric of each subset of kept layers (the rest of the model whole)."""

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
    ) -> list[SubsetResult]:
        return evaluate_subsets(self.model, batches, subsets, prefix_cache, progress)

    def prune(self, layers: Sequence[int]) -> PrunableModel:
        return self.model.prune(layers)


_STACKS: dict[str, type] = {"encoder": EncoderStack}


def stack_of(model: PrunableModel, name: str) -> LayerStack:
    """The stack ``name`` of ``model``; ValueError when the model has no such stack."""
    if name not in model.stacks:
        raise ValueError(
            f"--stack {name}: a {model.model_type} model ({model.source}) has no {name} stack; "
            f"its stacks: {', '.join(model.stacks)}"
        )
    return _STACKS[name](model)
