"""The ray step (docs/exact-fit.md, "Ray step"): after every accepted L-BFGS step the fit moves to
the best point on the ray through it (W scaled by c), found in closed form from the point's
logits. Its value equals the objective evaluated afresh at the scaled point, in every family and
smooth penalty; its t is the exact 1-D optimum; the optimiser takes it only where it is lower;
and fits with it reach the optimum of fits without it."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import brentq
from test_probe import make_problem, problem_of, rel

from recovery_assets.core import optim
from recovery_assets.core.probe import ProbeSpec, fit_probes, objective
from recovery_assets.core.probe.batching import _prepare
from recovery_assets.core.probe.data_term import answer_first

F64 = torch.float64


@pytest.mark.parametrize(
    "family, penalty, reduce",
    [
        ("full", "shrinkage", True),
        ("full", "frobenius", True),
        ("full", "shrinkage", False),
        ("diagonal", "shrinkage", False),
        ("rank:3", "shrinkage", False),  # R is of degree 4 in the rank family's M
        ("rank:3", "frobenius", False),
    ],
)
def test_the_ray_value_is_the_objective_at_the_scaled_point(family, penalty, reduce):
    """For each fit, ray(aux) returns t, and f and aux equal to ``value`` taken afresh at
    c x (c = sqrt(t)): the logits scale by t and the penalty by t^(degree / 2)."""
    d = make_problem(11, p=12, n_train=10, n_trip=150)
    spec = ProbeSpec.parse(family, penalty)
    lams = [5e-4, 2e-3]
    ctx = _prepare(problem_of(d, lams), spec, "cpu", F64, reduce)
    obj = objective._objective(ctx, spec, lams)
    split = obj.split
    assert split.ray is not None
    g = torch.Generator().manual_seed(1)
    x = obj.x0 + 0.05 * torch.randn(obj.x0.shape, generator=g, dtype=F64)
    idx = torch.arange(len(lams))
    for _ in range(8):  # to the ray's optimum (each ray step is bounded), then off it
        t, _, _ = split.ray(split.value(split.image(x, idx), x, idx)[1], idx)
        x = x * torch.sqrt(t)[:, None]
    x = x * 0.8
    f, aux = split.value(split.image(x, idx), x, idx)
    t, f_t, aux_t = split.ray(aux, idx)
    assert bool(((t - 1).abs() > 1e-3).all())  # a real move (else this tests nothing)
    assert bool(((t > 1 / objective.RAY_BOUND) & (t < objective.RAY_BOUND)).all())  # not a bound
    xc = x * torch.sqrt(t)[:, None]
    f_c, aux_c = split.value(split.image(xc, idx), xc, idx)
    torch.testing.assert_close(f_t, f_c, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(aux_t, aux_c, rtol=1e-10, atol=1e-12)
    assert bool((f_t < f).all())  # the ray's best point is lower than where it started
    for s in (0.97, 1.03):  # and it is the best on the ray: nearby scales are not lower
        xs = xc * s
        f_s, _ = split.value(split.image(xs, idx), xs, idx)
        assert bool((f_s > f_t).all())


def test_the_ray_search_finds_the_exact_one_dimensional_optimum(monkeypatch):
    """t = argmin CE(t L) + pen t^power within [1 / RAY_BOUND, RAY_BOUND], against a root finder
    on the slope written afresh, for power 1 and 2; a fit whose optimum lies beyond the bound
    (separable, no penalty) stops at the bound; a few slope evaluations each."""
    gen = torch.Generator().manual_seed(5)
    N = 300
    L = torch.randn(4, N, 3, generator=gen, dtype=F64)
    L[:3] = L[0] * 0.5  # fits 0-2: one problem whose optima lie above t = 1
    favoured = L[0].argmax(-1)
    ans = torch.where(torch.rand(N, generator=gen) < 0.55, favoured, torch.randint(0, 3, (N,)))
    answers = torch.stack([ans, ans, ans, L[3].argmax(-1)])
    w = torch.full((N,), 1.0 / N, dtype=F64)
    pen = torch.tensor([0.05, 0.05, 0.01, 0.0], dtype=F64)
    powers = [1.0, 2.0, 1.0, 1.0]
    got = [
        float(
            objective._ray_search(
                answer_first(L[b : b + 1], answers[b]), w, pen[b : b + 1], powers[b]
            )
        )
        for b in range(4)
    ]

    def slope(t, b):
        P = torch.softmax(t * L[b], -1)
        chosen = L[b].gather(-1, answers[b, :, None])[:, 0]
        data = (w * ((P * L[b]).sum(-1) - chosen)).sum()
        return float(data + pen[b] * powers[b] * t ** (powers[b] - 1))

    for b in range(3):
        want = brentq(slope, 1e-3, 1e3, args=(b,), xtol=1e-14)
        assert 1 / objective.RAY_BOUND < want < objective.RAY_BOUND, want
        assert abs(got[b] - want) <= 1e-8 * want, (b, got[b], want)
    assert got[0] < got[2]  # a larger linear penalty pulls t down
    assert got[3] == pytest.approx(objective.RAY_BOUND, rel=1e-12)  # separable: the bound
    calls = []
    original = objective._ray_slope

    def counting(*a, **k):
        inner = original(*a, **k)
        return lambda *x, **y: calls.append(1) or inner(*x, **y)

    monkeypatch.setattr(objective, "_ray_slope", counting)
    objective._ray_search(answer_first(L[:3], ans), w, pen[:3], 1.0)
    assert 0 < len(calls) <= objective.RAY_STEPS


def _toy(K, ray_of):
    """sum softplus(K x) + |x|^2 / 2 as a split objective whose aux carries (K x, |x|^2): the value
    along the ray c x is softplus(c K x) + c^2 |x|^2 / 2, known from aux alone. ``ray_of(z, sq,
    idx)`` -> t proposes the ray's point."""
    calls = []

    def image(x, idx):
        return torch.einsum("bmp,bp->bm", K[idx], x)

    def value(z, x, idx):
        sq = (x * x).sum(-1)
        return _toy_f(z, sq), torch.cat([z, sq[:, None]], -1)

    def gradient(z, x, aux, idx):
        return torch.einsum("bmp,bm->bp", K[idx], torch.sigmoid(z)) + x

    def ray(aux, idx):
        z, sq = aux[:, :-1], aux[:, -1]
        t = ray_of(z, sq, idx)
        calls.append(idx.clone())
        zt, sqt = z * torch.sqrt(t)[:, None], sq * t
        return t, _toy_f(zt, sqt), torch.cat([zt, sqt[:, None]], -1)

    return optim.Split(image, value, gradient, ray), calls


