"""Synthetic odd-one-out data for one recovery job (study.md §6).

For a generator ``g`` (a human-fitted probe with calibrated temperature ``T_g``, study.md §5), a
training size ``N`` and a simulation index ``s``:

1. the concepts are split into 3 folds with seed ``s`` (:func:`~recovery_assets.core.triplets.
   concept_folds`): per fold, test concepts = that fold, the rest 70 % train / 30 % validation;
2. per fold, ``N`` training, ``round(N/8)`` validation and ``round(N/8)`` test triplets are drawn
   uniformly at random, unique, with 3 distinct concepts inside the respective concept subset and
   excluding every triplet of the human dataset (compared after sorting);
3. each triplet gets one answer drawn from ``Categorical(softmax([s_jk, s_ik, s_ij] / T_g))``.

Every random draw has its own seed derived with :func:`job_seed` from (generator, N, s, fold,
split), so the same ``(g, N, s)`` always gives identical data, independent of which other jobs run
and in which order. The same synthetic dataset serves all candidates of the job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from recovery_assets.core.triplets import concept_folds, sample_unique_triplets

__all__ = ["SPLITS", "job_seed", "sample_answers", "synthetic_job"]

SPLITS = ("train", "val", "test")


def job_seed(*parts: object) -> int:
    """Stable integer seed in ``[0, 2**63)`` derived from ``parts`` with SHA-256.

    Typical parts are ``(generator name, n_train, simulation, fold, split name[, purpose])``. Each
    part is converted with ``str`` (so ``3`` and ``np.int64(3)`` agree, ``3`` and ``"3"`` too) and
    the parts are joined with a unit separator before hashing. Unlike Python's built-in ``hash``
    this does not change between processes (no hash randomisation) or platforms.
    """
    if not parts:
        raise ValueError("job_seed needs at least one part")
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sample_answers(
    logits: np.ndarray, temperature: float, seed: int | np.random.Generator
) -> np.ndarray:
    """Draw one answer position per row from ``Categorical(softmax(logits / T))``.

    Vectorised inverse-CDF sampling: with ``u ~ U[0, 1)`` from ``np.random.default_rng(seed)`` (one
    draw per row, in row order) the answer is the number of cumulative probabilities
    ``P_0, P_0 + P_1, ...`` (excluding the last, which is 1 up to rounding) that are ``<= u``, so
    ``P(answer = c) = P_c`` exactly. The softmax is computed in float64 after subtracting the row
    maximum. Deterministic for a given seed.

    Parameters
    ----------
    logits : (m, C) logits at ``T = 1`` (C = 3 for triplets: ``[s_jk, s_ik, s_ij]``).
    temperature : ``T > 0`` (the generator's calibrated temperature).
    seed : seed for ``np.random.default_rng`` or a Generator.

    Returns
    -------
    (m,) int8 answer positions.
    """
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"logits must have shape (m, 3), got {arr.shape}")
    if arr.shape[1] > 127:
        raise ValueError("at most 127 options fit int8 answers")
    if not np.all(np.isfinite(arr)):
        raise ValueError("logits must be finite")
    t = float(temperature)
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    cdf = np.cumsum(_softmax(arr / t), axis=1)
    u = rng.random(arr.shape[0])
    return (cdf[:, :-1] <= u[:, None]).sum(axis=1).astype(np.int8)


def synthetic_job(
    n_concepts: int,
    n_train: int,
    simulation: int,
    logits_fn: Callable[[np.ndarray], np.ndarray],
    temperature: float,
    exclude_keys: np.ndarray | None = None,
    val_fraction: float = 1 / 8,
    *,
    generator: str = "generator",
    n_folds: int = 3,
    concept_val_fraction: float = 0.3,
) -> list[dict]:
    """Synthetic train / validation / test data of one recovery job (study.md §6).

    Parameters
    ----------
    n_concepts : number of concepts (1,854 for THINGS).
    n_train : ``N``, the number of training triplets per fold.
    simulation : ``s``; seeds the concept folds (``concept_folds(seed=s)``) and, with the other
        parts, every triplet and answer draw.
    logits_fn : callable mapping an (m, 3) int64 triplet array to the generator's (m, 3) logits
        ``[s_jk, s_ik, s_ij]`` at ``T = 1`` (the generator's fitted W on its own features).
    temperature : the generator's calibrated temperature ``T_g``.
    exclude_keys : keys (``triplet_keys(human_rows, n_concepts)``) of human triplets never to draw.
    val_fraction : size of the validation and of the test set relative to ``N``; each gets
        ``round(N * val_fraction)`` triplets (``round(N/8)``; Python's ``round``, i.e. halves to
        even: N = 100 gives 12).
    generator : the generator's name, part of every seed (study.md §6: same (g, N, s) -> same data).
    n_folds, concept_val_fraction : concept split parameters (3 folds; 30 % validation concepts).

    Returns
    -------
    list with one dict per fold::

        {"fold": f, "seed": int,
         "concepts": {"train": ..., "val": ..., "test": ...},   # sorted int64 concept indices
         "train": {"triplets": (N, 3) int64, "answers": (N,) int8},
         "val":   {"triplets": ..., "answers": ...},
         "test":  {"triplets": ..., "answers": ...}}

    Seeds: triplets of (fold, split) use ``job_seed(generator, N, s, fold, split, "triplets")`` and
    answers ``job_seed(generator, N, s, fold, split, "answers")``.

    Raises
    ------
    ValueError
        If a concept subset cannot hold the requested number of unique non-excluded triplets, a
        split would be empty, or ``logits_fn`` returns the wrong shape.
    """
    n_train = int(n_train)
    n_eval = round(n_train * val_fraction)
    if n_train < 1 or n_eval < 1:
        raise ValueError(
            f"n_train={n_train} with val_fraction={val_fraction} gives an empty split "
            f"({n_train} train, {n_eval} validation/test triplets)"
        )
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    if exclude_keys is not None:
        # Sort and deduplicate once for all 9 draws (sort-based: faster than np.unique here).
        keys = np.sort(np.asarray(exclude_keys, dtype=np.int64).ravel())
        exclude_keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else None
    folds = concept_folds(
        n_concepts, seed=simulation, n_folds=n_folds, val_fraction=concept_val_fraction
    )
    out = []
    for split in folds:
        fold = split.fold
        record: dict = {
            "fold": fold,
            "seed": int(simulation),
            "concepts": split.as_dict(),
        }
        for name in SPLITS:
            parts = (generator, n_train, simulation, fold, name)
            try:
                triplets = sample_unique_triplets(
                    split.as_dict()[name],
                    sizes[name],
                    job_seed(*parts, "triplets"),
                    exclude_keys=exclude_keys,
                    n_concepts=n_concepts,
                )
            except ValueError as err:
                raise ValueError(
                    f"generator {generator!r}, N={n_train}, simulation {simulation}, fold {fold}, "
                    f"{name} split: {err}"
                ) from err
            logits = np.asarray(logits_fn(triplets), dtype=np.float64)
            if logits.shape != (triplets.shape[0], 3):
                raise ValueError(
                    f"logits_fn returned shape {logits.shape}, expected ({triplets.shape[0]}, 3)"
                )
            answers = sample_answers(logits, temperature, job_seed(*parts, "answers"))
            record[name] = {"triplets": triplets, "answers": answers}
        out.append(record)
    return out
