"""Stage 9 on Whisper: gates on both stacks, the physically pruned model against the masked one,
its padded forms in transformers and CTranslate2 (which takes one head count per stack), and
the stage on OpenAI's tiny.en."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")
transformers = pytest.importorskip("transformers")

from comflp.adapters.ct2 import CT2Whisper, generate_max_length, whisper_from_ct2  # noqa: E402
from comflp.adapters.whisper import WhisperAdapter, char_model, char_processor  # noqa: E402
from comflp.adapters.whisper_shapes import compact, uniform  # noqa: E402
from comflp.expdir import FINAL_DEV, LATEST_CHECKPOINT, METHOD_LISTS, STRUCTURE  # noqa: E402
from comflp.structured.layout import gate_name  # noqa: E402
from comflp.structured.params import layout_parameters  # noqa: E402
from comflp.structured.plan import kept_parameters, meet_budget  # noqa: E402
from comflp.structured.whisper import (  # noqa: E402
    WhisperMasker,
    layer_parameters,
    physically_prune_whisper,
    whisper_gates,
    whisper_layout,
)

from .conftest import PYTHON, REPO, run_cmd  # noqa: E402
from .test_ct2 import PROMPT  # noqa: E402

GROUPS = ["heads", "units", "modules", "layers"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random 3 + 3-layer Whisper with 4 heads of 8 and 40 units per layer."""
    torch.manual_seed(0)
    processor = char_processor("abc ", tmp_path_factory.mktemp("proc"), chunk_length=1)
    hf = char_model(
        processor,
        d_model=32,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        max_target_positions=16,
    ).eval()
    return WhisperAdapter(hf, processor, tmp_path_factory.mktemp("src"))


def _gates(hf, seed: int, module_off: str | None = None):
    """Gates with kept, soft and removed heads and units; every layer on; ``module_off``: one
    module gated off."""
    torch.manual_seed(seed)
    gates = whisper_gates(hf, GROUPS, 3.0)
    with torch.no_grad():
        for name, g in gates.gates.items():
            fine = name.endswith("_fine")
            g.log_alpha.copy_(torch.randn(g.n) * 2 + 1 if fine else torch.full((g.n,), 8.0))
        if module_off:
            gates.gates[module_off].log_alpha.fill_(-10.0)
    return gates


def _logits(hf, feats, tokens):
    with torch.no_grad():
        return hf(input_features=feats, decoder_input_ids=tokens).logits


def test_the_physically_pruned_whisper_computes_the_masked_one_and_counts_its_parameters(small):
    hf = small.hf
    gates = _gates(hf, 1)
    assert layout_parameters(gates.layout, gates.sizes, {}) == layer_parameters(hf)
    feats = torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 4, (2, 5), generator=torch.Generator().manual_seed(3))
    with WhisperMasker(hf, gates):
        masked = _logits(hf, feats, tokens)
    values = gates.values(training=False)
    pruned = physically_prune_whisper(hf, gates)
    assert torch.allclose(_logits(pruned, feats, tokens), masked, atol=1e-5)
    assert not torch.allclose(_logits(hf, feats, tokens), masked, atol=1e-3)  # gates did act
    layout = whisper_layout(pruned)
    heads = {k: int((values[gate_name(k, "attn")] > 0).sum()) for k in gates.layout}
    assert {k: v["attn"] for k, v in layout.items()} == heads
    assert layer_parameters(pruned) == kept_parameters(gates, values) < layer_parameters(hf)


def test_a_module_with_nothing_left_keeps_one_zero_head(small):
    hf = small.hf
    gates = _gates(hf, 4, module_off=gate_name("d2", "cross", "module"))
    values = gates.values(training=False)
    pruned = physically_prune_whisper(hf, gates)
    cross = pruned.model.decoder.layers[1].encoder_attn
    assert (
        cross.num_heads == 1 and not cross.out_proj.weight.any() and not cross.out_proj.bias.any()
    )
    extra = gates.sizes["attn"] + gates.sizes["module"]  # its zero head, norm and output bias
    assert layer_parameters(pruned) == kept_parameters(gates, values) + extra


