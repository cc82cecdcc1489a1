"""ESPnet2 ASR models (a ``config.yaml`` and its ``.pth``) as a :class:`PrunableModel`.

The model is built by ESPnet's own task builder (``ASRTask.build_model`` on the config, paths
resolved) and its weights loaded strictly: a ``.pth`` that does not match the config is refused,
naming the keys. Supported: ``ESPnetASRModel`` with a ``transformer``, ``conformer`` or
``e_branchformer`` encoder and a CTC head, with or without an attention decoder (kept, so
ESPnet's joint CTC/attention beam search works on a pruned model), with or without
intermediate CTC and self-conditioning. Not supported (refused at load): transducer decoders,
post-encoders, ``ctc_trim``, models without CTC (``ctc_weight: 0``), models fed precomputed
features instead of the waveform (``input_size`` set, no frontend).

Layer numbering (``CONVENTIONS.md``) for these models:

- index 0 (``embed``): waveform -> ESPnet's frontend -> (training only) SpecAugment ->
  feature normalisation -> pre-encoder, if any -> ``encoder.embed`` (subsampling, positions):
  what enters ``encoder.encoders[0]``;
- index k: the output of block k (``encoder.encoders[k-1]``), before any final norm;
- ``readout``: ``encoder.after_norm`` (Transformer/Conformer with ``normalize_before``;
  E-Branchformer always) -> ``ctc.ctc_lo`` -> log-softmax (ESPnet's ``CTC.log_softmax``).

Intermediate CTC with self-conditioning: after an intermediate-CTC block k, ESPnet adds
``conditioning_layer(softmax(ctc_lo(n(x))))`` to the block's output before block k+1 (``n``:
``after_norm`` for Transformer/Conformer with ``normalize_before``, nothing for E-Branchformer,
as in each encoder's forward). comflp computes that term after block k and adds it when the
next kept layer runs, so index k stays the block's own output and a subset that ends at block k
reads out that output, as ESPnet's intermediate CTC does. A pruned model follows the layers it
keeps: a removed intermediate-CTC layer takes its CTC branch and its conditioning with it (the
conditioning term is computed from that layer's output, so no other layer can stand in for
it); the kept ones are renumbered; the last kept layer is never an intermediate one (ESPnet
requires ``interctc_layer_idx < num_blocks``: it is the final output, read out without
conditioning). Evaluating a subset therefore gives exactly what the written-back pruned model
computes.

Batches come from lhotse cuts: the 16 kHz waveforms, padded, as ESPnet's data loader gives them
to the frontend (``speech``, ``speech_lengths``), and the transcripts through ESPnet's own
preprocessor (text cleaner, tokenizer, token list) built from the config, references cased like
the vocabulary.

Fine-tuning (stage 8, ``training_loss``) uses ESPnet's own ``ESPnetASRModel.forward``: joint
CTC/attention plus intermediate CTC with the model's weights (``ctc_weight``,
``interctc_weight``, label smoothing) and its SpecAugment. With an attention decoder this keeps
the decoder matched to the pruned encoder (plain CTC would leave it reading representations it
was not trained on, and ESPnet's beam search would degrade); without one, ESPnet's forward is
CTC plus intermediate CTC, the objective the model was trained with, which keeps the kept
intermediate layers readable by the CTC head (and their conditioning meaningful).

Writing back (``save``): ``config.yaml`` (``encoder_conf.num_blocks``,
``encoder_conf.interctc_layer_idx`` and, for a Conformer, a per-layer
``stochastic_depth_rate`` list updated), ``model.pth`` (the state dict) and copies of the
files the config names (token list, BPE model, non-linguistic symbols, normalisation
statistics), named in the new config by absolute path, so that ESPnet's own
``Speech2Text(asr_train_config, asr_model_file)`` loads it from any directory. A moved
directory still loads here: a path that does not exist as written is looked up in the model
directory.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lhotse import CutSet

from comflp import expdir
from comflp.adapters.base import (
    CTC_DECODING,
    CTC_WEIGHT,
    DECODE_BEAM_SIZE,
    MODEL_TYPES,
    Hidden,
    PrunableModel,
)
from comflp.asr.config import ConfigError
from comflp.asr.data import pad_sequences, transcripts
from comflp.subsets import checked_kept
from comflp.utils import atomic_path, atomic_write_json, atomic_write_text, eval_mode

CONFIG = "config.yaml"
MODEL_FILE = "model.pth"
ENCODERS = ("transformer", "conformer", "e_branchformer")
SETUP = "utils/setup.sh --espnet"
# Config entries that name files: (section or None, key) -> the copy's name in a saved model.
FILE_KEYS = {
    (None, "token_list"): "tokens.txt",
    (None, "bpemodel"): "bpe.model",
    (None, "non_linguistic_symbols"): "non_linguistic_symbols.txt",
    ("normalize_conf", "stats_file"): "feats_stats.npz",
}
# .pth names of ESPnet's averaged models, tried when a directory holds several .pth files.
AVERAGED = ("valid.acc.ave.pth", "valid.loss.ave.pth", "valid.cer_ctc.ave.pth")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _asr_task() -> type:
    """ESPnet's ASRTask, or ConfigError saying how to get an environment that has it."""
    try:
        from espnet2.tasks.asr import ASRTask
    except ImportError as e:
        raise ConfigError(
            f"--model_type espnet needs ESPnet2, which {sys.executable} cannot import "
            f"({_first_line(e)}); run {SETUP} and use .venv-espnet/bin/python (run.sh does)"
        ) from None
    return ASRTask


