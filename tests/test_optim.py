"""The batched L-BFGS with an objective split at a linear image (optim.Split).

A split objective f(x) = h(K x, x) must reach the same optimum as the same objective given plainly,
while paying for K (the probe's matmul) once per search direction and for the gradient only at the
accepted step, however many trial steps the line search takes.
"""

import pytest
import torch

from recovery_assets.core import optim

F64 = torch.float64


def _problem(B=3, P=12, M=20, seed=0):
    """B independent smooth, non-quadratic objectives sum log(1 + exp(K x)) + |x - c|^2 / 2."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(B, M, P, generator=g, dtype=F64) * 2.0  # stiff enough to reject unit steps
    c = torch.randn(B, P, generator=g, dtype=F64)
    return K, c


def _split(K, c, counts):
    def image(x, idx):
        counts["image"] += 1
        return torch.einsum("bmp,bp->bm", K[idx], x)

    def value(z, x, idx):
        counts["value"] += 1
        f = torch.nn.functional.softplus(z).sum(-1) + 0.5 * ((x - c[idx]) ** 2).sum(-1)
        return f, torch.sigmoid(z)  # aux: dh/dz

    def gradient(z, x, aux, idx):
        counts["gradient"] += 1
        return torch.einsum("bmp,bm->bp", K[idx], aux) + (x - c[idx])

    return optim.Split(image, value, gradient)


def _plain(K, c):
    def fg(x, idx):
        z = torch.einsum("bmp,bp->bm", K[idx], x)
        f = torch.nn.functional.softplus(z).sum(-1) + 0.5 * ((x - c[idx]) ** 2).sum(-1)
        return f, torch.einsum("bmp,bm->bp", K[idx], torch.sigmoid(z)) + (x - c[idx])

    return fg


def test_split_objective_reaches_the_plain_optimum_and_costs_one_image_per_direction():
    K, c = _problem()
    x0 = torch.zeros(c.shape, dtype=F64)
    counts = {"image": 0, "value": 0, "gradient": 0}
    res_split = optim.lbfgs(_split(K, c, counts), x0, rel_tol=1e-14, max_iter=500)
    res_plain = optim.lbfgs(_plain(K, c), x0, rel_tol=1e-14, max_iter=500)
    assert bool(res_split.converged.all()) and bool(res_plain.converged.all())
    torch.testing.assert_close(res_split.f, res_plain.f, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(res_split.x, res_plain.x, atol=1e-5, rtol=1e-5)
    # the optimum: the gradient vanishes
    fg = _plain(K, c)
    _, grad = fg(res_split.x, torch.arange(c.shape[0]))
    assert float(grad.abs().max()) < 1e-5
    iters = int(res_split.iterations.max())
    evals = int(res_split.evaluations.sum())
    # the line search took extra trial steps somewhere (else this test would not test it) ...
    assert evals > int(res_split.iterations.sum()) + c.shape[0]
    # ... yet K was applied once per iteration (+ the start and the periodic re-syncs), and the
    # gradient once per accepted step (+ the start); every trial step is one value call
    assert counts["image"] <= 1 + iters + iters // optim.RESYNC
    assert counts["gradient"] <= 1 + iters
    assert counts["value"] < counts["image"] + evals


def test_split_image_is_resynced_so_rounding_cannot_accumulate():
    """After many steps, the kept K x equals K x recomputed (to float32 rounding)."""
    K, c = _problem(B=2, P=30, M=40, seed=1)
    K, c = K.float(), c.float()
    seen = []
    split = _split(K, c, {"image": 0, "value": 0, "gradient": 0})
    value = split.value

    def checking_value(z, x, idx):
        seen.append(float((z - torch.einsum("bmp,bp->bm", K[idx], x)).abs().max()))
        return value(z, x, idx)

    split.value = checking_value
    optim.lbfgs(split, torch.zeros(c.shape), rel_tol=0.0, max_iter=3 * optim.RESYNC)
    scale = float(K.abs().sum(-1).max())
    assert len(seen) > 2 * optim.RESYNC
    assert max(seen) < 1e-4 * scale


@pytest.mark.parametrize("B", [1, 3])
def test_row_dots_by_blas_equal_vecdot(monkeypatch, B):
    """Long rows take one BLAS dot each on the CPU; the values are vecdot's."""
    monkeypatch.setattr(optim, "DOT_LOOP_MIN", 0)
    calls = []
    real_dot = torch.dot
    monkeypatch.setattr(torch, "dot", lambda *a: calls.append(1) or real_dot(*a))
    g = torch.Generator().manual_seed(B)
    a = torch.randn(B, 50, generator=g, dtype=torch.float64)
    b = torch.randn(B, 50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(optim._rowdot(a, b), torch.linalg.vecdot(a, b))
    assert len(calls) == B


# ----------------------------------------------------------------------------------------------
# the paper's stopping rule


def _trace(fg, x0, rule, max_iter):
    """The objective after each iteration 1..max_iter of one problem (max_iter capped runs)."""
    return [float(optim.lbfgs(fg, x0, max_iter=k, paper=rule).f[0]) for k in range(1, max_iter + 1)]


def test_paper_rule_ends_runs_and_stops_where_its_definition_says():
    """Inner runs of at most ``inner_iter`` iterations; the fit stops at the end of the first run
    whose end is within ``rel_tol`` of the previous run's end, and not before."""
    K, c = _problem(B=1, P=12, M=20, seed=3)
    x0 = torch.zeros(c.shape, dtype=F64)
    rule = optim.PaperStop(
        inner_iter=3, inner_evals=10**6, abs_tol=0.0, step_tol=0.0, grad_tol=0.0, dir_tol=0.0,
        rel_tol=1e-4,
    )  # fmt: skip
    res = optim.lbfgs(_plain(K, c), x0, max_iter=500, paper=rule)
    n = int(res.iterations[0])
    assert bool(res.converged[0]) and n % 3 == 0 and n >= 6
    f = _trace(_plain(K, c), x0, rule, n)  # the same deterministic path, capped
    assert f[-1] == pytest.approx(float(res.f[0]), rel=1e-12)
    ends = f[2::3]  # the objective at the end of each run of 3 iterations
    changes = [abs(a - b) / abs(a) for a, b in zip(ends, ends[1:], strict=False)]
    assert changes[-1] < 1e-4 and all(ch >= 1e-4 for ch in changes[:-1]), changes


@pytest.mark.parametrize("test", ["abs_tol", "step_tol"])
def test_paper_rule_ends_a_run_on_a_small_change_or_step(test):
    """With abs_tol (the objective's change) or step_tol (the step's largest entry) above every
    iteration's, each run is one iteration: the fit stops at the first iteration whose relative
    change is below rel_tol."""
    K, c = _problem(B=1, P=12, M=20, seed=4)
    x0 = torch.zeros(c.shape, dtype=F64)
    tols = dict(abs_tol=0.0, step_tol=0.0, dir_tol=0.0) | {test: 1e9}
    rule = optim.PaperStop(inner_iter=150, grad_tol=0.0, rel_tol=1e-3, **tols)
    res = optim.lbfgs(_plain(K, c), x0, max_iter=500, paper=rule)
    n = int(res.iterations[0])
    f = [float(optim.lbfgs(_plain(K, c), x0, max_iter=0).f[0])] + _trace(_plain(K, c), x0, rule, n)
    changes = [abs(a - b) / abs(a) for a, b in zip(f[1:], f[2:], strict=False)]
    assert changes[-1] < 1e-3 and all(ch >= 1e-3 for ch in changes[:-1]), changes


def test_paper_rule_stops_earlier_than_the_optimum_and_no_lower():
    K, c = _problem(B=3, seed=5)
    x0 = torch.zeros(c.shape, dtype=F64)
    best = optim.lbfgs(_plain(K, c), x0, rel_tol=1e-14, max_iter=2000)
    loose = optim.PaperStop(abs_tol=1e-2, rel_tol=1e-3)
    paper = optim.lbfgs(_plain(K, c), x0, max_iter=2000, paper=loose)
    assert bool(paper.converged.all())
    assert (paper.iterations <= best.iterations).all()
    assert (paper.f >= best.f - 1e-12).all()
    # each problem of the batch stops as it would alone
    for b in range(3):
        one = _plain(K[b : b + 1], c[b : b + 1])
        alone = optim.lbfgs(one, x0[b : b + 1], max_iter=2000, paper=loose)
        assert int(alone.iterations[0]) == int(paper.iterations[b])
        assert float(alone.f[0]) == pytest.approx(float(paper.f[b]), rel=1e-10)


def test_paper_rule_ends_the_fit_at_a_direction_that_promises_too_little():
    """A quasi-Newton direction with g . d > -dir_tol ends the fit where it stands: the last
    iteration takes no step and evaluates nothing (torch stops before its line search, and every
    later run stops there again). With dir_tol = 0 the same fit goes on, to a lower objective."""
    K, c = _problem(B=1, P=12, M=20, seed=6)
    x0 = torch.zeros(c.shape, dtype=F64)
    tight = optim.PaperStop(abs_tol=0.0, step_tol=0.0, dir_tol=0.0, rel_tol=1e-12)
    rule = optim.PaperStop(abs_tol=0.0, step_tol=0.0, dir_tol=1e-3, rel_tol=1e-12)
    res = optim.lbfgs(_plain(K, c), x0, max_iter=500, paper=rule)
    n = int(res.iterations[0])
    assert bool(res.converged[0]) and n >= 3
    before = optim.lbfgs(_plain(K, c), x0, max_iter=n - 1, paper=rule)
    assert torch.equal(res.x, before.x) and float(res.f[0]) == float(before.f[0])
    assert int(res.evaluations[0]) == int(before.evaluations[0])
    further = optim.lbfgs(_plain(K, c), x0, max_iter=500, paper=tight)
    assert int(further.iterations[0]) > n and float(further.f[0]) < float(res.f[0])
    # every earlier step was taken: the path up to n - 1 is the tight rule's
    same = optim.lbfgs(_plain(K, c), x0, max_iter=n - 1, paper=tight)
    assert torch.equal(same.x, before.x)


def test_paper_rule_does_not_hold_a_steepest_descent_step_to_the_direction_test():
    """The first step (steepest descent) is taken whatever dir_tol; the next, a quasi-Newton
    direction, then ends the fit when dir_tol is above every g . d."""
    K, c = _problem(B=2, P=12, M=20, seed=7)
    x0 = torch.zeros(c.shape, dtype=F64)
    rule = optim.PaperStop(abs_tol=0.0, step_tol=0.0, dir_tol=1e9, rel_tol=1e-12)
    res = optim.lbfgs(_plain(K, c), x0, max_iter=500, paper=rule)
    one = optim.lbfgs(_plain(K, c), x0, max_iter=1, paper=rule)
    start = optim.lbfgs(_plain(K, c), x0, max_iter=0)
    assert res.iterations.tolist() == [2, 2] and bool(res.converged.all())
    assert torch.equal(res.x, one.x) and (res.f < start.f).all()


def test_unknown_stopping_rule_is_refused():
    assert optim.stop_rule("optimum") is None
    assert optim.stop_rule("paper") == optim.PaperStop()
    with pytest.raises(ValueError, match="unknown stopping rule 'best'"):
        optim.stop_rule("best")


def test_release_ends_the_problems_it_accepts_at_the_looser_test_and_leaves_the_rest_as_they_were():
    """``release=(tol, decide)``: ``decide`` is asked once per problem, when its relative change
    has been below tol twice running; accepted problems end there, marked released; rejected ones
    run exactly as without ``release``."""
    K, c = _problem(B=4, seed=3)
    x0 = torch.zeros(c.shape, dtype=F64)
    fg = _plain(K, c)
    plain = optim.lbfgs(fg, x0, rel_tol=1e-12, max_iter=500)
    asked = []

    def decide(x, idx, iterations):
        asked.append((idx.tolist(), iterations.tolist(), x.clone()))
        return idx % 2 == 0  # problems 0 and 2 leave

    res = optim.lbfgs(fg, x0, rel_tol=1e-12, max_iter=500, release=(1e-4, decide))
    seen = sorted(i for idx, _, _ in asked for i in idx)
    assert seen == [0, 1, 2, 3]  # each asked exactly once
    assert res.released.tolist() == [True, False, True, False]
    assert bool(res.converged.all())
    for idx, iterations, x in asked:
        for i, b in enumerate(idx):
            if b % 2 == 0:  # ended where it was asked, after the iterations it was told
                assert int(res.iterations[b]) == iterations[i]
                torch.testing.assert_close(res.x[b], x[i], rtol=0, atol=0)
                assert int(res.iterations[b]) < int(plain.iterations[b])
                assert float(res.f[b]) > float(plain.f[b])
    for b in (1, 3):  # the others: the same run (to the rounding of a smaller batch's products)
        assert int(res.iterations[b]) == int(plain.iterations[b])
        torch.testing.assert_close(res.x[b], plain.x[b], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="optimum rule"):
        optim.lbfgs(fg, x0, paper=optim.PaperStop(), release=(1e-4, decide))
