"""Rank aggregation of several proposal scores: the consensus of the scores CoMFLP searches with.

The scores live on different scales (a mean block correlation, a mean cosine), so each is
standardised over a reference set of proposals of the same size (all C(L, P) of them up to
:data:`REFERENCE_PROPOSALS`, else a seeded uniform sample of that many) and the consensus is
the mean of the standardised scores. A proposal every score rates well ranks first; one that a
single score likes and the others do not sinks. Its cost is the members' (already built) plus
scoring the reference sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

from comflp.prune.search import ProposalScorer

REFERENCE_PROPOSALS = 2000
NAME = "consensus"


def reference_proposals(num_layers: int, size: int, seed: int = 0) -> np.ndarray:
    """All proposals of ``size`` layers, or a seeded uniform sample of them (rows sorted)."""
    if math.comb(num_layers, size) <= REFERENCE_PROPOSALS:
        return np.array(list(combinations(range(1, num_layers + 1), size)), dtype=np.int64)
    rng = np.random.default_rng(seed + size)
    picks = rng.random((REFERENCE_PROPOSALS, num_layers)).argsort(axis=1)[:, :size] + 1
    return np.sort(picks, axis=1)


class ConsensusScorer:
    """The mean of several scorers' scores, each standardised per proposal size."""

    def __init__(self, scorers: Sequence[ProposalScorer], seed: int = 0):
        depths = {s.num_layers for s in scorers}
        if len(scorers) < 2 or len(depths) != 1:
            raise ValueError(
                f"a consensus needs 2 or more scores of one depth, got {sorted(depths)}"
            )
        self.scorers = list(scorers)
        self.seed = seed
        self._moments: dict[int, list[tuple[float, float]]] = {}

    @property
    def num_layers(self) -> int:
        return self.scorers[0].num_layers

    def _standardisers(self, size: int) -> list[tuple[float, float]]:
        if size not in self._moments:
            ref = reference_proposals(self.num_layers, size, self.seed)
            values = [s.scores(ref) for s in self.scorers]
            self._moments[size] = [(float(v.mean()), float(v.std()) or 1.0) for v in values]
        return self._moments[size]

    def scores(self, combos: np.ndarray) -> np.ndarray:
        combos = np.asarray(combos)
        moments = self._standardisers(combos.shape[1])
        z = [(s.scores(combos) - m) / sd for s, (m, sd) in zip(self.scorers, moments, strict=True)]
        return np.mean(z, axis=0)
