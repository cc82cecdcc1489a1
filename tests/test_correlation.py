"""Tests for comflp.prune.correlation: hand-checked values, invariances, matrix vs pairs, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from comflp.prune import correlation
from comflp.prune.correlation import MEASURES, correlation_matrix, similarity

SYMMETRIC = ("dc", "svcca", "cka", "cosine")
NONNEGATIVE = ("dc", "svcca", "pwcca", "cka")

# Orthogonal, zero-mean sample vectors in N = 4 for hand-checked CCA examples.
U1 = np.array([1.0, 1.0, -1.0, -1.0])
U2 = np.array([1.0, -1.0, 1.0, -1.0])
U3 = np.array([1.0, -1.0, -1.0, 1.0])


def _layers(seed: int, n: int = 40, dims: tuple[int, ...] = (6, 6, 6, 6)) -> list[np.ndarray]:
    """Related random layers: a shared latent, mixed differently per layer, plus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    return [latent @ rng.normal(size=(4, d)) + 0.5 * rng.normal(size=(n, d)) for d in dims]


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def _naive_dcor2(x: np.ndarray, y: np.ndarray) -> float:
    """dCor^2 (V-statistic) of L2-normalised rows with explicit loops, as in Szekely et al."""

    def centred_distances(z: np.ndarray) -> np.ndarray:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        n = len(z)
        d = np.array([[np.linalg.norm(z[i] - z[j]) for j in range(n)] for i in range(n)])
        return np.array(
            [
                [d[i, j] - d[i].mean() - d[:, j].mean() + d.mean() for j in range(n)]
                for i in range(n)
            ]
        )

    a, b = centred_distances(x), centred_distances(y)
    return float((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


# ----------------------------------------------------------------------------- hand-checked


def test_dc_hand_computed_three_samples():
    # x normalises to (1, -1, 1); y rows e1, e2, e2. Double-centred distance matrices are
    # A = -4/9 v v^T, v = (1, -2, 1) and B = -2 sqrt(2)/9 w w^T, w = (2, -1, -1), so
    # dCov^2 = 8 sqrt(2)/81, dVar^2 = 64/81 and 32/81, dCor^2 = 1/4 (dCor = 1/2).
    x = [[2.0], [-3.0], [5.0]]
    y = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert similarity(x, y, "dc") == pytest.approx(0.25, abs=1e-12)
    assert similarity(y, x, "dc") == pytest.approx(0.25, abs=1e-12)


def test_dc_matches_naive_loops():
    x, y = _layers(3, n=12, dims=(5, 7))
    assert similarity(x, y, "dc") == pytest.approx(_naive_dcor2(x, y), abs=1e-10)


def test_cka_hand_computed():
    # y is effectively 1-D along (2, -1, -1); CKA of 1-D inputs is corr^2 = 36 / (294 * 6).
    x = [[2.0], [-3.0], [5.0]]
    y = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert similarity(x, y, "cka") == pytest.approx(1 / 49, abs=1e-12)


def test_one_dimensional_measures_are_correlations():
    # corr((1, 2, 3, 4), (1, 3, 2, 4)) = 4 / 5.
    x = [[1.0], [2.0], [3.0], [4.0]]
    y = [[1.0], [3.0], [2.0], [4.0]]
    assert similarity(x, y, "svcca") == pytest.approx(0.8, abs=1e-12)
    assert similarity(x, y, "pwcca") == pytest.approx(0.8, abs=1e-12)
    assert similarity(x, y, "cka") == pytest.approx(0.64, abs=1e-12)


def test_cca_measures_hand_computed_two_dimensions():
    # x = [3 u1, u2], y = [u1, 0.6 u2 + 0.8 u3]: canonical correlations 1 and 0.6.
    x = np.stack([3 * U1, U2], axis=1)
    y = np.stack([U1, 0.6 * U2 + 0.8 * U3], axis=1)
    assert similarity(x, y, "svcca") == pytest.approx(0.8, abs=1e-12)
    # x's neurons load 6 on the first canonical variate, 2 on the second: (6 + 1.2) / 8.
    assert similarity(x, y, "pwcca") == pytest.approx(0.9, abs=1e-12)
    # Weighted by y's neurons instead (2 and 2): the plain mean.
    assert similarity(y, x, "pwcca") == pytest.approx(0.8, abs=1e-12)
    # ||Y^T X||^2 = 12^2 + 2.4^2, ||X^T X|| = sqrt(36^2 + 4^2), ||Y^T Y|| = sqrt(2 * 4^2).
    assert similarity(x, y, "cka") == pytest.approx(149.76 / math.sqrt(1312 * 32), abs=1e-12)


def test_svcca_threshold_drops_weak_directions():
    # x's singular values are 6 and 2 (75% / 25%); y's are 2 and 2.
    x = np.stack([3 * U1, U2], axis=1)
    y = np.stack([U1, 0.6 * U2 + 0.8 * U3], axis=1)
    assert similarity(x, y, "svcca", threshold=0.75) == pytest.approx(1.0, abs=1e-12)
    assert similarity(x, y, "svcca", threshold=0.76) == pytest.approx(0.8, abs=1e-12)
    assert similarity(x, y, "pwcca", threshold=0.75) == pytest.approx(1.0, abs=1e-12)


def test_svcca_default_threshold_is_099():
    x, y = _layers(5, n=60, dims=(10, 10))
    x[:, -1] *= 1e-3  # a direction with well under 1% of the singular-value sum
    assert similarity(x, y, "svcca") == similarity(x, y, "svcca", threshold=0.99)
    assert similarity(x, y, "svcca") != pytest.approx(similarity(x, y, "svcca", threshold=1.0))


def test_cosine_exact():
    assert similarity([[3.0, 4.0], [1.0, 0.0]], [[4.0, 3.0], [-1.0, 0.0]], "cosine") == (
        pytest.approx((24 / 25 - 1) / 2, abs=1e-15)
    )
    assert similarity([[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 2.0]], "cosine") == (
        pytest.approx(0.5, abs=1e-15)
    )


def test_degenerate_inputs_give_zero_not_nan():
    x, y = _layers(1, n=10, dims=(3, 3))
    constant = np.ones((10, 3))
    for measure in NONNEGATIVE:
        assert similarity(x, constant, measure) == 0.0
    zero_row = x.copy()
    zero_row[0] = 0.0
    expected = np.mean(
        [0.0] + [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x[1:], y[1:])]
    )
    assert similarity(zero_row, y, "cosine") == pytest.approx(expected, abs=1e-12)
    m = correlation_matrix([x, constant, y], "dc")
    assert m[0, 1] == m[1, 2] == m[1, 1] == 0.0


def test_torch_and_numpy_inputs_agree():
    x, y = _layers(2, n=20, dims=(4, 4))
    tx = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    for measure in MEASURES:
        expected = similarity(x.astype(np.float32), y, measure)
        assert similarity(tx, torch.tensor(y), measure) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("measure", ["cka", "svcca"])
def test_orthogonal_and_isotropic_scaling_invariance(measure: str):
    x, y = _layers(7, n=50, dims=(6, 8))
    base = similarity(x, y, measure)
    assert similarity(x @ _orthogonal(6, 1), y, measure) == pytest.approx(base, abs=1e-9)
    assert similarity(x, y @ _orthogonal(8, 2), measure) == pytest.approx(base, abs=1e-9)
    assert similarity(7.5 * x, y, measure) == pytest.approx(base, abs=1e-9)
    assert similarity(x, 0.01 * y, measure) == pytest.approx(base, abs=1e-9)


def test_dc_scaling_invariance():
    x, y = _layers(8, n=30, dims=(5, 5))
    base = similarity(x, y, "dc")
    assert similarity(3.0 * x, y, "dc") == pytest.approx(base, abs=1e-12)
    # Rows are L2-normalised first, so even a separate positive scale per row is invisible.
    row_scales = np.linspace(0.1, 10.0, 30)[:, None]
    assert similarity(x * row_scales, y, "dc") == pytest.approx(base, abs=1e-12)
    assert similarity(x @ _orthogonal(5, 3), y, "dc") == pytest.approx(base, abs=1e-12)


def test_measures_tell_related_from_unrelated():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    related = 2.0 * x + 0.1 * rng.normal(size=(200, 5))
    unrelated = rng.normal(size=(200, 5))
    for measure in MEASURES:
        assert similarity(x, related, measure) > similarity(x, unrelated, measure) + 0.3


# ----------------------------------------------------------------------------- matrix


@pytest.mark.parametrize(
    ("measure", "options"),
    [
        ("dc", {}),
        ("dc", {"batch_size": 7}),
        ("svcca", {}),
        ("svcca", {"threshold": 0.9}),
        ("pwcca", {}),
        ("pwcca", {"threshold": 0.95}),
        ("cka", {}),
        ("cosine", {}),
    ],
)
def test_matrix_equals_pairwise_similarity(measure: str, options: dict):
    dims = (6, 6, 6, 6, 6) if measure == "cosine" else (6, 4, 9, 6, 5)
    feats = _layers(11, n=30, dims=dims)
    m = correlation_matrix(feats, measure, **options)
    assert m.dtype == np.float64
    assert m.shape == (5, 5)
    pairs = [[similarity(a, b, measure, **options) for b in feats] for a in feats]
    np.testing.assert_allclose(m, pairs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    if measure in SYMMETRIC:
        np.testing.assert_array_equal(m, m.T)


@pytest.mark.parametrize("measure", ["dc", "cka"])
def test_matrix_in_small_chunks_matches_pairs(measure: str, monkeypatch: pytest.MonkeyPatch):
    feats = _layers(12, n=25, dims=(4, 4, 4))
    whole = correlation_matrix(feats, measure)
    # 3 layers x 25 columns x 8 bytes = 600 bytes a row: 2 kernel rows per chunk.
    monkeypatch.setattr(correlation, "_CHUNK_BYTES", 1200)
    chunked = correlation_matrix(feats, measure)
    np.testing.assert_allclose(chunked, whole, atol=1e-12, rtol=0)
    assert chunked[0, 2] == pytest.approx(similarity(feats[0], feats[2], measure), abs=1e-12)


def test_dc_batches_in_small_chunks_match_pairs(monkeypatch: pytest.MonkeyPatch):
    feats = _layers(13, n=40, dims=(6, 4, 9))  # 5 batches of 7 rows, 5 rows dropped
    whole = correlation_matrix(feats, "dc", batch_size=7)
    # 3 layers x 7 rows x 9 columns x 8 bytes: one batch of every layer per chunk
    monkeypatch.setattr(correlation, "_CACHE_BYTES", 8 * 3 * 7 * 9)
    chunked = correlation_matrix(feats, "dc", batch_size=7)
    np.testing.assert_allclose(chunked, whole, atol=1e-12, rtol=0)
    pair = similarity(feats[1], feats[2], "dc", batch_size=7)
    assert chunked[1, 2] == pytest.approx(pair, abs=1e-12)


def test_pwcca_matrix_rows_weight_by_row_layer():
    x = np.stack([3 * U1, U2], axis=1)
    y = np.stack([U1, 0.6 * U2 + 0.8 * U3], axis=1)
    m = correlation_matrix([x, y], "pwcca")
    np.testing.assert_allclose(m, [[1.0, 0.9], [0.8, 1.0]], atol=1e-12)


def test_single_layer_matrix():
    np.testing.assert_allclose(correlation_matrix(_layers(0, dims=(3,)), "cka"), [[1.0]])


# ----------------------------------------------------------------------------- dc batches


def test_dc_batches_average_full_batches_and_drop_remainder():
    x, y = _layers(4, n=10, dims=(3, 5))
    expected = (similarity(x[:4], y[:4], "dc") + similarity(x[4:8], y[4:8], "dc")) / 2
    assert similarity(x, y, "dc", batch_size=4) == pytest.approx(expected, abs=1e-12)
    assert similarity(x, y, "dc", batch_size=10) == similarity(x, y, "dc", batch_size=None)
    # Batches of 2 normalised rows always give dCor^2 = 1 (two points are one distance).
    assert similarity(x, y, "dc", batch_size=2) == pytest.approx(1.0, abs=1e-12)
    m = correlation_matrix([x, y], "dc", batch_size=4)
    assert m[0, 1] == pytest.approx(expected, abs=1e-12)


def test_dc_batch_size_larger_than_samples_is_an_error():
    x, y = _layers(4, n=10, dims=(3, 3))
    with pytest.raises(ValueError, match="batch_size 11 is larger than the number of samples 10"):
        similarity(x, y, "dc", batch_size=11)
    with pytest.raises(ValueError, match="batch_size 11"):
        correlation_matrix([x, y], "dc", batch_size=11)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(4, 24),
    dims=st.lists(st.integers(2, 6), min_size=2, max_size=4),
    measure=st.sampled_from(tuple(MEASURES)),
)
def test_matrix_properties(seed: int, n: int, dims: list[int], measure: str):
    # (D >= 2: 1-D rows L2-normalise to their signs, which can all agree: a constant input.)
    if MEASURES[measure].paired:
        dims = [dims[0]] * len(dims)
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0) for d in dims]
    m = correlation_matrix(feats, measure)
    low = -1.0 if measure == "cosine" else 0.0
    assert np.all((m >= low) & (m <= 1.0))
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    if measure in SYMMETRIC:
        np.testing.assert_array_equal(m, m.T)
    np.testing.assert_allclose(
        m[0, -1], similarity(feats[0], feats[-1], measure), atol=1e-6, rtol=0
    )


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 20), scale=st.floats(1e-3, 1e3))
def test_dc_matches_naive_and_ignores_scale(seed: int, n: int, scale: float):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 4))
    value = similarity(x, y, "dc")
    assert value == pytest.approx(_naive_dcor2(x, y), abs=1e-9)
    assert similarity(scale * x, y, "dc") == pytest.approx(value, abs=1e-9)


