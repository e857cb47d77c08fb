"""The symmetric phase of a reduced fit (docs/exact-fit.md, "Symmetric phase"): the same optimum
as one phase over all r x r matrices, both phases counted, max_iter capping both, and the paper
rule left on its one-phase path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_probe import make_problem, naive_fit, problem_of, rel

from recovery_assets.core.probe import ProbeSpec, fit_probes, objective

F64 = torch.float64
LAMS = [0.01, 0.5]


def _fit(d, spec, monkeypatch, tol, **kw):
    monkeypatch.setattr(objective, "SYMMETRIC_PHASE_TOL", tol)
    kw = {"dtype": F64, "rel_tol": 1e-12, "max_iter": 3000, **kw}
    return fit_probes([problem_of(d, LAMS)], spec, device="cpu", **kw)[0]


def _similarity(fit, X):
    Z = X @ fit.matrix_tensor().T
    return Z @ Z.T


@pytest.mark.parametrize("penalty", ["shrinkage", "frobenius"])
def test_two_phases_reach_the_one_phase_optimum(monkeypatch, penalty):
    d = make_problem(5, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", penalty)
    two = _fit(d, spec, monkeypatch, 1e-5)
    one = _fit(d, spec, monkeypatch, None)
    for a, b in zip(two, one, strict=True):
        assert a.converged and b.converged
        assert rel(a.objective, b.objective) < 1e-9
        # the data term sees W only through the similarities: those agree, whatever rotation
        # (to the precision of a flat optimum: similarities are of order 1)
        torch.testing.assert_close(
            _similarity(a, d["X"]), _similarity(b, d["X"]), atol=1e-4, rtol=1e-3
        )
    _, f_ref = naive_fit(d, LAMS[-1], "full", penalty)  # the plain p x p fit, independently
    assert two[-1].objective <= f_ref + 1e-9 * abs(f_ref)


def test_the_symmetric_optimum_is_symmetric_and_both_phases_count(monkeypatch):
    d = make_problem(6, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    calls = []
    original = objective.optim.lbfgs

    def recording(*args, **kw):
        res = original(*args, **kw)
        calls.append((kw.get("rel_tol"), res.iterations.clone(), res.evaluations.clone()))
        return res

    monkeypatch.setattr(objective.optim, "lbfgs", recording)
    fits = _fit(d, spec, monkeypatch, 1e-5)
    assert [c[0] for c in calls] == [1e-5, 1e-12]  # the symmetric phase, then the full one
    for b, fit in enumerate(fits):
        assert fit.iterations == int(calls[0][1][b] + calls[1][1][b])
        assert fit.evaluations == int(calls[0][2][b] + calls[1][2][b])
        # the optimum over all A is symmetric (the polar factor is never worse)
        A = fit.A
        assert float((A - A.T).norm() / A.norm()) < 1e-4


def test_max_iter_caps_both_phases_together(monkeypatch):
    d = make_problem(7, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    free = _fit(d, spec, monkeypatch, 1e-5)
    cap = min(f.iterations for f in free) - 2
    capped = _fit(d, spec, monkeypatch, 1e-5, max_iter=cap)
    for fit in capped:
        assert fit.iterations <= cap
    assert not all(f.converged for f in capped)  # at least the shortest fit was cut


def test_the_paper_rule_keeps_one_phase(monkeypatch):
    d = make_problem(8, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    with_phase = _fit(d, spec, monkeypatch, 1e-5, stop="paper")
    without = _fit(d, spec, monkeypatch, None, stop="paper")
    for a, b in zip(with_phase, without, strict=True):
        assert a.iterations == b.iterations
        np.testing.assert_array_equal(a.A.numpy(), b.A.numpy())
