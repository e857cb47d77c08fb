"""The fitted result (docs/method.md §4) and the plain objective it is checked by.

``FittedProbe`` keeps one fitted transform in compact form (reduced: W = V A V^T + d (I - V V^T),
docs/exact-fit.md, "The reduction to an r x r problem"; or whole, diagonal, identity) and scores
concepts with it. ``probe_metrics`` / ``probe_objective`` evaluate §4's objective at a full W by
the plain formula (each penalty's ``reference``), independently of the fitter (docs/exact-fit.md,
"What is checked").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from recovery_assets.core.probe.data_term import logits_from_similarity, pair_index
from recovery_assets.core.probe.penalties import PENALTY
from recovery_assets.core.probe.reduction import features_for, pca_axes
from recovery_assets.core.probe.spec import ProbeSpec, _as_tensor


@dataclass
class FittedProbe:
    """One fitted transform in compact form, with what the fit reports.

    ``kind`` is ``reduced`` (W = V A V^T + d (I - V V^T), optionally after a PCA projection P),
    ``matrix`` (W stored whole, k x p or p x p), ``diagonal`` (W = diag(w)) or ``identity``.
    For ``pca:k`` the features are centred first: Z = (X - mu) W^T with ``mu`` the features' mean
    over all concepts (``centre``).
    """

    spec: ProbeSpec
    lam: float
    kind: str
    p: int
    A: torch.Tensor | None = None
    V: torch.Tensor | None = None
    d: float = 0.0
    P: torch.Tensor | None = None  # PCA axes (p x k) for pca:k
    mu: torch.Tensor | None = None  # pca:k: the features' mean (1 x p), subtracted first
    M: torch.Tensor | None = None
    w: torch.Tensor | None = None
    objective: float = float("nan")
    iterations: int = 0
    evaluations: int = 0
    converged: bool = True
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def matrix(self) -> np.ndarray:
        """The full transform W as float32 numpy, with Z = X @ W.T (pca:k: Z = (X - mu) @ W.T,
        see ``centre``).

        A reduced fit's W is formed in float32 (``matrix_tensor(torch.float32)``): within
        about one float32 rounding of the float64 product (at p = 4,096 the largest difference is
        6e-8 of W's largest entry, as is the float64 product's own rounding to float32), in half
        the time (the p x r x p product is most of a p = 4,096 ``fit-probe`` after the fit)."""
        return self.matrix_tensor(torch.float32).cpu().numpy()

    def matrix_tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full transform W in ``dtype`` (default: the fit's own, float64 when reduced); the
        r x r inner factor A - d I is formed in float64 first."""
        if self.kind == "identity":
            W = torch.eye(self.p, dtype=torch.float64)
        elif self.kind == "diagonal":
            W = torch.diag(self.w)
        elif self.kind == "matrix":
            W = self.M
        else:  # reduced: W = d I + V (A - d I) V^T in the (possibly PCA-projected) space
            V, inner = self.V, self.A.to(self.V.dtype).clone()
            inner.diagonal().sub_(self.d)
            if dtype is not None:
                V, inner = V.to(dtype), inner.to(dtype)
            W = (V @ inner) @ V.T
            W.diagonal().add_(self.d)  # without forming I (p x p)
        if self.P is not None:
            W = W @ self.P.T.to(W.dtype)
        return W if dtype is None else W.to(dtype)

    def centre(self, X: torch.Tensor) -> torch.Tensor:
        """The features as the transform sees them: X - mu for pca:k, else X itself."""
        return X if self.mu is None else X - self.mu.to(X.dtype)

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Z = X W^T (pca:k: (X - mu) W^T) for features X (n x p) in the fit's dtype and device."""
        if self.kind == "identity":
            return X
        if self.kind == "diagonal":
            return X * self.w.to(X.dtype)
        if self.P is not None:
            X = self.centre(X) @ self.P.to(X.dtype)
        if self.kind == "matrix":
            return X @ self.M.to(X.dtype).T
        V, A = self.V.to(X.dtype), self.A.to(X.dtype)
        C = X @ V
        return (C @ A.T) @ V.T + self.d * (X - C @ V.T)

    def similarity(self, X: torch.Tensor) -> torch.Tensor:
        """The n x n similarities s_ab = z_a . z_b of the given concepts' features."""
        if self.kind == "reduced":
            Xp = self.centre(X) @ self.P.to(X.dtype) if self.P is not None else X
            C = Xp @ self.V.to(X.dtype)
            Y = C @ self.A.to(X.dtype).T
            S = Y @ Y.T
            if self.d != 0.0:
                S = S + self.d**2 * (Xp @ Xp.T - C @ C.T)
            return S
        Z = self.transform(X)
        return Z @ Z.T


def probe_objective(W, features, triplets, answers, lam: float, spec: ProbeSpec) -> float:
    """§4's objective at a given full transform W (Z = X W^T), in float64: see ``probe_metrics``."""
    return probe_metrics(W, features, triplets, answers, lam, spec)["objective"]


def probe_metrics(
    W: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    triplets: np.ndarray | torch.Tensor,
    answers: np.ndarray | torch.Tensor,
    lam: float,
    spec: ProbeSpec,
) -> dict[str, float]:
    """Objective, accuracy and NLL (T = 1) of a full transform W on a triplet set, in float64.

    The objective is computed by the plain formula of §4: mean cross-entropy over the triplets +
    lambda * R(W). For ``pca:k`` W acts on the centred features (``features_for``) and the penalty
    applies to the k x k transform of the principal components, W P with P the PCA axes."""
    X = features_for(spec, _as_tensor(features, torch.float64, "cpu"))
    W = _as_tensor(W, torch.float64, "cpu")
    trip = torch.as_tensor(np.asarray(triplets), dtype=torch.long)
    ans = torch.as_tensor(np.asarray(answers), dtype=torch.long)
    concepts, local = torch.unique(trip.reshape(-1), return_inverse=True)
    Z = X[concepts] @ W.T
    n = Z.shape[0]
    pidx = pair_index(local.reshape(-1, 3), n).unsqueeze(0)
    logits = logits_from_similarity((Z @ Z.T).unsqueeze(0), pidx)
    ce = float(torch.nn.functional.cross_entropy(logits[0], ans))
    accuracy = float((logits[0].argmax(-1) == ans).to(torch.float64).mean())
    if spec.family == "pca":
        W = W @ pca_axes(X, spec.k)
    M = torch.diagonal(W) if spec.family == "diagonal" else W
    reg = PENALTY[spec.penalty].reference(M, spec.family)
    return {"objective": ce + lam * float(reg), "accuracy": accuracy, "nll": ce}
