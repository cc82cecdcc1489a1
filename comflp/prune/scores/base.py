"""What every proposal score is: built from the stage-4 dump, saved, loaded, drawn, and asked
for the scores of pruning proposals (the coarse search's input).

Stage 5 builds each score named in ``--scores`` once and writes ``scores/<name>/`` (its file,
``heatmap.png``, ``settings.json``); stage 6 loads them and ranks proposals with their
:meth:`ProposalScore.scorer`. Scores register themselves in :data:`SCORES`; a new one is one
module in this package (docs/DESIGN.md, "Adding a score").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from comflp.prune.search import ProposalScorer
from comflp.registry import Registry
from comflp.settings import option

SCORES: Registry[type[ProposalScore]] = Registry("score", "comflp.prune.scores")


@dataclass(kw_only=True)
class ScoreOptions:
    """Options of the scores that take any (stage 5)."""

    dc_batch_size: int = option(
        32, "dc: mean of DC over batches of this many rows (CoMFLP's setting; 0: one batch)"
    )
    svcca_threshold: float = option(0.99, "svcca/pwcca: singular-value mass kept")


@dataclass(kw_only=True)
class ScoreChoice:
    """The scores stages 5-8 build, rank proposals by and report (docs/SEARCH_QUALITY.md)."""

    scores: list[str] = option(
        ["residual_sum", "dc"],
        "coarse scores: each built once by stage 5; stage 6 merges their consensus's top K",
        choices=lambda: SCORES.names(),
    )


class ProposalScore(ABC):
    """A coarse score of pruning proposals: higher means better to prune."""

    name: ClassVar[str]  # its registry name
    file_name: ClassVar[str]  # what it stores in scores/<name>/
    needs_frames: ClassVar[bool] = False  # refuses a dump of utterance means
    aggregates: ClassVar[bool] = False  # scores blocks, so --coarse_aggregation applies

    @classmethod
    @abstractmethod
    def build(cls, layer_feats: Sequence[np.ndarray], options: ScoreOptions) -> ProposalScore:
        """The score of L+1 (rows, D) arrays in layer-index order (the dump); ValueError when
        they cannot be used."""

    @classmethod
    @abstractmethod
    def read(cls, path: Path) -> ProposalScore:
        """A score written by :meth:`write`; ValueError says what is wrong with the file."""

    @abstractmethod
    def write(self, path: Path) -> None:
        """Write the score's file (the caller makes it atomic)."""

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def scorer(self, aggregation: str = "mean") -> ProposalScorer:
        """What the coarse search ranks proposals with (``aggregation``: matrix scores only)."""

    @abstractmethod
    def heatmap(self, path: Path, title: str) -> None:
        """Draw the score as a layer-by-layer heatmap PNG."""

    @classmethod
    def options(cls, options: ScoreOptions) -> dict:
        """The options this score uses, as stage 5 records them."""
        return {}


def build_score(
    name: str, layer_feats: Sequence[np.ndarray], options: ScoreOptions
) -> ProposalScore:
    return SCORES[name].build(layer_feats, options)


def read_score_file(path: Path) -> ProposalScore:
    """A score file of any registered score, recognised by its suffix (``--matrix`` of
    bin/search.py takes a matrix ``.npy`` or residual-sum statistics ``.npz``)."""
    readers: dict[str, type[ProposalScore]] = {}
    for name in SCORES:
        cls = SCORES[name]
        owner = next(c for c in cls.__mro__ if "read" in vars(c))  # the file format's class
        readers.setdefault(Path(cls.file_name).suffix, owner)
    suffix = Path(path).suffix
    if suffix not in readers:
        raise ValueError(f"a score file ends in {' or '.join(readers)}, got {Path(path).name!r}")
    return readers[suffix].read(Path(path))
