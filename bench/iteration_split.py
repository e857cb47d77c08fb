"""Where one L-BFGS iteration of a job's r = 865 problem spends its time, part by part.

    .venv/bin/python bench/iteration_split.py [--p 1024]

Fits one candidate of the benchmark's recovery job (fold 0: 865 training concepts, N = 6,400,
11 lambdas 1e-6 ... 1e4, shrinkage) with wall-clock timers around the optimiser's parts and prints
each part's time per iteration: the direction's image (one feature matmul), the objective's value at
the line search's trial points (SDDMM and cross-entropy), the gradient at the accepted point (the
sparse backward and the second matmul), and the two-loop recursion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import choices, features, latent_codes  # noqa: E402

from recovery_assets.core import optim  # noqa: E402
from recovery_assets.core.probe import FitProblem, ProbeSpec, fit_probes, objective  # noqa: E402
from recovery_assets.core.triplets import concept_folds, sample_unique_triplets  # noqa: E402

TOTALS: dict[str, float] = {}


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        TOTALS[name] = TOTALS.get(name, 0.0) + time.perf_counter() - t0
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=1024)
    args = ap.parse_args()
    latent = latent_codes(1854)
    trip = sample_unique_triplets(concept_folds(1854, 1)[0].train, 6_400, 100)
    lams = [10.0**e for e in range(-6, 5)]
    problem = FitProblem(features(latent, args.p, args.p), trip, choices(latent, trip, 100), lams)

    lbfgs = optim.lbfgs

    def timed_lbfgs(split, x0, **kwargs):
        parts = optim.Split(
            timed("image of the direction", split.image),
            timed("value at trial points", split.value),
            timed("gradient at accepted point", split.gradient),
        )
        return timed("whole iteration", lbfgs)(parts, x0, **kwargs)

    optim.lbfgs = timed_lbfgs
    optim._two_loop = timed("two-loop recursion", optim._two_loop)
    objective._data_backward = timed("  of which sparse backward", objective._data_backward)
    t0 = time.perf_counter()
    fits = fit_probes([problem], ProbeSpec.parse("full", "shrinkage"))[0]
    total = time.perf_counter() - t0
    iterations = sum(f.iterations for f in fits)
    print(f"p = {args.p}: 11 fits, {iterations} iterations, {total:.1f} s in all")
    order = [
        "image of the direction",
        "value at trial points",
        "gradient at accepted point",
        "  of which sparse backward",
        "two-loop recursion",
    ]
    for name in order:
        print(f"{name:28s} {TOTALS[name] / iterations * 1e3:6.2f} ms per iteration")
    rest = TOTALS["whole iteration"] - sum(TOTALS[k] for k in order if not k.startswith(" "))
    print(f"{'rest (vector updates, etc.)':28s} {rest / iterations * 1e3:6.2f} ms per iteration")
    print(f"{'whole iteration':28s} {TOTALS['whole iteration'] / iterations * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
