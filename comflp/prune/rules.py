"""Fixed layer-selection rules CoMFLP is compared with: no data, no search (:data:`RULES`).

Drop the top P layers (with intermediate CTC this is also Lee et al.'s pruning on demand: exit
at layer L - P through the final norm and the shared CTC head, listed as its own rule only for
models trained with intermediate CTC), drop the bottom P, drop P evenly spaced layers ("every
other" when P = L/2), or P at random (one choice per seed). For a decoder stack only,
Distil-Whisper's initialisation (Gandhi et al. 2023): keep the first and the last layer and the
rest maximally spaced between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from comflp.errors import InputError
from comflp.registry import Registry
from comflp.subsets import check_num_prune


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


def distil_whisper(num_layers: int, num_prune: int) -> tuple[int, ...]:
    """Distil-Whisper's student decoder: keep K = L - P layers, ``np.linspace(0, L-1, K)``
    truncated to integers (0-indexed, computed as their code computes it) with the last forced
    to L-1: the first and the last layer and the others maximally spaced. L=8, P=4 keeps
    1 3 5 8; L=32, P=30 keeps 1 32; K=1 keeps the last layer."""
    check_num_prune(num_prune, num_layers)
    mapping = np.linspace(0, num_layers - 1, num_layers - num_prune, dtype=int)
    mapping[-1] = num_layers - 1
    kept = {int(k) + 1 for k in mapping}
    return tuple(k for k in range(1, num_layers + 1) if k not in kept)


def random_layers(num_layers: int, num_prune: int, seed: int) -> tuple[int, ...]:
    check_num_prune(num_prune, num_layers)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.arange(1, num_layers + 1), num_prune, replace=False)
    return tuple(sorted(int(x) for x in chosen))


@dataclass(frozen=True)
class Rule:
    """A fixed rule: the layers it prunes (``choose(L, P, seed)``), a note for the table, the
    stacks it is meant for, and whether it needs a model trained with intermediate CTC."""

    choose: Callable[[int, int, int], tuple[int, ...]]
    note: str = ""
    stacks: tuple[str, ...] = ("encoder", "decoder")
    needs_interctc: bool = False
    seeded: bool = False  # one row per seed


RULES: Registry[Rule] = Registry("rule")
RULES.add("drop_top", Rule(lambda n, p, _: drop_top(n, p)))
RULES.add(
    "interctc_on_demand",
    Rule(
        lambda n, p, _: drop_top(n, p),
        "exit at layer L-P via the shared final norm and CTC head: same model as drop_top",
        stacks=("encoder",),
        needs_interctc=True,
    ),
)
RULES.add("drop_bottom", Rule(lambda n, p, _: drop_bottom(n, p)))
RULES.add("every_other", Rule(lambda n, p, _: every_other(n, p)))
RULES.add("random", Rule(random_layers, seeded=True))
RULES.add(
    "distil_whisper",
    Rule(
        lambda n, p, _: distil_whisper(n, p),
        "Distil-Whisper: the first and last decoder layers kept, the rest maximally spaced",
        stacks=("decoder",),
    ),
)


# Rules whose proposal joins CoMFLP's fine search (--fine_rules; docs/SEARCH_QUALITY.md, "The
# top-P proposal in the fine search").
DEFAULT_FINE_RULES = ["drop_top"]


def rule_proposals(
    names: Sequence[str], stack: str, num_layers: int, num_prune: int
) -> dict[str, tuple[int, ...]]:
    """Each rule of ``names`` that fits ``stack``: its proposal for P (a seeded rule: seed 0),
    for a fine search to evaluate beside the scores' (InputError for a rule of another stack)."""
    return {
        n: RULES[n].choose(num_layers, num_prune, 0)
        for n in rules_for(list(names), stack, has_interctc=True)
    }


def rules_for(
    names: list[str], stack: str, has_interctc: bool, run_stacks: Sequence[str] = ()
) -> list[str]:
    """The rules of ``names`` (``all``: every registered one that fits) for a stack and model.
    A named rule must fit the stack, or with ``run_stacks`` (the stacks of a run that prunes
    several) one of them, and is left out of those it does not fit; InputError otherwise. A
    rule that needs intermediate CTC is left out for a model without it (it would repeat
    drop_top under another name)."""
    if names == ["all"]:
        return [
            n
            for n in RULES
            if stack in RULES[n].stacks and (has_interctc or not RULES[n].needs_interctc)
        ]
    RULES.check(names, "--rules")
    stacks = list(run_stacks) or [stack]
    for n in names:
        if not set(stacks) & set(RULES[n].stacks):
            raise InputError(
                f"--rules {n}: a rule for the {' and '.join(RULES[n].stacks)} stack, "
                f"not the {' and '.join(stacks)}"
            )
    return [
        n
        for n in names
        if stack in RULES[n].stacks and (has_interctc or not RULES[n].needs_interctc)
    ]
