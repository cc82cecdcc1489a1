"""Layer-similarity measures of CoMFLP and the layer-to-layer correlation matrix.

Every measure compares two representations of the same N samples (rows): ``x`` (N, D1) and
``y`` (N, D2). All arithmetic is float64 on the device of the (first) input.

| measure | value | options (default) |
| --- | --- | --- |
| ``dc`` | distance correlation dCor^2 of L2-normalised rows, in [0, 1] | ``batch_size`` (None) |
| ``svcca`` | mean canonical correlation after SVD reduction, in [0, 1] | ``threshold`` (0.99) |
| ``pwcca`` | projection-weighted CCA, weighted by x's neurons, in [0, 1] | ``threshold`` (0.99) |
| ``cka`` | linear CKA, in [0, 1] | none |
| ``cosine`` | mean cosine similarity of paired rows (D1 == D2), in [-1, 1] | none |
| ``angular`` | mean of 1 - angle(x_r, y_r) / pi over paired rows (D1 == D2), in [0, 1] | none |
| ``change`` | mean of 1 - ||y_r - x_r|| / (||x_r|| + ||y_r||) over paired rows, in [0, 1] | none |

``dc`` reports dCor^2, not its square root: the CoMFLP code (github.com/louislau1129/CoMFLP,
``DC.py``: ``distance_correlation_from_distmat``, used by ``dc_analysis.py`` to write the
published ``dump/dc_mat_mean_bs*_iter10.npy``) returns
``mean(A * B) / sqrt(mean(A * A) * mean(B * B))`` for double-centred distance matrices A and
B, which is dCov^2 / sqrt(dVar^2(x) dVar^2(y)) = dCor^2 (Szekely et al. 2007). We follow it
(without its 1e-12 / 1e-9 stabilising epsilons) so our matrices are on the published scale.

``svcca`` keeps, per input, the fewest top singular directions of the column-centred data
whose singular values hold ``threshold`` of their sum; ``pwcca`` (Morcos et al. 2018) uses the
same reduction (``threshold=1.0``: plain CCA on the numerical rank) and is not symmetric. Both need N well above the kept dimensions: when the two kept subspaces fill
most of the (N-1)-dimensional centred sample space, the correlations tend to 1 whatever the
data. With D = 1, the L2-normalised rows of ``dc`` are just the signs of the values.

``angular`` is the angular distance of Gromov et al. (2024, "The unreasonable ineffectiveness
of the deeper layers"), arccos(cos(x_r, y_r)) / pi, turned into a similarity and averaged
over the paired rows (frames with a frame-pooled dump, utterances with mean pooling). The angle
is computed as 2 atan2(||u - v||, ||u + v||) of the unit rows u, v, which is exact for equal
rows (arccos of a rounded cosine is not). ``change`` is one minus the relative change of
the residual stream, ||y_r - x_r|| / (||x_r|| + ||y_r||) (in [0, 1] by the triangle
inequality); unlike the other measures it sees the rows' norms. Both compare the same
coordinates, so D1 == D2, as for ``cosine``.

A degenerate input whose normalising term is zero (all rows equal for ``dc``/``cka``/
``svcca``/``pwcca``, a zero row for ``cosine``/``angular``, two zero rows for ``change``)
contributes similarity 0, not NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

# svcca/pwcca: the singular-value mass each input keeps (Raghu et al. 2017's SVCCA keeps 99%).
SUBSPACE_THRESHOLD = 0.99

# Working memory for the N x N kernel rows that correlation_matrix stacks over all layers.
_CHUNK_BYTES = 256 * 2**20
# The rows dc's small batches take at once (see _dc_matrix).
_CACHE_BYTES = 4 * 2**20


# ----------------------------------------------------------------------------- validation


def _resolve_options(measure: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``measure`` and its options; return the options with defaults filled in."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid measures: {', '.join(MEASURES)}")
    allowed = MEASURES[measure].options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        names = ", ".join(unknown)
        raise ValueError(
            f"unknown option(s) {names} for measure {measure!r}; valid options: {valid}"
        )
    resolved = {**allowed, **options}
    if "threshold" in resolved:
        _check_threshold(resolved["threshold"])
    if "batch_size" in resolved:
        _check_batch_size(resolved["batch_size"])
    return resolved


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral):
        raise ValueError(f"batch_size must be an integer >= 2 or None, got {batch_size!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (a batch needs 2 samples), got {batch_size}")


def _as_float64(a: Any, name: str, device: torch.device | None) -> torch.Tensor:
    """One (N, D) representation as a float64 tensor, checked for shape and finiteness."""
    if isinstance(a, torch.Tensor):
        t = a.detach().to(device=device or a.device, dtype=torch.float64)
    else:
        try:
            t = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(device or "cpu")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a numeric (N, D) array ({e})") from None
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(
            f"{name} must be 2-D (N samples, D >= 1 features), got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    return t


def _prepare(feats: Sequence[Any], names: Sequence[str]) -> list[torch.Tensor]:
    """Convert and check representations that must share the same N >= 2 samples."""
    out: list[torch.Tensor] = []
    for a, name in zip(feats, names, strict=True):
        out.append(_as_float64(a, name, out[0].device if out else None))
    n = out[0].shape[0]
    for t, name in zip(out, names, strict=True):
        if t.shape[0] != n:
            raise ValueError(
                f"{name} has {t.shape[0]} samples but {names[0]} has {n}: "
                "all representations must have the same number of samples (rows)"
            )
    if n < 2:
        raise ValueError(f"need at least 2 samples (rows), got {n}")
    return out


def _check_same_dims(measure: str, feats: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    if not MEASURES[measure].paired:
        return
    dims = {t.shape[1] for t in feats}
    if len(dims) > 1:
        shown = ", ".join(f"{name}: {t.shape[1]}" for t, name in zip(feats, names, strict=True))
        raise ValueError(f"{measure} needs equal feature dimensions, got {shown}")


def _batches(n: int, batch_size: int | None) -> list[slice]:
    """Consecutive full batches of rows; a remainder smaller than ``batch_size`` is dropped."""
    if batch_size is None:
        return [slice(0, n)]
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the number of samples {n}")
    return [slice(i, i + batch_size) for i in range(0, n - batch_size + 1, batch_size)]


# ----------------------------------------------------------------------------- building blocks


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _distance_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Euclidean distances from rows ``start:stop`` of ``x`` to all rows, (stop - start, N).

    ``x`` must be column-centred: the Gram-matrix formula then cancels little, and equal
    rows of a constant input come out at distance exactly 0.
    """
    sq = (x * x).sum(dim=1)
    d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
    d2.clamp_(min=0.0)
    rows = torch.arange(stop - start, device=x.device)
    d2[rows, rows + start] = 0.0
    return d2.sqrt_()


