"""Synthetic probe problems for the benchmarks: THINGS-sized, with a hidden human-like similarity.

Two kinds of problem:

* **Latent-code problems** (``latent_codes``, ``features``, ``choices``; the easy case). Concepts
  have a latent code L (n x 32); a network's features are a random nonlinear read-out of the latent
  code plus noise (p columns, non-negative like pooled ReLU features), scaled so that zero-shot
  logits have unit spread; choices are sampled from a softmax over a similarity of the latent codes.
  Nearly all of the variance lies in a few directions, which makes the fits easy.

* **Realistic problems** (``powerlaw_features``, ``make_generator``, ``realistic_problem``). Pooled
  features of trained vision networks have eigenspectra falling as a power law over hundreds of
  dimensions (singular values ~ k^-0.5 ... k^-1). A network's *code* is U diag(s) with U a random
  n x r orthonormal matrix (r = min(n, p)) and s_k = k**exponent; its features are the code read
  out by a random p x r matrix V with orthonormal columns (X0 = U diag(s) V^T), standardised,
  shifted by +0.5 and rectified (max(., 0): non-negative like pooled ReLU features), then scaled to
  a mean squared row norm of 4 (the scale of ``features``). Rectification flattens the spectrum a
  little but keeps it a power law over hundreds of dimensions: ``spectrum_slopes`` measures the
  log-log slope of the centred singular values (about -0.43, -0.63, -0.79 over k = 1 ... 500 for
  exponents -0.5, -0.75, -1.0 at p = 1,024, n = 1,854).

  A generator (the network playing the human) and a candidate share most but not all of their
  variance: the candidate's code is ``cos(theta) * G + sin(theta) * O`` with G the generator's code
  (truncated or zero-padded to the candidate's rank) and O an independent code with the candidate's
  own spectrum, column by column (component k of the candidate mixes component k of both, so the
  candidate keeps the power law). theta is chosen so that the shared term carries ``share`` = 80 %
  of the candidate code's variance: cos^2 theta |G|^2 / (cos^2 theta |G|^2 + sin^2 theta |O|^2) =
  0.8 (the cross term has mean zero), i.e. tan^2 theta = |G|^2 (1 - 0.8) / (0.8 |O|^2); for equal
  spectra theta = arctan(1/2) = 26.6 degrees. 80 % is a "good but not perfect" candidate: enough
  shared structure that the probe has a lot to learn, with a fifth of the candidate's variance
  irrelevant to the answers. The answers are sampled from the generator's *calibrated* softmax:
  logits [s_jk, s_ik, s_ij] / T with s = X_g X_g^T, and T solved (the project's own
  ``calibrate_temperature``) so that the mean over calibration triplets of the largest choice
  probability is 0.678 (the human noise ceiling); the answers are drawn by the project's
  ``sample_answers``, as a study's synthetic answers are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recovery_assets.core.calibration import calibrate_temperature
from recovery_assets.core.generator import triplet_logits
from recovery_assets.core.simulation import sample_answers
from recovery_assets.core.triplets import concept_folds, sample_unique_triplets

NOISE_CEILING = 0.678  # mean max-probability of the calibrated generator (the human ceiling)
SHARE = 0.8  # fraction of a candidate's code variance shared with the generator
OFFSET = 0.5  # shift of the standardised read-out before rectification
SQ_NORM = 4.0  # mean squared row norm of all features (as ``features``: norm 1, then x2)
N_CALIBRATION = 10_000  # calibration triplets (drawn over all concepts) for the temperature


# ---------------------------------------------------------------------------- latent-code problems
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


# ---------------------------------------------------------------------------- power-law features
def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A Haar-random rows x cols matrix with orthonormal columns (rows >= cols)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))


def powerlaw_code(n: int, rank: int, exponent: float, seed: int) -> np.ndarray:
    """U diag(s): U a random n x rank orthonormal matrix, s_k = k**exponent (k = 1 ... rank)."""
    rng = np.random.default_rng([3000, seed])
    return _orthonormal(rng, n, rank) * np.arange(1, rank + 1, dtype=np.float64) ** exponent


def mix_codes(
    shared: np.ndarray, own: np.ndarray, share: float = SHARE
) -> tuple[np.ndarray, float]:
    """``cos(theta) * shared + sin(theta) * own`` column by column, with ``shared`` truncated or
    zero-padded to ``own``'s columns and theta chosen so that the shared term carries ``share`` of
    the mixture's variance (cross term: mean zero). Returns (code, theta)."""
    r = own.shape[1]
    G = shared[:, :r]
    if G.shape[1] < r:
        G = np.pad(G, ((0, 0), (0, r - G.shape[1])))
    a, b = float((G * G).sum()), float((own * own).sum())
    theta = float(np.arctan(np.sqrt(a * (1.0 - share) / (share * b))))
    return np.cos(theta) * G + np.sin(theta) * own, theta


def rectified_readout(code: np.ndarray, p: int, seed: int, offset: float = OFFSET) -> np.ndarray:
    """Features of a code (n x r, r <= p): X0 = code V^T with V a random p x r orthonormal matrix,
    standardised, + ``offset``, max(., 0), scaled to mean squared row norm 4 (float32)."""
    rng = np.random.default_rng([4000, seed])
    X = code @ _orthonormal(rng, p, code.shape[1]).T
    X = np.maximum(X / X.std() + offset, 0.0)
    X *= np.sqrt(SQ_NORM / (X * X).sum(1).mean())
    return X.astype(np.float32)


