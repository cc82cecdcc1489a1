"""Stages 4-6: layer dump, correlation matrix, coarse + fine search, pruned model output."""

import json
import shutil

import kaldiio
import numpy as np
import pytest
import torch

from comflp.adapters.native import NativeModel
from comflp.asr.checkpoint import load_model
from comflp.asr.config import ModelConfig
from comflp.asr.ctc import ctc_loss
from comflp.asr.data import eval_loader, load_cuts, load_eval_batches
from comflp.asr.features import load_cmvn
from comflp.asr.model import ASRModel
from comflp.asr.tokenizer import Tokenizer
from comflp.prune.correlation import correlation_matrix
from comflp.prune.dump import dump_layers, load_layer_feats
from comflp.prune.evaluator import evaluate_subsets, layer_evaluations
from comflp.prune.metric_search import best_row, fine_search
from comflp.prune.rules import drop_top
from comflp.prune.scores.consensus import ConsensusScorer
from comflp.prune.scores.residual_sum import ResidualSumScore
from comflp.prune.search import as_scorer, coarse_search
from comflp.prune.stacks import EncoderStack

from .conftest import PYTHON, REPO, assert_drawn, run_cmd


def _tiny_model(tiny_data, num_layers=4) -> NativeModel:
    """A random comflp model with the tiny corpus' tokenizer and CMVN."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=49,
        d_model=16,
        num_heads=2,
        ffn_dim=32,
        num_layers=num_layers,
        subsampling_channels=4,
        interctc_layers=[2],
        interctc_weight=0.3,
    )
    tokenizer = Tokenizer(tiny_data["lang_dir"] / "tokenizer.model")
    cmvn = load_cmvn(tiny_data["cmvn"])
    return NativeModel(ASRModel(cfg).eval(), tokenizer, cmvn, tiny_data["lang_dir"])


@pytest.fixture
def batches(tiny_data):
    """A model factory and the tiny dev set's batches."""
    data = load_eval_batches(_tiny_model(tiny_data), tiny_data["dev"], max_duration=12)
    return lambda num_layers=4: _tiny_model(tiny_data, num_layers), data


def _manual_layer_outputs(model: ASRModel, batch):
    """Every layer index's output for a batch, calling the layer modules one by one."""
    emb = model.encoder.embed(batch["feats"], batch["feat_lens"])
    outs = [emb.x]
    for layer in model.encoder.layers:
        outs.append(layer(outs[-1], emb.mask))
    return outs, emb.lengths


def test_length_sorted_batches_pad_less_and_give_the_same_rows_and_cers(tmp_path, tiny_data):
    model = _tiny_model(tiny_data)
    cuts = load_cuts(tiny_data["dev"])
    by_length = load_eval_batches(model, cuts, max_duration=12)
    in_order = list(eval_loader(cuts, model.dataset(), max_duration=12))
    longest = [int(b["feat_lens"].max()) for b in by_length]
    assert longest == sorted(longest, reverse=True)
    assert sorted(u for b in by_length for u in b["ids"]) == sorted(cuts.ids)

    def padded(batches):
        return sum(int(b["feat_lens"].max()) * len(b["ids"]) for b in batches)

    assert padded(by_length) < padded(in_order)
    stack = EncoderStack(model)
    dump_layers(stack, by_length, tmp_path / "by_length", "frames", frames_per_utt=3)
    dump_layers(stack, in_order, tmp_path / "in_order", "frames", frames_per_utt=3)
    for k in range(stack.num_layers + 1):
        a, b = (
            kaldiio.load_scp(str(tmp_path / d / f"layer{k:02d}.scp"))
            for d in ("by_length", "in_order")
        )
        for utt in cuts.ids:
            np.testing.assert_allclose(a[utt], b[utt], atol=1e-4)
    subsets = [[1, 2, 3, 4], [1, 3], [2]]
    sorted_cers, manifest_cers = (
        [(r.cer, r.wer) for r in stack.evaluate(b, subsets)] for b in (by_length, in_order)
    )
    assert sorted_cers == manifest_cers


