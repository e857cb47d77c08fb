"""Tests of recovery_assets.core.triplets (docs/method.md: §2 ceiling, §4 conventions, §6
sampling)."""

from __future__ import annotations

import time
from math import comb

import numpy as np
import pytest
from scipy.stats import chisquare

from recovery_assets.core.triplets import (
    concept_folds,
    human_rows_to_positions,
    noise_ceiling,
    positions_to_human_rows,
    sample_unique_triplets,
    triplet_keys,
)

# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def test_triplet_keys_are_order_free_and_distinct():
    rows = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 1, 3], [3, 2, 1]])
    keys = triplet_keys(rows, 4)
    assert keys.dtype == np.int64
    assert keys[0] == keys[1] == keys[2] == (0 * 4 + 1) * 4 + 2
    assert len({keys[0], keys[3], keys[4]}) == 3
    # all C(7, 3) triplets of 7 concepts get distinct keys
    all_rows = np.array(
        [[a, b, c] for a in range(7) for b in range(a + 1, 7) for c in range(b + 1, 7)]
    )
    assert np.unique(triplet_keys(all_rows, 7)).size == comb(7, 3)


def test_triplet_keys_reject_out_of_range():
    with pytest.raises(ValueError, match="range"):
        triplet_keys(np.array([[0, 1, 5]]), 5)
    with pytest.raises(ValueError, match="shape"):
        triplet_keys(np.array([0, 1, 2]), 5)


# --------------------------------------------------------------------------------------------
# concept folds
# --------------------------------------------------------------------------------------------


def test_concept_folds_disjoint_cover_and_70_30():
    n = 1854
    folds = concept_folds(n, seed=3)
    assert len(folds) == 3
    tests = np.concatenate([f.test for f in folds])
    # the test folds partition the concepts
    assert np.array_equal(np.sort(tests), np.arange(n))
    for f in folds:
        parts = [f.train, f.val, f.test]
        assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
        union = np.concatenate(parts)
        assert union.size == n and np.array_equal(np.sort(union), np.arange(n))
        assert abs(f.test.size - n / 3) <= 1
        rest = f.train.size + f.val.size
        assert abs(f.val.size / rest - 0.3) < 0.01
        assert (f.train.size, f.val.size) == (865, 371)


def test_concept_folds_seeded():
    a, b, c = concept_folds(100, 1), concept_folds(100, 1), concept_folds(100, 2)
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a, b, strict=True))
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.test, y.test) for x, y in zip(a, c, strict=True))


# --------------------------------------------------------------------------------------------
# unique triplet sampling
# --------------------------------------------------------------------------------------------


def _check_sample(t: np.ndarray, subset: np.ndarray, n_concepts: int) -> np.ndarray:
    assert t.dtype == np.int64 and t.ndim == 2 and t.shape[1] == 3
    assert np.all(np.isin(t, subset))
    assert np.all((t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2]))
    keys = triplet_keys(t, n_concepts)
    assert np.unique(keys).size == t.shape[0]
    return keys


def test_sample_unique_triplets_unique_inside_subset_and_excluded():
    n_concepts = 200
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(n_concepts, 40, replace=False))
    # exclude 3,000 triplets inside the subset plus some outside it
    inside = np.array([rng.choice(subset, 3, replace=False) for _ in range(3000)])
    outside = rng.integers(0, n_concepts, (500, 3))
    outside = outside[(outside[:, 0] != outside[:, 1]) & (outside[:, 1] != outside[:, 2])]
    outside = outside[outside[:, 0] != outside[:, 2]]
    exclude = triplet_keys(np.concatenate([inside, outside]), n_concepts)
    t = sample_unique_triplets(subset, 3000, 7, exclude_keys=exclude, n_concepts=n_concepts)
    assert t.shape == (3000, 3)
    keys = _check_sample(t, subset, n_concepts)
    assert not np.isin(keys, exclude).any()
    # random row order, not sorted by key
    assert np.any(np.diff(keys) < 0) and np.any(np.diff(keys) > 0)
    # identical for identical seeds, different for different seeds
    again = sample_unique_triplets(subset, 3000, 7, exclude_keys=exclude, n_concepts=n_concepts)
    other = sample_unique_triplets(subset, 3000, 8, exclude_keys=exclude, n_concepts=n_concepts)
    assert np.array_equal(t, again)
    assert not np.array_equal(t, other)


