"""Evaluate many layer subsets of one model on a dev subset, computing shared prefixes once.

A layer subset is the tuple of encoder layers a pruned model keeps, in order. Running a batch
through a subset means: front end, the kept layers, readout (final norm, CTC head). Subsets
that start with the same layers share those hidden states, so the subsets are arranged in a
trie and each batch walks it depth-first: every trie node (one layer applied to one prefix's
output) is computed once per batch. The front end is shared by all subsets. With
``prefix_cache=False`` every subset is run from the input on its own, as if its pruned model
were built and evaluated separately (the baseline the cache is measured against).

Everything that scores layer subsets goes through :func:`evaluate_passes`: the fine search
of CoMFLP, the greedy metric search (GLP), the exhaustive metric search, and the dev
evaluation of training (one subset: all layers). A :class:`SubsetPass` says how one stack's
subsets run: :class:`EncoderPass` (the model's own readout: greedy CTC, or the whole decoder's
greedy decoding for a model without CTC) and :class:`DecoderPass` (the encoder once per batch,
shared by every subset; the teacher-forced loss of each subset through the trie, then real
batched greedy autoregressive decoding with its layers). It sees the model only through
:class:`~comflp.adapters.base.PrunableModel`, so it works on any adapter.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from comflp.adapters.base import DecoderModel, Hidden, PrunableModel
from comflp.asr.scoring import error_stats
from comflp.utils import eval_mode

METRICS = ("cer", "wer", "loss")


@dataclass
class SubsetResult:
    """Metrics of one layer subset on the evaluation batches."""

    kept: tuple[int, ...]
    cer: float  # NaN when the metric asked for did not need decoding
    wer: float
    # the model's loss, mean per utterance: CTC, or for a model without CTC and for decoder
    # subsets the decoder's teacher-forced negative log-likelihood
    loss: float
    seconds: float  # compute attributed to this subset (shared work split evenly)
    num_utts: int

    def to_dict(self) -> dict:
        """As training logs dev results: ``loss`` (CTC), ``cer``, ``wer``, ``num_utts``."""
        return {"loss": self.loss, "cer": self.cer, "wer": self.wer, "num_utts": self.num_utts}

    def metric(self, name: str) -> float:
        if name not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {name!r}")
        return getattr(self, name)


@dataclass
class _Node:
    layer: int | None
    children: dict[int, _Node] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # subsets that end here
    through: list[int] = field(default_factory=list)  # subsets whose prefix includes this node


def _trie(subsets: Sequence[tuple[int, ...]]) -> _Node:
    root = _Node(None)
    for i, kept in enumerate(subsets):
        node = root
        node.through.append(i)
        for layer in kept:
            node = node.children.setdefault(layer, _Node(layer))
            node.through.append(i)
        node.ends.append(i)
    return root


def layer_evaluations(subsets: Sequence[tuple[int, ...]], prefix_cache: bool = True) -> int:
    """Encoder-layer forward passes per batch needed to evaluate ``subsets``."""
    if not prefix_cache:
        return sum(len(k) for k in subsets)
    count, stack = 0, [_trie(subsets)]
    while stack:
        node = stack.pop()
        count += len(node.children)
        stack.extend(node.children.values())
    return count


class _Accumulator:
    """Hypotheses, losses and compute time per subset, over the batches."""

    def __init__(self, n: int):
        self.refs: list[list[str]] = [[] for _ in range(n)]
        self.hyps: list[list[str]] = [[] for _ in range(n)]
        self.loss = [0.0] * n
        self.utts = [0] * n
        self.seconds = [0.0] * n

    def share(self, subsets: list[int], seconds: float) -> None:
        for i in subsets:
            self.seconds[i] += seconds / len(subsets)

    def add(self, subsets: list[int], batch: dict, hyps: list[str] | None, loss: float) -> None:
        """``hyps`` None: the loss alone was computed (no decoding)."""
        for i in subsets:
            if hyps is not None:
                self.refs[i] += batch["texts"]
                self.hyps[i] += hyps
            self.loss[i] += loss
            self.utts[i] += len(batch["ids"])

    def _error(self, i: int, unit: str) -> float:
        """Subset ``i``'s error rate; NaN when it was not decoded."""
        if not self.refs[i]:
            return math.nan
        return error_stats(self.refs[i], self.hyps[i], unit).err

    def results(self, subsets: Sequence[tuple[int, ...]]) -> list[SubsetResult]:
        return [
            SubsetResult(
                kept=tuple(kept),
                cer=self._error(i, "char"),
                wer=self._error(i, "word"),
                loss=self.loss[i] / max(self.utts[i], 1),
                seconds=self.seconds[i],
                num_utts=self.utts[i],
            )
            for i, kept in enumerate(subsets)
        ]


def _check_subsets(subsets: Sequence[tuple[int, ...]], num_layers: int) -> None:
    for kept in subsets:
        if (
            not kept
            or any(not 1 <= k <= num_layers for k in kept)
            or list(kept) != sorted(set(kept))
        ):
            raise ValueError(
                f"a layer subset must be increasing layer numbers in 1..{num_layers}, got {kept}"
            )


