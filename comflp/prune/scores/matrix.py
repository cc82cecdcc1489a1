"""CoMFLP's scores: a layer-to-layer correlation matrix per measure of
:mod:`comflp.prune.correlation` (dc, svcca, pwcca, cka, cosine, angular, change); a proposal
scores its blocks' ``M[a-1][b]`` (:class:`~comflp.prune.search.BlockScorer`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from comflp.plots import plot_matrix
from comflp.prune.correlation import MEASURES, correlation_matrix
from comflp.prune.scores.base import SCORES, ProposalScore, ScoreOptions
from comflp.prune.search import BlockScorer, validate_matrix


class MatrixScore(ProposalScore):
    """An (L+1) x (L+1) correlation matrix of one measure."""

    file_name = "matrix.npy"
    aggregates = True
    measure: ClassVar[str] = "matrix"  # a matrix read from a file names no measure

    def __init__(self, matrix: np.ndarray):
        self.matrix = validate_matrix(matrix)

    @classmethod
    def options(cls, options: ScoreOptions) -> dict:
        if cls.measure == "dc":
            return {"batch_size": options.dc_batch_size or None}
        if cls.measure in ("svcca", "pwcca"):
            return {"threshold": options.svcca_threshold}
        return {}

    @classmethod
    def build(cls, layer_feats: Sequence[np.ndarray], options: ScoreOptions) -> MatrixScore:
        return cls(correlation_matrix(layer_feats, cls.measure, **cls.options(options)))

    @classmethod
    def read(cls, path: Path) -> MatrixScore:
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise ValueError(f"{path}: not an array file written by numpy.save") from None
        if not isinstance(loaded, np.ndarray):
            raise ValueError(f"{path}: an archive of arrays, expected one matrix")
        return cls(loaded)

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, self.matrix)

    @property
    def num_layers(self) -> int:
        return self.matrix.shape[0] - 1

    def scorer(self, aggregation: str = "mean") -> BlockScorer:
        return BlockScorer(self.matrix, aggregation)

    def heatmap(self, path: Path, title: str) -> None:
        plot_matrix(self.matrix, path, title)


for _measure in MEASURES:
    SCORES.add(
        _measure,
        type(
            f"{_measure.capitalize()}Score", (MatrixScore,), {"measure": _measure, "name": _measure}
        ),
    )