# ----------------------------------------------------------------------------- errors


def test_unknown_measure_lists_valid_names():
    with pytest.raises(ValueError, match="unknown measure 'dcor'.*dc, svcca, pwcca, cka, cosine"):
        similarity([[1.0], [2.0]], [[1.0], [2.0]], "dcor")
    with pytest.raises(ValueError, match="unknown measure 'CKA'"):
        correlation_matrix([[[1.0], [2.0]]], "CKA")


def test_too_few_samples():
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        similarity([[1.0, 2.0]], [[3.0, 4.0]], "cka")
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        correlation_matrix([[[1.0, 2.0]], [[3.0, 4.0]]], "dc")


def test_different_sample_counts():
    with pytest.raises(ValueError, match="y has 3 samples but x has 2"):
        similarity(np.ones((2, 2)), np.ones((3, 2)), "dc")
    with pytest.raises(
        ValueError, match=r"layer_feats\[2\] has 4 samples but layer_feats\[0\] has 5"
    ):
        correlation_matrix([np.ones((5, 2)), np.ones((5, 2)), np.ones((4, 2))], "cka")


def test_cosine_needs_equal_dims():
    with pytest.raises(ValueError, match="cosine needs equal feature dimensions.*x: 2, y: 3"):
        similarity(np.ones((4, 2)), np.ones((4, 3)), "cosine")
    with pytest.raises(ValueError, match=r"layer_feats\[1\]: 3"):
        correlation_matrix([np.ones((4, 2)), np.ones((4, 3))], "cosine")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(bad: float):
    x = np.ones((4, 2))
    x[1, 1] = bad
    with pytest.raises(ValueError, match="x contains 1 non-finite value"):
        similarity(x, np.ones((4, 2)), "dc")
    with pytest.raises(ValueError, match=r"layer_feats\[1\] contains 1 non-finite"):
        correlation_matrix([np.ones((4, 2)), x], "svcca")


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match=r"x must be 2-D.*got shape \(4,\)"):
        similarity(np.ones(4), np.ones((4, 2)), "cka")
    with pytest.raises(ValueError, match=r"y must be 2-D.*got shape \(4, 0\)"):
        similarity(np.ones((4, 2)), np.ones((4, 0)), "cka")
    with pytest.raises(ValueError, match="x must be a numeric"):
        similarity([["a", "b"], ["c", "d"]], np.ones((2, 2)), "cka")
    with pytest.raises(ValueError, match="layer_feats is empty"):
        correlation_matrix([], "dc")


