"""The column preconditioner's flat part: the shipped rule against a constant, side by side.

    .venv/bin/python bench/precond_flat.py [--folds 1] [--constant 5] [--exponent -0.75] [--quick]

Fits `bench/probe_speed.py`'s realistic recovery job (4 candidates, p = 256 ... 2,048, 11 lambdas
1e-6 ... 1e4, N = 6,400; ``--folds`` of its 3 folds) twice in one process, under the optimum
rule: once with the shipped flat part ``probe.objective.precond_flat`` (PRECOND_FLAT up to
PRECOND_LAMBDA, growing as sqrt(lambda) above it) and once with the flat part held at
``--constant`` for every lambda (5: the rule before 2026-12-03). Prints the iterations per lambda
(summed over candidates and folds), the sums of the objectives per lambda, the times and their
ratio (docs/performance.md, "The preconditioner's flat part").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import probe_speed as ps  # noqa: E402
from recovery_assets.core.probe import objective  # noqa: E402


def run(problems) -> tuple[float, dict, dict]:
    """(seconds, iterations per lambda, objective sums per lambda) of one fit of the job."""
    t0 = time.perf_counter()
    fits = ps.fit_probes(problems, ps.SPEC, device="cpu", stop="optimum")
    seconds = time.perf_counter() - t0
    its = dict.fromkeys(ps.LAMS, 0)
    objs = dict.fromkeys(ps.LAMS, 0.0)
    for per_problem in fits:
        for lam, fit in zip(ps.LAMS, per_problem, strict=True):
            its[lam] += fit.iterations
            objs[lam] += fit.objective
    return seconds, its, objs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=1, choices=[1, 2, 3])
    ap.add_argument("--constant", type=float, default=5.0, help="the constant flat part")
    ap.add_argument("--exponent", type=float, default=-0.75, help="power-law exponent")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = ap.parse_args()
    if args.quick:  # probe_speed's --quick job: 300 concepts, p = 16 ... 64, N = 800
        ps.N_CONCEPTS, ps.JOB_P, ps.JOB_N, ps.GENERATOR_P = 300, (16, 32, 48, 64), 800, 64
    problems = ps.job_problems(None, args.exponent, folds=args.folds)
    n_fits = len(problems) * len(ps.LAMS)
    print(f"the realistic job: {n_fits} fits, exponent {args.exponent}, optimum rule", flush=True)

    rule = (objective.PRECOND_FLAT, objective.PRECOND_LAMBDA)
    t_rule, it_rule, obj_rule = run(problems)
    print(f"  shipped rule: {t_rule:.1f} s, {sum(it_rule.values())} iterations", flush=True)
    objective.PRECOND_FLAT, objective.PRECOND_LAMBDA = args.constant, math.inf
    try:
        t_const, it_const, obj_const = run(problems)
    finally:
        objective.PRECOND_FLAT, objective.PRECOND_LAMBDA = rule
    print(f"  constant {args.constant:g}: {t_const:.1f} s, {sum(it_const.values())} iterations")

    print(f"\n| lambda | flat (rule) | iterations, rule | iterations, constant {args.constant:g} "
          "| objective sum, rule - constant |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for lam in ps.LAMS:
        print(
            f"| {lam:.0e} | {objective.precond_flat(lam):.3g} | {it_rule[lam]} | {it_const[lam]} "
            f"| {obj_rule[lam] - obj_const[lam]:+.2e} |"
        )
    print(
        f"| all | | {sum(it_rule.values())} | {sum(it_const.values())} | |\n\n"
        f"time: rule {t_rule:.1f} s, constant {t_const:.1f} s: {t_const / t_rule:.2f}x"
    )


if __name__ == "__main__":
    main()
