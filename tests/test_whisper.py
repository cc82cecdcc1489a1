"""Whisper through the HF adapter: tiny ``WhisperForConditionalGeneration`` models built from a
config (no download), checked against transformers' own forward, ``from_pretrained`` and
``generate``."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch

transformers = pytest.importorskip("transformers")

from lhotse import CutSet, MonoCut, Recording, SupervisionSegment  # noqa: E402

from comflp.adapters import load_prunable  # noqa: E402
from comflp.adapters.whisper import (  # noqa: E402
    WhisperAdapter,
    char_model,
    char_processor,
    decoder_prompt,
)
from comflp.asr.config import ConfigError  # noqa: E402
from comflp.asr.data import eval_loader  # noqa: E402
from comflp.asr.scoring import error_stats  # noqa: E402
from comflp.expdir import DISTIL_RESULT, DUMP_INFO, PRUNE_INFO  # noqa: E402
from comflp.prune.dump import dump_layers, load_layer_feats  # noqa: E402
from comflp.prune.stacks import DecoderStack, EncoderStack, stack_of  # noqa: E402

from .conftest import PYTHON, REPO, run_sh  # noqa: E402
from .test_hf import build as build_wav2vec2  # noqa: E402

CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ' "
TEXTS = ["HELLO WORLD", "AB", "THE CAT SAT", "NO"]


def tiny_whisper(directory, chunk_length: int = 4, max_target_positions: int = 32, seed: int = 0):
    """A random tiny Whisper (3 encoder, 4 decoder layers) with a character processor, saved;
    its weights spread wide enough that greedy decoding emits varied characters."""
    processor = char_processor(CHARS, directory, chunk_length, hop_length=320)
    torch.manual_seed(seed)
    hf = char_model(
        processor,
        d_model=32,
        encoder_layers=3,
        decoder_layers=4,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_target_positions=max_target_positions,
    )
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0, 0.3)
    hf.save_pretrained(directory)
    return directory


def make_cuts(directory, seconds: list[float], texts: list[str], rate: int = 16000) -> CutSet:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    cuts = []
    for i, (s, text) in enumerate(zip(seconds, texts, strict=True)):
        path = directory / f"u{i}.wav"
        soundfile.write(path, 0.1 * rng.standard_normal(int(s * rate)).astype(np.float32), rate)
        rec = Recording.from_file(path, recording_id=f"u{i}")
        sup = SupervisionSegment(f"u{i}", f"u{i}", 0, rec.duration, text=text)
        cuts.append(MonoCut(f"u{i}", 0, rec.duration, 0, recording=rec, supervisions=[sup]))
    return CutSet.from_cuts(cuts)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def batches(whisper_dir, tmp_path_factory):
    cuts = make_cuts(tmp_path_factory.mktemp("audio"), [1.0, 2.5, 3.9, 1.7], TEXTS)
    return list(eval_loader(cuts, load_prunable("hf", whisper_dir).dataset(), max_duration=6))


def load_reference(model_dir):
    """transformers' own model and processor of a saved directory."""
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    return hf, transformers.WhisperProcessor.from_pretrained(model_dir)


def reference(hf, batch: dict, inputs: torch.Tensor, tie: bool = False):
    """transformers' teacher-forced forward, every hidden state kept raw
    (``tie_last_hidden_states`` false) or as transformers returns them by default."""
    hf.config.tie_last_hidden_states = tie
    with torch.no_grad():
        return hf(batch["input_features"], decoder_input_ids=inputs, output_hidden_states=True)


def _valid(states, lengths):
    return torch.cat([s[: int(n)] for s, n in zip(states, lengths, strict=True)])


