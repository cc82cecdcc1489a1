"""comflp's own models (stage 3, 8 and 9 experiment directories) as a :class:`PrunableModel`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from comflp import expdir
from comflp.adapters.base import CTC_DECODING, MODEL_TYPES, Hidden, PrunableModel
from comflp.asr.checkpoint import copy_assets, load_experiment_config, load_model, save_model
from comflp.asr.config import ExperimentConfig
from comflp.asr.ctc import ctc_prefix_beam_search
from comflp.asr.data import AsrDataset
from comflp.asr.features import load_cmvn
from comflp.asr.model import ASRModel, prune_layers
from comflp.asr.rescoring import attention_rescoring
from comflp.asr.tokenizer import Tokenizer
from comflp.utils import eval_mode


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
        return cls(
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

    @property
    def decoding_methods(self) -> tuple[str, ...]:
        rescoring = ("attention_rescoring",) if self.asr.decoder is not None else ()
        return CTC_DECODING + rescoring

    @torch.no_grad()
    def decode(
        self,
        batch: dict,
        method: str = "ctc_greedy_search",
        beam_size: int = 10,
        ctc_weight: float = 0.3,
    ) -> list[list[int]]:
        """As :meth:`PrunableModel.decode`, and ``attention_rescoring``: the CTC prefix beam
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

    def prune(self, layers: Sequence[int]) -> NativeModel:
        return NativeModel(
            prune_layers(self.asr, layers), self.tokenizer, self.cmvn, self.source, self.config
        )

    def save(self, out_dir: Path, info: dict | None = None) -> None:
        copy_assets(self.tokenizer.path.parent, self.source / expdir.CMVN, out_dir)
        save_model(self.asr, self.config, out_dir, extra=info)
