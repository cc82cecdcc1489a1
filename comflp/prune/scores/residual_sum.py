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

so scoring a proposal never touches the model width, and a set one layer larger than a scored
one costs O(L) per row more (the beam search's extensions, the consensus's nested reference
samples). A row whose top state or approximation is zero contributes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from comflp.plots import plot_matrix
from comflp.prune.scores.base import SCORES, ProposalScore
from comflp.prune.search import pair_matrix

# Proposal-row products gathered at once (bounds the (proposals, rows) working arrays).
_CHUNK_ELEMENTS = 2**22
_KEYS = ("top_sq", "proj", "gram")
_BUILD_ROWS = 256  # calibration rows per block of the statistics' computation


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
    # the last beam's entries -> their sums (a, q, c), so that the next step extends them
    _sums: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
    def build(cls, layer_feats: Sequence[Any], options: Any = None) -> ResidualSumScore:
        """The statistics of L+1 same-shape (R, D) arrays: the encoder input, then each layer's
        output (the stage-4 dump's order)."""
        if len(layer_feats) < 3:
            raise ValueError(
                f"need the encoder input and 2 or more layer outputs, got {len(layer_feats)} arrays"
            )
        feats = [np.asarray(f) for f in layer_feats]
        if feats[0].ndim != 2 or any(f.shape != feats[0].shape for f in feats):
            shapes = sorted({f.shape for f in feats})
            raise ValueError(f"residual_sum needs same-shape (rows, dim) arrays, got {shapes}")
        rows, layers = feats[0].shape[0], len(feats) - 1
        top_sq, proj, gram = (
            np.empty(rows),
            np.empty((layers, rows)),
            np.empty((layers, layers, rows)),
        )
        # in blocks of rows: the float64 states of all rows at once (R x (L+1) x D) would be
        # hundreds of MB of fresh memory, whose first touch costs more than the products
        for start in range(0, rows, _BUILD_ROWS):
            block = slice(start, start + _BUILD_ROWS)
            states = np.stack([f[block] for f in feats], axis=1).astype(np.float64)  # (r, L+1, D)
            top = states[:, -1]
            updates = np.diff(states, axis=1)  # (r, L, D): one small Gram matrix per row
            top_sq[block] = np.einsum("rd,rd->r", top, top)
            proj[:, block] = np.matmul(updates, top[:, :, None])[:, :, 0].T
            gram[:, :, block] = np.matmul(updates, updates.transpose(0, 2, 1)).transpose(1, 2, 0)
        return cls(top_sq=top_sq, proj=proj, gram=gram)

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
        # q sums gram over the pairs of a proposal's layers: for each layer j, the proposals
        # holding j add their membership row times gram[j] (one matrix product per layer,
        # O(P L R) per proposal, rather than gathering its P^2 (R,) entries one by one).
        member = _membership(idx, self.num_layers)
        removed = member @ self.proj  # (n, R)
        quad = np.zeros_like(removed)
        for j in np.unique(idx):
            rows = np.flatnonzero(member[:, j])
            quad[rows] += member[rows] @ self.gram[j]
        return self._cosines(removed, quad)

    def extension_scores(self, beam: np.ndarray) -> np.ndarray:
        """(b, L) scores of each row of ``beam`` ((b, s) pruned layer numbers) with one more
        layer l at column l - 1 (meaningless where l is in the row), from the row's sums ``a``,
        ``q`` and ``c[l] = sum_{k in S} gram[l, k]``: ``a + proj[l]`` and ``q + 2 c[l] +
        gram[l, l]``. A row one layer k larger than a row of the previous call (a beam search's
        next step) gets its sums from that row's in O(L R): ``c += gram[k]``, ``a += proj[k]``,
        ``q += 2 c[k] + gram[k, k]``; any other from scratch."""
        beam = np.asarray(beam, dtype=np.int64) - 1
        num_layers = self.num_layers
        diag = self.gram[np.arange(num_layers), np.arange(num_layers)]  # (L, R)
        grid = np.zeros((len(beam), num_layers))
        sums = {}
        for i, row in enumerate(beam):
            key = tuple(sorted(row.tolist()))
            a, q, c = sums[key] = self._sums.get(key) or self._entry_sums(key)
            removed = a + self.proj
            grid[i] = self._cosines(removed, q + 2 * c + diag)
        self._sums.clear()
        self._sums.update(sums)
        return grid

    def _entry_sums(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, q, c) of the set ``key`` (0-based layers): from a cached subset one layer smaller
        when there is one, else from scratch."""
        for k in key:
            parent = self._sums.get(tuple(x for x in key if x != k))
            if parent is not None:
                a, q, c = parent
                return a + self.proj[k], q + 2 * c[k] + self.gram[k, k], c + self.gram[k]
        rows = self.num_rows
        if not key:
            return np.zeros(rows), np.zeros(rows), np.zeros((self.num_layers, rows))
        c = self.gram[list(key)].sum(axis=0)  # (L, R)
        return self.proj[list(key)].sum(axis=0), c[list(key)].sum(axis=0), c

    def prefix_scores(self, chains: np.ndarray) -> np.ndarray:
        """(n, K) scores of the first 1..K layers of each row of ``chains``: each step adds one
        layer j to a row's sums, ``a += proj[j]`` and ``q += 2 sum_{k in S} gram[j, k] +
        gram[j, j]`` (rows adding the same j share one matrix product)."""
        idx = np.asarray(chains, dtype=np.int64) - 1
        n, steps = idx.shape
        step = max(1, _CHUNK_ELEMENTS // self.num_rows)
        out = np.zeros((n, steps))
        for start in range(0, n, step):
            part = idx[start : start + step]
            rows = np.arange(len(part))
            member = np.zeros((len(part), self.num_layers))
            removed = np.zeros((len(part), self.num_rows))
            quad = np.zeros_like(removed)
            for t in range(steps):
                added = part[:, t]
                for j in np.unique(added):
                    mine = np.flatnonzero(added == j)
                    quad[mine] += 2 * (member[mine] @ self.gram[j]) + self.gram[j, j]
                removed += self.proj[added]
                member[rows, added] = 1.0
                out[start : start + len(part), t] = self._cosines(removed, quad)
        return out

    def scores_by_size(self, max_size: int) -> list[np.ndarray]:
        """The scores of every proposal of each size 1..``max_size`` (entry k - 1: all C(L, k)
        of size k, in no particular order), depth first over the sets in increasing layer
        order, all children of a set at once: a child adding layer j > the set's largest gets
        ``a + proj[j]`` and ``q + 2 c[j] + gram[j, j]`` from its parent's sums, and, to have
        children of its own, ``c + gram[j]`` on the layers above j (the only ones its
        children add): O(L R) per set, where scoring each set from scratch costs O(P L R)."""
        layers, rows = self.num_layers, self.num_rows
        diag = self.gram[np.arange(layers), np.arange(layers)]
        c = np.zeros((max_size + 1, layers, rows))
        out: list[list[np.ndarray]] = [[] for _ in range(max_size)]

        def visit(last: int, depth: int, a: np.ndarray, q: np.ndarray) -> None:
            above = slice(last + 1, layers)
            removed = a + self.proj[above]  # (children, R): each child's a
            quad = q + diag[above]
            quad += 2 * c[depth, above]  # each child's q
            out[depth].append(self._cosines(removed, quad))
            if depth + 1 == max_size:
                return
            for i, j in enumerate(range(last + 1, layers - 1)):
                np.add(c[depth, j + 1 :], self.gram[j, j + 1 :], out=c[depth + 1, j + 1 :])
                visit(j, depth + 1, removed[i], quad[i])

        visit(-1, 0, np.zeros(rows), np.zeros(rows))
        return [np.concatenate(parts) for parts in out]

    def _cosines(self, removed: np.ndarray, quad: np.ndarray) -> np.ndarray:
        """Mean cosine over the rows, from the removed projections ``a`` and squares ``q``
        (module docstring), each (n, R)."""
        den = quad - 2 * removed
        den += self.top_sq
        np.maximum(den, 0.0, out=den)
        den *= self.top_sq  # the squared denominator
        num = self.top_sq - removed
        ok = den > 0
        np.sqrt(den, out=den, where=ok)
        np.divide(num, den, out=num, where=ok)
        num[~ok] = 0.0
        return num.mean(axis=1)

    def scorer(self, aggregation: str = "mean") -> ResidualSumScore:
        return self  # scores whole proposals: no blocks to aggregate

    def heatmap(self, path: Path, title: str) -> None:
        plot_matrix(pair_matrix(self), path, title, pairs=True)

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


def _membership(idx: np.ndarray, num_layers: int) -> np.ndarray:
    """(n, L) rows of 1.0 at each proposal's 0-based layer indices ``idx`` (n, P)."""
    member = np.zeros((len(idx), num_layers))
    member[np.arange(len(idx))[:, None], idx] = 1.0
    return member
