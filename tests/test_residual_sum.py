"""The residual-sum score (comflp/prune/scores/residual_sum.py) on hand-made layer features with
a known answer."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from comflp.prune.scores import residual_sum
from comflp.prune.scores.consensus import ConsensusScorer
from comflp.prune.scores.residual_sum import ResidualSumScore
from comflp.prune.search import BlockScorer, coarse_search, pair_matrix, score_proposals


def residual_stream(scales: list[float], rows: int = 64, dim: int = 8) -> list[np.ndarray]:
    """h_0 .. h_L with updates of the given sizes (h_l = h_(l-1) + scale_l * noise)."""
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(rows, dim))]
    for s in scales:
        feats.append(feats[-1] + s * rng.normal(size=(rows, dim)))
    return [f.astype(np.float32) for f in feats]


# --- the core scorer -----------------------------------------------------------------------


def direct_cosine(feats: list[np.ndarray], layers) -> float:
    """Mean cosine of h_L - sum of the removed updates with h_L, computed on the features."""
    top = feats[-1].astype(np.float64)
    approx = top.copy()
    for layer in layers:
        approx -= feats[layer].astype(np.float64) - feats[layer - 1]
    cos = (approx * top).sum(1) / np.linalg.norm(approx, axis=1) / np.linalg.norm(top, axis=1)
    return float(cos.mean())


def test_scorer_equals_a_direct_computation_in_chunks(monkeypatch):
    feats = residual_stream([0.5, 0.7, 0.9, 0.3, 1.2], rows=40)
    monkeypatch.setattr(residual_sum, "_BUILD_ROWS", 16)  # statistics in 3 blocks, one partial
    scorer = ResidualSumScore.build(feats)
    assert (scorer.num_layers, scorer.num_rows) == (5, 40)
    combos = np.array([[1, 3], [2, 5], [1, 2], [4, 5], [3, 4]])
    want = [direct_cosine(feats, c) for c in combos]
    monkeypatch.setattr(residual_sum, "_CHUNK_ELEMENTS", 80)  # 2 proposals per chunk
    np.testing.assert_allclose(scorer.scores(combos), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(score_proposals(scorer, combos[:, ::-1]), want, atol=1e-9)


def test_extension_and_prefix_scores_equal_scoring_each_set(monkeypatch):
    feats = residual_stream([0.5, 0.7, 0.9, 0.3, 1.2, 0.6], rows=30)
    scorer = ResidualSumScore.build(feats)
    monkeypatch.setattr(residual_sum, "_CHUNK_ELEMENTS", 200)  # a proposal per chunk
    beam = np.array([[1, 4], [2, 3], [5, 6]])
    grid = scorer.extension_scores(beam)
    for entry, row in zip(beam, grid, strict=True):
        for layer in sorted(set(range(1, 7)) - set(entry)):
            want = direct_cosine(feats, [*entry, layer])
            assert row[layer - 1] == pytest.approx(want, abs=1e-9)
    first = scorer.extension_scores(np.zeros((1, 0), dtype=np.int64))[0]
    np.testing.assert_allclose(first, [direct_cosine(feats, [k]) for k in range(1, 7)], atol=1e-9)
    # the next step of a beam search: entries one layer larger, extended from the cached sums
    # of the previous call's entries (one of them, [2, 4, 5], from scratch: no parent cached)
    after = np.array([[1, 4, 6], [2, 3, 5], [5, 6, 1], [2, 4, 5]])
    grid = scorer.extension_scores(np.array([[1, 4], [2, 3], [5, 6]]))
    grid = scorer.extension_scores(after)
    for entry, row in zip(after, grid, strict=True):
        for layer in sorted(set(range(1, 7)) - set(entry)):
            assert row[layer - 1] == pytest.approx(direct_cosine(feats, [*entry, layer]), abs=1e-9)
    chains = np.array([[3, 1, 6, 2], [5, 4, 1, 3], [2, 6, 5, 4]])
    want = [[direct_cosine(feats, c[:k]) for k in range(1, 5)] for c in chains]
    np.testing.assert_allclose(scorer.prefix_scores(chains), want, atol=1e-9)


class _SetsOnly:
    """A scorer with the residual-sum score's ``scores`` and nothing else."""

    def __init__(self, scorer: ResidualSumScore):
        self.num_layers, self.scores = scorer.num_layers, scorer.scores


def test_every_proposal_of_each_size_in_one_pass_and_the_consensus_moments_from_it():
    feats = residual_stream([0.5, 0.7, 0.9, 0.3, 1.2, 0.6, 0.4], rows=30)
    feats[-1][:3] = 0.0  # rows whose top state is zero contribute 0
    scorer = ResidualSumScore.build(feats)
    by_size = scorer.scores_by_size(4)
    assert [len(v) for v in by_size] == [7, 21, 35, 35]
    for k, values in enumerate(by_size, start=1):
        want = [direct_cosine_or_zero(feats, c) for c in combinations(range(1, 8), k)]
        np.testing.assert_allclose(np.sort(values), np.sort(want), atol=1e-9)
    # the consensus standardises over the same values whichever way they are computed
    other = BlockScorer(np.random.default_rng(1).uniform(size=(8, 8)))
    fast = ConsensusScorer([scorer, other], max_size=4)
    slow = ConsensusScorer([_SetsOnly(scorer), other], max_size=4)
    pairs = np.array(list(combinations(range(1, 8), 3)))
    np.testing.assert_allclose(fast.scores(pairs), slow.scores(pairs), rtol=1e-12)


