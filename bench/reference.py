"""A plain reference probe fit, written straight from docs/method.md §4, for the benchmarks.

W is the full p x p matrix from the identity; every step forms the full n x n Gram of all concepts;
torch L-BFGS with a strong-Wolfe line search (max_iter 150, max_eval 450, tolerance_grad 1e-7,
tolerance_change 1e-4, history 50), outer steps until the relative change of the objective < 1e-7.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


def reference_objective(W, X, trip, ans, lam):
    p = W.shape[0]
    Z = X @ W.T
    S = Z @ Z.T
    i, j, k = trip.T
    logits = torch.stack([S[j, k], S[i, k], S[i, j]], 1)
    eye = torch.eye(p, dtype=W.dtype, device=W.device)
    return F.cross_entropy(logits, ans) + lam * ((W - torch.trace(W) / p * eye) ** 2).sum()


def reference_fit(X, trip, ans, lam: float, max_outer: int = 100, device: str = "cpu"):
    """Returns (W, objective, seconds, outer steps)."""
    t0 = time.perf_counter()
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32, device=device)
    T = torch.as_tensor(np.asarray(trip), dtype=torch.long, device=device)
    a = torch.as_tensor(np.asarray(ans), dtype=torch.long, device=device)
    W = torch.eye(Xt.shape[1], device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W],
        lr=1,
        max_iter=150,
        max_eval=450,
        tolerance_grad=1e-7,
        tolerance_change=1e-4,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = reference_objective(W, Xt, T, a, lam)
        loss.backward()
        return loss

    prev = None
    steps = 0
    for steps in range(1, max_outer + 1):  # noqa: B007
        opt.step(closure)
        with torch.no_grad():
            cur = float(reference_objective(W, Xt, T, a, lam))
        if prev is not None and abs(prev - cur) / max(abs(prev), 1e-12) < 1e-7:
            break
        prev = cur
    if W.device.type == "cuda":
        torch.cuda.synchronize()
    return W.detach().cpu().numpy(), cur, time.perf_counter() - t0, steps
