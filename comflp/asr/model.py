"""Transformer or Conformer CTC model with intermediate CTC, stochastic depth and an optional attention decoder.

Layer numbering (docs/DESIGN.md): index 0 is the output of the subsampling front end
(the input of layer 1), index k the output of encoder layer k, for k = 1..L. Every caller runs
the encoder the same way: ``encoder.embed`` (the front end, index 0), then
``encoder.forward_layers`` over any sequence of layers, then ``ASRModel.readout`` (final norm
and CTC head).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from comflp.asr.config import ModelConfig
from comflp.asr.ctc import ctc_loss
from comflp.asr.layers import (
    ConformerLayer,
    Conv2dSubsampling,
    DecoderLayer,
    Embedded,
    KeyValueCache,
    PositionalEncoding,
    TransformerLayer,
    padding_mask,
)
from comflp.subsets import check_num_prune, kept_layers


def encoder_layer(cfg: ModelConfig, k: int) -> nn.Module:
    """Encoder layer ``k`` (1-indexed) of ``cfg``, with the module sizes ``cfg.layer_shape(k)``."""
    shape = cfg.layer_shape(k)
    head_dim = cfg.d_model // cfg.num_heads
    drop_rate = cfg.layer_drop_rates()[k - 1]
    if cfg.encoder_type == "conformer":
        return ConformerLayer(
            cfg.d_model,
            shape["heads"],
            head_dim,
            shape["ffn1"],
            shape["ffn2"],
            shape["conv"],
            cfg.conv_kernel,
            cfg.dropout,
            drop_rate,
        )
    return TransformerLayer(
        cfg.d_model, shape["heads"], head_dim, shape["ffn"], cfg.dropout, drop_rate
    )


class Encoder(nn.Module):
    """Front end (``embed``), the layers, and the final norm (``after_norm``).

    Transformer: absolute positions added by the front end (``pos_emb`` None). Conformer: the
    front end's ``pos`` is a :class:`RelPositionalEncoding` and ``pos_emb`` carries the
    relative position embeddings to every layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = Conv2dSubsampling(
            cfg.input_dim,
            cfg.d_model,
            cfg.subsampling_channels,
            cfg.dropout,
            relative=cfg.encoder_type == "conformer",
        )
        self.layers = nn.ModuleList(encoder_layer(cfg, k) for k in range(1, cfg.num_layers + 1))
        self.after_norm = nn.LayerNorm(cfg.d_model)

    def forward_layers(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        layers: Sequence[int] | None = None,
        pos_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``layers`` (1-indexed, in the order given; default all) on ``x`` (B, T', D)."""
        for k in range(1, len(self.layers) + 1) if layers is None else layers:
            x = self.layers[k - 1](x, mask, pos_emb)
        return x

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, readout_layers: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Encode (B, T, F) features.

        Returns the normalised final output (B, T', D), its lengths, and for each layer k in
        ``readout_layers`` its output passed through the final norm (for intermediate CTC).
        """
        emb: Embedded = self.embed(feats, lengths)
        x, done, readouts = emb.x, 0, {}
        for k in sorted(set(readout_layers)):
            x = self.forward_layers(x, emb.mask, range(done + 1, k + 1), emb.pos_emb)
            readouts[k], done = self.after_norm(x), k
        x = self.forward_layers(x, emb.mask, range(done + 1, len(self.layers) + 1), emb.pos_emb)
        return self.after_norm(x), emb.lengths, readouts


class Decoder(nn.Module):
    """Pre-LN Transformer attention decoder over the encoder output.

    Layer numbering of the decoder stack (docs/DESIGN.md): index 0 is ``embed_tokens`` (token
    embeddings scaled, + sinusoidal positions), index k the output of decoder layer k;
    ``readout`` applies the final norm and the output layer. ``step`` runs any subset of the
    layers incrementally (one key/value cache per layer), as greedy decoding does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = PositionalEncoding(cfg.d_model, cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.decoder_layers)
        )
        self.after_norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size)

    def embed_tokens(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Index 0 of ``tokens`` (B, U) at positions ``offset`` .. ``offset + U - 1``."""
        return self.pos(self.embed(tokens), offset)

    @staticmethod
    def masks(
        token_lens: torch.Tensor, u: int, memory_lens: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal self-attention mask (B, 1, U, U) and the memory mask (B, 1, 1, T)."""
        causal = torch.ones(u, u, dtype=torch.bool, device=token_lens.device).tril()
        self_mask = causal[None, None] & ~padding_mask(token_lens, u)[:, None, None, :]
        return self_mask, ~padding_mask(memory_lens, t)[:, None, None, :]

    def forward_layers(
        self,
        y: torch.Tensor,
        self_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run decoder ``layers`` (1-indexed, in the order given; default all) on ``y``."""
        for k in range(1, len(self.layers) + 1) if layers is None else layers:
            y = self.layers[k - 1](y, self_mask, memory, memory_mask)
        return y

    def readout(self, y: torch.Tensor) -> torch.Tensor:
        """Logits (B, U, V) of any decoder layer's output: final norm, then the output layer."""
        return self.out(self.after_norm(y))

    def step(
        self,
        tokens: torch.Tensor,
        caches: dict[int, KeyValueCache],
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, V) after new ``tokens`` (B, n), with the decoder layers that ``caches``
        maps to their caches (1-indexed, in the order given)."""
        offset = next(iter(caches.values())).length
        y = self.embed_tokens(tokens, offset)
        for k, cache in caches.items():
            y = self.layers[k - 1].step(y, cache, memory, memory_mask)
        return self.readout(y[:, -1])

    def forward(
        self,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
        memory: torch.Tensor,
        memory_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, U, V) for input ``tokens`` (B, U) under a causal mask."""
        self_mask, memory_mask = self.masks(token_lens, tokens.size(1), memory_lens, memory.size(1))
        y = self.forward_layers(self.embed_tokens(tokens), self_mask, memory, memory_mask)
        return self.readout(y)


class ASRModel(nn.Module):
    """Encoder + CTC head (+ attention decoder). Token 0 is the CTC blank; the last token is
    the decoder's <sos/eos>."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 3:
            raise ValueError(
                f"model: 'vocab_size' must be >= 3 (blank, a token, <sos/eos>), got {cfg.vocab_size}"
            )
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.ctc = nn.Linear(cfg.d_model, cfg.vocab_size * cfg.ctc_upsample)
        self.decoder = Decoder(cfg) if cfg.decoder_layers > 0 else None

    @property
    def sos_eos(self) -> int:
        return self.cfg.vocab_size - 1

    def ctc_head(
        self, hidden: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities (B, T' * u, V) of normalised encoder states (B, T', D) and
        their lengths, u = ``ctc_upsample`` label distributions per encoder frame."""
        logits = self.ctc(hidden)
        u = self.cfg.ctc_upsample
        if u > 1:
            logits = logits.reshape(logits.size(0), logits.size(1) * u, -1)
        return logits.log_softmax(-1), lengths * u

    def readout(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities of any layer's output (B, T', D): final norm, then the head."""
        return self.ctc_head(self.encoder.after_norm(x), lengths)

    def ctc_log_probs(
        self, feats: torch.Tensor, feat_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T' * u, V) CTC log-probabilities of the whole model and their lengths."""
        emb = self.encoder.embed(feats, feat_lens)
        x = self.encoder.forward_layers(emb.x, emb.mask, None, emb.pos_emb)
        return self.readout(x, emb.lengths)

    def _ctc_loss(self, hidden, hidden_lens, targets, target_lens) -> torch.Tensor:
        log_probs, lengths = self.ctc_head(hidden, hidden_lens)
        return ctc_loss(log_probs, lengths, targets, target_lens) / hidden.size(0)

    def _attention_loss(
        self, memory, memory_lens, targets, target_lens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-smoothed cross entropy of the decoder (teacher forcing) and its token accuracy."""
        b = targets.size(0)
        sos = torch.full((b, 1), self.sos_eos, dtype=targets.dtype, device=targets.device)
        ys_in = torch.cat([sos, targets], dim=1)
        ys_out = torch.cat([targets, torch.zeros_like(sos)], dim=1)
        ys_out[torch.arange(b), target_lens] = self.sos_eos
        out_lens = target_lens + 1
        logits = self.decoder(ys_in, out_lens, memory, memory_lens)
        valid = ~padding_mask(out_lens, ys_out.size(1))
        loss = F.cross_entropy(
            logits[valid], ys_out[valid], label_smoothing=self.cfg.lsm_weight, reduction="sum"
        )
        acc = (logits[valid].argmax(-1) == ys_out[valid]).float().mean()
        return loss / b, acc

    def forward(
        self,
        feats: torch.Tensor,
        feat_lens: torch.Tensor,
        targets: torch.Tensor,
        target_lens: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss (mean over utterances of summed token losses) and its parts for logging.

        ``targets``: (B, U) padded token ids (no blank), ``target_lens``: (B,).
        """
        cfg = self.cfg
        readout = tuple(cfg.interctc_layers) if cfg.interctc_weight > 0 else ()
        enc, enc_lens, inter = self.encoder(feats, feat_lens, readout)
        loss_ctc = self._ctc_loss(enc, enc_lens, targets, target_lens)
        stats = {"ctc": loss_ctc.item()}
        if inter:
            inter_losses = []
            for k, h in inter.items():
                loss_k = self._ctc_loss(h, enc_lens, targets, target_lens)
                stats[f"interctc_{k}"] = loss_k.item()
                inter_losses.append(loss_k)
            loss_ctc = (1 - cfg.interctc_weight) * loss_ctc + cfg.interctc_weight * torch.stack(
                inter_losses
            ).mean()
        loss = loss_ctc
        if self.decoder is not None:
            loss_att, acc = self._attention_loss(enc, enc_lens, targets, target_lens)
            stats["att"] = loss_att.item()
            stats["att_acc"] = acc.item()
            loss = cfg.ctc_weight * loss_ctc + (1 - cfg.ctc_weight) * loss_att
        stats["loss"] = loss.item()
        return loss, stats


def _check_pruned(pruned: Sequence[int], num_layers: int, what: str) -> list[int]:
    """The layers kept when ``pruned`` go: ValueError for a layer outside 1..L or none kept."""
    pruned_set = set(pruned)
    bad = sorted(k for k in pruned_set if not 1 <= k <= num_layers)
    if bad:
        raise ValueError(f"pruned {what} {bad} are outside 1..{num_layers}")
    check_num_prune(len(pruned_set), num_layers)
    return list(kept_layers(num_layers, pruned_set))


def _kept_state(model: ASRModel, prefix: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """The model's weights without the layers ``prefix``.N that are not ``kept`` (1-indexed),
    the kept ones renumbered in order."""
    new_index = {old: new for new, old in enumerate(kept, start=1)}
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith(prefix):
            old = int(name[len(prefix) :].split(".")[0]) + 1
            if old not in new_index:
                continue
            rest = name[len(prefix) :].split(".", 1)[1]
            name = f"{prefix}{new_index[old] - 1}.{rest}"
        state[name] = value.clone()
    return state


def prune_layers(model: ASRModel, pruned: list[int] | tuple[int, ...]) -> ASRModel:
    """A new model with encoder layers ``pruned`` (1-indexed) physically removed.

    The kept layers are renumbered 1..L-P in order; intermediate-CTC readouts at removed
    layers are dropped and the others remapped (a readout that lands on the new last layer is
    dropped, since the final CTC already reads it). ``kept_layers`` in the new config records
    the original layer numbers, composed with any earlier pruning; ``layer_shapes`` (if set)
    keeps the kept layers' entries.
    """
    cfg = model.cfg
    num_layers = cfg.num_layers
    kept = _check_pruned(pruned, num_layers, "layers")
    new_index = {old: new for new, old in enumerate(kept, start=1)}
    new_layers = len(kept)
    interctc = [
        new_index[k] for k in cfg.interctc_layers if k in new_index and new_index[k] < new_layers
    ]
    rates = cfg.layer_drop_rates()
    original = cfg.kept_layers or list(range(1, num_layers + 1))
    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_layers = new_layers
    new_cfg.interctc_layers = interctc
    new_cfg.interctc_weight = cfg.interctc_weight if interctc else 0.0
    new_cfg.stochastic_depth_rate = [rates[k - 1] for k in kept]
    new_cfg.kept_layers = [original[k - 1] for k in kept]
    if cfg.layer_shapes is not None:
        new_cfg.layer_shapes = [dict(cfg.layer_shapes[k - 1]) for k in kept]
    pruned_model = ASRModel(new_cfg)
    pruned_model.load_state_dict(_kept_state(model, "encoder.layers.", kept))
    return pruned_model.train(model.training)


def prune_decoder_layers(model: ASRModel, pruned: list[int] | tuple[int, ...]) -> ASRModel:
    """A new model with decoder layers ``pruned`` (1-indexed) physically removed, the kept
    ones renumbered in order; ``decoder_kept_layers`` records their original numbers."""
    cfg = model.cfg
    if model.decoder is None:
        raise ValueError("the model has no attention decoder (decoder_layers: 0)")
    kept = _check_pruned(pruned, cfg.decoder_layers, "decoder layers")
    original = cfg.decoder_kept_layers or list(range(1, cfg.decoder_layers + 1))
    new_cfg = copy.deepcopy(cfg)
    new_cfg.decoder_layers = len(kept)
    new_cfg.decoder_kept_layers = [original[k - 1] for k in kept]
    pruned_model = ASRModel(new_cfg)
    pruned_model.load_state_dict(_kept_state(model, "decoder.layers.", kept))
    return pruned_model.train(model.training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
