"""The Hugging Face adapter: tiny wav2vec2-family CTC models built from configs (no download),
checked against transformers' own forward, ``from_pretrained`` and ``batch_decode``."""

import json
import subprocess

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from comflp import expdir  # noqa: E402
from comflp.adapters import load_prunable  # noqa: E402
from comflp.adapters.hf import HFModel  # noqa: E402
from comflp.asr.config import ConfigError, load_config  # noqa: E402
from comflp.asr.ctc import ctc_greedy_search, ctc_loss  # noqa: E402
from comflp.asr.data import eval_loader, load_cuts, load_eval_batches  # noqa: E402
from comflp.prune.dump import dump_layers, load_layer_feats  # noqa: E402
from comflp.prune.evaluator import evaluate_subsets  # noqa: E402
from comflp.prune.method_list import MethodList  # noqa: E402
from comflp.prune.stacks import EncoderStack  # noqa: E402
from comflp.train.trainer import AdapterTrainer  # noqa: E402

from .conftest import (  # noqa: E402
    ONE_LAYER_SEARCH,
    PYTHON,
    REPO,
    decoded_utts,
    independent_cer,
    run_sh,
)

CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"
TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 4, 8),
    conv_stride=(5, 4, 8),  # 10 ms frames: attention over 1600 frames/s would take minutes
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    pad_token_id=0,
)
# kind -> (config class, model class, config options, feature extractor returns a mask)
KINDS = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC", {"feat_extract_norm": "group"}, False),
    "wav2vec2_stable": (
        "Wav2Vec2Config",
        "Wav2Vec2ForCTC",
        {"do_stable_layer_norm": True, "feat_extract_norm": "layer"},
        True,
    ),
    "hubert": ("HubertConfig", "HubertForCTC", {}, True),
    "wavlm": ("WavLMConfig", "WavLMForCTC", {}, True),
    "data2vec_audio": ("Data2VecAudioConfig", "Data2VecAudioForCTC", {}, True),
    # CoMFLP's AISHELL model: a LayerNorm between the encoder and lm_head
    "wav2vec2_lm_head_norm": ("Wav2Vec2Config", "Wav2Vec2ForCTC", {}, True),
}
NORM_KEYS = ["lm_head_norm.weight", "lm_head_norm.bias"]


def _processor(directory, lower: bool, mask: bool):
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({(c.lower() if lower else c): i + 5 for i, c in enumerate(CHARS)})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(
        str(directory / "vocab.json"), unk_token="<unk>", pad_token="<pad>"
    )
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=mask
    )
    return transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def build(directory, kind: str, seed: int = 0):
    """A random tiny model of ``kind`` and its processor, saved with save_pretrained."""
    config_class, model_class, options, mask = KINDS[kind]
    processor = _processor(directory, lower=kind == "hubert", mask=mask)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=len(processor.tokenizer), **TINY, **options
    )
    model = getattr(transformers, model_class)(config)
    if kind == "wav2vec2_lm_head_norm":
        norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
        model.add_module("lm_head_norm", norm)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_models")
    return {kind: build(root / kind, kind) for kind in KINDS}


def _reference(model_dir, kind: str, batch: dict):
    """transformers' own forward of a saved model: (model, base model output, logits, loading info)."""
    model_class = getattr(transformers, KINDS[kind][1])
    hf, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    hf.eval()
    audio, mask = batch["audio"], batch["attention_mask"]
    with torch.no_grad():
        out = hf.base_model(audio, attention_mask=mask, output_hidden_states=True)
        logits = hf(audio, attention_mask=mask).logits
        if kind == "wav2vec2_lm_head_norm":  # the stock class skips the norm: apply it here
            weights = load_file(str(model_dir / "model.safetensors"))
            x = torch.nn.functional.layer_norm(
                out.last_hidden_state,
                (hf.config.hidden_size,),
                weights[NORM_KEYS[0]],
                weights[NORM_KEYS[1]],
                hf.config.layer_norm_eps,
            )
            logits = hf.lm_head(x)
    return hf, out, logits, info