@pytest.mark.parametrize("threshold", [0, 0.0, -0.5, 1.01, 2, float("nan")])
def test_bad_threshold_values(threshold: float):
    x = np.random.default_rng(0).normal(size=(5, 2))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got"):
        similarity(x, x, "svcca", threshold=threshold)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        correlation_matrix([x, x], "pwcca", threshold=threshold)


@pytest.mark.parametrize("threshold", ["0.9", True, None])
def test_bad_threshold_types(threshold: object):
    x = np.random.default_rng(0).normal(size=(5, 2))
    with pytest.raises(ValueError, match=f"threshold must be a number in .* got {threshold!r}"):
        similarity(x, x, "svcca", threshold=threshold)


@pytest.mark.parametrize(
    ("batch_size", "message"),
    [
        (1, "batch_size must be >= 2.*got 1"),
        (0, "batch_size must be >= 2.*got 0"),
        (-4, "batch_size must be >= 2.*got -4"),
        (2.5, "batch_size must be an integer >= 2 or None, got 2.5"),
        (True, "batch_size must be an integer >= 2 or None, got True"),
        ("32", "batch_size must be an integer >= 2 or None, got '32'"),
    ],
)
def test_bad_batch_size(batch_size: object, message: str):
    x = np.random.default_rng(0).normal(size=(6, 2))
    with pytest.raises(ValueError, match=message):
        similarity(x, x, "dc", batch_size=batch_size)
    with pytest.raises(ValueError, match=message):
        correlation_matrix([x, x], "dc", batch_size=batch_size)


