"""Layer subsets: how many layers may be pruned, and which a pruned model keeps."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from comflp.errors import InputError


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


def checked_kept(num_layers: int, layers: Sequence[int], stack: str = "") -> list[int]:
    """The layers kept when ``layers`` are removed; ValueError for a number outside 1..L or
    a removal that keeps nothing (what every adapter's ``prune`` refuses)."""
    pruned = sorted(set(int(k) for k in layers))
    if any(not 1 <= k <= num_layers for k in pruned) or len(pruned) >= num_layers:
        raise ValueError(
            f"cannot remove {stack + ' ' if stack else ''}layers {list(layers)} of a "
            f"{num_layers}-layer model "
            "(layer numbers 1..L, at least one layer kept)"
        )
    return list(kept_layers(num_layers, pruned))


def parse_num_prune(values: Sequence[str | int], num_layers: int, where: str) -> list[int]:
    """The P values of ``--num_prune`` for a stack of ``num_layers`` layers: integers, ``all``
    (1 .. L-1) or ranges ``A:B`` / ``A:B:STEP`` (B included), sorted, each checked."""
    out: set[int] = set()
    for value in values:
        text = str(value)
        try:
            if text == "all":
                out.update(range(1, num_layers))
            elif ":" in text:
                start, stop, *step = (int(x) for x in text.split(":"))
                if len(step) > 1 or (step and step[0] < 1):
                    raise ValueError
                out.update(range(start, stop + 1, step[0] if step else 1))
            else:
                out.add(int(text))
        except ValueError:
            raise InputError(
                f"--num_prune {text!r}: expected integers, 'all' or a range A:B[:STEP], "
                'e.g. "6", "2 4 6", "2:10:2"'
            ) from None
    if not out:
        raise InputError("--num_prune: no value given")
    bad = [p for p in sorted(out) if not 1 <= p < num_layers]
    if bad:
        raise InputError(
            f"--num_prune {bad[0]}: must be between 1 and {num_layers - 1} for {where}"
        )
    return sorted(out)
