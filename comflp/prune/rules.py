"""Fixed layer-selection rules CoMFLP is compared with: no data, no search (:data:`RULES`).

Drop the top P layers (with intermediate CTC this is also Lee et al.'s pruning on demand: exit
at layer L - P through the final norm and the shared CTC head, listed as its own rule only for
models trained with intermediate CTC), drop the bottom P, drop P evenly spaced layers ("every
other" when P = L/2), or P at random (one choice per seed).
"""

from __future__ import annotations

from collections.abc import Callable
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


def rules_for(names: list[str], stack: str, has_interctc: bool) -> list[str]:
    """The rules of ``names`` (``all``: every registered one that fits) for a stack and model;
    InputError for a named rule that does not fit the stack. A rule that needs intermediate CTC
    is left out for a model without it (it would repeat drop_top under another name)."""
    if names == ["all"]:
        return [
            n
            for n in RULES
            if stack in RULES[n].stacks and (has_interctc or not RULES[n].needs_interctc)
        ]
    RULES.check(names, "--rules")
    for n in names:
        if stack not in RULES[n].stacks:
            raise InputError(
                f"--rules {n}: a rule for the {' and '.join(RULES[n].stacks)} stack, "
                f"not the {stack}"
            )
    return [n for n in names if has_interctc or not RULES[n].needs_interctc]
