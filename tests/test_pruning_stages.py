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
from comflp.asr.data import load_eval_batches
from comflp.asr.features import load_cmvn
from comflp.asr.model import ASRModel
from comflp.asr.tokenizer import Tokenizer
from comflp.prune.dump import dump_layers, load_layer_feats
from comflp.prune.evaluator import evaluate_subsets, layer_evaluations
from comflp.prune.metric_search import fine_search
from comflp.prune.residual_sum import ResidualSumScorer
from comflp.prune.search import Proposal

from .conftest import PYTHON, REPO, run_cmd


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


def test_dump_mean_pooling_matches_a_manual_forward(tmp_path, batches):
    make, data = batches
    model = make()
    info = dump_layers(model, data, tmp_path / "dump", pooling="mean")
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
    dump_layers(model, data, tmp_path / "all", pooling="frames")
    dump_layers(model, data, tmp_path / "some", pooling="frames", frames_per_utt=3, seed=5)
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
        assert a.ctc_loss == pytest.approx(b.ctc_loss, rel=1e-6)
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
    assert single.ctc_loss == pytest.approx(loss / len(batch["ids"]), rel=1e-5)
    assert single.num_utts == len(batch["ids"])


def test_fine_search_picks_the_lowest_metric_and_breaks_ties_by_coarse_rank(batches):
    make, data = batches
    model = make(num_layers=6)
    proposals = [Proposal((1, 2), 0.9), Proposal((5, 6), 0.8), Proposal((3, 4), 0.7)]
    result = fine_search(model, data, proposals, metric="ctc_loss")
    losses = [r["ctc_loss"] for r in result.candidates]
    assert result.best == int(np.argmin(losses))
    assert [r["coarse_rank"] for r in result.candidates] == [1, 2, 3]
    assert result.candidates[0]["kept"] == [3, 4, 5, 6]
    assert result.candidates[0]["blocks"] == [[1, 2]]
    # A random model emits no tokens: every CER is 100, so the tie goes to coarse rank 1.
    by_cer = fine_search(model, data, proposals, metric="cer")
    assert len({r["cer"] for r in by_cer.candidates}) > 1 or by_cer.best == 0


def test_stages_4_to_6_end_to_end(searched, monkeypatch):
    exp = searched["exp_dir"]
    assert "Stage 6" in searched["log"]
    info = json.loads((exp / "dump/info.json").read_text())
    assert info["num_utts"] == 24 and info["num_layers"] == 4
    for measure in ("dc", "svcca", "cka"):
        m = np.load(exp / f"correlation/{measure}/matrix.npy")
        assert m.shape == (5, 5) and np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
        assert (exp / f"correlation/{measure}/heatmap.png").stat().st_size > 1000
        settings = json.loads((exp / f"correlation/{measure}/settings.json").read_text())
        assert settings["measure"] == measure
        for p in (1, 2):
            out = exp / f"search/comflp_{measure}_prune{p}"
            proposals = json.loads((out / "proposals.json").read_text())
            assert all(len(x["layers"]) == p for x in proposals)
            assert [x["score"] for x in proposals] == sorted(
                (x["score"] for x in proposals), reverse=True
            )
            fine = json.loads((out / "search.json").read_text())
            assert len(fine["candidates"]) == len(proposals)
            assert fine["best_layers"] == fine["candidates"][fine["best"]]["layers"]
            pruned = load_model(out / "pruned")
            assert pruned.cfg.num_layers == 4 - p
            assert pruned.cfg.kept_layers == [
                k for k in range(1, 5) if k not in fine["best_layers"]
            ]
    # residual_sum: the scorer's statistics of the frame-pooled dump, then the same searches
    monkeypatch.chdir(searched["workdir"])  # the scp files hold paths relative to the recipe
    feats = load_layer_feats(exp / "dump")
    assert info["pooling"] == "frames" and feats[0].shape[0] == info["num_rows"] > 24
    stats = ResidualSumScorer.load(exp / "correlation/residual_sum/stats.npz")
    want = ResidualSumScorer.from_layer_feats(feats)
    np.testing.assert_allclose(stats.gram, want.gram, rtol=1e-12)
    assert (exp / "correlation/residual_sum/heatmap.png").stat().st_size > 1000
    for p in (1, 2):
        out = exp / f"search/comflp_residual_sum_prune{p}"
        proposals = json.loads((out / "proposals.json").read_text())
        scores = stats.scores(np.array([x["layers"] for x in proposals]))
        np.testing.assert_allclose([x["score"] for x in proposals], scores, rtol=1e-12)
        assert list(scores) == sorted(scores, reverse=True)
        fine = json.loads((out / "search.json").read_text())
        assert load_model(out / "pruned").cfg.num_layers == 4 - p
        assert fine["best_layers"] in [x["layers"] for x in proposals]
    # dc with CoMFLP's batching: 24 utterances in batches of 8 -> settings recorded
    assert json.loads((exp / "correlation/dc/settings.json").read_text())["options"] == {
        "batch_size": 8
    }


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
    assert proc.returncode == 1 and "expected 5 x 5" in proc.stderr
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
        [PYTHON, REPO / "bin/correlation.py", "--exp_dir", exp, "--measure", "residual_sum"],
        check=False,
    )
    assert proc.returncode == 1 and "is mean-pooled; the score needs frames" in proc.stderr
    assert not (exp / "correlation").exists()
    stats = searched["exp_dir"] / "correlation/residual_sum/stats.npz"
    out = tmp_path / "proposals.json"
    proc = _search("--matrix", stats, "--num_prune", "2", "--mode", "exhaustive", "--output", out)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(out.read_text())
    assert len(found) == 6 and found[0]["score"] == max(x["score"] for x in found)


@pytest.mark.parametrize(
    "args, message",
    [(["--measure", "pearson"], "unknown measure"), (["--exp_dir", "nowhere"], "run stage 4")],
)
def test_correlation_cli_errors(searched, tmp_path, args, message):
    base = {"--exp_dir": str(searched["exp_dir"]), "--measure": "dc"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    before = sorted((searched["exp_dir"] / "correlation").iterdir())
    proc = run_cmd(
        [PYTHON, REPO / "bin/correlation.py", *[x for kv in base.items() for x in kv]],
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and message in proc.stderr
    assert sorted((searched["exp_dir"] / "correlation").iterdir()) == before
    assert not (tmp_path / "nowhere").exists()
