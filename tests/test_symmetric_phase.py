"""The symmetric phases of a reduced fit (docs/exact-fit.md, "Symmetric phase", "Adapted
phase"): the same optimum as one phase over all r x r matrices, every phase counted, max_iter
capping them together, under either stopping rule; the adapted phase's curvature from the data
term's gradient with respect to M = A^T A, taken only by fits it suits (the others run the
symmetric phase on unchanged)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_probe import make_problem, naive_fit, problem_of, rel

from recovery_assets.core.probe import ProbeSpec, fit_probes, objective
from recovery_assets.core.probe.batching import _prepare

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


def test_the_symmetric_optimum_is_symmetric_and_every_phase_counts(monkeypatch):
    d = make_problem(6, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    calls = _record_lbfgs(monkeypatch)
    fits = _fit(d, spec, monkeypatch, 1e-5)
    # the symmetric phase (fits may leave it at ADAPT_AFTER), the adapted one, the column phase
    # for the fits the adapted phase did not end: under the optimum rule it runs to the rule's
    # own test, and a fit it ends is at an optimum of the whole problem
    (sym_kw, sym), (_, adapted), *column = calls
    assert sym_kw["release"][0] == objective.ADAPT_AFTER
    left = sym.released.nonzero().squeeze(-1).tolist()
    assert left  # (else this would not test the adapted phase)
    assert adapted.x.shape[0] == len(left)  # it runs those fits only
    ended = [b for i, b in enumerate(left) if adapted.converged[i]]
    rest = [b for b in range(len(fits)) if b not in ended]
    assert ended and rest  # (else this would not test both paths)
    tols = [1e-5, 1e-12, 1e-12]  # the adapted phase to the rule's own test
    assert [kw.get("rel_tol") for kw, _ in calls] == tols
    ((_, full),) = column
    assert full.x.shape[0] == len(rest)  # the column phase runs the others only
    for b, fit in enumerate(fits):
        parts = [(sym, b)] + ([(adapted, left.index(b))] if b in left else [])
        parts += [(full, rest.index(b))] if b in rest else []
        assert fit.iterations == sum(int(r.iterations[i]) for r, i in parts)
        assert fit.evaluations == sum(int(r.evaluations[i]) for r, i in parts)
        if b in left:
            assert int(sym.iterations[b]) >= objective.ADAPT_MIN_ITER
            assert int(adapted.iterations[left.index(b)]) > 0
        # the optimum over all A is symmetric (the polar factor is never worse)
        A = fit.A
        assert float((A - A.T).norm() / A.norm()) < 1e-4


def test_adapted_and_plain_symmetric_phases_reach_the_same_optimum(monkeypatch):
    d = make_problem(6, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    adapted = _fit(d, spec, monkeypatch, 1e-5)
    monkeypatch.setattr(objective, "ADAPT_AFTER", None)
    plain = _fit(d, spec, monkeypatch, 1e-5)
    for a, b in zip(adapted, plain, strict=True):
        assert a.converged and b.converged
        assert rel(a.objective, b.objective) < 1e-9
    # (else this would not test the adapted phase)
    assert any(a.iterations != b.iterations for a, b in zip(adapted, plain, strict=True))


@pytest.mark.parametrize("unsuited", ["too_few_iterations", "no_penalty"])
def test_a_fit_the_adapted_phase_does_not_suit_keeps_the_symmetric_path(monkeypatch, unsuited):
    """Fits that do not take the adapted phase run exactly as without it: the same symmetric run
    to SYMMETRIC_PHASE_TOL (one call), the same iterates, the same end."""
    d = make_problem(6, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    lams = [0.0, 0.0] if unsuited == "no_penalty" else LAMS
    if unsuited == "too_few_iterations":
        monkeypatch.setattr(objective, "ADAPT_MIN_ITER", 10**6)

    def fit(**kw):
        kw = {"dtype": F64, "rel_tol": 1e-12, "max_iter": 3000, **kw}
        return fit_probes([problem_of(d, lams)], spec, device="cpu", **kw)[0]

    calls = _record_lbfgs(monkeypatch)
    kept = fit()
    assert [kw.get("rel_tol") for kw, _ in calls] == [1e-5, 1e-12]
    assert not bool(calls[0][1].released.any())
    monkeypatch.setattr(objective, "ADAPT_AFTER", None)
    without = fit()
    for a, b in zip(kept, without, strict=True):
        assert (a.iterations, a.evaluations, a.objective) == (
            b.iterations,
            b.evaluations,
            b.objective,
        )
        assert torch.equal(a.A, b.A)


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
    paper rule; fits it suits leave it at ADAPT_AFTER for the adapted phase, to the same 1e-5),
    then the column phase stops by the paper rule; all count. Like the one-phase
    paper fit, it ends a little above the optimum: the rule stops once a quasi-Newton direction
    promises less than 1e-4 per unit step. That bounds the model's predicted gain, not the gap;
    here the gap is within 1e-3 (the objectives are about 0.6)."""
    d = make_problem(8, p=16, n_train=10, n_trip=200)
    spec = ProbeSpec.parse("full", "shrinkage")
    calls = _record_lbfgs(monkeypatch)
    with_phase = _fit(d, spec, monkeypatch, 1e-5, stop="paper")
    phases = [(kw.get("rel_tol"), kw.get("paper") is None) for kw, _ in calls]
    # the symmetric phase, the adapted phase (to the symmetric phase's own 1e-5), the column one
    assert phases == [(1e-5, True), (1e-5, True), (1e-12, False)]
    left = calls[0][1].released
    assert bool(left.any())
    phase_iterations = calls[0][1].iterations.clone()
    phase_iterations[left] += calls[1][1].iterations
    calls.clear()
    without = _fit(d, spec, monkeypatch, None, stop="paper")
    assert len(calls) == 1 and calls[0][0].get("paper") is not None
    best = _fit(d, spec, monkeypatch, None)  # the optimum rule at rel_tol 1e-12: the optimum
    for b, (a, o, m) in enumerate(zip(with_phase, without, best, strict=True)):
        assert a.converged and o.converged
        assert a.iterations > int(phase_iterations[b])  # both phases counted
        for paper_fit in (a, o):
            assert -1e-9 < paper_fit.objective - m.objective < 1e-3


