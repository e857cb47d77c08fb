"""The probe as a scikit-learn-style estimator, for notebooks: ``TripletProbe``.

It wraps the batched fitter (:func:`~recovery_assets.core.probe.fit_probes`, docs/method.md §4)
for one probe: ``fit(X, triplets, answers)``, then ``transform``, ``predict_proba``, ``predict``
and ``score`` on any features and triplets. ``get_params`` / ``set_params`` / ``clone`` come from
scikit-learn's ``BaseEstimator``.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator

from recovery_assets.core.generator import triplet_logits
from recovery_assets.core.probe import FitProblem, ProbeSpec, fit_probes, probe_metrics
from recovery_assets.core.probe.inputs import ProbeInputError, check_probe_inputs

__all__ = ["ProbeInputError", "TripletProbe", "check_probe_inputs"]


class TripletProbe(BaseEstimator):
    """A linear probe of odd-one-out choices (docs/method.md §4), fitted from the identity.

    Z = X W^T; for a triplet (i, j, k) the logits are [z_j.z_k, z_i.z_k, z_i.z_j] (position 0:
    "i is the odd one out"), and the fit minimises the mean cross-entropy of the observed
    positions plus ``lam`` times the penalty.

    Parameters
    ----------
    family : str, default "full"
        ``full``, ``diagonal``, ``rank:k``, ``zero_shot`` or ``pca:k``.
    penalty : str, default "shrinkage"
        ``shrinkage``, ``frobenius`` or ``l1``.
    lam : float, default 1e-4
        Penalty weight lambda (>= 0).
    stop : {"optimum", "paper"}, default "optimum"
        Stopping rule: run to the optimum, or stop where the published fits' L-BFGS settings do.
    max_iter : int, default 1000
        Iteration cap; a fit that reaches it has ``converged_`` False.
    device : str, default "cpu"
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    dtype : {"float32", "float64"}, default "float32"
        Precision of the fitter's matrix products (the loss is accumulated in float64).

    Attributes
    ----------
    W_ : ndarray of shape (k, p)
        The fitted transform (k = p, except for ``rank:k`` and ``pca:k``).
    mean_ : ndarray of shape (p,) or None
        ``pca:k`` only: the training features' mean, subtracted before ``W_`` is applied.
    n_iter_ : int
        Iterations taken.
    converged_ : bool
        Whether a stopping rule other than ``max_iter`` ended the fit.
    objective_ : float
        The objective at ``W_`` on the training triplets (float64, the plain formula).
    n_features_in_ : int
        p, the number of feature columns seen in ``fit``.

    Examples
    --------
    >>> probe = TripletProbe(lam=1e-3).fit(X, triplets, answers)     # doctest: +SKIP
    >>> probe.score(X, test_triplets, test_answers)                   # doctest: +SKIP
    """

    def __init__(
        self,
        family: str = "full",
        penalty: str = "shrinkage",
        lam: float = 1e-4,
        stop: str = "optimum",
        max_iter: int = 1000,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        self.family = family
        self.penalty = penalty
        self.lam = lam
        self.stop = stop
        self.max_iter = max_iter
        self.device = device
        self.dtype = dtype

    def fit(self, X, triplets, answers) -> TripletProbe:
        """Fit W on the triplets' answers (positions of the odd one out, 0-2). Returns self."""
        import torch

        spec = ProbeSpec.parse(self.family, self.penalty)
        check_probe_inputs(X, triplets, answers)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        X = np.asarray(X)
        problem = FitProblem(X, np.asarray(triplets), np.asarray(answers), [float(self.lam)])
        fit = fit_probes(
            [problem],
            spec,
            device=self.device,
            dtype=getattr(torch, self.dtype),
            max_iter=int(self.max_iter),
            stop=self.stop,
        )[0][0]
        self.W_ = fit.matrix()
        self.mean_ = None if fit.mu is None else fit.mu.detach().cpu().numpy().reshape(-1)
        self.n_iter_ = int(fit.iterations)
        self.converged_ = bool(fit.converged)
        self.objective_ = probe_metrics(self.W_, X, triplets, answers, float(self.lam), spec)[
            "objective"
        ]
        self.n_features_in_ = X.shape[1]
        return self

    def _check_fitted(self, X) -> np.ndarray:
        if not hasattr(self, "W_"):
            raise ValueError("this TripletProbe is not fitted yet: call fit(X, triplets, answers)")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ProbeInputError(
                f"X: expected {self.n_features_in_} feature columns (as in fit), got shape "
                f"{X.shape}"
            )
        return X

    def transform(self, X) -> np.ndarray:
        """The transformed features Z = X W^T (``pca:k``: (X - mean_) W^T), shape (n, k)."""
        X = self._check_fitted(X)
        if self.mean_ is not None:
            X = X - self.mean_
        return X @ self.W_.astype(np.float64).T

    def decision_function(self, X, triplets) -> np.ndarray:
        """The (m, 3) logits of the triplets at temperature 1."""
        X = self._check_fitted(X)
        check_probe_inputs(X, triplets)
        return triplet_logits(self.transform(X), np.asarray(triplets))

    def predict_proba(self, X, triplets) -> np.ndarray:
        """(m, 3) choice probabilities: softmax of the logits, column c = P(position c is odd)."""
        from scipy.special import softmax

        return softmax(self.decision_function(X, triplets), axis=1)

    def predict(self, X, triplets) -> np.ndarray:
        """(m,) the predicted odd one's position (the most probable, 0-2)."""
        return self.decision_function(X, triplets).argmax(1)

    def score(self, X, triplets, answers) -> float:
        """Accuracy: the fraction of triplets whose predicted position equals the answer."""
        check_probe_inputs(X, triplets, answers)
        return float((self.predict(X, triplets) == np.asarray(answers)).mean())
