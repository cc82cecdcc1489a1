"""Hard-concrete gates (Louizos et al. 2018): a relaxed binary mask whose expected L0 norm is
differentiable in its parameters.

A gate group holds one ``log_alpha`` per prunable entry. In training a gate value is drawn as
``u ~ U(eps, 1 - eps)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``z = clamp(s (r - l) + l, 0, 1)`` with ``beta = 2/3``, stretch ``l = -0.1``, ``r = 1.1``, so
that exact zeros and ones occur. The probability that an entry is non-zero (its expected L0) is
``sigmoid(log_alpha - beta log(-l / r))``.

In eval the gates are deterministic (CoFi, Xia et al. 2022; DPHuBERT): a group keeps the
``round(expected L0)`` entries with the largest ``log_alpha`` at their median value
``clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)`` (1 for a confident gate) and zeroes the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

BETA = 2.0 / 3.0
LIMIT_L, LIMIT_R = -0.1, 1.1
LOG_ALPHA_RANGE = (-10.0, 10.0)
_EPS = 1e-6
# log(-l / r): the shift between log_alpha and the logit of P(z != 0).
_L0_SHIFT = BETA * math.log(-LIMIT_L / LIMIT_R)


class HardConcrete(nn.Module):
    """``n`` hard-concrete gates, initialised at ``init_log_alpha`` (+ N(0, 0.01) to break ties)."""

    def __init__(self, n: int, init_log_alpha: float):
        super().__init__()
        if n < 1:
            raise ValueError(f"a gate group needs at least one entry, got {n}")
        self.log_alpha = nn.Parameter(torch.full((n,), float(init_log_alpha)))
        with torch.no_grad():
            self.log_alpha.add_(torch.randn(n) * 0.01)

    @property
    def n(self) -> int:
        return self.log_alpha.numel()

    def prob_nonzero(self) -> torch.Tensor:
        """P(z_i != 0) per entry: the expected L0 norm, differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha - _L0_SHIFT)

    def sample(self) -> torch.Tensor:
        """One random draw of the gate values (training)."""
        u = torch.rand_like(self.log_alpha).clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """Eval values: the ``round(expected L0)`` entries with the largest ``log_alpha`` at
        their median value, the others 0."""
        median = (torch.sigmoid(self.log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)
        keep = int(round(float(self.prob_nonzero().sum())))
        z = torch.zeros_like(median)
        if keep > 0:
            top = torch.topk(self.log_alpha, keep).indices
            z[top] = median[top]
        return z

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep ``log_alpha`` in :data:`LOG_ALPHA_RANGE` (after each optimiser step)."""
        self.log_alpha.clamp_(*LOG_ALPHA_RANGE)