def _context_objective(d, lams, dtype=F64):
    spec = ProbeSpec.parse("full", "shrinkage")
    ctx = _prepare(problem_of(d, lams), spec, "cpu", dtype, True)
    return ctx, objective._objective(ctx, spec, lams)


def test_the_metric_gradient_is_the_data_terms_gradient_with_respect_to_M():
    """``metric_gradient`` (the adapted phase's curvature) is diag(dL/dM) for the data term as a
    function of M = A^T A, checked by autograd on the plain formula S = U M U^T."""
    d = make_problem(9, p=16, n_train=10, n_trip=200)
    ctx, obj = _context_objective(d, [0.01, 0.3])
    q = ctx.X.shape[2]
    g = torch.Generator().manual_seed(0)
    A = torch.eye(q, dtype=F64) + 0.3 * torch.randn(2, q, q, generator=g, dtype=F64)
    A = (A + A.transpose(1, 2)) / 2
    D = obj.x0.reshape(2, q, q).diagonal(dim1=1, dim2=2)  # x0 = I D
    x = (A * D[:, None, :]).reshape(2, -1)
    got = obj.metric_gradient(x, torch.arange(2))
    torch.testing.assert_close(obj.metric_gradient(x[1:], torch.tensor([1]))[0], got[1])
    U = ctx.X[0]
    i, j, k = ctx.trip[0].unbind(-1)
    for b in range(2):
        M = (A[b].T @ A[b]).requires_grad_(True)
        S = U @ M @ U.T
        logits = torch.stack([S[j, k], S[i, k], S[i, j]], -1)
        chosen = torch.zeros(logits.shape[0], dtype=torch.long)  # ctx.trip: the chosen one first
        torch.nn.functional.cross_entropy(logits, chosen).backward()
        torch.testing.assert_close(got[b], M.grad.diagonal(), rtol=1e-10, atol=1e-12)
        assert float(M.grad.diagonal().abs().max()) > 1e-4


def test_the_adapted_scale_is_the_curvature_of_the_gradient_term():
    """Omega_ij = (a_i + a_j)^-1/2, a = g_M + lambda (floored), times D down the columns."""
    g_m = torch.tensor([[0.5, -0.01, 0.0]], dtype=F64)
    lam = torch.tensor([0.1], dtype=F64)
    D = torch.tensor([[1.0, 2.0, 4.0]], dtype=F64)
    scale = objective._adapted_scale(g_m + lam[:, None], lam, D)
    a = torch.tensor([0.6, 0.09, 0.1], dtype=F64)
    want = (a[:, None] + a[None, :]).rsqrt() * D[0][None, :]
    torch.testing.assert_close(scale[0], want)
    floored = objective._adapted_scale(torch.tensor([[-4.9, 1.1]], dtype=F64), lam, D[:, :2])
    assert float(floored[0, 0, 0]) == pytest.approx((2 * 0.01) ** -0.5 * 1.0)


def test_only_fits_the_adapted_phase_suits_take_it():
    """A fit takes the adapted phase with a penalty, at least ADAPT_MIN_ITER iterations behind it
    and a_e = g_e + lambda > 0 everywhere; its phase maps symmetric y to x = y * Omega D and
    back, for its own fits only."""
    d = make_problem(10, p=16, n_train=10, n_trip=200)
    ctx, obj = _context_objective(d, [0.01, 0.3, 0.0])
    q = ctx.X.shape[2]
    every = torch.arange(3)
    x = obj.x0 * 1.7
    enough = torch.full((3,), objective.ADAPT_MIN_ITER)
    ok, scale = obj.adapted_scale(x, every, enough)
    a = obj.metric_gradient(x, every) + obj.lam[:, None]
    want = (a > 0).all(-1) & (obj.lam > 0)
    assert ok.tolist() == want.tolist() and not bool(ok[2])  # lambda = 0 never
    assert scale.shape == (int(ok.sum()), q, q)
    assert not bool(obj.adapted_scale(x, every, enough - 1)[0].any())
    # a pull outwards (a_e <= 0 somewhere) keeps a fit out
    ok_neg, _ = obj.adapted_scale(x * 1e-3, every, enough)
    assert (obj.metric_gradient(x * 1e-3, every)[:2] + obj.lam[:2, None] <= 0).any(-1).any()
    assert (
        ok_neg.tolist()
        == (
            ((obj.metric_gradient(x * 1e-3, every) + obj.lam[:, None]) > 0).all(-1) & (obj.lam > 0)
        ).tolist()
    )

    s_ok, _ = obj.adapted_scale(x, torch.tensor([1]), enough[:1])
    assert bool(s_ok[0])
    _, s1 = obj.adapted_scale(x[1:2], torch.tensor([1]), enough[:1])
    _, to_x, from_x = obj.adapted(s1, torch.tensor([1]))
    y = torch.randn(1, q, q, dtype=F64)
    y = ((y + y.transpose(1, 2)) / 2).reshape(1, -1)
    torch.testing.assert_close(to_x(y), (y.reshape(1, q, q) * s1).reshape(1, -1))
    torch.testing.assert_close(from_x(to_x(y)), y)
