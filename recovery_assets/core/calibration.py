"""Temperature calibration of generator probes (docs/method.md §5).

A generator probe's logits for triplet ``t`` are ``l_t = [s_jk, s_ik, s_ij]`` (docs/method.md §4)
and its answer distribution at temperature ``T`` is ``P_T(c | t) = softmax(l_t / T)_c``. The probe's
expected agreement with its own sampled answers is the mean over the calibration triplets of
``max_c P_T(c | t)``; the temperature is chosen so that this equals the human noise ceiling (0.678
on THINGS test set 2), i.e. the synthetic observers are exactly as self-consistent as people.

``f(T) = mean_t max_c P_T(c | t)`` is continuous and non-increasing in ``T`` (strictly decreasing
unless every row is constant). As ``T -> 0`` a row whose maximum is attained by ``k`` tied logits
tends to ``1 / k``; as ``T -> inf`` every row tends to ``1 / C`` (``C = 3`` options). The equation
``f(T) = target`` therefore has a unique root for every target strictly between those limits, found
here by exact bracketing root finding (``scipy.optimize.brentq``) on ``log T``, not by gradient
descent.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "DEFAULT_TARGET",
    "calibrate_temperature",
    "max_probability_range",
    "mean_max_probability",
]

DEFAULT_TARGET = 0.678  # THINGS test set 2 leave-one-out noise ceiling (docs/method.md §2)


def _as_logits(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] == 0:
        raise ValueError(f"logits must have shape (m, 3) with m >= 1, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("logits must be finite")
    return arr


def _max_prob(gaps: np.ndarray, temperature: float) -> np.ndarray:
    """Per-row max softmax probability from ``gaps = max(l) - l`` (>= 0): ``1 / sum exp(-gap/T)``.

    Subtracting the row maximum makes this overflow-free: every exponent is <= 0 and the maximum's
    term is exactly 1, so the denominator lies in ``[1, C]``.
    """
    with np.errstate(over="ignore", under="ignore"):
        return 1.0 / np.exp(-gaps / temperature).sum(axis=1)


def mean_max_probability(logits: np.ndarray, temperature: float) -> float:
    """Mean over rows of ``max_c softmax(logits / T)_c`` in float64 (numerically stable).

    Parameters
    ----------
    logits : (m, 3) logits at ``T = 1``.
    temperature : ``T > 0``.
    """
    arr = _as_logits(logits)
    t = float(temperature)
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    gaps = arr.max(axis=1, keepdims=True) - arr
    return float(_max_prob(gaps, t).mean())


def max_probability_range(logits: np.ndarray) -> tuple[float, float]:
    """Reachable range ``(low, high)`` of :func:`mean_max_probability` over ``T in (0, inf)``.

    ``low = 1 / C`` is the ``T -> inf`` limit; ``high`` is the ``T -> 0`` limit, the mean over rows
    of ``1 / k_t`` where ``k_t`` is the number of logits tied (exactly equal) at the row maximum.
    Both limits are approached but not attained (unless a row is constant), so a target is reachable
    when ``low < target < high``.
    """
    arr = _as_logits(logits)
    n_tied = (arr == arr.max(axis=1, keepdims=True)).sum(axis=1)
    return 1.0 / arr.shape[1], float(np.mean(1.0 / n_tied))


def calibrate_temperature(
    logits: np.ndarray, target: float = DEFAULT_TARGET, xtol: float = 1e-14
) -> float:
    """Temperature ``T`` with ``mean_t max_c softmax(logits_t / T)_c == target``
    (docs/method.md §5).

    Solves the monotone 1-D equation exactly with ``scipy.optimize.brentq`` on ``u = log T``.
    The bracket is found by stepping ``u`` down (towards the ``T -> 0`` limit) and up (towards
    ``1/3``) from the scale of the logit gaps. The tolerances (``xtol`` on ``log T``, ``rtol`` at
    machine precision) make the achieved mean max-probability agree with ``target`` far below
    1e-6 (the slope ``|df/dlog T|`` is at most ~1).

    Parameters
    ----------
    logits : (m, 3) generator logits at ``T = 1`` on the calibration triplets (test set 2).
    target : the noise ceiling to match (default 0.678).
    xtol : absolute tolerance on ``log T``.

    Returns
    -------
    The calibrated temperature ``T > 0`` (float).

    Raises
    ------
    ValueError
        If ``target`` is not strictly inside the reachable range :func:`max_probability_range`
        (the message reports the range), or the logits are malformed.
    """
    arr = _as_logits(logits)
    target = float(target)
    low, high = max_probability_range(arr)
    if not (low < target < high):
        raise ValueError(
            f"target mean max-probability {target!r} is out of reach: over T in (0, inf) these "
            f"logits reach only the open interval ({low:.6g}, {high:.6g}) "
            f"(T -> inf gives 1/{arr.shape[1]}; T -> 0 gives the mean of 1/#tied maxima)"
        )
    gaps = arr.max(axis=1, keepdims=True) - arr

    def excess(u: float) -> float:
        return float(_max_prob(gaps, float(np.exp(u))).mean()) - target

    positive = gaps[gaps > 0]
    scale = float(np.median(positive))  # positive exists: otherwise high == low
    # Lower end: excess > 0. At T = min positive gap / 800 every non-maximal term is exp(<= -800)
    # = 0, so f equals its T -> 0 limit exactly; stepping down from the typical scale reaches it.
    u_lo = float(np.log(scale))
    u_floor = float(np.log(positive.min() / 800.0))
    while excess(u_lo) <= 0:
        if u_lo <= u_floor:
            raise ValueError(f"could not bracket the temperature for target {target!r}")
        u_lo = max(u_lo - 2.0, u_floor)
    # Upper end: excess < 0. f - 1/C shrinks like 1/T, so stepping up by e^2 per step gets there
    # unless the target is numerically indistinguishable from 1/C.
    u_hi = float(np.log(gaps.max()))
    for _ in range(400):
        if excess(u_hi) < 0:
            break
        u_hi += 2.0
    else:
        raise ValueError(
            f"target {target!r} is numerically indistinguishable from the T -> inf limit {low:.6g}"
        )
    u = brentq(excess, u_lo, u_hi, xtol=xtol, rtol=4 * np.finfo(float).eps, maxiter=500)
    return float(np.exp(u))