def _gram_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the linear kernel ``x x^T``."""
    return x[start:stop] @ x.T


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _dc_input(x: torch.Tensor) -> torch.Tensor:
    """CoMFLP's preprocessing for dc: L2-normalised rows (centred, which distances ignore)."""
    return _centre(_unit_rows(x))


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, low: float) -> torch.Tensor:
    """``num / den`` clipped to [low, 1]; 0 where ``den`` is 0."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num)).clamp(low, 1.0)


def _reduce(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD reduction of the column-centred ``x`` for (SV/PW)CCA.

    Keeps the fewest top singular directions whose singular values hold ``threshold`` of the
    singular-value sum (ignoring numerically null directions). Returns ``u`` (N, k), an
    orthonormal basis of the kept sample-space directions, and ``s v^T`` (k, D), the
    coordinates of the original neurons (columns) in that basis.
    """
    u, s, vh = torch.linalg.svd(_centre(x), full_matrices=False)
    if s[0] == 0:
        return u[:, :0], vh[:0]
    rank = int((s > s[0] * max(x.shape) * torch.finfo(s.dtype).eps).sum())
    held = torch.cumsum(s[:rank], 0) / s[:rank].sum()
    wanted = torch.tensor([threshold - 1e-12], dtype=held.dtype, device=held.device)
    k = min(rank, int(torch.searchsorted(held, wanted)) + 1)
    return u[:, :k], s[:k, None] * vh[:k]


