"""The search-quality study: rank statistics, top-K quality, variants, proposals, the CER cache,
block aggregations, and bin/search_quality.py end to end on the tiny baseline."""

import json
import math
from itertools import combinations
from types import SimpleNamespace

import kaldiio
import numpy as np
import pytest
from scipy import stats

from comflp.expdir import DUMP_INFO, ExpDir
from comflp.prune.correlation import correlation_matrix
from comflp.prune.dump import layer_file
from comflp.prune.evaluator import SubsetResult
from comflp.prune.ranks import average_ranks, kendall_tau, spearman
from comflp.prune.search import BlockScorer, coarse_search, score_proposal, score_proposals
from comflp.quality.stage import reuse_oracle
from comflp.quality.study import (
    CerCache,
    StudyFeatures,
    Variant,
    best_of_top_k_regret,
    proposal_cers,
    proposal_set,
    smallest_matching_size,
    study_variants,
    top1_percentile,
    variant_quality,
)

from .conftest import PYTHON, REPO, run_cmd

# ----------------------------------------------------------------------------- rank statistics


@pytest.mark.parametrize("seed", range(6))
def test_spearman_and_kendall_equal_scipy_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    x = rng.integers(0, 8, size=n).astype(float)  # many ties
    y = x * rng.choice([-1.0, 1.0]) + rng.integers(0, 5, size=n)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    z = rng.normal(size=n)
    assert spearman(z, y) == pytest.approx(stats.spearmanr(z, y).statistic, abs=1e-12)
    assert kendall_tau(z, y) == pytest.approx(stats.kendalltau(z, y).statistic, abs=1e-12)


