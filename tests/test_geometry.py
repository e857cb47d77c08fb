"""Tests of recovery_assets.core.geometry (docs/method.md §8): RDMs, alignment shift, effective
dimensionality."""

from __future__ import annotations

import numpy as np
import pytest
import rsatoolbox
from scipy.spatial.distance import pdist, squareform
from scipy.stats import ortho_group

from recovery_assets.core.geometry import (
    alignment_shift,
    compare_rdms,
    euclidean_rdm,
    geometry_properties,
    participation_ratio,
)


def _features_with_spectrum(n: int, p: int, singular_values, seed: int = 0) -> np.ndarray:
    """Features whose column-centred matrix has exactly the given nonzero singular values."""
    rng = np.random.default_rng(seed)
    s = np.asarray(singular_values, dtype=float)
    r = len(s)
    # left singular vectors orthogonal to the all-ones vector, so centring leaves them intact
    a = rng.standard_normal((n, r))
    a -= a.mean(axis=0)
    u, _ = np.linalg.qr(a)
    v, _ = np.linalg.qr(rng.standard_normal((p, r)))
    offset = rng.standard_normal(p) * 5.0  # a column mean that centring must remove
    return (u * s) @ v.T + offset


def _numpy_corr_cov(v1: np.ndarray, v2: np.ndarray) -> float:
    """Plain-numpy whitened correlation of two RDM vectors (Diedrichsen et al. 2021).

    Subtract the mean dissimilarity, form the double-centred second-moment matrix
    G = -1/2 H D H and take the Frobenius cosine of the two G matrices.
    """
    gs = []
    for v in (v1, v2):
        d = squareform(v - v.mean())
        n = d.shape[0]
        h = np.eye(n) - np.ones((n, n)) / n
        gs.append(-0.5 * h @ d @ h)
    g1, g2 = gs
    return float(np.sum(g1 * g2) / np.sqrt(np.sum(g1 * g1) * np.sum(g2 * g2)))


# --- participation ratio --------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(40, 200), (300, 25)])  # n < p (n x n Gram) and n > p
def test_participation_ratio_exact_formula(n, p):
    s = np.array([9.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    X = _features_with_spectrum(n, p, s, seed=n)
    expected = np.sum(s**2) ** 2 / np.sum(s**4)
    assert participation_ratio(X) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_participation_ratio_equal_spectrum_gives_rank(k):
    X = _features_with_spectrum(50, 30, np.full(k, 2.5), seed=k)
    assert participation_ratio(X) == pytest.approx(k, rel=1e-10)


def test_participation_ratio_isotropic_gaussian_rank_k():
    rng = np.random.default_rng(1)
    k, p = 6, 64
    basis, _ = np.linalg.qr(rng.standard_normal((p, k)))
    X = rng.standard_normal((5000, k)) @ basis.T + 3.0
    assert participation_ratio(X) == pytest.approx(k, rel=0.05)


def test_participation_ratio_single_dominant_direction():
    X = _features_with_spectrum(100, 50, [100.0, 1.0, 1.0, 1.0, 1.0], seed=2)
    pr = participation_ratio(X)
    assert 1.0 <= pr < 1.01


def test_participation_ratio_matches_svd_and_is_scale_invariant():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 20)) @ rng.standard_normal((20, 20))
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    expected = np.sum(s**2) ** 2 / np.sum(s**4)
    assert participation_ratio(X) == pytest.approx(expected, rel=1e-10)
    assert participation_ratio(7.0 * X - 2.0) == pytest.approx(expected, rel=1e-10)
    s_t = np.linalg.svd(X.T - X.T.mean(axis=0), compute_uv=False)  # the n < p branch
    assert participation_ratio(X.T) == pytest.approx(
        np.sum(s_t**2) ** 2 / np.sum(s_t**4), rel=1e-10
    )


def test_participation_ratio_accepts_float32_and_lists():
    X = _features_with_spectrum(30, 10, [3.0, 1.0], seed=4)
    expected = (9.0 + 1.0) ** 2 / (81.0 + 1.0)
    assert participation_ratio(X.astype(np.float32)) == pytest.approx(expected, rel=1e-5)
    assert participation_ratio(X.tolist()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 3, 4)), "2-D"),
        (np.ones((1, 4)), "at least 2 rows"),
        (np.ones((5, 0)), "at least one column"),
        (np.array([[1.0, np.nan], [2.0, 3.0]]), "non-finite"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), "non-finite"),
        (np.tile([1.0, 2.0, 3.0], (6, 1)), "no variance"),
        ([["a", "b"], ["c", "d"]], "numeric"),
    ],
)
def test_participation_ratio_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        participation_ratio(bad)


# --- RDMs and their comparison --------------------------------------------------------------


def test_euclidean_rdm_is_scaled_squared_distance():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((9, 4))
    rdm = euclidean_rdm(X)
    assert isinstance(rdm, rsatoolbox.rdm.RDMs)
    assert rdm.n_rdm == 1 and rdm.n_cond == 9
    np.testing.assert_allclose(rdm.get_vectors().ravel(), pdist(X, "sqeuclidean") / 4, rtol=1e-12)


