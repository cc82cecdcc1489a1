"""Transformer CTC model with intermediate CTC, stochastic depth and an optional attention decoder.

Layer numbering follows CONVENTIONS.md: index 0 is the output of the subsampling front end
(the input of layer 1), index k the output of encoder layer k, for k = 1..L.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from comflp.asr.config import ModelConfig


def padding_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B, T) boolean mask, True at padding positions."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frame counts after two 3x3 stride-2 convolutions (x4 subsampling)."""
    return ((lengths - 1) // 2 - 1) // 2


MIN_INPUT_FRAMES = 7  # the fewest input frames that leave one frame after subsampling


class PositionalEncoding(nn.Module):
    """Sinusoidal absolute position encoding, added to ``x * sqrt(d)``."""

    def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", self._table(d_model, max_len), persistent=False)

    @staticmethod
    def _table(d_model: int, max_len: int) -> torch.Tensor:
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > self.pe.size(0):
            self.pe = self._table(self.pe.size(1), x.size(1)).to(x.device)
        return self.dropout(x * self.scale + self.pe[: x.size(1)].to(x.dtype))


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions (time and frequency x4), a projection, positions."""

    def __init__(self, input_dim: int, d_model: int, channels: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 2),
            nn.ReLU(),
        )
        freq = ((input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, d_model)
        self.pos = PositionalEncoding(d_model, dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return self.pos(x), subsampled_lengths(lengths)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.h = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``mask``: boolean, broadcastable to (B, heads, Tq, Tk), True where attention is allowed."""
        b, tq, d = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, self.h, d // self.h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(query)),
            heads(self.k(key)),
            heads(self.v(value)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, tq, d))


def feed_forward(d_model: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
    )


class EncoderLayer(nn.Module):
    """Pre-LN Transformer layer with stochastic depth.

    In training the whole layer is skipped with probability ``drop_rate``; when it runs, its
    residual branches are scaled by 1 / (1 - drop_rate). In eval it always runs, unscaled.
    """

    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, drop_rate: float
    ):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = feed_forward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scale = 1.0
        if self.training and self.drop_rate > 0:
            if torch.rand(()) < self.drop_rate:
                return x
            scale = 1.0 / (1.0 - self.drop_rate)
        y = self.norm_attn(x)
        x = x + scale * self.dropout(self.attn(y, y, y, mask))
        return x + scale * self.dropout(self.ff(self.norm_ff(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = Conv2dSubsampling(
            cfg.input_dim, cfg.d_model, cfg.subsampling_channels, cfg.dropout
        )
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout, p)
            for p in cfg.layer_drop_rates()
        )
        self.after_norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, readout_layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Encode (B, T, F) features.

        Returns the normalised final output (B, T', D), its lengths, and for each layer k in
        ``readout_layers`` its output passed through the final norm (for intermediate CTC).
        """
        x, lengths = self.embed(feats, lengths)
        mask = ~padding_mask(lengths, x.size(1))[:, None, None, :]
        readouts = {}
        for k, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if k in readout_layers:
                readouts[k] = self.after_norm(x)
        return self.after_norm(x), lengths, readouts


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.norm_src = nn.LayerNorm(d_model)
        self.src_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = feed_forward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, self_mask, memory, memory_mask):
        h = self.norm_self(y)
        y = y + self.dropout(self.self_attn(h, h, h, self_mask))
        h = self.norm_src(y)
        y = y + self.dropout(self.src_attn(h, memory, memory, memory_mask))
        return y + self.dropout(self.ff(self.norm_ff(y)))


class Decoder(nn.Module):
    """Pre-LN Transformer attention decoder over the encoder output."""

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

    def forward(
        self,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
        memory: torch.Tensor,
        memory_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, U, V) for input ``tokens`` (B, U) under a causal mask."""
        u = tokens.size(1)
        causal = torch.ones(u, u, dtype=torch.bool, device=tokens.device).tril()
        self_mask = causal[None, None] & ~padding_mask(token_lens, u)[:, None, None, :]
        memory_mask = ~padding_mask(memory_lens, memory.size(1))[:, None, None, :]
        y = self.pos(self.embed(tokens))
        for layer in self.layers:
            y = layer(y, self_mask, memory, memory_mask)
        return self.out(self.after_norm(y))


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

    def ctc_log_probs(
        self, feats: torch.Tensor, feat_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T' * u, V) CTC log-probabilities of the final layer and their lengths."""
        enc, enc_lens, _ = self.encoder(feats, feat_lens)
        return self.ctc_head(enc, enc_lens)

    def _ctc_loss(self, hidden, hidden_lens, targets, target_lens) -> torch.Tensor:
        log_probs, lengths = self.ctc_head(hidden, hidden_lens)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1).float(),
            targets,
            lengths,
            target_lens,
            blank=0,
            reduction="sum",
            zero_infinity=True,
        )
        return loss / hidden.size(0)

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
        flat_targets = targets[~padding_mask(target_lens, targets.size(1))]
        loss_ctc = self._ctc_loss(enc, enc_lens, flat_targets, target_lens)
        stats = {"ctc": loss_ctc.item()}
        if inter:
            inter_losses = []
            for k, h in inter.items():
                loss_k = self._ctc_loss(h, enc_lens, flat_targets, target_lens)
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


def prune_layers(model: ASRModel, pruned: list[int] | tuple[int, ...]) -> ASRModel:
    """A new model with encoder layers ``pruned`` (1-indexed) physically removed.

    The kept layers are renumbered 1..L-P in order; intermediate-CTC readouts at removed
    layers are dropped and the others remapped (a readout that lands on the new last layer is
    dropped, since the final CTC already reads it). ``kept_layers`` in the new config records
    the original layer numbers, composed with any earlier pruning.
    """
    cfg = model.cfg
    num_layers = cfg.num_layers
    pruned_set = set(pruned)
    bad = sorted(k for k in pruned_set if not 1 <= k <= num_layers)
    if bad:
        raise ValueError(f"pruned layers {bad} are outside 1..{num_layers}")
    if not 1 <= len(pruned_set) < num_layers:
        raise ValueError(
            f"can prune between 1 and {num_layers - 1} of {num_layers} layers, got {len(pruned_set)}"
        )
    kept = [k for k in range(1, num_layers + 1) if k not in pruned_set]
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

    pruned_model = ASRModel(new_cfg)
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("encoder.layers."):
            old = int(name.split(".")[2]) + 1
            if old not in new_index:
                continue
            rest = name.split(".", 3)[3]
            name = f"encoder.layers.{new_index[old] - 1}.{rest}"
        state[name] = value.clone()
    pruned_model.load_state_dict(state)
    return pruned_model.train(model.training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