def test_dump_mean_pooling_matches_a_manual_forward(tmp_path, batches):
    make, data = batches
    model = make()
    info = dump_layers(EncoderStack(model), data, tmp_path / "dump", pooling="mean")
    assert info["num_utts"] == 8 and info["num_layers"] == 4 and info["num_rows"] == 8
    feats = load_layer_feats(tmp_path / "dump")
    assert len(feats) == 5 and all(f.shape == (8, 16) for f in feats)
    row = 0
    with torch.no_grad():
        for batch in data:
            outs, lens = _manual_layer_outputs(model.asr, batch)
            for i in range(len(batch["ids"])):
                for k, h in enumerate(outs):
                    n = int(lens[i])
                    assert np.allclose(feats[k][row], h[i, :n].mean(0).numpy(), atol=1e-5)
                    # padding frames are excluded: differs from the mean over the padded length
                    if n < h.size(1):
                        assert not np.allclose(feats[k][row], h[i].mean(0).numpy(), atol=1e-5)
                row += 1
    # Kaldi tools can read it: one key per utterance in each layer's scp.
    table = kaldiio.load_scp(str(tmp_path / "dump/layer03.scp"))
    assert sorted(table) == sorted(info["utts"])
    assert not (tmp_path / "dump.tmp").exists()


def test_dump_frame_sampling_keeps_the_same_frames_at_every_layer(tmp_path, batches):
    make, data = batches
    model = make()
    stack = EncoderStack(model)
    dump_layers(stack, data, tmp_path / "all", pooling="frames", frames_per_utt=0)
    dump_layers(stack, data, tmp_path / "some", pooling="frames", frames_per_utt=3, seed=5)
    every = [kaldiio.load_scp(str(tmp_path / f"all/layer{k:02d}.scp")) for k in range(5)]
    some = [kaldiio.load_scp(str(tmp_path / f"some/layer{k:02d}.scp")) for k in range(5)]
    for utt in every[0]:
        frames = every[0][utt]
        picked = some[0][utt]
        assert picked.shape == (min(3, len(frames)), 16)
        rows = [int(np.argmin(np.abs(frames - r).sum(1))) for r in picked]
        for k in range(1, 5):  # the same frame indices at every layer
            assert np.allclose(some[k][utt], every[k][utt][rows], atol=1e-6)
    assert load_layer_feats(tmp_path / "some")[0].shape[0] == sum(
        min(3, len(v)) for v in every[0].values()
    )


def test_prefix_cache_gives_identical_results_with_fewer_layer_passes(batches):
    make, data = batches
    model = make(num_layers=6)
    subsets = [(1, 2, 4), (1, 2, 5), (1, 3, 4), (2, 3, 6), (1, 2, 4)]
    cached = evaluate_subsets(model, data, subsets, prefix_cache=True)
    plain = evaluate_subsets(model, data, subsets, prefix_cache=False)
    for a, b in zip(cached, plain):
        assert (a.kept, a.cer, a.wer) == (b.kept, b.cer, b.wer)
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
    # trie nodes: 1, 1-2, 1-2-4, 1-2-5, 1-3, 1-3-4, 2, 2-3, 2-3-6; without it 15 layer passes
    assert layer_evaluations(subsets, True) == 9
    assert layer_evaluations(subsets, False) == 15
    # Each subset equals its physically pruned model.
    pruned = model.prune([3, 5, 6])
    with torch.no_grad():
        batch = data[0]
        log_probs, lens = pruned.asr.ctc_log_probs(batch["feats"], batch["feat_lens"])
    single = evaluate_subsets(model, [batch], [(1, 2, 4)])[0]
    loss = ctc_loss(log_probs, lens, batch["targets"], batch["target_lens"]).item()
    assert single.loss == pytest.approx(loss / len(batch["ids"]), rel=1e-5)
    assert single.num_utts == len(batch["ids"])


