"""Generator probes: a model's probe fitted to human choices, then calibrated (docs/method.md §5).

lambda is chosen by K-fold cross-validation over the human training triplets (shuffled, seed 42)
by mean validation accuracy (ties: the smallest lambda), then the probe is refitted on all
training triplets. With W frozen, a scalar temperature T is solved exactly (root finding) so that
the mean over the calibration triplets (test set 2) of max_c P_T(c) equals the noise ceiling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold

from recovery_assets.core.calibration import calibrate_temperature, mean_max_probability
from recovery_assets.core.probe import (
    FitProblem,
    FittedProbe,
    ProbeSpec,
    features_for,
    fit_probes,
)
from recovery_assets.core.scoring import evaluate_fits


@dataclass
class GeneratorProbe:
    W: np.ndarray  # the full transform (Z = X W^T; pca:k: of the centred X, features_for), float32
    lam: float
    temperature: float
    target: float
    cv: pd.DataFrame  # lam, fold, val_acc, val_nll
    metrics: dict  # accuracies / NLLs on the human evaluation sets, mean max-probability
    fit: FittedProbe


def triplet_logits(Z: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """(m, 3) logits [s_jk, s_ik, s_ij] of transformed features Z (n x q) at T = 1."""
    t = np.asarray(triplets)
    i, j, k = t[:, 0], t[:, 1], t[:, 2]
    Z = np.asarray(Z, dtype=np.float64)
    return np.stack([_dot(Z, j, k), _dot(Z, i, k), _dot(Z, i, j)], axis=1)


def _dot(Z: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("md,md->m", Z[a], Z[b])


def fit_generator_probe(
    X: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    calibration: np.ndarray,
    target: float,
    lams: Sequence[float],
    spec: ProbeSpec,
    *,
    evaluation: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    cv_folds: int = 5,
    cv_seed: int = 42,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    max_iter: int = 1000,
    stop: str = "optimum",
    log: Callable[[str], None] | None = None,
) -> GeneratorProbe:
    """Choose lambda by CV, refit on all training triplets, calibrate T on ``calibration``.

    ``train`` = (triplets, answers) with answers as odd-one-out positions; ``calibration`` is the
    calibration triplet array (test set 2); ``evaluation`` maps names to (triplets, answers) sets
    on which accuracy and NLL (at the calibrated T) are reported. ``metrics["cv_accuracy"]`` is the
    mean cross-validated accuracy of the chosen lambda (None without a lambda search).
    """
    trip, ans = (np.asarray(a) for a in train)
    lam_grid = [float(x) for x in lams] if spec.fitted else [0.0]
    cv_rows = []
    if spec.fitted and len(lam_grid) > 1:
        kf = KFold(n_splits=cv_folds, shuffle=True, random_state=cv_seed)
        splits = list(kf.split(trip))
        problems = [FitProblem(X, trip[tr], ans[tr], lam_grid) for tr, _ in splits]
        if log:
            log(f"cross-validating {len(lam_grid)} lambdas x {cv_folds} folds")
        fits = fit_probes(
            problems, spec, device=device, dtype=dtype, max_iter=max_iter, stop=stop, log=log
        )
        for f, ((_, va), fl) in enumerate(zip(splits, fits, strict=True)):
            res = evaluate_fits(fl, X, {"val": (trip[va], ans[va])})["val"]
            for b, lam in enumerate(lam_grid):
                cv_rows.append(dict(lam=lam, fold=f, val_acc=res[0][b], val_nll=res[1][b]))
        cv = pd.DataFrame(cv_rows)
        mean = cv.groupby("lam")["val_acc"].mean()
        best = float(mean.index[np.flatnonzero(mean.to_numpy() >= mean.max() - 1e-12)[0]])
        cv_accuracy = float(mean.loc[best])
    else:
        cv = pd.DataFrame(columns=["lam", "fold", "val_acc", "val_nll"])
        best = lam_grid[0]
        cv_accuracy = None
    if log:
        log(f"refitting on all {len(trip)} training triplets at lambda={best:g}")
    fit = fit_probes(
        [FitProblem(X, trip, ans, [best])],
        spec,
        device=device,
        dtype=dtype,
        max_iter=max_iter,
        stop=stop,
        log=log,  # progress lines during the (long) refit on every human judgement
    )[0][0]
    W = fit.matrix()
    Z = features_for(spec, np.asarray(X, dtype=np.float64)) @ W.T.astype(np.float64)
    calib_logits = triplet_logits(Z, calibration)
    T = calibrate_temperature(calib_logits, target)
    metrics = {
        "n_train_triplets": int(len(trip)),
        "cv_accuracy": cv_accuracy,
        "calibrated_mean_max_probability": mean_max_probability(calib_logits, T),
        "train_objective": fit.objective,
        "iterations": fit.iterations,
        "converged": fit.converged,
    }
    for name, (t, a) in (evaluation or {}).items():
        logits = triplet_logits(Z, t)
        acc = float((logits.argmax(1) == np.asarray(a)).mean())
        z = logits / T
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        nll = float(-logp[np.arange(len(a)), np.asarray(a)].mean())
        metrics[f"{name}_accuracy"] = acc
        metrics[f"{name}_nll"] = nll
    return GeneratorProbe(
        W=W, lam=best, temperature=T, target=target, cv=cv, metrics=metrics, fit=fit
    )
