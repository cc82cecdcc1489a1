"""Stage-6 searches (:data:`SEARCHES`): CoMFLP over the scores, GLP, the oracle; each module
of this package registers its search."""

from comflp.prune.searches.base import (
    SEARCHES,
    ModelRef,
    Search,
    SearchContext,
    SearchSettings,
    read_search,
)

__all__ = ["SEARCHES", "ModelRef", "Search", "SearchContext", "SearchSettings", "read_search"]
