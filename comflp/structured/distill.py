"""Layerwise distillation from the frozen, unpruned teacher.

Layers: by default L/3, 2L/3 and L (4, 8 and 12 of the 12-layer baseline), as DPHuBERT distils
layers 4/8/12 of its 12-layer teacher: one point per third of the encoder keeps every part of
the student close to the teacher without constraining each layer. A layer removed by its gate
passes its input through, so every layer index keeps an output and the teacher's layer k is
always compared with the student's layer k (no re-matching of layers as in CoFi).

Distance: mean squared error between the teacher's hidden state and a learned linear map of the
student's, both normalised per frame (layer norm without parameters), over the valid frames,
averaged over the distilled layers. Why normalised: in the pre-LN encoder the scale of the
residual stream grows with depth (the final norm removes it before the CTC head), so a raw MSE
would weigh the last layer most and its useful weight would depend on the model; per-frame
normalisation makes every distilled layer count alike and bounds the loss (0 to 4 per element).
Why MSE rather than DPHuBERT's L1 + cosine: between normalised vectors the MSE is already
2 (1 - cosine), so a separate cosine term adds little, and unlike L1 it is smooth at 0. The maps start at the identity, so the loss
starts at 0 (the student is the teacher) and measures only what pruning changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from comflp.asr.layers import padding_mask
from comflp.asr.model import ASRModel


def default_layers(num_layers: int) -> list[int]:
    """L/3, 2L/3 and L, rounded (fewer when they coincide on a shallow model)."""
    return sorted({max(1, round(num_layers * j / 3)) for j in (1, 2, 3)})


@torch.no_grad()
def teacher_hidden(
    teacher: ASRModel, feats: torch.Tensor, feat_lens: torch.Tensor, layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The teacher's outputs of ``layers`` (1-indexed), running no layer above the last, and
    their lengths (frames after subsampling)."""
    emb = teacher.encoder.embed(feats, feat_lens)
    x, done, out = emb.x, 0, {}
    for k in sorted(layers):
        x = teacher.encoder.forward_layers(x, emb.mask, range(done + 1, k + 1), emb.pos_emb)
        out[k], done = x, k
    return out, emb.lengths


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


class LayerDistiller(nn.Module):
    """One learned map (Linear(d, d), initialised to the identity) per distilled layer."""

    def __init__(self, d_model: int, layers: Sequence[int]):
        super().__init__()
        self.layers = tuple(layers)
        self.maps = nn.ModuleList(nn.Linear(d_model, d_model) for _ in self.layers)
        with torch.no_grad():
            for m in self.maps:
                m.weight.copy_(torch.eye(d_model))
                m.bias.zero_()

    def forward(
        self,
        student: dict[int, torch.Tensor],
        teacher: dict[int, torch.Tensor],
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over layers of the per-element MSE over valid frames; ``lengths``: (B,)."""
        losses = []
        for k, m in zip(self.layers, self.maps):
            diff = m(_normalise(student[k])) - _normalise(teacher[k])
            valid = ~padding_mask(lengths, diff.size(1))
            losses.append(diff.pow(2).mean(-1)[valid].mean())
        return torch.stack(losses).mean()
