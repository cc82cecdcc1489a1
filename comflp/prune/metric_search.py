"""Searches that score pruned models with the task metric on a dev subset.

- :func:`fine_search`: CoMFLP's second step, the coarse search's top K proposals evaluated;
- :func:`greedy_layer_pruning` (GLP): P greedy steps, each removing the layer whose removal
  hurts the metric least (L + (L-1) + ... + (L-P+1) evaluations);
- :func:`exhaustive_metric_search`: all C(L, P) subsets (the oracle).

Each returns a :class:`SearchResult`: the choice, every evaluated candidate with its metrics and
compute time, and the wall time; stage 6 writes it as ``search.json``. Every evaluation goes
through :func:`comflp.prune.evaluator.evaluate_subsets`; the lowest metric wins, ties going to
the candidate evaluated first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from comflp.adapters.base import PrunableModel
from comflp.prune.evaluator import evaluate_subsets, layer_evaluations
from comflp.prune.search import Proposal, blocks_of
from comflp.prune.subsets import check_num_prune, kept_layers


@dataclass
class SearchResult:
    """What a metric-scored search chose and everything it evaluated."""

    method: str
    num_prune: int
    metric: str
    candidates: list[dict]  # in evaluation order: layers, kept, cer, wer, ctc_loss, metric, seconds
    best: int  # index into candidates
    seconds: float  # wall time
    layer_evaluations: int  # encoder-layer passes per batch
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
            "layer_evaluations_per_batch": self.layer_evaluations,
            **self.extra,
            "candidates": self.candidates,
        }


def evaluate_candidates(
    model: PrunableModel,
    batches: list[dict],
    candidates: Sequence[Sequence[int]],
    metric: str,
    prefix_cache: bool = True,
    progress: str | None = None,
) -> tuple[list[dict], int]:
    """One row per candidate set of pruned layers, and the layer passes per batch it took."""
    subsets = [kept_layers(model.num_layers, c) for c in candidates]
    results = evaluate_subsets(model, batches, subsets, prefix_cache, progress)
    rows = [
        {
            "layers": sorted(c),
            "kept": list(r.kept),
            "cer": r.cer,
            "wer": r.wer,
            "ctc_loss": r.ctc_loss,
            "metric": r.metric(metric),
            "seconds": r.seconds,
        }
        for c, r in zip(candidates, results, strict=True)
    ]
    return rows, layer_evaluations(subsets, prefix_cache)


def _best(rows: list[dict]) -> int:
    return min(range(len(rows)), key=lambda i: (rows[i]["metric"], i))


def fine_search(
    model: PrunableModel,
    batches: list[dict],
    proposals: Sequence[Proposal],
    metric: str = "cer",
    prefix_cache: bool = True,
    method: str = "comflp",
) -> SearchResult:
    """Evaluate every proposal's pruned model; the best has the lowest ``metric`` (ties: the
    better coarse rank)."""
    if not proposals:
        raise ValueError("fine search needs at least one proposal")
    start = time.perf_counter()
    rows, passes = evaluate_candidates(
        model, batches, [p.layers for p in proposals], metric, prefix_cache
    )
    for rank, (row, p) in enumerate(zip(rows, proposals, strict=True), start=1):
        row.update(
            coarse_rank=rank, blocks=[list(b) for b in blocks_of(p.layers)], coarse_score=p.score
        )
    return SearchResult(
        method,
        len(proposals[0].layers),
        metric,
        rows,
        _best(rows),
        time.perf_counter() - start,
        passes,
    )


def greedy_layer_pruning(
    model: PrunableModel,
    batches: list[dict],
    num_prune: int,
    metric: str = "cer",
    prefix_cache: bool = True,
) -> SearchResult:
    """GLP: P greedy steps, each evaluating every model with one more layer removed."""
    num_layers = model.num_layers
    check_num_prune(num_prune, num_layers)
    start = time.perf_counter()
    pruned: tuple[int, ...] = ()
    rows, passes, path = [], 0, []
    for step in range(1, num_prune + 1):
        candidates = [
            tuple(sorted((*pruned, k))) for k in range(1, num_layers + 1) if k not in pruned
        ]
        step_rows, step_passes = evaluate_candidates(
            model, batches, candidates, metric, prefix_cache
        )
        for row in step_rows:
            row["step"] = step
        best = _best(step_rows)
        removed = sorted(set(candidates[best]) - set(pruned))[0]
        pruned = candidates[best]
        path.append({"removed": removed, metric: step_rows[best]["metric"]})
        rows += step_rows
        passes += step_passes
    return SearchResult(
        "glp",
        num_prune,
        metric,
        rows,
        len(rows) - len(step_rows) + best,
        time.perf_counter() - start,
        passes,
        {"path": path},
    )


def exhaustive_metric_search(
    model: PrunableModel,
    batches: list[dict],
    num_prune: int,
    metric: str = "cer",
    max_evaluations: int = 1000,
    prefix_cache: bool = True,
) -> SearchResult:
    """The oracle: evaluate all C(L, P) pruned models; refuses above ``max_evaluations``."""
    num_layers = model.num_layers
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
    rows, passes = evaluate_candidates(model, batches, candidates, metric, prefix_cache, progress)
    return SearchResult(
        "oracle", num_prune, metric, rows, _best(rows), time.perf_counter() - start, passes
    )
