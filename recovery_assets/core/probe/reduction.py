"""The exact reduction to an r x r problem (docs/exact-fit.md, "The reduction to an r x r
problem"; docs/method.md §4, "Exact and cheap") and the features a transform acts on.

For ``full`` (and ``pca:k``) with a rotation-invariant penalty (shrinkage, Frobenius:
``_uses_reduction``), let V (p x r) be an orthonormal basis of the row space of the training
concepts' features (``row_space_basis``). Gradient steps from W = I keep
W = V A V^T + d (I - V V^T), and the loss depends on A alone through the training coordinates
U = X_train V. The scalar d enters only the penalty, so it is profiled out in closed form:

- shrinkage: ||W - alpha I||^2 = ||A||^2 + (p - r) d^2 - (tr A + (p - r) d)^2 / p is minimised
  at d = tr A / r, where it equals ||A - (tr A / r) I_r||^2: the r x r problem's shrinkage penalty.
- frobenius: ||A||^2 + (p - r) d^2 is minimised at d = 0.

So the fit is an r x r problem with the same penalty form, and its optimum is the optimum of the
p x p problem (the profiled d: ``penalties.Penalty.scale``). Held-out concepts are scored with the
full W: their part outside V is scaled by d, so s_ab = (A c_a) . (A c_b) + d^2 (x_a . x_b - c_a .
c_b) with c = V^T x (``fitted.FittedProbe``). The L1 penalty and the diagonal family are not
rotation invariant; they are fitted in their own coordinates.

The basis tricks of docs/exact-fit.md, "CPU specifics" (``_reduce``): large CPU problems take a
tail-triangular basis (``_triangular_tail``, "Tail-triangular basis") and large problems are
padded to a BLAS-friendly size ("Padding"). ``features_for`` and ``pca_axes``: the centred
features and principal axes of ``pca:k``.

PAD_TO, PAD_MIN and TRI_MIN are read at call time from this module: change them here
(``reduction.TRI_MIN``), not on the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recovery_assets.core.probe.penalties import PENALTY
from recovery_assets.core.probe.spec import ProbeSpec

# Reduced problems of r >= PAD_MIN coordinates are padded with zero columns to a multiple of
# PAD_TO (exact: masked as in ``batching._merge``, the padding's block of A stays zero). BLAS runs
# odd sizes far below peak: on the 2-core CPU the two r x r products of an iteration take 8-34%
# less time at r = 304, 512, 704, 880, 1008, 1216 than at 301, 509, 700, 865, 1001, 1201.
PAD_TO = 16
PAD_MIN = 256
# Reduced CPU problems of r >= TRI_MIN take a basis in which the training features C are dense in
# their leading columns (the directions of above-average variance) and lower-trapezoidal in the
# rest (``_triangular_tail``). The basis change is orthogonal and the fit is exactly the same; the
# two feature products of an iteration then skip the zero blocks (``kernels._image``,
# ``kernels._back``), in about kernels.TRI_ROWS concepts per block.
TRI_MIN = 256


def row_space_basis(Xt: torch.Tensor):
    """Orthonormal basis V (p x r) of the row space of Xt (m x p), and the coordinates U = Xt V.

    Computed in float64 from the eigendecomposition of the smaller Gram matrix, then made exactly
    orthonormal (``_orthonormal``). r counts the singular values above
    sqrt(max(m, p) * eps) * s_max: directions below that carry under 1e-12 of the training
    similarities' scale.
    """
    X64 = Xt.to(torch.float64)
    m, p = X64.shape
    small_side = m <= p
    K = X64 @ X64.T if small_side else X64.T @ X64
    lam, vec = torch.linalg.eigh(K)
    lam, vec = lam.flip(0), vec.flip(1)
    if lam.numel() == 0 or float(lam[0]) <= 0.0:
        raise ValueError("the training concepts' features are all zero: nothing to fit")
    s = lam.clamp_min(0).sqrt()
    r = int((s > math.sqrt(max(m, p) * torch.finfo(torch.float64).eps) * s[0]).sum())
    V = X64.T @ (vec[:, :r] / s[:r]) if small_side else vec[:, :r]
    V = _orthonormal(V)
    return V.contiguous(), X64 @ V


def _orthonormal(V: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of a nearly orthonormal V (p x r, float64).

    V = X^T v / s from the Gram matrix's eigenvectors is orthonormal to within about
    eps (s_max / s_min)^2 <= 1e-3 (the cut-off on s). When ||V^T V - I||_F < 1/2 the eigenvalues
    of V^T V lie in [1/2, 3/2], and one Cholesky QR step, V R^-1 with R^T R = V^T V, leaves V
    orthonormal to rounding: two BLAS-3 products instead of a Householder QR (at p = 4,096,
    r = 865 ``row_space_basis`` takes 0.43 s against 0.62 s with the QR on the 2-core machine).
    A V further from orthonormal takes the Householder QR.
    """
    G = V.T @ V
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    if float(torch.linalg.matrix_norm(G - eye)) >= 0.5:
        return torch.linalg.qr(V)[0]
    return torch.linalg.solve_triangular(torch.linalg.cholesky(G), V.T, upper=False).T


