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

import torch

from comflp.asr.checkpoint import load_state_into
from comflp.asr.config import ConfigError
from comflp.asr.model import ASRModel, prune_layers
from comflp.structured.layout import MODULES, SHAPE_KEY
from comflp.structured.masked import GateSet
from comflp.structured.plan import ModulePlan, meet_budget, module_plans


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
