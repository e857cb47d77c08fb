"""The offline demo study: real photographs, a simulated observer and THINGS-shaped files.

The demo runs the whole model-recovery pipeline offline, in minutes, on a small laptop, with the
same loader and the same noise-ceiling code as THINGS (docs/method.md §2). It has three parts.

Stimuli (:func:`demo_stimuli`)
    Real photographs that ship *inside* installed packages (nothing is downloaded): scikit-image's
    bundled ``skimage.data`` images and scikit-learn's ``load_sample_images()``. Each photograph is
    a *concept family*; seeded random square crops of one photograph (random position and scale,
    resized to ``size x size`` uint8 RGB; grey photographs are repeated over 3 channels) are the
    members of its family, the demo's analogue of THINGS concepts.

Observer (:class:`DemoObserver`)
    A simulated person in place of the human raters. Its hidden similarity of stimuli ``a`` and
    ``b`` is ::

        H_ab = family_weight * [family(a) == family(b)]
               + (1 - family_weight) * K_ab                 (low-level image statistics)
               + noise * E_ab                                (idiosyncratic, seeded)

    where ``K`` is a Gaussian kernel on standardised low-level statistics (mean R, G, B,
    luminance contrast, edge energy; bandwidth = the median squared distance) and ``E`` is a
    seeded symmetric standard-normal matrix. For a triplet ``(i, j, k)`` its answer distribution
    is ``softmax([H_jk, H_ik, H_ij] / temperature)`` (position ``c`` = "the ``c``-th concept is the
    odd one out", exactly the probe convention of docs/method.md §4).

    The temperature is not a magic constant: by default it is solved by 1-D root finding
    (:func:`calibrate_observer_temperature`, ``scipy.optimize.brentq`` on ``log T``) so that the
    *expected* leave-one-out noise ceiling of repeated test triplets equals the THINGS test-set-2
    value 0.678. The expected ceiling of a triplet answered ``R`` times with probabilities ``p`` is
    computed exactly by enumerating all answer counts (:func:`expected_noise_ceiling`), with the
    same leave-one-out rule as :func:`recovery_assets.core.triplets.noise_ceiling`.

Files (:func:`human_like_files`, :func:`write_things_folder`)
    Judgement rows in the THINGS human-file convention ``[pair, pair, odd]`` (columns 0 and 1 the
    pair judged most similar, column 2 the odd one out): unique random training and validation
    triplets answered once, and three test sets of repeated triplets (each unique test triplet
    answered ``repeats`` times by independent draws), written as a THINGS-shaped folder.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import lgamma
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import softmax

from recovery_assets.core.calibration import DEFAULT_TARGET
from recovery_assets.core.triplets import positions_to_human_rows, sample_unique_triplets

__all__ = [
    "DEMO_CROPS_PER_FAMILY",
    "DEMO_IMAGE_SIZE",
    "DEMO_N_FAMILIES",
    "DEMO_N_TEST_TRIPLETS",
    "DEMO_N_TRAIN",
    "DEMO_N_VAL",
    "DEMO_REPEATS",
    "FILE_KEYS",
    "PHOTO_FAMILIES",
    "DemoObserver",
    "PhotoSource",
    "calibrate_observer_temperature",
    "demo_stimuli",
    "expected_noise_ceiling",
    "human_like_files",
    "low_level_statistics",
    "write_things_folder",
]

# Recommended demo sizes (300 stimuli; about a minute end to end on 2 CPU cores).
DEMO_N_FAMILIES = 20
DEMO_CROPS_PER_FAMILY = 15
DEMO_IMAGE_SIZE = 64
DEMO_N_TRAIN = 20_000
DEMO_N_VAL = 2_000
DEMO_N_TEST_TRIPLETS = 1_000
DEMO_REPEATS = 10

# The THINGS judgement files, in the order of docs/method.md §2.
FILE_KEYS = ("trainset", "validationset", "testset1", "testset2", "testset3")

# Crops are squares whose side is this fraction (uniform) of the photograph's shorter side.
_CROP_SCALE = (0.35, 0.85)
# Number of random triplets the default temperature calibration averages over.
_CALIBRATION_TRIPLETS = 20_000


# --------------------------------------------------------------------------------------------
# Photographs bundled with installed packages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSource:
    """One bundled photograph: the family name, where it comes from, and how to load it."""

    family: str
    source: str
    load: Callable[[], np.ndarray]


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[index] if index is not None else image

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        names = [os.path.basename(f) for f in bunch.filenames]
        return bunch.images[names.index(filename)]

    return load


# Every photograph here ships inside scikit-image 0.26 or scikit-learn and loads offline (the
# skimage.data images that need pooch to download, e.g. ``brain``, ``eagle``, ``lily``, ``skin``,
# are left out; ``cat`` is the same photograph as ``chelsea``; synthetic images such as
# ``checkerboard``, ``colorwheel``, ``logo`` and ``shepp_logan_phantom`` are not photographs).
# Colour photographs first, so small demos use the most varied ones. The order is fixed: family k
# is always the same photograph, whatever ``n_families`` is.
PHOTO_FAMILIES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", "skimage.data.astronaut", _skimage("astronaut")),
    PhotoSource("chelsea", "skimage.data.chelsea", _skimage("chelsea")),
    PhotoSource("coffee", "skimage.data.coffee", _skimage("coffee")),
    PhotoSource("rocket", "skimage.data.rocket", _skimage("rocket")),
    PhotoSource("china", "sklearn.datasets.load_sample_images:china.jpg", _sklearn("china.jpg")),
    PhotoSource("flower", "sklearn.datasets.load_sample_images:flower.jpg", _sklearn("flower.jpg")),
    PhotoSource(
        "motorcycle", "skimage.data.stereo_motorcycle[0]", _skimage("stereo_motorcycle", 0)
    ),
    PhotoSource(
        "hubble_deep_field", "skimage.data.hubble_deep_field", _skimage("hubble_deep_field")
    ),
    PhotoSource(
        "immunohistochemistry",
        "skimage.data.immunohistochemistry",
        _skimage("immunohistochemistry"),
    ),
    PhotoSource("retina", "skimage.data.retina", _skimage("retina")),
    PhotoSource("camera", "skimage.data.camera", _skimage("camera")),
    PhotoSource("coins", "skimage.data.coins", _skimage("coins")),
    PhotoSource("moon", "skimage.data.moon", _skimage("moon")),
    PhotoSource("clock", "skimage.data.clock", _skimage("clock")),
    PhotoSource("brick", "skimage.data.brick", _skimage("brick")),
    PhotoSource("grass", "skimage.data.grass", _skimage("grass")),
    PhotoSource("gravel", "skimage.data.gravel", _skimage("gravel")),
    PhotoSource("cell", "skimage.data.cell", _skimage("cell")),
    PhotoSource("page", "skimage.data.page", _skimage("page")),
    PhotoSource("text", "skimage.data.text", _skimage("text")),
    PhotoSource("microaneurysms", "skimage.data.microaneurysms", _skimage("microaneurysms")),
)


@functools.cache
def _photo(index: int) -> np.ndarray:
    """The photograph of family ``index`` as a read-only (H, W, 3) uint8 array."""
    spec = PHOTO_FAMILIES[index]
    image = np.asarray(spec.load())
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise RuntimeError(f"{spec.source} has unexpected shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise RuntimeError(f"{spec.source} has dtype {image.dtype}, expected uint8")
    image = np.ascontiguousarray(image)
    image.setflags(write=False)
    return image


def demo_stimuli(
    n_families: int, crops_per_family: int, size: int = DEMO_IMAGE_SIZE, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """Seeded random crops of bundled photographs, one concept family per photograph.

    Family ``f`` is ``PHOTO_FAMILIES[f]`` (the first ``n_families`` of a fixed list). Each crop is
    a square of side ``U(0.35, 0.85) x`` the photograph's shorter side at a uniformly random
    position, resized to ``size x size`` with a Lanczos (anti-aliasing) filter. Each family has its
    own random stream derived from ``(seed, family index)``: the same seed always gives identical
    stimuli, another seed gives other crops, and family ``f``'s crops do not depend on
    ``n_families``.

    Parameters
    ----------
    n_families : number of photographs (1 to ``len(PHOTO_FAMILIES)``).
    crops_per_family : crops per photograph (>= 1).
    size : side of the square output images in pixels (>= 8).
    seed : non-negative integer seed.

    Returns
    -------
    table : DataFrame with one row per stimulus, in concept order (family-major), columns
        ``uniqueID`` (``"coffee_03"``), ``family``, ``source`` (``"skimage.data.coffee"``) and
        ``crop_box`` (``"top,left,bottom,right"`` in pixels of the source photograph).
    images : (n_families * crops_per_family, size, size, 3) uint8 array, row ``i`` = table row i.
    """
    from PIL import Image

    available = len(PHOTO_FAMILIES)
    n_families = _check_int(n_families, "n_families", minimum=1)
    crops_per_family = _check_int(crops_per_family, "crops_per_family", minimum=1)
    size = _check_int(size, "size", minimum=8)
    seed = _check_int(seed, "seed", minimum=0)
    if n_families > available:
        raise ValueError(
            f"n_families={n_families} but only {available} bundled photographs are available "
            f"({', '.join(p.family for p in PHOTO_FAMILIES)})"
        )

    width = max(2, len(str(crops_per_family)))
    rows: list[dict[str, str]] = []
    images = np.empty((n_families * crops_per_family, size, size, 3), dtype=np.uint8)
    for f in range(n_families):
        spec = PHOTO_FAMILIES[f]
        photo = _photo(f)
        height, wide = photo.shape[:2]
        short = min(height, wide)
        pil = Image.fromarray(photo)
        rng = np.random.default_rng([seed, f])
        for c in range(crops_per_family):
            side = max(1, int(round(rng.uniform(*_CROP_SCALE) * short)))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, wide - side + 1))
            box = (left, top, left + side, top + side)
            crop = pil.resize((size, size), resample=Image.Resampling.LANCZOS, box=box)
            images[f * crops_per_family + c] = np.asarray(crop, dtype=np.uint8)
            rows.append(
                {
                    "uniqueID": f"{spec.family}_{c + 1:0{width}d}",
                    "family": spec.family,
                    "source": spec.source,
                    "crop_box": f"{top},{left},{top + side},{left + side}",
                }
            )
    table = pd.DataFrame(rows, columns=["uniqueID", "family", "source", "crop_box"])
    return table, images


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_images(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"images must be a (n, H, W, 3) uint8 array, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


# --------------------------------------------------------------------------------------------
# Low-level statistics
# --------------------------------------------------------------------------------------------


def low_level_statistics(images: np.ndarray) -> np.ndarray:
    """Per-image low-level statistics, each standardised across images.

    Columns: mean R, mean G, mean B, luminance contrast (standard deviation of the Rec. 601
    luminance) and edge energy (mean Sobel gradient magnitude of the luminance). Each column is
    z-scored over the images (a constant column becomes 0).

    Returns
    -------
    (n, 5) float64 array.
    """
    from scipy import ndimage

    arr = _check_images(images).astype(np.float64) / 255.0
    lum = arr @ np.array([0.299, 0.587, 0.114])
    gx = ndimage.sobel(lum, axis=1)
    gy = ndimage.sobel(lum, axis=2)
    stats = np.column_stack(
        [
            arr.mean(axis=(1, 2)),
            lum.std(axis=(1, 2)),
            np.hypot(gx, gy).mean(axis=(1, 2)),
        ]
    )
    sd = stats.std(axis=0)
    return (stats - stats.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


# --------------------------------------------------------------------------------------------
# Expected noise ceiling and temperature calibration
# --------------------------------------------------------------------------------------------


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
    repeats = _check_int(repeats, "repeats", minimum=2)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"probabilities must have shape (m, 3) with m >= 1, got {p.shape}")
    counts, log_coef, agreement = _count_table(repeats)
    # log(0) -> a huge negative number: exact zero probability for counts > 0, no 0 * inf.
    log_p = np.log(np.clip(p, np.finfo(np.float64).tiny, 1.0))
    terms = counts[None, :, :] * log_p[:, None, :]
    log_prob = log_coef[None, :] + terms.sum(axis=2)
    return float((np.exp(log_prob) @ agreement).mean())


def _triplet_logits(similarity: np.ndarray, triplets: np.ndarray) -> np.ndarray:
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
    repeats: int = DEMO_REPEATS,
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
    repeats : answers per test triplet (the ceiling depends on it).
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
    logits = _triplet_logits(h, triplets)
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
        :func:`calibrate_observer_temperature` on ``calibration_triplets`` random triplets so that
        the expected noise ceiling with ``calibration_repeats`` answers per triplet equals
        ``target_ceiling``.

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
                min(int(calibration_triplets), _n_triplets(n)),
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
        return _triplet_logits(self.similarity, triplets) / self.temperature

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


def _n_triplets(n: int) -> int:
    return n * (n - 1) * (n - 2) // 6


# --------------------------------------------------------------------------------------------
# THINGS-convention judgement files
# --------------------------------------------------------------------------------------------


def human_like_files(
    observer: DemoObserver,
    n_train: int = DEMO_N_TRAIN,
    n_val: int = DEMO_N_VAL,
    n_test_triplets: int = DEMO_N_TEST_TRIPLETS,
    repeats: int = DEMO_REPEATS,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The observer's judgements as THINGS human files (rows ``[pair, pair, odd]``).

    ``n_train + n_val + 3 * n_test_triplets`` distinct unique random triplets are drawn over all
    stimuli (uniform, :func:`~recovery_assets.core.triplets.sample_unique_triplets`), so no
    triplet is shared between sets. Training and validation triplets are answered once. Each of
    the three test sets holds its own ``n_test_triplets`` unique triplets, each answered
    ``repeats`` times by independent draws, with the rows shuffled (like THINGS test sets, whose
    repeated triplets are interleaved). Every draw is seeded: the same observer and seed give
    identical files.

    Returns
    -------
    dict with keys ``trainset, validationset, testset1, testset2, testset3`` of (m, 3) int64
    arrays; column 2 is the odd one out.
    """
    if not isinstance(observer, DemoObserver):
        raise ValueError(f"observer must be a DemoObserver, got {type(observer).__name__}")
    n_train = _check_int(n_train, "n_train", minimum=0)
    n_val = _check_int(n_val, "n_val", minimum=0)
    n_test = _check_int(n_test_triplets, "n_test_triplets", minimum=1)
    repeats = _check_int(repeats, "repeats", minimum=2)
    seed = _check_int(seed, "seed", minimum=0)
    total = n_train + n_val + 3 * n_test
    capacity = _n_triplets(observer.n)
    if total > capacity:
        raise ValueError(
            f"{observer.n} stimuli hold only {capacity} unique triplets, but n_train + n_val + "
            f"3 * n_test_triplets = {total} are needed"
        )
    root = np.random.SeedSequence([seed, 2])
    triplet_stream, *set_streams = root.spawn(1 + len(FILE_KEYS))
    triplets = sample_unique_triplets(
        np.arange(observer.n), total, np.random.default_rng(triplet_stream)
    )
    bounds = np.cumsum([0, n_train, n_val, n_test, n_test, n_test])
    files: dict[str, np.ndarray] = {}
    for s, key in enumerate(FILE_KEYS):
        rng = np.random.default_rng(set_streams[s])
        t = triplets[bounds[s] : bounds[s + 1]]
        if key.startswith("testset"):
            t = np.repeat(t, repeats, axis=0)
            t = t[rng.permutation(t.shape[0])]
        answers = observer.answer(t, rng)
        files[key] = positions_to_human_rows(t, answers).astype(np.int64)
    return files