def _read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG
    if not path.is_file():
        raise ConfigError(
            f"{model_dir}: no {CONFIG} (expected an ESPnet2 ASR model directory: {CONFIG}, "
            "its .pth and the files the config names)"
        )
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(config, dict) or "encoder" not in config:
        raise ConfigError(f"{path}: not an ESPnet2 ASR training config (no 'encoder' entry)")
    return config


def _check_supported(config: dict, path: Path) -> None:
    """ConfigError for the models this adapter does not handle."""
    encoder = config.get("encoder")
    if encoder not in ENCODERS:
        raise ConfigError(
            f"{path}: encoder {encoder!r} is not supported; supported: {', '.join(ENCODERS)}"
        )
    if config.get("model", "espnet") != "espnet":
        raise ConfigError(f"{path}: model {config['model']!r} is not supported (only 'espnet')")
    if float((config.get("model_conf") or {}).get("ctc_weight", 0.5)) == 0.0:
        raise ConfigError(
            f"{path}: model_conf.ctc_weight is 0, so the model has no CTC head "
            "(comflp prunes CTC models)"
        )
    if config.get("input_size") is not None or not config.get("frontend"):
        raise ConfigError(
            f"{path}: models fed precomputed features (input_size, no frontend) are not "
            "supported; comflp gives the waveform to the model's own frontend"
        )
    if config.get("decoder") == "transducer":
        raise ConfigError(f"{path}: transducer models are not supported")
    if config.get("postencoder"):
        raise ConfigError(f"{path}: postencoder {config['postencoder']!r} is not supported")
    if (config.get("encoder_conf") or {}).get("ctc_trim"):
        raise ConfigError(f"{path}: encoder_conf.ctc_trim is not supported")
    if not config.get("token_type"):
        raise ConfigError(f"{path}: no token_type (needed to turn tokens into text)")


