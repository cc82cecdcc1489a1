"""The residual-sum score: rank pruning proposals by a first-order view of the pruned model.

A pre-LN encoder layer adds an update to the residual stream, h_l = h_{l-1} + d_l. Pruning the
layers S removes their updates; ignoring how the kept layers react to their changed input, the
pruned model's top state is ``h_L - sum_{l in S} d_l``. A proposal scores the mean over the
calibration rows (utterance means or frames, as the stage-4 dump pooled them) of the cosine
between that approximation and h_L: 1 when nothing changes, lower the more the removed updates
turn the top state. Unlike the correlation measures, the score belongs to the whole proposal,
not to its blocks, so it sees how the removed updates add up or cancel across blocks.

Per row r the score needs only inner products, which :class:`ResidualSumScore` computes once
from the dump: ``top_sq = |h_L|^2``, ``proj[l] = <d_l, h_L>`` and ``gram[l, k] = <d_l, d_k>``.
Then, with ``a = sum_S proj`` and ``q = sum_{l, k in S} gram[l, k]``,

    cos = (top_sq - a) / sqrt(top_sq * (top_sq - 2 a + q)),

so scoring a proposal costs O(P^2) per row, whatever the model width. A row whose top state or
approximation is zero contributes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from comflp.plots import plot_matrix
from comflp.prune.scores.base import SCORES, ProposalScore, ScoreOptions

# Proposal-row products gathered at once (bounds the (proposals, rows) working arrays).
_CHUNK_ELEMENTS = 2**22
_KEYS = ("top_sq", "proj", "gram")


@SCORES.register("residual_sum")
@dataclass(frozen=True)
class ResidualSumScore(ProposalScore):
    """Inner products of the layer updates over the calibration rows (module docstring):
    ``top_sq`` (R,), ``proj`` (L, R) and ``gram`` (L, L, R), float64, layer l at index l - 1."""

    name = "residual_sum"
    file_name = "stats.npz"
    needs_frames = True  # on utterance means it ranks proposals poorly (docs/SEARCH_QUALITY.md)

    top_sq: np.ndarray
    proj: np.ndarray
    gram: np.ndarray

    def __post_init__(self) -> None:
        rows = self.top_sq.shape
        layers = self.proj.shape[0]
        if len(rows) != 1 or self.proj.shape != (layers, *rows):
            raise ValueError(
                f"residual-sum statistics: top_sq {self.top_sq.shape} and proj "
                f"{self.proj.shape} do not fit (expected (R,) and (L, R))"
            )
        if self.gram.shape != (layers, layers, *rows) or layers < 2:
            raise ValueError(
                f"residual-sum statistics: gram is {self.gram.shape}, expected "
                f"({layers}, {layers}, {rows[0]}) for 2 or more layers"
            )
        for key in _KEYS:
            if not np.all(np.isfinite(getattr(self, key))):
                raise ValueError(f"residual-sum statistics: {key} has non-finite entries")

    @classmethod
    def build(
        cls, layer_feats: Sequence[Any], options: ScoreOptions | None = None
    ) -> ResidualSumScore:
        """The statistics of L+1 same-shape (R, D) arrays: the encoder input, then each layer's
        output (the stage-4 dump's order)."""
        if len(layer_feats) < 3:
            raise ValueError(
                f"need the encoder input and 2 or more layer outputs, got {len(layer_feats)} arrays"
            )
        feats = [np.asarray(f, dtype=np.float64) for f in layer_feats]
        if feats[0].ndim != 2 or any(f.shape != feats[0].shape for f in feats):
            shapes = sorted({f.shape for f in feats})
            raise ValueError(f"residual_sum needs same-shape (rows, dim) arrays, got {shapes}")
        top = feats[-1]
        updates = np.stack([b - a for a, b in zip(feats[:-1], feats[1:], strict=True)])
        return cls(
            top_sq=np.einsum("rd,rd->r", top, top),
            proj=np.einsum("lrd,rd->lr", updates, top),
            gram=np.einsum("lrd,krd->lkr", updates, updates),
        )

    @property
    def num_layers(self) -> int:
        return self.proj.shape[0]

    @property
    def num_rows(self) -> int:
        return self.top_sq.shape[0]

    def scores(self, combos: np.ndarray) -> np.ndarray:
        """Scores of the proposals in the rows of ``combos`` ((n, P) pruned layer numbers,
        each row distinct layers of 1..L)."""
        combos = np.asarray(combos, dtype=np.int64) - 1
        step = max(1, _CHUNK_ELEMENTS // self.num_rows)
        return np.concatenate(
            [self._scores(combos[i : i + step]) for i in range(0, len(combos), step)]
            or [np.zeros(0)]
        )

    def _scores(self, idx: np.ndarray) -> np.ndarray:
        removed = self.proj[idx].sum(axis=1)  # (n, R)
        quad = np.zeros_like(removed)
        for i in range(idx.shape[1]):
            quad += self.gram[idx[:, i, None], idx].sum(axis=1)
        num = self.top_sq - removed
        den_sq = self.top_sq * np.maximum(self.top_sq - 2 * removed + quad, 0.0)
        ok = den_sq > 0
        return np.where(ok, num / np.sqrt(np.where(ok, den_sq, 1.0)), 0.0).mean(axis=1)

    def pair_matrix(self) -> np.ndarray:
        """(L, L) scores of pruning the layers {i, j} (the diagonal: layer i alone)."""
        n = self.num_layers
        i, j = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1), indexing="ij")
        singles = self.scores(np.arange(1, n + 1)[:, None])
        off = i != j
        pairs = np.diag(singles)
        pairs[off] = self.scores(np.stack([i[off], j[off]], axis=1))
        return pairs

    def scorer(self, aggregation: str = "mean") -> ResidualSumScore:
        return self  # scores whole proposals: no blocks to aggregate

    def heatmap(self, path: Path, title: str) -> None:
        plot_matrix(self.pair_matrix(), path, title, pairs=True)

    def write(self, path: Path) -> None:
        """The statistics as one ``.npz`` archive (``np.savez`` on an open file)."""
        with open(path, "wb") as f:
            np.savez(f, **{key: getattr(self, key) for key in _KEYS})

    @classmethod
    def read(cls, path: Path) -> ResidualSumScore:
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise ValueError(f"{path}: not an archive written by numpy.savez") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: one array, expected an .npz archive of {', '.join(_KEYS)}")
        with loaded:
            if set(loaded.files) != set(_KEYS):
                raise ValueError(
                    f"{path}: expected the arrays {', '.join(_KEYS)}, found {', '.join(loaded.files)}"
                )
            return cls(**{key: loaded[key].astype(np.float64) for key in _KEYS})