def test_sample_unique_triplets_capacity_error_and_full_enumeration():
    subset = np.array([3, 5, 8, 13, 21])  # 5 concepts hold C(5, 3) = 10 triplets
    with pytest.raises(ValueError, match="at most 10"):
        sample_unique_triplets(subset, 11, 0)
    t = sample_unique_triplets(subset, 10, 0)  # exactly at capacity: every triplet once
    _check_sample(t, subset, 22)
    # excluding 2 triplets inside the subset (and 1 outside) leaves room for 8
    exclude = triplet_keys(np.array([[3, 5, 8], [21, 13, 3], [0, 1, 2]]), 22)
    with pytest.raises(ValueError, match="at most 8"):
        sample_unique_triplets(subset, 9, 0, exclude_keys=exclude, n_concepts=22)
    t = sample_unique_triplets(subset, 8, 0, exclude_keys=exclude, n_concepts=22)
    keys = _check_sample(t, subset, 22)
    assert not np.isin(keys, exclude).any()
    with pytest.raises(ValueError, match="n_concepts"):
        sample_unique_triplets(subset, 2, 0, exclude_keys=exclude)


def test_sample_unique_triplets_enumeration_path_near_capacity():
    subset = np.arange(10, 22)  # 12 concepts: 220 triplets
    rng = np.random.default_rng(1)
    excl_rows = np.array([rng.choice(subset, 3, replace=False) for _ in range(40)])
    exclude = triplet_keys(excl_rows, 30)
    n_free = comb(12, 3) - np.unique(exclude).size
    t = sample_unique_triplets(subset, n_free - 5, 4, exclude_keys=exclude, n_concepts=30)
    keys = _check_sample(t, subset, 30)
    assert t.shape[0] == n_free - 5 and not np.isin(keys, exclude).any()
    assert np.array_equal(
        t, sample_unique_triplets(subset, n_free - 5, 4, exclude_keys=exclude, n_concepts=30)
    )


def test_sample_unique_triplets_is_uniform():
    # 6 concepts hold 20 triplets; draw 3 (rejection path) under 3,000 seeds and count how often
    # each triplet is chosen: uniform sampling gives 3000 * 3 / 20 = 450 each.
    subset = np.arange(6)
    counts = np.zeros(6**3, dtype=np.int64)
    for seed in range(3000):
        np.add.at(counts, triplet_keys(sample_unique_triplets(subset, 3, seed), 6), 1)
    observed = counts[counts > 0]
    assert observed.size == 20
    assert chisquare(observed).pvalue > 0.001


def test_sample_unique_triplets_large_n_is_fast():
    subset = concept_folds(1854, seed=0)[0].train  # 865 concepts
    rng = np.random.default_rng(5)
    human = triplet_keys(rng.integers(0, 1854, (1_000_000, 3)), 1854)
    start = time.perf_counter()
    t = sample_unique_triplets(subset, 4_200_000, 11, exclude_keys=human, n_concepts=1854)
    elapsed = time.perf_counter() - start
    assert t.shape == (4_200_000, 3)
    keys = np.sort(triplet_keys(t, 1854))
    assert np.all(np.diff(keys) > 0)  # unique
    human_sorted = np.sort(human)
    pos = np.minimum(np.searchsorted(human_sorted, keys), human_sorted.size - 1)
    assert not np.any(human_sorted[pos] == keys)  # none excluded
    assert elapsed < 20.0


# --------------------------------------------------------------------------------------------
# conventions
# --------------------------------------------------------------------------------------------


