"""Probe-fitting speed: the project's fitter against the plain reference, side by side, one run.

    .venv/bin/python bench/probe_speed.py [--device cpu|cuda] [--reference-folds 1|2|3]
        [--reference-lambdas 1e-6,1e-2,1e2] [--skip-single] [--skip-job] [--ours-only]
        [--workers K] [--problems realistic|latent] [--exponent -0.75]
        [--rules optimum,paper] [--quick]

Lines 1-2: one fit at p = 1,024 and p = 4,096 (n = 1,854 concepts of which 865 train,
N = 25,600 training triplets, shrinkage, lambda = 1e-4). Both objectives are re-evaluated by the
same float64 formula of docs/method.md §4 at the returned W.
Line 3: one batched recovery job (4 candidates with p = 256, 512, 1,024, 2,048; 11 lambdas
1e-6 ... 1e4; 3 folds: 132 fits; N = 6,400) against the reference fitting the same problems one by
one, once under each stopping rule of ``--rules`` (default both, ``optimum`` and ``paper``),
each against the same reference time. The fitter's job is timed before and after the
reference (a shared machine's speed can drift by 2x over the reference's half hour), and the
speed-up is taken against the mean of the two. The reference is slow (a p = 2,048 fit takes
minutes), so ``--reference-folds F`` times it on the first F folds only and ``--reference-lambdas
1e-6,1e-2,1e2`` on those lambdas only; its time is then scaled up to all 132 fits, and the line
says on how many fits it was measured. Targets (2 CPU cores): objective never above the
reference's + 1e-4; >= 20x at p = 4,096; at p = 1,024 >= 4x (optimum rule) and >= 5x (paper
rule; the single lines here use the optimum rule, ``bench/realistic_speed.py`` times both as
whole processes); >= 10x for the job under either rule.

Problems (``bench/problems.py``), ``--problems``:

* ``realistic`` (default): power-law features like pooled features of trained vision networks
  (singular values ~ k**exponent, ``--exponent`` -0.75, rectified, mean squared norm 4). The
  job's 4 candidates each share 80 % of their code variance with one generator (p = 1,024, the
  same exponent) whose calibrated softmax (mean max-probability 0.678) samples the answers of all
  3 folds; a single line's candidate has its own generator of the same p.
* ``latent``: the latent-code problems of the earlier benchmark (nearly all variance in a few
  directions: easy fits that flatter the fitter).

``--quick`` is a smoke configuration (n = 300 concepts, single lines at p = 64 and 128 with
N = 2,000, the job with p = 16, 32, 48, 64 and N = 800); the full-size lines need a quiet machine.
For whole-process timings on realistic problems see ``bench/realistic_speed.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import (  # noqa: E402
    choices,
    features,
    latent_codes,
    make_generator,
    realistic_problem,
)
from reference import reference_fit  # noqa: E402

from recovery_assets.core.optim import STOP_RULES  # noqa: E402
from recovery_assets.core.probe import (  # noqa: E402
    FitProblem,
    ProbeSpec,
    fit_probes,
    probe_objective,
)
from recovery_assets.core.triplets import concept_folds, sample_unique_triplets  # noqa: E402

N_CONCEPTS = 1854
SINGLE_P = (1024, 4096)
SINGLE_N = 25_600
JOB_P = (256, 512, 1024, 2048)
JOB_N = 6_400
GENERATOR_P = 1024
SPEC = ProbeSpec.parse("full", "shrinkage")
LAMS = [10.0**e for e in range(-6, 5)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def ours(X, trip, ans, lams, device, stop="optimum"):
    _sync(device)
    t0 = time.perf_counter()
    fits = fit_probes([FitProblem(X, trip, ans, lams)], SPEC, device=device, stop=stop)[0]
    Ws = [f.matrix() for f in fits]
    _sync(device)
    return Ws, time.perf_counter() - t0


def single(p: int, latent, device: str, exponent: float | None = None) -> dict:
    """One fit at p; ``latent`` None: the realistic problem with this power-law exponent."""
    if latent is None:
        problem = realistic_problem(p, exponent, N_CONCEPTS, SINGLE_N, 0)
        X, trip, ans = problem.features, problem.triplets, problem.answers
    else:
        fold = concept_folds(N_CONCEPTS, 0)[0]
        trip = sample_unique_triplets(fold.train, SINGLE_N, 0)
        ans = choices(latent, trip, 0)
        X = features(latent, p, 0)
    (W,), t_ours = ours(X, trip, ans, [1e-4], device)
    W_ref, _, t_ref, _ = reference_fit(X, trip, ans, 1e-4, device=device)
    o_ours = probe_objective(W, X, trip, ans, 1e-4, SPEC)
    o_ref = probe_objective(W_ref, X, trip, ans, 1e-4, SPEC)
    return dict(p=p, t_ours=t_ours, t_ref=t_ref, o_ours=o_ours, o_ref=o_ref)


def job_problems(latent, exponent: float | None, folds: int = 3) -> list:
    """The job's problems, fold by fold, candidate by candidate (``JOB_P``), each with all
    ``LAMS``: the first ``folds`` folds of ``concept_folds``, ``JOB_N`` training triplets each;
    ``latent`` None: realistic candidates (power law, ``exponent``) answered by one calibrated
    power-law generator (p = ``GENERATOR_P``), else latent-code ones."""
    gen = None
    if latent is None:
        gen = make_generator(N_CONCEPTS, GENERATOR_P, exponent, 20_000)
    data = []
    for f, fold in enumerate(concept_folds(N_CONCEPTS, 1)[:folds]):
        trip = sample_unique_triplets(fold.train, JOB_N, 100 + f)
        ans = choices(latent, trip, 100 + f) if gen is None else gen.answers(trip, 100 + f)
        data.append((trip, ans))
    if gen is None:
        feats = {p: features(latent, p, p) for p in JOB_P}
    else:
        feats = {p: gen.candidate(p, p) for p in JOB_P}
    return [FitProblem(feats[p], t, a, LAMS) for (t, a) in data for p in JOB_P]


def job(
    latent,
    device: str,
    reference_folds: int,
    reference_lams: list[float] | None,
    workers=None,
    exponent: float | None = None,
    rules: tuple[str, ...] = ("optimum",),
) -> dict:
    """The batched job under each stopping rule of ``rules`` (one reference for all); ``latent``
    None: realistic candidates (power law, ``exponent``) and answers sampled from one calibrated
    power-law generator (p = ``GENERATOR_P``). Per rule: seconds, iterations, worst gap."""
    dims = list(JOB_P)
    problems = job_problems(latent, exponent)
    t_ours, iterations, Ws = {}, {}, {}

    def fit_all(rule: str, when: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fits = fit_probes(problems, SPEC, device=device, workers=workers, stop=rule)
        Ws[rule] = [[f.matrix() for f in fl] for fl in fits]
        _sync(device)
        secs = time.perf_counter() - t0
        iterations[rule] = sum(f.iterations for fl in fits for f in fl)
        print(f"  job under the {rule} rule ({when}): {secs:.1f} s, {iterations[rule]} iterations")
        return secs

    for rule in rules:
        t_ours[rule] = [fit_all(rule, "before the reference")]
    worst_gap = dict.fromkeys(rules, -np.inf)
    t_ref = 0.0
    n_ref = 0
    for i, problem in enumerate(problems):
        f = i // len(dims)
        if f >= reference_folds:
            continue
        for j, lam in enumerate(LAMS):
            if reference_lams is not None and not any(
                abs(lam - r) <= 1e-9 * r for r in reference_lams
            ):
                continue
            W_ref, _, secs, _ = reference_fit(
                problem.features, problem.triplets, problem.answers, lam, device=device
            )
            t_ref += secs
            n_ref += 1
            o_ref = probe_objective(W_ref, *_args(problem), lam, SPEC)
            for rule in rules:
                o_ours = probe_objective(Ws[rule][i][j], *_args(problem), lam, SPEC)
                worst_gap[rule] = max(worst_gap[rule], o_ours - o_ref)
    if n_ref:  # the machine's speed drifts over a long run: time the fitter again after it
        for rule in rules:
            t_ours[rule].append(fit_all(rule, "after the reference"))
    out = dict(t_ours=t_ours, iterations=iterations, t_ref=None, n_ref=n_ref, scale=None)
    if n_ref:
        out["scale"] = len(problems) * len(LAMS) / n_ref
        out.update(t_ref=t_ref * out["scale"], gap=worst_gap)
    return out


def _args(problem):
    return problem.features, problem.triplets, problem.answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference-folds", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument(
        "--reference-lambdas",
        default=None,
        help="comma-separated lambdas on which to time the reference (default: all 11)",
    )
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument(
        "--ours-only", action="store_true", help="time only the project's fitter on the job"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="concurrent batches of the job (default: fit_probes' choice; 1: one after another)",
    )
    ap.add_argument(
        "--problems",
        choices=["realistic", "latent"],
        default="realistic",
        help="realistic: power-law features, calibrated generator answers; latent: the old ones",
    )
    ap.add_argument("--exponent", type=float, default=-0.75, help="power-law exponent (realistic)")
    ap.add_argument(
        "--rules",
        default="optimum,paper",
        help="the job's stopping rules, each timed against the same reference (optimum,paper)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = ap.parse_args()
    bad = [rule for rule in args.rules.split(",") if rule not in STOP_RULES]
    if bad:
        ap.error(f"--rules: unknown stopping rule(s) {bad}; expected {', '.join(STOP_RULES)}")
    global N_CONCEPTS, SINGLE_P, SINGLE_N, JOB_P, JOB_N, GENERATOR_P
    if args.quick:
        N_CONCEPTS, SINGLE_P, SINGLE_N = 300, (64, 128), 2000
        JOB_P, JOB_N, GENERATOR_P = (16, 32, 48, 64), 800, 64
    torch.manual_seed(0)
    latent = latent_codes(N_CONCEPTS) if args.problems == "latent" else None
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, problems "
        f"{args.problems}" + ("" if latent is not None else f" (exponent {args.exponent:g})"),
        flush=True,
    )
    for p in () if args.skip_single else SINGLE_P:
        r = single(p, latent, args.device, args.exponent)
        print(
            f"single fit p={p:>4}: ours {r['t_ours']:7.1f} s (objective {r['o_ours']:.6f}) | "
            f"reference {r['t_ref']:7.1f} s (objective {r['o_ref']:.6f}) | "
            f"speed-up {r['t_ref'] / r['t_ours']:5.1f}x | objective ours - ref "
            f"{r['o_ours'] - r['o_ref']:+.2e}",
            flush=True,
        )
    if not args.skip_job:
        lams = None
        if args.reference_lambdas:
            lams = [float(x) for x in args.reference_lambdas.split(",")]
        refs = [] if args.ours_only else lams
        rules = tuple(args.rules.split(","))
        r = job(latent, args.device, args.reference_folds, refs, args.workers, args.exponent, rules)
        for rule in rules:
            times = r["t_ours"][rule]
            t_ours = sum(times) / len(times)
            head = f"recovery job 132 fits, {rule} rule: ours {t_ours:7.1f} s"
            if r["t_ref"] is None:
                print(f"{head} (reference not run)")
                continue
            head += f" (mean of {times[0]:.1f} s before and {times[1]:.1f} s after the reference)"
            note = ""
            if r["scale"] != 1:
                note = f", reference timed on {r['n_ref']} of 132 fits and scaled x{r['scale']:.3g}"
            print(
                f"{head} | reference {r['t_ref']:7.1f} s{note} | speed-up "
                f"{r['t_ref'] / t_ours:5.1f}x (target >= 10x) | worst objective ours - "
                f"ref {r['gap'][rule]:+.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
