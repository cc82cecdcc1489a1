"""From a gated model to a physically smaller one that computes the same function in eval.

The gates' deterministic values (:meth:`GateSet.values` in eval: per group the
``round(expected L0)`` entries with the largest ``log_alpha`` at their median value), brought to
the size asked for by :func:`meet_budget`, decide what stays: an entry with value 0 is cut out of the weights, a kept entry's soft value is folded into
the next matrix (the input columns of ``attn.out``, ``ff.3`` or ``conv.pointwise2``), and the
module value is folded into that matrix and its output bias. A module with nothing left loses
its weights and its norm (size 0 in ``layer_shapes``); layers whose gate is off, and Transformer
layers with no module left (the identity), are removed with :func:`prune_layers`. The result is a
plain :class:`ASRModel` whose ``layer_shapes`` describe it, saved like any other model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from comflp.asr.checkpoint import load_state_into
from comflp.asr.config import ConfigError
from comflp.asr.model import ASRModel, prune_layers
from comflp.structured.gates import LIMIT_L, LIMIT_R
from comflp.structured.masked import MODULES, SHAPE_KEY, GateSet, gate_name, layer_modules
from comflp.structured.params import entry_size, prunable_parameters, unit_sizes


@dataclass
class ModulePlan:
    """What stays of one module: kept entries (heads, units, channels), their soft gate values,
    and the module's own gate value."""

    keep: torch.Tensor  # (n,) indices, ascending
    scale: torch.Tensor  # (n,) gate values of the kept entries
    module_scale: float


def module_plans(
    gates: GateSet, values: dict[str, torch.Tensor]
) -> tuple[list[dict[str, ModulePlan]], list[int]]:
    """Per layer the plan of each of its modules, and the layers to remove (1-indexed)."""
    cfg = gates.cfg
    plans, removed = [], []
    for k in range(1, cfg.num_layers + 1):
        layer = {}
        for module, n in layer_modules(cfg, k).items():
            fine = values.get(gate_name(k, module), torch.ones(n)).detach().cpu()
            module_scale = float(values.get(gate_name(k, module, "module"), torch.ones(1)))
            keep = torch.nonzero(fine > 0).flatten() if module_scale > 0 else torch.zeros(0).long()
            layer[module] = ModulePlan(keep, fine[keep], module_scale)
        plans.append(layer)
        layer_off = float(values.get(gate_name(k), torch.ones(1))) == 0
        empty = all(p.keep.numel() == 0 for p in layer.values())
        if layer_off or (empty and cfg.encoder_type == "transformer"):
            removed.append(k)
    return plans, removed


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice_attention(state: dict, prefix: str, plan: ModulePlan, head_dim: int) -> None:
    rows = _head_rows(plan.keep, head_dim)
    for name in ("q", "k", "v"):
        state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][rows]
        state[f"{prefix}{name}.bias"] = state[f"{prefix}{name}.bias"][rows]
    if f"{prefix}pos.weight" in state:  # relative positions
        state[f"{prefix}pos.weight"] = state[f"{prefix}pos.weight"][rows]
        for name in ("pos_bias_u", "pos_bias_v"):
            state[prefix + name] = state[prefix + name][plan.keep]
    columns = plan.scale.repeat_interleave(head_dim) * plan.module_scale
    state[f"{prefix}out.weight"] = state[f"{prefix}out.weight"][:, rows] * columns
    state[f"{prefix}out.bias"] = state[f"{prefix}out.bias"] * plan.module_scale


def _slice_feed_forward(state: dict, prefix: str, plan: ModulePlan) -> None:
    state[f"{prefix}0.weight"] = state[f"{prefix}0.weight"][plan.keep]
    state[f"{prefix}0.bias"] = state[f"{prefix}0.bias"][plan.keep]
    columns = plan.scale * plan.module_scale
    state[f"{prefix}3.weight"] = state[f"{prefix}3.weight"][:, plan.keep] * columns
    state[f"{prefix}3.bias"] = state[f"{prefix}3.bias"] * plan.module_scale


def _slice_conv(state: dict, prefix: str, plan: ModulePlan) -> None:
    channels = state[f"{prefix}depthwise.weight"].size(0)
    glu = torch.cat([plan.keep, plan.keep + channels])  # value half, gate half
    for name in ("pointwise1.weight", "pointwise1.bias"):
        state[prefix + name] = state[prefix + name][glu]
    for name in ("depthwise.weight", "depthwise.bias", "norm.weight", "norm.bias"):
        state[prefix + name] = state[prefix + name][plan.keep]
    for name in ("norm.running_mean", "norm.running_var"):
        state[prefix + name] = state[prefix + name][plan.keep]
    columns = (plan.scale * plan.module_scale)[None, :, None]
    state[f"{prefix}pointwise2.weight"] = (
        state[f"{prefix}pointwise2.weight"][:, plan.keep] * columns
    )
    state[f"{prefix}pointwise2.bias"] = state[f"{prefix}pointwise2.bias"] * plan.module_scale


