"""TripletProbe, the scikit-learn-style estimator over the batched fitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from recovery_assets.core.estimator import ProbeInputError, TripletProbe
from recovery_assets.core.probe import FitProblem, ProbeSpec, fit_probes, probe_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def data(n=24, p=10, m=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) / np.sqrt(p)
    T = np.stack([rng.choice(n, 3, replace=False) for _ in range(m)])
    L = X @ (np.eye(p) + 0.5 * rng.standard_normal((p, p)) / np.sqrt(p)).T
    S = L @ L.T
    logits = 4 * np.stack([S[T[:, 1], T[:, 2]], S[T[:, 0], T[:, 2]], S[T[:, 0], T[:, 1]]], 1)
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    A = (rng.random(m)[:, None] > P.cumsum(1)).sum(1).clip(0, 2)
    return X, T, A


@pytest.mark.parametrize("family,penalty", [("full", "shrinkage"), ("pca:4", "frobenius")])
def test_fit_equals_the_batched_fitter(family, penalty):
    X, T, A = data()
    est = TripletProbe(family=family, penalty=penalty, lam=1e-2, dtype="float64").fit(X, T, A)
    spec = ProbeSpec.parse(family, penalty)
    fit = fit_probes([FitProblem(X, T, A, [1e-2])], spec, dtype=torch.float64)[0][0]
    np.testing.assert_array_equal(est.W_, fit.matrix())
    assert est.n_iter_ == fit.iterations and est.converged_ and est.n_features_in_ == 10
    assert est.objective_ == pytest.approx(probe_metrics(est.W_, X, T, A, 1e-2, spec)["objective"])
    if family == "pca:4":
        assert est.W_.shape == (4, 10)
        np.testing.assert_allclose(est.mean_, X.mean(0), rtol=1e-12)
        np.testing.assert_allclose(est.transform(X), (X - X.mean(0)) @ est.W_.T, rtol=1e-12)
    else:
        assert est.mean_ is None and est.W_.shape == (10, 10)


def test_predictions_probabilities_and_score():
    X, T, A = data(seed=1)
    train, test = slice(0, 200), slice(200, None)
    est = TripletProbe(lam=1e-3).fit(X, T[train], A[train])
    proba = est.predict_proba(X, T[test])
    assert proba.shape == (100, 3) and np.allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(proba.argmax(1), est.predict(X, T[test]))
    Z = est.transform(X)
    i, j, k = T[test].T
    sims = np.stack([(Z[j] * Z[k]).sum(1), (Z[i] * Z[k]).sum(1), (Z[i] * Z[j]).sum(1)], 1)
    np.testing.assert_allclose(est.decision_function(X, T[test]), sims, rtol=1e-10)
    assert est.score(X, T[test], A[test]) == pytest.approx((sims.argmax(1) == A[test]).mean())
    # the fit learns: better than the identity on held-out triplets
    identity = TripletProbe(family="zero_shot").fit(X, T[train], A[train])
    assert est.score(X, T[train], A[train]) > identity.score(X, T[train], A[train])


def test_params_clone_and_the_stopping_rule():
    est = TripletProbe(lam=0.1, stop="paper", max_iter=50)
    assert est.get_params()["stop"] == "paper"
    copy = clone(est).set_params(lam=0.5)
    assert copy.lam == 0.5 and est.lam == 0.1
    X, T, A = data(seed=2)
    paper = est.fit(X, T, A)
    assert paper.n_iter_ <= 50
    capped = TripletProbe(max_iter=2).fit(X, T, A)
    assert capped.n_iter_ == 2 and not capped.converged_


def test_bad_input_names_the_array():
    X, T, A = data()
    bad = T.copy()
    bad[5] = [1, 1, 2]
    with pytest.raises(ProbeInputError, match="triplets: row 5 repeats a concept"):
        TripletProbe().fit(X, bad, A)
    with pytest.raises(ProbeInputError, match="answers: answers must be 0, 1 or 2"):
        TripletProbe().fit(X, T, A + 3)
    Xn = X.copy()
    Xn[2, 3] = np.nan
    with pytest.raises(ProbeInputError, match="X: 1 NaN or inf values"):
        TripletProbe().fit(Xn, T, A)
    with pytest.raises(ValueError, match="not fitted yet"):
        TripletProbe().predict(X, T)
    est = TripletProbe().fit(X, T, A)
    with pytest.raises(ProbeInputError, match="expected 10 feature columns"):
        est.transform(X[:, :4])
    with pytest.raises(ValueError, match="unknown stopping rule"):
        TripletProbe(stop="soon").fit(X, T, A)


def test_the_documented_example_runs(capsys):
    """docs/estimator.md's example runs as shown, and the probe beats the zero-shot one there."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "estimator.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/estimator.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert printed.strip() in doc  # the output shown is the output it gives
    probe, zero_shot = scope["probe"], scope["zero_shot"]
    assert probe.converged_
    X, test, y_test = scope["X"], scope["test"], scope["y_test"]
    assert probe.score(X, test, y_test) > zero_shot.score(X, test, y_test)
