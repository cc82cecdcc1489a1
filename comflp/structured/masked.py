"""Gates on the encoder of an :class:`~comflp.asr.model.ASRModel`, attached with hooks, so the
model's own code and weights stay unchanged.

Gate groups (the names ``structured.gates`` takes):

- ``heads``: one gate per attention head, on the head's slice of the input of ``attn.out``;
- ``units``: one gate per feed-forward unit, on the input of ``ff.3`` (``ff1.3``, ``ff2.3``);
- ``channels``: one gate per Conformer convolution channel, on the input of ``conv.pointwise2``;
- ``modules``: one gate per module (attention, each feed-forward, convolution) on its output;
- ``layers``: one gate per layer, applied as ``x + z (layer(x) - x)``.

All gate values of a forward pass are drawn when the front end runs (a pre-hook on
``encoder.embed``, which every caller runs first): sampled when the model is in training mode,
deterministic in eval. In eval, a module whose heads / units / channels are all gated off is
gated off as a whole (it would only add its output bias), and layer gates are 0 or 1 (a soft
layer value cannot be folded into a Conformer layer, whose final norm follows the residual sum),
so that the physically pruned model (:mod:`comflp.structured.physical`) computes exactly what
the masked model computes in eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from comflp.asr.config import ModelConfig
from comflp.asr.model import ASRModel
from comflp.structured.gates import HardConcrete

GROUPS = ("heads", "units", "channels", "modules", "layers")
# The gated modules of a layer, in forward order, and the layer_shape key of each one's size.
MODULES = {"transformer": ("attn", "ff"), "conformer": ("ff1", "attn", "conv", "ff2")}
SHAPE_KEY = {"attn": "heads", "ff": "ffn", "ff1": "ffn1", "ff2": "ffn2", "conv": "conv"}
# The fine-grained gate group of each module.
FINE_GROUP = {"attn": "heads", "ff": "units", "ff1": "units", "ff2": "units", "conv": "channels"}


def layer_modules(cfg: ModelConfig, k: int) -> dict[str, int]:
    """The modules layer ``k`` (1-indexed) has, with their sizes (heads, units, channels)."""
    shape = cfg.layer_shape(k)
    sizes = {m: shape[SHAPE_KEY[m]] for m in MODULES[cfg.encoder_type]}
    return {m: n for m, n in sizes.items() if n > 0}


def gate_name(layer: int, module: str | None = None, kind: str = "fine") -> str:
    """Key of one gate group: ``l3_layer``, ``l3_attn_fine`` (heads), ``l3_attn_module``."""
    return f"l{layer}_layer" if module is None else f"l{layer}_{module}_{kind}"


def missing_groups(cfg: ModelConfig, groups: Sequence[str]) -> list[str]:
    """The fine-grained gate groups in ``groups`` that no layer of ``cfg`` has a module for."""
    present = {FINE_GROUP[m] for k in range(1, cfg.num_layers + 1) for m in layer_modules(cfg, k)}
    fine = {FINE_GROUP[m] for m in FINE_GROUP}
    return [g for g in groups if g in fine and g not in present]


class GateSet(nn.Module):
    """The hard-concrete gate groups of one encoder, keyed by :func:`gate_name`."""

    def __init__(self, cfg: ModelConfig, groups: Sequence[str], init_log_alpha: float):
        super().__init__()
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown gate groups {unknown}; expected some of {GROUPS}")
        self.cfg, self.groups = cfg, tuple(groups)
        self.gates = nn.ModuleDict()
        for k in range(1, cfg.num_layers + 1):
            if "layers" in groups:
                self.gates[gate_name(k)] = HardConcrete(1, init_log_alpha)
            for module, n in layer_modules(cfg, k).items():
                if FINE_GROUP[module] in groups:
                    self.gates[gate_name(k, module)] = HardConcrete(n, init_log_alpha)
                if "modules" in groups:
                    self.gates[gate_name(k, module, "module")] = HardConcrete(1, init_log_alpha)

    def probabilities(self) -> dict[str, torch.Tensor]:
        """P(z != 0) of every gate (differentiable), by group key."""
        return {name: g.prob_nonzero() for name, g in self.gates.items()}

    def values(self, training: bool) -> dict[str, torch.Tensor]:
        """Gate values of one forward pass: sampled (training) or deterministic (eval), by key;
        groups without gates have no key (factor 1)."""
        if training:
            return {name: g.sample() for name, g in self.gates.items()}
        values = {name: g.deterministic() for name, g in self.gates.items()}
        for k in range(1, self.cfg.num_layers + 1):
            if gate_name(k) in values:
                values[gate_name(k)] = (values[gate_name(k)] > 0).to(values[gate_name(k)].dtype)
            for module in layer_modules(self.cfg, k):
                fine = values.get(gate_name(k, module))
                if fine is not None and not bool((fine > 0).any()):
                    values[gate_name(k, module, "module")] = torch.zeros(1, device=fine.device)
        return values

    @torch.no_grad()
    def clamp_(self) -> None:
        for g in self.gates.values():
            g.clamp_()


def _fine_target(layer: nn.Module, module: str) -> tuple[nn.Module, int, int]:
    """The submodule whose input the fine gates scale, how many input entries each gate
    covers, and the entry dimension of that input."""
    if module == "attn":
        return layer.attn.out, layer.attn.head_dim, -1
    if module == "conv":
        return layer.conv.pointwise2, 1, 1  # (B, C, T)
    return getattr(layer, module)[3], 1, -1


def _scale(x: torch.Tensor, z: torch.Tensor, repeat: int, dim: int) -> torch.Tensor:
    z = z.repeat_interleave(repeat) if repeat > 1 else z
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * z.view(shape)


class Masker:
    """Applies a :class:`GateSet` to ``model`` through hooks until :meth:`remove`.

    ``capture``: layers (1-indexed) whose gated outputs are kept in ``hidden`` after each
    forward pass (for layerwise distillation).
    """

    def __init__(self, model: ASRModel, gates: GateSet, capture: Sequence[int] = ()):
        self.gates = gates
        self.values: dict[str, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self._handles = [model.encoder.embed.register_forward_pre_hook(self._draw)]
        for k, layer in enumerate(model.encoder.layers, start=1):
            for module in layer_modules(model.cfg, k):
                target, repeat, dim = _fine_target(layer, module)
                self._handles += [
                    target.register_forward_pre_hook(
                        self._fine_hook(gate_name(k, module), repeat, dim)
                    ),
                    getattr(layer, module).register_forward_hook(
                        self._module_hook(gate_name(k, module, "module"))
                    ),
                ]
            self._handles.append(layer.register_forward_hook(self._layer_hook(k, k in capture)))

    def _draw(self, module: nn.Module, args) -> None:
        self.values = self.gates.values(module.training)

    def _fine_hook(self, name: str, repeat: int, dim: int):
        def hook(module, args):
            z = self.values.get(name)
            return None if z is None else (_scale(args[0], z, repeat, dim), *args[1:])

        return hook

    def _module_hook(self, name: str):
        def hook(module, args, output):
            z = self.values.get(name)
            return None if z is None else output * z

        return hook

    def _layer_hook(self, k: int, capture: bool):
        name = gate_name(k)

        def hook(module, args, output):
            z = self.values.get(name)
            if z is not None:
                x = args[0]
                output = x + z * (output - x)
            if capture:
                self.hidden[k] = output
            return output

        return hook

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Masker:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
