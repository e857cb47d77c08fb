"""Scoring fitted probes on triplet sets, and the candidate fits of one recovery job.

(docs/method.md §7.)

For one generator g, training size N and simulation s, every candidate model m is fitted from the
identity on each fold's synthetic training triplets at every lambda of the candidate grid, and
scored (accuracy and NLL at T = 1) on the fold's validation and test triplets. All candidates x
folds x lambdas go to the batched fitter in one call, or in chunks of problems when a memory budget
asks for it (large N).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from recovery_assets.core.probe import (
    FitProblem,
    FittedProbe,
    ProbeSpec,
    choice_metrics,
    fit_probes,
    logits_from_similarity,
    pair_index,
    resolve_device,
)
from recovery_assets.core.progress import Progress


def similarities(fits: Sequence[FittedProbe], X: torch.Tensor) -> torch.Tensor:
    """(B, n, n) similarities of the given concepts' features (n x p) under each fit.

    Fits that share a reduced basis V (the lambdas of one problem) are done together:
    S = (C A^T)(C A^T)^T + d^2 (X X^T - C C^T), with C = X V formed once.
    """
    out: list[torch.Tensor | None] = [None] * len(fits)
    groups: dict[int, list[int]] = {}
    for b, f in enumerate(fits):
        if f.kind == "reduced":
            groups.setdefault(id(f.V), []).append(b)
        else:
            out[b] = f.similarity(X.to(_device_of(f)))
    for members in groups.values():
        f0 = fits[members[0]]
        V = f0.V
        Xp = X.to(device=V.device, dtype=V.dtype)
        if f0.P is not None:
            Xp = f0.centre(Xp) @ f0.P.to(V.dtype)
        C = Xp @ V
        Kres = Xp @ Xp.T - C @ C.T
        A = torch.stack([fits[b].A.to(V.dtype) for b in members])
        d = torch.tensor([fits[b].d for b in members], dtype=V.dtype, device=V.device)
        Y = C.unsqueeze(0) @ A.transpose(1, 2)
        S = Y @ Y.transpose(1, 2) + (d * d)[:, None, None] * Kres
        for pos, b in enumerate(members):
            out[b] = S[pos]
    dev = out[0].device
    return torch.stack([s.to(dev, torch.float64) for s in out])


def _device_of(f: FittedProbe) -> torch.device:
    for t in (f.A, f.M, f.w, f.V):
        if t is not None:
            return t.device
    return torch.device("cpu")


def evaluate_fits(
    fits: Sequence[FittedProbe],
    features: np.ndarray | torch.Tensor,
    sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    temperature: float = 1.0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Accuracy and mean NLL of every fit on every named triplet set: {name: (acc[B], nll[B])}.

    Only the concepts that occur in the sets are transformed; similarities are formed once per fit
    and the three pair similarities of each triplet are gathered from them.
    """
    X = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    all_idx = np.concatenate([np.asarray(t).reshape(-1) for t, _ in sets.values()])
    concepts, inverse = np.unique(all_idx, return_inverse=True)
    S = similarities(fits, X[torch.as_tensor(concepts)])
    n = len(concepts)
    out = {}
    pos = 0
    for name, (trip, ans) in sets.items():
        m = len(trip)
        local = torch.as_tensor(inverse[pos : pos + 3 * m].reshape(m, 3), device=S.device)
        pos += 3 * m
        logits = logits_from_similarity(S, pair_index(local, n).unsqueeze(0))
        a = torch.as_tensor(np.asarray(ans), dtype=torch.long, device=S.device).unsqueeze(0)
        acc, nll = choice_metrics(logits, a, temperature)
        out[name] = (acc.cpu().numpy(), nll.cpu().numpy())
    return out


# Memory of the batched fitter per training triplet on the CPU (dense data term, float32; measured
# with bench/full_scale.py at N = 4.2M: 6 problems and 2 running fits added 3.3 GB): a prepared
# problem keeps its local triplets, their pair indices, answers and weights (60 bytes per triplet)
# until its fits are scored; a running fit adds its float64 logits, log-probabilities and
# gradients and the line search's copies.
PROBLEM_BYTES_PER_TRIPLET = 64
FIT_BYTES_PER_TRIPLET = 200


def fitter_bytes(
    n_train: int,
    problems: int,
    workers: int,
    dtype=torch.float32,
    *,
    p: int = 0,
    n: int = 0,
    lams: int = 1,
) -> int:
    """Estimated peak memory of ``fit_probes`` on ``problems`` problems of ``n_train`` triplets
    with ``workers`` fits running at once (the caller's synthetic rows not included).

    Besides the per-triplet terms, a problem of ``p`` features on at most ``n`` concepts holds
    (whatever N) its reduced basis (p x r float64, r = min(p, n)), its training features
    (n x r) and one r x r transform per lambda (``lams``) until its fits are scored.
    """
    size = 8 if dtype == torch.float64 else 4
    r = min(int(p), int(n))
    per_problem = PROBLEM_BYTES_PER_TRIPLET * n_train + 8 * p * r + size * (n * r + lams * r * r)
    per_fit = FIT_BYTES_PER_TRIPLET * n_train * (2 if size == 8 else 1)
    return problems * per_problem + workers * per_fit