def test_human_rows_round_trip_both_conventions():
    rows = np.array([[4, 7, 1], [0, 2, 9]])  # [pair, pair, odd]
    t, a = human_rows_to_positions(rows)
    assert np.array_equal(t, rows) and np.array_equal(a, [2, 2])
    assert np.array_equal(positions_to_human_rows(t, a), rows)

    odd_first = np.array([[1, 4, 7], [9, 0, 2]])  # [odd, pair, pair]
    t, a = human_rows_to_positions(odd_first, convention="odd_pair_pair")
    assert np.array_equal(a, [0, 0])
    assert np.array_equal(t[np.arange(2), a], [1, 9])  # the odd concepts
    assert np.array_equal(positions_to_human_rows(t, a), rows)
    assert np.array_equal(positions_to_human_rows(t, a, convention="odd_pair_pair"), odd_first)

    # arbitrary answer positions: the odd concept goes last, the pair keeps its row order
    trip = np.array([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    out = positions_to_human_rows(trip, np.array([0, 1, 2]))
    assert np.array_equal(out, [[6, 7, 5], [5, 7, 6], [5, 6, 7]])
    with pytest.raises(ValueError, match="convention"):
        human_rows_to_positions(rows, convention="pair_odd_pair")


# --------------------------------------------------------------------------------------------
# noise ceiling
# --------------------------------------------------------------------------------------------


def test_noise_ceiling_hand_computed_with_ties():
    rows = np.array(
        [
            # triplet {0,1,2}: 3 answers, all "2 is odd" -> every answer agrees with the
            # (unanimous) others: ceiling 1.
            [0, 1, 2],
            [1, 0, 2],
            [0, 1, 2],
            # triplet {3,4,5}: odd = 5, 5, 3 (counts 5:2, 3:1, T = 3).
            #   leave out a "5": others {5:1, 3:1} -> tie of 2 maxima, agreement 1/2, weight 2/3
            #   leave out the "3": others {5:2} -> disagrees, 0
            #   ceiling = 2/3 * 1/2 = 1/3
            [3, 4, 5],
            [4, 3, 5],
            [4, 5, 3],
            # triplet {6,7,8}: odd = 6, 7 (T = 2): each left-out answer disagrees with the other:
            #   ceiling 0
            [7, 8, 6],
            [6, 8, 7],
            # triplet {0,1,3}: a single answer -> not used
            [0, 1, 3],
            # triplet {2,4,6}: odd = 2, 2, 4, 6 (T = 4).
            #   leave out a "2": others {2:1, 4:1, 6:1} -> 3 tied maxima, 1/3, weight 2/4 -> 1/6
            #   leave out "4": others {2:2, 6:1} -> 0; leave out "6": others {2:2, 4:1} -> 0
            #   ceiling = 1/6
            [4, 6, 2],
            [6, 4, 2],
            [2, 6, 4],
            [2, 4, 6],
        ]
    )
    ceiling, n_used = noise_ceiling(rows)
    # mean over the 4 repeated triplets: (1 + 1/3 + 0 + 1/6) / 4 = 1.5 / 4 = 0.375
    assert n_used == 4
    assert ceiling == pytest.approx(0.375, abs=1e-12)


def test_noise_ceiling_majority_and_brute_force():
    # counts 4:1 (T = 5): leaving out a majority answer leaves {3, 1} -> agrees (weight 4/5);
    # leaving out the minority answer leaves {4} -> disagrees: ceiling = 4/5 = 0.8
    rows = np.array([[0, 1, 2]] * 4 + [[0, 2, 1]])
    assert noise_ceiling(rows).ceiling == pytest.approx(0.8, abs=1e-12)

    # vectorised result equals a literal leave-one-out loop on random repeated data
    rng = np.random.default_rng(2)
    base = np.array([rng.choice(30, 3, replace=False) for _ in range(60)])
    reps = rng.integers(1, 7, base.shape[0])
    rows = []
    for trip, r in zip(base, reps, strict=True):
        for _ in range(r):
            perm = rng.permutation(3)
            rows.append(trip[perm])
    rows = np.array(rows)
    per_triplet = {}
    for row in rows:
        per_triplet.setdefault(tuple(sorted(row)), []).append(int(row[2]))
    values = []
    for answers in per_triplet.values():
        if len(answers) < 2:
            continue
        total = 0.0
        for i, left_out in enumerate(answers):
            others = answers[:i] + answers[i + 1 :]
            counts = {c: others.count(c) for c in set(others)}
            best = max(counts.values())
            tied = [c for c, v in counts.items() if v == best]
            total += (1.0 / len(tied) if left_out in tied else 0.0) / len(answers)
        values.append(total)
    ceiling, n_used = noise_ceiling(rows)
    assert n_used == len(values)
    assert ceiling == pytest.approx(float(np.mean(values)), abs=1e-12)


def test_noise_ceiling_errors():
    with pytest.raises(ValueError, match=">= 2 answers"):
        noise_ceiling(np.array([[0, 1, 2], [0, 1, 3]]))
    with pytest.raises(ValueError, match="distinct"):
        noise_ceiling(np.array([[0, 0, 2], [0, 0, 2]]))
