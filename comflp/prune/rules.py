"""Layer-selection strategies CoMFLP is compared with.

Fixed rules need no model: drop the top P layers (which, with intermediate CTC, is also
Lee et al.'s pruning on demand: exit at layer L - P through the final norm and the shared CTC
head), drop the bottom P, drop P evenly spaced layers ("every other" when P = L/2), or P at
random. Metric-based searches evaluate pruned models on a dev subset: GLP, the greedy search
that removes the layer whose removal hurts the metric least, P times (L + (L-1) + ... +
(L-P+1) evaluations), and the exhaustive search over all C(L, P) subsets (the oracle).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from comflp.asr.model import ASRModel
from comflp.asr.tokenizer import Tokenizer
from comflp.prune.evaluator import evaluate_subsets, kept_layers


def _check(num_layers: int, num_prune: int) -> None:
    if not 1 <= num_prune < num_layers:
        raise ValueError(
            f"num_prune must be between 1 and {num_layers - 1} for a {num_layers}-layer "
            f"model, got {num_prune}"
        )


def drop_top(num_layers: int, num_prune: int) -> tuple[int, ...]:
    _check(num_layers, num_prune)
    return tuple(range(num_layers - num_prune + 1, num_layers + 1))


def drop_bottom(num_layers: int, num_prune: int) -> tuple[int, ...]:
    _check(num_layers, num_prune)
    return tuple(range(1, num_prune + 1))


def every_other(num_layers: int, num_prune: int) -> tuple[int, ...]:
    """P evenly spaced layers ending at the top: L=12, P=6 -> 2, 4, ..., 12; P=4 -> 3, 6, 9, 12."""
    _check(num_layers, num_prune)
    layers = sorted({round((i + 1) * num_layers / num_prune) for i in range(num_prune)})
    return tuple(layers)


def random_layers(num_layers: int, num_prune: int, seed: int) -> tuple[int, ...]:
    _check(num_layers, num_prune)
    rng = np.random.default_rng(seed)
    return tuple(
        sorted(int(x) for x in rng.choice(np.arange(1, num_layers + 1), num_prune, replace=False))
    )


@dataclass
class MetricSearchResult:
    pruned: tuple[int, ...]
    metric_value: float
    evaluations: int  # pruned models evaluated
    seconds: float
    path: list[dict]  # GLP: the layer removed at each step and its metric


def greedy_layer_pruning(
    model: ASRModel,
    batches: list[dict],
    tokenizer: Tokenizer,
    num_prune: int,
    metric: str = "cer",
    prefix_cache: bool = True,
    device: str = "cpu",
) -> MetricSearchResult:
    """GLP: P greedy steps, each evaluating every model with one more layer removed."""
    num_layers = model.cfg.num_layers
    _check(num_layers, num_prune)
    start = time.perf_counter()
    pruned: tuple[int, ...] = ()
    evaluations, path, value = 0, [], float("nan")
    for _ in range(num_prune):
        candidates = [
            tuple(sorted((*pruned, k))) for k in range(1, num_layers + 1) if k not in pruned
        ]
        results = evaluate_subsets(
            model,
            batches,
            tokenizer,
            [kept_layers(num_layers, c) for c in candidates],
            prefix_cache,
            device,
        )
        evaluations += len(candidates)
        best = min(range(len(candidates)), key=lambda i: (results[i].metric(metric), i))
        removed = sorted(set(candidates[best]) - set(pruned))[0]
        pruned, value = candidates[best], results[best].metric(metric)
        path.append({"removed": removed, metric: value})
    return MetricSearchResult(pruned, value, evaluations, time.perf_counter() - start, path)


def exhaustive_metric_search(
    model: ASRModel,
    batches: list[dict],
    tokenizer: Tokenizer,
    num_prune: int,
    metric: str = "cer",
    max_evaluations: int = 1000,
    prefix_cache: bool = True,
    device: str = "cpu",
) -> MetricSearchResult:
    """The oracle: evaluate all C(L, P) pruned models; refuses above ``max_evaluations``."""
    num_layers = model.cfg.num_layers
    _check(num_layers, num_prune)
    count = math.comb(num_layers, num_prune)
    if count > max_evaluations:
        raise ValueError(
            f"exhaustive metric search needs C({num_layers}, {num_prune}) = {count} "
            f"evaluations, more than max_evaluations={max_evaluations}"
        )
    start = time.perf_counter()
    candidates = list(combinations(range(1, num_layers + 1), num_prune))
    results = evaluate_subsets(
        model,
        batches,
        tokenizer,
        [kept_layers(num_layers, c) for c in candidates],
        prefix_cache,
        device,
    )
    best = min(range(count), key=lambda i: (results[i].metric(metric), i))
    return MetricSearchResult(
        candidates[best], results[best].metric(metric), count, time.perf_counter() - start, []
    )
