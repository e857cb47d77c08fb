"""The fitter on the default device ("auto": CUDA where there is one, else the CPU) against an
independent path: a plain float64 fit of the unreduced objective of docs/method.md §4, made here
one problem and one lambda at a time on the CPU with torch's L-BFGS.

Comparing the "auto" device with the CPU fitter proves nothing on a machine without a GPU (the
same run twice); here the fitter's batched float32 fit (several problems x lambdas in one call,
through the exact reduction) must reach the plain float64 optimum, whatever the device."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recovery_assets.core.probe import FitProblem, ProbeSpec, fit_probes, resolve_device

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(seed: int, p: int = 16, n_train: int = 10, n_held: int = 10, m: int = 160):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_held, p, generator=g, dtype=F64) * math.sqrt(2.0 / p)
    W_true = torch.eye(p, dtype=F64) + 0.6 * torch.randn(p, p, generator=g, dtype=F64) / p**0.5

    def triplets(lo, hi, count):
        return lo + torch.rand(count, hi - lo, generator=g).argsort(1)[:, :3]

    def answers(trip):
        probs = torch.softmax(3.0 * _logits(X @ W_true.T, trip), -1)
        return torch.multinomial(probs, 1, generator=g).squeeze(-1)

    trip = triplets(0, n_train, m)
    held = triplets(n_train, n_train + n_held, 120)
    return dict(X=X, trip=trip, ans=answers(trip), held=held)


def _logits(Z, trip):
    S = Z @ Z.T
    i, j, k = trip.unbind(-1)
    return torch.stack([S[j, k], S[i, k], S[i, j]], -1)


def _objective(W, d, lam):
    ce = torch.nn.functional.cross_entropy(_logits(d["X"] @ W.T, d["trip"]), d["ans"])
    E = W - torch.trace(W) / W.shape[0] * torch.eye(W.shape[0], dtype=W.dtype)
    return ce + lam * (E * E).sum()


def _plain_fit(d, lam):
    """Minimise the plain objective from W = I: float64, p x p, no reduction, CPU."""
    W = torch.nn.Parameter(torch.eye(d["X"].shape[1], dtype=F64))
    opt = torch.optim.LBFGS(
        [W],
        lr=1.0,
        max_iter=1000,
        max_eval=2500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        f = _objective(W, d, lam)
        f.backward()
        return f

    prev = math.inf
    for _ in range(50):
        opt.step(closure)
        cur = float(_objective(W, d, lam).detach())
        if abs(prev - cur) <= 1e-15 * max(1.0, abs(cur)):
            break
        prev = cur
    return W.detach(), cur


def test_auto_device_float32_batch_reaches_the_plain_float64_optimum():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    problems = [_problem(31), _problem(32)]
    lams = [0.02, 0.3]
    spec = ProbeSpec.parse("full", "shrinkage")
    fits = fit_probes(
        [FitProblem(d["X"].numpy(), d["trip"].numpy(), d["ans"].numpy(), lams) for d in problems],
        spec,
        device="auto",  # float32 by default, both problems and both lambdas in one call
    )
    for d, row in zip(problems, fits, strict=True):
        for fit, lam in zip(row, lams, strict=True):
            assert fit.A.device.type == device.type and fit.A.dtype == torch.float32
            assert fit.kind == "reduced" and fit.converged
            W = fit.matrix_tensor().to(device="cpu", dtype=F64)
            W_ref, f_ref = _plain_fit(d, lam)
            f_fit = float(_objective(W, d, lam))
            assert abs(f_fit - f_ref) <= 1e-5 * f_ref, (lam, f_fit, f_ref)
            assert abs(fit.objective - f_ref) <= 1e-5 * f_ref, (lam, fit.objective, f_ref)
            # held-out concepts alike: p = 16 > 10 training concepts, so their features reach
            # outside the training row space, where the reduced fit scales them by d (5% off in d
            # moves these probabilities by more than 0.04)
            p_fit = torch.softmax(_logits(d["X"] @ W.T, d["held"]), -1)
            p_ref = torch.softmax(_logits(d["X"] @ W_ref.T, d["held"]), -1)
            torch.testing.assert_close(p_fit, p_ref, atol=2e-3, rtol=0)
            f_id = float(_objective(torch.eye(W.shape[0], dtype=F64), d, lam))
            assert f_ref < f_id - 1e-3  # the optimum is not the start: the fit had work to do
        # the two lambdas gave different fits (each was fitted, not copied)
        assert not np.allclose(row[0].matrix(), row[1].matrix(), atol=1e-3)
