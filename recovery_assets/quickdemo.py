"""A small model-recovery study run straight through the core, printed to the terminal.

A toy universe: concepts with a hidden latent code; each "model" reads the code out through its own
random non-linear features (different widths and noise); each model in turn plays the human: its
zero-shot similarity, calibrated to the THINGS noise ceiling, generates synthetic choices; every
model is fitted (full W, shrinkage, a lambda grid, 3 concept-disjoint folds) and scored; the winner
of each job fills the recovery matrix. It exercises §4-§7 end to end in about a minute on 2 cores.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from recovery_assets.core.calibration import calibrate_temperature
from recovery_assets.core.probe import ProbeSpec
from recovery_assets.core.recovery import recovery_metrics, select_and_score
from recovery_assets.core.scoring import score_candidates
from recovery_assets.core.simulation import synthetic_job


def toy_models(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 12))
    models = {}
    for name, p, noise in [
        ("narrow", 16, 0.4),
        ("mid", 48, 0.8),
        ("wide", 96, 1.2),
        ("deep", 64, 0.6),
    ]:
        R = rng.standard_normal((12, p)) / np.sqrt(12)
        X = np.maximum(latent @ R + noise * rng.standard_normal((n, p)), 0.0)
        models[name] = (X / np.sqrt((X * X).sum(1).mean()) * 2.0).astype(np.float32)
    return models


def zero_shot_logits(X: np.ndarray):
    def logits(trip: np.ndarray) -> np.ndarray:
        i, j, k = trip.T
        s = lambda a, b: (X[a] * X[b]).sum(1)  # noqa: E731
        return np.stack([s(j, k), s(i, k), s(i, j)], 1)

    return logits


def run(
    n_concepts: int = 90,
    sizes=(100, 400, 1600),
    simulations: int = 3,
    lams=(1e-4, 1e-2, 1.0),
    target: float = 0.678,
    echo=print,
) -> pd.DataFrame:
    t0 = time.perf_counter()
    models = toy_models(n_concepts)
    order = list(models)
    spec = ProbeSpec.parse("full", "shrinkage")
    rng = np.random.default_rng(1)
    calib = rng.integers(0, n_concepts, (4000, 3))
    calib = calib[(calib[:, 0] != calib[:, 1]) & (calib[:, 0] != calib[:, 2])]
    calib = calib[calib[:, 1] != calib[:, 2]]
    temps = {g: calibrate_temperature(zero_shot_logits(models[g])(calib), target) for g in order}
    echo(
        f"{len(order)} toy models, {n_concepts} concepts; generator temperatures "
        + ", ".join(f"{g}={t:.3g}" for g, t in temps.items())
    )
    rows = []
    for N in sizes:
        winners = []
        for s in range(simulations):
            for g in order:
                folds = synthetic_job(
                    n_concepts, N, s, zero_shot_logits(models[g]), temps[g], generator=g
                )
                fits = score_candidates(models, folds, lams, spec, simulation=s, generator=g)
                _, win = select_and_score(fits, order)
                winners.append(win)
        m = recovery_metrics(pd.concat(winners, ignore_index=True), order)
        rows.append(
            dict(
                n_train=N,
                recovery=m.accuracy,
                ci_low=m.ci_low,
                ci_high=m.ci_high,
                chance=m.chance,
                mrr=m.mrr,
            )
        )
        echo(
            f"N={N:>5}: recovery {m.accuracy:.2f} [{m.ci_low:.2f}, {m.ci_high:.2f}] "
            f"(chance {m.chance:.2f}, MRR {m.mrr:.2f}), {time.perf_counter() - t0:.0f} s"
        )
        echo(m.confusion.to_string())
    return pd.DataFrame(rows)
