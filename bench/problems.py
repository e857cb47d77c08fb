"""Synthetic probe problems for the benchmarks: THINGS-sized, with a hidden human-like similarity.

Concepts have a latent code L (n x 32); a network's features are a random nonlinear read-out of the
latent code plus noise (p columns, non-negative like pooled ReLU features), scaled so that zero-shot
logits have unit spread; choices are sampled from a softmax over a similarity of the latent codes.
"""

from __future__ import annotations

import numpy as np

from recovery_assets.core.triplets import concept_folds, sample_unique_triplets


def latent_codes(n: int = 1854, dim: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim))


def features(latent: np.ndarray, p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    n, dim = latent.shape
    R = rng.standard_normal((dim, p)) / np.sqrt(dim)
    X = np.maximum(latent @ R + 0.7 * rng.standard_normal((n, p)), 0.0)
    X /= np.sqrt((X * X).sum(1).mean())  # mean squared norm 1
    X *= 2.0
    return X.astype(np.float32)


def choices(latent: np.ndarray, triplets: np.ndarray, seed: int) -> np.ndarray:
    """Answer positions sampled from softmax([s_jk, s_ik, s_ij]) of a latent similarity."""
    rng = np.random.default_rng(2000 + seed)
    L = latent / np.sqrt(latent.shape[1]) * 2.0
    i, j, k = triplets.T
    logits = np.stack([(L[j] * L[k]).sum(1), (L[i] * L[k]).sum(1), (L[i] * L[j]).sum(1)], 1)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    return (rng.random(len(prob))[:, None] > prob.cumsum(1)).sum(1).clip(0, 2)


def training_set(n_concepts: int, n_train: int, seed: int = 0):
    """Fold 0 of simulation ``seed``: the training concepts and N unique triplets inside them."""
    fold = concept_folds(n_concepts, seed)[0]
    trip = sample_unique_triplets(fold.train, n_train, seed)
    return fold, trip