class SubsetPass(Protocol):
    """How the layer subsets of one stack run on a batch."""

    def start(self, batch: dict) -> Hidden:
        """The stack's index 0 for the batch (work every subset shares)."""

    def layer(self, h: Hidden, k: int) -> Hidden:
        """Layer ``k`` of the stack applied to ``h``."""

    def score(
        self, batch: dict, h: Hidden, kept: tuple[int, ...]
    ) -> tuple[list[str] | None, float]:
        """Hypothesis texts (None: not decoded) and the summed loss of the subset ``kept``,
        whose last layer's output is ``h``."""


class EncoderPass:
    """Encoder subsets: front end, kept layers, the model's own readout (:meth:`transcribe`)."""

    def __init__(self, model: PrunableModel):
        self.model = model

    def start(self, batch: dict) -> Hidden:
        return self.model.embed(batch)

    def layer(self, h: Hidden, k: int) -> Hidden:
        return self.model.forward_layers(h, [k])

    def score(self, batch: dict, h: Hidden, kept: tuple[int, ...]) -> tuple[list[str], float]:
        ids, loss = self.model.transcribe(h, batch)
        return [self.model.decode_ids(i) for i in ids], loss


class DecoderPass:
    """Decoder subsets: ``start`` runs the whole encoder once per batch and embeds the
    teacher-forced references; ``score`` gives the subset's teacher-forced loss and, with
    ``decode``, decodes the batch greedily with its layers, autoregressively."""

    def __init__(self, model: DecoderModel, decode: bool = True):
        self.model = model
        self.decode = decode
        self.memory: Hidden | None = None
        self.outputs: torch.Tensor | None = None

    def start(self, batch: dict) -> Hidden:
        self.memory = self.model.encode(batch)
        inputs, self.outputs, lengths = self.model.teacher_forcing(batch)
        return self.model.decoder_embed(self.memory, inputs, lengths)

    def layer(self, h: Hidden, k: int) -> Hidden:
        return self.model.decoder_forward_layers(h, [k])

    def score(
        self, batch: dict, h: Hidden, kept: tuple[int, ...]
    ) -> tuple[list[str] | None, float]:
        loss = self.model.decoder_nll(h, self.outputs).item()
        if not self.decode:
            return None, loss
        ids = self.model.greedy_decode(self.memory, kept)
        return [self.model.decode_ids(i) for i in ids], loss


def _score(
    p: SubsetPass,
    batch: dict,
    h: Hidden,
    kept: tuple[int, ...],
    subsets: list[int],
    acc: _Accumulator,
) -> None:
    """Read out ``h`` (the last kept layer's output of ``subsets``, which all keep ``kept``)."""
    start = time.perf_counter()
    hyps, loss = p.score(batch, h, kept)
    acc.share(subsets, time.perf_counter() - start)
    acc.add(subsets, batch, hyps, loss)


def _walk_trie(p: SubsetPass, batch: dict, root: _Node, acc: _Accumulator) -> None:
    """Depth first: at most one hidden state per trie level is alive."""
    start = time.perf_counter()
    h0 = p.start(batch)
    acc.share(root.through, time.perf_counter() - start)
    stack = [(root, h0, ())]
    while stack:
        node, h, path = stack.pop()
        for child in node.children.values():
            start = time.perf_counter()
            h_child = p.layer(h, child.layer)
            acc.share(child.through, time.perf_counter() - start)
            kept = (*path, child.layer)
            if child.ends:
                _score(p, batch, h_child, kept, child.ends, acc)
            stack.append((child, h_child, kept))


def _each_subset(
    p: SubsetPass, batch: dict, subsets: Sequence[tuple[int, ...]], acc: _Accumulator
) -> None:
    for i, kept in enumerate(subsets):
        start = time.perf_counter()
        h = p.start(batch)
        for k in kept:
            h = p.layer(h, k)
        acc.share([i], time.perf_counter() - start)
        _score(p, batch, h, tuple(kept), [i], acc)


@torch.no_grad()
def evaluate_passes(
    p: SubsetPass,
    module: torch.nn.Module,
    num_layers: int,
    batches: Iterable[dict],
    subsets: Sequence[tuple[int, ...]],
    prefix_cache: bool = True,
    progress: str | None = None,
) -> list[SubsetResult]:
    """CER/WER and loss of each layer subset of a ``num_layers``-layer stack, in the order
    given, with ``module`` (the model's network) in eval mode; with ``progress``, a progress
    bar of that name over the batches."""
    _check_subsets(subsets, num_layers)
    acc = _Accumulator(len(subsets))
    root = _trie(subsets)
    if progress is not None:
        batches = tqdm(batches, desc=progress, unit="batch", mininterval=2 if os.isatty(2) else 30)
    with eval_mode(module):
        for batch in batches:
            if prefix_cache:
                _walk_trie(p, batch, root, acc)
            else:
                _each_subset(p, batch, subsets, acc)
    return acc.results(subsets)


def evaluate_subsets(
    model: PrunableModel,
    batches: Iterable[dict],
    subsets: Sequence[tuple[int, ...]],
    prefix_cache: bool = True,
    progress: str | None = None,
) -> list[SubsetResult]:
    """CER/WER (the model's own greedy readout) and loss of each encoder layer subset."""
    return evaluate_passes(
        EncoderPass(model), model.module, model.num_layers, batches, subsets, prefix_cache, progress
    )


def evaluate_model(model: PrunableModel, batches: Iterable[dict]) -> SubsetResult:
    """CER/WER and CTC loss of the whole model (every layer)."""
    return evaluate_subsets(model, batches, [tuple(range(1, model.num_layers + 1))])[0]
