"""CoMFLP's fallback where its coarse ranking is wrong: a one-swap local search after the fine
search (``--refine``; docs/SEARCH_QUALITY.md, "The fallback").

The fine search measures the dev metric of the composite score's top K, so it also shows
whether that ranking orders them: where the Spearman between their coarse scores and their
metric is not negative, the best of them is no evidence of being near the best proposal. Then, from
that best, every proposal one swap away (one pruned layer kept, one kept layer pruned) is
evaluated, and the best one replaces it while it improves the metric. Plain functions over an
``evaluate`` callable, so stage 6 (real evaluations) and the study (stored CERs) run the same
rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from comflp.prune.ranks import spearman

REFINE_MODES = ("auto", "never", "always")
DEFAULT_REFINE = "auto"  # docs/SEARCH_QUALITY.md, "The fallback where the coarse ranking disagrees"
# When ``auto`` climbs (docs/SEARCH_QUALITY.md, "The check at 0 or above").
AUTO_CONDITION = "the check's Spearman is 0 or above"

Layers = tuple[int, ...]


def ranking_disagrees(scores: Sequence[float], metrics: Sequence[float]) -> float | None:
    """Spearman between coarse scores (higher: better) and the dev metric (lower: better) of
    the proposals a ranking put forward; positive: the ranking orders them the wrong way. None
    with fewer than three or a constant side (nothing to judge)."""
    if len(scores) < 3 or len(set(scores)) < 2 or len(set(metrics)) < 2:
        return None
    return spearman(scores, metrics)


def should_refine(mode: str, agreement: float | None) -> bool:
    """``auto``: only where the ranking's Spearman with the metric is 0 or above (a tie, as a
    reversal, shows the ranking not ordering what it proposed)."""
    if mode not in REFINE_MODES:
        raise ValueError(f"refine mode {mode!r}: expected one of {', '.join(REFINE_MODES)}")
    return mode == "always" or (mode == "auto" and agreement is not None and agreement >= 0)


def one_swap_neighbours(pruned: Layers, num_layers: int) -> list[Layers]:
    """Every set of the same size that keeps one pruned layer and prunes one kept one."""
    kept = [k for k in range(1, num_layers + 1) if k not in pruned]
    return [tuple(sorted((set(pruned) - {p}) | {k})) for p in pruned for k in kept]


def climb(
    start: Layers,
    start_metric: float,
    num_layers: int,
    evaluate: Callable[[list[Layers]], dict[Layers, float]],
    seen: set[Layers],
) -> tuple[Layers, float, int]:
    """Best-improvement local search from ``start``: each round evaluates the neighbours not in
    ``seen`` (which it extends) and moves to the best while it is strictly better. The final
    proposal, its metric and the rounds run."""
    best, best_metric, rounds = tuple(start), start_metric, 0
    while True:
        fresh = [n for n in one_swap_neighbours(best, num_layers) if n not in seen]
        if not fresh:
            return best, best_metric, rounds
        rounds += 1
        seen.update(fresh)
        measured = evaluate(fresh)
        challenger = min(fresh, key=lambda n: measured[n])
        if measured[challenger] >= best_metric:
            return best, best_metric, rounds
        best, best_metric = challenger, measured[challenger]
