"""Gates on a stack of layers, attached with hooks, so the model's own code and weights stay
unchanged: here an :class:`~comflp.asr.model.ASRModel`'s encoder; Whisper's encoder and decoder
in :mod:`comflp.structured.whisper`.

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

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from comflp.asr.config import ModelConfig
from comflp.asr.model import ASRModel
from comflp.structured.gates import HardConcrete
from comflp.structured.layout import FINE_GROUP, GROUPS, Layout, encoder_layout, gate_name
from comflp.structured.params import unit_sizes


class Gates(nn.Module):
    """The hard-concrete gate groups of a stack of layers, keyed by :func:`gate_name`.

    ``layout``: per layer label its gated modules and their sizes; ``sizes``: parameters per
    entry of each module kind and per module / layer of its own (:func:`params.unit_sizes`);
    ``empty_layer_is_identity``: whether a layer with no module left passes its input through
    (pre-LN Transformer layers), so that physical pruning removes it.
    """

    def __init__(
        self,
        layout: Layout,
        sizes: dict[str, int],
        groups: Sequence[str],
        init_log_alpha: float,
        empty_layer_is_identity: bool = True,
    ):
        super().__init__()
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown gate groups {unknown}; expected some of {GROUPS}")
        self.layout, self.sizes, self.groups = layout, sizes, tuple(groups)
        self.empty_layer_is_identity = empty_layer_is_identity
        self.gates = nn.ModuleDict()
        for k, modules in layout.items():
            if "layers" in groups:
                self.gates[gate_name(k)] = HardConcrete(1, init_log_alpha)
            for module, n in modules.items():
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
        for k, modules in self.layout.items():
            if gate_name(k) in values:
                values[gate_name(k)] = (values[gate_name(k)] > 0).to(values[gate_name(k)].dtype)
            for module in modules:
                fine = values.get(gate_name(k, module))
                if fine is not None and not bool((fine > 0).any()):
                    values[gate_name(k, module, "module")] = torch.zeros(1, device=fine.device)
        return values

    @torch.no_grad()
    def clamp_(self) -> None:
        for g in self.gates.values():
            g.clamp_()


class GateSet(Gates):
    """The gates of one :class:`ASRModel` encoder (``cfg``)."""

    def __init__(self, cfg: ModelConfig, groups: Sequence[str], init_log_alpha: float):
        super().__init__(
            encoder_layout(cfg),
            unit_sizes(cfg),
            groups,
            init_log_alpha,
            empty_layer_is_identity=cfg.encoder_type == "transformer",
        )
        self.cfg = cfg


Target = tuple[nn.Module, int, int, nn.Module]  # fine target, repeat, dim, module output


def _fine_target(layer: nn.Module, module: str) -> Target:
    """The submodule whose input the fine gates scale, how many input entries each gate
    covers, the entry dimension of that input, and the module whose output the module gate
    scales (an :class:`ASRModel` encoder layer)."""
    if module == "attn":
        return layer.attn.out, layer.attn.head_dim, -1, layer.attn
    if module == "conv":
        return layer.conv.pointwise2, 1, 1, layer.conv  # (B, C, T)
    return getattr(layer, module)[3], 1, -1, getattr(layer, module)


def _scale(x: torch.Tensor, z: torch.Tensor, repeat: int, dim: int) -> torch.Tensor:
    z = z.repeat_interleave(repeat) if repeat > 1 else z
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * z.view(shape)


class LayerMasker:
    """Applies :class:`Gates` through hooks until :meth:`remove`.

    ``layers``: per layer label of the gates' layout, the layer module (called with its input
    first); ``targets(layer, module)``: where a module's gates act (:data:`Target`);
    ``draw_on``: the module every forward pass runs first, where one pass's gate values are
    drawn; ``capture``: labels of layers whose gated outputs are kept in ``hidden`` after each
    forward pass (for layerwise distillation).
    """

    def __init__(
        self,
        gates: Gates,
        layers: dict[int | str, nn.Module],
        targets: Callable[[nn.Module, str], Target],
        draw_on: nn.Module,
        capture: Sequence[int | str] = (),
    ):
        self.gates = gates
        self.values: dict[str, torch.Tensor] = {}
        self.hidden: dict[int | str, torch.Tensor] = {}
        self._handles = [draw_on.register_forward_pre_hook(self._draw)]
        for k, layer in layers.items():
            for module in gates.layout[k]:
                fine, repeat, dim, whole = targets(layer, module)
                self._handles += [
                    fine.register_forward_pre_hook(
                        self._fine_hook(gate_name(k, module), repeat, dim)
                    ),
                    whole.register_forward_hook(self._module_hook(gate_name(k, module, "module"))),
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
            if z is None:
                return None
            return (output[0] * z, *output[1:]) if isinstance(output, tuple) else output * z

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

    def __enter__(self) -> LayerMasker:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Masker(LayerMasker):
    """:class:`GateSet` on an :class:`ASRModel`'s encoder; values drawn when its front end runs."""

    def __init__(self, model: ASRModel, gates: GateSet, capture: Sequence[int] = ()):
        layers = dict(enumerate(model.encoder.layers, start=1))
        super().__init__(gates, layers, _fine_target, model.encoder.embed, capture)
