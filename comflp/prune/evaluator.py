"""Evaluate many layer subsets of one model on a dev subset, computing shared prefixes once.

A layer subset is the tuple of encoder layers a pruned model keeps, in order. Running a batch
through a subset means: front end, the kept layers, final norm, CTC head. Subsets that start
with the same layers share those hidden states, so the subsets are arranged in a trie and each
batch walks it depth-first: every trie node (one layer applied to one prefix's output) is
computed once per batch. The front end is shared by all subsets. With ``prefix_cache=False``
every subset is run from the features on its own, as if its pruned model were built and
evaluated separately (the baseline the cache is measured against).

The fine search of CoMFLP, the greedy metric search (GLP) and the exhaustive metric search
all evaluate through :func:`evaluate_subsets`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from comflp.asr.decode import ctc_greedy_search
from comflp.asr.model import ASRModel, padding_mask
from comflp.asr.scoring import error_stats
from comflp.asr.tokenizer import Tokenizer

METRICS = ("cer", "wer", "ctc_loss")


@dataclass
class SubsetResult:
    """Metrics of one layer subset on the evaluation batches."""

    kept: tuple[int, ...]
    cer: float
    wer: float
    ctc_loss: float  # mean per utterance
    seconds: float  # compute attributed to this subset (shared work split evenly)

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


def _trie(subsets: list[tuple[int, ...]]) -> _Node:
    root = _Node(None)
    for i, kept in enumerate(subsets):
        node = root
        node.through.append(i)
        for layer in kept:
            node = node.children.setdefault(layer, _Node(layer))
            node.through.append(i)
        node.ends.append(i)
    return root


def layer_evaluations(subsets: list[tuple[int, ...]], prefix_cache: bool = True) -> int:
    """Encoder-layer forward passes per batch needed to evaluate ``subsets``."""
    if not prefix_cache:
        return sum(len(k) for k in subsets)
    count, stack = 0, [_trie(subsets)]
    while stack:
        node = stack.pop()
        count += len(node.children)
        stack.extend(node.children.values())
    return count


def load_batches(loader) -> list[dict]:
    """Materialise a (small) evaluation loader once, so repeated searches skip the I/O."""
    return list(loader)


class _Accumulator:
    def __init__(self, n: int):
        self.refs: list[list[str]] = [[] for _ in range(n)]
        self.hyps: list[list[str]] = [[] for _ in range(n)]
        self.loss = [0.0] * n
        self.utts = [0] * n
        self.seconds = [0.0] * n

    def share(self, subsets: list[int], seconds: float) -> None:
        for i in subsets:
            self.seconds[i] += seconds / len(subsets)

    def add(
        self, subsets: list[int], batch: dict, hyps: list[str], loss: float, seconds: float
    ) -> None:
        self.share(subsets, seconds)
        for i in subsets:
            self.refs[i] += batch["texts"]
            self.hyps[i] += hyps
            self.loss[i] += loss
            self.utts[i] += len(hyps)


def _front_end(model: ASRModel, feats: torch.Tensor, feat_lens: torch.Tensor):
    """Subsampled input, its lengths and the attention mask."""
    x, lens = model.encoder.embed(feats, feat_lens)
    return x, lens, ~padding_mask(lens, x.size(1))[:, None, None, :]


def _readout(
    model: ASRModel,
    tokenizer: Tokenizer,
    batch: dict,
    hidden: torch.Tensor,
    lens: torch.Tensor,
    device: str,
) -> tuple[list[str], float, float]:
    """Greedy-CTC hypotheses and summed CTC loss of a last hidden state, and the time taken."""
    start = time.perf_counter()
    targets = batch["targets"][~padding_mask(batch["target_lens"], batch["targets"].size(1))]
    log_probs, lens = model.ctc_head(model.encoder.after_norm(hidden), lens)
    loss = F.ctc_loss(
        log_probs.transpose(0, 1).float(),
        targets.to(device),
        lens,
        batch["target_lens"].to(device),
        blank=0,
        reduction="sum",
        zero_infinity=True,
    ).item()
    hyps = [tokenizer.decode(h) for h in ctc_greedy_search(log_probs, lens)]
    return hyps, loss, time.perf_counter() - start


@torch.no_grad()
def evaluate_subsets(
    model: ASRModel,
    batches: list[dict],
    tokenizer: Tokenizer,
    subsets: list[tuple[int, ...]],
    prefix_cache: bool = True,
    device: str = "cpu",
) -> list[SubsetResult]:
    """CER/WER (greedy CTC) and CTC loss of each layer subset, in the order given."""
    num_layers = model.cfg.num_layers
    for kept in subsets:
        if (
            not kept
            or any(not 1 <= k <= num_layers for k in kept)
            or list(kept) != sorted(set(kept))
        ):
            raise ValueError(
                f"a layer subset must be increasing layer numbers in 1..{num_layers}, got {kept}"
            )
    model.eval().to(device)
    acc = _Accumulator(len(subsets))
    root = _trie(subsets)

    for batch in batches:
        feats, feat_lens = batch["feats"].to(device), batch["feat_lens"].to(device)
        if prefix_cache:
            start = time.perf_counter()
            x0, lens, mask = _front_end(model, feats, feat_lens)
            acc.share(root.through, time.perf_counter() - start)
            stack = [(root, x0)]
            while stack:  # depth first: at most one hidden state per trie level is alive
                node, x = stack.pop()
                for child in node.children.values():
                    start = time.perf_counter()
                    h = model.encoder.layers[child.layer - 1](x, mask)
                    acc.share(child.through, time.perf_counter() - start)
                    if child.ends:
                        acc.add(
                            child.ends, batch, *_readout(model, tokenizer, batch, h, lens, device)
                        )
                    stack.append((child, h))
        else:
            for i, kept in enumerate(subsets):
                start = time.perf_counter()
                x, lens, mask = _front_end(model, feats, feat_lens)
                for k in kept:
                    x = model.encoder.layers[k - 1](x, mask)
                acc.share([i], time.perf_counter() - start)
                acc.add([i], batch, *_readout(model, tokenizer, batch, x, lens, device))

    return [
        SubsetResult(
            kept=tuple(kept),
            cer=error_stats(acc.refs[i], acc.hyps[i], "char").err,
            wer=error_stats(acc.refs[i], acc.hyps[i], "word").err,
            ctc_loss=acc.loss[i] / max(acc.utts[i], 1),
            seconds=acc.seconds[i],
        )
        for i, kept in enumerate(subsets)
    ]


def kept_layers(num_layers: int, pruned: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The layers a model keeps when ``pruned`` are removed."""
    removed = set(pruned)
    return tuple(k for k in range(1, num_layers + 1) if k not in removed)
