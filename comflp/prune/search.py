"""Coarse search of CoMFLP: rank layer-pruning proposals by a layer correlation matrix.

Layers are numbered 1..L and the matrix is (L+1) x (L+1), index 0 being the encoder input.
A proposal (a set of pruned layers) splits into maximal contiguous blocks [a..b]; a block
scores ``M[a-1][b]`` (how alike the block's input and output are) and the proposal scores the
mean of its blocks. Higher is better. Every ranking is a stable sort, so ties keep the order
in which the candidates were generated.

The searches take a matrix (scored by :class:`BlockScorer`) or any :class:`ProposalScorer`,
which scores whole proposals at once, e.g. the residual-sum score of
:mod:`comflp.prune.scores.residual_sum`; the aggregation applies to matrices only.

Aggregations of the block scores (``aggregation`` of :func:`coarse_search`):

- ``mean`` (CoMFLP, the default): the mean of the blocks' ``M[a-1][b]``;
- ``damage``: minus the sum of the blocks' damages ``1 - M[a-1][b]``, which, unlike the
  mean, counts every block, so splitting the pruned layers into more blocks costs more.

Search modes of :func:`coarse_search`:

- ``exhaustive``: score all C(L, P) proposals (vectorised), in lexicographic order of their
  layer tuples, and return the best ``top_k``.
- ``beam``: start from the empty set; each step extends every beam entry by one more layer
  (entries in beam order, layers ascending), drops repeated sets (the first one generated
  stays), ranks the partial proposals and keeps the best ``beam_size``. The last step keeps
  the best ``top_k`` instead, so with ``top_k <= beam_size`` the result is the top of the
  final beam, and a larger ``top_k`` returns more of the final step's ranking. It returns
  fewer than ``top_k`` when the last step has fewer distinct candidates.
- ``greedy``: the beam search with a beam of one. It follows the single greedy path for P - 1
  steps and returns the best ``top_k`` extensions of that path at the last step; the first
  result is the greedy proposal itself (``top_k=1`` gives only that one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, combinations
from typing import Any, Protocol, runtime_checkable

import numpy as np

from comflp.subsets import check_num_prune

MODES = ("beam", "greedy", "exhaustive")
AGGREGATIONS = ("mean", "damage")
DEFAULT_MAX_EXHAUSTIVE = 2_000_000
COARSE_BEAM_SIZE = 10  # the coarse beam search's width (--beam_size)
COARSE_TOP_K = 10  # coarse proposals the fine search evaluates (--top_k)
_CHUNK = 65_536  # proposals scored at once by the exhaustive search


def blocks_of(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs (a, b), inclusive, of layers: [1, 3, 4] -> [(1, 1), (3, 4)]."""
    ordered = sorted(int(x) for x in layers)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"layers must be distinct, got {ordered}")
    blocks: list[tuple[int, int]] = []
    for layer in ordered:
        if blocks and blocks[-1][1] == layer - 1:
            blocks[-1] = (blocks[-1][0], layer)
        else:
            blocks.append((layer, layer))
    return blocks


