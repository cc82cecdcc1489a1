"""What a stage-6 search is: it chooses the layers to prune for each P, writes what it
evaluated (``search.json``), and gives stage 7 its rows. Searches register themselves in
:data:`SEARCHES`; a new one is one module in this package (docs/DESIGN.md, "Adding a search").
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from comflp.adapters.base import ModelSettings
from comflp.asr.data import EVAL_MAX_DURATION
from comflp.expdir import ExpDir
from comflp.prune.evaluator import METRICS
from comflp.prune.method_list import Method
from comflp.prune.metric_search import SearchResult
from comflp.prune.rules import DEFAULT_FINE_RULES, RULES
from comflp.prune.scores.base import ScoreChoice
from comflp.prune.search import (
    AGGREGATIONS,
    COARSE_BEAM_SIZE,
    COARSE_TOP_K,
    DEFAULT_MAX_EXHAUSTIVE,
    MODES,
)
from comflp.prune.searches.refine import DEFAULT_REFINE, REFINE_MODES
from comflp.prune.stacks import LayerStack
from comflp.registry import Registry
from comflp.settings import option

SEARCHES: Registry[type[Search]] = Registry("search", "comflp.prune.searches")


@dataclass(kw_only=True)
class MergeChoice:
    """Which coarse proposals CoMFLP's one fine search evaluates (stage 6 and the study)."""

    top_k: int = option(
        COARSE_TOP_K,
        "coarse proposals passed to the fine search: the composite scores' (the consensus's), "
        "else each score's",
        low=1,
    )
    score_top_k: int = option(
        1,
        "with a composite score among --scores, each other score's own coarse proposals "
        "joining the merge (at most --top_k)",
        low=0,
    )
    fine_rules: list[str] = option(
        DEFAULT_FINE_RULES,
        "fixed rules (stage 7's) whose proposal for each P joins the fine search, one "
        "evaluation each ('': none)",
        choices=lambda: RULES.names(),
    )
    refine: str = option(
        DEFAULT_REFINE,
        "after the fine search, a one-swap local search from its best proposal: auto where the "
        "composite score's evaluated top K does not order their dev metric (Spearman >= 0)",
        choices=REFINE_MODES,
    )


@dataclass(kw_only=True)
class SearchSettings(ModelSettings, ScoreChoice, MergeChoice):
    """Stage 6: the searches, their P values, the coarse and the fine search."""

    exp_dir: Path | None = option(
        None, "experiment directory (none: coarse search of --matrix only)"
    )
    num_prune: list[str] = option(["6"], "layers to prune: values, 'all' (1..L-1) or A:B[:STEP]")
    search_methods: list[str] = option(
        ["comflp", "glp", "oracle"], "searches to run", choices=lambda: SEARCHES.names()
    )
    search_mode: str = option("beam", "coarse search", choices=MODES, aliases=("--mode",))
    coarse_aggregation: str = option(
        "mean",
        "matrix scores: a proposal's score is the mean of its blocks' correlations (CoMFLP) or "
        "minus their summed damage 1 - correlation",
        choices=AGGREGATIONS,
        aliases=("--aggregation",),
    )
    beam_size: int = option(COARSE_BEAM_SIZE, "coarse beam search: beam width", low=1)
    max_exhaustive: int = option(
        DEFAULT_MAX_EXHAUSTIVE, "refuse an exhaustive coarse search over more proposals", low=1
    )
    fine_metric: str = option(
        "cer",
        "task metric of the fine search, GLP and the oracle",
        choices=METRICS,
        aliases=("--metric",),
    )
    fine_num_utts: int = option(
        320, "dev utterances the metric is measured on", aliases=("--num_utts",), low=2
    )
    prefix_cache: bool = option(True, "compute the layers candidates share once")
    oracle_max_evaluations: int = option(1000, "oracle: skip (and say so) above this many C(L, P)")
    dev_cuts: Path | None = option(None, "cuts of the dev set (with --exp_dir)")
    seed: int = option(0, "seed of the random dev subset")
    max_duration: float = option(EVAL_MAX_DURATION, "seconds of audio per evaluation batch")
    matrix: Path | None = option(
        None, "a score file (matrix .npy, residual-sum .npz) instead of stage 5's scores"
    )
    output: Path | None = option(None, "coarse search only: the proposals JSON to write")


@dataclass
class SearchContext:
    """What a search runs on: its settings, the stack, the dev batches, the experiment."""

    settings: SearchSettings
    stack: LayerStack
    batches: list[dict]
    exp: ExpDir


@dataclass(frozen=True)
class ModelRef:
    """The model rows of stage 7 prune: type, directory and stack."""

    model_type: str
    model_dir: str
    stack: str = "encoder"

    def method(self, name: str, num_prune: int, pruned: list[int], **kwargs) -> Method:
        return Method(
            name,
            num_prune,
            list(pruned),
            self.model_dir,
            model_type=self.model_type,
            stack=self.stack,
            **kwargs,
        )


class Search(ABC):
    """One search of stage 6."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, ctx: SearchContext, prunes: list[int]) -> dict[int, SearchResult | str]:
        """The result for each P, or why the search skipped that P."""

    @abstractmethod
    def methods(self, search: dict, model: ModelRef) -> list[Method]:
        """Stage 7's rows from this search's ``search.json`` of one P."""


def read_search(exp: ExpDir, name: str, num_prune: int) -> dict:
    """A stage-6 ``search.json``; FileNotFoundError says which run of stage 6 writes it."""
    path = exp.search_result(name, num_prune)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found (run stage 6 with --num_prune {num_prune} and "
            f"{name} among its searches)"
        )
    return json.loads(path.read_text())
