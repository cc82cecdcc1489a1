"""bench/residual_sum_score.py: the residual-sum approximation of a pruned model on hand-made
layer features with a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "residual_sum_score.py"


@pytest.fixture(scope="module")
def rs():
    return load_script(SCRIPT, "residual_sum_score")


class LinearReadout:
    """A stand-in model whose readout is log-softmax(x W)."""

    def __init__(self, dim: int, vocab: int):
        self.w = torch.randn(dim, vocab, generator=torch.Generator().manual_seed(1))

    def readout(self, h):
        return torch.log_softmax(h.x @ self.w, -1), h.lengths


def residual_stream(scales: list[float], rows: int = 64, dim: int = 8) -> list[np.ndarray]:
    """h_0 .. h_L with updates of the given sizes (h_l = h_(l-1) + scale_l * noise)."""
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(rows, dim))]
    for s in scales:
        feats.append(feats[-1] + s * rng.normal(size=(rows, dim)))
    return [f.astype(np.float32) for f in feats]


def test_scores_follow_the_size_of_the_removed_updates(rs):
    feats = residual_stream([0.0, 0.1, 1.0, 3.0])
    model = LinearReadout(8, 5)
    scores = {p: rs.proposal_scores(model, feats, p) for p in [(1,), (2,), (3,), (4,)]}
    cos = [scores[(k,)]["cos"] for k in (1, 2, 3, 4)]
    assert cos == sorted(cos, reverse=True) and cos[0] == pytest.approx(1.0, abs=1e-6)
    # removing an update of zero changes nothing: no KL, every greedy label kept
    assert scores[(1,)]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert scores[(1,)]["agree"] == 1.0
    assert scores[(4,)]["kl"] < scores[(3,)]["kl"] < 0


def test_cosine_equals_a_direct_computation(rs):
    feats = residual_stream([0.5, 0.7, 0.9])
    approx = feats[3] - (feats[1] - feats[0]) - (feats[3] - feats[2])  # prune layers 1 and 3
    want = np.mean(
        (approx * feats[3]).sum(1)
        / np.linalg.norm(approx, axis=1)
        / np.linalg.norm(feats[3], axis=1)
    )
    got = rs.proposal_scores(LinearReadout(8, 5), feats, (1, 3))["cos"]
    assert got == pytest.approx(want, abs=1e-5)


def test_study_one_ranks_against_the_cers(rs):
    feats = residual_stream([0.2, 0.4, 0.8, 1.6])
    cers = {"1": {"cer": 10.0}, "2": {"cer": 11.0}, "3": {"cer": 13.0}, "4": {"cer": 20.0}}
    out = rs.study_one(LinearReadout(8, 5), feats, cers)
    assert out["cos"]["spearman"] == pytest.approx(-1.0)
    assert out["cos"]["top1_cer"] == 10.0 and out["cos"]["oracle_cer"] == 10.0
    assert out["cos"]["proposals"] == 4
