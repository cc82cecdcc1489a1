"""Searches that score pruned models with the task metric on a dev subset.

- :func:`fine_search`: CoMFLP's second step, the coarse searches' top K proposals evaluated
  (those of several scores merged, each distinct proposal once);
- :func:`greedy_layer_pruning` (GLP): P greedy steps, each removing the layer whose removal
  hurts the metric least (L + (L-1) + ... + (L-P+1) evaluations); its path gives the choice
  for every smaller P on the way;
- :func:`exhaustive_metric_search`: all C(L, P) subsets (the oracle).

Each returns a :class:`SearchResult`: the choice, every evaluated candidate with its metrics and
compute time, and the wall time; stage 6 writes it as ``search.json``. Every evaluation goes
through the stack's :meth:`~comflp.prune.stacks.LayerStack.evaluate`; the lowest metric wins,
ties going to the candidate evaluated first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from comflp.prune.stacks import LayerStack
from comflp.subsets import check_num_prune, kept_layers


@dataclass
class SearchResult:
    """What a metric-scored search chose and everything it evaluated."""

    method: str
    num_prune: int
    metric: str
    candidates: list[dict]  # in evaluation order: layers, kept, cer, wer, loss, metric, seconds
    best: int  # index into candidates
    seconds: float  # wall time
    extra: dict = field(default_factory=dict)

    @property
    def best_layers(self) -> tuple[int, ...]:
        return tuple(self.candidates[self.best]["layers"])

    @property
    def best_metric(self) -> float:
        return self.candidates[self.best]["metric"]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "num_prune": self.num_prune,
            "metric": self.metric,
            "best": self.best,
            "best_layers": list(self.best_layers),
            "best_metric": self.best_metric,
            "seconds": self.seconds,
            "evaluations": len(self.candidates),
            **self.extra,
            "candidates": self.candidates,
        }


def evaluate_candidates(
    stack: LayerStack,
    batches: list[dict],
    candidates: Sequence[Sequence[int]],
    metric: str,
    prefix_cache: bool = True,
    progress: str | None = None,
) -> list[dict]:
    """One row per candidate set of pruned layers, in the order given."""
    subsets = [kept_layers(stack.num_layers, c) for c in candidates]
    results = stack.evaluate(batches, subsets, prefix_cache, progress, metric)
    return [
        {
            "layers": sorted(c),
            "kept": list(r.kept),
            "cer": r.cer,
            "wer": r.wer,
            "loss": r.loss,
            "metric": r.metric(metric),
            "seconds": r.seconds,
        }
        for c, r in zip(candidates, results, strict=True)
    ]


def best_row(rows: Sequence[dict]) -> int:
    """The index of the lowest metric, the first on a tie."""
    return min(range(len(rows)), key=lambda i: (rows[i]["metric"], i))


def fine_search(
    stack: LayerStack,
    batches: list[dict],
    candidates: Sequence[Sequence[int]],
    metric: str = "cer",
    prefix_cache: bool = True,
) -> tuple[list[dict], float]:
    """Evaluate each distinct candidate once (the first occurrence of a repeated one stands for
    all), in one prefix-cached pass; one row per distinct candidate, and the wall time."""
    distinct = list(dict.fromkeys(tuple(sorted(c)) for c in candidates))
    if not distinct:
        raise ValueError("fine search needs at least one proposal")
    start = time.perf_counter()
    rows = evaluate_candidates(stack, batches, distinct, metric, prefix_cache)
    return rows, time.perf_counter() - start


def greedy_layer_pruning(
    stack: LayerStack,
    batches: list[dict],
    num_prune: Sequence[int],
    metric: str = "cer",
    prefix_cache: bool = True,
) -> dict[int, SearchResult]:
    """GLP up to the largest P; the greedy path's state after P steps is GLP's choice for P,
    whose cost is the evaluations and time of its first P steps."""
    num_layers = stack.num_layers
    for p in num_prune:
        check_num_prune(p, num_layers)
    start = time.perf_counter()
    pruned: tuple[int, ...] = ()
    rows, path, results = [], [], {}
    for step in range(1, max(num_prune) + 1):
        candidates = [
            tuple(sorted((*pruned, k))) for k in range(1, num_layers + 1) if k not in pruned
        ]
        step_rows = evaluate_candidates(stack, batches, candidates, metric, prefix_cache)
        best = best_row(step_rows)
        path.append(
            {
                "removed": sorted(set(candidates[best]) - set(pruned))[0],
                metric: step_rows[best]["metric"],
            }
        )
        pruned = candidates[best]
        rows += [{**row, "step": step} for row in step_rows]
        if step in num_prune:
            results[step] = SearchResult(
                "glp",
                step,
                metric,
                list(rows),
                len(rows) - len(step_rows) + best,
                time.perf_counter() - start,
                {"path": list(path)},
            )
    return results


def exhaustive_metric_search(
    stack: LayerStack,
    batches: list[dict],
    num_prune: int,
    metric: str = "cer",
    max_evaluations: int = 1000,
    prefix_cache: bool = True,
) -> SearchResult:
    """The oracle: evaluate all C(L, P) pruned models; refuses above ``max_evaluations``."""
    num_layers = stack.num_layers
    check_num_prune(num_prune, num_layers)
    count = math.comb(num_layers, num_prune)
    if count > max_evaluations:
        raise ValueError(
            f"exhaustive metric search needs C({num_layers}, {num_prune}) = {count} "
            f"evaluations, more than max_evaluations={max_evaluations}"
        )
    start = time.perf_counter()
    candidates = list(combinations(range(1, num_layers + 1), num_prune))
    progress = f"oracle: {count} pruned models"
    rows = evaluate_candidates(stack, batches, candidates, metric, prefix_cache, progress)
    return SearchResult(
        "oracle", num_prune, metric, rows, best_row(rows), time.perf_counter() - start
    )
