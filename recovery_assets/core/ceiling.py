"""The expected noise ceiling of a simulated observer, and the temperature that reaches a target.

A simulated observer with a hidden similarity matrix ``H`` answers triplet ``(i, j, k)`` with
probabilities ``softmax([H_jk, H_ik, H_ij] / T)`` (position ``c`` = "the ``c``-th concept is the
odd one out", the probe convention of docs/method.md §4). The expected leave-one-out noise
ceiling of a triplet answered ``R`` times with probabilities ``p`` is computed exactly by
enumerating all answer counts (:func:`expected_noise_ceiling`), with the same leave-one-out rule
as :func:`recovery_assets.core.triplets.noise_ceiling`. :func:`calibrate_observer_temperature`
solves for the temperature at which that expectation equals a target (by default the THINGS
test-set-2 value 0.678) by 1-D root finding (``scipy.optimize.brentq`` on ``log T``).

The demo's simulated observer (:mod:`recovery_assets.sources.demo_observer`) uses both.
"""

from __future__ import annotations

import functools
from math import lgamma

import numpy as np
from scipy.optimize import brentq
from scipy.special import softmax

from recovery_assets.core.calibration import DEFAULT_TARGET

__all__ = ["calibrate_observer_temperature", "expected_noise_ceiling", "similarity_logits"]


def _check_repeats(repeats: object) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, int | np.integer):
        raise ValueError(f"repeats must be an integer, got {repeats!r}")
    if int(repeats) < 2:
        raise ValueError(f"repeats must be >= 2, got {repeats}")
    return int(repeats)


@functools.lru_cache(maxsize=64)
def _count_table(repeats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All answer counts ``c`` (K, 3) with sum ``repeats``, log multinomial coefficients, and
    the leave-one-out agreement of each count vector (the rule of ``noise_ceiling``)."""
    counts = np.array(
        [(a, b, repeats - a - b) for a in range(repeats + 1) for b in range(repeats + 1 - a)],
        dtype=np.int64,
    )
    log_coef = np.array(
        [lgamma(repeats + 1) - sum(lgamma(int(x) + 1) for x in row) for row in counts]
    )
    agreement = np.zeros(counts.shape[0])
    for i in range(3):
        others = counts.copy()
        others[:, i] -= 1
        best = others.max(axis=1)
        n_tied = (others == best[:, None]).sum(axis=1)
        agree = np.where(others[:, i] == best, 1.0 / n_tied, 0.0)
        agreement += counts[:, i] / repeats * agree
    return counts, log_coef, agreement


def expected_noise_ceiling(probabilities: np.ndarray, repeats: int) -> float:
    """Expected leave-one-out noise ceiling of triplets each answered ``repeats`` times.

    Each triplet's ``repeats`` answers are independent draws from its row of ``probabilities``, so
    its answer counts are multinomial; the expectation of the leave-one-out agreement of
    :func:`recovery_assets.core.triplets.noise_ceiling` is computed exactly by summing over all
    ``(repeats + 1)(repeats + 2) / 2`` count vectors, and averaged over triplets.

    Parameters
    ----------
    probabilities : (m, 3) answer probabilities (rows sum to 1).
    repeats : answers per triplet (>= 2).
    """
    repeats = _check_repeats(repeats)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"probabilities must have shape (m, 3) with m >= 1, got {p.shape}")
    counts, log_coef, agreement = _count_table(repeats)
    # log(0) -> a huge negative number: exact zero probability for counts > 0, no 0 * inf.
    log_p = np.log(np.clip(p, np.finfo(np.float64).tiny, 1.0))
    terms = counts[None, :, :] * log_p[:, None, :]
    log_prob = log_coef[None, :] + terms.sum(axis=2)
    return float((np.exp(log_prob) @ agreement).mean())


def similarity_logits(similarity: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """(m, 3) logits ``[H_jk, H_ik, H_ij]`` of triplets ``(i, j, k)`` under similarity ``H``."""
    t = np.asarray(triplets)
    if t.ndim != 2 or t.shape[1] != 3 or (t.size and not np.issubdtype(t.dtype, np.integer)):
        raise ValueError(f"triplets must be an (m, 3) integer array, got {t.shape} {t.dtype}")
    n = similarity.shape[0]
    if t.size and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"triplet indices must lie in [0, {n})")
    i, j, k = t[:, 0], t[:, 1], t[:, 2]
    return np.column_stack([similarity[j, k], similarity[i, k], similarity[i, j]])


def calibrate_observer_temperature(
    similarity: np.ndarray,
    triplets: np.ndarray,
    repeats: int,
    target: float = DEFAULT_TARGET,
) -> float:
    """Temperature at which the expected noise ceiling of ``triplets`` equals ``target``.

    Solves ``expected_noise_ceiling(softmax(logits / T), repeats) = target`` for ``T`` by exact
    bracketing root finding (``scipy.optimize.brentq`` on ``log T``), where ``logits`` are
    ``[H_jk, H_ik, H_ij]`` of every triplet. The expected ceiling decreases from (nearly) 1 as
    ``T -> 0`` to the ceiling of uniformly random answers as ``T -> inf``.

    Parameters
    ----------
    similarity : (n, n) hidden similarity matrix ``H``.
    triplets : (m, 3) integer triplets (e.g. a large random sample).
    repeats : answers per test triplet (the ceiling depends on it; the demo uses 10).
    target : the ceiling to reach (default: THINGS test set 2, 0.678).

    Raises
    ------
    ValueError
        If ``target`` is not strictly between the ceiling at the largest and at the smallest
        temperature of the bracket ``[1e-8, 1e8]`` times the logit scale.
    """
    h = np.asarray(similarity, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"similarity must be square, got {h.shape}")
    logits = similarity_logits(h, triplets)
    if logits.shape[0] == 0:
        raise ValueError("calibration needs at least one triplet")
    logits = logits - logits.mean(axis=1, keepdims=True)
    scale = float(np.abs(logits).max())
    if scale == 0.0:
        raise ValueError("all calibration triplets have equal logits: no temperature can work")

    def gap(log_t: float) -> float:
        return expected_noise_ceiling(softmax(logits / np.exp(log_t), axis=1), repeats) - target

    lo, hi = np.log(scale * 1e-8), np.log(scale * 1e8)
    g_lo, g_hi = gap(lo), gap(hi)
    if not (g_lo > 0.0 > g_hi):
        raise ValueError(
            f"target ceiling {target} is unreachable with {repeats} repeats: the expected "
            f"ceiling ranges from {g_hi + target:.4f} (T -> inf) to {g_lo + target:.4f} (T -> 0)"
        )
    return float(np.exp(brentq(gap, lo, hi, xtol=1e-12, rtol=1e-10)))