def fit_plan(
    n_problems: int,
    n_train: int,
    memory_budget: float | None,
    device: torch.device,
    dtype=torch.float32,
    **shape,
) -> tuple[int, int | None]:
    """(problems per ``fit_probes`` call, workers) so that the fitter stays within
    ``memory_budget`` bytes (:func:`fitter_bytes`; ``shape``: its ``p``, ``n`` and ``lams``): all
    problems in one call when they fit (or without a budget), else chunks of as many problems as
    fit beside the running fits (at least one)."""
    if memory_budget is None or n_problems == 0:
        return max(n_problems, 1), None
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    one = fitter_bytes(n_train, 1, 0, dtype, **shape)
    fit = fitter_bytes(n_train, 0, 1, dtype, **shape)
    if fitter_bytes(n_train, n_problems, threads, dtype, **shape) <= memory_budget:
        return n_problems, None
    workers = int(max(1, min(threads, (memory_budget - one) // max(fit, 1))))
    chunk = int(max(1, (memory_budget - workers * fit) // max(one, 1)))
    return min(chunk, n_problems), workers


def score_candidates(
    features: Mapping[str, np.ndarray],
    folds: Sequence[Mapping] | Mapping[int, Sequence[Mapping]],
    lams: Sequence[float],
    spec: ProbeSpec,
    *,
    simulation: int = 0,
    generator: str = "",
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    max_iter: int = 1000,
    stop: str = "optimum",
    log: Callable[[str], None] | None = None,
    memory_budget: float | None = None,
    progress: Progress | None = None,
    progress_every: float = 30.0,
    on_phase: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Fit every candidate on every fold at every lambda and score it (docs/method.md §7).

    ``folds`` are the synthetic folds of one job (``simulation.synthetic_job``): dicts with
    ``train``, ``val`` and ``test`` entries, each {"triplets", "answers"}; or a mapping
    simulation -> folds, to fit several simulations of a job in one batched call. Returns one row
    per (simulation, candidate, lambda, fold): simulation, generator, candidate, lam, fold,
    val_acc, test_acc, val_nll, test_nll, objective, iterations, converged.

    Memory: every problem (simulation x fold x candidate) goes to one ``fit_probes`` call unless
    ``memory_budget`` (bytes for the fitter) is given and they would not fit in it
    (:func:`fit_plan`); then they are fitted in chunks of problems, each chunk scored and its fits
    dropped before the next. Progress (fits done of all, iterations per second, time left) goes to
    ``log`` every ``progress_every`` seconds, or into the caller's ``progress``.
    ``on_phase("fit" | "score")`` is called before each chunk's fitting and scoring (benchmarks).
    """
    device = resolve_device(device)
    by_sim = folds if isinstance(folds, Mapping) else {simulation: folds}
    names = list(features)
    lam_grid = [0.0] if not spec.fitted else [float(x) for x in lams]
    problems, keys = [], []
    for s, sim_folds in by_sim.items():
        for f, fold in enumerate(sim_folds):
            for m in names:
                tr = fold["train"]
                problems.append(FitProblem(features[m], tr["triplets"], tr["answers"], lam_grid))
                keys.append((s, m, f))
    n_train = max((len(pr.answers) for pr in problems), default=0)
    n_all = max((np.shape(x)[0] for x in features.values()), default=0)
    shape = dict(  # the largest candidate on the most training concepts (all, if not recorded)
        p=max((np.shape(x)[1] for x in features.values()), default=0),
        n=max(
            (
                len(fold.get("concepts", {}).get("train", range(n_all)))
                for fs in by_sim.values()
                for fold in fs
            ),
            default=n_all,
        ),
        lams=len(lam_grid),
    )
    chunk, workers = fit_plan(len(problems), n_train, memory_budget, device, dtype, **shape)
    if progress is None:
        progress = Progress(
            len(problems) * len(lam_grid),
            log,
            progress_every,
            label=f"fitting candidates ({spec.name}/{spec.penalty})",
        )
    if log is not None and chunk < len(problems):
        log(
            f"{len(problems)} fitting problems in chunks of {chunk} ({workers} at once) to stay "
            f"within {memory_budget / 2**30:.1f} GiB at N = {n_train}"
        )
    rows = []
    for start in range(0, len(problems), chunk):
        part = slice(start, start + chunk)
        if on_phase is not None:
            on_phase("fit")
        fits = fit_probes(
            problems[part],
            spec,
            device=device,
            dtype=dtype,
            max_iter=max_iter,
            stop=stop,
            log=log,
            workers=workers,
            progress=progress,
        )
        if on_phase is not None:
            on_phase("score")
        for (s, m, f), fl in zip(keys[part], fits, strict=True):
            fold = by_sim[s][f]
            sets = {k: (fold[k]["triplets"], fold[k]["answers"]) for k in ("val", "test")}
            res = evaluate_fits(fl, features[m], sets)
            for b, fit in enumerate(fl):
                rows.append(
                    {
                        "simulation": int(s),
                        "generator": generator,
                        "candidate": m,
                        "lam": fit.lam,
                        "fold": int(fold.get("fold", f)),
                        "val_acc": float(res["val"][0][b]),
                        "test_acc": float(res["test"][0][b]),
                        "val_nll": float(res["val"][1][b]),
                        "test_nll": float(res["test"][1][b]),
                        "objective": fit.objective,
                        "iterations": fit.iterations,
                        "converged": fit.converged,
                    }
                )
        del fits
    return pd.DataFrame(rows)
