"""A plain reference probe fit, written straight from docs/method.md §4, for the benchmarks.

W is the full p x p matrix from the identity; every step forms the full n x n Gram of all concepts;
torch L-BFGS with a strong-Wolfe line search (max_iter 150, max_eval 450, tolerance_grad 1e-7,
tolerance_change 1e-4, history 50), outer steps until the relative change of the objective < 1e-7.

As a whole process (timed by ``bench/realistic_speed.py`` like ``recovery fit-probe``):

    .venv/bin/python bench/reference.py --features X.npy --triplets T.npy --answers A.npy
        [--lam 1e-4] [--device cpu|cuda] [--out W.npy] [--max-outer 100]

prints one JSON line: objective (the §4 objective at the returned W, evaluated in float64 by
``recovery_assets.core.probe.probe_objective``, full W, shrinkage), objective_float32 (the fit's
own last value), outer_steps, seconds (the fit alone, without start-up and evaluation).
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the plain reference probe fit, as a whole process")
    ap.add_argument("--features", required=True, help="X.npy: float array (n, p)")
    ap.add_argument("--triplets", required=True, help="T.npy: int array (m, 3)")
    ap.add_argument("--answers", required=True, help="A.npy: int array (m,) in {0,1,2}")
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="where to write W.npy (float32)")
    ap.add_argument("--max-outer", type=int, default=100)
    args = ap.parse_args(argv)
    X = np.load(args.features)
    trip = np.load(args.triplets)
    ans = np.load(args.answers)
    W, obj32, seconds, steps = reference_fit(
        X, trip, ans, args.lam, max_outer=args.max_outer, device=args.device
    )
    if args.out:
        np.save(args.out, W.astype(np.float32))

    from recovery_assets.core.probe import ProbeSpec, probe_objective

    objective = probe_objective(W, X, trip, ans, args.lam, ProbeSpec.parse("full", "shrinkage"))
    record = {
        "objective": objective,
        "objective_float32": obj32,
        "outer_steps": steps,
        "seconds": round(seconds, 4),
        "lam": args.lam,
        "device": args.device,
        "shape": list(W.shape),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