def test_the_budget_is_met_and_padded_forms_compute_the_same(small, tmp_path):
    hf = small.hf
    gates = _gates(hf, 5)
    values = meet_budget(gates, 0.5)
    total = layout_parameters(gates.layout, gates.sizes, {})
    assert kept_parameters(gates, values) / total == pytest.approx(0.5, abs=0.02)
    pruned = physically_prune_whisper(hf, gates, 0.5)
    feats = torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(6))
    tokens = torch.tensor([[0, 1, 2, 3]])
    padded = uniform(pruned)
    assert (padded.config.encoder_attention_heads, padded.config.decoder_attention_heads) == (4, 4)
    widths = {whisper_layout(padded)[k]["ff"] for k in ("e1", "e2", "e3")}
    assert widths == {max(whisper_layout(pruned)[k]["ff"] for k in ("e1", "e2", "e3"))}
    assert torch.allclose(_logits(padded, feats, tokens), _logits(pruned, feats, tokens), atol=1e-6)
    assert whisper_layout(compact(uniform(pruned))) == whisper_layout(pruned)
    assert uniform(hf) is hf and whisper_layout(compact(hf)) == whisper_layout(hf)
    small._with(pruned).save(tmp_path / "saved")  # transformers' own format, padded
    back = WhisperAdapter.load(tmp_path / "saved")  # and read back compact
    assert whisper_layout(back.hf) == whisper_layout(pruned)
    assert torch.allclose(
        _logits(back.hf, feats, tokens), _logits(pruned, feats, tokens), atol=1e-6
    )


def test_structured_tiny_en_runs_alike_in_ctranslate2(tiny_en, english_batch, tmp_path):
    """A structured tiny.en (25% of its layer parameters off) written to CTranslate2 (float32): the same encoder output and
    greedy tokens as comflp's decoding of it, read back to the same shapes; written without
    the head padding, CTranslate2 computes something else."""
    gates = _gates(tiny_en.hf, 7)
    student = tiny_en._with(physically_prune_whisper(tiny_en.hf, gates, 0.25))
    student.quantization = "float32"
    student.save(tmp_path / "ct2")
    feats = english_batch["input_features"]
    ct2 = ctranslate2.models.Whisper(str(tmp_path / "ct2"), compute_type="float32")
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    with torch.no_grad():
        memory = student.encode(english_batch)
    assert np.abs(np.array(ct2.encode(storage)) - memory.x.numpy()).max() < 1e-3
    limits = student.max_new_tokens(memory)
    hyps = student.greedy_decode(memory)
    room = generate_max_length(int(limits.max()))
    results = ct2.generate(storage, [PROMPT] * len(feats), beam_size=1, max_length=room)
    theirs = [r.sequences_ids[0][: int(n)] for r, n in zip(results, limits, strict=True)]
    assert [h[: int(n)] for h, n in zip(hyps, limits, strict=True)] == theirs
    assert whisper_layout(CT2Whisper.load(tmp_path / "ct2").hf) == whisper_layout(student.hf)
    hf, _, quantization = whisper_from_ct2(tmp_path / "ct2")  # model.bin itself
    assert whisper_layout(hf) == whisper_layout(student.hf) and quantization == "float32"
    ffn = {whisper_layout(student.hf)[k]["ff"] for k in ("e1", "e2", "e3", "e4")}
    assert len(ffn) > 1  # CTranslate2 took a width per layer


