"""The symmetric phase of a reduced fit (docs/exact-fit.md, "Symmetric phase"): the same optimum
as one phase over all r x r matrices, both phases counted, max_iter capping both, under either
stopping rule."""

from __future__ import annotations

import dataclasses

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


def _record_lbfgs(monkeypatch) -> list:
    """Record (keyword arguments, result) of every optim.lbfgs call the fits make; the result is
    a copy (the fit adds the first phase's counts to the second's in place)."""
    calls = []
    original = objective.optim.lbfgs

    def recording(*args, **kw):
        res = original(*args, **kw)
        kept = dataclasses.replace(
            res, iterations=res.iterations.clone(), evaluations=res.evaluations.clone()
        )
        calls.append((kw, kept))
        return res

    monkeypatch.setattr(objective.optim, "lbfgs", recording)
    return calls


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
    calls = _record_lbfgs(monkeypatch)
    fits = _fit(d, spec, monkeypatch, 1e-5)
    # the symmetric phase, then the full one
    assert [kw.get("rel_tol") for kw, _ in calls] == [1e-5, 1e-12]
    (_, sym), (_, full) = calls
    for b, fit in enumerate(fits):
        assert fit.iterations == int(sym.iterations[b] + full.iterations[b])
        assert fit.evaluations == int(sym.evaluations[b] + full.evaluations[b])
        # the optimum over all A is symmetric (the polar factor is never worse)
        A = fit.A
        assert float((A - A.T).norm() / A.norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_symmetric_phase_keeps_its_iterates_symmetric(monkeypatch, dtype):
    """The phase maps y to A = D^-1 y D^-1 without symmetrising y again: its projected gradient
    keeps every iterate symmetric (to rounding), so that map is the objective over symmetric A."""
    d = make_problem(8, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    calls = _record_lbfgs(monkeypatch)
    _fit(d, spec, monkeypatch, 1e-5, dtype=dtype, rel_tol=1e-9)
    x = calls[0][1].x  # the symmetric phase's result, in its coordinates y
    q = int(x.shape[1] ** 0.5)
    y = x.reshape(-1, q, q).to(F64)
    assert float(y.norm()) > 0 and float((y - torch.eye(q, dtype=F64) * y).norm()) > 0
    asym = (y - y.transpose(1, 2)).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)
    assert float(asym.max()) < (1e-13 if dtype == torch.float64 else 1e-6)


def test_max_iter_caps_both_phases_together(monkeypatch):
    d = make_problem(7, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    free = _fit(d, spec, monkeypatch, 1e-5)
    cap = min(f.iterations for f in free) - 2
    capped = _fit(d, spec, monkeypatch, 1e-5, max_iter=cap)
    for fit in capped:
        assert fit.iterations <= cap
    assert not all(f.converged for f in capped)  # at least the shortest fit was cut


def test_the_paper_rule_runs_the_phase_then_its_own_test(monkeypatch):
    """Under the paper rule the fit also starts with the symmetric phase (its own 1e-5 test, no
    paper rule), then the column phase stops by the paper rule; both count. Like the one-phase
    paper fit, it ends a little above the optimum: the rule stops once a quasi-Newton direction
    promises less than 1e-4 per unit step. That bounds the model's predicted gain, not the gap;
    here the gap is within 1e-3 (the objectives are about 0.6)."""
    d = make_problem(8, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    calls = _record_lbfgs(monkeypatch)
    with_phase = _fit(d, spec, monkeypatch, 1e-5, stop="paper")
    phases = [(kw.get("rel_tol"), kw.get("paper") is None) for kw, _ in calls]
    assert phases == [(1e-5, True), (1e-12, False)]
    phase_iterations = calls[0][1].iterations
    calls.clear()
    without = _fit(d, spec, monkeypatch, None, stop="paper")
    assert len(calls) == 1 and calls[0][0].get("paper") is not None
    best = _fit(d, spec, monkeypatch, None)  # the optimum rule at rel_tol 1e-12: the optimum
    for b, (a, o, m) in enumerate(zip(with_phase, without, best, strict=True)):
        assert a.converged and o.converged
        assert a.iterations > int(phase_iterations[b])  # both phases counted
        for paper_fit in (a, o):
            assert -1e-9 < paper_fit.objective - m.objective < 1e-3