@torch.no_grad()
def test_dumped_states_are_the_libraries_hidden_states(whisper_dir, batches, tmp_path):
    model = load_prunable("hf", whisper_dir)
    assert isinstance(model, WhisperAdapter) and model.stacks == ("encoder", "decoder")
    assert model.prompt == [29, 30]  # <|startoftranscript|><|notimestamps|>
    info = dump_layers(DecoderStack(model), batches, tmp_path / "dec", "frames", 0)
    assert info["num_layers"] == 4 and info["stack"] == "decoder"
    assert info["num_rows"] == sum(len(t) + 2 for t in TEXTS)  # prompt + reference positions
    dec_feats = load_layer_feats(tmp_path / "dec")
    dump_layers(EncoderStack(model), batches, tmp_path / "enc", "frames", 0)
    enc_feats = load_layer_feats(tmp_path / "enc")
    ours = {"decoder": [[] for _ in range(5)], "encoder": [[] for _ in range(4)]}
    hf, _ = load_reference(whisper_dir)
    for batch in batches:
        inputs, _, lengths = model.teacher_forcing(batch)
        out = reference(hf, batch, inputs)
        enc_lengths = (batch["frames"] - 1) // 2 + 1
        for k in range(5):
            ours["decoder"][k].append(_valid(out.decoder_hidden_states[k], lengths))
        for k in range(4):
            ours["encoder"][k].append(_valid(out.encoder_hidden_states[k], enc_lengths))
        # transformers' default puts the normed output in place of the last layer's
        tied = reference(hf, batch, inputs, tie=True)
        last = hf.model.decoder.layer_norm(out.decoder_hidden_states[4])
        assert torch.allclose(tied.decoder_hidden_states[4], last, atol=1e-6)
    for k in range(5):  # the dump's rows: utterance by utterance, in batch order
        assert np.allclose(dec_feats[k], torch.cat(ours["decoder"][k]).numpy(), atol=1e-5)
    for k in range(4):
        assert np.allclose(enc_feats[k], torch.cat(ours["encoder"][k]).numpy(), atol=1e-5)


def _generate(reloaded, batch: dict) -> list[str]:
    """transformers' generate and batch_decode."""
    hf, processor = reloaded
    with torch.no_grad():
        ids = hf.generate(batch["input_features"])
    return [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]


@pytest.mark.parametrize("stack_name", ["decoder", "encoder"])
def test_subset_equals_the_pruned_model_reloaded_and_generating(
    stack_name, whisper_dir, batches, tmp_path
):
    model = load_prunable("hf", whisper_dir)
    model.tokens_per_frame = None  # generate's limit alone, as generate
    stack = stack_of(model, stack_name)
    pruned, kept = ([1, 3], (2, 4)) if stack_name == "decoder" else ([2], (1, 3))
    result = stack.evaluate(batches, [kept])[0]
    stack.prune(pruned).save(tmp_path / "pruned", {"pruned_layers": pruned, "stack": stack_name})
    saved = json.loads((tmp_path / "pruned" / PRUNE_INFO).read_text())
    assert saved["pruned_layers"] == pruned and saved["stack"] == stack_name
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["encoder_layers"], config["decoder_layers"]) == (
        (3, 2) if stack_name == "decoder" else (2, 4)
    )
    hyps, refs = [], []
    reloaded = load_reference(tmp_path / "pruned")
    for batch in batches:
        inputs, outputs, lengths = model.teacher_forcing(batch)
        with torch.no_grad():
            memory = model.encode(batch) if stack_name == "decoder" else None
            if memory is None:
                memory = model.memory(model.forward_layers(model.embed(batch), kept))
            layers = kept if stack_name == "decoder" else None
            h = model.decoder_embed(memory, inputs, lengths)
            ours = model.decoder_readout(model.decoder_forward_layers(h, layers))
            texts = [model.decode_ids(i) for i in model.greedy_decode(memory, layers)]
        out = reference(reloaded[0], batch, inputs)
        theirs = out.logits.float().log_softmax(-1)
        valid = torch.arange(inputs.size(1))[None] < lengths[:, None]
        assert (ours[valid] - theirs[valid]).abs().max() < 1e-5
        generated = _generate(reloaded, batch)
        assert texts == generated
        hyps += generated
        refs += batch["texts"]
    assert len(set(hyps)) > 1 and all(hyps)  # varied, non-empty: not a vacuous comparison
    assert result.cer == pytest.approx(error_stats(refs, hyps, "char").err)
    # comflp reloads it too
    again = load_prunable("hf", tmp_path / "pruned")
    assert (again.num_layers, again.num_decoder_layers) == (
        config["encoder_layers"],
        config["decoder_layers"],
    )