def _cca(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical correlations of two orthonormal bases and the canonical directions.

    Returns ``(rho, p, q)``: the min(k1, k2) correlations, best first, and the coefficients
    (k1, m), (k2, m) of the canonical variates ``u1 @ p`` and ``u2 @ q``.
    """
    p, rho, qh = torch.linalg.svd(u1.T @ u2, full_matrices=False)
    return rho.clamp(0.0, 1.0), p, qh.T


def _projection_weighted(rho: torch.Tensor, coef: torch.Tensor, neurons: torch.Tensor) -> float:
    """Morcos et al. (2018): weight each correlation by how much of the neurons it accounts for.

    ``alpha_i = sum_j |<h_i, z_j>|`` over the neurons z_j, with h_i = u coef[:, i] and
    ``<h_i, z_j> = (coef^T s v^T)_ij`` since ``z_j = u (s v^T)[:, j]`` plus a null part.
    """
    alpha = (coef.T @ neurons).abs().sum(dim=1)
    total = float(alpha.sum())
    return float((alpha * rho).sum()) / total if total > 0 else 0.0


# ----------------------------------------------------------------------------- one pair


def _dc_pair(x: torch.Tensor, y: torch.Tensor) -> float:
    """dCor^2 of the L2-normalised rows, from explicitly double-centred distance matrices."""
    a, b = (_distance_rows(_dc_input(t), 0, t.shape[0]) for t in (x, y))
    a, b = (m - m.mean(0) - m.mean(1, keepdim=True) + m.mean() for m in (a, b))
    den = ((a * a).sum() * (b * b).sum()).sqrt()
    return float(_safe_ratio((a * b).sum(), den, 0.0))


def _dc_similarity(x: torch.Tensor, y: torch.Tensor, batch_size: int | None) -> float:
    spans = _batches(x.shape[0], batch_size)
    return sum(_dc_pair(x[s], y[s]) for s in spans) / len(spans)


def _cka_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with X, Y column-centred."""
    x, y = _centre(x), _centre(y)
    den = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return float(_safe_ratio(torch.linalg.norm(y.T @ x) ** 2, den, 0.0))


def _svcca_similarity(x: torch.Tensor, y: torch.Tensor, threshold: float) -> float:
    rho, _, _ = _cca(_reduce(x, threshold)[0], _reduce(y, threshold)[0])
    return float(rho.mean()) if rho.numel() else 0.0


def _pwcca_similarity(x: torch.Tensor, y: torch.Tensor, threshold: float) -> float:
    (ux, neurons), (uy, _) = _reduce(x, threshold), _reduce(y, threshold)
    rho, p, _ = _cca(ux, uy)
    return _projection_weighted(rho, p, neurons)


def _cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    den = x.norm(dim=1) * y.norm(dim=1)
    return float(_safe_ratio((x * y).sum(dim=1), den, -1.0).mean())


def _angular_rows(x: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """1 - angle / pi between each row of ``x`` (N, D) and the paired rows of every
    ``ys[l]`` (K, N, D): (K, N), 0 where either row is zero."""
    u, v = _unit_rows(x), torch.stack([_unit_rows(y) for y in ys])
    angle = 2.0 * torch.atan2((v - u).norm(dim=2), (v + u).norm(dim=2))
    valid = (x.norm(dim=1) > 0) & (ys.norm(dim=2) > 0)
    return torch.where(valid, 1.0 - angle / torch.pi, torch.zeros_like(angle))


def _change_rows(x: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """1 - ||y_r - x_r|| / (||x_r|| + ||y_r||) for each row of ``x`` (N, D) and every
    ``ys[l]`` (K, N, D): (K, N), 0 where both rows are zero."""
    den = x.norm(dim=1) + ys.norm(dim=2)
    change = ((ys - x).norm(dim=2) / torch.where(den > 0, den, torch.ones_like(den))).clamp(0, 1)
    return torch.where(den > 0, 1.0 - change, torch.zeros_like(change))


def _angular_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(_angular_rows(x, y[None]).mean())


def _change_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(_change_rows(x, y[None]).mean())


def similarity(x: Any, y: Any, measure: str, **options: Any) -> float:
    """Similarity of two representations ``x`` (N, D1) and ``y`` (N, D2) of the same N samples.

    ``measure`` is one of :data:`MEASURES` (see the module docstring for values and options).
    ``dc`` with ``batch_size=B`` is CoMFLP's batched setting: the mean of dCor^2 over the
    consecutive batches of B rows; trailing rows that do not fill a whole batch are dropped
    (as CoMFLP averages full batches only), and B larger than N is an error. ``pwcca`` weights
    the canonical correlations by the neurons (columns) of ``x``. Raises ValueError for an
    unknown measure or option, a bad option value, or unusable inputs.
    """
    opts = _resolve_options(measure, options)
    x, y = _prepare([x, y], ["x", "y"])
    _check_same_dims(measure, [x, y], ["x", "y"])
    return MEASURES[measure].pair(x, y, **opts)


# ----------------------------------------------------------------------------- all pairs


def _centred_kernel_products(
    kernel_rows: Callable[[torch.Tensor, int, int], torch.Tensor], inputs: list[torch.Tensor]
) -> torch.Tensor:
    """``<H K_l H, H K_m H> / n^2`` for all pairs of the per-layer N x N kernels (H centres).

    ``kernel_rows(x, start, stop)`` gives rows ``start:stop`` of a layer's symmetric kernel.
    They are built a block of rows at a time for all layers together, so memory stays near
    ``_CHUNK_BYTES``. With row means m and grand means g of the kernels K and L,
    ``<H K H, H L H> / n^2 = <K, L> / n^2 - 2 m_K . m_L / n + g_K g_L``.
    """
    layers, (n, _) = len(inputs), inputs[0].shape
    step = max(1, _CHUNK_BYTES // (8 * n * layers))
    products = torch.zeros(layers, layers, dtype=torch.float64, device=inputs[0].device)
    means = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = products.new_empty(layers, stop - start, n)
        for layer, x in enumerate(inputs):
            block[layer] = kernel_rows(x, start, stop)
        means.append(block.mean(dim=2))
        flat = block.reshape(layers, -1)
        products += flat @ flat.T
    m = torch.cat(means, dim=1)
    g = m.mean(dim=1)
    return products / n**2 - 2.0 * (m @ m.T) / n + g[:, None] * g[None, :]


def _kernel_matrix(
    kernel_rows: Callable[[torch.Tensor, int, int], torch.Tensor], inputs: list[torch.Tensor]
) -> torch.Tensor:
    """Centred kernel products normalised to ``c_lm / sqrt(c_ll c_mm)``, symmetric, in [0, 1]."""
    c = _centred_kernel_products(kernel_rows, inputs)
    c = (c + c.T) / 2
    d = c.diagonal().clamp(min=0.0)
    return _safe_ratio(c, (d[:, None] * d[None, :]).sqrt(), 0.0)


def _dc_matrix(feats: list[torch.Tensor], batch_size: int | None) -> torch.Tensor:
    spans = _batches(feats[0].shape[0], batch_size)
    size = spans[0].stop - spans[0].start
    if len(spans) == 1 or 8 * len(feats) * size * size > _CACHE_BYTES:
        inputs = ([_dc_input(f[s]) for f in feats] for s in spans)
        return sum(_kernel_matrix(_distance_rows, x) for x in inputs) / len(spans)
    # many small batches (CoMFLP's batch_size): a few batches of every layer per tensor op, a
    # working set small enough to stay in cache
    width = max(f.shape[1] for f in feats)
    step = max(1, _CACHE_BYTES // (8 * len(feats) * size * max(size, width)))
    total = torch.zeros(len(feats), len(feats), dtype=torch.float64, device=feats[0].device)
    for first in range(0, len(spans), step):
        chunk = slice(spans[first].start, spans[min(first + step, len(spans)) - 1].stop)
        total += _batched_dc_matrices([f[chunk] for f in feats], size).sum(dim=0)
    return total / len(spans)


def _batched_dc_matrices(feats: list[torch.Tensor], size: int) -> torch.Tensor:
    """(S, layers, layers) dCor^2 matrices of the S consecutive batches of ``size`` rows of
    each layer's (S * size, D) rows: per batch what :func:`_kernel_matrix` of
    :func:`_distance_rows` computes, with the distance matrices double-centred explicitly."""
    centred = []
    for f in feats:
        x = _unit_rows(f).reshape(-1, size, f.shape[1])
        x = x - x.mean(dim=1, keepdim=True)
        sq = (x * x).sum(dim=-1)
        d = (sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(1, 2))).clamp_(min=0.0)
        d.diagonal(dim1=1, dim2=2).zero_()
        d.sqrt_()
        grand = d.mean(dim=(1, 2), keepdim=True)
        centred.append(d - d.mean(dim=2, keepdim=True) - d.mean(dim=1, keepdim=True) + grand)
    flat = torch.stack(centred, dim=1).flatten(start_dim=2)  # (S, layers, size * size)
    c = flat @ flat.transpose(1, 2)
    c = (c + c.transpose(1, 2)) / 2
    v = c.diagonal(dim1=1, dim2=2).clamp(min=0.0)
    return _safe_ratio(c, (v[:, :, None] * v[:, None, :]).sqrt(), 0.0)


def _cka_matrix(feats: list[torch.Tensor]) -> torch.Tensor:
    return _kernel_matrix(_gram_rows, [_centre(f) for f in feats])


def _cosine_matrix(feats: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.stack([_unit_rows(f) for f in feats]).reshape(len(feats), -1)
    m = flat @ flat.T / feats[0].shape[0]
    return ((m + m.T) / 2).clamp(-1.0, 1.0)


def _svcca_matrix(feats: list[torch.Tensor], threshold: float, chunk: int = 64) -> torch.Tensor:
    """Mean canonical correlations of all pairs: the bases, zero-padded to one width, are
    multiplied pair by pair in chunks and only their singular values computed (padding adds
    zero singular values, so the sum over the first min(k1, k2) is unchanged)."""
    bases = [_reduce(f, threshold)[0] for f in feats]
    ranks = [b.shape[1] for b in bases]
    n, width = len(feats), max(ranks)
    out = torch.zeros(n, n, dtype=torch.float64)
    if width == 0:
        return out
    stacked = bases[0].new_zeros(n, bases[0].shape[0], width)
    for i, b in enumerate(bases):
        stacked[i, :, : ranks[i]] = b
    pairs = torch.triu_indices(n, n)
    for start in range(0, pairs.shape[1], chunk):
        i, j = pairs[:, start : start + chunk]
        rho = torch.linalg.svdvals(stacked[i].transpose(1, 2) @ stacked[j]).clamp(0.0, 1.0)
        k = torch.minimum(torch.tensor(ranks)[i], torch.tensor(ranks)[j]).to(rho.dtype)
        mean = torch.where(k > 0, rho.sum(dim=1) / k.clamp(min=1), torch.zeros_like(k))
        out[i, j] = out[j, i] = mean.to(out.dtype)
    return out


def _pwcca_matrix(feats: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """Row i weights by layer i's neurons; one CCA per unordered pair serves both orders."""
    reduced = [_reduce(f, threshold) for f in feats]
    out = torch.zeros(len(feats), len(feats), dtype=torch.float64)
    for i in range(len(feats)):
        for j in range(i, len(feats)):
            rho, p, q = _cca(reduced[i][0], reduced[j][0])
            out[i, j] = _projection_weighted(rho, p, reduced[i][1])
            out[j, i] = _projection_weighted(rho, q, reduced[j][1])
    return out


def _paired_rows_matrix(
    rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], feats: list[torch.Tensor]
) -> torch.Tensor:
    """Mean over rows of ``rows(x, ys)`` for every pair of layers; symmetric measures, so each
    layer is compared with itself and the later ones only, in chunks of about
    ``_CHUNK_BYTES``."""
    n = len(feats)
    out = torch.zeros(n, n, dtype=torch.float64, device=feats[0].device)
    step = max(1, _CHUNK_BYTES // (8 * feats[0].numel()))
    for i in range(n):
        for start in range(i, n, step):
            stop = min(n, start + step)
            values = rows(feats[i], torch.stack(feats[start:stop])).mean(dim=1)
            out[i, start:stop] = out[start:stop, i] = values
    return out


@dataclass(frozen=True)
class Measure:
    """One measure, all in one place: the similarity of a pair, the all-pairs matrix, the
    options it takes with their defaults, and whether it compares coordinates (D1 == D2)."""

    pair: Callable[..., float]
    matrix: Callable[..., torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    paired: bool = False


MEASURES: dict[str, Measure] = {
    "dc": Measure(_dc_similarity, _dc_matrix, {"batch_size": None}),
    "svcca": Measure(_svcca_similarity, _svcca_matrix, {"threshold": SUBSPACE_THRESHOLD}),
    "pwcca": Measure(_pwcca_similarity, _pwcca_matrix, {"threshold": SUBSPACE_THRESHOLD}),
    "cka": Measure(_cka_similarity, _cka_matrix),
    "cosine": Measure(_cosine_similarity, _cosine_matrix, paired=True),
    "angular": Measure(
        _angular_similarity, lambda feats: _paired_rows_matrix(_angular_rows, feats), paired=True
    ),
    "change": Measure(
        _change_similarity, lambda feats: _paired_rows_matrix(_change_rows, feats), paired=True
    ),
}


def correlation_matrix(layer_feats: Sequence[Any], measure: str, **options: Any) -> np.ndarray:
    """(L+1) x (L+1) float64 matrix of ``similarity(layer_feats[i], layer_feats[j], measure)``.

    ``layer_feats`` holds L+1 (N, D) representations in layer-index order (index 0: the
    encoder input). Per-layer work (distance/Gram matrices, SVD reductions, row norms) is
    done once; all pairs then come from one matrix product (dc, cka, cosine) or a small CCA
    per pair (svcca, pwcca). The matrix is symmetric except for ``pwcca``, whose entry
    [i, j] weights by layer i. Options and errors are those of :func:`similarity`.
    """
    opts = _resolve_options(measure, options)
    if len(layer_feats) == 0:
        raise ValueError("layer_feats is empty: need one (N, D) array per layer index")
    names = [f"layer_feats[{i}]" for i in range(len(layer_feats))]
    feats = _prepare(layer_feats, names)
    _check_same_dims(measure, feats, names)
    return MEASURES[measure].matrix(feats, **opts).cpu().numpy().astype(np.float64)


__all__ = ["MEASURES", "Measure", "correlation_matrix", "similarity"]
