"""The consensus score: rank aggregation of the other scores of ``--scores`` (a composite score).

The scores live on different scales (a mean block correlation, a mean cosine), so each is
standardised over a reference set of proposals of the same size and the consensus is the mean
of the standardised scores. A proposal every score rates well ranks first; one that a single
score likes and the others do not sinks. The reference set of size k is all C(L, k) proposals
up to :data:`REFERENCE_PROPOSALS` of them, else the first k layers of each of
:data:`SAMPLED_PROPOSALS` seeded random orderings of the layers (a uniform sample of k-sets for
every k, nested so that a score computes all sizes in one pass: :func:`prefix_scores`). Its
cost is the members' (already built) plus scoring the reference sets.

Stage 5 writes only which scores it is made of (``scores/consensus/members.json``) and draws the
consensus of pruning each pair of layers; stage 6 ranks with it like any score, and its top K
joins the fine search whole (:class:`~comflp.prune.scores.base.CompositeScore`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from comflp.plots import plot_matrix
from comflp.prune.scores.base import SCORES, CompositeScore, ProposalScore
from comflp.prune.search import (
    ProposalScorer,
    all_proposals,
    extension_scores,
    pair_matrix,
    prefix_scores,
)

REFERENCE_PROPOSALS = 2000
# Within one size only the ratio of the members' standard deviations moves the ranking; from 256
# uniform proposals each is within about 4.4% (1 / sqrt(2 n)) of the whole population's.
SAMPLED_PROPOSALS = 256


def reference_chains(num_layers: int, seed: int = 0) -> np.ndarray:
    """(:data:`SAMPLED_PROPOSALS`, L) seeded random orderings of the layers 1..L."""
    rng = np.random.default_rng(seed)
    return rng.random((SAMPLED_PROPOSALS, num_layers)).argsort(axis=1) + 1


class ConsensusScorer:
    """The mean of several scorers' scores, each standardised per proposal size; ``max_size``:
    the largest proposals it will be asked to score (sampled reference sizes up to it are
    scored in one pass)."""

    def __init__(
        self, scorers: Sequence[ProposalScorer], seed: int = 0, max_size: int | None = None
    ):
        depths = {s.num_layers for s in scorers}
        if len(scorers) < 2 or len(depths) != 1:
            raise ValueError(
                f"a consensus needs 2 or more scores of one depth, got {sorted(depths)}"
            )
        self.scorers = list(scorers)
        self.seed = seed
        self.max_size = max_size or self.num_layers - 1
        self._moments: dict[int, list[tuple[float, float]]] = {}

    @property
    def num_layers(self) -> int:
        return self.scorers[0].num_layers

    def _standardisers(self, size: int) -> list[tuple[float, float]]:
        if size in self._moments:
            return self._moments[size]
        if math.comb(self.num_layers, size) <= REFERENCE_PROPOSALS:
            sizes = _exhaustive_sizes(self.num_layers, max(size, self.max_size))
            if size not in sizes:  # a large size past a sampled range: C(L, k) small again
                sizes = [size]
            every = [_every_proposal(s, self.num_layers, sizes) for s in self.scorers]
            for k in sizes:
                self._moments.setdefault(k, _moments([values[k] for values in every]))
            return self._moments[size]
        chains = reference_chains(self.num_layers, self.seed)[:, : max(size, self.max_size)]
        grids = [prefix_scores(s, chains) for s in self.scorers]
        for k in range(1, chains.shape[1] + 1):
            if math.comb(self.num_layers, k) > REFERENCE_PROPOSALS:
                self._moments.setdefault(k, _moments([g[:, k - 1] for g in grids]))
        return self._moments[size]

    def extension_scores(self, beam: np.ndarray) -> np.ndarray:
        moments = self._standardisers(beam.shape[1] + 1)
        z = [
            (extension_scores(s, beam) - m) / sd
            for s, (m, sd) in zip(self.scorers, moments, strict=True)
        ]
        return np.mean(z, axis=0)

    def scores(self, combos: np.ndarray) -> np.ndarray:
        combos = np.asarray(combos)
        moments = self._standardisers(combos.shape[1])
        z = [(s.scores(combos) - m) / sd for s, (m, sd) in zip(self.scorers, moments, strict=True)]
        return np.mean(z, axis=0)


def _exhaustive_sizes(num_layers: int, max_size: int) -> list[int]:
    """Sizes 1, 2, ... up to ``max_size`` while every C(L, k) is at most the reference cap."""
    sizes = []
    for k in range(1, max_size + 1):
        if math.comb(num_layers, k) > REFERENCE_PROPOSALS:
            break
        sizes.append(k)
    return sizes


def _every_proposal(scorer: ProposalScorer, num_layers: int, sizes: list[int]) -> dict:
    """The scorer's scores of every proposal of each size (any order: only their moments are
    used), in one depth-first pass where the scorer has one (:meth:`scores_by_size`)."""
    if hasattr(scorer, "scores_by_size") and sizes == list(range(1, len(sizes) + 1)):
        return dict(zip(sizes, scorer.scores_by_size(len(sizes)), strict=True))
    return {k: scorer.scores(all_proposals(num_layers, k)) for k in sizes}


def _moments(values: Sequence[np.ndarray]) -> list[tuple[float, float]]:
    return [(float(v.mean()), float(v.std()) or 1.0) for v in values]


@SCORES.register("consensus")
class ConsensusScore(CompositeScore):
    """The consensus of ``members`` (registry names) on a stack of ``num_layers``; ``scores``:
    their scores, once composed or bound."""

    name = "consensus"
    file_name = "members.json"

    def __init__(
        self,
        members: Sequence[str],
        num_layers: int,
        scores: Sequence[ProposalScore] = (),
        max_size: int | None = None,
    ):
        self.members = tuple(members)
        self._num_layers = num_layers
        self.member_scores = list(scores)
        self.max_size = max_size

    @classmethod
    def compose(cls, scores: dict[str, ProposalScore], options: Any) -> ConsensusScore:
        depths = {s.num_layers for s in scores.values()}
        if len(depths) != 1:
            raise ValueError(f"a consensus needs scores of one depth, got {sorted(depths)}")
        return cls(list(scores), depths.pop(), list(scores.values()))

    def bind(self, scores: dict[str, ProposalScore], max_size: int) -> ConsensusScore:
        missing = [m for m in self.members if m not in scores]
        if missing:
            raise ValueError(
                f"consensus of {' '.join(self.members)}: {' '.join(missing)} not among --scores"
            )
        return ConsensusScore(
            self.members, self._num_layers, [scores[m] for m in self.members], max_size
        )

    @classmethod
    def read(cls, path: Path) -> ConsensusScore:
        try:
            stored = json.loads(Path(path).read_text())
            return cls(stored["members"], int(stored["num_layers"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f'{path}: expected {{"members": [...], "num_layers": L}}') from None

    def write(self, path: Path) -> None:
        Path(path).write_text(
            json.dumps({"members": list(self.members), "num_layers": self._num_layers}) + "\n"
        )

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def scorer(self, aggregation: str = "mean") -> ConsensusScorer:
        if not self.member_scores:
            raise ValueError(f"consensus of {' '.join(self.members)}: not bound to its members")
        return ConsensusScorer(
            [s.scorer(aggregation) for s in self.member_scores], max_size=self.max_size
        )

    def heatmap(self, path: Path, title: str) -> None:
        plot_matrix(pair_matrix(self.scorer()), path, title, pairs=True)
