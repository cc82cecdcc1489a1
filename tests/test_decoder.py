"""The decoder stack of comflp's own attention encoder-decoder model: teacher-forced states,
incremental greedy decoding, subsets against physically pruned models saved and reloaded,
Distil-Whisper's rule, and the rows of both stacks in one table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from comflp.adapters.base import IGNORE, Hidden
from comflp.adapters.native import NativeAEDModel, NativeModel, native_model
from comflp.asr.checkpoint import save_model
from comflp.asr.config import ExperimentConfig, ModelConfig
from comflp.asr.features import load_cmvn, save_cmvn
from comflp.asr.model import ASRModel, prune_decoder_layers
from comflp.asr.scoring import error_stats
from comflp.asr.tokenizer import Tokenizer, train_tokenizer
from comflp.errors import InputError
from comflp.expdir import CMVN, DUMP_INFO, TOKENIZER, ExpDir
from comflp.prune.evaluator import DecoderPass
from comflp.prune.method_list import Method, MethodList
from comflp.prune.methods import CompareSettings, list_methods
from comflp.prune.ranks import spearman
from comflp.prune.rules import distil_whisper, rules_for
from comflp.prune.stacks import DecoderStack, EncoderStack, stack_of
from comflp.quality.decoder import (
    DecoderSummarySettings,
    full_decoder,
    measure,
    ranking_quality,
    summarize_decoders,
)
from comflp.quality.study import CerCache, proposal_cers, teacher_forced_quality
from comflp.report.results import build_rows, methods_table

from .conftest import PYTHON, REPO, run_cmd, run_sh


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A character tokenizer of 10 symbols (+ blank, unknown, <sos/eos>: 13) and CMVN, as
    stage 2 and stage 1 write them: what a saved native model carries along."""
    out = tmp_path_factory.mktemp("assets")
    train_tokenizer(["ABCDE FGHI"], out, "char", 0)
    save_cmvn({"mean": [0.0] * 80, "std": [1.0] * 80}, out / CMVN)
    return out


VOCAB = 13


