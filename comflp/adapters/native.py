"""comflp's own models (stage 3, 8 and 9 experiment directories) as a :class:`PrunableModel`;
one with an attention decoder (``decoder_layers > 0``) is a :class:`DecoderModel`, whose
decoder is a second prunable stack."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from comflp import expdir
from comflp.adapters.base import (
    ATTENTION_DECODING,
    CTC_DECODING,
    CTC_WEIGHT,
    DECODE_BEAM_SIZE,
    MODEL_TYPES,
    DecoderModel,
    Hidden,
    PrunableModel,
)
from comflp.asr.checkpoint import copy_assets, load_experiment_config, load_model, save_model
from comflp.asr.config import ExperimentConfig
from comflp.asr.ctc import ctc_prefix_beam_search
from comflp.asr.data import AsrDataset
from comflp.asr.features import load_cmvn
from comflp.asr.layers import KeyValueCache
from comflp.asr.model import ASRModel, Decoder, prune_decoder_layers, prune_layers
from comflp.asr.rescoring import attention_rescoring
from comflp.asr.tokenizer import Tokenizer
from comflp.utils import eval_mode


def native_model(
    asr: ASRModel,
    tokenizer: Tokenizer,
    cmvn: tuple[torch.Tensor, torch.Tensor],
    source: Path,
    config: ExperimentConfig | None = None,
) -> NativeModel:
    """The adapter of ``asr``: a :class:`NativeAEDModel` when it has an attention decoder."""
    cls = NativeAEDModel if asr.decoder is not None else NativeModel
    return cls(asr, tokenizer, cmvn, source, config)


@MODEL_TYPES.register("native")
class NativeModel(PrunableModel):
    """An :class:`ASRModel` with its tokenizer and CMVN statistics (fbank input)."""

    model_type = "native"

    def __init__(
        self,
        asr: ASRModel,
        tokenizer: Tokenizer,
        cmvn: tuple[torch.Tensor, torch.Tensor],
        source: Path,
        config: ExperimentConfig | None = None,
    ):
        super().__init__(source)
        self.asr = asr
        self.tokenizer = tokenizer
        self.cmvn = cmvn
        self.config = config or ExperimentConfig(model=asr.cfg)
        self.device = next(asr.parameters()).device

    @classmethod
    def load(cls, model_dir: Path, checkpoint: str = expdir.MODEL) -> NativeModel:
        model_dir = Path(model_dir)
        return native_model(
            load_model(model_dir, checkpoint),
            Tokenizer(model_dir / expdir.TOKENIZER),
            load_cmvn(model_dir / expdir.CMVN),
            model_dir,
            load_experiment_config(model_dir),
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.asr

    @property
    def num_layers(self) -> int:
        return self.asr.cfg.num_layers

    @property
    def interctc_layers(self) -> tuple[int, ...]:
        return tuple(self.asr.cfg.interctc_layers)

    def dataset(self) -> AsrDataset:
        return AsrDataset(self.tokenizer, self.cmvn)

    def embed(self, batch: dict) -> Hidden:
        emb = self.asr.encoder.embed(
            batch["feats"].to(self.device), batch["feat_lens"].to(self.device)
        )
        return Hidden(emb.x, emb.lengths, (emb.mask, emb.pos_emb))

    def forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        mask, pos_emb = h.context
        x = self.asr.encoder.forward_layers(h.x, mask, layers, pos_emb)
        return Hidden(x, h.lengths, h.context)

    def readout(self, h: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        return self.asr.readout(h.x, h.lengths)

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def with_asr(self, asr: ASRModel) -> NativeModel:
        """The same tokenizer, CMVN and source around another network (a pruned one)."""
        return native_model(asr, self.tokenizer, self.cmvn, self.source, self.config)

    def prune(self, layers: Sequence[int]) -> NativeModel:
        return self.with_asr(prune_layers(self.asr, layers))

    def save(self, out_dir: Path, info: dict | None = None) -> None:
        copy_assets(self.tokenizer.path.parent, self.source / expdir.CMVN, out_dir)
        save_model(self.asr, self.config, out_dir, extra=info)


@dataclass
class _DecodingState:
    """Greedy decoding of one batch with some decoder layers: their caches and the memory."""

    caches: dict[int, KeyValueCache]
    memory: torch.Tensor
    memory_mask: torch.Tensor


class NativeAEDModel(NativeModel, DecoderModel):
    """An :class:`ASRModel` with an attention decoder: CTC and attention decoding, and the
    decoder as a second stack. Its prompt is ``<sos/eos>`` (the last token)."""

    decoding_methods = CTC_DECODING + ("attention_rescoring", ATTENTION_DECODING)

    @property
    def decoder(self) -> Decoder:
        return self.asr.decoder

    @property
    def num_decoder_layers(self) -> int:
        return self.asr.cfg.decoder_layers

    @property
    def eos_id(self) -> int:
        return self.asr.sos_eos

    def decoder_prefix(self) -> list[int]:
        return [self.asr.sos_eos]

    def memory(self, h: Hidden) -> Hidden:
        return Hidden(self.asr.encoder.after_norm(h.x), h.lengths)

    def decoder_embed(self, memory: Hidden, tokens: torch.Tensor, lengths: torch.Tensor) -> Hidden:
        masks = Decoder.masks(lengths, tokens.size(1), memory.lengths, memory.x.size(1))
        return Hidden(self.decoder.embed_tokens(tokens), lengths, (memory.x, *masks))

    def decoder_forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        memory, self_mask, memory_mask = h.context
        y = self.decoder.forward_layers(h.x, self_mask, memory, memory_mask, layers)
        return Hidden(y, h.lengths, h.context)

    def decoder_readout(self, h: Hidden) -> torch.Tensor:
        return self.decoder.readout(h.x).float().log_softmax(-1)

    def decoder_start(self, memory: Hidden, layers: Sequence[int]) -> _DecodingState:
        mask = Decoder.masks(memory.lengths, 1, memory.lengths, memory.x.size(1))[1]
        return _DecodingState({k: KeyValueCache() for k in layers}, memory.x, mask)

    def decoder_step(self, state: _DecodingState, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.step(tokens, state.caches, state.memory, state.memory_mask)
        return logits.float().log_softmax(-1)

    def max_new_tokens(self, memory: Hidden) -> int:
        """The CTC bound (a token per CTC frame, as training's references) and ``<eos>``."""
        return int(memory.lengths.max()) * self.asr.cfg.ctc_upsample + 1

    def prune_decoder(self, layers: Sequence[int]) -> NativeModel:
        return self.with_asr(prune_decoder_layers(self.asr, layers))

    @torch.no_grad()
    def decode(
        self,
        batch: dict,
        method: str = "ctc_greedy_search",
        beam_size: int = DECODE_BEAM_SIZE,
        ctc_weight: float = CTC_WEIGHT,
    ) -> list[list[int]]:
        """As :meth:`DecoderModel.decode`, and ``attention_rescoring``: the CTC prefix beam
        search's n-best rescored by the attention decoder, weighted by ``ctc_weight``."""
        if method != "attention_rescoring":
            return super().decode(batch, method, beam_size, ctc_weight)
        self.check_decoding(method, beam_size, ctc_weight)
        with eval_mode(self.asr):
            h = self.forward_layers(self.embed(batch))
            log_probs, ctc_lens = self.readout(h)
            hyps = []
            for i, n in enumerate(ctc_lens.tolist()):
                nbest = ctc_prefix_beam_search(
                    log_probs[i, :n], beam_size, beam_size, self.blank_id
                )
                if len(nbest) > 1:
                    enc = self.asr.encoder.after_norm(h.x[i, : int(h.lengths[i])])
                    hyps.append(attention_rescoring(self.asr, enc, nbest, ctc_weight)[0])
                else:
                    hyps.append(nbest[0][0])
            return hyps


NativeModel.also_loads = (NativeAEDModel,)  # load() returns it for a model with a decoder
