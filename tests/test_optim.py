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