def _valid_max_diff(a, b, lengths) -> float:
    return max(float((a[i, :n] - b[i, :n]).abs().max()) for i, n in enumerate(lengths.tolist()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_dump_index_0_and_L_are_the_libraries_hidden_states(kind, models, tiny_data, tmp_path):
    model = HFModel.load(models[kind])
    batches = load_eval_batches(model, tiny_data["dev"], max_duration=12)
    info = dump_layers(EncoderStack(model), batches, tmp_path / "dump", pooling="mean")
    assert info["num_layers"] == 4 and info["d_model"] == 32 and info["num_utts"] == 8
    feats = load_layer_feats(tmp_path / "dump")
    row = 0
    for batch in batches:
        hf, out, _, _ = _reference(models[kind], kind, batch)
        lengths = hf._get_feat_extract_output_lengths(batch["audio_lens"])
        assert len(out.hidden_states) == 5  # index 0..L
        for i, n in enumerate(lengths.tolist()):
            for k in (0, 4):
                pooled = out.hidden_states[k][i, :n].mean(0).numpy()
                assert np.allclose(feats[k][row + i], pooled, atol=1e-5)
        encoder = hf.base_model.encoder
        if KINDS[kind][2].get("do_stable_layer_norm"):
            # HF's last_hidden_state is index L after the encoder's final norm (readout's)
            assert torch.allclose(out.last_hidden_state, encoder.layer_norm(out.hidden_states[4]))
            assert not torch.allclose(out.last_hidden_state, out.hidden_states[4], atol=1e-3)
        else:
            assert torch.equal(out.last_hidden_state, out.hidden_states[4])
        row += len(batch["ids"])
    assert row == 8


@pytest.mark.parametrize("kind", list(KINDS))
def test_pruned_model_reloaded_by_transformers_gives_comflps_log_probs(
    kind, models, tiny_data, tmp_path
):
    model = HFModel.load(models[kind])
    batches = load_eval_batches(model, tiny_data["dev"], max_duration=12)
    kept = (2, 4)  # layer 1 goes: WavLM's relative position embedding must move
    model.prune([1, 3]).save(tmp_path / "pruned", {"pruned_layers": [1, 3]})
    assert json.loads((tmp_path / "pruned" / expdir.PRUNE_INFO).read_text())["pruned_layers"] == [
        1,
        3,
    ]
    result = evaluate_subsets(model, batches, [kept])[0]
    total_loss = 0.0
    for batch in batches:
        with torch.no_grad():  # the calls evaluate_subsets makes for this subset
            log_probs, lengths = model.readout(model.forward_layers(model.embed(batch), kept))
        hf, _, logits, info = _reference(tmp_path / "pruned", kind, batch)
        assert hf.config.num_hidden_layers == 2 and len(hf.base_model.encoder.layers) == 2
        assert not info["missing_keys"]
        expected_unexpected = NORM_KEYS if kind == "wav2vec2_lm_head_norm" else []
        assert sorted(info["unexpected_keys"]) == sorted(expected_unexpected)
        reference = logits.float().log_softmax(-1)
        assert log_probs.shape == reference.shape
        assert _valid_max_diff(log_probs, reference, lengths) < 1e-5
        loss = ctc_loss(reference, lengths, batch["targets"], batch["target_lens"], 0)
        total_loss += loss.item()
    assert result.num_utts == 8
    assert result.loss == pytest.approx(total_loss / 8, rel=1e-5)
    # comflp reloads it too, the LayerNorm before lm_head included
    again = HFModel.load(tmp_path / "pruned")
    assert again.num_layers == 2 and again.lm_head_norm == (
        "lm_head_norm" if kind == "wav2vec2_lm_head_norm" else None
    )


def test_wavlm_pruned_first_layer_owns_the_relative_position_embedding(models, tmp_path):
    model = HFModel.load(models["wavlm"])
    original = model.hf.base_model.encoder.layers[0].attention.rel_attn_embed.weight
    pruned = model.prune([1, 2])
    first = pruned.hf.base_model.encoder.layers[0].attention
    assert torch.equal(first.rel_attn_embed.weight, original)
    assert not hasattr(model.hf.base_model.encoder.layers[2].attention, "rel_attn_embed")
    with pytest.raises(ValueError, match="at least one layer kept"):
        model.prune([1, 2, 3, 4])
    with pytest.raises(ValueError, match="layer numbers 1..L"):
        model.prune([0])


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm", "wav2vec2_lm_head_norm"])
def test_decoding_equals_the_processors_batch_decode(kind, models, tiny_data):
    model = HFModel.load(models[kind])
    batch = load_eval_batches(model, tiny_data["dev"], max_duration=12)[0]
    with torch.no_grad():
        log_probs, lengths = model.log_probs(batch)
    ours = [model.decode_ids(ids) for ids in ctc_greedy_search(log_probs, lengths, model.blank_id)]
    argmax = log_probs.argmax(-1)
    theirs = [
        model.processor.batch_decode(argmax[i : i + 1, :n])[0]
        for i, n in enumerate(lengths.tolist())
    ]
    assert ours == theirs
    assert sum(len(t) for t in ours) > 0  # a random model emits characters: not vacuous


def test_references_are_cased_like_the_vocabulary(models, tiny_data):
    lower = HFModel.load(models["hubert"])  # lower-case vocabulary; the corpus is upper case
    batch = load_eval_batches(lower, tiny_data["dev"], max_duration=12)[0]
    upper = load_eval_batches(HFModel.load(models["wavlm"]), tiny_data["dev"], max_duration=12)[0]
    assert batch["texts"] == [t.lower() for t in upper["texts"]] != upper["texts"]
    tokenizer = lower.processor.tokenizer
    for i, text in enumerate(batch["texts"]):
        ids = batch["targets"][i, : batch["target_lens"][i]].tolist()
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, group_tokens=False) == text
    # the extractor's own padding and normalisation; lengths count real samples
    assert torch.equal(batch["attention_mask"].sum(-1), batch["audio_lens"])
    assert batch["audio"].shape == (len(batch["ids"]), int(batch["audio_lens"].max()))


def _write_bad_models(root):
    """Directories that are not a prunable HF CTC model, with the error each must give."""
    (root / "empty").mkdir(parents=True)
    text = transformers.BertConfig(architectures=["BertForMaskedLM"])
    text.save_pretrained(root / "text_model")
    base = transformers.Wav2Vec2Config(**TINY, vocab_size=32, architectures=["Wav2Vec2Model"])
    transformers.Wav2Vec2Model(base).save_pretrained(root / "no_ctc_head")
    _processor(root / "no_ctc_head", lower=False, mask=True).save_pretrained(root / "no_ctc_head")
    return {
        "empty": "no config.json (expected a Hugging Face model saved with save_pretrained)",
        "text_model": "unsupported architecture 'BertForMaskedLM'; supported: "
        "Wav2Vec2ForCTC, HubertForCTC, WavLMForCTC, Data2VecAudioForCTC, "
        "WhisperForConditionalGeneration",
        "no_ctc_head": "Wav2Vec2Model has no CTC head",
    }


def test_bad_input_gives_one_clear_error_line(models, tiny_data, tmp_path):
    errors = _write_bad_models(tmp_path)
    for name, message in errors.items():
        with pytest.raises(ConfigError, match="^" + str(tmp_path / name)) as e:
            load_prunable("hf", tmp_path / name)
        assert message in str(e.value)
    low_rate = tmp_path / "cuts_8k.jsonl.gz"
    load_cuts(tiny_data["dev"]).resample(8000).to_file(low_rate)
    exp = tmp_path / "exp"
    dump = [PYTHON, REPO / "bin/dump_layers.py", "--exp_dir", exp, "--model_type", "hf"]
    commands = {
        name: [*dump, "--model_dir", tmp_path / name, "--cuts", tiny_data["dev"]] for name in errors
    }
    commands["8k"] = [*dump, "--model_dir", models["wavlm"], "--cuts", low_rate]
    errors["8k"] = "sampling rate 8000 Hz, but the model expects 16 kHz audio"
    commands["num_prune"] = [
        PYTHON,
        REPO / "bin/search.py",
        "--exp_dir",
        exp,
        "--model_type",
        "hf",
        "--model_dir",
        models["wavlm"],
        "--dev_cuts",
        tiny_data["dev"],
        "--search_methods",
        "glp",
        "--num_prune",
        "4",
    ]
    errors["num_prune"] = "--num_prune 4: must be between 1 and 3 for the 4-layer encoder"
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
    assert not (exp / "search").exists()


def _adapter_trainer(model_dir, exp_dir, data) -> AdapterTrainer:
    cfg = load_config(REPO / "conf/train_tiny.yaml", {"train.max_duration": 10})
    # a raw-waveform front end is slow on CPU: 8 utterances (about 3 steps per epoch), 4 dev
    train = load_cuts(data["train"]).subset(first=8).to_eager()
    dev = load_cuts(data["dev"]).subset(first=4).to_eager()
    return AdapterTrainer(load_prunable("hf", model_dir), cfg, exp_dir, train, dev, "cpu")


def test_adapter_trainer_resumes_exactly_and_writes_the_library_format(models, tiny_data, tmp_path):
    source = models["wav2vec2_lm_head_norm"]
    full = _adapter_trainer(source, tmp_path / "full", tiny_data)
    full.restore(True, None)
    assert full.run()
    steps = full.step
    part = _adapter_trainer(source, tmp_path / "part", tiny_data)
    part.restore(True, None)
    assert not part.run(stop_after_steps=steps // 2 + 1)  # stops inside the second epoch
    again = _adapter_trainer(source, tmp_path / "part", tiny_data)
    again.restore(True, None)
    assert again.step == steps // 2 + 1 and again.run() and again.step == steps
    # what transformers loads from each directory: the same weights, not the source's
    tuned = [load_file(tmp_path / d / "model.safetensors") for d in ("full", "part")]
    original = load_file(source / "model.safetensors")
    assert set(tuned[0]) == set(original) and set(NORM_KEYS) <= set(tuned[0])
    assert all(torch.equal(tuned[0][k], tuned[1][k]) for k in tuned[0])
    assert not torch.equal(tuned[0]["lm_head.weight"], original["lm_head.weight"])
    reloaded, info = transformers.Wav2Vec2ForCTC.from_pretrained(
        tmp_path / "full", output_loading_info=True
    )
    assert not info["missing_keys"] and sorted(info["unexpected_keys"]) == sorted(NORM_KEYS)
    history = json.loads((tmp_path / "full" / expdir.HISTORY).read_text())
    final = json.loads((tmp_path / "full" / expdir.FINAL_DEV).read_text())
    assert [r["epoch"] for r in history] == [1, 2] and final["averaged"] == [
        "epoch-1.pt",
        "epoch-2.pt",
    ]
    prune_info = json.loads((tmp_path / "full" / expdir.PRUNE_INFO).read_text())
    assert prune_info["finetuned_from"] == str(source)
    assert prune_info["dev"]["cer"] == pytest.approx(final["cer"])
    # the averaged model's dev CER, recomputed through the reloaded adapter
    tuned_model = HFModel.load(tmp_path / "full")
    dev = load_cuts(tiny_data["dev"]).subset(first=4)
    # batched as the trainer's dev set (the group norm of the conv front end sees the padding)
    batches = list(eval_loader(dev, tuned_model.dataset(), full.tc.max_duration))
    again_cer = evaluate_subsets(tuned_model, batches, [(1, 2, 3, 4)])[0].cer
    assert again_cer == pytest.approx(final["cer"])
    assert "train" in (tmp_path / "full" / expdir.TRAIN_CONFIG).read_text()
    assert not (tmp_path / "full" / expdir.CONFIG).exists()  # comflp's model config is not written


@pytest.mark.e2e
def test_stages_4_to_8_prune_and_finetune_an_hf_model(pipeline, models, tmp_path):
    exp = pipeline["workdir"] / "exp/hf"
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(
        "train: {num_epochs: 1, max_duration: 30, lr: 0.0005, warmup_steps: 2, "
        "average_checkpoints: 1, num_workers: 0, seed: 1}\n"
    )
    run_sh(
        pipeline["workdir"],
        "--stage",
        "4",
        "--stop_stage",
        "8",
        "--finetune_config",
        str(finetune),
        "--model_type",
        "hf",
        "--model_dir",
        str(models["wav2vec2_lm_head_norm"]),
        "--exp_dir",
        "exp/hf",
        *ONE_LAYER_SEARCH,
        "--test_sets",
        "test-clean",
    )
    info = json.loads((exp / "dump/info.json").read_text())
    assert info["model_type"] == "hf" and info["num_layers"] == 4 and info["num_utts"] == 16
    assert np.load(exp / "scores/dc/matrix.npy").shape == (5, 5)
    search = json.loads((exp / "search/comflp_prune1/search.json").read_text())
    assert search["model_type"] == "hf" and len(search["best_layers"]) == 1
    pruned = HFModel.load(exp / "search/comflp_prune1/pruned")
    assert pruned.num_layers == 3 and pruned.lm_head_norm == "lm_head_norm"
    saved = json.loads((exp / "search/comflp_prune1/pruned" / expdir.PRUNE_INFO).read_text())
    assert saved["pruned_layers"] == search["best_layers"]
    results = (exp / "RESULTS.md").read_text()
    assert (
        "unpruned" in results and "drop_top" in results and "(model trained elsewhere)" in results
    )
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    assert any(r["num_prune"] == 1 for r in rows) and any(r["num_prune"] == 0 for r in rows)
    # stage 8: the fine-searched model fine-tuned through the adapter, saved as an HF model
    ft = exp / "finetune/comflp_prune1"
    tuned = HFModel.load(ft)
    assert tuned.num_layers == 3 and tuned.lm_head_norm == "lm_head_norm"
    assert len(json.loads((ft / expdir.HISTORY).read_text())) == 1
    before = load_file(exp / "search/comflp_prune1/pruned/model.safetensors")
    after = load_file(ft / "model.safetensors")
    assert set(before) == set(after) and not torch.equal(
        before["lm_head.weight"], after["lm_head.weight"]
    )
    (listed,) = json.loads((exp / "compare" / expdir.METHOD_LISTS["finetune"]).read_text())
    assert listed["model_type"] == "hf" and listed["model_dir"] == "exp/hf/finetune/comflp_prune1"
    assert listed["num_prune"] == 1 and listed["pruned"] == []
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    (row,) = [r for r in rows if r["method"] == "comflp+finetune"]
    key = MethodList.load(exp / "compare" / expdir.METHOD_LISTS["finetune"]).methods[0].key
    utts = decoded_utts(exp / "compare/decode/dev-clean" / key)
    assert row["num_prune"] == 1
    assert row["errors"]["dev-clean"]["cer"] == pytest.approx(independent_cer(utts))
    assert "| comflp+finetune | 1 |" in (exp / "RESULTS.md").read_text()