def test_ctranslate2_needs_the_head_padding(tiny_en, english_batch, tmp_path):
    """Converted without padding, a layer with 3 of 6 heads runs in CTranslate2 without an
    error (its 192 rows split as 6 heads of 32) and computes something else."""
    gates = whisper_gates(tiny_en.hf, GROUPS, 8.0)
    with torch.no_grad():
        gates.gates[gate_name("e1", "attn")].log_alpha[:3] = -10.0
    hf = physically_prune_whisper(tiny_en.hf, gates)
    assert whisper_layout(hf)["e1"]["attn"] == 3 and whisper_layout(hf)["e2"]["attn"] == 6
    student = tiny_en._with(hf)
    student.quantization = "float32"
    student.save(tmp_path / "padded")
    feats = english_batch["input_features"]
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    with torch.no_grad():
        memory = student.encode(english_batch).x.numpy()

    class Unpadded(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, path, **kwargs):
            return hf

    Unpadded(str(tmp_path / "padded" / "transformers")).convert(str(tmp_path / "bad"))
    for name, error in (("padded", 1e-3), ("bad", None)):
        model = ctranslate2.models.Whisper(str(tmp_path / name), compute_type="float32")
        diff = np.abs(np.array(model.encode(storage)) - memory).max()
        assert diff < error if error else diff > 0.1


def _config(tmp_path, gates: str = "[heads, units, modules, layers]"):
    path = tmp_path / "structured.yaml"
    path.write_text(
        f"structured:\n  gates: {gates}\n  gate_lr: 0.1\n"
        "distil:\n  num_utts: 0\n  batch_size: 3\n  max_pseudo_label_wer: 100\n"
        "train:\n  num_epochs: 1\n  lr: 0.0001\n  warmup_steps: 1\n  seed: 3\n"
    )
    return path


def _stage9(tmp_path, cuts, config, exp_dir):
    return run_cmd(
        [
            PYTHON,
            REPO / "bin/structured_prune.py",
            *("--model_type", "ctranslate2", "--model_dir", "tiny.en"),
            *("--exp_dir", exp_dir, "--sp_config", config),
            *("--train_cuts", cuts, "--dev_cuts", cuts),
        ],
        check=False,
    )


@pytest.mark.e2e
def test_stage_9_prunes_tiny_en_to_half_and_writes_ctranslate2(english_speech, tmp_path):
    cuts = tmp_path / "cuts.jsonl.gz"
    english_speech.to_file(cuts)
    exp = tmp_path / "exp"
    done = _stage9(tmp_path, cuts, _config(tmp_path), exp)
    assert done.returncode == 0, done.stderr[-2000:]
    out = exp / "structured" / "sparsity0.5"
    structure = json.loads((out / STRUCTURE).read_text())
    assert structure["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert structure["layer_parameters"] < structure["prunable_parameters"]
    assert structure["pseudo_labels"]["kept"] == 3 and structure["steps"] == 1
    assert 0 <= json.loads((out / FINAL_DEV).read_text())["wer"]
    rows = json.loads((exp / "compare" / METHOD_LISTS["structured"]).read_text())
    assert [(r["name"], r["model_type"], r["model_dir"]) for r in rows] == [
        ("structured_l0_sparsity0.5", "ctranslate2", str(out))
    ]
    ctranslate2.models.Whisper(str(out))  # the written directory loads in CTranslate2
    assert not (out / LATEST_CHECKPOINT).exists()  # done: only the model stays
    before = (out / STRUCTURE).stat().st_mtime_ns
    again = _stage9(tmp_path, cuts, _config(tmp_path), exp)  # done: skipped, nothing rewritten
    assert again.returncode == 0 and "pruned already" in again.stderr
    assert (out / STRUCTURE).stat().st_mtime_ns == before


def test_stage_9_refuses_gates_whisper_does_not_have(english_speech, tmp_path):
    cuts = tmp_path / "cuts.jsonl.gz"
    english_speech.to_file(cuts)
    config = _config(tmp_path, gates="[channels]")
    bad = _stage9(tmp_path, cuts, config, tmp_path / "exp")
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"{config}: structured: 'gates'" in errors[0], bad.stderr[-800:]
    assert "Whisper has no such module" in errors[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "exp" / "structured").exists()