class DigitTokenizer:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def aed(decoder_layers: int = 4, seed: int = 0, assets: Path | None = None) -> NativeAEDModel:
    """A random AED whose decoder emits varied tokens and sometimes <sos/eos>; with
    ``assets``, their tokenizer and CMVN (so that it can be saved)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=16,
        num_heads=2,
        ffn_dim=32,
        num_layers=3,
        subsampling_channels=4,
        dropout=0.0,
        decoder_layers=decoder_layers,
        ctc_weight=0.5,
    )
    model = ASRModel(cfg).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0, 0.5)
        model.decoder.out.bias[model.sos_eos] += 4.0  # some subsets stop early
    if assets is None:
        return native_model(model, DigitTokenizer(), (torch.zeros(80), torch.ones(80)), Path("."))
    tokenizer = Tokenizer(assets / TOKENIZER)
    assert tokenizer.vocab_size == VOCAB
    return native_model(model, tokenizer, load_cmvn(assets / CMVN), assets)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([120, 90, 60])
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]])
    return {
        "feats": torch.randn(3, 120, 80, generator=g),
        "feat_lens": lens,
        "targets": targets,
        "target_lens": torch.tensor([4, 2, 1]),
        "texts": ["1 2 3 4", "5 6", "7"],
        "ids": ["a", "b", "c"],
        "seconds": 2.7,
    }


def full_greedy(model: NativeAEDModel, b: dict, layers: list[int]) -> list[list[int]]:
    """Greedy decoding without caches: the whole prefix through the layers at every step."""
    dec = model.asr.decoder
    memory = model.encode(b)
    hyps = []
    for i in range(len(b["ids"])):
        tokens = [model.eos_id]
        for _ in range(model.max_new_tokens(memory)):
            inputs = torch.tensor([tokens])
            self_mask, memory_mask = dec.masks(
                torch.tensor([len(tokens)]),
                len(tokens),
                memory.lengths[i : i + 1],
                memory.x.size(1),
            )
            y = dec.forward_layers(
                dec.embed_tokens(inputs), self_mask, memory.x[i : i + 1], memory_mask, layers
            )
            token = int(dec.readout(y)[0, -1].argmax())
            if token == model.eos_id:
                break
            tokens.append(token)
        hyps.append(tokens[1:])
    return hyps


@torch.no_grad()
def test_incremental_greedy_decoding_equals_recomputing_every_prefix():
    model, b = aed(), batch()
    memory = model.encode(b)
    seen_lengths = set()
    for layers in ([1, 2, 3, 4], [2, 4], [3], [1, 4]):
        hyps = model.greedy_decode(memory, layers)
        assert hyps == full_greedy(model, b, layers)
        seen_lengths |= {len(h) for h in hyps}
    # some hypotheses stop at <eos>, some run to the limit: both paths are exercised
    limit = model.max_new_tokens(memory)
    assert min(seen_lengths) < limit - 1 and max(seen_lengths) == limit
    assert model.decode(b, "attention_greedy_search") == model.greedy_decode(memory)


@torch.no_grad()
def test_teacher_forcing_and_decoder_states():
    model, b = aed(), batch()
    inputs, outputs, lengths = model.teacher_forcing(b)
    sos = model.eos_id
    assert inputs.tolist() == [[sos, 1, 2, 3, 4], [sos, 5, 6, sos, sos], [sos, 7, sos, sos, sos]]
    i = IGNORE
    assert outputs.tolist() == [[1, 2, 3, 4, sos], [5, 6, sos, i, i], [7, sos, i, i, i]]
    assert lengths.tolist() == [5, 3, 2]
    states, valid = DecoderStack(model).states(b)
    assert valid.tolist() == [5, 3, 2] and len(states) == 5
    # the decoder's own modules, one by one
    dec, memory = model.asr.decoder, model.encode(b)
    masks = dec.masks(lengths, inputs.size(1), memory.lengths, memory.x.size(1))
    y = dec.embed_tokens(inputs)
    assert torch.equal(states[0], y)
    for k, layer in enumerate(dec.layers, start=1):
        y = layer(y, masks[0], memory.x, masks[1])
        assert torch.allclose(states[k], y, atol=1e-6)
    # the teacher-forced loss of all layers is the model's own attention loss without smoothing
    logits = model.asr.decoder(inputs, lengths, memory.x, memory.lengths)
    valid_out = outputs != IGNORE
    expected = torch.nn.functional.cross_entropy(
        logits[valid_out], outputs[valid_out], reduction="sum"
    )
    assert model.teacher_forced_nll(memory, b).item() == pytest.approx(expected.item(), rel=1e-5)


@torch.no_grad()
def test_decoder_subset_equals_the_pruned_model_saved_and_reloaded(assets, tmp_path):
    model, b = aed(assets=assets), batch()
    kept, pruned_layers = (1, 4), [2, 3]
    stack = stack_of(model, "decoder")
    result = stack.evaluate([b], [kept])[0]
    cached = stack.evaluate([b], [kept], prefix_cache=False)[0]
    assert (result.cer, result.wer, result.loss) == (cached.cer, cached.wer, cached.loss)
    # write the pruned model as stage 6 does, reload it from its checkpoint
    stack.prune(pruned_layers).save(tmp_path / "pruned", {"pruned_layers": pruned_layers})
    reloaded = NativeModel.load(tmp_path / "pruned")
    assert isinstance(reloaded, NativeAEDModel) and reloaded.num_decoder_layers == 2
    assert reloaded.asr.cfg.decoder_kept_layers == [1, 4]
    memory = model.encode(b)
    inputs, outputs, lengths = model.teacher_forcing(b)
    ours = model.decoder_readout(
        model.decoder_forward_layers(model.decoder_embed(memory, inputs, lengths), kept)
    )
    theirs = reloaded.decoder_readout(
        reloaded.decoder_forward_layers(reloaded.decoder_embed(memory, inputs, lengths))
    )
    assert torch.allclose(ours, theirs, atol=1e-5)
    texts = [model.decode_ids(h) for h in model.greedy_decode(memory, kept)]
    again = [reloaded.decode_ids(h) for h in reloaded.decode(b, "attention_greedy_search")]
    assert texts == again and any(texts)
    # the evaluator's CER is the reloaded model's transcripts scored against the references
    assert result.cer == pytest.approx(error_stats(b["texts"], again, "char").err)
    nll = reloaded.decoder_nll(
        reloaded.decoder_forward_layers(reloaded.decoder_embed(memory, inputs, lengths)), outputs
    )
    assert result.loss == pytest.approx(nll.item() / 3, rel=1e-5)


def test_prune_decoder_layers_composes_and_rejects_bad_sets():
    model = aed(decoder_layers=6).asr
    once = prune_decoder_layers(model, [2, 5])
    twice = prune_decoder_layers(once, [1])
    assert twice.cfg.decoder_layers == 3 and twice.cfg.decoder_kept_layers == [3, 4, 6]
    assert torch.equal(twice.decoder.layers[0].ff[0].weight, model.decoder.layers[2].ff[0].weight)
    assert torch.equal(twice.encoder.layers[0].ff[0].weight, model.encoder.layers[0].ff[0].weight)
    with pytest.raises(ValueError, match=r"pruned decoder layers \[7\] are outside 1..6"):
        prune_decoder_layers(model, [7])
    with pytest.raises(ValueError, match="num_prune must be between 1 and 5"):
        prune_decoder_layers(model, [1, 2, 3, 4, 5, 6])
    ctc_only = ASRModel(ModelConfig(vocab_size=VOCAB, d_model=16, num_heads=2, num_layers=2))
    with pytest.raises(ValueError, match="no attention decoder"):
        prune_decoder_layers(ctc_only, [1])


def test_a_model_without_a_decoder_has_no_decoder_stack():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, num_heads=2, num_layers=2)
    plain = native_model(ASRModel(cfg), DigitTokenizer(), (0, 1), Path("m"))
    assert type(plain) is NativeModel and plain.stacks == ("encoder",)
    with pytest.raises(InputError, match=r"^--stack decoder: a native model \(m\) has no decoder"):
        stack_of(plain, "decoder")
    assert "attention_greedy_search" not in plain.decoding_methods


def test_decoder_pass_shares_the_encoder_and_decodes_only_when_asked():
    model, b = aed(), batch()
    calls = {"encode": 0, "greedy_decode": 0}
    for name in calls:
        method = getattr(model, name)

        def counted(*args, name=name, method=method):
            calls[name] += 1
            return method(*args)

        setattr(model, name, counted)
    subsets = [(1, 2), (1, 3), (2, 4)]
    decoded = DecoderStack(model).evaluate([b, b], subsets)
    assert calls == {"encode": 2, "greedy_decode": 6}  # the encoder once per batch
    assert [r.kept for r in decoded] == subsets
    # the teacher-forced loss alone: the same losses, no decoding, no error rates
    loss_only = DecoderStack(model).evaluate([b, b], subsets, metric="loss")
    assert calls == {"encode": 4, "greedy_decode": 6}
    assert [r.loss for r in loss_only] == [r.loss for r in decoded]
    assert all(math.isnan(r.cer) and math.isnan(r.wer) and r.num_utts == 6 for r in loss_only)
    assert not DecoderPass(model, decode=False).decode


def test_distil_whisper_rule_keeps_first_last_and_spaced_layers():
    assert distil_whisper(8, 4) == (2, 4, 6, 7)  # keeps 1 3 5 8
    assert distil_whisper(6, 3) == (2, 4, 5)  # keeps 1 3 6
    assert distil_whisper(32, 30) == tuple(range(2, 32))  # keeps 1 and 32 (distil-large-v2)
    assert distil_whisper(4, 3) == (1, 2, 3)  # one layer: the last
    assert "distil_whisper" in rules_for(["all"], "decoder", False)
    assert "distil_whisper" not in rules_for(["all"], "encoder", True)
    with pytest.raises(
        InputError, match="--rules distil_whisper: a rule for the decoder stack, not the encoder"
    ):
        rules_for(["distil_whisper"], "encoder", False)


def _fake_stage_6(exp: ExpDir, model_dir: str, num_layers: int) -> None:
    """What stage 7 reads of stages 4-6: the dump record (GLP's search.json for P = 1)."""
    exp.dump.mkdir(parents=True)
    info = {"num_layers": num_layers, "model_dir": model_dir, "interctc_layers": []}
    (exp.dump / DUMP_INFO).write_text(json.dumps(info))
    search = {"num_prune": 1, "best_layers": [2], "seconds": 1.0, "evaluations": 3, "metric": "cer"}
    exp.search_result("glp", 1).parent.mkdir(parents=True)
    exp.search_result("glp", 1).write_text(json.dumps(search))


def test_both_stacks_in_one_table(tmp_path):
    root = ExpDir(tmp_path / "exp")
    _fake_stage_6(root, "exp", 3)
    _fake_stage_6(root.stack("decoder"), "exp/search/glp_prune1/pruned", 4)
    s = CompareSettings(
        exp_dir=root.root,
        stack=["encoder", "decoder"],
        num_prune=["1"],
        decoder_num_prune=["2"],
        search_methods=["glp"],
        rules=["drop_top", "distil_whisper"],
        random_seeds=1,
    )
    with pytest.raises(FileNotFoundError, match="glp_prune2/search.json: not found"):
        list_methods(s)
    s.decoder_num_prune = ["1"]
    methods = list_methods(s).methods
    rows = [(m.stack, m.name, m.num_prune, m.pruned, m.model_dir) for m in methods]
    assert rows == [
        ("encoder", "unpruned", 0, [], "exp"),
        ("encoder", "glp", 1, [2], "exp"),
        ("encoder", "drop_top", 1, [3], "exp"),
        ("decoder", "glp", 1, [2], "exp/search/glp_prune1/pruned"),
        ("decoder", "drop_top", 1, [4], "exp/search/glp_prune1/pruned"),
        ("decoder", "distil_whisper", 1, [3], "exp/search/glp_prune1/pruned"),
    ]
    assert len(MethodList(methods).unique()) == 6  # the same layers of two stacks differ
    s.stack = ["encoder"]
    with pytest.raises(
        InputError, match="--rules distil_whisper: a rule for the decoder stack, not the encoder"
    ):
        list_methods(s)
    s.stack = ["decoder", "encoder"]
    with pytest.raises(InputError, match="expected encoder, decoder or 'encoder decoder'"):
        list_methods(s)


def test_the_table_says_which_stack_a_row_pruned():
    methods = MethodList(
        [
            Method("unpruned", 0, [], "m"),
            Method("comflp", 2, [3, 4], "m", stack="decoder"),
            Method("comflp", 2, [1, 2], "m"),
        ]
    )
    scores = {m.key: {"test": {"wer": 10.0 + i, "cer": 5.0}} for i, m in enumerate(methods.methods)}
    params = {m.key: 1000 for m in methods.methods}
    rtf = {m.key: 0.1 for m in methods.methods}
    rows = build_rows(methods, scores, params, rtf)
    assert [(r.stack, r.method, r.pruned) for r in rows] == [
        ("encoder", "unpruned", "-"),
        ("encoder", "comflp", "1 2"),
        ("decoder", "comflp", "3 4"),
    ]
    assert [r.label for r in rows] == ["unpruned", "comflp", "comflp (decoder)"]
    table = methods_table(rows, ["test"]).splitlines()
    assert table[0].startswith("| method | stack | P | pruned layers | test WER |")
    assert table[4].startswith("| comflp | decoder | 2 | 3 4 | 11.00 |")
    encoder_only = methods_table(rows[:2], ["test"]).splitlines()
    assert encoder_only[0].startswith("| method | P | pruned layers |")


def test_save_model_round_trip_keeps_decoder_provenance(tmp_path):
    model = prune_decoder_layers(aed().asr, [1])
    save_model(model, ExperimentConfig(model=model.cfg), tmp_path)
    from comflp.asr.checkpoint import load_model

    assert load_model(tmp_path).cfg.decoder_kept_layers == [2, 3, 4]


def test_search_quality_ranks_the_teacher_forced_loss_against_decoding(tmp_path):
    model, b = aed(), batch()
    stack = DecoderStack(model)
    proposals = [(1,), (2,), (3,), (4,)]
    cache = CerCache(tmp_path / "cers.json", {"stack": "decoder"})
    cer = proposal_cers(stack, [b], proposals, cache)
    uniform = np.ones(4, dtype=bool)
    tf = teacher_forced_quality(stack, [b], proposals, cer, uniform, cache)
    kept = [(2, 3, 4), (1, 3, 4), (1, 2, 4), (1, 2, 3)]
    results = stack.evaluate([b], kept)
    losses = [r.loss for r in results]
    memory = model.encode(b)  # each proposal decoded and scored here, not by the evaluator
    decoded = [[model.decode_ids(h) for h in model.greedy_decode(memory, k)] for k in kept]
    assert cer.tolist() == pytest.approx([error_stats(b["texts"], t, "char").err for t in decoded])
    assert tf["spearman"] == pytest.approx(spearman([-x for x in losses], cer))
    assert tf["best_layers"] == list(proposals[int(np.argmin(losses))])
    assert (
        tf["seconds"]
        == CerCache(tmp_path / "cers.json", {"stack": "decoder"}).data["fine"][
            "teacher_forced_seconds"
        ]
    )
    assert teacher_forced_quality(EncoderStack(model), [b], proposals, cer, uniform, cache) is None


@torch.no_grad()
def test_decoder_measures_against_a_per_utterance_computation():
    model, b = aed(), batch()
    (full,) = full_decoder(model, [b])
    every = [1, 2, 3, 4]
    assert measure(model, [full], every, margin=2) == {
        "kl_reference": pytest.approx(0.0, abs=1e-6),
        "kl_hypothesis": pytest.approx(0.0, abs=1e-6),
        "short_decode": 0.0,
    }
    kept = [1, 3]
    got = measure(model, [full], kept, margin=2)
    # one utterance at a time, no padding: KL(full || pruned) at each predicted position
    memory = model.encode(b)
    sums = {"kl_reference": [0.0, 0], "kl_hypothesis": [0.0, 0]}
    for i, hyp in enumerate(full.hypotheses):
        one = Hidden(memory.x[i : i + 1], memory.lengths[i : i + 1])
        refs = {
            "kl_reference": b["targets"][i, : b["target_lens"][i]].tolist(),
            "kl_hypothesis": hyp,
        }
        for name, tokens in refs.items():
            inputs = torch.tensor([model.decoder_prefix() + tokens])
            logp = {}
            for layers in (every, kept):
                h = model.decoder_embed(one, inputs, torch.tensor([inputs.size(1)]))
                logp[len(layers)] = model.decoder_readout(model.decoder_forward_layers(h, layers))
            start = len(model.decoder_prefix()) - 1
            p, q = logp[4][0, start:], logp[2][0, start:]  # the tokens and <eos>
            sums[name][0] += float((p.exp() * (p - q)).sum())
            sums[name][1] += len(tokens) + 1
    for name, (total, count) in sums.items():
        assert got[name] == pytest.approx(total / count, rel=1e-4) and got[name] > 0
    # the short decode: the uncapped greedy hypotheses cut at the full one's length + 2 + 1
    free = model.greedy_decode(memory, kept)
    cut = [h[: len(f) + 3] for h, f in zip(free, full.hypotheses, strict=True)]
    capped = torch.tensor([len(f) + 3 for f in full.hypotheses])
    assert model.greedy_decode(memory, kept, max_tokens=capped) == cut
    texts = [model.decode_ids(h) for h in full.hypotheses]
    want = error_stats(texts, [model.decode_ids(h) for h in cut], "char").err
    assert got["short_decode"] == pytest.approx(want)
    q = ranking_quality(np.array([3.0, 1.0, 2.0]), np.array([30.0, 10.0, 25.0]))
    assert q == {"spearman": pytest.approx(-1.0), "top1_cer": 10.0, "oracle_rank": 1}
    q = ranking_quality(np.array([1.0, 3.0, 2.0]), np.array([30.0, 10.0, 25.0]))
    assert q["oracle_rank"] == 3 and q["top1_cer"] == 30.0


def _decoder_study(num_layers: int, spearmans: dict[int, float]) -> dict:
    """A decoder_scores.json of P -> every measure's Spearman (oracle rank 1)."""
    names = ("kl_reference", "kl_hypothesis", "short_decode", "teacher_forced_nll")
    results = [
        {
            "num_prune": p,
            "oracle_cer": 10.0 * p,
            "rows": [{"layers": [k]} for k in range(p + 1)],
            "quality": {m: {"spearman": rho, "top1_cer": 1.0, "oracle_rank": 1} for m in names},
        }
        for p, rho in spearmans.items()
    ]
    return {"model_dir": f"m{num_layers}", "num_layers": num_layers, "results": results}


def test_decoder_summary_takes_half_the_layers_and_the_median(tmp_path):
    studies = {"four": _decoder_study(4, {1: 0.9, 2: -0.2}), "six": _decoder_study(6, {3: -0.8})}
    studies["eight"] = _decoder_study(8, {4: -0.6})
    for label, study in studies.items():
        (tmp_path / label).mkdir()
        (tmp_path / label / "decoder_scores.json").write_text(json.dumps(study))
    out = tmp_path / "summary.md"
    items = [f"{label}={tmp_path / label}" for label in studies]
    summarize_decoders(DecoderSummarySettings(studies=items, output=out))
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [m["num_prune"] for m in summary["models"].values()] == [2, 3, 4]
    assert summary["median_spearman"]["short_decode"] == pytest.approx(-0.6)
    assert "| median | | | | | -0.600 | -0.600 | -0.600 | -0.600 |" in out.read_text()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "decoder_scores.json").write_text(json.dumps(_decoder_study(6, {2: 0})))
    with pytest.raises(InputError, match="no P = 3 .half of its 6 decoder layers"):
        summarize_decoders(DecoderSummarySettings(studies=[f"odd={tmp_path / 'odd'}"], output=out))


