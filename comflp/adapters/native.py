"""comflp's own models (stage 3, 8 and 9 experiment directories) as a :class:`PrunableModel`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from comflp import expdir
from comflp.adapters.base import Hidden, PrunableModel
from comflp.asr.checkpoint import copy_assets, load_experiment_config, load_model, save_model
from comflp.asr.config import ExperimentConfig
from comflp.asr.data import AsrDataset
from comflp.asr.features import load_cmvn
from comflp.asr.model import ASRModel, prune_layers
from comflp.asr.tokenizer import Tokenizer


class NativeModel(PrunableModel):
    """An :class:`ASRModel` with its tokenizer and CMVN statistics (fbank input)."""

    model_type = "comflp"

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
