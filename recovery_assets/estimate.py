"""What a study will cost before it runs: counts, device-hours, peak memory per step and disk.

``estimate_study`` counts the study's partitions, fits and triplets from the study file alone,
then times a short calibration sample of real fits on the device: for every reduced size r the
study's candidates have (min(p, training concepts) for a full W) and for a few of its training
sizes N, the project's own batched fitter (``fit_probes``) runs

- complete fits at each of the study's candidate lambdas on a problem of N triplets (up to
  ``iteration_n``): the iteration counts those lambdas need;
- a few iterations at the real N (up to ``timing_n``, 2^20; beyond it the time per iteration
  is extrapolated along the slope in log-log of the two largest timed sizes, close to linear
  in N there): the seconds per iteration of one fit in a batch as large as a recovery job's;

on realistic problems: features with a power-law spectrum (singular values ~ k^-0.75, rectified,
fixed mean squared norm) and answers sampled from a calibrated generator that shares most of its
features' variance with the candidate. Seconds per fit = iterations x seconds per iteration, both
interpolated in log N between the timed sizes (iterations above ``iteration_n`` are taken as at
``iteration_n``). The other stages are small against the candidate fits and are estimated from
their work: feature extraction from the networks' forward FLOPs (counted on the meta device) at
the device's measured matmul rate, the generator probes by the same fit model at the human
training size, synthetic data from a timed sample of the triplet draw. Peak memory and disk are
computed from the sizes the steps hold and write.

The model behind the numbers is printed with them; the estimate is as good as the calibration
sample is like the real data (iteration counts depend on the real features).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recovery_assets.core.probe import FitProblem, fit_probes, resolve_device
from recovery_assets.core.triplets import concept_folds, sample_unique_triplets
from recovery_assets.study import Study

N_FOLDS = 3
# THINGS' human data when the study's human judgements are not materialized yet: 4.70M judgements
# of which all but the three repeated test sets train the generators.
THINGS_HUMAN_TRAIN = 4_560_000
THINGS_HUMAN_TOTAL = 4_700_000
ASSUMED_P = 1024
GB = 1024**3


@dataclass
class Stage:
    name: str
    count: int  # steps (partitions) of the stage
    device_hours: float
    peak_memory_gb: float  # of one step
    disk_gb: float
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "device_hours": self.device_hours,
            "peak_memory_gb": self.peak_memory_gb,
            "disk_gb": self.disk_gb,
            **self.detail,
        }


# ----------------------------------------------------------------------------- sizes
def n_concepts(study: Study) -> int:
    if study.kind == "things":
        return int(study.things.get("n_concepts") or 1854)
    s = study.stimuli
    return int(s.get("n_families", 16)) * int(s.get("crops_per_family", 15))


def training_concepts(n: int) -> int:
    """Training concepts of one fold (the largest of the 3 folds' training splits)."""
    return max(len(split.train) for split in concept_folds(n, 0, N_FOLDS))


def _timm_info(arch: str) -> tuple[int, int, float]:
    """(embedding dimension, parameters, forward FLOPs per image) of a timm network, counted
    on the meta device (nothing is allocated or downloaded)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from recovery_assets.sources.timm_features import hf_offline

    with hf_offline(), torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty((1, *size), device="meta"))
    return int(model.num_features), int(params), float(counter.get_total_flops())


def model_sizes(study: Study) -> dict[str, dict]:
    """Per model: embedding dimension p (and whether it was assumed), parameters, FLOPs/image."""
    out = {}
    for m in study.models:
        info: dict[str, Any] = {"p": None, "assumed": False, "flops": 0.0, "params": None}
        if m.source == "timm":
            try:
                info["p"], info["params"], info["flops"] = _timm_info(str(m.arch))
            except Exception:  # noqa: BLE001 - an unknown network is reported, not fatal here
                info["p"] = None
        else:
            info["params"] = m.n_params
            try:
                path = study.feature_file(m)
                if path.suffix.lower() == ".npy" and path.is_file():
                    info["p"] = int(np.load(path, mmap_mode="r").shape[1])
            except Exception:  # noqa: BLE001 - the folder may not be configured yet
                pass
        if info["p"] is None:
            info["p"], info["assumed"] = ASSUMED_P, True
        out[m.name] = info
    return out


def fitted_size(study: Study, p: int, n_train_concepts: int) -> int:
    """The size r of a candidate's fitting problem (its parameters are r x r for a full W)."""
    spec = study.spec
    if spec.family == "pca":
        return min(int(spec.k), n_train_concepts)
    if spec.family in ("diagonal", "zero_shot"):
        return p
    if spec.family == "rank":
        return p
    if spec.penalty in ("shrinkage", "frobenius"):
        return min(p, n_train_concepts)
    return p  # full W with L1: fitted in its own p x p coordinates


# ----------------------------------------------------------------------------- calibration
def _features(n: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """Pooled-ReLU-like features with a power-law spectrum, mean squared norm 1 per concept."""
    U = rng.standard_normal((n, r))
    V = np.linalg.qr(rng.standard_normal((r, r)))[0]
    X = np.maximum((U * np.arange(1, r + 1) ** -0.75) @ V, 0.0)
    return X / np.sqrt((X**2).sum(1).mean())


def _problem(n: int, r: int, N: int, seed: int) -> FitProblem:
    rng = np.random.default_rng(seed)
    X = _features(n, r, rng)
    G = X + 0.3 * _features(n, r, rng)  # the generator shares most of the candidate's variance
    train = np.sort(rng.choice(n, size=min(n, training_concepts(n)), replace=False))
    trip = sample_unique_triplets(train, N, rng, n_concepts=n)
    S = G @ G.T
    i, j, k = trip.T
    logits = np.stack([S[j, k], S[i, k], S[i, j]], 1) * 8.0  # a calibrated-looking sharpness
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ans = (rng.random(len(trip))[:, None] > np.cumsum(p, 1)[:, :2]).sum(1)
    return FitProblem(X.astype(np.float32), trip, ans, [])


@dataclass
class FitModel:
    """Seconds of one fit at (r, N, lambda): iterations(lambda, N) x seconds/iteration(r, N)."""

    iterations: dict[tuple[int, int], dict[float, float]]  # (r, N) -> lambda -> iterations
    per_iteration: dict[tuple[int, int], float]  # (r, N) -> seconds per iteration per fit
    setup: dict[tuple[int, int], float] = field(default_factory=dict)  # per fit, before iterating

    @staticmethod
    def _interp(
        points: dict[int, float], N: int, extrapolate: bool = True, linear: bool = False
    ) -> float:
        """Log-log interpolation between the measured sizes; past the largest, the last two
        points' slope (``extrapolate``) or the last value. ``linear``: linear interpolation and,
        past the largest, proportional to N (for the set-up time, which ``calibrate`` floors at
        0 when the timings' noise exceeds it: its logarithm would not exist)."""
        xs = sorted(points)
        if N <= xs[0]:
            return points[xs[0]]
        if N >= xs[-1] and not extrapolate:
            return points[xs[-1]]
        if N >= xs[-1]:
            last = points[xs[-1]]
            if len(xs) > 1 and not linear:  # extrapolate in log-log from the last two points
                a, b = xs[-2], xs[-1]
                slope = math.log(points[b] / points[a]) / math.log(b / a)
                return last * (N / b) ** max(slope, 0.0)
            return last * N / xs[-1]
        hi = next(x for x in xs if x >= N)
        lo = xs[xs.index(hi) - 1]
        if linear:
            t = (N - lo) / (hi - lo)
            return (1 - t) * points[lo] + t * points[hi]
        t = math.log(N / lo) / math.log(hi / lo)
        return math.exp((1 - t) * math.log(points[lo]) + t * math.log(points[hi]))

    def seconds(self, r: int, N: int, lam: float) -> float:
        rs = sorted({key[0] for key in self.per_iteration})
        near = min(rs, key=lambda x: abs(math.log(x / r)))
        per = {n: s for (rr, n), s in self.per_iteration.items() if rr == near}
        # the per-iteration cost grows about as r^2 (the r x r products) around the timed r
        scale = (r / near) ** 2
        its = {n: v[lam] for (rr, n), v in self.iterations.items() if rr == near and lam in v}
        if not its:
            its = {n: float(np.mean(list(v.values()))) for (rr, n), v in self.iterations.items()}
        setup = {n: s for (rr, n), s in self.setup.items() if rr == near}
        fixed = self._interp(setup, N, linear=True) if setup else 0.0
        return (self._interp(its, N, extrapolate=False) * self._interp(per, N) + fixed) * scale


def calibrate(
    rs: Sequence[int],
    sizes: Sequence[int],
    lams: Sequence[float],
    spec,
    device: torch.device,
    n: int,
    *,
    iteration_n: int = 6_400,
    timing_n: int = 1_048_576,
    batch: int = 8,
    max_iter: int = 1000,
    log: Callable[[str], None] = lambda s: None,
) -> FitModel:
    """Time the fitter on realistic problems (see the module docstring)."""
    iterations: dict = {}
    per_iteration: dict = {}
    setup: dict = {}
    ordered = sorted(set(int(x) for x in sizes))
    picks = sorted({ordered[0], ordered[len(ordered) // 2], ordered[-1]})
    for r in sorted(set(rs)):
        for N in picks:
            n_it = min(N, iteration_n)
            if (r, n_it) not in iterations:
                prob = _problem(n, r, n_it, seed=r + n_it)
                prob.lams = list(lams)
                t = time.perf_counter()
                fits = fit_probes([prob], spec, device=device, max_iter=max_iter)[0]
                iterations[(r, n_it)] = {f.lam: max(1, f.iterations) for f in fits}
                log(
                    f"r={r} N={n_it}: {len(fits)} complete fits in {time.perf_counter() - t:.1f} s "
                    f"({', '.join(str(f.iterations) for f in fits)} iterations)"
                )
            n_t = min(N, timing_n)
            prob = _problem(n, r, n_t, seed=r + n_t + 1)
            fits_in_batch = max(1, min(batch, len(lams)))
            prob.lams = [float(lam) for lam in lams[:fits_in_batch]]

            def timed(k: int, prob: FitProblem = prob) -> float:
                t = time.perf_counter()
                fit_probes([prob], spec, device=device, max_iter=k)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - t

            timed(1)  # warm-up (allocations, kernels)
            one, more = timed(1), timed(5)  # the difference is 4 iterations, setup cancels
            per = max(more - one, 0.05 * more) / (4 * fits_in_batch)
            per_iteration[(r, n_t)] = per
            setup[(r, n_t)] = max(one / fits_in_batch - per, 0.0)
            log(
                f"r={r} N={n_t}: {per * 1e3:.1f} ms per iteration per fit, "
                f"{setup[(r, n_t)] * 1e3:.0f} ms setup (batch of {fits_in_batch})"
            )
    return FitModel(iterations, per_iteration, setup)


def _matmul_rate(device: torch.device) -> float:
    """Measured float32 matmul FLOP/s of the device."""
    a = torch.randn(2048, 2048, device=device)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return reps * 2 * 2048**3 / (time.perf_counter() - t)


def _synthetic_rate(n: int) -> float:
    """Triplets drawn (and answered) per second by the sampler."""
    rng = np.random.default_rng(0)
    pool = max(n, 200)  # enough concepts for a sample of this size
    t = time.perf_counter()
    m = 200_000
    sample_unique_triplets(np.arange(pool), m, rng, n_concepts=pool)
    return m / max(time.perf_counter() - t, 1e-6) / 2  # answering costs about as much again


# ----------------------------------------------------------------------------- the estimate
def estimate_study(
    study: Study,
    device: str | torch.device = "cpu",
    *,
    calibration: FitModel | None = None,
    human_train: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    **calibrate_options,
) -> dict:
    """The study's cost; a JSON-serialisable dict (see ``format_estimate``)."""
    dev = resolve_device(str(device))
    n = n_concepts(study)
    n_tr = training_concepts(n)
    M, S, L = len(study.models), study.simulations, len(study.candidate_lambdas)
    sizes = list(study.sizes)
    models = model_sizes(study)
    r_of = {m: fitted_size(study, info["p"], n_tr) for m, info in models.items()}
    fitted = study.spec.fitted
    candidate_fits = M * len(sizes) * S * M * (L if fitted else 1) * N_FOLDS
    synthetic = sum(M * S * N_FOLDS * (N + 2 * round(N / 8)) for N in sizes)

    if fitted and calibration is None:
        log(f"calibrating on {dev}: reduced sizes {sorted(set(r_of.values()))}")
        calibration = calibrate(
            list(r_of.values()),
            sizes,
            study.candidate_lambdas,
            study.spec,
            dev,
            n,
            log=log,
            **calibrate_options,
        )

    # candidate fits: per job, every candidate x lambda x fold x simulation
    per_job = {}
    for N in sizes:
        seconds = 0.0
        if fitted:
            for m in study.model_names:
                seconds += sum(
                    calibration.seconds(r_of[m], N, lam) for lam in study.candidate_lambdas
                )
            seconds *= N_FOLDS * S
        per_job[N] = seconds
    cand_hours = M * sum(per_job.values()) / 3600
    p_max = max(info["p"] for info in models.values())
    N_max = max(sizes)
    feat_bytes = sum(n * info["p"] * 4 for info in models.values())
    # the step's own memory plan (pipeline.build_scores at the largest N, with half of this
    # machine's available memory): a group of simulations' regenerated rows, and the fitter's
    # chunks of problems beside its running fits
    from recovery_assets.core.scoring import fit_plan, fitter_bytes
    from recovery_assets.pipeline import _memory_budget, score_groups, synthetic_bytes

    budget = _memory_budget(0.5)
    group = max(len(g) for g in score_groups(S, N_max, budget))
    rows_bytes = group * synthetic_bytes(N_max)
    shape = {"p": p_max, "n": n, "lams": L}
    problems = group * N_FOLDS * M
    fit_budget = None if budget is None else budget - rows_bytes
    per_call, workers = fit_plan(problems, N_max, fit_budget, dev, **shape)
    threads = torch.get_num_threads() if dev.type == "cpu" else 1
    fit_bytes = fitter_bytes(N_max, per_call, workers or threads, **shape)
    cand_mem = (feat_bytes + rows_bytes + fit_bytes) / GB
    fits_rows = S * M * (L if fitted else 1) * N_FOLDS * 2  # candidate_fits + selection rows
    cand_disk = M * len(sizes) * fits_rows * 120 / GB

    # synthetic data: regenerated where used; the stored recipe is small
    synth_rate = _synthetic_rate(n)
    synth_hours = synthetic / synth_rate / 3600 * 2  # drawn once to check, once where fitted
    synth_disk = M * len(sizes) * (S * N_FOLDS * (2 * n + 9 * 80)) / GB

    # generator probes: CV fits and a refit on the human training data, over all concepts
    h_train = human_train or (
        THINGS_HUMAN_TRAIN
        if study.kind == "things"
        else int(study.human.get("n_train", 10_000)) + int(study.human.get("n_val", 1_000))
    )
    gen_seconds = 0.0
    gen_lams = study.generator_lambdas if fitted else [0.0]
    if fitted:
        folds = study.generator_cv_folds
        for m in study.model_names:
            r_h = min(models[m]["p"], n) if study.spec.family == "full" else r_of[m]
            cv_n = int(h_train * (folds - 1) / folds)
            gen_seconds += folds * sum(calibration.seconds(r_h, cv_n, lam) for lam in gen_lams)
            gen_seconds += calibration.seconds(r_h, h_train, gen_lams[0])
    gen_disk = sum(info["p"] ** 2 * 4 for info in models.values()) / GB
    gen_mem = (n * p_max * 8 + h_train * (3 * 8 + 3 * 4 * 4) * min(len(gen_lams), 8)) / GB

    # feature extraction: forward FLOPs at the device's matmul rate (a third of peak usable)
    rate = _matmul_rate(dev)
    flops = sum(info["flops"] for info in models.values()) * n
    emb_hours = flops / (rate / 3) / 3600
    emb_mem = max((info["params"] or 0) * 4 for info in models.values()) / GB + n * p_max * 4 / GB
    human_total = THINGS_HUMAN_TOTAL if study.kind == "things" else h_train
    human_disk = human_total * (3 * 8 + 24) / GB

    stages = [
        Stage("embeddings", M, emb_hours, emb_mem, feat_bytes / GB, {"forward_flops": flops}),
        Stage(
            "human_judgements",
            1,
            0.0,
            human_total * 3 * 8 * 3 / GB,
            human_disk,
            {"rows": human_total},
        ),
        Stage(
            "generator_probes",
            M,
            gen_seconds / 3600,
            gen_mem,
            gen_disk,
            {"fits": M * (study.generator_cv_folds * len(gen_lams) + 1), "human_train": h_train},
        ),
        Stage(
            "synthetic_datasets",
            M * len(sizes),
            synth_hours,
            rows_bytes / GB,
            synth_disk,
            {"triplets": synthetic},
        ),
        Stage(
            "candidate_scores",
            M * len(sizes),
            cand_hours,
            cand_mem,
            cand_disk,
            {
                "candidate_fits": candidate_fits,
                "hours_per_job": {str(N): per_job[N] / 3600 for N in sizes},
            },
        ),
        Stage("recovery_matrix", len(sizes), 0.0, 0.1, len(sizes) * 1e-4, {}),
    ]
    total_hours = sum(s.device_hours for s in stages)
    return {
        "study": study.name,
        "device": str(dev),
        "n_concepts": n,
        "training_concepts_per_fold": n_tr,
        "models": M,
        "sizes": sizes,
        "simulations": S,
        "partitions": M * len(sizes),
        "candidate_fits": candidate_fits,
        "synthetic_triplets": synthetic,
        "device_hours": total_hours,
        "peak_memory_gb": max(s.peak_memory_gb for s in stages),
        "disk_gb": sum(s.disk_gb for s in stages),
        "reduced_sizes": {m: r_of[m] for m in study.model_names},
        "assumed_dimensions": [m for m, info in models.items() if info["assumed"]],
        "matmul_tflops": rate / 1e12,
        "stages": {s.name: s.to_dict() for s in stages},
        "calibration": None
        if calibration is None
        else {
            "iterations": {f"r={r},N={N}": v for (r, N), v in calibration.iterations.items()},
            "seconds_per_iteration": {
                f"r={r},N={N}": v for (r, N), v in calibration.per_iteration.items()
            },
            "setup_seconds": {f"r={r},N={N}": v for (r, N), v in calibration.setup.items()},
        },
    }


def format_estimate(est: dict) -> str:
    """The estimate as a table for the terminal."""
    lines = [
        f"study {est['study']} on {est['device']}: {est['models']} models x "
        f"{len(est['sizes'])} sizes x {est['simulations']} simulations = {est['partitions']} "
        f"recovery jobs; {est['candidate_fits']:,} candidate fits; "
        f"{est['synthetic_triplets']:,} synthetic triplets",
        "",
        f"{'stage':<20} {'steps':>7} {'device-hours':>13} {'peak memory':>12} {'disk':>10}",
    ]
    for name, s in est["stages"].items():
        lines.append(
            f"{name:<20} {s['count']:>7} {s['device_hours']:>13.3g} "
            f"{s['peak_memory_gb']:>9.2f} GB {s['disk_gb']:>7.2f} GB"
        )
    lines.append(
        f"{'total':<20} {'':>7} {est['device_hours']:>13.3g} {est['peak_memory_gb']:>9.2f} GB "
        f"{est['disk_gb']:>7.2f} GB"
    )
    if est["assumed_dimensions"]:
        lines.append(
            f"\nembedding dimension assumed {ASSUMED_P} (features not found) for: "
            + ", ".join(est["assumed_dimensions"])
        )
    return "\n".join(lines)