def _resolve_files(config: dict, model_dir: Path) -> tuple[dict, dict]:
    """The config with every file it names made absolute (looked up as written, then under
    ``model_dir``, then by name in ``model_dir``), and those files by config entry."""
    config = copy.deepcopy(config)
    files = {}
    for section, key in FILE_KEYS:
        table = config.get(section) if section else config
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str):
            continue  # absent, or (token_list) the list itself
        written = Path(value)
        found = next(
            (p for p in (written, model_dir / written, model_dir / written.name) if p.is_file()),
            None,
        )
        if found is None:
            name = f"{section}.{key}" if section else key
            raise ConfigError(
                f"{model_dir / CONFIG}: {name} {value!r} not found (as written, nor under "
                f"{model_dir})"
            )
        table[key] = str(found.resolve())
        files[(section, key)] = found.resolve()
    return config, files


def _model_file(model_dir: Path) -> Path:
    """The .pth of ``model_dir``: the only one, else ``model.pth``, else ESPnet's averaged one."""
    found = sorted(p for p in model_dir.glob("*.pth") if p.name != "checkpoint.pth")
    names = [p.name for p in found]
    if len(found) == 1:
        return found[0]
    for name in (MODEL_FILE, *AVERAGED):
        if name in names:
            return model_dir / name
    if not found:
        raise ConfigError(f"{model_dir}: no .pth model file beside {CONFIG}")
    raise ConfigError(
        f"{model_dir}: several .pth files ({', '.join(names)}); keep one, or name it {MODEL_FILE}"
    )


def _load_weights(asr: torch.nn.Module, pth: Path) -> None:
    """Load ``pth`` into ``asr``, refusing any missing, unexpected or mis-shaped weight."""
    try:
        state = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle, zip or format error: the file is not a state dict
        raise ConfigError(f"{pth}: not a PyTorch state dict ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{pth}: not a PyTorch state dict")
    expected = asr.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{what}: {', '.join(keys[:4])}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise ConfigError(f"{pth}: does not match {CONFIG} ({'; '.join(problems)})")
    asr.load_state_dict(state, strict=True)


def _vocab_case(tokens: Sequence[str]) -> str:
    """``upper``, ``lower`` or ``keep``: how references are cased to match the vocabulary."""
    spelled = (t for t in tokens if not (t.startswith("<") and t.endswith(">")))  # not <blank>
    letters = "".join(c for t in spelled for c in t if c.isalpha())
    if letters and letters == letters.upper() and letters != letters.lower():
        return "upper"
    if letters and letters == letters.lower() and letters != letters.upper():
        return "lower"
    return "keep"


class EspnetDataset(torch.utils.data.Dataset):
    """Maps a CutSet to ``speech`` (B, S) padded waveforms, ``speech_lengths`` (samples) and
    the keys of :func:`transcripts`, tokenised by ESPnet's preprocessor. Longest first."""

    def __init__(self, preprocess: Any, sample_rate: int, case: str):
        self.preprocess = preprocess
        self.sample_rate = sample_rate
        self.case = case

    def normalize(self, text: str) -> str:
        text = " ".join(text.split())
        return {"upper": text.upper(), "lower": text.lower(), "keep": text}[self.case]

    def encode(self, text: str) -> list[int]:
        return self.preprocess("utt", {"text": text})["text"].tolist()

    def __getitem__(self, cuts: CutSet) -> dict:
        cuts = cuts.sort_by_duration(ascending=False)
        for cut in cuts:
            if cut.sampling_rate != self.sample_rate:
                raise ConfigError(
                    f"cut {cut.id}: sampling rate {cut.sampling_rate} Hz, but the model expects "
                    f"{self.sample_rate} Hz audio (resample the corpus; comflp does not resample)"
                )
        audio = [torch.from_numpy(np.asarray(c.load_audio()[0], dtype=np.float32)) for c in cuts]
        speech, speech_lengths = pad_sequences(audio)
        batch = transcripts(cuts, lambda t: self.encode(self.normalize(t)))
        batch["texts"] = [self.normalize(t) for t in batch["texts"]]
        return {"speech": speech, "speech_lengths": speech_lengths, **batch}