def test_average_ranks_and_degenerate_inputs():
    np.testing.assert_array_equal(average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        kendall_tau([1], [1])


# ----------------------------------------------------------------------------- top-K quality


def test_top1_percentile_counts_strictly_worse_others():
    scores = [0.1, 0.9, 0.5, 0.9, 0.3]  # top-1: index 1 (first of the tied 0.9s)
    cer = [20.0, 12.0, 12.0, 30.0, 11.0]
    # others: 20 (worse), 12 (tie: not worse), 30 (worse), 11 (better) -> 2 of 4
    assert top1_percentile(scores, cer) == 0.5
    assert top1_percentile([1.0, 0.0, 0.5], [1.0, 2.0, 3.0]) == 1.0
    assert top1_percentile([0.0, 1.0], [1.0, 2.0]) == 0.0


def test_best_of_top_k_regret():
    scores = [0.9, 0.8, 0.7, 0.1]
    cer = [15.0, 13.0, 14.0, 10.0]
    assert best_of_top_k_regret(scores, cer, 1) == {
        "cer": 15.0,
        "oracle": 10.0,
        "regret": 5.0,
        "relative": 0.5,
    }
    assert best_of_top_k_regret(scores, cer, 3)["regret"] == 3.0
    assert best_of_top_k_regret(scores, cer, 10)["regret"] == 0.0
    assert best_of_top_k_regret([1.0, 0.0], [0.0, 1.0], 1)["relative"] == 0.0
    assert best_of_top_k_regret([0.0, 1.0], [0.0, 1.0], 1)["relative"] is None
    with pytest.raises(ValueError, match="k must be >= 1"):
        best_of_top_k_regret(scores, cer, 0)


def test_variant_quality_ranks_over_the_uniform_part_and_regrets_over_all():
    rng = np.random.default_rng(3)
    scores, cer = rng.normal(size=40), rng.normal(size=40) + 20
    uniform = rng.random(40) < 0.6
    q = variant_quality(scores, cer, uniform)
    assert q["spearman"] == pytest.approx(stats.spearmanr(scores[uniform], cer[uniform])[0])
    assert q["kendall"] == pytest.approx(stats.kendalltau(scores[uniform], cer[uniform])[0])
    top = int(np.argmax(scores))
    pool = uniform.copy()
    pool[top] = True
    others = cer[pool & (np.arange(40) != top)]
    assert q["top1_percentile"] == pytest.approx(np.mean(others > cer[top]))
    assert q["regret"]["10"]["oracle"] == cer.min()


# ----------------------------------------------------------------------------- aggregation


def test_damage_aggregation_penalises_more_blocks():
    m = np.full((5, 5), 0.5)
    m[0, 1] = m[2, 3] = 0.9  # single blocks [1] and [3]
    m[0, 2] = 0.85  # block [1..2]
    mean = coarse_search(m, 2, "exhaustive", top_k=2)
    damage = coarse_search(m, 2, "exhaustive", top_k=2, aggregation="damage")
    assert [p.layers for p in mean] == [(1, 3), (1, 2)]
    assert mean[0].score == pytest.approx(0.9)
    assert [p.layers for p in damage] == [(1, 2), (1, 3)]
    assert damage[0].score == pytest.approx(-0.15)
    assert damage[1].score == pytest.approx(-0.2)
    assert coarse_search(m, 2) == coarse_search(m, 2, aggregation="mean")
    with pytest.raises(ValueError, match="unknown aggregation 'sum'.*mean, damage"):
        coarse_search(m, 2, aggregation="sum")


@pytest.mark.parametrize("aggregation", ["mean", "damage"])
def test_score_proposals_equals_score_proposal(aggregation: str):
    m = np.random.default_rng(0).uniform(size=(8, 8))
    combos = np.array(list(combinations(range(1, 8), 3)))
    vectorised = score_proposals(m, combos[:, ::-1], aggregation)  # any order within a row
    single = [score_proposal(m, c, aggregation) for c in combos]
    np.testing.assert_array_equal(vectorised, single)
    beam = coarse_search(m, 3, "beam", beam_size=50, top_k=5, aggregation=aggregation)
    assert [p.score for p in beam] == sorted(vectorised, reverse=True)[:5]
    with pytest.raises(ValueError, match="repeat a layer"):
        score_proposals(m, [[1, 1, 2]])
    with pytest.raises(ValueError, match="layer numbers in 1..7"):
        score_proposals(m, [[0, 1, 2]])


def _copy_and_orthogonal_layers(n: int = 30, d: int = 6) -> list[np.ndarray]:
    """Layer 1 close to the input, layer 2 a bigger change, layer 3 a copy of layer 2,
    layer 4 orthogonal to layer 3 row by row."""
    rng = np.random.default_rng(0)
    h0 = rng.normal(size=(n, d))
    h1 = h0 + 0.2 * rng.normal(size=(n, d))
    h2 = h1 + 0.8 * rng.normal(size=(n, d))
    h3 = h2.copy()
    r = rng.normal(size=(n, d))
    h4 = r - (np.sum(r * h3, axis=1) / np.sum(h3 * h3, axis=1))[:, None] * h3
    return [h0, h1, h2, h3, h4]


@pytest.mark.parametrize("measure", ["angular", "change", "cosine"])
def test_copy_ranks_first_and_orthogonal_last(measure: str):
    m = correlation_matrix(_copy_and_orthogonal_layers(), measure)
    ranked = coarse_search(m, 1, "exhaustive", top_k=4)
    assert [p.layers for p in ranked] == [(3,), (1,), (2,), (4,)]
    assert ranked[0].score == pytest.approx(1.0, abs=1e-12)
    if measure == "angular":
        assert ranked[-1].score == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------- variants


def test_study_variants_grid():
    rows = {("mean", 8): 8, ("mean", 64): 64, ("frames", 8): 80, ("frames", 64): 640}
    variants = study_variants(
        ["dc", "angular"], ["mean", "frames"], [8, 64], lambda p, n: rows[(p, n)], 64
    )
    names = [v.name for v in variants]
    assert len(names) == len(set(names))
    # dc batch 32 is left out where it is not below the rows (8 mean rows); batch 4 stays
    assert "dc_b32/mean/N8" not in names and "dc_b4/mean/N8" in names
    assert "dc_b32/mean/N64" in names and "dc_ball/frames/N8" in names
    # the damage aggregation at the reference size only
    assert "angular/frames/N64/damage" in names and "angular/mean/N8/damage" not in names
    mean_rows = [v for v in variants if v.aggregation == "mean"]
    assert len(mean_rows) == 2 * (3 + 1) + 2 * (3 + 1) - 1
    assert Variant("dc", "mean", 8, None).to_dict()["options"] == {
        "batch_size": 0
    }  # 0: one batch of all rows
    assert Variant("dc", "mean", 8, 4).to_dict()["options"] == {"batch_size": 4}
    assert (
        Variant("cka", "mean", 8).matrix_key == Variant("cka", "mean", 8, None, "damage").matrix_key
    )


def test_smallest_matching_size():
    def row(n, cer):
        return {"num_utts": n, "regret": {"10": {"cer": cer}}}

    rows = [row(32, 14.0), row(64, 13.0), row(128, 13.0), row(320, 13.0), row(1280, 12.0)]
    assert smallest_matching_size(rows, 320) == 64
    assert smallest_matching_size(rows, 1280) == 1280
    assert smallest_matching_size(rows[:2], 320) is None


# ----------------------------------------------------------------------------- features


def _write_frames_dump(dump_dir, arrays_per_layer: list[dict[str, np.ndarray]]) -> None:
    dump_dir.mkdir(parents=True)
    for k, arrays in enumerate(arrays_per_layer):
        f = layer_file(dump_dir, k)
        with kaldiio.WriteHelper(f"ark,scp:{f}.ark,{f}.scp") as writer:
            for utt, a in arrays.items():
                writer(utt, a)
    info = {"num_layers": len(arrays_per_layer) - 1, "pooling": "frames", "seconds": 1.0}
    info["utts"] = list(arrays_per_layer[0])
    (dump_dir / DUMP_INFO).write_text(json.dumps(info))


def test_study_features_derive_means_frames_and_nested_sizes(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [3, 5, 2, 4, 6, 1]
    layers = [
        {f"u{i}": rng.normal(size=(t, 4)).astype(np.float32) for i, t in enumerate(lengths)}
        for _ in range(3)
    ]
    _write_frames_dump(tmp_path / "dump", layers)
    feats = StudyFeatures(tmp_path / "dump", frame_rows=10, seed=1)
    assert sorted(feats.utts) == sorted(layers[0]) and feats.num_utts == 6
    first4 = feats.utts[:4]
    mean = feats.layer_feats("mean", 4)
    for k in range(3):
        expected = np.stack([layers[k][u].mean(0) for u in first4])
        np.testing.assert_allclose(mean[k], expected, rtol=1e-6)
    # nested: the first 2 utterances of N=4 are those of N=2
    np.testing.assert_array_equal(feats.layer_feats("mean", 2)[0], mean[0][:2])
    total4 = sum(len(layers[0][u]) for u in first4)
    frames = feats.layer_feats("frames", 4)
    assert frames[0].shape == (min(total4, 10), 4) and feats.rows("frames", 4) == min(total4, 10)
    # the same rows at every layer index
    stacked = [np.concatenate([layers[k][u] for u in first4]) for k in range(3)]
    rows0 = [np.flatnonzero((stacked[0] == r).all(axis=1))[0] for r in frames[0]]
    for k in range(3):
        np.testing.assert_array_equal(frames[k], stacked[k][rows0])
    with pytest.raises(ValueError, match="calibration size 7 is not in 2..6"):
        feats.layer_feats("mean", 7)


# ----------------------------------------------------------------------------- proposals


def test_proposal_set_all_or_sample_with_every_top_k():
    all_props, uniform = proposal_set(6, 2, [], cap=15)
    assert all_props == list(combinations(range(1, 7), 2)) and uniform.all()
    rng = np.random.default_rng(0)
    scorers = [
        BlockScorer(rng.uniform(size=(11, 11)), "mean"),
        BlockScorer(rng.uniform(size=(11, 11)), "damage"),
    ]
    props, uniform = proposal_set(10, 5, scorers, cap=50, sample_size=40, top_k=5, seed=2)
    assert props == sorted(set(props)) and int(uniform.sum()) == 40
    for scorer in scorers:
        for p in coarse_search(scorer, 5, "exhaustive", top_k=5):
            assert p.layers in props
    again, _ = proposal_set(10, 5, scorers, cap=50, sample_size=40, top_k=5, seed=2)
    assert again == props


def test_proposal_cers_are_cached_and_resumable(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(batches, subsets):
        calls.append(list(subsets))
        return [SubsetResult(kept, float(sum(kept)), 0.0, 0.0, 0.1, 2) for kept in subsets]

    model = SimpleNamespace(num_layers=4, evaluate=fake_evaluate)
    proposals = list(combinations(range(1, 5), 2))
    cache = CerCache(tmp_path / "cers.json", {"dev": 1})
    cer = proposal_cers(model, [], proposals[:3], cache, chunk=2)
    assert len(calls) == 2
    # kept layers of pruning (1, 2) are (3, 4): CER 7 from the fake
    assert cer[0] == 7.0
    reloaded = CerCache(tmp_path / "cers.json", {"dev": 1})
    cer = proposal_cers(model, [], proposals, reloaded, chunk=10)
    assert len(calls) == 3 and len(calls[-1]) == len(proposals) - 3
    np.testing.assert_array_equal(cer, [10 - sum(p) for p in proposals])
    with pytest.raises(ValueError, match="cers.json: made with other settings"):
        CerCache(tmp_path / "cers.json", {"dev": 2})


def test_the_study_reuses_stage_6s_oracle_only_on_the_same_dev_batches(tmp_path):
    settings = {
        "model_dir": "exp/m",
        "stack": "decoder",
        "dev_cuts": "data/fbank/cuts_dev-clean.jsonl.gz",
        "dev_num_utts": 100,
        "seed": 0,
        "max_duration": 100.0,
        "batch_order": "longest_first",
    }
    oracle = {
        "model_dir": "exp/m",
        "stack": "decoder",
        "dev_cuts": "data/fbank/cuts_dev-clean.jsonl.gz",
        "num_utts": 100,
        "seed": 0,
        "max_duration": 100.0,
        "batch_order": "longest_first",
        "candidates": [
            {"layers": [1, 2], "kept": [3], "cer": 9.0, "wer": 20.0, "loss": 3.0, "seconds": 1.0},
            {"layers": [1, 3], "kept": [2], "cer": 8.0, "wer": 19.0, "loss": 2.0, "seconds": 1.0},
        ],
    }
    exp = ExpDir(tmp_path / "exp")
    path = exp.stack("decoder").search_result("oracle", 2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(oracle))
    cache = CerCache(tmp_path / "cers.json", settings)
    assert reuse_oracle(cache, exp.root, "decoder", 2) == 2
    want = {"cer": 8.0, "wer": 19.0, "loss": 2.0, "seconds": 1.0}
    assert CerCache(tmp_path / "cers.json", settings).data["cers"]["1,3"] == want
    assert reuse_oracle(cache, exp.root, "decoder", 3) == 0  # no oracle of that P
    path.write_text(json.dumps({**oracle, "num_utts": 320}))  # other dev batches
    other = CerCache(tmp_path / "other.json", settings)
    assert reuse_oracle(other, exp.root, "decoder", 2) == 0 and other.data["cers"] == {}
    path.write_text(json.dumps({k: v for k, v in oracle.items() if k != "batch_order"}))
    assert reuse_oracle(other, exp.root, "decoder", 2) == 0  # batches in another order


# ----------------------------------------------------------------------------- end to end

STUDY = [
    "--num_prune",
    "1",
    "2",
    "--calib_num_utts",
    "12",
    "--calib_sizes",
    "6",
    "12",
    "--reference_num_utts",
    "12",
    "--dev_num_utts",
    "8",
    "--frames_per_utt",
    "8",
    "--frame_rows",
    "64",
    "--max_proposals",
    "3",
    "--sample_size",
    "4",
    "--max_duration",
    "30",
]


def test_search_quality_end_to_end_matches_scipy(pipeline, tmp_path):
    out = tmp_path / "study"
    args = [PYTHON, REPO / "bin/search_quality.py", "--exp_dir", pipeline["exp_dir"]]
    run_cmd([*args, "--output_dir", out, *STUDY], cwd=pipeline["workdir"])
    summary = json.loads((out / "quality.json").read_text())
    assert [r["num_prune"] for r in summary["results"]] == [1, 2]
    assert summary["calibration"]["sizes"] == [6, 12]
    p1, p2 = summary["results"]
    assert p1["exhaustive"] and p1["num_proposals"] == 4
    assert not p2["exhaustive"] and p2["num_uniform"] == 4
    for result in summary["results"]:
        cer = np.array([p["cer"] for p in result["proposals"]])
        uniform = np.array([p["uniform"] for p in result["proposals"]])
        assert result["oracle_cer"] == cer.min()
        names = {v["name"] for v in result["variants"]}
        assert {"dc_b4/mean/N6", "angular/frames/N12", "change/mean/N12/damage"} <= names
        for v in result["variants"]:
            scores = np.array(v["scores"])
            rho = stats.spearmanr(scores[uniform], cer[uniform]).statistic
            tau = stats.kendalltau(scores[uniform], cer[uniform]).statistic
            for got, want in ((v["spearman"], rho), (v["kendall"], tau)):
                assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
            top10 = np.argsort(-scores, kind="stable")[:10]
            assert v["regret"]["10"]["regret"] == pytest.approx(cer[top10].min() - cer.min())
            assert v["total_seconds"] >= v["fine_seconds"] > 0
        assert (out / f"scatter_prune{result['num_prune']}.png").stat().st_size > 0
    report = (out / "SEARCH_QUALITY.md").read_text()
    assert "## P = 2" in report and "Smallest N whose best-of-top-10 CER equals N=12's" in report
    # A rerun takes every CER and fine search from the caches: the cache files are untouched.
    caches = {p: p.stat().st_mtime_ns for p in out.glob("cers_prune*.json")}
    assert sorted(p.name for p in caches) == ["cers_prune1.json", "cers_prune2.json"]
    run_cmd([*args, "--output_dir", out, *STUDY], cwd=pipeline["workdir"])
    assert {p: p.stat().st_mtime_ns for p in caches} == caches
    assert (
        json.loads((out / "quality.json").read_text())["results"][1]["proposals"]
        == (p2["proposals"])
    )


def test_search_quality_bad_measure_is_one_clear_error(pipeline, tmp_path):
    args = [PYTHON, REPO / "bin/search_quality.py", "--exp_dir", pipeline["exp_dir"]]
    proc = run_cmd(
        [*args, "--output_dir", tmp_path, "--scores", "dc", "dcor"],
        cwd=pipeline["workdir"],
        check=False,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--scores: unknown dcor; choose from angular, change, cka" in errors[0]
    assert list(tmp_path.iterdir()) == []  # nothing written
