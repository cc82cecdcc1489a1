"""Greedy layer pruning (GLP): remove, one step at a time, the layer whose removal hurts the
dev metric least; one greedy path serves every P up to the largest."""

from __future__ import annotations

from comflp.prune.method_list import Method
from comflp.prune.metric_search import SearchResult, greedy_layer_pruning
from comflp.prune.searches.base import SEARCHES, ModelRef, Search, SearchContext


@SEARCHES.register("glp")
class GreedyLayerPruning(Search):
    name = "glp"

    def run(self, ctx: SearchContext, prunes: list[int]) -> dict[int, SearchResult]:
        s = ctx.settings
        return greedy_layer_pruning(ctx.stack, ctx.batches, prunes, s.fine_metric, s.prefix_cache)

    def methods(self, search: dict, model: ModelRef) -> list[Method]:
        return [
            model.method(
                self.name,
                search["num_prune"],
                search["best_layers"],
                search_seconds=search["seconds"],
                evaluations=search["evaluations"],
                note=f"greedy by dev {search['metric']}",
            )
        ]