def test_fine_search_evaluates_each_distinct_proposal_once_as_if_alone(batches):
    make, data = batches
    stack = EncoderStack(make(num_layers=6))
    merged = [(1, 2), (5, 6), (1, 2), (3, 4), (6, 5)]  # two scores' top lists, overlapping
    calls = {"transcribe": 0, "forward_layers": 0}
    for name in calls:  # count the real model's readouts and layer passes
        real = getattr(stack.model, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        setattr(stack.model, name, counted)
    rows, seconds = fine_search(stack, data, merged, metric="loss")
    assert [r["layers"] for r in rows] == [[1, 2], [5, 6], [3, 4]]
    kept = [(3, 4, 5, 6), (1, 2, 3, 4), (1, 2, 5, 6)]
    assert calls["transcribe"] == 3 * len(data)  # each distinct proposal read out once
    assert calls["forward_layers"] == layer_evaluations(kept, True) * len(data) == 10 * len(data)
    for name in calls:
        delattr(stack.model, name)
    assert rows[0]["kept"] == [3, 4, 5, 6] and seconds > 0
    for row in rows:  # the shared prefix cache changes nothing: the same as evaluated alone
        alone = fine_search(stack, data, [tuple(row["layers"])], metric="loss")[0][0]
        assert (alone["cer"], alone["wer"]) == (row["cer"], row["wer"])
        assert alone["loss"] == pytest.approx(row["loss"], rel=1e-6)
    losses = [r["loss"] for r in rows]
    assert len(set(losses)) == 3 and best_row(rows) == int(np.argmin(losses))


def test_stages_4_to_6_end_to_end(searched, monkeypatch):
    exp = searched["exp_dir"]
    assert "Stage 6" in searched["log"]
    info = json.loads((exp / "dump/info.json").read_text())
    assert info["num_utts"] == 24 and info["num_layers"] == 4 and info["stack"] == "encoder"
    assert info["interctc_layers"] == [2]
    monkeypatch.chdir(searched["workdir"])  # the scp files hold paths relative to the recipe
    feats = load_layer_feats(exp / "dump")
    assert info["pooling"] == "frames" and feats[0].shape[0] == info["num_rows"] > 24
    options = {"dc": {"batch_size": 8}, "svcca": {"threshold": 0.99}, "cka": {}}
    matrices = {}
    for name, opts in options.items():
        m = np.load(exp / f"scores/{name}/matrix.npy")
        np.testing.assert_allclose(m, correlation_matrix(feats, name, **opts), rtol=1e-12)
        assert_drawn(exp / f"scores/{name}/heatmap.png")
        settings = json.loads((exp / f"scores/{name}/settings.json").read_text())
        assert settings["score"] == name and settings["options"] == opts
        matrices[name] = m
    stats = ResidualSumScore.read(exp / "scores/residual_sum/stats.npz")
    np.testing.assert_allclose(stats.gram, ResidualSumScore.build(feats).gram, rtol=1e-12)
    assert_drawn(exp / "scores/residual_sum/heatmap.png")
    scorers = {**matrices, "residual_sum": stats}
    for p in (1, 2):
        out = exp / f"search/comflp_prune{p}"
        search = json.loads((out / "search.json").read_text())
        merged = []
        for name, source in scorers.items():
            want = [x.to_dict() for x in coarse_search(source, p)]
            ranking = search["rankings"][name]
            assert [x["layers"] for x in ranking] == [x["layers"] for x in want]
            np.testing.assert_allclose([x["score"] for x in ranking], [x["score"] for x in want])
            merged += [tuple(x["layers"]) for x in want]
        consensus = ConsensusScorer([as_scorer(source) for source in scorers.values()])
        want = coarse_search(consensus, p)
        ranking = search["rankings"]["consensus"]
        assert [x["layers"] for x in ranking] == [list(x.layers) for x in want]
        merged += [x.layers for x in want]
        merged.append(drop_top(info["num_layers"], p))  # the top-P proposal joins them
        fine = [r for r in search["candidates"] if "refine_round" not in r]
        distinct = {tuple(r["layers"]) for r in fine}
        assert distinct == set(merged) and len(fine) == len(distinct)
        # --refine auto: the local search follows only where the consensus's evaluated top K
        # does not order its dev metric (Spearman 0 or above), and adds exactly its own rows
        refined = search["refine"]
        wrong = refined["spearman"] is not None and refined["spearman"] >= 0
        assert refined["judged"] == "consensus" and refined["climbed"] == wrong
        assert len(search["candidates"]) - len(fine) == refined.get("evaluations", 0)
        metrics = [r["metric"] for r in search["candidates"]]
        assert search["best"] == metrics.index(min(metrics))
        assert search["best_layers"] == search["candidates"][search["best"]]["layers"]
        parts = search["dump_seconds"] + sum(search["score_seconds"].values())
        parts += sum(search["coarse_seconds"].values()) + search["fine_seconds"]
        parts += refined["seconds"]
        assert search["seconds"] == pytest.approx(parts, rel=1e-12)
        pruned = load_model(out / "pruned")
        assert pruned.cfg.num_layers == 4 - p
        assert pruned.cfg.kept_layers == [k for k in range(1, 5) if k not in search["best_layers"]]


def _search(*args, check=False):
    return run_cmd([PYTHON, REPO / "bin/search.py", *args], check=check)


def test_search_refuses_a_matrix_that_does_not_fit_the_model(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(pipeline["workdir"])
    matrix = tmp_path / "m.npy"
    np.save(matrix, np.eye(13))
    out = tmp_path / "out/proposals.json"
    proc = _search(
        "--matrix",
        matrix,
        "--num_prune",
        "2",
        "--output",
        out,
        "--exp_dir",
        pipeline["exp_dir"],
        "--dev_cuts",
        "data/fbank/cuts_dev-clean.jsonl.gz",
    )
    assert proc.returncode == 1 and "expected 5 x 5" in proc.stderr, proc.stderr
    assert not out.parent.exists()
    proc = _search(
        "--matrix",
        matrix,
        "--num_prune",
        "2",
        "--output",
        out,
        "--exp_dir",
        tmp_path,
        "--dev_cuts",
        "data/fbank/cuts_dev-clean.jsonl.gz",
    )
    assert proc.returncode == 1 and "no config.yaml" in proc.stderr
    proc = _search(
        "--matrix", matrix, "--num_prune", "2", "--output", out, "--exp_dir", pipeline["exp_dir"]
    )
    assert proc.returncode == 1 and "both --exp_dir and --dev_cuts" in proc.stderr


def test_residual_sum_refuses_a_mean_pooled_dump_and_searches_from_its_stats(searched, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(searched["exp_dir"] / "dump", exp / "dump")
    info = json.loads((exp / "dump/info.json").read_text())
    (exp / "dump/info.json").write_text(json.dumps({**info, "pooling": "mean"}))
    proc = run_cmd(
        [PYTHON, REPO / "bin/scores.py", "--exp_dir", exp, "--scores", "dc residual_sum"],
        check=False,
    )
    assert proc.returncode == 1 and "is mean-pooled; the score needs frames" in proc.stderr
    assert not (exp / "scores").exists()
    stats = searched["exp_dir"] / "scores/residual_sum/stats.npz"
    out = tmp_path / "proposals.json"
    proc = _search("--matrix", stats, "--num_prune", "2", "--mode", "exhaustive", "--output", out)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(out.read_text())
    assert len(found) == 6 and found[0]["score"] == max(x["score"] for x in found)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scores", "pearson"], "--scores: unknown pearson; choose from angular, change, cka"),
        (["--exp_dir", "nowhere"], "not found (run stage 4, the layer dump)"),
    ],
)
def test_scores_cli_errors(searched, tmp_path, args, message):
    base = {"--exp_dir": str(searched["exp_dir"]), "--scores": "dc"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    before = sorted((searched["exp_dir"] / "scores").iterdir())
    proc = run_cmd(
        [PYTHON, REPO / "bin/scores.py", *[x for kv in base.items() for x in kv]],
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # the command line, the error
    assert sorted((searched["exp_dir"] / "scores").iterdir()) == before
    assert not (tmp_path / "nowhere").exists()