def _triangular_tail(V: torch.Tensor, C: torch.Tensor):
    """Rotate the basis so that the coordinates C = Xt V are lower-trapezoidal after their leading
    columns; returns (V, C, lead).

    The leading ``lead`` columns (the directions whose variance is above the mean) stay as they
    are. The rest, C_t, is replaced by C_t Q = R^T from the QR decomposition C_t^T = Q R, so its
    column j is exactly zero on the first j concepts. Q is orthogonal, so this is the same fit in
    other coordinates; the column preconditioner of ``objective._objective`` is then nearly
    constant on the rotated block (its scale is sqrt(sigma^2 / mean + flat), flat =
    ``objective.precond_flat(lambda)``, with sigma^2 <= mean), which is why the iterations stay
    the same (a fully triangular basis costs about 38% more of them).
    """
    s2 = (C * C).sum(0)
    lead = int((s2 > s2.mean()).sum())
    if lead >= C.shape[1] - 1:
        return V, C, None
    Q, R = torch.linalg.qr(C[:, lead:].T)
    V = torch.cat([V[:, :lead], V[:, lead:] @ Q], 1).contiguous()
    C = torch.cat([C[:, :lead], R.T], 1)
    return V, C, lead


def features_for(spec: ProbeSpec, X):
    """The features a full transform W of ``spec`` acts on: X centred over its rows (all
    concepts) for ``pca:k``, X itself otherwise; numpy in, float64 numpy out, torch stays torch."""
    if spec.family != "pca":
        return X
    if isinstance(X, torch.Tensor):
        return X - X.mean(0, keepdim=True)
    X = np.asarray(X, dtype=np.float64)
    return X - X.mean(0, keepdims=True)


def pca_axes(X: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading principal axes (p x k) of the centred features (float64)."""
    X64 = X.to(torch.float64)
    Xc = X64 - X64.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    if k > Vh.shape[0]:
        raise ValueError(
            f"pca:{k} asks for {k} components but the features have at most {Vh.shape[0]}"
        )
    return Vh[:k].T.contiguous()


def _reduce(Xt: torch.Tensor, device):
    """The reduced fitting coordinates of the training features Xt (m x p): (V, C, lead, r).

    C = Xt V in a basis of the row space (``row_space_basis``), tail-triangular on the CPU from
    r >= TRI_MIN (``_triangular_tail``; ``lead`` its dense columns, else None), padded with zero
    columns to a multiple of PAD_TO from r >= PAD_MIN; r is the dimension before padding.
    """
    lead = None
    V, Xt = row_space_basis(Xt)
    if Xt.shape[1] >= TRI_MIN and torch.device(device).type == "cpu":
        V, Xt, lead = _triangular_tail(V, Xt)
    r = Xt.shape[1]
    if r >= PAD_MIN:
        Xt = torch.nn.functional.pad(Xt, (0, -r % PAD_TO))
    return V, Xt, lead, r


def _uses_reduction(spec: ProbeSpec) -> bool:
    return spec.family in ("full", "pca") and PENALTY[spec.penalty].rotation_invariant