def _slice_module(state: dict, k: int, module: str, plan: ModulePlan, head_dim: int) -> None:
    """Cut one module of layer ``k`` in ``state`` to its plan (or remove it and its norm)."""
    prefix = f"encoder.layers.{k - 1}.{module}."
    if plan.keep.numel() == 0:
        norm = f"encoder.layers.{k - 1}.norm_{module}."
        for name in [n for n in state if n.startswith((prefix, norm))]:
            del state[name]
    elif module == "attn":
        _slice_attention(state, prefix, plan, head_dim)
    elif module == "conv":
        _slice_conv(state, prefix, plan)
    else:
        _slice_feed_forward(state, prefix, plan)


def _layer_parameters(gates: GateSet, values: dict[str, torch.Tensor], k: int) -> int:
    """The exact parameters of encoder layer ``k`` that deterministic ``values`` leave (a module
    with no head / unit / channel left goes as a whole)."""
    if gate_name(k) in values and float(values[gate_name(k)]) == 0:
        return 0
    sizes = unit_sizes(gates.cfg)
    total = sizes["layer"]
    for module, n in layer_modules(gates.cfg, k).items():
        module_gate = values.get(gate_name(k, module, "module"))
        fine = values.get(gate_name(k, module))
        kept = n if fine is None else int((fine > 0).sum())
        if kept and (module_gate is None or float(module_gate) > 0):
            total += sizes["module"] + entry_size(sizes, module) * kept
    return total


def kept_parameters(gates: GateSet, values: dict[str, torch.Tensor]) -> int:
    """The exact encoder-layer parameters of the model that deterministic ``values`` leave."""
    return sum(_layer_parameters(gates, values, k) for k in range(1, gates.cfg.num_layers + 1))


def _median(log_alpha: torch.Tensor) -> torch.Tensor:
    """A gate's eval value, at least 1e-3 for a gate switched on to meet the budget."""
    return (torch.sigmoid(log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(1e-3, 1.0)


def _entries(gates: GateSet) -> list[tuple[float, int, str, int]]:
    """Every fine entry as (log P(entry, its module and its layer all on), layer, group,
    index): how much the training wanted it kept."""
    probs = {name: p.detach().cpu().double() for name, p in gates.probabilities().items()}
    one = torch.ones(1, dtype=torch.float64)
    out = []
    for k in range(1, gates.cfg.num_layers + 1):
        for module in layer_modules(gates.cfg, k):
            group = gate_name(k, module)
            if group not in probs:
                continue
            outer = probs.get(gate_name(k), one) * probs.get(gate_name(k, module, "module"), one)
            keep = torch.log(probs[group] * outer).tolist()
            out += [(p, k, group, i) for i, p in enumerate(keep)]
    return out


def _switch(gates: GateSet, values: dict, k: int, group: str, i: int, on: bool) -> dict:
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
def meet_budget(gates: GateSet, target_sparsity: float) -> dict[str, torch.Tensor]:
    """Deterministic gate values whose structure keeps as close as possible to
    ``(1 - target_sparsity)`` of the prunable parameters: the trained values, then fine entries
    switched off (least wanted first) or on (most wanted first, with their module and layer),
    each switch kept when it brings the count nearer the budget; a second pass the other way
    undoes an overshoot (a module's last unit takes the module's own parameters with it)."""
    values = {name: v.detach().cpu().clone() for name, v in gates.values(training=False).items()}
    budget = (1 - target_sparsity) * prunable_parameters(gates.cfg)
    kept = kept_parameters(gates, values)
    first = kept > budget
    for removing in (first, not first):
        kept = _budget_pass(gates, values, budget, kept, removing)
    return values


def _budget_pass(
    gates: GateSet, values: dict[str, torch.Tensor], budget: float, kept: int, removing: bool
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


@torch.no_grad()
def physically_prune(
    model: ASRModel, gates: GateSet, target_sparsity: float | None = None
) -> ASRModel:
    """A new model (eval mode) with what the deterministic gates remove cut out of the weights
    (brought to ``target_sparsity`` when given); its outputs equal ``model``'s under those
    gate values."""
    cfg = model.cfg
    values = (
        gates.values(training=False)
        if target_sparsity is None
        else meet_budget(gates, target_sparsity)
    )
    plans, removed = module_plans(gates, values)
    if len(removed) == cfg.num_layers:
        raise ConfigError("structured pruning: the gates remove every encoder layer")
    head_dim = cfg.d_model // cfg.num_heads
    state = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    shapes = []
    for k, layer in enumerate(plans, start=1):
        shape = {key: 0 for key in (SHAPE_KEY[m] for m in MODULES[cfg.encoder_type])}
        for module, plan in layer.items():
            _slice_module(state, k, module, plan, head_dim)
            shape[SHAPE_KEY[module]] = plan.keep.numel()
        shapes.append(shape)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.layer_shapes = shapes
    pruned = ASRModel(new_cfg)
    load_state_into(pruned, state, "physically pruned model")
    if removed:
        pruned = prune_layers(pruned, removed)
    return pruned.to(next(model.parameters()).device).eval()
