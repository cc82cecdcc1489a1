"""Building blocks of the encoder and decoder: masks, positions, subsampling, attention,
feed-forward, convolution and the Transformer and Conformer layers.

Every encoder layer takes its module sizes explicitly (heads, feed-forward units, convolution
channels), so that a structurally pruned model (``ModelConfig.layer_shapes``) is built from the
same classes; a size of 0 leaves that module (and its norm) out, and its residual branch is
skipped. The head dimension is always the original ``d_model // num_heads``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` (B, T, d) at positions ``offset`` .. ``offset + T - 1`` (incremental decoding
        feeds one token at a time)."""
        end = offset + x.size(1)
        if end > self.pe.size(0):
            self.pe = self._table(self.pe.size(1), end).to(x.device)
        return self.dropout(x * self.scale + self.pe[offset:end].to(x.dtype))


class RelPositionalEncoding(nn.Module):
    """Scales ``x`` by sqrt(d) (then dropout) and gives the sinusoidal embeddings of the
    relative positions T-1, T-2, ..., -(T-1), as a (1, 2T-1, d) tensor (Transformer-XL;
    ESPnet's "latest" RelPositionalEncoding). No dropout on the embeddings."""

    def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", self._table(d_model, max_len), persistent=False)

    @staticmethod
    def _table(d_model: int, max_len: int) -> torch.Tensor:
        """(2 max_len - 1, d): row m holds relative position max_len - 1 - m."""
        rel = torch.arange(max_len - 1, -max_len, -1, dtype=torch.float32)[:, None]
        div = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(rel.size(0), d_model)
        pe[:, 0::2] = torch.sin(rel * div)
        pe[:, 1::2] = torch.cos(rel * div)
        return pe

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.size(1)
        center = (self.pe.size(0) - 1) // 2  # the row of relative position 0
        if t > center + 1:
            self.pe = self._table(self.d_model, t).to(x.device)
            center = t - 1
        pos_emb = self.pe[center - t + 1 : center + t].to(x.dtype)[None]
        return self.dropout(x * self.scale), pos_emb


class Embedded(NamedTuple):
    """What the front end hands to encoder layer 1 (layer index 0)."""

    x: torch.Tensor  # (B, T', D)
    lengths: torch.Tensor  # (B,) valid frames
    mask: torch.Tensor  # (B, 1, 1, T') True where attention is allowed
    pos_emb: torch.Tensor | None  # relative positions for layers that use them, else None


