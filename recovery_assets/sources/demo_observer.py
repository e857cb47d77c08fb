"""The offline demo's simulated observer, in place of the human raters.

Observer (:class:`DemoObserver`)
    A simulated person whose hidden similarity of stimuli ``a`` and ``b`` is ::

        H_ab = family_weight * [family(a) == family(b)]
               + (1 - family_weight) * K_ab                 (low-level image statistics)
               + noise * E_ab                                (idiosyncratic, seeded)

    where ``K`` is a Gaussian kernel on standardised low-level statistics (mean R, G, B,
    luminance contrast, edge energy; bandwidth = the median squared distance;
    :func:`~recovery_assets.sources.demo_stimuli.low_level_statistics`) and ``E`` is a seeded
    symmetric standard-normal matrix. For a triplet ``(i, j, k)`` its answer distribution is
    ``softmax([H_jk, H_ik, H_ij] / temperature)`` (position ``c`` = "the ``c``-th concept is the
    odd one out", exactly the probe convention of docs/method.md §4).

    The temperature is not a magic constant: by default it is solved by 1-D root finding
    (:func:`~recovery_assets.core.ceiling.calibrate_observer_temperature`,
    ``scipy.optimize.brentq`` on ``log T``) so that the *expected* leave-one-out noise ceiling of
    repeated test triplets equals the THINGS test-set-2 value 0.678. The expected ceiling of a
    triplet answered ``R`` times with probabilities ``p`` is computed exactly by enumerating all
    answer counts (:func:`~recovery_assets.core.ceiling.expected_noise_ceiling`), with the same
    leave-one-out rule as :func:`recovery_assets.core.triplets.noise_ceiling`.

Its judgements are written as THINGS-shaped files by :mod:`recovery_assets.sources.demo_folder`.
"""

from __future__ import annotations

from math import comb

import numpy as np
from scipy.special import softmax

from recovery_assets.core.calibration import DEFAULT_TARGET
from recovery_assets.core.ceiling import (
    calibrate_observer_temperature,
    expected_noise_ceiling,
    similarity_logits,
)
from recovery_assets.core.triplets import sample_unique_triplets
from recovery_assets.sources.demo_stimuli import _check_images, _check_int, low_level_statistics

__all__ = ["DEMO_REPEATS", "DemoObserver"]

# Answers per repeated test triplet of the demo (and of the default temperature calibration).
DEMO_REPEATS = 10
# Number of random triplets the default temperature calibration averages over.
_CALIBRATION_TRIPLETS = 20_000


# --------------------------------------------------------------------------------------------
# The simulated observer
# --------------------------------------------------------------------------------------------


class DemoObserver:
    """A simulated odd-one-out observer with a hidden similarity matrix ``H`` (see module doc).

    Parameters
    ----------
    images : (n, H, W, 3) uint8 stimuli (for the low-level statistics).
    families : (n,) family labels (any hashable values; same label = same family).
    seed : seed of the idiosyncratic similarity component and of the calibration triplets.
    noise : standard deviation of the idiosyncratic symmetric Gaussian component ``E``.
    family_weight : weight of family membership (``1 - family_weight`` goes to low-level
        statistics), in [0, 1].
    temperature : softmax temperature; ``None`` (default) calibrates it with
        :func:`~recovery_assets.core.ceiling.calibrate_observer_temperature` on
        ``calibration_triplets`` random triplets so that the expected noise ceiling with
        ``calibration_repeats`` answers per triplet equals ``target_ceiling``.

    Attributes
    ----------
    similarity : (n, n) float64 ``H`` (symmetric; the diagonal is never used).
    temperature : the temperature in use.
    """

    def __init__(
        self,
        images: np.ndarray,
        families: np.ndarray,
        seed: int = 0,
        *,
        noise: float = 0.05,
        family_weight: float = 0.5,
        temperature: float | None = None,
        target_ceiling: float = DEFAULT_TARGET,
        calibration_repeats: int = DEMO_REPEATS,
        calibration_triplets: int = _CALIBRATION_TRIPLETS,
    ) -> None:
        arr = _check_images(images)
        labels = np.asarray(families)
        n = arr.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"families must have shape ({n},), got {labels.shape}")
        if n < 3:
            raise ValueError(f"an observer needs at least 3 stimuli, got {n}")
        seed = _check_int(seed, "seed", minimum=0)
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a non-negative number, got {noise}")
        if not 0.0 <= family_weight <= 1.0:
            raise ValueError(f"family_weight must lie in [0, 1], got {family_weight}")

        self.n = n
        self.seed = seed
        self.noise = float(noise)
        self.family_weight = float(family_weight)
        _, self.family_index = np.unique(labels, return_inverse=True)
        same = (self.family_index[:, None] == self.family_index[None, :]).astype(np.float64)

        stats = low_level_statistics(arr)
        d2 = ((stats[:, None, :] - stats[None, :, :]) ** 2).sum(axis=2)
        off = d2[~np.eye(n, dtype=bool)]
        bandwidth = float(np.median(off)) if np.median(off) > 0 else 1.0
        kernel = np.exp(-d2 / bandwidth)

        rng = np.random.default_rng([seed, 0])
        e = rng.standard_normal((n, n))
        e = (e + e.T) / np.sqrt(2.0)
        h = self.family_weight * same + (1.0 - self.family_weight) * kernel + self.noise * e
        np.fill_diagonal(h, 0.0)
        self.similarity = h

        if temperature is None:
            cal = sample_unique_triplets(
                np.arange(n),
                min(int(calibration_triplets), comb(n, 3)),
                np.random.default_rng([seed, 1]),
            )
            temperature = calibrate_observer_temperature(
                h, cal, repeats=calibration_repeats, target=target_ceiling
            )
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def logits(self, triplets: np.ndarray) -> np.ndarray:
        """(m, 3) logits ``[H_jk, H_ik, H_ij] / temperature`` of triplets ``(i, j, k)``."""
        return similarity_logits(self.similarity, triplets) / self.temperature

    def choice_probabilities(self, triplets: np.ndarray) -> np.ndarray:
        """(m, 3) probability that position 0, 1 or 2 of each triplet is the odd one out."""
        return softmax(self.logits(triplets), axis=1)

    def expected_ceiling(self, triplets: np.ndarray, repeats: int) -> float:
        """Expected noise ceiling of ``triplets`` answered ``repeats`` times each."""
        return expected_noise_ceiling(self.choice_probabilities(triplets), repeats)

    def answer(self, triplets: np.ndarray, seed: int | np.random.Generator) -> np.ndarray:
        """Draw one answer per triplet: the (m,) int64 position of the odd one out."""
        p = self.choice_probabilities(triplets)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        u = rng.random(p.shape[0])
        cum = np.cumsum(p, axis=1)
        return np.minimum((u[:, None] >= cum[:, :2]).sum(axis=1), 2).astype(np.int64)
