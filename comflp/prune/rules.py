"""Fixed layer-selection rules CoMFLP is compared with: no model, no data, no search.

Drop the top P layers (which, with intermediate CTC, is also Lee et al.'s pruning on demand:
exit at layer L - P through the final norm and the shared CTC head), drop the bottom P, drop P
evenly spaced layers ("every other" when P = L/2), or P at random (one choice per seed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from comflp.prune.subsets import check_num_prune


def drop_top(num_layers: int, num_prune: int) -> tuple[int, ...]:
    check_num_prune(num_prune, num_layers)
    return tuple(range(num_layers - num_prune + 1, num_layers + 1))


def drop_bottom(num_layers: int, num_prune: int) -> tuple[int, ...]:
    check_num_prune(num_prune, num_layers)
    return tuple(range(1, num_prune + 1))


def every_other(num_layers: int, num_prune: int) -> tuple[int, ...]:
    """P evenly spaced layers ending at the top: L=12, P=6 -> 2, 4, ..., 12; P=4 -> 3, 6, 9, 12."""
    check_num_prune(num_prune, num_layers)
    return tuple(sorted({round((i + 1) * num_layers / num_prune) for i in range(num_prune)}))


def random_layers(num_layers: int, num_prune: int, seed: int) -> tuple[int, ...]:
    check_num_prune(num_prune, num_layers)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.arange(1, num_layers + 1), num_prune, replace=False)
    return tuple(sorted(int(x) for x in chosen))


# The rows of stage 7's table that come from a rule: name -> (rule, note).
FIXED_RULES: dict[str, tuple[Callable[[int, int], tuple[int, ...]], str]] = {
    "drop_top": (drop_top, ""),
    "interctc_on_demand": (
        drop_top,
        "exit at layer L-P via the shared final norm and CTC head: same model as drop_top",
    ),
    "drop_bottom": (drop_bottom, ""),
    "every_other": (every_other, ""),
}