def test_numpy_integer_batch_size_is_accepted():
    x, y = _layers(4, n=10, dims=(3, 5))
    assert similarity(x, y, "dc", batch_size=np.int64(4)) == similarity(x, y, "dc", batch_size=4)


@pytest.mark.parametrize(
    ("measure", "options", "message"),
    [
        (
            "cka",
            {"threshold": 0.9},
            "unknown option.*threshold for measure 'cka'; valid options: none",
        ),
        ("svcca", {"batch_size": 4}, "batch_size for measure 'svcca'; valid options: threshold"),
        ("dc", {"thresold": 0.9}, "thresold for measure 'dc'; valid options: batch_size"),
        ("cosine", {"eps": 1e-8}, "eps for measure 'cosine'"),
    ],
)
def test_unknown_options(measure: str, options: dict, message: str):
    x = np.random.default_rng(0).normal(size=(6, 2))
    with pytest.raises(ValueError, match=message):
        similarity(x, x, measure, **options)
    with pytest.raises(ValueError, match=message):
        correlation_matrix([x, x], measure, **options)


# ----------------------------------------------------------------------------- angular, change


def test_angular_exact():
    x = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]]
    y = [[3.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [0.0, 1.0]]
    # angles 0, pi/2, pi, pi/4
    expected = np.mean([1.0, 0.5, 0.0, 0.75])
    assert similarity(x, y, "angular") == pytest.approx(expected, abs=1e-12)
    assert similarity(x, x, "angular") == 1.0
    zero_row = [[0.0, 0.0], [1.0, 0.0]]
    assert similarity(zero_row, [[1.0, 0.0], [1.0, 0.0]], "angular") == 0.5


def test_change_exact_and_sees_norms():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    y = np.array([[2.0, 0.0], [-1.0, 0.0], [3.0, 4.0]])
    # relative changes 1/3, 1, 0
    assert similarity(x, y, "change") == pytest.approx(np.mean([2 / 3, 0.0, 1.0]), abs=1e-12)
    # angular ignores a row's scale, change does not
    assert similarity(x, 2 * x, "angular") == 1.0
    assert similarity(x, 2 * x, "change") == pytest.approx(2 / 3, abs=1e-12)
    assert similarity(np.zeros((2, 2)), np.zeros((2, 2)), "change") == 0.0


@pytest.mark.parametrize("measure", ["angular", "change"])
def test_paired_row_matrices_equal_pairs_in_any_chunking(measure: str, monkeypatch):
    feats = _layers(13, n=25, dims=(5,) * 6)
    m = correlation_matrix(feats, measure)
    pairs = [[similarity(a, b, measure) for b in feats] for a in feats]
    np.testing.assert_allclose(m, pairs, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    np.testing.assert_array_equal(m, m.T)
    monkeypatch.setattr(correlation, "_CHUNK_BYTES", 8 * 25 * 5)  # one layer per chunk
    np.testing.assert_allclose(correlation_matrix(feats, measure), m, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=f"{measure} needs equal feature dimensions"):
        correlation_matrix([feats[0], feats[1][:, :4]], measure)
