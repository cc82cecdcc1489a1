"""Hugging Face Whisper (``WhisperForConditionalGeneration`` and its ``WhisperProcessor``, a
``save_pretrained`` directory) as a :class:`DecoderModel`: the encoder and the decoder are both
prunable stacks. ``--model_type whisper``; ``--model_type hf`` loads it too (:mod:`comflp.adapters.hf`
hands a config whose ``model_type`` is ``whisper`` here), and ``--model_type ctranslate2``
(:mod:`comflp.adapters.ct2`) reads a CTranslate2 directory into it.

Layer numbering (docs/DESIGN.md) for Whisper:

- encoder index 0 (``embed``): conv1 -> GELU -> conv2 -> GELU -> + positions (-> dropout), what
  enters ``encoder.layers[0]``, equal to transformers' ``encoder_hidden_states[0]``; index k the
  output of ``encoder.layers[k-1]``, before the encoder's final ``layer_norm`` (``memory``). The
  encoder has no attention mask: every input is padded to ``2 * max_source_positions`` mel
  frames (the feature extractor's ``chunk_length``) and every frame is attended; a state's
  valid rows (dump, pooling) are the frames of the audio itself;
- decoder index 0: ``embed_tokens`` + ``embed_positions``, what enters ``decoder.layers[0]``;
  index k the output of ``decoder.layers[k-1]`` before the decoder's ``layer_norm``, equal to
  transformers' ``decoder_hidden_states[k]`` under teacher forcing, except that transformers
  replaces entry L by the normed ``last_hidden_state`` unless ``config.tie_last_hidden_states``
  is false.

The prompt (:func:`decoder_prompt`) is what ``generate`` starts short-form decoding without
timestamps with; greedy decoding is ``generate``'s with one beam: ``suppress_tokens`` at every
step, ``begin_suppress_tokens`` at the first, at most ``max_length`` new tokens (or
``max_new_tokens``) within ``max_target_positions``, the decoder layers run incrementally on
transformers' own key/value cache. Language detection is not done: a multilingual model needs
its language fixed in its generation config.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lhotse import CutSet

from comflp import expdir
from comflp.adapters.base import ATTENTION_DECODING, MODEL_TYPES, DecoderModel, Hidden
from comflp.adapters.hf_utils import (
    first_line,
    load_audio,
    missing_weights,
    normalize_text,
    quiet_transformers,
    text_case,
)
from comflp.adapters.whisper_shapes import compact, uniform
from comflp.asr.config import ConfigError
from comflp.asr.data import transcripts
from comflp.subsets import checked_kept
from comflp.utils import atomic_write_json

ARCH = "WhisperForConditionalGeneration"
# A character vocabulary's special tokens: end of text (also the padding) and the prompt.
SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
DEFAULT_MAX_LENGTH = 20  # transformers' GenerationConfig default, when a config sets none


def _language_token(language: str, lang_to_id: dict[str, int], where: Path) -> int:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
    token = language if language in lang_to_id else f"<|{code}|>"
    if token not in lang_to_id:
        raise ConfigError(f"{where}: language {language!r} is not in generation_config.lang_to_id")
    return lang_to_id[token]


def _forced_prompt(gc, where: Path) -> list[int | None]:
    """The prompt tokens after the start token of the old ``forced_decoder_ids``."""
    forced = sorted(getattr(gc, "forced_decoder_ids", None) or [])
    if any(position != i for i, (position, _) in enumerate(forced, start=1)):
        raise ConfigError(
            f"{where}: forced_decoder_ids {forced} are not a prompt (positions 1, 2, ...)"
        )
    return [token for _, token in forced]


def decoder_prompt(gc, where: Path) -> list[int]:
    """The tokens ``generate`` starts with (short form, no timestamps) for the generation
    config ``gc``: the start token, a fixed language and task (``language``/``task``, else the
    old ``forced_decoder_ids``), then ``<|notimestamps|>`` when the config has it."""
    tokens: list[int | None] = [gc.decoder_start_token_id]
    language, task = getattr(gc, "language", None), getattr(gc, "task", None)
    if language is None and task is None:
        tokens += _forced_prompt(gc, where)
    else:
        if language is not None:
            tokens.append(_language_token(language, gc.lang_to_id, where))
        if task is not None or hasattr(gc, "task_to_id"):
            tokens.append(gc.task_to_id[task or "transcribe"])
    lang_ids = set(getattr(gc, "lang_to_id", {}).values())
    if lang_ids and not lang_ids & set(tokens):
        raise ConfigError(
            f"{where}: a multilingual Whisper needs a fixed language (set generation_config."
            "language, e.g. 'en'); comflp does not detect the language"
        )
    no_timestamps = getattr(gc, "no_timestamps_token_id", None)
    if no_timestamps is not None and tokens[-1] != no_timestamps:
        tokens.append(no_timestamps)
    if any(t is None for t in tokens):
        raise ConfigError(f"{where}: generation config without decoder_start_token_id")
    return [int(t) for t in tokens]


def scoring_normalizer(tokenizer) -> Callable[[str], str] | None:
    """How Whisper's users score a model that writes cased, punctuated text (a vocabulary of
    both cases, OpenAI's): Whisper's English text normaliser (transformers'
    ``EnglishTextNormalizer``: lower case, no punctuation or fillers, numbers and British
    spellings standardised with OpenAI's mapping, which the ``whisper-normalizer`` package
    ships), on references and hypotheses alike. English, not the basic normaliser: the
    basic one keeps "harbour" against "harbor" and "two" against "2" as errors that are not
    recognition errors. None for a vocabulary of one case (a model trained here on the
    corpus's own transcripts), scored on its own text."""
    if text_case(tokenizer) != "keep":
        return None
    import importlib.resources

    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    try:
        mapping = importlib.resources.files("whisper_normalizer") / "normalizers/english.json"
        spelling = json.loads(mapping.read_text())
    except ImportError:
        raise ConfigError(
            "scoring a Whisper model with Whisper's English normaliser needs OpenAI's spelling "
            "mapping: pip install whisper-normalizer (utils/setup.sh --dev installs it)"
        ) from None
    return EnglishTextNormalizer(spelling)


class WhisperDataset(torch.utils.data.Dataset):
    """Maps a CutSet to ``input_features`` (B, mels, 2 * max_source_positions) as the
    processor's feature extractor makes them, ``frames`` (the mel frames of each utterance's
    own audio) and the keys of :func:`transcripts`: the tokens of each reference cased like
    the vocabulary (sentence case for a vocabulary of both cases, as Whisper writes), its
    ``texts`` in the form they are scored in (:func:`scoring_normalizer`). Utterances come
    longest first; one longer than the input window is refused."""

    def __init__(self, processor, scoring: Callable[[str], str] | None = None):
        self.extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.case = text_case(self.tokenizer)
        self.scoring = scoring

    def normalize(self, text: str) -> str:
        if self.case == "keep":
            text = " ".join(text.split()).lower()
            return text[:1].upper() + text[1:]
        return normalize_text(text, self.case)

    def scored(self, text: str) -> str:
        return self.scoring(text) if self.scoring else self.normalize(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(self.normalize(text), add_special_tokens=False)

    def __getitem__(self, cuts: CutSet) -> dict:
        cuts = cuts.sort_by_duration(ascending=False)
        rate = self.extractor.sampling_rate
        audio = load_audio(cuts, rate)
        for cut, samples in zip(cuts, audio, strict=True):
            if len(samples) > self.extractor.n_samples:
                raise ConfigError(
                    f"cut {cut.id}: {len(samples) / rate:.2f} s, longer than the model's "
                    f"{self.extractor.n_samples / rate:g} s input window (chunk_length); "
                    "comflp does not decode long-form audio"
                )
        inputs = self.extractor(
            audio, sampling_rate=rate, return_tensors="pt", return_attention_mask=True
        )
        batch = transcripts(cuts, self.encode)
        batch["texts"] = [self.scored(t) for t in batch["texts"]]
        frames = inputs["attention_mask"].sum(-1).long()
        return {"input_features": inputs["input_features"], "frames": frames, **batch}


@dataclass
class _DecodingState:
    """Greedy decoding of one batch with some decoder layers: transformers' key/value cache
    (indexed by each layer's own ``layer_idx``), the memory and the positions seen."""

    cache: Any
    layers: list[int]
    memory: torch.Tensor
    length: int = 0


def _causal_mask(n: int, seen: int, x: torch.Tensor) -> torch.Tensor | None:
    """Additive (1, 1, n, seen + n) mask of n new positions after ``seen`` cached ones."""
    if n == 1:
        return None
    allowed = torch.ones(n, seen + n, dtype=torch.bool, device=x.device).tril(seen)
    mask = torch.zeros(n, seen + n, dtype=x.dtype, device=x.device)
    return mask.masked_fill(~allowed, torch.finfo(x.dtype).min)[None, None]


@MODEL_TYPES.register("whisper")
class WhisperAdapter(DecoderModel):
    """A transformers ``WhisperForConditionalGeneration`` and its ``WhisperProcessor``."""

    model_type = "whisper"
    decoding_methods = (ATTENTION_DECODING,)

    def __init__(self, hf: torch.nn.Module, processor, source: Path):
        super().__init__(source)
        self.hf = hf
        self.processor = processor
        self.device = next(hf.parameters()).device
        self.prompt = decoder_prompt(hf.generation_config, source)
        eos = hf.generation_config.eos_token_id
        if not isinstance(eos, int):
            raise ConfigError(f"{source}: generation_config.eos_token_id must be one id, got {eos}")
        self._eos = eos
        self.scoring = scoring_normalizer(processor.tokenizer)
        config = hf.config
        # greedy decoding's length bound (max_new_tokens); None: generate's limit alone
        self.tokens_per_frame: float | None = (
            config.max_target_positions // 2
        ) / config.max_source_positions

    @classmethod
    def load(cls, model_dir: Path) -> WhisperAdapter:
        import transformers

        model_dir = Path(model_dir)
        try:
            with quiet_transformers():
                hf, info = transformers.WhisperForConditionalGeneration.from_pretrained(
                    model_dir, output_loading_info=True
                )
                processor = transformers.WhisperProcessor.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{model_dir}: cannot load the {ARCH} model or processor ({first_line(e)})"
            ) from None
        if info["missing_keys"]:
            raise missing_weights(model_dir, ARCH, list(info["missing_keys"]))
        return cls(compact(hf).eval(), processor, model_dir)

    @property
    def module(self) -> torch.nn.Module:
        return self.hf

    @property
    def encoder(self):
        return self.hf.model.encoder

    @property
    def decoder(self):
        return self.hf.model.decoder

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def eos_id(self) -> int:
        return self._eos

    def decoder_prefix(self) -> list[int]:
        return list(self.prompt)

    def dataset(self) -> WhisperDataset:
        return WhisperDataset(self.processor, self.scoring)

    def embed(self, batch: dict) -> Hidden:
        feats = batch["input_features"].to(self.device)
        expected = 2 * self.hf.config.max_source_positions
        if feats.size(-1) != expected:
            raise ConfigError(
                f"{self.source}: input of {feats.size(-1)} mel frames, the model takes {expected}"
            )
        feats = self.hf.model._mask_input_features(feats)  # SpecAugment: training only
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(feats))))
        x = x.permute(0, 2, 1) + enc.embed_positions.weight
        x = torch.nn.functional.dropout(x, p=enc.dropout, training=enc.training)
        lengths = (batch["frames"].to(self.device) - 1) // 2 + 1
        return Hidden(x, lengths)

    def forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        x = h.x
        for k in layers if layers is not None else range(1, self.num_layers + 1):
            x = self.encoder.layers[k - 1](x, None)
        return Hidden(x, h.lengths)

    def readout(self, h: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(f"{self.source}: Whisper has no CTC head (decode with the decoder)")

    def transcribe(self, h: Hidden, batch: dict) -> tuple[list[list[int]], float]:
        return self.transcribe_with_decoder(h, batch)

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The decoder's teacher-forced cross entropy, summed over the tokens and divided by
        the utterances (as comflp's other losses)."""
        loss = self.teacher_forced_nll(self.encode(batch), batch) / len(batch["ids"])
        return loss, {"loss": loss.item()}

    def memory(self, h: Hidden) -> Hidden:
        return Hidden(self.encoder.layer_norm(h.x), h.lengths)

    def decoder_embed(self, memory: Hidden, tokens: torch.Tensor, lengths: torch.Tensor) -> Hidden:
        dec = self.decoder
        if tokens.size(1) > self.hf.config.max_target_positions:
            raise ConfigError(
                f"{self.source}: a prompt and reference of {tokens.size(1)} tokens, more than the "
                f"model's max_target_positions {self.hf.config.max_target_positions}"
            )
        x = dec.embed_tokens(tokens) + dec.embed_positions.weight[: tokens.size(1)]
        x = torch.nn.functional.dropout(x, p=dec.dropout, training=dec.training)
        return Hidden(x, lengths, (memory.x, _causal_mask(tokens.size(1), 0, x)))

    def decoder_forward_layers(self, h: Hidden, layers: Sequence[int] | None = None) -> Hidden:
        memory, mask = h.context
        x = h.x
        for k in layers if layers is not None else range(1, self.num_decoder_layers + 1):
            x = self.decoder.layers[k - 1](x, mask, memory, use_cache=False)
        return Hidden(x, h.lengths, h.context)

    def decoder_readout(self, h: Hidden) -> torch.Tensor:
        return self.hf.proj_out(self.decoder.layer_norm(h.x)).float().log_softmax(-1)

    def decoder_start(self, memory: Hidden, layers: Sequence[int]) -> _DecodingState:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        return _DecodingState(
            EncoderDecoderCache(DynamicCache(), DynamicCache()), list(layers), memory.x
        )

    def decoder_step(self, state: _DecodingState, tokens: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        n = tokens.size(1)
        x = dec.embed_tokens(tokens) + dec.embed_positions.weight[state.length : state.length + n]
        mask = _causal_mask(n, state.length, x)
        for k in state.layers:
            x = dec.layers[k - 1](x, mask, state.memory, cache=state.cache, use_cache=True)
        state.length += n
        return self.hf.proj_out(dec.layer_norm(x[:, -1])).float().log_softmax(-1)

    def max_new_tokens(self, memory: Hidden) -> torch.Tensor:
        """Per utterance, the fewer of ``generate``'s limit (:meth:`generate_limit`) and the
        audio's share of OpenAI's sampling budget, ``max_target_positions // 2`` tokens per
        ``max_source_positions`` encoder frames (224 tokens per 30 s: 7.5 a second, twice a fast
        speaker's rate), so that a decoder that repeats stops near the audio's end as decoders
        with a length ratio do (ESPnet's ``maxlenratio``) instead of filling the context."""
        if self.tokens_per_frame is None:
            return self.generate_limit()
        by_audio = torch.ceil(memory.lengths.float() * self.tokens_per_frame).long() + 1  # <eos>
        return by_audio.clamp(max=self.generate_limit())

    def generate_limit(self) -> int:
        """The most new tokens ``generate`` emits: ``max_new_tokens``, else ``max_length`` new
        tokens (Whisper's short-form rule; transformers' default of 20 when the generation
        config has none), within ``max_target_positions``."""
        gc, limit, p = (
            self.hf.generation_config,
            self.hf.config.max_target_positions,
            len(self.prompt),
        )
        if gc.max_new_tokens is not None:
            return min(gc.max_new_tokens, limit - p)
        max_length = gc.max_length if gc.max_length is not None else DEFAULT_MAX_LENGTH
        return min(max_length + min(limit // 2 - 1, p), limit) - p

    def suppress(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """``suppress_tokens`` at every step, ``begin_suppress_tokens`` at the first; ids
        outside the vocabulary are ignored, as ``generate``'s logits processors do."""
        gc = self.hf.generation_config
        tokens = list(gc.suppress_tokens or []) + list(
            (gc.begin_suppress_tokens or []) if step == 0 else []
        )
        tokens = [t for t in tokens if 0 <= t < scores.size(-1)]
        if not tokens:
            return scores
        return scores.index_fill(-1, torch.tensor(tokens, device=scores.device), -float("inf"))

    def decode_ids(self, ids: Sequence[int]) -> str:
        """The hypothesis in the form it is scored in (:func:`scoring_normalizer`)."""
        text = self.processor.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return self.scoring(text) if self.scoring else " ".join(text.split())

    def prune(self, layers: Sequence[int]) -> WhisperAdapter:
        kept = checked_kept(self.num_layers, layers, "encoder")
        hf = copy.deepcopy(self.hf)
        hf.model.encoder.layers = torch.nn.ModuleList(hf.model.encoder.layers[k - 1] for k in kept)
        hf.config.encoder_layers = hf.config.num_hidden_layers = len(kept)
        return self._with(hf)

    def prune_decoder(self, layers: Sequence[int]) -> WhisperAdapter:
        """The kept layers renumbered for transformers' cache (``layer_idx``)."""
        kept = checked_kept(self.num_decoder_layers, layers, "decoder")
        hf = copy.deepcopy(self.hf)
        modules = [hf.model.decoder.layers[k - 1] for k in kept]
        for i, layer in enumerate(modules):
            layer.self_attn.layer_idx = layer.encoder_attn.layer_idx = i
        hf.model.decoder.layers = torch.nn.ModuleList(modules)
        hf.config.decoder_layers = len(kept)
        renumber_alignment_heads(hf, kept)
        return self._with(hf)

    def _with(self, hf: torch.nn.Module) -> WhisperAdapter:
        """This model (its class, processor and source) with the network ``hf``."""
        new = copy.copy(self)
        new.hf = hf
        return new

    def save(self, out_dir: Path, info: dict | None = None) -> None:
        """``save_pretrained``: a structured model padded to one head count and feed-forward
        width per stack, as transformers' config takes (:func:`~comflp.adapters.whisper_shapes.uniform`:
        the same function; :meth:`load` removes the padding)."""
        out_dir = Path(out_dir)
        uniform(self.hf).save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
        atomic_write_json(
            out_dir / expdir.PRUNE_INFO, {"model_type": self.model_type, **(info or {})}
        )


def renumber_alignment_heads(hf: torch.nn.Module, kept: list[int]) -> None:
    """The generation config's cross-attention heads used for word timestamps, on the kept
    decoder layers (0-indexed, as OpenAI numbers them); when none is kept, every head of the
    last half of the layers (CTranslate2's converter's default)."""
    gc = hf.generation_config
    heads = getattr(gc, "alignment_heads", None)
    if not heads:
        return
    index = {layer - 1: i for i, layer in enumerate(kept)}
    renumbered = [[index[layer], head] for layer, head in heads if layer in index]
    n, h = len(kept), hf.config.decoder_attention_heads
    gc.alignment_heads = renumbered or [[i, j] for i in range(n // 2, n) for j in range(h)]


def char_processor(chars: Sequence[str], out_dir: Path, chunk_length: int, hop_length: int = 160):
    """A ``WhisperProcessor`` with a character vocabulary (``chars``, the space as byte-level
    BPE's ``Ġ``; no merges) and :data:`SPECIAL_TOKENS`, for a model trained from scratch on
    ``chunk_length``-second inputs with a ``hop_length``-sample mel hop; saved in ``out_dir``."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate([*sorted(set(chars) - {" "}), "Ġ"])}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    eos = SPECIAL_TOKENS[0]
    tokenizer = transformers.WhisperTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        unk_token=eos,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.set_prefix_tokens()  # the prompt tokens exist now
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16000, hop_length=hop_length, chunk_length=chunk_length
    )
    processor = transformers.WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    processor.save_pretrained(out_dir)
    return processor


def char_model(processor, **sizes) -> torch.nn.Module:
    """A random ``WhisperForConditionalGeneration`` for :func:`char_processor`'s vocabulary and
    input window (``sizes``: d_model, encoder_layers, decoder_layers, heads, ffn dims,
    max_target_positions, dropout ...), with the generation settings comflp and ``generate``
    share: the prompt ``<|startoftranscript|><|notimestamps|>``, the prompt tokens suppressed,
    no space or end of text as the first token, at most ``max_target_positions`` tokens."""
    import transformers

    tok = processor.tokenizer
    eos, sot, no_ts = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = transformers.WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=processor.feature_extractor.feature_size,
        max_source_positions=processor.feature_extractor.nb_max_frames // 2,
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=sot,
        suppress_tokens=None,  # generation settings: in the generation config only
        begin_suppress_tokens=None,
        architectures=[ARCH],
        **sizes,
    )
    model = transformers.WhisperForConditionalGeneration(config)
    gc = model.generation_config
    gc._from_model_config = False  # else transformers rebuilds it from the config at load
    gc.no_timestamps_token_id = no_ts
    gc.max_length = config.max_target_positions
    gc.suppress_tokens = [sot, no_ts]
    gc.begin_suppress_tokens = [tok.convert_tokens_to_ids("Ġ"), eos]
    return model