def _toy_f(z, sq):
    return torch.nn.functional.softplus(z).sum(-1) + 0.5 * sq


def test_lbfgs_takes_a_lower_ray_point_and_refuses_a_higher_one(monkeypatch):
    g = torch.Generator().manual_seed(2)
    B, P, M = 3, 10, 25
    K = torch.randn(B, M, P, generator=g, dtype=F64) * 2.0
    x0 = torch.randn(B, P, generator=g, dtype=F64)

    def best(z, sq, idx):  # the ray's exact optimum by bisection on its slope
        lo, hi = torch.full_like(sq, 0.25), torch.full_like(sq, 4.0)
        for _ in range(80):
            t = (lo + hi) / 2
            c = torch.sqrt(t)[:, None]
            slope = (torch.sigmoid(c * z) * z).sum(-1) / (2 * c[:, 0]) + 0.5 * sq
            lo, hi = torch.where(slope < 0, t, lo), torch.where(slope < 0, hi, t)
        return (lo + hi) / 2

    plain_split, _ = _toy(K, lambda z, sq, idx: torch.ones_like(sq))
    no_ray = optim.Split(plain_split.image, plain_split.value, plain_split.gradient)
    plain = optim.lbfgs(no_ray, x0, rel_tol=1e-13, max_iter=500)
    with_ray, calls = _toy(K, best)
    res = optim.lbfgs(with_ray, x0, rel_tol=1e-13, max_iter=500)
    assert calls  # asked after the accepted steps
    assert not torch.equal(res.x, plain.x)  # its points were taken: another path...
    torch.testing.assert_close(res.f, plain.f, rtol=1e-10, atol=0)  # ... to the same optimum
    torch.testing.assert_close(res.x, plain.x, rtol=1e-5, atol=1e-6)
    # a ray that always proposes a higher point (t = 4, far past the optimum) changes nothing
    worse, calls = _toy(K, lambda z, sq, idx: torch.full_like(sq, 4.0))
    res = optim.lbfgs(worse, x0, rel_tol=1e-13, max_iter=500)
    gated = len(calls)
    assert gated > 0
    assert res.iterations.tolist() == plain.iterations.tolist()
    torch.testing.assert_close(res.x, plain.x, rtol=0, atol=0)
    # the ray is asked only once the last relative change is below RAY_AFTER: ungated, from the
    # first accepted step on, every iteration in which a problem moved
    monkeypatch.setattr(optim, "RAY_AFTER", float("inf"))
    worse, calls = _toy(K, lambda z, sq, idx: torch.full_like(sq, 4.0))
    optim.lbfgs(worse, x0, rel_tol=1e-13, max_iter=500)
    assert len(calls) >= int(plain.iterations.min()) - 1
    assert len(calls) > gated


def test_fits_with_the_ray_step_reach_the_optimum_of_fits_without_it(monkeypatch):
    """The same optimum (to the tests' precision) with and without the ray step, from the same
    start, on a near-separable fit (small lambda) where the ray step saves iterations."""
    d = make_problem(7, p=16, n_train=10, n_trip=120)
    spec = ProbeSpec.parse("full", "shrinkage")
    lams = [1e-4, 0.01, 0.5]

    def fit():
        return fit_probes(
            [problem_of(d, lams)], spec, device="cpu", dtype=F64, rel_tol=1e-12, max_iter=5000
        )[0]

    with_ray = fit()
    monkeypatch.setattr(objective, "RAY_STEP", False)
    without = fit()
    for a, b in zip(with_ray, without, strict=True):
        assert a.converged and b.converged
        assert a.objective <= b.objective + 1e-9 * abs(b.objective)
        assert rel(a.objective, b.objective) < 1e-7
    assert with_ray[0].iterations < without[0].iterations, (
        with_ray[0].iterations,
        without[0].iterations,
    )


@pytest.mark.parametrize("family", ["full", "diagonal", "rank"])
def test_every_penalty_states_its_true_degree(family):
    """R(c W) = c^degree R(W) for every penalty, on its plain formula (the ray step's closed form
    relies on it; a penalty that does not state its degree is refused, not given a default)."""
    from recovery_assets.core.probe.penalties import PENALTY, Penalty

    g = torch.Generator().manual_seed(4)
    M = torch.randn(3 if family == "rank" else 6, 6, generator=g, dtype=F64)
    M = M[:, 0] if family == "diagonal" else M
    for pen in PENALTY.values():
        k = pen.degree(family)
        for c in (0.5, 3.0):
            torch.testing.assert_close(
                pen.reference(c * M, family), c**k * pen.reference(M, family), rtol=1e-12, atol=0
            )
    with pytest.raises(NotImplementedError, match="degree"):
        Penalty().degree(family)
