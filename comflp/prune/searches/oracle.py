"""The oracle: every C(L, P) pruned model evaluated, the best kept; skipped (and said so) when
there are more than ``--oracle_max_evaluations``."""

from __future__ import annotations

import math

from comflp.prune.method_list import Method
from comflp.prune.metric_search import SearchResult, exhaustive_metric_search
from comflp.prune.searches.base import SEARCHES, ModelRef, Search, SearchContext


@SEARCHES.register("oracle")
class Oracle(Search):
    name = "oracle"

    def run(self, ctx: SearchContext, prunes: list[int]) -> dict[int, SearchResult | str]:
        s, depth = ctx.settings, ctx.stack.num_layers
        out: dict[int, SearchResult | str] = {}
        for p in prunes:
            count = math.comb(depth, p)
            if count > s.oracle_max_evaluations:
                out[p] = (
                    f"C({depth}, {p}) = {count} evaluations > --oracle_max_evaluations "
                    f"{s.oracle_max_evaluations}"
                )
                continue
            out[p] = exhaustive_metric_search(
                ctx.stack, ctx.batches, p, s.fine_metric, count, s.prefix_cache
            )
        return out

    def methods(self, search: dict, model: ModelRef) -> list[Method]:
        return [
            model.method(
                self.name,
                search["num_prune"],
                search["best_layers"],
                search_seconds=search["seconds"],
                evaluations=search["evaluations"],
                note=f"exhaustive by dev {search['metric']}",
            )
        ]