def layers_of(blocks: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """The sorted layer numbers that inclusive blocks (a, b) cover."""
    layers: list[int] = []
    for a, b in blocks:
        if int(a) > int(b):
            raise ValueError(f"block [{a}, {b}] ends before it starts")
        layers.extend(range(int(a), int(b) + 1))
    if len(set(layers)) != len(layers):
        raise ValueError(f"blocks overlap: {[list(x) for x in blocks]}")
    return tuple(sorted(layers))


@dataclass(frozen=True)
class Proposal:
    """A set of pruned layers (1-indexed) and its coarse score."""

    layers: tuple[int, ...]
    score: float

    def __post_init__(self) -> None:
        layers = tuple(sorted(int(x) for x in self.layers))
        if not layers or layers[0] < 1 or len(set(layers)) != len(layers):
            raise ValueError(f"a proposal needs distinct layer numbers >= 1, got {list(layers)}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "score", float(self.score))

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return blocks_of(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "blocks": [[a, b] for a, b in self.blocks],
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Proposal:
        """Inverse of :meth:`to_dict`; ``layers`` or ``blocks`` may be left out, not both."""
        if "layers" not in d and "blocks" not in d:
            raise ValueError("a proposal needs 'layers' or 'blocks'")
        layers = tuple(sorted(d["layers"])) if "layers" in d else layers_of(d["blocks"])
        if "blocks" in d and layers_of(d["blocks"]) != layers:
            raise ValueError(f"blocks {d['blocks']} do not match layers {list(layers)}")
        return cls(layers, d["score"])


def validate_matrix(matrix: Any, num_layers: int | None = None) -> np.ndarray:
    """Check a correlation matrix and return it as float64; ValueError says what is wrong.

    With ``num_layers`` given, the matrix must belong to a model of that many layers.
    """
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"correlation matrix must be a numeric array ({e})") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"correlation matrix must be a 2-D square array, got shape {m.shape}")
    if m.shape[0] < 3:
        raise ValueError(
            f"correlation matrix is {m.shape[0]} x {m.shape[0]}: need at least 3 x 3 "
            "(the encoder input and 2 or more layers)"
        )
    bad = np.argwhere(~np.isfinite(m))
    if len(bad):
        i, j = bad[0]
        raise ValueError(
            f"correlation matrix has {len(bad)} non-finite entries (NaN or inf), "
            f"the first at [{i}, {j}]"
        )
    if num_layers is not None and m.shape[0] != num_layers + 1:
        raise ValueError(
            f"correlation matrix is {m.shape[0]} x {m.shape[0]}, i.e. for a "
            f"{m.shape[0] - 1}-layer encoder, but the model has {num_layers} layers "
            f"(expected {num_layers + 1} x {num_layers + 1})"
        )
    return m


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}"
        )


def _score(m: np.ndarray, layers: Sequence[int], aggregation: str = "mean") -> float:
    """Aggregated block score, summed left to right exactly as :func:`_combination_scores`
    does."""
    blocks = blocks_of(layers)
    total = 0.0
    if aggregation == "damage":
        for a, b in blocks:
            total -= 1.0 - m[a - 1, b]
        return float(total)
    for a, b in blocks:
        total += m[a - 1, b]
    return float(total / len(blocks))


def score_proposal(matrix: Any, layers: Iterable[int], aggregation: str = "mean") -> float:
    """CoMFLP score of pruning ``layers``: by default the mean over its blocks [a..b] of
    ``M[a-1][b]`` (other aggregations: module docstring)."""
    _check_aggregation(aggregation)
    m = np.asarray(matrix, dtype=np.float64)
    layers = sorted(int(x) for x in layers)
    num_layers = m.shape[0] - 1
    if not layers or layers[0] < 1 or layers[-1] > num_layers:
        raise ValueError(f"layers must be a non-empty subset of 1..{num_layers}, got {layers}")
    return _score(m, layers, aggregation)


@runtime_checkable
class ProposalScorer(Protocol):
    """Scores of whole proposals: ``scores`` maps (n, P) rows of sorted, distinct pruned layer
    numbers of 1..``num_layers`` to n scores, higher meaning better to prune."""

    @property
    def num_layers(self) -> int: ...

    def scores(self, combos: np.ndarray) -> np.ndarray: ...


def pair_matrix(scorer: ProposalScorer) -> np.ndarray:
    """(L, L) scores of pruning the layers {i, j} (the diagonal: layer i alone): what a score
    that belongs to whole proposals draws as its heatmap."""
    n = scorer.num_layers
    i, j = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1), indexing="ij")
    pairs = np.diag(scorer.scores(np.arange(1, n + 1)[:, None]))
    off = i != j
    pairs[off] = scorer.scores(np.stack([i[off], j[off]], axis=1))
    return pairs


@dataclass(frozen=True)
class BlockScorer:
    """CoMFLP's score on a correlation matrix: its blocks' ``M[a-1][b]``, aggregated."""

    matrix: np.ndarray
    aggregation: str = "mean"

    def __post_init__(self) -> None:
        _check_aggregation(self.aggregation)
        object.__setattr__(self, "matrix", validate_matrix(self.matrix))

    @property
    def num_layers(self) -> int:
        return self.matrix.shape[0] - 1

    def scores(self, combos: np.ndarray) -> np.ndarray:
        return _combination_scores(self.matrix, combos, self.aggregation)


