"""The fitter on the default device ("auto": CUDA where there is one, else the CPU) against an
independent path: a plain float64 fit of the unreduced objective of docs/method.md §4, made here
one problem and one lambda at a time on the CPU with torch's L-BFGS (``test_probe.naive_fit``).

Comparing the "auto" device with the CPU fitter proves nothing on a machine without a GPU (the
same run twice); here the fitter's batched float32 fit (several problems x lambdas in one call,
through the exact reduction) must reach the plain float64 optimum, whatever the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_probe import held_probs_from_W, make_problem, naive_fit, naive_objective, problem_of

from recovery_assets.core.probe import ProbeSpec, fit_probes, resolve_device

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(seed: int):
    return make_problem(seed, p=16, n_train=10, n_held=10, n_trip=160, n_held_trip=120)


def test_auto_device_float32_batch_reaches_the_plain_float64_optimum():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    problems = [_problem(31), _problem(32)]
    lams = [0.02, 0.3]
    spec = ProbeSpec.parse("full", "shrinkage")
    fits = fit_probes(
        [problem_of(d, lams) for d in problems],
        spec,
        device="auto",  # float32 by default, both problems and both lambdas in one call
    )
    for d, row in zip(problems, fits, strict=True):
        for fit, lam in zip(row, lams, strict=True):
            assert fit.A.device.type == device.type and fit.A.dtype == torch.float32
            assert fit.kind == "reduced" and fit.converged
            W = fit.matrix_tensor().to(device="cpu", dtype=F64)
            W_ref, f_ref = naive_fit(d, lam)
            f_fit = float(naive_objective(W, d, lam))
            assert abs(f_fit - f_ref) <= 1e-5 * f_ref, (lam, f_fit, f_ref)
            assert abs(fit.objective - f_ref) <= 1e-5 * f_ref, (lam, fit.objective, f_ref)
            # held-out concepts alike: p = 16 > 10 training concepts, so their features reach
            # outside the training row space, where the reduced fit scales them by d (5% off in d
            # moves these probabilities by more than 0.04)
            torch.testing.assert_close(
                held_probs_from_W(W, d), held_probs_from_W(W_ref, d), atol=2e-3, rtol=0
            )
            f_id = float(naive_objective(torch.eye(W.shape[0], dtype=F64), d, lam))
            assert f_ref < f_id - 1e-3  # the optimum is not the start: the fit had work to do
        # the two lambdas gave different fits (each was fitted, not copied)
        assert not np.allclose(row[0].matrix(), row[1].matrix(), atol=1e-3)
