"""L0 structured pruning of Whisper (transformers' ``WhisperForConditionalGeneration``): the gates
of :mod:`.masked` on both stacks, the physical pruning, and the uniform copies its formats take.

Layers are labelled ``e1..eL`` (encoder) and ``d1..dL`` (decoder). An encoder layer has two gated
modules, self-attention (``attn``: heads) and the feed-forward block (``ff``: units); a decoder
layer also cross-attention (``cross``: heads). Fine gates scale the input of ``out_proj`` (a
head's slice) and of ``fc2`` (a unit), module gates the module's output, layer gates the
residual branch: Whisper's layers are pre-LN, so a layer whose modules are all gone is the
identity and goes.

Physically pruned, each layer keeps its own heads and units; saving pads them to what the
formats take (:mod:`comflp.adapters.whisper_shapes`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from comflp.adapters.whisper import renumber_alignment_heads
from comflp.adapters.whisper_shapes import (
    ATTENTION,
    STACKS,
    head_rows,
    labelled_layers,
    num_heads,
    sliced_linear,
    stack_layers,
)
from comflp.errors import InputError
from comflp.structured.layout import Layout
from comflp.structured.masked import Gates, LayerMasker, Target
from comflp.structured.plan import ModulePlan, meet_budget, module_plans


def whisper_layout(hf: nn.Module) -> Layout:
    """The gated modules of every layer and their sizes (heads, units)."""
    layout = {}
    for label, layer in labelled_layers(hf).items():
        modules = {
            m: num_heads(getattr(layer, a)) for m, a in ATTENTION.items() if hasattr(layer, a)
        }
        layout[label] = {**modules, "ff": layer.fc1.out_features}
    return layout


def whisper_sizes(hf: nn.Module) -> dict[str, int]:
    """Parameters per head (rows of q, k, v, biases of q and v: Whisper's k has none, columns
    of ``out_proj``), per unit (a row of ``fc1`` and its bias, a column of ``fc2``) and per
    module (its LayerNorm and output bias)."""
    d = hf.config.d_model
    head_dim = stack_layers(hf, "encoder")[0].self_attn.head_dim
    return {"attn": 4 * d * head_dim + 2 * head_dim, "ff": 2 * d + 1, "module": 3 * d, "layer": 0}


def whisper_gates(hf: nn.Module, groups: list[str], init_log_alpha: float) -> Gates:
    return Gates(whisper_layout(hf), whisper_sizes(hf), groups, init_log_alpha)


def layer_parameters(hf: nn.Module) -> int:
    """The exact parameter count of both stacks' layers."""
    return sum(p.numel() for layer in labelled_layers(hf).values() for p in layer.parameters())


def _target(layer: nn.Module, module: str) -> Target:
    if module == "ff":
        return layer.fc2, 1, -1, layer.fc2
    attn = getattr(layer, ATTENTION[module])
    return attn.out_proj, attn.head_dim, -1, attn


class WhisperMasker(LayerMasker):
    """:func:`whisper_gates` on ``hf``; values drawn when the encoder's first convolution runs
    (every forward pass, the adapter's and transformers', starts there)."""

    def __init__(self, hf: nn.Module, gates: Gates, capture: list[str] | tuple = ()):
        conv1 = hf.model.encoder.conv1
        super().__init__(gates, labelled_layers(hf), _target, conv1, capture)


def _slice_attention(attn: nn.Module, plan: ModulePlan) -> None:
    """Keep ``plan``'s heads (at least one: a module with none keeps one zero head), their gate
    values and the module's folded into ``out_proj``."""
    hd = attn.head_dim
    heads = plan.keep if plan.keep.numel() else torch.tensor([-1])
    scale = plan.scale if plan.keep.numel() else torch.zeros(1)
    rows = head_rows(heads, hd)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, sliced_linear(getattr(attn, name), rows, None))
    attn.out_proj = sliced_linear(attn.out_proj, None, rows)
    with torch.no_grad():
        columns = scale.repeat_interleave(hd) * plan.module_scale
        attn.out_proj.weight.mul_(columns.to(attn.out_proj.weight))
        attn.out_proj.bias.mul_(plan.module_scale if plan.keep.numel() else 0.0)
    attn.num_heads = heads.numel()


def _slice_feed_forward(layer: nn.Module, plan: ModulePlan) -> None:
    units = plan.keep if plan.keep.numel() else torch.tensor([-1])
    scale = plan.scale if plan.keep.numel() else torch.zeros(1)
    layer.fc1 = sliced_linear(layer.fc1, units, None)
    layer.fc2 = sliced_linear(layer.fc2, None, units)
    with torch.no_grad():
        layer.fc2.weight.mul_((scale * plan.module_scale).to(layer.fc2.weight))
        layer.fc2.bias.mul_(plan.module_scale if plan.keep.numel() else 0.0)


@torch.no_grad()
def physically_prune_whisper(
    hf: nn.Module,
    gates: Gates,
    target_sparsity: float | None = None,
    values: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A copy of ``hf`` (eval mode) with what the deterministic gates remove cut out (brought to
    ``target_sparsity`` when given; ``values``: gate values a caller already brought there): its
    outputs equal the masked model's in eval."""
    if values is None:
        values = (
            gates.values(False) if target_sparsity is None else meet_budget(gates, target_sparsity)
        )
    plans, removed = module_plans(gates, values)
    hf = copy.deepcopy(hf)
    layers = labelled_layers(hf)
    cross_heads = {}
    for label, plan in zip(gates.layout, plans, strict=True):
        for module, module_plan in plan.items():
            if module == "ff":
                _slice_feed_forward(layers[label], module_plan)
            else:
                _slice_attention(getattr(layers[label], ATTENTION[module]), module_plan)
        if "cross" in plan:
            cross_heads[int(label[1:]) - 1] = plan["cross"].keep.tolist()
    _renumber_alignment_head_indices(hf, cross_heads)
    for stack, prefix in STACKS.items():
        old = stack_layers(hf, stack)
        kept = [k for k in range(1, len(old) + 1) if f"{prefix}{k}" not in removed]
        if not kept:
            raise InputError(f"structured pruning: the gates remove every {stack} layer")
        getattr(hf.model, stack).layers = nn.ModuleList(old[k - 1] for k in kept)
        setattr(hf.config, f"{stack}_layers", len(kept))
        if stack == "decoder":
            for i, layer in enumerate(hf.model.decoder.layers):
                layer.self_attn.layer_idx = layer.encoder_attn.layer_idx = i
            renumber_alignment_heads(hf, kept)
    hf.config.num_hidden_layers = hf.config.encoder_layers
    return hf.eval()


def _renumber_alignment_head_indices(hf: nn.Module, kept: dict[int, list[int]]) -> None:
    """The generation config's alignment heads (decoder layer, cross-attention head) on the
    kept heads, renumbered; heads pruned away are dropped."""
    gc = hf.generation_config
    heads = getattr(gc, "alignment_heads", None)
    if heads:
        gc.alignment_heads = [
            [layer, kept[layer].index(head)]
            for layer, head in heads
            if layer in kept and head in kept[layer]
        ]
