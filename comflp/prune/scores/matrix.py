"""CoMFLP's scores: a layer-to-layer correlation matrix per measure of
:mod:`comflp.prune.correlation` (dc, svcca, pwcca, cka, cosine, angular, change); a proposal
scores its blocks' ``M[a-1][b]`` (:class:`~comflp.prune.search.BlockScorer`). A matrix score
takes its measure's options, with the measure's defaults, except dc's batch size
(:class:`DcOptions`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from comflp.plots import plot_matrix
from comflp.prune.correlation import MEASURES, correlation_matrix
from comflp.prune.scores.base import SCORES, ProposalScore
from comflp.prune.search import BlockScorer, validate_matrix
from comflp.settings import option


@dataclass(kw_only=True)
class DcOptions:
    """CoMFLP's batched estimate: its published matrices average dCor^2 over batches of rows.
    The measure itself defaults to one batch of all rows, which over a dump's thousands of
    frame rows costs N^2 per layer and is not what the paper computed."""

    batch_size: int = option(
        32, "mean of dCor^2 over batches of this many rows (CoMFLP's; 0: one batch)", low=0
    )


def _options_type(measure: str) -> type:
    """The measure's options as a dataclass with the measure's defaults (dc: :class:`DcOptions`)."""
    if measure == "dc":
        return DcOptions
    defaults = MEASURES[measure].options
    spec = [(k, type(v), option(v, f"{measure}'s {k}")) for k, v in defaults.items()]
    return make_dataclass(f"{measure.capitalize()}Options", spec, kw_only=True)


class MatrixScore(ProposalScore):
    """An (L+1) x (L+1) correlation matrix of one measure."""

    file_name = "matrix.npy"
    aggregates = True
    measure: ClassVar[str] = "matrix"  # a matrix read from a file names no measure

    def __init__(self, matrix: np.ndarray):
        self.matrix = validate_matrix(matrix)

    @classmethod
    def build(cls, layer_feats: Sequence[np.ndarray], options: Any) -> MatrixScore:
        kwargs = asdict(options)
        if "batch_size" in kwargs:
            kwargs["batch_size"] = kwargs["batch_size"] or None  # 0: one batch of all rows
        return cls(correlation_matrix(layer_feats, cls.measure, **kwargs))

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
            f"{_measure.capitalize()}Score",
            (MatrixScore,),
            {"measure": _measure, "name": _measure, "Options": _options_type(_measure)},
        ),
    )
