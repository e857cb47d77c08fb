"""The offline demo's stimuli: seeded crops of photographs bundled with installed packages.

The demo runs the whole model-recovery pipeline offline, in minutes, on a small laptop, with the
same loader and the same noise-ceiling code as THINGS (docs/method.md §2). It has three parts: the
stimuli (this module), a simulated observer in place of the human raters
(:mod:`recovery_assets.sources.demo_observer`) and its judgements written as a THINGS-shaped
folder (:mod:`recovery_assets.sources.demo_folder`).

Stimuli (:func:`demo_stimuli`)
    Real photographs that ship *inside* installed packages (nothing is downloaded): scikit-image's
    bundled ``skimage.data`` images and scikit-learn's ``load_sample_images()``. Each photograph is
    a *concept family*; seeded random square crops of one photograph (random position and scale,
    resized to ``size x size`` uint8 RGB; grey photographs are repeated over 3 channels) are the
    members of its family, the demo's analogue of THINGS concepts.

Low-level statistics (:func:`low_level_statistics`)
    Per-image mean colour, luminance contrast and edge energy, which the simulated observer's
    similarity uses.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "DEMO_CROPS_PER_FAMILY",
    "DEMO_IMAGE_SIZE",
    "DEMO_N_FAMILIES",
    "PHOTO_FAMILIES",
    "PhotoSource",
    "demo_stimuli",
    "low_level_statistics",
]

# Recommended demo sizes (300 stimuli; about a minute end to end on 2 CPU cores).
DEMO_N_FAMILIES = 20
DEMO_CROPS_PER_FAMILY = 15
DEMO_IMAGE_SIZE = 64

# Crops are squares whose side is this fraction (uniform) of the photograph's shorter side.
_CROP_SCALE = (0.35, 0.85)


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