@dataclass
class _Context:
    """What every block takes besides x, and the self-conditioning term owed to the next one."""

    masks: torch.Tensor  # (B, 1, T) True on valid frames
    pos_emb: torch.Tensor | None  # relative positions (Conformer, E-Branchformer)
    pending: torch.Tensor | None = None  # added to x before the next block runs


@MODEL_TYPES.register("espnet")
class EspnetModel(PrunableModel):
    """An ``ESPnetASRModel`` with its training config (file paths made absolute)."""

    model_type = "espnet"

    def __init__(self, asr: torch.nn.Module, config: dict, files: dict, source: Path):
        super().__init__(source)
        self.asr = asr
        self.config = config
        self.files = files  # (section, key) -> the file a config entry names
        self.device = next(asr.parameters()).device
        encoder = asr.encoder
        self.final_norm = hasattr(encoder, "after_norm")
        self.interctc_norm = self.final_norm and config["encoder"] != "e_branchformer"
        self._speech2text: dict = {}
        self._decode_dir: Path | None = None
        self._text = None  # (preprocessor, tokenizer, converter), built on first use

    @classmethod
    def load(cls, model_dir: Path) -> EspnetModel:
        model_dir = Path(model_dir)
        config = _read_config(model_dir)
        _check_supported(config, model_dir / CONFIG)
        config, files = _resolve_files(config, model_dir)
        pth = _model_file(model_dir)
        task = _asr_task()
        try:
            asr = task.build_model(argparse.Namespace(**copy.deepcopy(config)))
        except Exception as e:  # ESPnet's builders raise many types on a bad config
            raise ConfigError(
                f"{model_dir / CONFIG}: ESPnet cannot build the model ({_first_line(e)})"
            ) from None
        _load_weights(asr, pth)
        return cls(asr.eval(), config, files, model_dir)

    @property
    def module(self) -> torch.nn.Module:
        return self.asr

    def to(self, device: str | torch.device) -> EspnetModel:
        self._speech2text.clear()  # built on the old device
        super().to(device)
        return self

    @property
    def num_layers(self) -> int:
        return len(self.asr.encoder.encoders)

    @property
    def blank_id(self) -> int:
        return self.asr.blank_id

    @property
    def interctc_layers(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.asr.encoder.interctc_layer_idx)

    @property
    def conditioning_layers(self) -> tuple[int, ...]:
        """Intermediate-CTC layers whose output conditions the next layer."""
        return self.interctc_layers if self.asr.encoder.interctc_use_conditioning else ()

    @property
    def decoding_methods(self) -> tuple[str, ...]:
        return CTC_DECODING + ("espnet_beam_search",)

    def _text_tools(self) -> tuple[Any, Any, Any]:
        """ESPnet's preprocessor (text -> ids), tokenizer and token-id converter (as
        ``Speech2Text`` builds them: ids -> text)."""
        if self._text is None:
            from espnet2.text.build_tokenizer import build_tokenizer
            from espnet2.text.token_id_converter import TokenIDConverter

            args = argparse.Namespace(**copy.deepcopy(self.config))
            args.token_list = list(self.asr.token_list)
            preprocess = _asr_task().build_preprocess_fn(args, train=False)
            if preprocess is None:
                raise ConfigError(
                    f"{self.source / CONFIG}: use_preprocessor is false; comflp tokenises "
                    "references with ESPnet's preprocessor"
                )
            token_type = self.config["token_type"]
            bpemodel = self.config.get("bpemodel") if token_type == "bpe" else None
            tokenizer = build_tokenizer(token_type=token_type, bpemodel=bpemodel)
            self._text = (preprocess, tokenizer, TokenIDConverter(token_list=args.token_list))
        return self._text

    def sample_rate(self) -> int:
        fs = (self.config.get("frontend_conf") or {}).get("fs", 16000)
        if isinstance(fs, str):
            import humanfriendly

            fs = humanfriendly.parse_size(fs)
        return int(fs)

    def dataset(self) -> EspnetDataset:
        preprocess = self._text_tools()[0]
        return EspnetDataset(preprocess, self.sample_rate(), _vocab_case(self.asr.token_list))

    def embed(self, batch: dict) -> Hidden:
        from espnet.nets.pytorch_backend.nets_utils import make_pad_mask

        asr, encoder = self.asr, self.asr.encoder
        x = batch["speech"].to(self.device)
        lengths = batch["speech_lengths"].to(self.device)
        x = x[:, : int(lengths.max())]
        if asr.frontend is not None:
            x, lengths = asr.frontend(x, lengths)
        if asr.specaug is not None and asr.training:
            x, lengths = asr.specaug(x, lengths)
        for module in (asr.normalize, asr.preencoder):
            if module is not None:
                x, lengths = module(x, lengths)
        masks = ~make_pad_mask(lengths)[:, None, :].to(self.device)
        if isinstance(encoder.embed, _subsampling_classes()):
            x, masks = encoder.embed(x, masks)
        elif encoder.embed is not None:
            x = encoder.embed(x)
        x, pos_emb = x if isinstance(x, tuple) else (x, None)
        return Hidden(x, masks.squeeze(1).sum(1), _Context(masks, pos_emb))

    def _conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """ESPnet's self-conditioning term of an intermediate-CTC layer's output ``x``."""
        encoder = self.asr.encoder
        y = encoder.after_norm(x) if self.interctc_norm else x
        return encoder.conditioning_layer(self.asr.ctc.softmax(y))

    def forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        ctx: _Context = h.context
        blocks = self.asr.encoder.encoders
        conditioning = self.conditioning_layers
        x, masks, pending = h.x, ctx.masks, ctx.pending
        for k in layers if layers is not None else range(1, self.num_layers + 1):
            if pending is not None:
                x = x + pending
            out, masks = blocks[k - 1]((x, ctx.pos_emb) if ctx.pos_emb is not None else x, masks)
            x = out[0] if isinstance(out, tuple) else out
            pending = self._conditioning(x) if k in conditioning else None
        return Hidden(x, h.lengths, _Context(masks, ctx.pos_emb, pending))

    def readout(self, h: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.asr.encoder.after_norm(h.x) if self.final_norm else h.x
        return self.asr.ctc.log_softmax(x).float(), h.lengths

    def decode_ids(self, ids: Sequence[int]) -> str:
        """Text as ESPnet writes it: blank, <sos/eos> dropped, ids -> tokens -> text."""
        _, tokenizer, converter = self._text_tools()
        drop = {self.asr.blank_id, self.asr.sos, self.asr.eos}
        return tokenizer.tokens2text(converter.ids2tokens([int(i) for i in ids if i not in drop]))

    def pruned_config(self, kept: Sequence[int]) -> dict:
        """The config of the model that keeps ``kept`` (1-indexed, increasing) layers."""
        config = copy.deepcopy(self.config)
        conf = config.setdefault("encoder_conf", {})
        new_index = {k: i for i, k in enumerate(kept, start=1)}
        conf["num_blocks"] = len(kept)
        conf["interctc_layer_idx"] = [
            new_index[k] for k in self.interctc_layers if k in new_index and k != kept[-1]
        ]
        rates = conf.get("stochastic_depth_rate")
        if isinstance(rates, list):
            conf["stochastic_depth_rate"] = [rates[k - 1] for k in kept]
        return config

    def prune(self, layers: Sequence[int]) -> EspnetModel:
        kept = checked_kept(self.num_layers, layers)
        config = self.pruned_config(kept)
        asr = copy.deepcopy(self.asr)
        encoder = asr.encoder
        blocks = encoder.encoders
        encoder.encoders = type(blocks)(
            *(blocks[k - 1] for k in kept), layer_drop_rate=blocks.layer_drop_rate
        )
        encoder.interctc_layer_idx = list(config["encoder_conf"]["interctc_layer_idx"])
        return EspnetModel(asr, config, self.files, self.source)

    def save(self, out_dir: Path, info: dict | None = None) -> None:
        """``config.yaml`` (written last), ``model.pth`` and the files the config names."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        for (section, key), source in self.files.items():
            target = (out_dir / FILE_KEYS[(section, key)]).resolve()
            if source != target:
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
            (config[section] if section else config)[key] = str(target)
        state = {k: v.detach().cpu() for k, v in self.asr.state_dict().items()}
        with atomic_path(out_dir / MODEL_FILE) as tmp:
            torch.save(state, tmp)
        atomic_write_json(
            out_dir / expdir.PRUNE_INFO, {"model_type": self.model_type, **(info or {})}
        )
        atomic_write_text(out_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """ESPnet's own loss (``ESPnetASRModel.forward``): see the module docstring."""
        targets = batch["targets"].clone()
        lengths = batch["target_lens"]
        targets[torch.arange(targets.size(1))[None] >= lengths[:, None]] = -1  # ESPnet's padding
        loss, stats, _ = self.asr(
            batch["speech"].to(self.device),
            batch["speech_lengths"].to(self.device),
            targets.to(self.device),
            lengths.to(self.device),
        )
        return loss.reshape(()), {k: float(v) for k, v in stats.items() if v is not None}

    def speech2text(self, beam_size: int, ctc_weight: float) -> Any:
        """ESPnet's ``Speech2Text`` on this model as written back by :meth:`save` (a
        temporary copy, made once per model and removed with it)."""
        key = (beam_size, ctc_weight)
        if key not in self._speech2text:
            from espnet2.bin.asr_inference import Speech2Text

            if self._decode_dir is None:
                self._decode_dir = Path(tempfile.mkdtemp(prefix="comflp_espnet_"))
                weakref.finalize(self, shutil.rmtree, self._decode_dir, True)
                self.save(self._decode_dir)
            self._speech2text[key] = Speech2Text(
                asr_train_config=self._decode_dir / CONFIG,
                asr_model_file=self._decode_dir / MODEL_FILE,
                device=str(self.device),
                beam_size=beam_size,
                ctc_weight=ctc_weight if self.asr.decoder is not None else 1.0,
                nbest=1,
            )
        return self._speech2text[key]

    @torch.no_grad()
    def decode(
        self,
        batch: dict,
        method: str = "ctc_greedy_search",
        beam_size: int = DECODE_BEAM_SIZE,
        ctc_weight: float = CTC_WEIGHT,
    ) -> list[list[int]]:
        """As :meth:`PrunableModel.decode`, and ``espnet_beam_search``: ESPnet's own
        ``Speech2Text`` (joint CTC/attention beam search, CTC weight ``ctc_weight``; CTC only
        without a decoder) on each utterance of the batch."""
        if method != "espnet_beam_search":
            return super().decode(batch, method, beam_size, ctc_weight)
        self.check_decoding(method, beam_size, ctc_weight)
        speech2text = self.speech2text(beam_size, ctc_weight)
        hyps = []
        with eval_mode(self.asr):
            for audio, n in zip(batch["speech"], batch["speech_lengths"].tolist(), strict=True):
                results = speech2text(audio[:n])
                if isinstance(results, tuple):  # (n-best, intermediate CTC outputs)
                    results = results[0]
                hyps.append([int(i) for i in results[0][2]])
        return hyps


def _subsampling_classes() -> tuple[type, ...]:
    """ESPnet's subsampling front ends: they take and return the masks."""
    from espnet.nets.pytorch_backend.transformer import subsampling as s

    return (
        s.Conv1dSubsampling1,
        s.Conv1dSubsampling2,
        s.Conv1dSubsampling3,
        s.Conv2dSubsampling,
        s.Conv2dSubsampling1,
        s.Conv2dSubsampling2,
        s.Conv2dSubsampling6,
        s.Conv2dSubsampling8,
    )