def powerlaw_features(
    n: int,
    p: int,
    exponent: float,
    seed: int,
    shared: np.ndarray | None = None,
    share: float = SHARE,
    offset: float = OFFSET,
) -> np.ndarray:
    """Rectified features (n x p, float32, mean squared row norm 4) with a power-law spectrum.

    The code is ``powerlaw_code(n, min(n, p), exponent, seed)`` (so a generator's code, to pass as
    ``shared`` to its candidates, is that call with the generator's arguments); with ``shared`` (an
    n x r' code) it is mixed with it by ``mix_codes`` so that ``share`` of its variance is shared.
    Then ``rectified_readout``."""
    code = powerlaw_code(n, min(n, p), exponent, seed)
    if shared is not None:
        code, _ = mix_codes(shared, code, share)
    return rectified_readout(code, p, seed, offset)


def spectrum_slopes(
    X: np.ndarray, ranges: tuple[tuple[int, int], ...] = ((1, 10), (10, 100), (100, 500))
) -> dict[tuple[int, int], float]:
    """Log-log slope (least squares) of the centred singular values s_k against k over each range
    [lo, hi] of k, keyed by the range asked for. hi is clipped to half the rank (the last
    components fall off faster, an edge effect of the finite rank); ranges left with < 3 points
    are dropped. The singular values come from the n x n centred Gram (fast for wide X)."""
    Xc = np.asarray(X, dtype=np.float64)
    Xc = Xc - Xc.mean(0)
    ev = np.linalg.eigvalsh(Xc @ Xc.T)[::-1]
    s = np.sqrt(np.clip(ev, 0.0, None))
    rank = int((s > s[0] * 1e-6).sum())
    out = {}
    for lo, hi in ranges:
        top = min(hi, rank // 2)
        if top - lo + 1 < 3:
            continue
        k = np.arange(lo, top + 1)
        out[(lo, hi)] = float(np.polyfit(np.log(k), np.log(s[lo - 1 : top]), 1)[0])
    return out


# ---------------------------------------------------------------------------- calibrated answers
# The project's own calibration and sampling (docs/method.md §5-6): the benchmark's answers are
# drawn exactly as a study's synthetic answers are.
def similarity_logits(X: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """(m, 3) logits [s_jk, s_ik, s_ij] with s = X X^T (float64), at T = 1."""
    return triplet_logits(np.asarray(X, dtype=np.float64), np.asarray(triplets))


@dataclass
class Generator:
    """A power-law network playing the human: its code, features and calibrated temperature."""

    code: np.ndarray  # n x r, U diag(s)
    features: np.ndarray  # n x p, rectified
    exponent: float
    temperature: float

    def candidate(
        self, p: int, seed: int, exponent: float | None = None, share: float = SHARE
    ) -> np.ndarray:
        """A candidate's features (p columns) sharing ``share`` of its code variance with this
        generator; ``exponent`` defaults to the generator's."""
        e = self.exponent if exponent is None else exponent
        return powerlaw_features(len(self.code), p, e, seed, shared=self.code, share=share)

    def answers(self, triplets: np.ndarray, seed: int) -> np.ndarray:
        return sample_answers(similarity_logits(self.features, triplets), self.temperature, seed)


def make_generator(
    n: int, p: int, exponent: float, seed: int, target: float = NOISE_CEILING
) -> Generator:
    """A generator with power-law features, its temperature calibrated to ``target`` on
    ``N_CALIBRATION`` triplets drawn over all n concepts (like test set 2 of the method)."""
    code = powerlaw_code(n, min(n, p), exponent, seed)
    X = rectified_readout(code, p, seed)
    cal = sample_unique_triplets(np.arange(n), min(N_CALIBRATION, n * (n - 1) * (n - 2) // 6), seed)
    T = calibrate_temperature(similarity_logits(X, cal), target)
    return Generator(code=code, features=X, exponent=exponent, temperature=T)


# ---------------------------------------------------------------------------- whole problems
@dataclass
class Problem:
    """One probe fit: the candidate's features (all n concepts), training triplets, answers."""

    name: str  # "powerlaw" or "latent"
    p: int
    exponent: float | None
    features: np.ndarray
    triplets: np.ndarray
    answers: np.ndarray
    temperature: float | None = None
    theta: float | None = None  # mixing angle of the candidate's code (radians)


def realistic_problem(
    p: int,
    exponent: float,
    n_concepts: int = 1854,
    n_train: int = 25_600,
    seed: int = 0,
    share: float = SHARE,
) -> Problem:
    """Fold 0 of ``concept_folds(n_concepts, seed)``, N unique training triplets inside its
    training concepts, answered by a calibrated generator (p columns, the same exponent, seed
    10,000 + seed); the candidate (seed ``seed``) shares ``share`` of its code variance with it."""
    gen = make_generator(n_concepts, p, exponent, 10_000 + seed)
    _, trip = training_set(n_concepts, n_train, seed)
    own = powerlaw_code(n_concepts, min(n_concepts, p), exponent, seed)
    code, theta = mix_codes(gen.code, own, share)
    X = rectified_readout(code, p, seed)
    return Problem(
        "powerlaw", p, exponent, X, trip, gen.answers(trip, seed), gen.temperature, theta
    )


def latent_problem(p: int, n_concepts: int = 1854, n_train: int = 25_600, seed: int = 0):
    """The latent-code problem of the earlier benchmark lines (the easy case)."""
    latent = latent_codes(n_concepts)
    _, trip = training_set(n_concepts, n_train, seed)
    return Problem("latent", p, None, features(latent, p, seed), trip, choices(latent, trip, seed))