def test_compare_rdm_with_itself_is_one():
    rng = np.random.default_rng(6)
    rdm = euclidean_rdm(rng.standard_normal((30, 8)))
    assert compare_rdms(rdm, rdm) == pytest.approx(1.0, abs=1e-12)
    # positive rescaling of the RDM leaves the whitened correlation at 1
    vec = rdm.get_vectors().ravel()
    assert compare_rdms(vec, 3.0 * vec) == pytest.approx(1.0, abs=1e-12)


def test_compare_rdms_matches_numpy_whitened_correlation():
    rng = np.random.default_rng(7)
    for n in (5, 12, 25):
        v1 = pdist(rng.standard_normal((n, 6)), "sqeuclidean")
        v2 = pdist(rng.standard_normal((n, 3)), "euclidean")
        assert compare_rdms(v1, v2) == pytest.approx(_numpy_corr_cov(v1, v2), abs=1e-10)


def test_compare_rdms_symmetric_and_bounded():
    rng = np.random.default_rng(8)
    sims = []
    for _ in range(5):
        a = euclidean_rdm(rng.standard_normal((20, 5)))
        b = euclidean_rdm(rng.standard_normal((20, 5)))
        ab, ba = compare_rdms(a, b), compare_rdms(b, a)
        assert ab == pytest.approx(ba, abs=1e-12)
        assert -1.0 <= ab <= 1.0
        sims.append(ab)
    # unrelated random geometries are far from identical
    assert max(sims) < 0.9


def test_compare_rdms_rejects_bad_input():
    rng = np.random.default_rng(9)
    a = euclidean_rdm(rng.standard_normal((10, 3)))
    b = euclidean_rdm(rng.standard_normal((11, 3)))
    with pytest.raises(ValueError, match="same concepts"):
        compare_rdms(a, b)
    with pytest.raises(ValueError, match="exactly one RDM"):
        compare_rdms(rsatoolbox.rdm.concat([a, a]), a)
    with pytest.raises(ValueError, match=r"n\(n-1\)/2"):
        compare_rdms(np.ones(7), np.ones(7))
    vec = a.get_vectors().ravel().copy()
    vec[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        compare_rdms(vec, a)
    with pytest.raises(ValueError, match="no variance"):
        compare_rdms(np.ones(45), a)
    with pytest.raises(ValueError, match="1-D"):
        compare_rdms(np.ones((3, 45)), a)


# --- alignment shift ------------------------------------------------------------------------


def test_alignment_shift_zero_for_identity_and_scaled_rotation():
    rng = np.random.default_rng(10)
    p = 12
    X = rng.standard_normal((40, p))
    assert alignment_shift(X, np.eye(p)) == pytest.approx(0.0, abs=1e-12)
    rotation = ortho_group.rvs(p, random_state=11)
    assert alignment_shift(X, 2.5 * rotation) == pytest.approx(0.0, abs=1e-10)


def test_alignment_shift_positive_for_distorting_w():
    rng = np.random.default_rng(12)
    p = 12
    X = rng.standard_normal((40, p))
    stretch = np.diag(np.r_[10.0, np.full(p - 1, 0.1)])
    shift = alignment_shift(X, stretch)
    assert 0.1 < shift <= 2.0
    mild = np.eye(p) + 0.05 * rng.standard_normal((p, p))
    assert 0.0 < alignment_shift(X, mild) < shift
    # a rectangular probe (q < p) maps into fewer dimensions
    assert alignment_shift(X, np.eye(3, p)) > 0.05


def test_alignment_shift_equals_one_minus_compare():
    rng = np.random.default_rng(13)
    X = rng.standard_normal((25, 6))
    W = rng.standard_normal((4, 6))
    expected = 1.0 - _numpy_corr_cov(pdist(X, "sqeuclidean"), pdist(X @ W.T, "sqeuclidean"))
    assert alignment_shift(X, W) == pytest.approx(expected, abs=1e-10)


def test_alignment_shift_rejects_bad_input():
    rng = np.random.default_rng(14)
    X = rng.standard_normal((10, 5))
    with pytest.raises(ValueError, match=r"W must have shape \(q, p\) with p = X.shape\[1\] = 5"):
        alignment_shift(X, np.eye(4))
    with pytest.raises(ValueError, match="W must be a 2-D"):
        alignment_shift(X, np.ones(5))
    with pytest.raises(ValueError, match="at least 3 rows"):
        alignment_shift(X[:2], np.eye(5))
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="X contains 1 non-finite"):
        alignment_shift(Xn, np.eye(5))
    with pytest.raises(ValueError, match="W contains"):
        alignment_shift(X, np.full((5, 5), np.inf))


def test_geometry_properties_consistent():
    rng = np.random.default_rng(15)
    X = rng.standard_normal((30, 8))
    W = np.eye(8) + 0.3 * rng.standard_normal((8, 8))
    props = geometry_properties(X, W)
    assert set(props) == {"alignment_shift", "ed_before", "ed_after"}
    assert props["alignment_shift"] == pytest.approx(alignment_shift(X, W), abs=1e-12)
    assert props["ed_before"] == pytest.approx(participation_ratio(X), rel=1e-12)
    assert props["ed_after"] == pytest.approx(participation_ratio(X @ W.T), rel=1e-12)