def as_scorer(source: Any, aggregation: str = "mean") -> ProposalScorer:
    """A :class:`ProposalScorer` as given, or a :class:`BlockScorer` of a matrix."""
    if isinstance(source, ProposalScorer):
        _check_aggregation(aggregation)
        return source
    return BlockScorer(source, aggregation)


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _ranked(candidates: list[Proposal], keep: int) -> list[Proposal]:
    """The ``keep`` best, highest score first; a stable sort keeps ties in generation order."""
    return sorted(candidates, key=lambda p: -p.score)[:keep]


def extension_scores(scorer: ProposalScorer, beam: np.ndarray) -> np.ndarray:
    """(b, L) scores of each beam entry (a row of ``beam``, (b, s) sorted layer numbers, s >= 0)
    with one more layer l, at column l - 1; -inf where l is already in the entry. A scorer
    that scores such extensions faster than as separate sets (the residual-sum score: from the
    entry's sums) defines ``extension_scores(beam)`` itself."""
    beam = np.asarray(beam, dtype=np.int64).reshape(len(beam), -1)
    b, s = beam.shape
    num_layers = scorer.num_layers
    own = getattr(scorer, "extension_scores", None)
    if own is not None:
        grid = np.array(own(beam), dtype=np.float64)
    else:
        added = np.broadcast_to(np.arange(1, num_layers + 1)[None, :, None], (b, num_layers, 1))
        entries = np.broadcast_to(beam[:, None, :], (b, num_layers, s))
        combos = np.sort(np.concatenate([entries, added], axis=2), axis=2)
        grid = np.full((b, num_layers), -np.inf)
        fresh = np.all(combos[:, :, 1:] != combos[:, :, :-1], axis=2)
        if fresh.any():
            grid[fresh] = scorer.scores(combos[fresh])
    grid[np.arange(b)[:, None], beam - 1] = -np.inf
    return grid


def prefix_scores(scorer: ProposalScorer, chains: np.ndarray) -> np.ndarray:
    """(n, K) scores of the first 1..K layers of each row of ``chains`` ((n, K) distinct layer
    numbers in any order). A scorer that extends its sums from one prefix to the next (the
    residual-sum score) defines ``prefix_scores(chains)`` itself."""
    chains = np.asarray(chains, dtype=np.int64)
    own = getattr(scorer, "prefix_scores", None)
    if own is not None:
        return np.asarray(own(chains), dtype=np.float64)
    columns = [scorer.scores(np.sort(chains[:, :k], axis=1)) for k in range(1, chains.shape[1] + 1)]
    return np.stack(columns, axis=1) if columns else np.zeros((len(chains), 0))


def _extensions(
    beam: list[tuple[int, ...]], num_layers: int
) -> list[tuple[tuple[int, ...], int, int]]:
    """Every beam entry plus one more layer, in generation order, repeated sets dropped: the
    set, the entry's index and the layer added."""
    seen: dict[tuple[int, ...], tuple[int, int]] = {}
    for i, layers in enumerate(beam):
        for layer in range(1, num_layers + 1):
            if layer not in layers:
                seen.setdefault(tuple(sorted((*layers, layer))), (i, layer))
    return [(layers, i, layer) for layers, (i, layer) in seen.items()]


def _beam_search(
    scorer: ProposalScorer, num_prune: int, beam_size: int, top_k: int
) -> list[Proposal]:
    beam: list[tuple[int, ...]] = [()]
    ranked: list[Proposal] = []
    for step in range(1, num_prune + 1):
        grid = extension_scores(scorer, np.array(beam, dtype=np.int64).reshape(len(beam), -1))
        candidates = [
            Proposal(c, grid[i, layer - 1]) for c, i, layer in _extensions(beam, scorer.num_layers)
        ]
        ranked = _ranked(candidates, top_k if step == num_prune else beam_size)
        beam = [p.layers for p in ranked]
    return ranked


def all_proposals(num_layers: int, num_prune: int) -> np.ndarray:
    """All C(L, P) sorted layer tuples as rows of an array, in lexicographic order."""
    count = math.comb(num_layers, num_prune)
    flat = chain.from_iterable(combinations(range(1, num_layers + 1), num_prune))
    return np.fromiter(flat, dtype=np.int32, count=count * num_prune).reshape(count, num_prune)


