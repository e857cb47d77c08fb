"""Tests of recovery_assets.core.calibration (docs/method.md §5: exact temperature calibration)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from recovery_assets.core.calibration import (
    calibrate_temperature,
    max_probability_range,
    mean_max_probability,
)


def _logits(m: int = 5000, scale: float = 3.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=scale, size=(m, 3))


def test_mean_max_probability_matches_softmax_and_is_monotone():
    logits = _logits(2000)
    for t in (0.1, 1.0, 7.5):
        direct = softmax(logits / t, axis=1).max(axis=1).mean()
        assert mean_max_probability(logits, t) == pytest.approx(direct, rel=1e-12)
    temps = np.geomspace(1e-3, 1e3, 50)
    values = np.array([mean_max_probability(logits, t) for t in temps])
    assert np.all(np.diff(values) < 0)
    assert values[0] > 0.99 and values[-1] == pytest.approx(1 / 3, abs=1e-3)


@pytest.mark.parametrize("target", [0.678, 0.4, 0.95])
def test_calibration_hits_target(target):
    logits = _logits()
    t = calibrate_temperature(logits, target)
    assert t > 0
    assert abs(mean_max_probability(logits, t) - target) < 1e-6


def test_calibration_closed_form_single_row():
    # one row [a, 0, 0]: max prob = 1 / (1 + 2 exp(-a/T)) = q  <=>  T = a / ln(2q / (1 - q))
    a, q = 2.5, 0.678
    t = calibrate_temperature(np.array([[a, 0.0, 0.0]]), q)
    assert t == pytest.approx(a / np.log(2 * q / (1 - q)), rel=1e-9)


def test_calibration_large_logits_are_stable():
    logits = _logits(1000, scale=1e4, seed=1)
    t = calibrate_temperature(logits)
    assert np.isfinite(t) and abs(mean_max_probability(logits, t) - 0.678) < 1e-6
    assert np.isfinite(mean_max_probability(logits, 1e-6))


def test_reachable_range_counts_ties_and_unreachable_targets_fail():
    # row 1 has 2 tied maxima (T -> 0 limit 1/2), row 2 a unique maximum (limit 1):
    # reachable (1/3, 0.75)
    logits = np.array([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    low, high = max_probability_range(logits)
    assert low == pytest.approx(1 / 3) and high == pytest.approx(0.75)
    t = calibrate_temperature(logits, 0.7)
    assert abs(mean_max_probability(logits, t) - 0.7) < 1e-6
    for bad in (0.8, 0.75, 0.3, 1 / 3):
        with pytest.raises(ValueError, match="out of reach"):
            calibrate_temperature(logits, bad)
    with pytest.raises(ValueError, match="out of reach"):
        calibrate_temperature(np.ones((4, 3)), 0.5)  # constant rows: always 1/3
    with pytest.raises(ValueError, match="positive"):
        mean_max_probability(logits, 0.0)
    with pytest.raises(ValueError, match="finite"):
        calibrate_temperature(np.array([[np.nan, 0.0, 1.0]]))
