"""The pixel reference: zero-shot similarity of standardised 8 x 8 downsampled pixels.

When no model features are given, this reference decides the convention of the judgement files
(:func:`~recovery_assets.core.convention.detect_convention`); it is also the demo's reference.
Pure numpy on image arrays (reading the images is :mod:`recovery_assets.sources.things`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recovery_assets.core.generator import triplet_logits

__all__ = ["pixel_features", "pixel_reference"]


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Standardised 8 x 8 downsampled pixels: the features of :func:`pixel_reference`.

    Each image (``(n, H, W, 3)``, ``H, W >= 8``) is block-averaged to 8 x 8 x 3 (when ``H`` or
    ``W`` is not a multiple of 8 the last ``H % 8`` rows / ``W % 8`` columns are dropped), and
    each of the 192 features is standardised across images.

    Returns
    -------
    (n, 192) float64 array.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[1] < 8 or arr.shape[2] < 8:
        raise ValueError(f"images must be an (n, H, W, 3) array with H, W >= 8, got {arr.shape}")
    n, h, w, _ = arr.shape
    h8, w8 = h - h % 8, w - w % 8
    arr = arr[:, :h8, :w8].astype(np.float64)
    small = arr.reshape(n, 8, h8 // 8, 8, w8 // 8, 3).mean((2, 4)).reshape(n, -1)
    return (small - small.mean(0)) / (small.std(0) + 1e-9)


def pixel_reference(images: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Zero-shot similarity of standardised 8 x 8 downsampled pixels (the demo's reference).

    Returns ``similarity_fn(triplets) -> triplet_logits(pixel_features(images), triplets)``, the
    ``[s_jk, s_ik, s_ij]`` logits :func:`~recovery_assets.core.convention.detect_convention` needs.
    """
    small = pixel_features(images)
    return lambda trip: triplet_logits(small, trip)