def test_greedy_decoding_stops_where_generate_stops(batches, tmp_path):
    """At the end of text (never as the first token) and at max_length, as generate does."""
    model = load_prunable("hf", tiny_whisper(tmp_path / "model"))
    eos = model.eos_id
    with torch.no_grad():
        model.decoder.embed_tokens.weight[eos] *= 2.5  # tied to proj_out: ends come sooner
    model.hf.generation_config.max_length = 12
    assert model.generate_limit() == 12
    model.tokens_per_frame = None  # generate's limit alone, as generate
    model.save(tmp_path / "full")
    model.prune_decoder([1, 3]).save(tmp_path / "pruned")
    lengths = set()
    reloaded = {name: load_reference(tmp_path / name) for name in ("full", "pruned")}
    for batch in batches:
        with torch.no_grad():
            memory = model.encode(batch)
            for layers, saved in ((None, "full"), ((2, 4), "pruned")):
                hyps = model.greedy_decode(memory, layers)
                assert [model.decode_ids(h) for h in hyps] == _generate(reloaded[saved], batch)
                lengths |= {len(h) for h in hyps}
    assert min(lengths) == 1 and max(lengths) == 12  # stopped after one token; ran to the limit
    scores = torch.zeros(1, 31)
    assert model.suppress(scores, 0)[0, [27, eos, 29, 30]].isinf().all()  # space, end, prompt
    assert (
        model.suppress(scores, 1)[0, [29, 30]].isinf().all()
        and model.suppress(scores, 1)[0, eos] == 0
    )


def test_generation_configs_transformers_accepts_decode_as_generate(batches, tmp_path):
    """No max_length (generate's default: 20 new tokens) and begin_suppress_tokens outside a
    small vocabulary (WhisperConfig's defaults 220 and 50256): generate's rules, not a crash."""
    model = load_prunable("hf", tiny_whisper(tmp_path / "model"))
    gc = model.hf.generation_config
    gc.max_length = None
    gc.begin_suppress_tokens = [220, 50256, model.eos_id]
    model.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert "max_length" not in saved and saved["begin_suppress_tokens"][:2] == [220, 50256]
    again = load_prunable("whisper", tmp_path / "saved")
    again.tokens_per_frame = None  # generate's limit alone, as generate
    assert again.generate_limit() == 20
    reloaded = load_reference(tmp_path / "saved")
    lengths = []
    for batch in batches:
        with torch.no_grad():
            hyps = again.greedy_decode(again.encode(batch))
        assert [again.decode_ids(h) for h in hyps] == _generate(reloaded, batch)
        lengths += [len(h) for h in hyps]
    assert max(lengths) == 20  # a random model runs to the limit


