"""Tests of recovery_assets.core.simulation (docs/method.md §6): synthetic data of one recovery
job."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import chisquare

from recovery_assets.core.simulation import job_seed, sample_answers, synthetic_job
from recovery_assets.core.triplets import concept_folds, triplet_keys

# --------------------------------------------------------------------------------------------
# sample_answers
# --------------------------------------------------------------------------------------------


def test_sampled_frequencies_match_probabilities():
    # two kinds of rows with different probabilities, interleaved
    rows = np.array([[1.2, 0.3, -0.5], [-1.0, 0.0, 2.0]])
    t = 0.8
    kind = np.arange(60_000) % 2
    logits = rows[kind]
    answers = sample_answers(logits, t, seed=123)
    assert answers.dtype == np.int8 and set(np.unique(answers)) <= {0, 1, 2}
    for k in range(2):
        observed = np.bincount(answers[kind == k], minlength=3)
        n = observed.sum()
        p = softmax(rows[k] / t)
        assert chisquare(observed, n * p).pvalue > 0.001
        # a deliberately wrong probability vector (mass moved between options) IS rejected
        wrong = p + np.array([0.03, -0.03, 0.0])
        assert chisquare(observed, n * wrong).pvalue < 1e-6
        # and so is the distribution at the wrong temperature
        assert chisquare(observed, n * softmax(rows[k] / (2 * t))).pvalue < 1e-6


def test_sample_answers_deterministic_and_limits():
    logits = np.random.default_rng(0).normal(size=(1000, 3))
    a = sample_answers(logits, 1.0, seed=5)
    assert np.array_equal(a, sample_answers(logits, 1.0, seed=5))
    assert not np.array_equal(a, sample_answers(logits, 1.0, seed=6))
    # T -> 0: the argmax; huge logits do not overflow
    assert np.array_equal(sample_answers(logits, 1e-9, seed=1), logits.argmax(axis=1))
    assert np.array_equal(sample_answers(logits * 1e6, 1.0, seed=1), logits.argmax(axis=1))
    with pytest.raises(ValueError, match="temperature"):
        sample_answers(logits, 0.0, seed=1)


# --------------------------------------------------------------------------------------------
# job_seed
# --------------------------------------------------------------------------------------------


def test_job_seed_is_stable_across_processes():
    s = job_seed("ResNet50", 100, 0, 1, "train")
    assert s == 3719227277375291388  # pinned: seeds must never change between versions
    assert s == int.from_bytes(
        hashlib.sha256(b"ResNet50\x1f100\x1f0\x1f1\x1ftrain").digest()[:8], "little"
    ) & ((1 << 63) - 1)
    assert job_seed("ResNet50", np.int64(100), 0, 1, "train") == s
    assert job_seed("ResNet50", 100, 0, 1, "val") != s
    assert job_seed("ResNet50", 100, 0, 2, "train") != s
    code = (
        "from recovery_assets.core.simulation import job_seed;"
        "print(job_seed('ResNet50', 100, 0, 1, 'train'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert int(out.stdout) == s


# --------------------------------------------------------------------------------------------
# synthetic_job
# --------------------------------------------------------------------------------------------


def _generator(n_concepts: int = 90, p: int = 6, seed: int = 0):
    features = np.random.default_rng(seed).normal(size=(n_concepts, p))
    sim = features @ features.T

    def logits_fn(t: np.ndarray) -> np.ndarray:
        i, j, k = t[:, 0], t[:, 1], t[:, 2]
        return np.stack([sim[j, k], sim[i, k], sim[i, j]], axis=1)

    return logits_fn


def test_synthetic_job_structure_and_exclusion():
    n_concepts, n_train = 90, 400
    logits_fn = _generator(n_concepts)
    human = np.random.default_rng(9).choice(n_concepts, size=(3000, 3))
    human = human[(human[:, 0] != human[:, 1]) & (human[:, 1] != human[:, 2])]
    human = human[human[:, 0] != human[:, 2]]
    exclude = triplet_keys(human, n_concepts)
    job = synthetic_job(n_concepts, n_train, 2, logits_fn, 1.5, exclude, generator="g")
    folds = concept_folds(n_concepts, seed=2)
    assert len(job) == 3
    for record, split in zip(job, folds, strict=True):
        assert record["fold"] == split.fold
        sizes = {"train": n_train, "val": 50, "test": 50}  # round(400 / 8) = 50
        for name, size in sizes.items():
            assert np.array_equal(record["concepts"][name], getattr(split, name))
            t, a = record[name]["triplets"], record[name]["answers"]
            assert t.shape == (size, 3) and a.shape == (size,) and a.dtype == np.int8
            assert np.all(np.isin(t, getattr(split, name)))
            keys = triplet_keys(t, n_concepts)
            assert np.unique(keys).size == size
            assert not np.isin(keys, exclude).any()
            assert set(np.unique(a)) <= {0, 1, 2}


def test_synthetic_job_reproducible_and_seeded():
    logits_fn = _generator()
    a = synthetic_job(90, 200, 0, logits_fn, 1.0, generator="g")
    b = synthetic_job(90, 200, 0, logits_fn, 1.0, generator="g")
    c = synthetic_job(90, 200, 1, logits_fn, 1.0, generator="g")
    d = synthetic_job(90, 200, 0, logits_fn, 1.0, generator="h")
    for x, y in zip(a, b, strict=True):
        for name in ("train", "val", "test"):
            assert np.array_equal(x[name]["triplets"], y[name]["triplets"])
            assert np.array_equal(x[name]["answers"], y[name]["answers"])
    assert not np.array_equal(a[0]["train"]["triplets"], c[0]["train"]["triplets"])
    assert not np.array_equal(a[0]["concepts"]["test"], c[0]["concepts"]["test"])
    assert not np.array_equal(a[0]["train"]["triplets"], d[0]["train"]["triplets"])


def test_synthetic_job_answers_follow_generator():
    logits_fn = _generator()
    job = synthetic_job(90, 800, 0, logits_fn, 1e-9, generator="g")  # T -> 0: argmax answers
    t = job[1]["train"]["triplets"]
    assert np.array_equal(job[1]["train"]["answers"], logits_fn(t).argmax(axis=1))
    # N = 100: round(100 / 8) = round(12.5) = 12 (Python rounds halves to even)
    job = synthetic_job(90, 100, 0, logits_fn, 1.0, generator="g")
    assert job[0]["val"]["triplets"].shape[0] == 12 == job[0]["test"]["triplets"].shape[0]


def test_synthetic_job_errors_when_subset_too_small():
    # 12 concepts: each fold has 4 test concepts (C(4, 3) = 4 triplets) and 8 others, split into
    # 5 training concepts (C(5, 3) = 10 triplets) and 3 validation concepts (1 triplet).
    with pytest.raises(ValueError, match=r"fold 0, train split.*at most 10"):
        synthetic_job(12, 16, 0, _generator(12), 1.0, generator="g")
    # N = 10 fills the training concepts; val_fraction 0.2 asks for 2 validation triplets
    with pytest.raises(ValueError, match=r"val split.*at most 1"):
        synthetic_job(12, 10, 0, _generator(12), 1.0, val_fraction=0.2, generator="g")
    with pytest.raises(ValueError, match="empty split"):
        synthetic_job(90, 3, 0, _generator(), 1.0)
