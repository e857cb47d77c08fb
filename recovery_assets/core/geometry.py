"""Representational geometry of a model's features before and after its probe.

(docs/method.md §3, §4, §8.)

The regression of misidentification (docs/method.md §8) describes every model by, among other
properties, how much its human-fitted generator probe reshapes its representational geometry and
how many dimensions its features effectively use. This module computes those quantities from a
model's raw feature matrix X (n concepts x p features; docs/method.md §3: features are used
raw, with no centring or scaling) and its probe W (q x p; transformed features Z = X W^T,
docs/method.md §4).

* Representational dissimilarity matrices (RDMs) are Euclidean over all concepts, computed with
  rsatoolbox 0.3.2 (``calc_rdm(Dataset(X), method="euclidean")``). rsatoolbox's "euclidean" RDM
  holds squared Euclidean distances divided by the number of features; the division is a global
  scale and does not affect any comparison below.
* RDMs are compared by the whitened correlation ``compare(rdm1, rdm2, method="corr_cov")``
  (Diedrichsen et al., 2021). With no pattern covariance supplied, rsatoolbox evaluates it as
  follows: subtract the mean dissimilarity from each RDM's off-diagonal entries, convert the
  result to a double-centred second-moment matrix G = -1/2 H D H (H the centring matrix), and take
  the cosine of the two G matrices under the Frobenius inner product.
* The alignment-induced shift is 1 - RSA(RDM(X), RDM(X W^T)) (docs/method.md §8): 0 when the probe
  leaves the geometry unchanged (e.g. W = I or any scaled rotation), growing as the probe distorts
  it.
* Effective dimensionality is the participation ratio (sum l_i)^2 / sum l_i^2 of the PCA
  eigenvalues l_i of the column-centred features (docs/method.md §8), computed in float64.

All functions are pure numpy/rsatoolbox code and validate their inputs, raising ``ValueError``
with a message naming the offending argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import rsatoolbox

__all__ = [
    "alignment_shift",
    "compare_rdms",
    "euclidean_rdm",
    "geometry_properties",
    "participation_ratio",
    "transformed_features",
]

_MIN_CONCEPTS_RDM = 3


def _as_matrix(a: Any, name: str, *, min_rows: int = 1) -> np.ndarray:
    """Return ``a`` as a finite 2-D float64 array, or raise ``ValueError`` saying what is wrong."""
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array, got {type(a).__name__}: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def _transform(X: np.ndarray, W: Any) -> np.ndarray:
    """Z = X W^T for a validated X (n x p) and a probe W of shape (q, p)."""
    W = _as_matrix(W, "W")
    if W.shape[1] != X.shape[1]:
        raise ValueError(
            f"W must have shape (q, p) with p = X.shape[1] = {X.shape[1]}, got W.shape = {W.shape}"
        )
    return X @ W.T


def transformed_features(X: Any, W: Any) -> np.ndarray:
    """A model's features through its probe, Z = X W^T (docs/method.md §4): for the human-fitted
    generator probe, the model's human-fitted representation.

    Parameters
    ----------
    X : array-like, shape (n, p)
        Features of the n concepts (as the probe sees them: ``probe.features_for``).
    W : array-like, shape (q, p)
        The probe's linear map.

    Returns
    -------
    numpy.ndarray, shape (n, q), float64
    """
    return _transform(_as_matrix(X, "X"), W)


def euclidean_rdm(X: Any) -> rsatoolbox.rdm.RDMs:
    """Euclidean RDM over all concepts (rows) of a feature matrix (docs/method.md §8).

    Uses ``rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method="euclidean")``; the returned
    RDMs object holds one RDM with entries ||x_a - x_b||^2 / p for a < b.

    Parameters
    ----------
    X : array-like, shape (n, p)
        Features, one row per concept, n >= 3, all finite. Converted to float64.

    Returns
    -------
    rsatoolbox.rdm.RDMs
        A single RDM over the n concepts.
    """
    X = _as_matrix(X, "X", min_rows=_MIN_CONCEPTS_RDM)
    return rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method="euclidean")


def _rdm_vector(rdm: Any, name: str) -> np.ndarray:
    """The upper-triangular dissimilarity vector of a single RDM (RDMs object or 1-D array)."""
    if isinstance(rdm, rsatoolbox.rdm.RDMs):
        if rdm.n_rdm != 1:
            raise ValueError(f"{name} must hold exactly one RDM, got {rdm.n_rdm}")
        vec = np.asarray(rdm.get_vectors(), dtype=np.float64).ravel()
    else:
        vec = np.asarray(rdm, dtype=np.float64)
        if vec.ndim == 2 and vec.shape[0] == 1:
            vec = vec.ravel()
        if vec.ndim != 1:
            raise ValueError(
                f"{name} must be an rsatoolbox RDMs object or a 1-D dissimilarity vector, "
                f"got an array of shape {vec.shape}"
            )
    n_cond = (1.0 + np.sqrt(1.0 + 8.0 * vec.size)) / 2.0
    if vec.size < 3 or n_cond != np.floor(n_cond):
        raise ValueError(
            f"{name} has {vec.size} dissimilarities, which is not n(n-1)/2 for any n >= 3"
        )
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"{name} contains non-finite dissimilarities (NaN or inf)")
    return vec


def compare_rdms(rdm1: Any, rdm2: Any) -> float:
    """Whitened-correlation ("corr_cov") similarity of two RDMs (docs/method.md §8).

    Uses ``rsatoolbox.rdm.compare(rdm1, rdm2, method="corr_cov")`` with no pattern covariance,
    which is the cosine, under the Frobenius inner product, of the two double-centred
    second-moment matrices implied by the mean-subtracted RDMs. The result is symmetric in its
    arguments, lies in [-1, 1], and equals 1 for an RDM compared with itself (or with any positive
    multiple of itself).

    Parameters
    ----------
    rdm1, rdm2 : rsatoolbox.rdm.RDMs or array-like
        Each a single RDM over the same number of concepts: an RDMs object holding one RDM, or its
        1-D upper-triangular dissimilarity vector.

    Returns
    -------
    float
        The whitened correlation.

    Raises
    ------
    ValueError
        If an argument does not hold exactly one finite RDM, the two differ in size, or an RDM has
        no variance (all dissimilarities equal), which leaves the correlation undefined.
    """
    v1 = _rdm_vector(rdm1, "rdm1")
    v2 = _rdm_vector(rdm2, "rdm2")
    if v1.size != v2.size:
        raise ValueError(
            f"rdm1 and rdm2 must cover the same concepts: they have {v1.size} and {v2.size} "
            "dissimilarities"
        )
    for vec, name in ((v1, "rdm1"), (v2, "rdm2")):
        if np.ptp(vec) <= 1e-12 * max(float(np.max(np.abs(vec))), np.finfo(np.float64).tiny):
            raise ValueError(
                f"{name} has no variance (all dissimilarities equal); its correlation is undefined"
            )
    sim = rsatoolbox.rdm.compare(v1, v2, method="corr_cov")
    value = float(np.asarray(sim).ravel()[0])
    if not np.isfinite(value):
        raise ValueError("the whitened correlation of rdm1 and rdm2 is undefined (non-finite)")
    return value


def alignment_shift(X: Any, W: Any) -> float:
    """Alignment-induced geometry shift 1 - RSA(RDM(X), RDM(X W^T)) (docs/method.md §8).

    RDMs are Euclidean over all concepts (:func:`euclidean_rdm`) and compared by whitened
    correlation (:func:`compare_rdms`). W is the model's human-fitted generator probe of shape
    (q, p), so the transformed features are Z = X W^T (docs/method.md §4). The shift is 0 for
    W = I (and for any scaled orthogonal W) and lies in [0, 2].

    Parameters
    ----------
    X : array-like, shape (n, p)
        Raw features of the n concepts (n >= 3).
    W : array-like, shape (q, p)
        The probe's linear map.

    Returns
    -------
    float
    """
    X = _as_matrix(X, "X", min_rows=_MIN_CONCEPTS_RDM)
    Z = _transform(X, W)
    return 1.0 - compare_rdms(euclidean_rdm(X), euclidean_rdm(Z))


def participation_ratio(X: Any) -> float:
    """Effective dimensionality: participation ratio of the PCA eigenvalues (docs/method.md §8).

    With X_c the column-centred features (n x p) and s_i its singular values, the PCA eigenvalues
    are l_i = s_i^2 / (n - 1) and the participation ratio is

        PR = (sum_i l_i)^2 / sum_i l_i^2 = (sum_i s_i^2)^2 / sum_i s_i^4,

    which does not depend on the 1 / (n - 1) normalisation. PR ranges from 1 (one direction
    carries all variance) to rank(X_c) (variance spread equally over all directions).

    The two spectral sums are obtained without a decomposition from the smaller Gram matrix
    K (K = X_c X_c^T, n x n, when n <= p; otherwise X_c^T X_c, p x p), whose eigenvalues are the
    s_i^2: sum s_i^2 = tr K and sum s_i^4 = ||K||_F^2. This is exact, costs one matrix product, and
    is computed in float64.

    Parameters
    ----------
    X : array-like, shape (n, p)
        Features, n >= 2, all finite.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If X is not a finite 2-D array with at least two rows, or has no variance after centring.
    """
    X = _as_matrix(X, "X", min_rows=2)
    Xc = X - X.mean(axis=0, keepdims=True)
    n, p = Xc.shape
    gram = Xc @ Xc.T if n <= p else Xc.T @ Xc
    total = float(np.trace(gram))
    sum_sq = float(np.sum(gram * gram))
    scale = float(np.sum(X * X))
    if total <= 1e-24 * max(scale, np.finfo(np.float64).tiny) or sum_sq == 0.0:
        raise ValueError(
            "X has no variance after centring (all rows identical); its participation ratio "
            "is undefined"
        )
    return total * total / sum_sq


def geometry_properties(X: Any, W: Any) -> dict[str, float]:
    """The three geometry predictors of one model (docs/method.md §8) in one call.

    Returns a dict with ``alignment_shift`` (:func:`alignment_shift`), ``ed_before`` (participation
    ratio of X) and ``ed_after`` (participation ratio of Z = X W^T), the column names the
    regression's per-model property table uses.
    """
    X = _as_matrix(X, "X", min_rows=_MIN_CONCEPTS_RDM)
    Z = _transform(X, W)
    shift = 1.0 - compare_rdms(euclidean_rdm(X), euclidean_rdm(Z))
    return {
        "alignment_shift": shift,
        "ed_before": participation_ratio(X),
        "ed_after": participation_ratio(Z),
    }
