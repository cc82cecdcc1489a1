"""Rank statistics between a score and a task metric over proposals: Spearman's rho and
Kendall's tau-b with tied values handled (the search-quality study, and stage 6's check of its
coarse ranking, :mod:`comflp.prune.searches.refine`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def paired(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-D float arrays of the same length, at least 2 (ValueError otherwise)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"need two 1-D arrays of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 values, got {len(x)}")
    return x, y


def average_ranks(x: Any) -> np.ndarray:
    """Ranks 1..n of ``x``; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(x))
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2.0)[group]
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (NaN if one is constant)."""
    x, y = paired(x, y)
    rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else math.nan


def kendall_tau(x: Any, y: Any) -> float:
    """Kendall's tau-b, (C - D) / sqrt((n0 - n1)(n0 - n2)) over all pairs, with n1 and n2 the
    pairs tied in x and in y (NaN if one is constant). O(n^2) memory: meant for n <= a few
    thousand."""
    x, y = paired(x, y)
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[j] - x[i]), np.sign(y[j] - y[i])
    n0 = len(i)
    den = math.sqrt(float(n0 - np.sum(sx == 0)) * float(n0 - np.sum(sy == 0)))
    return float(np.sum(sx * sy)) / den if den > 0 else math.nan
