"""The per-layer shapes of a Whisper model (transformers' ``WhisperForConditionalGeneration``),
and the padding that makes a structured one fit its formats.

Physically pruned (:mod:`comflp.structured.whisper`), each layer keeps its own heads and units
(transformers' attention reshapes by its own projection sizes). The formats take less: a
transformers Whisper config holds one head count and one feed-forward width per stack, with
heads of ``d_model / num_heads``; CTranslate2's ``WhisperSpec`` (4.x) takes any feed-forward
width per layer, but one head count per stack and heads of ``d_model / num_heads`` too (a layer
with fewer heads runs silently wrong, a count that does not divide ``d_model`` as well).
:func:`uniform` pads to what a format takes with zero heads (to the full count) and zero units,
which change nothing: a zero head's values and output columns are 0, a zero unit's input row
and output column are 0. :func:`compact` removes them again on reading.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

STACKS = {"encoder": "e", "decoder": "d"}
ATTENTION = {"attn": "self_attn", "cross": "encoder_attn"}


def stack_layers(hf: nn.Module, stack: str) -> nn.ModuleList:
    return getattr(hf.model, stack).layers


def labelled_layers(hf: nn.Module) -> dict[str, nn.Module]:
    """Every layer of both stacks by its label (``e1``, ..., ``d1``, ...)."""
    return {
        f"{prefix}{k}": layer
        for stack, prefix in STACKS.items()
        for k, layer in enumerate(stack_layers(hf, stack), start=1)
    }


def num_heads(attn: nn.Module) -> int:
    return attn.q_proj.out_features // attn.head_dim


def sliced_linear(
    old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Linear:
    """``old`` restricted to output ``rows`` and input ``cols`` (None: all); an index -1 makes a
    zero row / column (padding)."""
    w, b = old.weight.detach(), old.bias.detach() if old.bias is not None else None
    if rows is not None:
        w = _take(w, rows, 0)
        b = _take(b, rows, 0) if b is not None else None
    if cols is not None:
        w = _take(w, cols, 1)
    new = nn.Linear(w.size(1), w.size(0), bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``'s entries ``index`` along ``dim``; zeros where the index is -1."""
    out = t.index_select(dim, index.clamp(min=0).to(t.device))
    shape = [1] * t.dim()
    shape[dim] = -1
    return out * (index >= 0).to(t.device, t.dtype).view(shape)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    rows = heads[:, None] * head_dim + torch.arange(head_dim)
    return torch.where(heads[:, None] >= 0, rows, -1).flatten()


@torch.no_grad()
def uniform(hf: nn.Module, feed_forward: bool = True) -> nn.Module:
    """``hf`` with every attention padded with zero heads to ``d_model / head_dim`` (and, with
    ``feed_forward``, every layer of a stack padded with zero units to the stack's widest), the
    config saying so; ``hf`` itself when nothing needs padding."""
    d = hf.config.d_model
    widths = {s: max(layer.fc1.out_features for layer in stack_layers(hf, s)) for s in STACKS}
    layers = labelled_layers(hf).values()
    attns = [getattr(layer, a) for layer in layers for a in ATTENTION.values() if hasattr(layer, a)]
    ragged_heads = any(num_heads(a) != d // a.head_dim for a in attns)
    ragged_units = feed_forward and any(
        layer.fc1.out_features != widths[s] for s in STACKS for layer in stack_layers(hf, s)
    )
    if not (ragged_heads or ragged_units):
        return hf
    hf = copy.deepcopy(hf)
    for stack in STACKS:
        for layer in stack_layers(hf, stack):
            for a in ATTENTION.values():
                if hasattr(layer, a):
                    _pad_heads(getattr(layer, a), d // getattr(layer, a).head_dim)
            if feed_forward:
                pad = _padded(layer.fc1.out_features, widths[stack])
                layer.fc1, layer.fc2 = (
                    sliced_linear(layer.fc1, pad, None),
                    sliced_linear(layer.fc2, None, pad),
                )
        if feed_forward:
            setattr(hf.config, f"{stack}_ffn_dim", widths[stack])
    return hf


def _padded(n: int, size: int) -> torch.Tensor:
    return torch.cat([torch.arange(n), torch.full((size - n,), -1)])


def _pad_heads(attn: nn.Module, heads: int) -> None:
    if num_heads(attn) == heads:
        return
    rows = head_rows(_padded(num_heads(attn), heads), attn.head_dim)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, sliced_linear(getattr(attn, name), rows, None))
    attn.out_proj = sliced_linear(attn.out_proj, None, rows)
    attn.num_heads = heads


@torch.no_grad()
def compact(hf: nn.Module) -> nn.Module:
    """``hf`` (in place) without the heads and units whose output columns (in ``out_proj``,
    ``fc2``) are all zero: they add nothing, so the function is unchanged. Undoes
    :func:`uniform`'s padding when a structured model is read back; a model with no such entry
    (any trained one) is left as it is. A module keeps at least one entry."""
    for layer in labelled_layers(hf).values():
        for a in ATTENTION.values():
            if hasattr(layer, a):
                attn = getattr(layer, a)
                cols = attn.out_proj.weight.view(attn.out_proj.out_features, -1, attn.head_dim)
                live = _live(cols.abs().amax(dim=(0, 2)))
                if live is not None:
                    rows = head_rows(live, attn.head_dim)
                    for name in ("q_proj", "k_proj", "v_proj"):
                        setattr(attn, name, sliced_linear(getattr(attn, name), rows, None))
                    attn.out_proj = sliced_linear(attn.out_proj, None, rows)
                    attn.num_heads = live.numel()
        live = _live(layer.fc2.weight.abs().amax(dim=0))
        if live is not None:
            layer.fc1, layer.fc2 = (
                sliced_linear(layer.fc1, live, None),
                sliced_linear(layer.fc2, None, live),
            )
    return hf


def _live(magnitude: torch.Tensor) -> torch.Tensor | None:
    """Indices of the non-zero entries (at least the first); None when all are."""
    live = torch.nonzero(magnitude > 0).flatten()
    if live.numel() == magnitude.numel():
        return None
    return live if live.numel() else torch.zeros(1, dtype=torch.long)
