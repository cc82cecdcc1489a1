"""Target-sparsity control (CoFi, Xia et al. 2022): ``lambda1 (s - t) + lambda2 (s - t)^2``.

``s`` is the expected sparsity of the gates, ``t`` the current target. The multipliers are
trained by gradient ascent (their optimiser group has ``maximize=True``) while everything else
descends, so any persistent gap ``s - t`` grows the penalty until the gates close it. ``t``
ramps linearly from 0 to the final target over the warm-up, then stays there.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Lagrangian(nn.Module):
    """The two multipliers, both starting at 0."""

    def __init__(self):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected_sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected_sparsity - target
        return self.lambda1 * gap + self.lambda2 * gap * gap


def constant_lr(step: int) -> float:
    """The LambdaLR factor of the gates' and multipliers' groups: their rates stay fixed."""
    return 1.0


def target_at(step: int, warmup_steps: int, target: float) -> float:
    """The target sparsity after ``step`` optimiser steps: 0 -> ``target`` over the warm-up."""
    if warmup_steps <= 0:
        return target
    return target * min(1.0, step / warmup_steps)
