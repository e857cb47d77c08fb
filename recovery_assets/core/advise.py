"""How many training triplets a study needs: a saturating recovery curve (docs/analyses.md §3).

Recovery accuracy rises with the training size N and levels off (docs/method.md §9). Given per-N
counts (successes = recovered jobs, trials = simulations x generators, e.g. ``recovery_summary``'s
``n_correct`` and ``n_total``), this module fits

    acc(N) = chance + (a - chance) / (1 + exp(-(log N - b) / c)),

with chance = 1 / number of models, plateau a in (chance, 1], midpoint b (acc is half-way between
chance and a at N = exp(b)) and width c > 0 (in log N), and reports the smallest N at which the
fitted curve's lower 95 % bound reaches a target accuracy.

* **Fit.** Maximum binomial likelihood, sum_N [k_N log acc(N) + (n_N - k_N) log(1 - acc(N))], on
  the smooth unconstrained parametrisation a = chance + (1 - chance) sigmoid(alpha), b, c =
  exp(gamma): batched Levenberg-Marquardt-damped Fisher scoring from 30 starts, the best polished
  by ``scipy.optimize.minimize`` (L-BFGS-B, analytic gradient). Box bounds only keep the
  optimiser numerically sane: |alpha| <= 15, b within 15 of the observed log N range,
  0.01 <= c <= 50.
* **Bounds.** Parametric bootstrap: ``n_boot`` data sets are drawn from the fitted curve (k_N ~
  Binomial(n_N, acc_hat(N)), ``numpy.random.default_rng(seed)``) and refitted, all at once by the
  same Fisher scoring started at the fit. The pointwise 95 % band of the curve is the
  equal-tailed percentile band of the refitted curves at each N; the plateau's 95 % interval is
  the percentile interval of the refitted a. The bootstrap keeps every bound inside (chance, 1]
  and does not break down at a = 1 (recovery reaching 100 %), where the asymptotic covariance of
  the delta method degenerates. The same inputs and seed give the same answer.
* **Advice.** The lower bound is evaluated on a grid of log N (step 0.005, N from 1 to ``n_max``,
  default 1e9) and the first crossing is refined to the smallest integer N with lower(N) >=
  target. The target is out of reach when the plateau's upper 95 % bound is below it, or when the
  lower bound does not reach it by ``n_max``. An N outside the sizes studied is an extrapolation
  of the fitted curve, and the message says so.
* **Limitation.** When the fitted curve is at 100 % recovery at the largest sizes (every job
  recovered there), every bootstrap data set is perfect there too and the band collapses onto the
  fit: the bounds understate the uncertainty. ``Advice.boundary`` flags it and the message says so.

All functions are pure numpy/scipy code and validate their inputs, raising ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, logit

from recovery_assets.core.recovery import _check_columns

__all__ = ["Advice", "AccuracyCurve", "advise", "advise_from_summary", "fit_accuracy_curve"]

_ALPHA_BOUND = 15.0
_B_MARGIN = 15.0
_C_RANGE = (0.01, 50.0)
_GRID_STEP = 0.005
_P_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_int_vector(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric vector: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    if np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must be whole numbers")
    return arr


def _validate(n_train, successes, trials, n_models) -> tuple[np.ndarray, ...]:
    n = _as_int_vector(n_train, "n_train")
    k = _as_int_vector(successes, "successes")
    t = _as_int_vector(trials, "trials")
    if not (len(n) == len(k) == len(t)):
        raise ValueError(
            f"n_train, successes and trials must have the same length, got {len(n)}, {len(k)}, "
            f"{len(t)}"
        )
    if np.any(n < 1):
        raise ValueError("n_train must be positive")
    if len(np.unique(n)) != len(n):
        raise ValueError(f"n_train lists a size more than once: {n.astype(int).tolist()}")
    if len(n) < 3:
        raise ValueError(f"the curve has 3 parameters and needs at least 3 sizes, got {len(n)}")
    if np.any(t < 1):
        raise ValueError("trials must be positive")
    if np.any(k < 0) or np.any(k > t):
        raise ValueError("successes must lie between 0 and trials")
    if isinstance(n_models, bool) or int(n_models) != n_models or int(n_models) < 2:
        raise ValueError(f"n_models must be an integer >= 2, got {n_models!r}")
    order = np.argsort(n)
    return n[order], k[order], t[order]


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return level


# --------------------------------------------------------------------------------------------
# The curve and its likelihood
# --------------------------------------------------------------------------------------------


def _unpack(theta: np.ndarray, chance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, c) from the unconstrained (alpha, b, gamma); works on (..., 3) arrays."""
    theta = np.asarray(theta, dtype=np.float64)
    a = chance + (1.0 - chance) * expit(theta[..., 0])
    return a, theta[..., 1], np.exp(theta[..., 2])


