"""Layer subsets: how many layers may be pruned, and which a pruned model keeps."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral


def check_num_prune(num_prune: int, num_layers: int) -> None:
    """ValueError unless 1 <= ``num_prune`` < ``num_layers`` (a pruned model keeps a layer)."""
    if isinstance(num_prune, bool) or not isinstance(num_prune, Integral):
        raise ValueError(f"num_prune must be an integer, got {num_prune!r}")
    if not 1 <= num_prune < num_layers:
        raise ValueError(
            f"num_prune must be between 1 and {num_layers - 1}, got {num_prune} "
            f"(a {num_layers}-layer model keeps at least one layer)"
        )


def kept_layers(num_layers: int, pruned: Sequence[int]) -> tuple[int, ...]:
    """The layers a model keeps when ``pruned`` are removed."""
    removed = set(pruned)
    return tuple(k for k in range(1, num_layers + 1) if k not in removed)