# --------------------------------------------------------------------------------------------
# A THINGS-shaped folder
# --------------------------------------------------------------------------------------------

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def write_things_folder(
    directory: str | os.PathLike[str],
    table: pd.DataFrame,
    images: np.ndarray,
    files: Mapping[str, np.ndarray],
    *,
    jpeg_quality: int = 95,
) -> dict[str, Path]:
    """Write stimuli and judgements as a THINGS-shaped folder (docs/method.md §2).

    Layout::

        directory/things_concepts.tsv                  tab-separated, header, row = concept index
        directory/images/<uniqueID>/<uniqueID>_01b.jpg one image per concept
        directory/triplets/<key>.txt                   e.g. trainset.txt: 0-based ints, 3 per row

    The TSV holds all columns of ``table`` (``uniqueID`` first) in the table's row order (never
    sorted). Images are JPEG (quality ``jpeg_quality``, no chroma subsampling), so reading them
    back is close to, not bit-identical with, ``images``. Triplet files are whitespace-separated
    integers without a header, readable by ``numpy.loadtxt(path, dtype=int)``.

    Returns
    -------
    dict of paths: ``root``, ``concepts`` (the TSV), ``images`` (the image folder), ``triplets``
    (the triplet folder) and one entry per key of ``files`` (its ``.txt`` file).
    """
    from PIL import Image

    arr = _check_images(images)
    if "uniqueID" not in table.columns:
        raise ValueError("table must have a 'uniqueID' column")
    n = len(table)
    if arr.shape[0] != n:
        raise ValueError(f"table has {n} rows but images has {arr.shape[0]}")
    ids = [str(u) for u in table["uniqueID"]]
    if len(set(ids)) != n:
        raise ValueError("uniqueID values must be unique")
    bad = [u for u in ids if not _SAFE_ID.match(u)]
    if bad:
        raise ValueError(f"uniqueID values must be safe file names, got e.g. {bad[:3]}")
    checked: dict[str, np.ndarray] = {}
    for key, rows in files.items():
        if not _SAFE_KEY.match(str(key)):
            raise ValueError(f"file key {key!r} is not a safe file name")
        r = np.asarray(rows)
        if r.ndim != 2 or r.shape[1] != 3 or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise ValueError(f"{key} must be an (m, 3) integer array, got {r.shape} {r.dtype}")
        if r.size and (r.min() < 0 or r.max() >= n):
            raise ValueError(f"{key} has concept indices outside [0, {n})")
        checked[str(key)] = r.astype(np.int64)

    root = Path(directory)
    image_dir = root / "images"
    triplet_dir = root / "triplets"
    image_dir.mkdir(parents=True, exist_ok=True)
    triplet_dir.mkdir(parents=True, exist_ok=True)

    columns = ["uniqueID"] + [c for c in table.columns if c != "uniqueID"]
    concepts = root / "things_concepts.tsv"
    table[columns].to_csv(concepts, sep="\t", index=False)
    for uid, image in zip(ids, arr, strict=True):
        folder = image_dir / uid
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(
            folder / f"{uid}_01b.jpg", format="JPEG", quality=int(jpeg_quality), subsampling=0
        )
    paths: dict[str, Path] = {
        "root": root,
        "concepts": concepts,
        "images": image_dir,
        "triplets": triplet_dir,
    }
    for key, rows in checked.items():
        path = triplet_dir / f"{key}.txt"
        np.savetxt(path, rows, fmt="%d", delimiter=" ")
        paths[key] = path
    return paths
