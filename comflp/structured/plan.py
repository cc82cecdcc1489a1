"""What stays of a gated stack: the plan of each module from deterministic gate values, their
exact parameter count, and the values brought to a parameter budget (:func:`meet_budget`).
Model-independent: it sees only :class:`~comflp.structured.masked.Gates` (layout, sizes); the
physical pruning of each model family applies the plans (:mod:`.physical` for comflp's own
encoder, :mod:`.whisper` for Whisper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comflp.structured.gates import LIMIT_L, LIMIT_R
from comflp.structured.layout import gate_name
from comflp.structured.masked import Gates
from comflp.structured.params import entry_size, layout_parameters


@dataclass
class ModulePlan:
    """What stays of one module: kept entries (heads, units, channels), their soft gate values,
    and the module's own gate value."""

    keep: torch.Tensor  # (n,) indices, ascending
    scale: torch.Tensor  # (n,) gate values of the kept entries
    module_scale: float


def module_plans(
    gates: Gates, values: dict[str, torch.Tensor]
) -> tuple[list[dict[str, ModulePlan]], list[int]]:
    """Per layer the plan of each of its modules, and the layers to remove (1-indexed)."""
    plans, removed = [], []
    for k, modules in gates.layout.items():
        layer = {}
        for module, n in modules.items():
            fine = values.get(gate_name(k, module), torch.ones(n)).detach().cpu()
            module_scale = float(values.get(gate_name(k, module, "module"), torch.ones(1)))
            keep = torch.nonzero(fine > 0).flatten() if module_scale > 0 else torch.zeros(0).long()
            layer[module] = ModulePlan(keep, fine[keep], module_scale)
        plans.append(layer)
        layer_off = float(values.get(gate_name(k), torch.ones(1))) == 0
        empty = all(p.keep.numel() == 0 for p in layer.values())
        if layer_off or (empty and gates.empty_layer_is_identity):
            removed.append(k)
    return plans, removed


def _layer_parameters(gates: Gates, values: dict[str, torch.Tensor], k: int | str) -> int:
    """The exact parameters of encoder layer ``k`` that deterministic ``values`` leave (a module
    with no head / unit / channel left goes as a whole)."""
    if gate_name(k) in values and float(values[gate_name(k)]) == 0:
        return 0
    sizes = gates.sizes
    total = sizes["layer"]
    for module, n in gates.layout[k].items():
        module_gate = values.get(gate_name(k, module, "module"))
        fine = values.get(gate_name(k, module))
        kept = n if fine is None else int((fine > 0).sum())
        if kept and (module_gate is None or float(module_gate) > 0):
            total += sizes["module"] + entry_size(sizes, module) * kept
    return total


def kept_parameters(gates: Gates, values: dict[str, torch.Tensor]) -> int:
    """The exact encoder-layer parameters of the model that deterministic ``values`` leave."""
    return sum(_layer_parameters(gates, values, k) for k in gates.layout)


def _median(log_alpha: torch.Tensor) -> torch.Tensor:
    """A gate's eval value, at least 1e-3 for a gate switched on to meet the budget."""
    return (torch.sigmoid(log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(1e-3, 1.0)


def _entries(gates: Gates) -> list[tuple[float, int | str, str, int]]:
    """Every fine entry as (log P(entry, its module and its layer all on), layer, group,
    index): how much the training wanted it kept."""
    probs = {name: p.detach().cpu().double() for name, p in gates.probabilities().items()}
    one = torch.ones(1, dtype=torch.float64)
    out = []
    for k, modules in gates.layout.items():
        for module in modules:
            group = gate_name(k, module)
            if group not in probs:
                continue
            outer = probs.get(gate_name(k), one) * probs.get(gate_name(k, module, "module"), one)
            keep = torch.log(probs[group] * outer).tolist()
            out += [(p, k, group, i) for i, p in enumerate(keep)]
    return out


def _switch(gates: Gates, values: dict, k: int | str, group: str, i: int, on: bool) -> dict:
    """Turn one fine entry off, or on together with its module and layer; what was changed,
    to undo it."""
    undo = {group: values[group].clone()}
    if not on:
        values[group][i] = 0.0
        return undo
    values[group][i] = float(_median(gates.gates[group].log_alpha[i]))
    module = gate_name(k, group.split("_")[1], "module")
    if module in values and float(values[module]) == 0:
        undo[module] = values[module]
        values[module] = _median(gates.gates[module].log_alpha).reshape(1)
    if gate_name(k) in values and float(values[gate_name(k)]) == 0:
        undo[gate_name(k)] = values[gate_name(k)]
        values[gate_name(k)] = torch.ones(1)
    return undo


@torch.no_grad()
def meet_budget(gates: Gates, target_sparsity: float) -> dict[str, torch.Tensor]:
    """Deterministic gate values whose structure keeps as close as possible to
    ``(1 - target_sparsity)`` of the prunable parameters: the trained values, then fine entries
    switched off (least wanted first) or on (most wanted first, with their module and layer),
    each switch kept when it brings the count nearer the budget; a second pass the other way
    undoes an overshoot (a module's last unit takes the module's own parameters with it)."""
    values = {name: v.detach().cpu().clone() for name, v in gates.values(training=False).items()}
    budget = (1 - target_sparsity) * float(layout_parameters(gates.layout, gates.sizes, {}))
    kept = kept_parameters(gates, values)
    first = kept > budget
    for removing in (first, not first):
        kept = _budget_pass(gates, values, budget, kept, removing)
    return values


def _budget_pass(
    gates: Gates, values: dict[str, torch.Tensor], budget: float, kept: int, removing: bool
) -> int:
    for _, k, group, i in sorted(_entries(gates), reverse=not removing):
        if (float(values[group][i]) > 0) != removing:
            continue
        layer_before = _layer_parameters(gates, values, k)
        undo = _switch(gates, values, k, group, i, on=not removing)
        after = kept - layer_before + _layer_parameters(gates, values, k)
        if abs(after - budget) < abs(kept - budget):
            kept = after
        else:
            values.update(undo)
    return kept