def _curve(x: np.ndarray, a, b, c, chance: float) -> np.ndarray:
    """acc at log N = x; broadcasts (B, 1) parameters against (G,) sizes."""
    return chance + (a - chance) * expit((x - b) / c)


def _parts(theta: np.ndarray, x: np.ndarray, chance: float):
    """acc (B, S) and its Jacobian (B, S, 3) w.r.t. (alpha, b, gamma) for thetas (B, 3)."""
    alpha, b, gamma = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    c = np.exp(gamma)
    q = expit(alpha)
    z = (x[None, :] - b) / c
    s = expit(z)
    p = chance + (1.0 - chance) * q * s
    common = (1.0 - chance) * q * s * (1.0 - s)
    jac = np.stack(
        [(1.0 - chance) * q * (1.0 - q) * s, -common / c, -common * z],
        axis=-1,
    )
    return np.clip(p, _P_EPS, 1.0 - _P_EPS), jac


def _loglik(p: np.ndarray, k: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sum(k * np.log(p) + (t - k) * np.log1p(-p), axis=-1)


def _nll_and_grad(theta, x, k, t, chance, scale):
    """Negative log-likelihood / scale and its gradient (for ``scipy.optimize.minimize``)."""
    p, jac = _parts(np.asarray(theta, dtype=np.float64)[None, :], x, chance)
    nll = -float(_loglik(p, k, t)[0]) / scale
    dp = -(k - t * p[0]) / (p[0] * (1.0 - p[0])) / scale
    return nll, dp @ jac[0]


def _bounds(x: np.ndarray) -> np.ndarray:
    """(3, 2) box of (alpha, b, gamma)."""
    return np.array(
        [
            (-_ALPHA_BOUND, _ALPHA_BOUND),
            (float(x.min()) - _B_MARGIN, float(x.max()) + _B_MARGIN),
            (math.log(_C_RANGE[0]), math.log(_C_RANGE[1])),
        ]
    )


def _fisher_fit(theta0, x, k, t, chance, bounds, max_iter: int = 500) -> np.ndarray:
    """Batched maximum likelihood: Levenberg-Marquardt-damped Fisher scoring, one problem per row
    of ``theta0`` (B, 3) and ``k`` (B, S), projected on the box ``bounds``.

    Each step solves (I + lam diag I) d = U with U the score and I the expected information
    sum_S t J J^T / (p (1 - p)); coordinates held at a bound by an outward score are frozen. A step
    is kept if it does not lower the log-likelihood (lam / 10), else lam * 10 and retry.
    """
    theta = np.array(theta0, dtype=np.float64)
    k = np.broadcast_to(np.asarray(k, dtype=np.float64), (len(theta), len(x)))
    lo, hi = bounds[:, 0], bounds[:, 1]
    lam = np.full(len(theta), 1e-3)
    active = np.ones(len(theta), dtype=bool)
    p, jac = _parts(theta, x, chance)
    ll = _loglik(p, k, t)
    eye = np.eye(3)
    for _ in range(max_iter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        pa, ja = p[idx], jac[idx]
        w = t / (pa * (1.0 - pa))
        score = np.einsum("bs,bsi->bi", (k[idx] - t * pa) / (pa * (1.0 - pa)), ja)
        info = np.einsum("bs,bsi,bsj->bij", w, ja, ja)
        th = theta[idx]
        frozen = ((th <= lo + 1e-12) & (score < 0)) | ((th >= hi - 1e-12) & (score > 0))
        score = np.where(frozen, 0.0, score)
        keep = ~frozen[:, :, None] & ~frozen[:, None, :]
        info = np.where(keep, info, eye)
        diag = np.einsum("bii->bi", info)
        ridge = lam[idx, None] * diag + 1e-10 * diag.max(axis=1, keepdims=True) + 1e-300
        damped = info + ridge[:, :, None] * eye
        step = np.linalg.solve(damped, score[:, :, None])[:, :, 0]
        new = np.clip(th + step, lo, hi)
        p_new, jac_new = _parts(new, x, chance)
        ll_new = _loglik(p_new, k[idx], t)
        ok = ll_new >= ll[idx]
        moved = np.max(np.abs(new - th), axis=1)
        gain = ll_new - ll[idx]
        acc = idx[ok]
        theta[acc], p[acc], jac[acc], ll[acc] = new[ok], p_new[ok], jac_new[ok], ll_new[ok]
        lam[acc] = np.maximum(lam[acc] / 10.0, 1e-12)
        lam[idx[~ok]] *= 10.0
        done = ok & ((moved < 1e-10) | (gain <= 1e-13 * np.abs(ll_new)))
        done |= lam[idx] > 1e12
        active[idx[done]] = False
    return theta


def _fit(x, k, t, chance) -> np.ndarray:
    """Maximum-likelihood (alpha, b, gamma): batched Fisher scoring from a grid of starts, the best
    polished by ``scipy.optimize.minimize`` (L-BFGS-B)."""
    bounds = _bounds(x)
    span = max(float(x.max() - x.min()), 1e-6)
    starts = np.array(
        [
            [alpha0, float(x.min()) + frac * span, math.log(np.clip(width, *_C_RANGE))]
            for alpha0 in (-1.0, 1.0, 3.0)
            for frac in (0.0, 0.25, 0.5, 0.75, 1.0)
            for width in (span / 8.0, span / 3.0)
        ]
    )
    fitted = _fisher_fit(starts, x, k, t, chance, bounds)
    ll = _loglik(_parts(fitted, x, chance)[0], k, t)
    best = fitted[int(np.argmax(ll))]
    res = minimize(
        _nll_and_grad,
        best,
        args=(x, k, t, chance, float(t.sum())),
        jac=True,
        method="L-BFGS-B",
        bounds=[tuple(b) for b in bounds],
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000},
    )
    if res.fun < _nll_and_grad(best, x, k, t, chance, float(t.sum()))[0]:
        best = res.x
    return np.asarray(best, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Fitted curve
# --------------------------------------------------------------------------------------------


@dataclass
class AccuracyCurve:
    """A fitted recovery curve with its parametric-bootstrap band.

    Attributes
    ----------
    a, b, c : the maximum-likelihood plateau, midpoint (log N) and width (log N).
    chance : 1 / number of models.
    level : coverage of the bands and intervals.
    n_train, successes, trials : the data, sorted by n_train.
    boot : (n_boot, 3) refitted (a, b, c) of the bootstrap data sets.
    """

    a: float
    b: float
    c: float
    chance: float
    level: float
    n_train: np.ndarray = field(repr=False)
    successes: np.ndarray = field(repr=False)
    trials: np.ndarray = field(repr=False)
    boot: np.ndarray = field(repr=False)

    @property
    def params(self) -> dict[str, float]:
        """``a, b, c, chance`` and ``n_mid = exp(b)``, the size half-way from chance to a."""
        return {
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "chance": self.chance,
            "n_mid": float(np.exp(self.b)),
        }

    def predict(self, n: Any) -> np.ndarray:
        """The fitted accuracy at sizes ``n``."""
        x = np.log(np.asarray(n, dtype=np.float64))
        return _curve(x, self.a, self.b, self.c, self.chance)

    def band(self, n: Any) -> tuple[np.ndarray, np.ndarray]:
        """The pointwise equal-tailed bootstrap band (lower, upper) at sizes ``n``."""
        x = np.log(np.atleast_1d(np.asarray(n, dtype=np.float64)))
        return self._band_x(x)

    def _band_x(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, c = (self.boot[:, i : i + 1] for i in range(3))
        curves = _curve(x[None, :], a, b, c, self.chance)
        tail = (1.0 - self.level) / 2.0
        low, high = np.quantile(curves, [tail, 1.0 - tail], axis=0)
        return low, high

    def plateau_ci(self) -> tuple[float, float]:
        """The bootstrap percentile interval of the plateau a."""
        tail = (1.0 - self.level) / 2.0
        low, high = np.quantile(self.boot[:, 0], [tail, 1.0 - tail])
        return float(low), float(high)

    def n_reaching(self, target: float) -> float | None:
        """Where the fitted (point) curve reaches ``target``; None if the plateau is below it."""
        if target <= self.chance:
            return 1.0
        if target >= self.a:
            return None
        u = (target - self.chance) / (self.a - self.chance)
        return float(np.exp(self.b + self.c * logit(u)))


def fit_accuracy_curve(
    n_train: Any,
    successes: Any,
    trials: Any,
    n_models: int,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> AccuracyCurve:
    """Fit the saturating recovery curve by maximum binomial likelihood, with a bootstrap band.

    Parameters
    ----------
    n_train : the training sizes N (positive, distinct, at least 3).
    successes : recovered jobs at each N.
    trials : jobs at each N (simulations x generators); ``0 <= successes <= trials``.
    n_models : the number of candidate models (chance = 1 / n_models).
    level : coverage of the bootstrap band and plateau interval.
    n_boot : parametric bootstrap refits (>= 20).
    seed : seed of ``numpy.random.default_rng`` for the bootstrap draws.

    Returns
    -------
    :class:`AccuracyCurve`.
    """
    n, k, t = _validate(n_train, successes, trials, n_models)
    level = _check_level(level)
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or int(n_boot) < 20:
        raise ValueError(f"n_boot must be an integer >= 20, got {n_boot!r}")
    chance = 1.0 / int(n_models)
    x = np.log(n)
    theta = _fit(x, k, t, chance)
    a, b, c = (float(v) for v in _unpack(theta, chance))

    rng = np.random.default_rng(seed)
    p_hat = _curve(x, a, b, c, chance)
    draws = rng.binomial(t.astype(np.int64), p_hat, size=(int(n_boot), len(x)))
    fitted = _fisher_fit(np.tile(theta, (int(n_boot), 1)), x, draws, t, chance, _bounds(x))
    boot = np.column_stack(_unpack(fitted, chance))
    return AccuracyCurve(
        a=a,
        b=b,
        c=c,
        chance=chance,
        level=level,
        n_train=n.astype(np.int64),
        successes=k.astype(np.int64),
        trials=t.astype(np.int64),
        boot=boot,
    )


# --------------------------------------------------------------------------------------------
# Advice
# --------------------------------------------------------------------------------------------


@dataclass
class Advice:
    """How many training triplets reach a target recovery accuracy.

    Attributes
    ----------
    target : the target accuracy.
    n_needed : the smallest N at which the lower bound of the fitted curve's pointwise band reaches
        ``target``; None when the target is out of reach.
    reachable : whether ``n_needed`` was found (within ``n_max``).
    plateau : the fitted plateau a.
    plateau_ci : its bootstrap percentile interval.
    params : ``a, b, c, chance, n_mid`` (:attr:`AccuracyCurve.params`).
    message : what the above means, in words.
    level : coverage of the band and interval.
    n_point : where the fitted curve itself reaches the target (None if its plateau is below it).
    n_min, n_max_studied : the smallest and largest N studied.
    extrapolated : ``n_needed`` lies outside [n_min, n_max_studied].
    boundary : the fitted curve is at 100 % recovery (within 1e-6) at the largest N studied; every
        bootstrap data set is then perfect there and the band understates the uncertainty.
    n_max : the largest N searched.
    curve : the fitted :class:`AccuracyCurve`.
    """

    target: float
    n_needed: int | None
    reachable: bool
    plateau: float
    plateau_ci: tuple[float, float]
    params: dict[str, float]
    message: str
    level: float = 0.95
    n_point: float | None = None
    n_min: int = 0
    n_max_studied: int = 0
    extrapolated: bool = False
    boundary: bool = False
    n_max: float = 1e9
    curve: AccuracyCurve | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The scalar fields as a plain dict (one table row; ``n_needed`` and ``n_point`` are None
        when absent)."""
        return {
            "target": self.target,
            "n_needed": self.n_needed,
            "reachable": self.reachable,
            "plateau": self.plateau,
            "plateau_ci_low": self.plateau_ci[0],
            "plateau_ci_high": self.plateau_ci[1],
            **self.params,
            "level": self.level,
            "n_point": self.n_point,
            "n_min": self.n_min,
            "n_max_studied": self.n_max_studied,
            "extrapolated": self.extrapolated,
            "boundary": self.boundary,
            "n_max": self.n_max,
            "message": self.message,
        }


def _lower(curve: AccuracyCurve, n: int) -> float:
    return float(curve.band(n)[0][0])


def _first_crossing(curve: AccuracyCurve, target: float, n_max: float) -> tuple[int | None, float]:
    """The smallest integer N <= n_max with lower(N) >= target (None if none on the grid), and the
    largest lower bound on the grid."""
    x = np.append(np.arange(0.0, math.log(n_max), _GRID_STEP), math.log(n_max))
    lower, _ = curve._band_x(x)
    hit = np.flatnonzero(lower >= target)
    if hit.size == 0:
        return None, float(lower.max())
    i = int(hit[0])
    if i == 0:
        return 1, float(lower.max())
    # refine between the two grid points to the integer (binary search; the lower bound increases
    # over the short bracket)
    lo = max(math.floor(math.exp(x[i - 1])), 1)
    hi = max(math.ceil(math.exp(x[i])), lo + 1)
    if _lower(curve, lo) >= target:
        return lo, float(lower.max())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _lower(curve, mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, float(lower.max())


def advise(
    n_train: Any,
    successes: Any,
    trials: Any,
    n_models: int,
    target: float,
    level: float = 0.95,
    n_max: float = 1e9,
    n_boot: int = 1000,
    seed: int = 0,
) -> Advice:
    """Fit the recovery curve and find the smallest N whose lower bound reaches ``target``.

    Parameters
    ----------
    n_train, successes, trials, n_models, level, n_boot, seed : as in
        :func:`fit_accuracy_curve`.
    target : the recovery accuracy wanted, in (chance, 1).
    n_max : the largest N searched (finite, >= the largest N studied); a target the lower bound
        does not reach by then is out of reach.

    Returns
    -------
    :class:`Advice`.

    Raises
    ------
    ValueError
        For invalid counts (successes > trials, negative or fractional counts, repeated sizes,
        fewer than 3 sizes), ``n_models < 2``, a target outside (chance, 1), ``n_max`` below the
        largest N studied, ``level`` outside (0, 1) or ``n_boot < 20``.
    """
    n, _, _ = _validate(n_train, successes, trials, n_models)
    chance = 1.0 / int(n_models)
    target = float(target)
    if not chance < target < 1.0:
        raise ValueError(f"target must be in (chance, 1) = ({chance:g}, 1), got {target!r}")
    n_lo, n_hi = int(n.min()), int(n.max())
    n_max = float(n_max)
    if not np.isfinite(n_max) or n_max < n_hi:
        raise ValueError(f"n_max must be finite and >= the largest N studied ({n_hi}), got {n_max}")

    curve = fit_accuracy_curve(n_train, successes, trials, n_models, level, n_boot, seed)
    plateau_ci = curve.plateau_ci()
    n_point = curve.n_reaching(target)
    boundary = bool(curve.predict(n_hi) > 1.0 - 1e-6)
    pct = f"{100 * curve.level:g}%"
    plateau_txt = (
        f"the fitted plateau is {curve.a:.3f} ({pct} CI [{plateau_ci[0]:.3f}, {plateau_ci[1]:.3f}])"
    )
    caveat = (
        " The fitted curve is at 100% recovery at the largest N studied, where every bootstrap "
        "data set is perfect too: the bounds there understate the uncertainty."
        if boundary
        else ""
    )
    common = dict(
        target=target,
        plateau=curve.a,
        plateau_ci=plateau_ci,
        params=curve.params,
        level=curve.level,
        n_point=n_point,
        n_min=n_lo,
        n_max_studied=n_hi,
        boundary=boundary,
        n_max=n_max,
        curve=curve,
    )

    if plateau_ci[1] < target:
        msg = (
            f"Target accuracy {target:g} is out of reach: {plateau_txt}, entirely below the "
            "target, so no number of training triplets reaches it with these candidates."
        )
        return Advice(n_needed=None, reachable=False, message=msg + caveat, **common)

    n_needed, best = _first_crossing(curve, target, n_max)
    if n_needed is None:
        msg = (
            f"Target accuracy {target:g} is out of reach within N <= {n_max:,.0f}: the lower "
            f"{pct} bound of the fitted curve reaches at most {best:.3f}; {plateau_txt}."
        )
        return Advice(n_needed=None, reachable=False, message=msg + caveat, **common)

    if n_needed > n_hi:
        where = f" This extrapolates beyond the largest N studied ({n_hi:,})."
    elif n_needed < n_lo:
        where = f" This extrapolates below the smallest N studied ({n_lo:,})."
    else:
        where = ""
    point = (
        f" (the fitted curve itself reaches it at N = {max(math.ceil(n_point), 1):,})"
        if n_point is not None
        else ""
    )
    msg = (
        f"N = {n_needed:,} training triplets reach recovery accuracy {target:g} at the lower "
        f"{pct} bound of the fitted curve{point}; {plateau_txt}.{where}"
    )
    return Advice(
        n_needed=int(n_needed),
        reachable=True,
        message=msg + caveat,
        extrapolated=bool(where),
        **common,
    )


def advise_from_summary(
    summary: pd.DataFrame,
    target: float,
    criterion: str = "accuracy",
    **kwargs: Any,
) -> Advice:
    """:func:`advise` on a ``recovery_summary`` table (one row per n_train and criterion).

    Parameters
    ----------
    summary : columns ``n_train, criterion, n_correct, n_total, chance`` (others ignored).
    target : the recovery accuracy wanted.
    criterion : the selection criterion whose rows are used.
    **kwargs : ``level, n_max, n_boot, seed`` of :func:`advise`.

    Raises
    ------
    ValueError
        For missing columns, no rows for ``criterion``, or a chance that is not 1 / (an integer
        number of models) or differs between rows; and whatever :func:`advise` raises.
    """
    _check_columns(summary, ("n_train", "criterion", "n_correct", "n_total", "chance"), "summary")
    rows = summary[summary["criterion"] == criterion].sort_values("n_train")
    if rows.empty:
        raise ValueError(f"summary has no rows for criterion {criterion!r}")
    chance = rows["chance"].to_numpy(dtype=float)
    n_models = round(1.0 / chance[0])
    if np.any(np.abs(chance - 1.0 / n_models) > 1e-12):
        raise ValueError(f"summary's chance must be 1 / n_models on every row, got {chance}")
    return advise(
        rows["n_train"].to_numpy(),
        rows["n_correct"].to_numpy(),
        rows["n_total"].to_numpy(),
        n_models,
        target,
        **kwargs,
    )
