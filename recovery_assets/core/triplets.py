"""Triplets: keys, concept folds, unique triplet sampling, conventions and the noise ceiling.

Conventions (docs/method.md §2, §4)
-----------------------------
A triplet is a row ``(i, j, k)`` of 0-based concept indices (the row order of
``things_concepts.tsv``). Its three logits are ``[s_jk, s_ik, s_ij] / T``, so the *answer* of a
triplet is the **position** (0, 1 or 2) of the odd one out within the row. Human THINGS files store
each judgement as ``[pair, pair, odd]`` (columns 0 and 1 were judged most similar, column 2 is the
odd one out), so a human row read as a triplet has answer position 2. Some public files use the
other convention (``[odd, pair, pair]``, answer position 0); both are supported explicitly.

A triplet's identity does not depend on the order of its concepts: two rows are the same triplet
when their sorted indices are equal. :func:`triplet_keys` encodes the sorted indices as one int64,
which is how uniqueness and the exclusion of human triplets (docs/method.md §6) are checked.

Everything here is plain numpy / scipy / scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import NamedTuple

import numpy as np
from sklearn.model_selection import KFold, train_test_split

__all__ = [
    "ConceptSplit",
    "NoiseCeiling",
    "concept_folds",
    "human_rows_to_positions",
    "noise_ceiling",
    "positions_to_human_rows",
    "sample_unique_triplets",
    "triplet_keys",
]

CONVENTIONS = ("pair_pair_odd", "odd_pair_pair")

# Above this fraction of the available triplets, rejection sampling is replaced by enumerating all
# allowed triplets and choosing among them without replacement (it then never stalls).
_ENUMERATE_FRACTION = 0.5
# Largest rejection-sampling batch (bounds memory when most triplets are excluded).
_MAX_BATCH = 1 << 23


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _as_triplets(triplets: np.ndarray, name: str = "triplets") -> np.ndarray:
    arr = np.asarray(triplets)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (m, 3), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer concept indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def triplet_keys(triplets: np.ndarray, n_concepts: int) -> np.ndarray:
    """Order-free int64 key of every triplet.

    The three indices of each row are sorted, ``a <= b <= c``, and encoded as
    ``key = (a * n + b) * n + c`` with ``n = n_concepts``. Two rows get the same key exactly when
    they hold the same three concepts in any order, which is the identity used for uniqueness and
    for excluding human triplets from synthetic data (docs/method.md §6: "compared after sorting").
    ``n_concepts**3`` must fit in int64 (true for any realistic stimulus set; THINGS has 1,854).

    Parameters
    ----------
    triplets : (m, 3) integer array of concept indices in ``[0, n_concepts)``.
    n_concepts : number of concepts (the base of the encoding).

    Returns
    -------
    (m,) int64 array of keys.
    """
    n = int(n_concepts)
    if n < 1:
        raise ValueError(f"n_concepts must be positive, got {n_concepts}")
    if n**3 >= 2**63:
        raise ValueError(f"n_concepts={n} is too large for int64 triplet keys")
    t = _as_triplets(triplets)
    if t.size and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"triplet indices must lie in [0, {n}); got range [{t.min()}, {t.max()}]")
    s = np.sort(t, axis=1)
    return (s[:, 0] * n + s[:, 1]) * n + s[:, 2]


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based; numpy's hash-based ``np.unique`` is slow on int64)."""
    s = np.sort(np.asarray(a).ravel())
    if s.size == 0:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _decode_keys(keys: np.ndarray, n: int) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    return np.stack([keys // (n * n), (keys // n) % n, keys % n], axis=1)


# --------------------------------------------------------------------------------------------
# Concept folds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptSplit:
    """Concepts of one fold (docs/method.md §6): sorted int64 arrays of concept indices."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def concept_folds(
    n_concepts: int, seed: int, n_folds: int = 3, val_fraction: float = 0.3
) -> list[ConceptSplit]:
    """Split concepts into train / validation / test for each fold (docs/method.md §6).

    The ``n_concepts`` concepts are split into ``n_folds`` test folds by a shuffled
    ``sklearn.model_selection.KFold(n_splits=n_folds, shuffle=True, random_state=seed)``. For fold
    ``f`` the test concepts are fold ``f`` (1/3 of the concepts with the default 3 folds); the
    remaining concepts are split into training (70 %) and validation (30 %) concepts by
    ``train_test_split(rest, test_size=val_fraction, random_state=seed)``. Triplets are later drawn
    *inside* each concept subset, so no concept is shared between the training, validation and test
    triplets of a fold: the evaluation measures generalisation to new concepts.

    Parameters
    ----------
    n_concepts : total number of concepts.
    seed : the simulation index ``s`` (docs/method.md §6: "Seed = s").
    n_folds : number of test folds (3 in the study).
    val_fraction : fraction of the non-test concepts used for validation (0.3 in the study).

    Returns
    -------
    list of :class:`ConceptSplit`, one per fold, each with sorted, disjoint ``train``, ``val`` and
    ``test`` arrays that together cover ``range(n_concepts)``.
    """
    n = int(n_concepts)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n < n_folds:
        raise ValueError(f"cannot split {n} concepts into {n_folds} folds")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    concepts = np.arange(n, dtype=np.int64)
    kfold = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = []
    for fold, (rest_idx, test_idx) in enumerate(kfold.split(concepts)):
        train, val = train_test_split(concepts[rest_idx], test_size=val_fraction, random_state=seed)
        split = ConceptSplit(
            fold=fold,
            train=np.sort(np.asarray(train, dtype=np.int64)),
            val=np.sort(np.asarray(val, dtype=np.int64)),
            test=np.sort(concepts[test_idx]),
        )
        union = np.concatenate([split.train, split.val, split.test])
        assert union.size == n and np.array_equal(np.sort(union), concepts), (
            "concept folds must be disjoint and cover all concepts"
        )
        splits.append(split)
    return splits


# --------------------------------------------------------------------------------------------
# Unique triplet sampling
# --------------------------------------------------------------------------------------------


def _rng(rng_or_seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _draw_distinct(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """``size`` ordered triples of 3 distinct integers in [0, m), uniform over all such triples."""
    i = rng.integers(0, m, size)
    j = rng.integers(0, m - 1, size)
    j += j >= i
    k = rng.integers(0, m - 2, size)
    lo = np.minimum(i, j)
    hi = np.maximum(i, j)
    k += k >= lo
    k += k >= hi
    return np.stack([i, j, k], axis=1)


def _local_keys(t: np.ndarray, m: int) -> np.ndarray:
    a, b, c = t[:, 0], t[:, 1], t[:, 2]
    lo = np.minimum(np.minimum(a, b), c)
    hi = np.maximum(np.maximum(a, b), c)
    mid = a + b + c - lo - hi
    return (lo * m + mid) * m + hi


def _all_sorted_triplets(m: int) -> np.ndarray:
    """All ``C(m, 3)`` sorted triples ``a < b < c`` of [0, m), in lexicographic order."""
    if m < 3:
        return np.empty((0, 3), dtype=np.int64)
    bi, ci = np.triu_indices(m, k=1)  # all pairs b < c, lexicographic
    blocks = []
    for a in range(m - 2):
        start = int(np.searchsorted(bi, a + 1))  # pairs with b > a: a contiguous tail
        b = bi[start:]
        c = ci[start:]
        blocks.append(np.stack([np.full(b.size, a, dtype=np.int64), b, c], axis=1))
    return np.concatenate(blocks, axis=0)


def sample_unique_triplets(
    concepts: np.ndarray,
    n: int,
    rng_or_seed: int | np.random.Generator,
    exclude_keys: np.ndarray | None = None,
    n_concepts: int | None = None,
) -> np.ndarray:
    """Draw ``n`` uniformly random unique triplets of distinct concepts from a subset
    (docs/method.md §6).

    The result is a uniformly random ``n``-subset of the allowed triplets: all unordered sets of 3
    distinct concepts from ``concepts`` whose sorted key (:func:`triplet_keys`) is not in
    ``exclude_keys`` (the human triplets). Sampling is vectorised rejection sampling: batches of
    ordered triples of distinct concepts are drawn uniformly, excluded triplets and repeats (within
    the batch or of already accepted triplets) are discarded keeping the first occurrence, and
    batches are drawn until ``n`` are accepted. Keeping first occurrences in draw order makes this
    sequential sampling without replacement, hence uniform over ``n``-subsets, and the rows come out
    in random order (not sorted by key) with the concepts of each row in random order. When ``n``
    is more than half of the allowed triplets, all allowed triplets are enumerated instead and
    ``n`` are chosen without replacement (the concepts of each row are then shuffled), so the
    sampler never stalls near capacity.

    Parameters
    ----------
    concepts : 1-D array of the (distinct) concept indices the triplets are drawn from.
    n : number of triplets.
    rng_or_seed : an ``np.random.Generator`` or a seed for ``np.random.default_rng``; the same seed
        always gives the same triplets.
    exclude_keys : optional int64 keys (from :func:`triplet_keys` with the same ``n_concepts``) of
        triplets that must not be drawn.
    n_concepts : the key base used for ``exclude_keys``; required when ``exclude_keys`` is given.

    Returns
    -------
    (n, 3) int64 array of concept indices.

    Raises
    ------
    ValueError
        If the subset cannot hold ``n`` unique non-excluded triplets (the message gives how many it
        can hold), or on malformed input.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    subset = np.asarray(concepts)
    if subset.ndim != 1:
        raise ValueError(f"concepts must be 1-D, got shape {subset.shape}")
    if subset.size and not np.issubdtype(subset.dtype, np.integer):
        raise ValueError(f"concepts must be integer indices, got dtype {subset.dtype}")
    subset = np.sort(subset.astype(np.int64))
    if subset.size and subset[0] < 0:
        raise ValueError("concept indices must be non-negative")
    if np.any(np.diff(subset) == 0):
        raise ValueError("concepts must be distinct")
    m = int(subset.size)
    rng = _rng(rng_or_seed)

    # Excluded triplets that lie entirely inside the subset, as local sorted keys.
    excluded_local = np.empty(0, dtype=np.int64)
    if exclude_keys is not None and np.asarray(exclude_keys).size:
        if n_concepts is None:
            raise ValueError("n_concepts (the key base of exclude_keys) is required")
        nc = int(n_concepts)
        if m and subset[-1] >= nc:
            raise ValueError(f"concept index {subset[-1]} is out of range for n_concepts={nc}")
        keys = np.asarray(exclude_keys, dtype=np.int64).ravel()
        if np.any(keys[1:] <= keys[:-1]):  # skip the sort when already sorted and unique
            keys = _sorted_unique(keys)
        if keys[0] < 0 or keys[-1] >= nc**3:
            raise ValueError(f"exclude_keys are not valid triplet keys for n_concepts={nc}")
        lookup = np.full(nc, -1, dtype=np.int64)
        lookup[subset] = np.arange(m, dtype=np.int64)
        local = lookup[_decode_keys(keys, nc)]
        inside = np.all(local >= 0, axis=1)
        local = np.sort(local[inside], axis=1)
        local = local[(local[:, 0] != local[:, 1]) & (local[:, 1] != local[:, 2])]
        excluded_local = _sorted_unique(_local_keys(local, m)) if m else excluded_local

    total = comb(m, 3)
    capacity = total - int(excluded_local.size)
    if n > capacity:
        raise ValueError(
            f"cannot draw {n} unique triplets: {m} concepts hold {total} triplets, "
            f"{excluded_local.size} of them excluded, so at most {capacity} can be drawn"
        )
    if n == 0:
        return np.empty((0, 3), dtype=np.int64)

    if n > _ENUMERATE_FRACTION * capacity:
        allowed = _all_sorted_triplets(m)
        if excluded_local.size:
            allowed = allowed[~np.isin(_local_keys(allowed, m), excluded_local)]
        chosen = allowed[rng.choice(allowed.shape[0], size=n, replace=False)]
        order = np.argsort(rng.random(chosen.shape), axis=1)
        local_rows = np.take_along_axis(chosen, order, axis=1)
        return subset[local_rows]

    accepted_rows: list[np.ndarray] = []
    accepted_sorted = np.empty(0, dtype=np.int64)  # sorted keys of everything accepted so far
    n_have = 0
    while n_have < n:
        need = n - n_have
        # Expected acceptance ~ (capacity - n_have) / total; draw with a 10 % margin.
        rate = (capacity - n_have) / total
        batch = min(int(np.ceil(need / rate * 1.1)) + 64, _MAX_BATCH)
        rows = _draw_distinct(rng, m, batch)
        keys = _local_keys(rows, m)
        uniq, first = np.unique(keys, return_index=True)  # uniq is sorted
        keep = np.ones(uniq.size, dtype=bool)
        for ref in (excluded_local, accepted_sorted):
            if ref.size:
                pos = np.minimum(np.searchsorted(ref, uniq), ref.size - 1)
                keep &= ref[pos] != uniq
        mark = np.zeros(batch, dtype=bool)
        mark[first[keep]] = True
        take = np.flatnonzero(mark)[:need]  # accepted first occurrences, in draw order
        rows, keys = rows[take], keys[take]
        accepted_rows.append(rows)
        n_have += rows.shape[0]
        if n_have < n:
            accepted_sorted = np.sort(np.concatenate([accepted_sorted, keys]))
    return subset[np.concatenate(accepted_rows, axis=0)]


# --------------------------------------------------------------------------------------------
# Human rows <-> (triplets, answer positions)
# --------------------------------------------------------------------------------------------


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")


def human_rows_to_positions(
    rows: np.ndarray, convention: str = "pair_pair_odd"
) -> tuple[np.ndarray, np.ndarray]:
    """Read human judgement rows as (triplets, answer positions) (docs/method.md §2, §4).

    With ``convention="pair_pair_odd"`` (the THINGS files) columns 0 and 1 are the most similar pair
    and column 2 is the odd one out; with ``"odd_pair_pair"`` column 0 is the odd one out. The rows
    are kept as the triplets (no reordering) and the answer is the column of the odd one:
    2, respectively 0, for every row.

    Returns
    -------
    triplets : (m, 3) int64, the rows.
    answers : (m,) int64 answer positions.
    """
    _check_convention(convention)
    t = _as_triplets(rows, "rows")
    position = 2 if convention == "pair_pair_odd" else 0
    return t.copy(), np.full(t.shape[0], position, dtype=np.int64)


# For answer position a, the positions of the other two concepts (in row order).
_OTHERS = np.array([[1, 2], [0, 2], [0, 1]], dtype=np.int64)


def positions_to_human_rows(
    triplets: np.ndarray, answers: np.ndarray, convention: str = "pair_pair_odd"
) -> np.ndarray:
    """Write (triplets, answer positions) as human rows (inverse of ``human_rows_to_positions``).

    For each row the odd one out is ``triplets[t, answers[t]]``; the two remaining concepts (in
    their row order) form the pair. ``"pair_pair_odd"`` gives ``[pair, pair, odd]`` (the THINGS
    convention), ``"odd_pair_pair"`` gives ``[odd, pair, pair]``.

    Returns
    -------
    (m, 3) int64 array of rows.
    """
    _check_convention(convention)
    t = _as_triplets(triplets)
    a = np.asarray(answers).astype(np.int64, copy=False)
    if a.shape != (t.shape[0],):
        raise ValueError(f"answers must have shape ({t.shape[0]},), got {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 2):
        raise ValueError("answers must be positions 0, 1 or 2")
    idx = np.arange(t.shape[0])
    odd = t[idx, a]
    pair = np.take_along_axis(t, _OTHERS[a], axis=1)
    if convention == "pair_pair_odd":
        return np.column_stack([pair, odd])
    return np.column_stack([odd, pair])


# --------------------------------------------------------------------------------------------
# Noise ceiling
# --------------------------------------------------------------------------------------------


class NoiseCeiling(NamedTuple):
    """Leave-one-out noise ceiling and the number of repeated triplets it averages over."""

    ceiling: float
    n_triplets: int


def noise_ceiling(rows: np.ndarray) -> NoiseCeiling:
    """Leave-one-out noise ceiling of repeated human judgements (docs/method.md §2).

    ``rows`` are human judgements in the ``[pair, pair, odd]`` convention. Each row is normalised
    (its three concepts sorted; the answer remapped to the position of the odd concept among the
    sorted concepts) and answers are counted per unique triplet, giving counts ``c_1, c_2, c_3``
    with ``T = c_1 + c_2 + c_3``. For a triplet with ``T >= 2`` answers the leave-one-out agreement
    is::

        sum_i (c_i / T) * P(answer i agrees with the majority of the other T - 1 answers)

    where the other answers' counts are ``c - e_i``; the agreement is ``1 / k`` if option ``i`` is
    one of ``k`` tied maxima of those counts and 0 otherwise (ties split evenly). The ceiling is the
    mean of this agreement over all triplets with ``T >= 2`` (each triplet weighted equally);
    triplets answered once are ignored. Vectorised over triplets. THINGS test set 2 gives 0.678.

    Returns
    -------
    :class:`NoiseCeiling` ``(ceiling, n_triplets)``.

    Raises
    ------
    ValueError
        If no triplet has at least 2 answers, or a row repeats a concept.
    """
    t = _as_triplets(rows, "rows")
    if t.shape[0] == 0:
        raise ValueError("noise ceiling needs at least one row")
    if t.min() < 0:
        raise ValueError("concept indices must be non-negative")
    s = np.sort(t, axis=1)
    if np.any((s[:, 0] == s[:, 1]) | (s[:, 1] == s[:, 2])):
        raise ValueError("every row must hold 3 distinct concepts")
    n = int(s.max()) + 1
    if n**3 >= 2**63:
        raise ValueError("concept indices too large for int64 triplet keys")
    keys = (s[:, 0] * n + s[:, 1]) * n + s[:, 2]
    answer = np.argmax(s == t[:, 2:3], axis=1)  # position of the odd concept in the sorted row
    _, inverse = np.unique(keys, return_inverse=True)
    n_unique = int(inverse.max()) + 1
    counts = np.bincount(inverse.ravel() * 3 + answer, minlength=3 * n_unique).reshape(-1, 3)
    total = counts.sum(axis=1)
    counts = counts[total >= 2]
    total = total[total >= 2]
    if counts.shape[0] == 0:
        raise ValueError("noise ceiling needs at least one triplet with >= 2 answers")
    agreement = np.zeros(counts.shape[0], dtype=np.float64)
    for i in range(3):
        others = counts.copy()
        others[:, i] -= 1  # leave one answer i out (c_i = 0 rows get weight 0 below)
        best = others.max(axis=1)
        n_tied = (others == best[:, None]).sum(axis=1)
        agree = np.where(others[:, i] == best, 1.0 / n_tied, 0.0)
        agreement += counts[:, i] / total * agree
    return NoiseCeiling(float(agreement.mean()), int(counts.shape[0]))
