"""What can be gated in a stack of layers: the gate groups, each layer's gated modules and their
sizes (a layout), and the key of each gate group."""

from __future__ import annotations

from collections.abc import Sequence

from comflp.asr.config import ModelConfig

GROUPS = ("heads", "units", "channels", "modules", "layers")
# The gated modules of a layer, in forward order, and the layer_shape key of each one's size.
MODULES = {"transformer": ("attn", "ff"), "conformer": ("ff1", "attn", "conv", "ff2")}
SHAPE_KEY = {"attn": "heads", "ff": "ffn", "ff1": "ffn1", "ff2": "ffn2", "conv": "conv"}
# The fine-grained gate group of each module.
FINE_GROUP = {
    "attn": "heads",
    "cross": "heads",
    "ff": "units",
    "ff1": "units",
    "ff2": "units",
    "conv": "channels",
}


def layer_modules(cfg: ModelConfig, k: int) -> dict[str, int]:
    """The modules layer ``k`` (1-indexed) has, with their sizes (heads, units, channels)."""
    shape = cfg.layer_shape(k)
    sizes = {m: shape[SHAPE_KEY[m]] for m in MODULES[cfg.encoder_type]}
    return {m: n for m, n in sizes.items() if n > 0}


def gate_name(layer: int, module: str | None = None, kind: str = "fine") -> str:
    """Key of one gate group: ``l3_layer``, ``l3_attn_fine`` (heads), ``l3_attn_module``."""
    return f"l{layer}_layer" if module is None else f"l{layer}_{module}_{kind}"


Layout = dict[int | str, dict[str, int]]  # layer label -> {module: heads / units / channels}


def encoder_layout(cfg: ModelConfig) -> Layout:
    """The gated modules of every encoder layer of ``cfg``, labelled 1..L."""
    return {k: layer_modules(cfg, k) for k in range(1, cfg.num_layers + 1)}


def missing_groups(layout: Layout, groups: Sequence[str]) -> list[str]:
    """The fine-grained gate groups in ``groups`` that no layer of ``layout`` has a module for."""
    present = {FINE_GROUP[m] for modules in layout.values() for m in modules}
    fine = set(FINE_GROUP.values())
    return [g for g in groups if g in fine and g not in present]