def direct_cosine_or_zero(feats: list[np.ndarray], layers) -> float:
    """:func:`direct_cosine` with the score's convention: a row with a zero top state adds 0."""
    top = feats[-1].astype(np.float64)
    approx = top.copy()
    for layer in layers:
        approx -= feats[layer].astype(np.float64) - feats[layer - 1]
    norms = np.linalg.norm(approx, axis=1) * np.linalg.norm(top, axis=1)
    cos = np.divide((approx * top).sum(1), norms, out=np.zeros(len(top)), where=norms > 0)
    return float(cos.mean())


def test_beam_search_from_extensions_equals_scoring_every_extended_set():
    feats = residual_stream([0.3, 1.5, 0.2, 0.9, 0.4, 2.0, 0.7, 1.1], rows=25)
    scorer = ResidualSumScore.build(feats)
    for p, beam_size in [(3, 2), (4, 5), (6, 3)]:
        fast = coarse_search(scorer, p, beam_size=beam_size, top_k=8)
        plain = coarse_search(_SetsOnly(scorer), p, beam_size=beam_size, top_k=8)
        assert [c.layers for c in fast] == [c.layers for c in plain]
        np.testing.assert_allclose([c.score for c in fast], [c.score for c in plain], atol=1e-12)


def test_scorer_ranks_by_update_size_and_sees_cancelling_updates():
    feats = residual_stream([0.0, 0.1, 1.0, 3.0])
    scorer = ResidualSumScore.build(feats)
    singles = scorer.scores(np.array([[1], [2], [3], [4]]))
    assert singles[0] == pytest.approx(1.0, abs=1e-12)
    assert list(singles) == sorted(singles, reverse=True)
    # layer 2 undoes layer 1: pruning both leaves h_L exactly, pruning one alone does not
    rng = np.random.default_rng(3)
    h0, d = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    feats = [h0, h0 + d, h0.copy(), h0 + 0.5 * d, h0 + 0.5 * d + rng.normal(size=(30, 6))]
    scores = ResidualSumScore.build(feats).scores(np.array([[1, 2], [1, 3], [2, 3]]))
    assert scores[0] == pytest.approx(1.0, abs=1e-12) and scores[0] > scores[1:].max()


def test_coarse_search_on_the_scorer_is_the_brute_force_best():
    feats = residual_stream([0.3, 1.5, 0.2, 0.9, 0.4, 2.0], rows=20)
    scorer = ResidualSumScore.build(feats)
    found = coarse_search(scorer, 3, mode="exhaustive", top_k=20)
    brute = sorted(
        ((direct_cosine(feats, c), c) for c in combinations(range(1, 7), 3)),
        key=lambda x: -x[0],
    )
    assert [p.layers for p in found] == [c for _, c in brute]
    np.testing.assert_allclose([p.score for p in found], [s for s, _ in brute], atol=1e-9)
    beam = coarse_search(scorer, 3, mode="beam", beam_size=20, top_k=5)
    assert [p.layers for p in beam] == [p.layers for p in found[:5]]
    assert coarse_search(scorer, 3, mode="greedy", top_k=1)[0].layers == (1, 3, 5)


def test_pair_matrix_save_load_and_bad_inputs(tmp_path):
    feats = residual_stream([0.3, 1.5, 0.2])
    scorer = ResidualSumScore.build(feats)
    pairs = pair_matrix(scorer)
    assert pairs.shape == (3, 3) and np.allclose(pairs, pairs.T)
    assert pairs[0, 2] == pytest.approx(direct_cosine(feats, (1, 3)))
    assert pairs[1, 1] == pytest.approx(direct_cosine(feats, (2,)))
    scorer.write(tmp_path / "stats.npz")
    loaded = ResidualSumScore.read(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.scores(np.array([[1, 2]])), scorer.scores([[1, 2]]))
    np.save(tmp_path / "m.npy", np.eye(4))
    with pytest.raises(ValueError, match="one array, expected an .npz"):
        ResidualSumScore.read(tmp_path / "m.npy")
    np.savez(tmp_path / "other.npz", top_sq=np.ones(3))
    with pytest.raises(ValueError, match="found top_sq"):
        ResidualSumScore.read(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="same-shape"):
        ResidualSumScore.build([np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 3))])
    with pytest.raises(ValueError, match="2 or more layer outputs"):
        ResidualSumScore.build([np.ones((4, 2))] * 2)