def test_greedy_decoding_is_bounded_by_the_audio(batches, whisper_dir):
    """At most ceil(frames x max_target_positions // 2 / max_source_positions) + 1 tokens."""
    model = load_prunable("hf", whisper_dir)
    config = model.hf.config
    assert (config.max_target_positions, config.max_source_positions) == (32, 100)
    for batch in batches:
        with torch.no_grad():
            memory = model.encode(batch)
            hyps = model.greedy_decode(memory)
        bound = torch.ceil(memory.lengths * (32 // 2) / 100).long() + 1
        assert torch.equal(model.max_new_tokens(memory), bound.clamp(max=model.generate_limit()))
        assert all(len(h) <= int(b) for h, b in zip(hyps, bound, strict=True))
        assert any(len(h) == int(b) for h, b in zip(hyps, bound, strict=True))  # cut there


def test_decoder_prompt_follows_the_generation_config(tmp_path):
    gc = transformers.GenerationConfig(decoder_start_token_id=1)
    assert decoder_prompt(gc, tmp_path) == [1]
    gc.no_timestamps_token_id = 9
    assert decoder_prompt(gc, tmp_path) == [1, 9]
    gc.forced_decoder_ids = [[1, 4], [2, 7], [3, 9]]  # released checkpoints: en, transcribe
    assert decoder_prompt(gc, tmp_path) == [1, 4, 7, 9]
    gc.lang_to_id, gc.task_to_id = {"<|en|>": 4, "<|de|>": 5}, {"transcribe": 7, "translate": 8}
    gc.language, gc.task = "german", "translate"
    assert decoder_prompt(gc, tmp_path) == [1, 5, 8, 9]
    gc.language, gc.task = "en", None
    assert decoder_prompt(gc, tmp_path) == [1, 4, 7, 9]
    gc.language, gc.forced_decoder_ids = None, [[1, None], [2, 7]]
    with pytest.raises(ConfigError, match="needs a fixed language .* does not detect"):
        decoder_prompt(gc, tmp_path)
    gc.language = "xx"
    with pytest.raises(ConfigError, match="language 'xx' is not in generation_config.lang_to_id"):
        decoder_prompt(gc, tmp_path)


def test_the_dataset_refuses_audio_it_cannot_take(whisper_dir, tmp_path):
    dataset = load_prunable("hf", whisper_dir).dataset()
    long = make_cuts(tmp_path / "long", [4.5], ["TOO LONG"])
    with pytest.raises(ConfigError, match=r"cut u0: 4.50 s, longer than the model's 4 s input"):
        dataset[long]
    low = make_cuts(tmp_path / "low", [1.0], ["LOW"], rate=8000)
    with pytest.raises(ConfigError, match="sampling rate 8000 Hz, but the model expects 16 kHz"):
        dataset[low]
    batch = dataset[make_cuts(tmp_path / "ok", [1.0, 2.0], ["hello", "a b"])]
    assert batch["texts"] == ["A B", "HELLO"][::-1] or batch["texts"] == ["A B", "HELLO"]
    assert batch["frames"].tolist() == [100, 50]  # 20 ms hops of each utterance's own audio
    assert batch["input_features"].shape == (2, 80, 200)


def test_bad_input_gives_one_clear_error_line(whisper_dir, tmp_path):
    wav2vec2 = build_wav2vec2(tmp_path / "wav2vec2", "wav2vec2")
    cuts = tmp_path / "cuts.jsonl.gz"
    make_cuts(tmp_path / "audio", [1.0], ["A"]).to_file(cuts)
    exp = tmp_path / "exp"
    (exp / "dump").mkdir(parents=True)  # what stage 7 reads of stage 4
    (exp / "dump" / DUMP_INFO).write_text(json.dumps({"num_layers": 3, "model_dir": "m"}))
    hf = ["--model_type", "hf", "--model_dir"]
    search = [PYTHON, REPO / "bin/search.py", "--exp_dir", exp, "--dev_cuts", cuts]
    commands = {
        "stack": [*search, *hf, wav2vec2, "--stack", "decoder", "--num_prune", "1"],
        "num_prune": [*search, *hf, whisper_dir, "--stack", "decoder", "--num_prune", "4"],
        "rule": [PYTHON, REPO / "bin/list_methods.py", "--exp_dir", exp, *hf, whisper_dir]
        + ["--search_methods", "glp", "--num_prune", "1", "--rules", "distil_whisper"],
        "decoding": [PYTHON, REPO / "bin/decode.py", *hf, whisper_dir, "--cuts", cuts]
        + ["--output_dir", tmp_path / "decoded", "--decoding_method", "ctc_greedy_search"],
    }
    errors = {
        "stack": f"--stack decoder: a hf model ({wav2vec2}) has no decoder stack; its stacks: "
        "encoder",
        "num_prune": "--num_prune 4: must be between 1 and 3 for the 4-layer decoder",
        "rule": "--rules distil_whisper: a rule for the decoder stack, not the encoder",
        "decoding": "--decoding_method ctc_greedy_search: decoding method 'ctc_greedy_search' is "
        f"not available for a whisper model {whisper_dir}; choose one of attention_greedy_search",
    }
    procs = {  # concurrently: each process spends seconds importing transformers
        name: subprocess.Popen(
            [str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        lines = [line for line in stderr.splitlines() if " ERROR " in line]
        assert len(lines) == 1 and errors[name] in lines[0], (name, stderr[-2000:])
    assert not (exp / "search").exists() and not (exp / "decoder").exists()
    assert not (exp / "compare").exists() and not (tmp_path / "decoded").exists()


def test_stages_4_to_8_prune_both_stacks_of_a_whisper_model(pipeline, tmp_path):
    model_dir = tiny_whisper(tmp_path / "whisper", chunk_length=10, max_target_positions=160)
    model = load_prunable("hf", model_dir)
    model.hf.generation_config.max_length = 16  # a random model never stops: keep it short
    model.save(model_dir)
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(
        "train: {num_epochs: 1, max_duration: 30, lr: 0.0005, warmup_steps: 2, "
        "average_checkpoints: 1, num_workers: 0, seed: 1}\n"
    )
    run_sh(
        pipeline["workdir"],
        *("--stage", "4", "--stop_stage", "8", "--exp_dir", "exp/whisper"),
        *("--model_type", "hf", "--model_dir", str(model_dir), "--stack", "encoder decoder"),
        *("--num_prune", "1", "--decoder_num_prune", "2", "--scores", "dc residual_sum consensus"),
        *("--decoding_method", "attention_greedy_search", "--finetune_config", str(finetune)),
        *("--nj", "1", "--decode_nj", "1", "--calib_num_utts", "8", "--fine_num_utts", "4"),
        *("--score_conf", "dc.batch_size=8", "--random_seeds", "1", "--test_sets", "test-clean"),
        *("--search_methods", "comflp"),  # GLP and the oracle: as for every model type
    )
    exp = pipeline["workdir"] / "exp/whisper"
    chained = "exp/whisper/search/comflp_prune1/pruned"
    encoder = json.loads((exp / "dump" / DUMP_INFO).read_text())
    decoder = json.loads((exp / "decoder/dump" / DUMP_INFO).read_text())
    assert (encoder["stack"], encoder["num_layers"]) == ("encoder", 3)
    assert (decoder["stack"], decoder["num_layers"], decoder["model_dir"]) == (
        "decoder",
        4,
        chained,
    )
    search = json.loads((exp / "decoder/search/comflp_prune2/search.json").read_text())
    assert search["stack"] == "decoder" and search["model_dir"] == chained
    pruned = load_prunable("hf", exp / "decoder/search/comflp_prune2/pruned")
    assert (pruned.num_layers, pruned.num_decoder_layers) == (2, 2)
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    assert {(r["stack"], r["num_prune"]) for r in rows} == {
        ("encoder", 0),
        ("encoder", 1),
        ("decoder", 2),
    }
    assert [r["pruned"] for r in rows if r["method"] == "distil_whisper"] == ["2 3"]
    results = (exp / "RESULTS.md").read_text()
    assert "| method | stack | P | pruned layers |" in results
    assert "| distil_whisper | decoder | 2 | 2 3 |" in results
    assert "Decoding: attention_greedy_search." in results
    # stage 8: the decoder's CoMFLP choice (on the encoder-pruned model) fine-tuned
    tuned = load_prunable("hf", exp / "decoder/finetune/comflp_prune2")
    assert (tuned.num_layers, tuned.num_decoder_layers) == (2, 2)
    (row,) = [r for r in rows if r["method"] == "comflp+finetune"]
    assert (row["stack"], row["num_prune"]) == ("decoder", 2)
    # stage 8 with a teacher (a distil: section): Distil-Whisper's recovery instead
    shutil.copytree(exp, pipeline["workdir"] / "exp/whisper_distil")
    shutil.rmtree(pipeline["workdir"] / "exp/whisper_distil/decoder/finetune")
    distil = tmp_path / "distil.yaml"
    distil.write_text(
        "distil: {max_pseudo_label_wer: 100000.0, num_utts: 0, batch_size: 4}\n"
        "train: {num_epochs: 1, lr: 0.0005, warmup_steps: 0}\n"
    )
    run_sh(
        pipeline["workdir"],
        *("--stage", "8", "--stop_stage", "8", "--exp_dir", "exp/whisper_distil"),
        *("--model_type", "hf", "--model_dir", str(model_dir), "--stack", "encoder decoder"),
        *("--num_prune", "1", "--decoder_num_prune", "2", "--finetune_config", str(distil)),
        *("--decoding_method", "attention_greedy_search", "--decode_nj", "1"),
        *("--test_sets", "test-clean"),
    )
    out = pipeline["workdir"] / "exp/whisper_distil/decoder/finetune/comflp_prune2"
    record = json.loads((out / DISTIL_RESULT).read_text())
    assert record["filter"]["kept"] == record["filter"]["utterances"] > 0
    rows = json.loads(
        (pipeline["workdir"] / "exp/whisper_distil/compare/results.json").read_text()
    )["rows"]
    (row,) = [r for r in rows if r["method"] == "comflp+distil"]
    assert (row["stack"], row["num_prune"]) == ("decoder", 2)
