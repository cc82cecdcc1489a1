"""Hugging Face wav2vec2-family CTC models (a ``save_pretrained`` directory) as a :class:`PrunableModel`;
``--model_type hf`` also loads Whisper (:mod:`comflp.adapters.whisper`).

Supported: ``Wav2Vec2ForCTC``, ``HubertForCTC``, ``WavLMForCTC``, ``Data2VecAudioForCTC``, with
either encoder variant (``do_stable_layer_norm`` false: post-norm layers and a LayerNorm on the
encoder input; true: pre-norm layers and a LayerNorm after the last layer). The directory holds
the model and its processor (feature extractor + CTC vocabulary).

Layer numbering (docs/DESIGN.md) for these models:

- index 0 (``embed``): conv feature encoder -> feature projection -> padded frames zeroed ->
  + positional conv embedding -> (post-norm variant only) the encoder's LayerNorm -> dropout:
  exactly what enters ``encoder.layers[0]``, equal to HF's ``hidden_states[0]``;
- index k: the output of ``encoder.layers[k-1]``, equal to HF's ``hidden_states[k]`` (the
  installed transformers records the raw layer outputs, ``tie_last_hidden_states=False``);
- ``readout``: (pre-norm variant) the encoder's final LayerNorm -> (optional) a LayerNorm before
  ``lm_head`` -> ``lm_head`` -> log-softmax. HF's ``last_hidden_state`` of the pre-norm variant
  is therefore ``hidden_states[L]`` after that final norm, not index L.

Batches are made as the model's own processor makes them: the feature extractor with its own
settings pads (and normalises) the waveforms, and the attention mask goes to the model only
when the feature extractor returns one (``return_attention_mask``; HF's wav2vec2-base style
models are run without it). Lengths (for pooling, CTC and decoding) always count valid frames.

In training mode ``embed`` applies the model's own SpecAugment (``mask_time_prob``, ...);
LayerDrop is not applied (``forward_layers`` runs every layer it is given).

WavLM: the relative position bias is computed by the first layer's ``rel_attn_embed`` and
shared by every later layer (each gates it itself). ``embed`` computes it once from
``encoder.layers[0]`` and keeps it in ``Hidden.context``, so any layer subset, including one
without layer 1, receives what layer 1 would have computed. ``prune`` that removes layer 1 moves
that embedding into the new first layer, so the saved model reloads with the same outputs.

CoMFLP's AISHELL model has a LayerNorm between the encoder and ``lm_head``. It is found in the
weights: a pair ``<name>.weight``/``<name>.bias`` of size ``hidden_size`` at the top level of
the state dict that the HF class does not load (or give ``lm_head_norm=<name>`` to
:meth:`HFModel.load` to require it). It becomes a submodule ``<name>`` of the HF model, so
``save_pretrained`` writes it back; the stock HF class reports those two keys as unexpected.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from lhotse import CutSet

from comflp import expdir
from comflp.adapters.base import MODEL_TYPES, Hidden, PrunableModel
from comflp.adapters.hf_utils import (
    first_line,
    load_audio,
    load_hf_config,
    missing_weights,
    normalize_text,
    quiet_transformers,
    text_case,
)
from comflp.adapters.whisper import WhisperAdapter
from comflp.asr.config import ConfigError
from comflp.asr.data import transcripts
from comflp.subsets import checked_kept
from comflp.utils import atomic_write_json

# The CTC classes supported, by config.model_type.
CTC_CLASSES = {
    "wav2vec2": "Wav2Vec2ForCTC",
    "hubert": "HubertForCTC",
    "wavlm": "WavLMForCTC",
    "data2vec-audio": "Data2VecAudioForCTC",
}


def _architecture(config, model_dir: Path) -> str:
    """The supported CTC class named by ``config`` (ConfigError otherwise)."""
    names = list(getattr(config, "architectures", None) or [])
    arch = names[0] if names else CTC_CLASSES.get(config.model_type)
    supported = ", ".join(CTC_CLASSES.values())
    if arch in CTC_CLASSES.values():
        return arch
    if config.model_type in CTC_CLASSES:
        raise ConfigError(
            f"{model_dir}: {arch} has no CTC head (comflp prunes CTC models: {supported})"
        )
    raise ConfigError(
        f"{model_dir}: unsupported architecture {arch or config.model_type!r}; "
        f"supported: {supported}, WhisperForConditionalGeneration"
    )


def _read_tensors(model_dir: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tensors ``names`` from the weights ``save_pretrained`` wrote (safetensors, maybe sharded)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {n: model_dir / weight_map[n] for n in names}
    else:
        files = {n: model_dir / "model.safetensors" for n in names}
    tensors = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def _lm_head_norm(
    model_dir: Path, unexpected: Sequence[str], hidden_size: int, eps: float, name: str | None
) -> tuple[str | None, torch.nn.LayerNorm | None]:
    """The LayerNorm before ``lm_head`` among the weights the HF class did not load, if any."""
    pairs = sorted(
        m.group(1)
        for key in unexpected
        if (m := re.fullmatch(r"([A-Za-z_]\w*)\.weight", key))
        and f"{m.group(1)}.bias" in unexpected
    )
    if name is None:
        if len(pairs) > 1:
            raise ConfigError(
                f"{model_dir}: several candidate LayerNorms before lm_head ({', '.join(pairs)}); "
                "name one with lm_head_norm"
            )
        name = pairs[0] if pairs else None
    elif name not in pairs:
        raise ConfigError(f"{model_dir}: no LayerNorm {name}.weight/{name}.bias in the weights")
    if name is None:
        return None, None
    tensors = _read_tensors(model_dir, [f"{name}.weight", f"{name}.bias"])
    if any(t.shape != (hidden_size,) for t in tensors.values()):
        raise ConfigError(
            f"{model_dir}: {name}.weight/{name}.bias are not a LayerNorm of size {hidden_size}"
        )
    norm = torch.nn.LayerNorm(hidden_size, eps=eps)
    norm.load_state_dict({"weight": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]})
    return name, norm


class HFDataset(torch.utils.data.Dataset):
    """Maps a CutSet to ``audio`` (B, S) as the feature extractor prepares it, ``audio_lens``
    (samples), ``attention_mask`` (or None) and the keys of :func:`transcripts`, references
    cased like the vocabulary. Utterances come longest first."""

    def __init__(self, processor):
        self.extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.case = text_case(self.tokenizer)

    def normalize(self, text: str) -> str:
        return normalize_text(text, self.case)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(self.normalize(text), add_special_tokens=False)

    def __getitem__(self, cuts: CutSet) -> dict:
        cuts = cuts.sort_by_duration(ascending=False)
        rate = self.extractor.sampling_rate
        audio = load_audio(cuts, rate)
        inputs = self.extractor(audio, sampling_rate=rate, padding=True, return_tensors="pt")
        batch = transcripts(cuts, self.encode)
        batch["texts"] = [self.normalize(t) for t in batch["texts"]]
        return {
            "audio": inputs["input_values"],
            "audio_lens": torch.tensor([len(a) for a in audio], dtype=torch.long),
            "attention_mask": inputs.get("attention_mask"),
            **batch,
        }


@MODEL_TYPES.register("hf")
class HFModel(PrunableModel):
    """A transformers ``*ForCTC`` model and its ``Wav2Vec2Processor``."""

    model_type = "hf"
    also_loads = (WhisperAdapter,)

    def __init__(self, hf: torch.nn.Module, processor, source: Path, lm_head_norm: str | None):
        super().__init__(source)
        self.hf = hf
        self.processor = processor
        self.lm_head_norm = lm_head_norm  # the name of the LayerNorm submodule before lm_head
        self.device = next(hf.parameters()).device
        encoder = hf.base_model.encoder
        self.stable_layer_norm = type(encoder).__name__.endswith("StableLayerNorm")
        self.wavlm = hf.config.model_type == "wavlm"

    @classmethod
    def load(cls, model_dir: Path, lm_head_norm: str | None = None) -> PrunableModel:
        """Load ``model_dir``; ``lm_head_norm``: the LayerNorm before ``lm_head`` (default:
        found). A Whisper model is a :class:`~comflp.adapters.whisper.WhisperAdapter`."""
        import transformers

        model_dir = Path(model_dir)
        config = load_hf_config(model_dir)
        if config.model_type == "whisper":
            return WhisperAdapter.load(model_dir)
        arch = _architecture(config, model_dir)
        if getattr(config, "add_adapter", False):
            raise ConfigError(f"{model_dir}: models with add_adapter=true are not supported")
        if config.pad_token_id is None:
            raise ConfigError(f"{model_dir}/config.json: no pad_token_id (the CTC blank)")
        try:
            with quiet_transformers():
                hf, info = getattr(transformers, arch).from_pretrained(
                    model_dir, output_loading_info=True
                )
                processor = transformers.Wav2Vec2Processor.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{model_dir}: cannot load the {arch} model or processor ({first_line(e)})"
            ) from None
        missing = sorted(info["missing_keys"])
        if any(k.startswith("lm_head.") for k in missing):
            raise ConfigError(f"{model_dir}: the weights have no CTC head (lm_head) for {arch}")
        if missing:
            raise missing_weights(model_dir, arch, missing)
        unexpected = list(info["unexpected_keys"])
        name, norm = _lm_head_norm(
            model_dir, unexpected, config.hidden_size, config.layer_norm_eps, lm_head_norm
        )
        if norm is not None:
            hf.add_module(name, norm)
        ignored = sorted(set(unexpected) - {f"{name}.weight", f"{name}.bias"})
        if ignored:
            logging.warning(f"{model_dir}: weights not used by {arch}: {', '.join(ignored[:5])}")
        return cls(hf.eval(), processor, model_dir, name)

    @property
    def module(self) -> torch.nn.Module:
        return self.hf

    @property
    def num_layers(self) -> int:
        return len(self.hf.base_model.encoder.layers)

    @property
    def blank_id(self) -> int:
        return self.hf.config.pad_token_id

    def dataset(self) -> HFDataset:
        return HFDataset(self.processor)

    def embed(self, batch: dict) -> Hidden:
        base = self.hf.base_model
        encoder = base.encoder
        feats = base.feature_extractor(batch["audio"].to(self.device)).transpose(1, 2)
        lengths = self.hf._get_feat_extract_output_lengths(batch["audio_lens"].to(self.device))
        lengths = lengths.long()
        mask = None
        if batch.get("attention_mask") is not None:
            mask = torch.arange(feats.size(1), device=self.device)[None] < lengths[:, None]
        x = base.feature_projection(feats)
        x = x[0] if isinstance(x, tuple) else x  # wav2vec2, data2vec: (projected, normalised)
        x = base._mask_hidden_states(x, attention_mask=mask)  # SpecAugment: training only
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        x = x + encoder.pos_conv_embed(x)
        if not self.stable_layer_norm:
            x = encoder.layer_norm(x)
        x = encoder.dropout(x)
        return Hidden(x, lengths, self._layer_context(x, mask))

    def _layer_context(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        """(attention mask as the layers take it, WavLM's relative position bias or None)."""
        if self.wavlm:
            attention = self.hf.base_model.encoder.layers[0].attention
            b, t = x.shape[:2]
            bias = attention.compute_bias(t, t).unsqueeze(0).repeat(b, 1, 1, 1)
            return mask, bias.view(b * attention.num_heads, t, t)
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(self.hf.config, x, mask), None

    def forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        mask, bias = h.context
        modules = self.hf.base_model.encoder.layers
        x = h.x
        for k in layers if layers is not None else range(1, self.num_layers + 1):
            if self.wavlm:
                x = modules[k - 1](x, attention_mask=mask, position_bias=bias)[0]
            else:
                out = modules[k - 1](x, attention_mask=mask)
                x = out[0] if isinstance(out, tuple) else out
        return Hidden(x, h.lengths, h.context)

    def readout(self, h: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        x = h.x
        if self.stable_layer_norm:
            x = self.hf.base_model.encoder.layer_norm(x)
        if self.lm_head_norm is not None:
            x = getattr(self.hf, self.lm_head_norm)(x)
        logits = self.hf.lm_head(self.hf.dropout(x))
        return logits.float().log_softmax(-1), h.lengths

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode([int(i) for i in ids], group_tokens=False)

    def prune(self, layers: Sequence[int]) -> HFModel:
        kept = checked_kept(self.num_layers, layers)
        hf = copy.deepcopy(self.hf)
        encoder = hf.base_model.encoder
        if self.wavlm and kept[0] != 1:
            # The first layer owns the relative position embedding every layer uses.
            first = encoder.layers[kept[0] - 1].attention
            first.rel_attn_embed = copy.deepcopy(encoder.layers[0].attention.rel_attn_embed)
        encoder.layers = torch.nn.ModuleList(encoder.layers[k - 1] for k in kept)
        hf.config.num_hidden_layers = len(kept)
        return HFModel(hf, self.processor, self.source, self.lm_head_norm)

    def save(self, out_dir: Path, info: dict | None = None) -> None:
        out_dir = Path(out_dir)
        self.hf.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
        atomic_write_json(
            out_dir / expdir.PRUNE_INFO,
            {"model_type": self.model_type, "lm_head_norm": self.lm_head_norm, **(info or {})},
        )