def _combination_scores(m: np.ndarray, combos: np.ndarray, aggregation: str) -> np.ndarray:
    """Scores of many proposals at once, one row of sorted layers each."""
    n, p = combos.shape
    gap = np.diff(combos, axis=1) != 1
    starts = np.concatenate([np.ones((n, 1), dtype=bool), gap], axis=1)
    ends = np.concatenate([gap, np.ones((n, 1), dtype=bool)], axis=1)
    # the block holding position i ends at the first block end at or after i; ends increase
    end_or_max = np.where(ends, combos, m.shape[0])
    block_end = np.minimum.accumulate(end_or_max[:, ::-1], axis=1)[:, ::-1]
    total = np.zeros(n)
    for i in range(p):  # a loop over positions, not proposals; adds in the order _score does
        block = m[combos[:, i] - 1, block_end[:, i]]
        if aggregation == "damage":
            total -= np.where(starts[:, i], 1.0 - block, 0.0)
        else:
            total += np.where(starts[:, i], block, 0.0)
    return total if aggregation == "damage" else total / starts.sum(axis=1)


def score_proposals(source: Any, proposals: Any, aggregation: str = "mean") -> np.ndarray:
    """Scores of many proposals of the same size at once (for a matrix, the vectorised
    :func:`score_proposal`): ``source`` is a correlation matrix or a :class:`ProposalScorer`,
    ``proposals`` a (n, P) array of pruned layer numbers, each row distinct layers of 1..L in
    any order."""
    scorer = as_scorer(source, aggregation)
    combos = np.sort(np.asarray(proposals, dtype=np.int64), axis=1)
    if combos.ndim != 2 or combos.shape[1] == 0:
        raise ValueError(f"proposals must be a (n, P >= 1) array, got shape {combos.shape}")
    num_layers = scorer.num_layers
    if combos.size and (combos.min() < 1 or combos.max() > num_layers):
        raise ValueError(f"proposals must hold layer numbers in 1..{num_layers}")
    if np.any(np.diff(combos, axis=1) == 0):
        raise ValueError("a proposal must not repeat a layer")
    return scorer.scores(combos)


def _exhaustive_search(
    scorer: ProposalScorer, num_prune: int, top_k: int, max_exhaustive: int
) -> list[Proposal]:
    num_layers = scorer.num_layers
    count = math.comb(num_layers, num_prune)
    if count > max_exhaustive:
        raise ValueError(
            f"exhaustive search over C({num_layers}, {num_prune}) = {count} proposals exceeds "
            f"max_exhaustive={max_exhaustive}; raise max_exhaustive (--max_exhaustive) "
            "or use the beam search"
        )
    combos = all_proposals(num_layers, num_prune)
    scores = np.concatenate(
        [scorer.scores(combos[i : i + _CHUNK]) for i in range(0, count, _CHUNK)]
    )
    best = np.argsort(-scores, kind="stable")[:top_k]
    return [Proposal(tuple(combos[i].tolist()), scores[i]) for i in best]


def coarse_search(
    matrix: Any,
    num_prune: int,
    mode: str = "beam",
    beam_size: int = COARSE_BEAM_SIZE,
    top_k: int = COARSE_TOP_K,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    aggregation: str = "mean",
) -> list[Proposal]:
    """Best proposals for pruning ``num_prune`` layers, best first (modes and aggregations:
    module docstring). ``matrix`` is a correlation matrix or a :class:`ProposalScorer`.

    ``exhaustive`` refuses (ValueError) when C(L, P) exceeds ``max_exhaustive``;
    ``beam_size`` is used by ``beam`` only.
    """
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}: choose one of {', '.join(MODES)}")
    scorer = as_scorer(matrix, aggregation)
    check_num_prune(num_prune, scorer.num_layers)
    _check_count("beam_size", beam_size, 1)
    _check_count("top_k", top_k, 1)
    _check_count("max_exhaustive", max_exhaustive, 1)
    if mode == "exhaustive":
        return _exhaustive_search(scorer, num_prune, top_k, max_exhaustive)
    beam = 1 if mode == "greedy" else beam_size
    return _beam_search(scorer, num_prune, beam, top_k)


def format_proposals(proposals: Sequence[Proposal]) -> str:
    """A small text table: rank, score, pruned blocks."""
    lines = [f"{'rank':>4}  {'score':>10}  blocks"]
    for rank, p in enumerate(proposals, 1):
        blocks = " ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in p.blocks)
        lines.append(f"{rank:>4}  {p.score:>10.6f}  {blocks}")
    return "\n".join(lines)