def attention_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, 1, 1, T) boolean mask, True at valid key positions."""
    return ~padding_mask(lengths, max_len)[:, None, None, :]


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions (time and frequency x4), a projection, positions.

    Absolute positions are added to the output (Transformer, ``pos_emb`` None); with
    ``relative`` the output is only scaled and ``pos_emb`` holds the relative position
    embeddings the Conformer's attention uses.
    """

    def __init__(
        self, input_dim: int, d_model: int, channels: int, dropout: float, relative: bool = False
    ):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 2),
            nn.ReLU(),
        )
        freq = ((input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, d_model)
        self.relative = relative
        self.pos = (RelPositionalEncoding if relative else PositionalEncoding)(d_model, dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Embedded:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        lengths = subsampled_lengths(lengths)
        mask = attention_mask(lengths, t)
        if self.relative:
            x, pos_emb = self.pos(x)
            return Embedded(x, lengths, mask, pos_emb)
        return Embedded(self.pos(x), lengths, mask, None)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` dimensions each.

    ``q``, ``k``, ``v``: Linear(d_model, num_heads * head_dim), outputs grouped by head (head
    i owns rows i * head_dim : (i + 1) * head_dim); ``out``: Linear(num_heads * head_dim,
    d_model), head i owns the same range of its input columns.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"need num_heads >= 1 and head_dim >= 1, got {num_heads}, {head_dim}")
        self.h = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(d_model, inner)
        self.k = nn.Linear(d_model, inner)
        self.v = nn.Linear(d_model, inner)
        self.out = nn.Linear(inner, d_model)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, h * dk) -> (B, h, T, dk)."""
        return x.view(x.size(0), -1, self.h, self.head_dim).transpose(1, 2)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, h, T, dk) -> the output projection of (B, T, h * dk)."""
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, self.h * self.head_dim))

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``mask``: boolean, broadcastable to (B, heads, Tq, Tk), True where attention is allowed."""
        return self.attend(query, self._heads(self.k(key)), self._heads(self.v(value)), mask)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, h, T, dk) of ``x``: what a decoder caches between steps."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def attend(
        self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of ``query`` (B, Tq, d_model) over projected keys and values (B, h, Tk, dk)."""
        y = F.scaled_dot_product_attention(
            self._heads(self.q(query)),
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self._merge(y)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(..., T, 2T-1) scores against the relative positions T-1 ... -(T-1) -> (..., T, T)
    scores where [i, j] is the entry of relative position i - j (column T-1-i+j of row i)."""
    t = x.size(-2)
    if x.size(-1) != 2 * t - 1:
        raise ValueError(f"expected (..., {t}, {2 * t - 1}) scores, got {tuple(x.shape)}")
    x = x.contiguous()
    # Row i starts at i * (2T-1); its entry T-1-i+j sits at T-1 + i * (2T-2) + j.
    strides = (*x.stride()[:-2], 2 * t - 2, 1)
    return x.as_strided((*x.shape[:-1], t), strides, x.storage_offset() + t - 1)


class RelPositionMultiHeadAttention(MultiHeadAttention):
    """Self-attention with relative positions (Transformer-XL; ESPnet's "latest"
    RelPositionMultiHeadedAttention): scores ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(dk)
    with p = ``pos``(pos_emb) and the learned biases u = ``pos_bias_u``, v = ``pos_bias_v``
    of shape (heads, head_dim); ``pos`` (no bias) groups its outputs by head like ``q``."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__(d_model, num_heads, head_dim, dropout)
        self.pos = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        pos_emb: torch.Tensor,
    ) -> torch.Tensor:
        """``mask`` as in :class:`MultiHeadAttention`; ``pos_emb``: (1 or B, 2T-1, d_model)
        embeddings of the relative positions T-1 ... -(T-1), T the query and key length."""
        q = self._heads(self.q(query))  # (B, h, T, dk)
        k = self._heads(self.k(key))
        v = self._heads(self.v(value))
        p = self._heads(self.pos(pos_emb))  # (1, h, 2T-1, dk)
        content = (q + self.pos_bias_u[:, None]) @ k.transpose(-2, -1)
        position = rel_shift((q + self.pos_bias_v[:, None]) @ p.transpose(-2, -1))
        scores = (content + position) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self._merge(attn @ v)


def feed_forward(
    d_model: int, ffn_dim: int, dropout: float, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """Linear(d, n) -> activation -> dropout -> Linear(n, d): the units are the rows of
    ``[0]`` and the columns of ``[3]``."""
    return nn.Sequential(
        nn.Linear(d_model, ffn_dim), activation(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
    )


def _drop_scale(layer: nn.Module) -> float | None:
    """Stochastic depth: None to skip the layer (training, probability ``drop_rate``), else
    the factor of its residual branches (1 / (1 - drop_rate) in training, 1 in eval)."""
    if layer.training and layer.drop_rate > 0:
        if torch.rand(()) < layer.drop_rate:
            return None
        return 1.0 / (1.0 - layer.drop_rate)
    return 1.0


class TransformerLayer(nn.Module):
    """Pre-LN Transformer layer with stochastic depth.

    In training the whole layer is skipped with probability ``drop_rate``; when it runs, its
    residual branches are scaled by 1 / (1 - drop_rate). In eval it always runs, unscaled.
    ``num_heads`` heads of ``head_dim`` dimensions and ``ffn_dim`` feed-forward units; a size of
    0 leaves that module out (``norm_attn``/``attn`` or ``norm_ff``/``ff`` are None).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        ffn_dim: int,
        dropout: float,
        drop_rate: float,
    ):
        super().__init__()
        self.norm_attn = self.attn = self.norm_ff = self.ff = None
        if num_heads > 0:
            self.norm_attn = nn.LayerNorm(d_model)
            self.attn = MultiHeadAttention(d_model, num_heads, head_dim, dropout)
        if ffn_dim > 0:
            self.norm_ff = nn.LayerNorm(d_model)
            self.ff = feed_forward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)
        self.drop_rate = drop_rate

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pos_emb`` is unused: positions were added by the front end."""
        scale = _drop_scale(self)
        if scale is None:
            return x
        if self.attn is not None:
            y = self.norm_attn(x)
            x = x + scale * self.dropout(self.attn(y, y, y, mask))
        if self.ff is not None:
            x = x + scale * self.dropout(self.ff(self.norm_ff(x)))
        return x


class ConvModule(nn.Module):
    """Conformer convolution module with ``channels`` channels: ``pointwise1`` Conv1d(d, 2c, 1)
    -> GLU over channels -> ``depthwise`` Conv1d(c, c, kernel, groups=c) -> ``norm``
    BatchNorm1d(c) -> Swish -> ``pointwise2`` Conv1d(c, d, 1) -> dropout.

    Channel i of the module is output channel i (value half) and i + c (gate half) of
    ``pointwise1``, channel i of ``depthwise`` and ``norm``, input channel i of ``pointwise2``.
    Padded frames are zeroed before the depthwise convolution. (In training, BatchNorm's batch
    statistics still see the padded frames; in eval it uses its running statistics.)
    """

    def __init__(self, d_model: int, channels: int, kernel: int, dropout: float):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"conv kernel must be odd, got {kernel}")
        self.pointwise1 = nn.Conv1d(d_model, 2 * channels, 1)
        self.depthwise = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = nn.BatchNorm1d(channels)
        self.pointwise2 = nn.Conv1d(channels, d_model, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``: (B, T, d); ``mask``: (B, 1, 1, T) True at valid frames."""
        y = F.glu(self.pointwise1(x.transpose(1, 2)), dim=1)  # (B, c, T)
        y = y.masked_fill(~mask[:, 0], 0.0)
        y = F.silu(self.norm(self.depthwise(y)))
        return self.dropout(self.pointwise2(y)).transpose(1, 2)


class ConformerLayer(nn.Module):
    """Conformer block (Gulati et al. 2020, ESPnet order) with stochastic depth:

    x += 0.5 ff1(norm_ff1(x)); x += attn(norm_attn(x), pos_emb); x += conv(norm_conv(x));
    x += 0.5 ff2(norm_ff2(x)); x = norm_final(x).

    Feed-forward modules use Swish. Each branch goes through dropout; in training the block is
    skipped (x returned unchanged) with probability ``drop_rate``, else every branch is scaled
    by 1 / (1 - drop_rate). A size of 0 leaves that module and its norm out (None).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        ffn1_dim: int,
        ffn2_dim: int,
        conv_channels: int,
        conv_kernel: int,
        dropout: float,
        drop_rate: float,
    ):
        super().__init__()
        self.norm_ff1 = self.ff1 = self.norm_attn = self.attn = None
        self.norm_conv = self.conv = self.norm_ff2 = self.ff2 = None
        if ffn1_dim > 0:
            self.norm_ff1 = nn.LayerNorm(d_model)
            self.ff1 = feed_forward(d_model, ffn1_dim, dropout, nn.SiLU)
        if num_heads > 0:
            self.norm_attn = nn.LayerNorm(d_model)
            self.attn = RelPositionMultiHeadAttention(d_model, num_heads, head_dim, dropout)
        if conv_channels > 0:
            self.norm_conv = nn.LayerNorm(d_model)
            self.conv = ConvModule(d_model, conv_channels, conv_kernel, dropout)
        if ffn2_dim > 0:
            self.norm_ff2 = nn.LayerNorm(d_model)
            self.ff2 = feed_forward(d_model, ffn2_dim, dropout, nn.SiLU)
        self.norm_final = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.drop_rate = drop_rate

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pos_emb``: the front end's relative position embeddings (needed with attention)."""
        scale = _drop_scale(self)
        if scale is None:
            return x
        if self.ff1 is not None:
            x = x + 0.5 * scale * self.dropout(self.ff1(self.norm_ff1(x)))
        if self.attn is not None:
            if pos_emb is None:
                raise ValueError("a Conformer layer needs the relative position embeddings")
            y = self.norm_attn(x)
            x = x + scale * self.dropout(self.attn(y, y, y, mask, pos_emb))
        if self.conv is not None:
            x = x + scale * self.dropout(self.conv(self.norm_conv(x), mask))
        if self.ff2 is not None:
            x = x + 0.5 * scale * self.dropout(self.ff2(self.norm_ff2(x)))
        return self.norm_final(x)


class KeyValueCache:
    """One decoder layer's keys and values between decoding steps: of its self-attention
    (grown by each step) and of its source attention (the memory's, computed once)."""

    def __init__(self):
        self.self_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.src_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """Positions seen so far."""
        return 0 if self.self_kv is None else self.self_kv[0].size(2)


class DecoderLayer(nn.Module):
    """Pre-LN Transformer decoder layer: causal self-attention, attention over the encoder
    output (the memory), feed-forward; ``step`` runs it incrementally with a cache."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        head_dim = d_model // num_heads
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, head_dim, dropout)
        self.norm_src = nn.LayerNorm(d_model)
        self.src_attn = MultiHeadAttention(d_model, num_heads, head_dim, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = feed_forward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, self_mask, memory, memory_mask):
        h = self.norm_self(y)
        y = y + self.dropout(self.self_attn(h, h, h, self_mask))
        h = self.norm_src(y)
        y = y + self.dropout(self.src_attn(h, memory, memory, memory_mask))
        return y + self.dropout(self.ff(self.norm_ff(y)))

    def step(
        self,
        y: torch.Tensor,
        cache: KeyValueCache,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The outputs of the new positions ``y`` (B, n, D) given the earlier ones in
        ``cache`` (which grows by n): what ``forward`` gives for them on the whole sequence."""
        h = self.norm_self(y)
        k, v = self.self_attn.keys_values(h)
        if cache.self_kv is not None:
            k = torch.cat([cache.self_kv[0], k], dim=2)
            v = torch.cat([cache.self_kv[1], v], dim=2)
        n, seen = y.size(1), cache.length
        cache.self_kv = (k, v)
        mask = None
        if n > 1:
            mask = torch.ones(n, seen + n, dtype=torch.bool, device=y.device).tril(seen)
        y = y + self.dropout(self.self_attn.attend(h, k, v, mask))
        if cache.src_kv is None:
            cache.src_kv = self.src_attn.keys_values(memory)
        h = self.norm_src(y)
        y = y + self.dropout(self.src_attn.attend(h, *cache.src_kv, memory_mask))
        return y + self.dropout(self.ff(self.norm_ff(y)))