def test_stages_4_to_7_and_the_study_on_a_native_decoder(pipeline):
    """run.sh --stack decoder on a tiny native AED (3 decoder layers), then the search-quality
    study of its decoder."""
    work = pipeline["workdir"]
    fbank = "data/fbank/cuts_{}.jsonl.gz"
    run_cmd(
        [PYTHON, REPO / "bin/train.py", "--train_config", REPO / "conf/train_tiny.yaml"]
        + ["--exp_dir", "exp/aed", "--train_cuts", fbank.format("train-clean-100")]
        + ["--dev_cuts", fbank.format("dev-clean"), "--lang_dir", "data/lang_bpe48"]
        + [
            "--cmvn",
            "data/fbank/cmvn.json",
            "--set",
            "model.decoder_layers=3",
            "train.num_epochs=1",
        ],
        cwd=work,
    )
    run_sh(
        work,
        *("--stage", "4", "--stop_stage", "7", "--exp_dir", "exp/aed", "--stack", "decoder"),
        *("--num_prune", "1", "--decoding_method", "attention_greedy_search", "--nj", "1"),
        *("--decode_nj", "1", "--calib_num_utts", "16", "--fine_num_utts", "8"),
        *(
            "--scores",
            "dc residual_sum consensus",
            "--score_conf",
            "dc.batch_size=8",
            "--random_seeds",
            "1",
        ),
    )
    exp = ExpDir(work / "exp/aed")
    info = json.loads((exp.stack("decoder").dump / DUMP_INFO).read_text())
    assert (info["stack"], info["num_layers"], info["interctc_layers"]) == ("decoder", 3, [])
    for method in ("comflp", "glp", "oracle"):
        pruned = NativeModel.load(exp.stack("decoder").pruned_model(method, 1))
        search = json.loads(exp.stack("decoder").search_result(method, 1).read_text())
        kept = [k for k in (1, 2, 3) if k not in search["best_layers"]]
        assert pruned.num_decoder_layers == 2 and pruned.asr.cfg.decoder_kept_layers == kept
    rows = json.loads((exp.compare / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows if r["stack"] == "decoder"} >= {"comflp", "glp", "oracle"}
    assert "| distil_whisper | decoder | 1 | 2 |" in exp.results_md.read_text()
    run_cmd(
        [PYTHON, REPO / "bin/search_quality.py", "--exp_dir", "exp/aed", "--stack", "decoder"]
        + ["--num_prune", "1", "--output_dir", "exp/aed_quality", "--scores", "dc", "residual_sum"]
        + ["--calib_cuts", fbank.format("train-clean-100"), "--calib_num_utts", "8"]
        + ["--calib_sizes", "8", "--reference_num_utts", "8", "--dev_num_utts", "8"]
        + ["--poolings", "frames"],
        cwd=work,
    )
    (result,) = json.loads((work / "exp/aed_quality/quality.json").read_text())["results"]
    glp = json.loads(exp.stack("decoder").search_result("glp", 1).read_text())
    assert result["glp"]["layers"] == glp["best_layers"]  # the decoder's stage 6, found
    assert result["num_proposals"] == 3 and result["teacher_forced"]["seconds"] > 0
    assert (
        "Teacher-forced NLL as the metric"
        in (work / "exp/aed_quality/SEARCH_QUALITY.md").read_text()
    )
    # the decoder scores beside it: the study's CERs reused (its cache), the same NLL ranking
    run_cmd(
        [PYTHON, REPO / "bin/decoder_scores.py", "--exp_dir", "exp/aed", "--stack", "decoder"]
        + ["--num_prune", "1", "--output_dir", "exp/aed_quality", "--dev_num_utts", "8"]
        + ["--calib_cuts", fbank.format("train-clean-100"), "--calib_num_utts", "4"],
        cwd=work,
    )
    (scored,) = json.loads((work / "exp/aed_quality/decoder_scores.json").read_text())["results"]
    cers = {tuple(p["layers"]): p["cer"] for p in result["proposals"]}
    assert {tuple(r["layers"]): r["cer"] for r in scored["rows"]} == cers
    nll = scored["quality"]["teacher_forced_nll"]["spearman"]  # NaN where every CER is the same
    assert nll == pytest.approx(result["teacher_forced"]["spearman"], nan_ok=True)
    assert math.isnan(nll) == (len(set(cers.values())) == 1)
    assert all(r[m] >= 0 for r in scored["rows"] for m in ("kl_reference", "kl_hypothesis"))
    assert "| short_decode |" in (work / "exp/aed_quality/DECODER_SCORES.md").read_text()
    # across models (one here): the measures and, from the study beside them, the default's
    run_cmd(
        [PYTHON, REPO / "bin/decoder_scores_summary.py", "--studies", "aed=exp/aed_quality"]
        + ["--output", "exp/decoders.md"],
        cwd=work,
    )
    (row,) = json.loads((work / "exp/decoders.json").read_text())["models"].values()
    assert (row["num_layers"], row["num_prune"], row["proposals"]) == (3, 1, 3)
    assert row["oracle_cer"] == min(cers.values())
    assert row["pipeline"]["cer"] >= row["oracle_cer"]
    assert row["consensus"]["name"] == "consensus of residual_sum+dc (over the study's proposals)"
    assert math.isnan(row["consensus"]["spearman"]) == (len(set(cers.values())) == 1)
    assert row["measures"]["short_decode"] == scored["quality"]["short_decode"]
