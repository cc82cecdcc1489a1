"""Encoder parameter counts: expected (a differentiable function of the gates) and exact.

The prunable parameters are those of the encoder layers (the front end, final norm and CTC head
are never pruned). Each layer's parameters split into:

- per attention head (``dk = d_model // num_heads``): rows of q, k, v (weights and biases) and
  columns of ``out``: ``4 d dk + 3 dk``; with relative positions also rows of ``pos`` and of
  the two position biases: ``+ d dk + 2 dk``;
- per feed-forward unit: a row of ``ff.0`` (+ its bias) and a column of ``ff.3``: ``2 d + 1``;
- per convolution channel: two output channels of ``pointwise1`` (+ biases), a depthwise
  filter (+ bias), the BatchNorm scale and shift, a column of ``pointwise2``: ``3 d + K + 5``;
- per module: its LayerNorm and output bias, ``3 d``; per Conformer layer: ``norm_final``, ``2 d``.

An entry exists in the pruned model only if its own gate, its module's gate and its layer's gate
are all on, so its expected count is its size times the product of the three probabilities
P(z != 0) (1 for a structure without gates). A module's own parameters need the module and the
layer; with hard 0/1 gates this is the count of the physically pruned model, except for a module
whose fine gates are all off, which the pruned model drops (and the expectation still counts).
"""

from __future__ import annotations

import torch

from comflp.asr.config import ModelConfig
from comflp.asr.model import ASRModel, count_parameters
from comflp.structured.layout import Layout, encoder_layout, gate_name


def unit_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one head / unit / channel (``unit``) and of a module's own (``module``)."""
    d, dk = cfg.d_model, cfg.d_model // cfg.num_heads
    head = 4 * d * dk + 3 * dk
    if cfg.encoder_type == "conformer":
        head += d * dk + 2 * dk
    return {
        "attn": head,
        "ff": 2 * d + 1,
        "conv": 3 * d + cfg.conv_kernel + 5,
        "module": 3 * d,
        "layer": 2 * d if cfg.encoder_type == "conformer" else 0,
    }


def entry_size(sizes: dict[str, int], module: str) -> int:
    """Parameters of one head / unit / channel of ``module`` (cross-attention heads as
    self-attention heads)."""
    if module.startswith("ff"):
        return sizes["ff"]
    return sizes["attn"] if module == "cross" else sizes[module]


def expected_parameters(cfg: ModelConfig, probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expected remaining encoder-layer parameters of ``cfg`` (:func:`layout_parameters`)."""
    return layout_parameters(encoder_layout(cfg), unit_sizes(cfg), probs)


def layout_parameters(
    layout: Layout, sizes: dict[str, int], probs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Expected remaining layer parameters of ``layout`` given P(z != 0) per gate group
    (:meth:`Gates.probabilities`); groups missing from ``probs`` count as always kept."""
    ref = next(iter(probs.values()), torch.ones((), dtype=torch.float64))
    one = torch.ones((), dtype=ref.dtype, device=ref.device)
    total = one * 0
    for k, modules in layout.items():
        p_layer = probs.get(gate_name(k), one).sum()
        layer_total = one * sizes["layer"]
        for module, n in modules.items():
            p_module = probs.get(gate_name(k, module, "module"), one).sum()
            fine = probs.get(gate_name(k, module))
            kept_units = one * n if fine is None else fine.sum()
            unit = entry_size(sizes, module)
            layer_total = layer_total + p_module * (sizes["module"] + unit * kept_units)
        total = total + p_layer * layer_total
    return total


def prunable_parameters(cfg: ModelConfig) -> int:
    """Every encoder-layer parameter of ``cfg`` (all gates on)."""
    return int(round(float(expected_parameters(cfg, {}))))


def encoder_layer_parameters(model: ASRModel) -> int:
    """The exact parameter count of a model's encoder layers."""
    return count_parameters(model.encoder.layers)


def sparsity(remaining: torch.Tensor | float, total: int) -> torch.Tensor | float:
    """The fraction of ``total`` prunable parameters removed."""
    return 1 - remaining / total
