"""The fitter with and without its symmetric phase, side by side in one run (docs/exact-fit.md,
"Symmetric phase"; docs/performance.md).

    .venv/bin/python bench/symmetric_phase.py [--p 1024,4096] [--exponent -0.75] [--skip-job]
        [--skip-single] [--quick]

Single fits: the realistic problems of ``bench/problems.py`` (power-law features, a candidate
sharing 80 % of its code variance with a calibrated generator, N = 25,600, lambda = 1e-4), one
fit each under the optimum rule. Job: fold 0 of the recovery job of ``bench/probe_speed.py`` (its
four candidates x 11 lambdas, N = 6,400, answers from the calibrated generator), in one
``fit_probes`` call. For each line: seconds, iterations, final objective, with the phase
(``probe.objective.SYMMETRIC_PHASE_TOL`` = 1e-5) and without (None), and their ratios. The two
are run one after the other in this process, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_speed as ps  # noqa: E402
from problems import make_generator, realistic_problem  # noqa: E402

from recovery_assets.core.probe import FitProblem, fit_probes, objective  # noqa: E402
from recovery_assets.core.triplets import concept_folds, sample_unique_triplets  # noqa: E402

WITH = 1e-5


def run(problems: list[FitProblem], tol: float | None) -> tuple[float, int, float]:
    """(seconds, iterations summed over the fits, objective summed over the fits)."""
    objective.SYMMETRIC_PHASE_TOL = tol
    t0 = time.perf_counter()
    fits = [f for batch in fit_probes(problems, ps.SPEC, device="cpu") for f in batch]
    seconds = time.perf_counter() - t0
    return seconds, sum(f.iterations for f in fits), sum(f.objective for f in fits)


def line(name: str, problems: list[FitProblem]) -> None:
    s1, i1, o1 = run(problems, None)
    s2, i2, o2 = run(problems, WITH)
    print(
        f"{name:<28} without: {s1:7.1f} s {i1:6d} it  obj {o1:.7f} | with: {s2:7.1f} s "
        f"{i2:6d} it  obj {o2:.7f} | time {s1 / s2:4.2f}x  iterations {i1 / i2:4.2f}x  "
        f"objective with - without {o2 - o1:+.1e}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", default="1024,4096")
    ap.add_argument("--exponent", type=float, default=-0.75)
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small problems (a smoke run)")
    a = ap.parse_args()
    n, n_train = (300, 2000) if a.quick else (ps.N_CONCEPTS, 25_600)
    if not a.skip_single:
        for p in [int(v) for v in a.p.split(",")] if not a.quick else [64]:
            pr = realistic_problem(p, a.exponent, n_concepts=n, n_train=n_train)
            problem = FitProblem(pr.features, pr.triplets, pr.answers, [1e-4])
            line(f"single p = {p:,}", [problem])
    if not a.skip_job:
        fold = concept_folds(n, 1)[0]
        gen = make_generator(n, 128 if a.quick else ps.GENERATOR_P, a.exponent, 20_000)
        trip = sample_unique_triplets(fold.train, 600 if a.quick else ps.JOB_N, 100)
        ans = gen.answers(trip, 100)
        dims = [32, 64] if a.quick else list(ps.JOB_P)
        problems = [FitProblem(gen.candidate(p, p), trip, ans, ps.LAMS) for p in dims]
        line(f"job fold 0, {len(dims) * len(ps.LAMS)} fits", problems)


if __name__ == "__main__":
    main()
