"""Fine search of CoMFLP: evaluate the coarse search's top-K proposals with a task metric."""

from __future__ import annotations

import time
from dataclasses import dataclass

from comflp.asr.model import ASRModel
from comflp.asr.tokenizer import Tokenizer
from comflp.prune.evaluator import evaluate_subsets, kept_layers, layer_evaluations
from comflp.prune.search import Proposal


@dataclass
class FineSearchResult:
    rows: list[dict]  # one per proposal, in coarse order
    best: int  # index into rows
    metric: str
    seconds: float
    layer_evaluations: int  # encoder-layer forward passes per batch

    @property
    def best_layers(self) -> tuple[int, ...]:
        return tuple(self.rows[self.best]["layers"])

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "best": self.best,
            "best_layers": list(self.best_layers),
            "seconds": self.seconds,
            "layer_evaluations_per_batch": self.layer_evaluations,
            "candidates": self.rows,
        }


def fine_search(
    model: ASRModel,
    batches: list[dict],
    tokenizer: Tokenizer,
    proposals: list[Proposal],
    metric: str = "cer",
    prefix_cache: bool = True,
    device: str = "cpu",
) -> FineSearchResult:
    """Evaluate every proposal's pruned model; the best has the lowest ``metric`` (ties: the
    better coarse rank)."""
    if not proposals:
        raise ValueError("fine search needs at least one proposal")
    num_layers = model.cfg.num_layers
    subsets = [kept_layers(num_layers, p.layers) for p in proposals]
    start = time.perf_counter()
    results = evaluate_subsets(model, batches, tokenizer, subsets, prefix_cache, device)
    seconds = time.perf_counter() - start
    rows = [
        {
            "coarse_rank": rank,
            **p.to_dict(),
            "coarse_score": p.score,
            "kept": list(r.kept),
            "cer": r.cer,
            "wer": r.wer,
            "ctc_loss": r.ctc_loss,
            "metric": r.metric(metric),
            "seconds": r.seconds,
        }
        for rank, (p, r) in enumerate(zip(proposals, results), start=1)
    ]
    for row in rows:
        del row["score"]
    best = min(range(len(rows)), key=lambda i: (rows[i]["metric"], i))
    return FineSearchResult(rows, best, metric, seconds, layer_evaluations(subsets, prefix_cache))
