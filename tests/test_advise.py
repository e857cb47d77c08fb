"""Tests of recovery_assets.core.advise (docs/analyses.md §3): how many triplets a study needs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from recovery_assets.core.advise import advise, advise_from_summary, fit_accuracy_curve

CHANCE = 0.25  # 4 models
SIZES = 50 * 2 ** np.arange(9)  # 50 ... 12,800


def _curve(n, a, b, c, chance=CHANCE):
    return chance + (a - chance) * expit((np.log(n) - b) / c)


def _draw(a, b, c, trials, sizes=SIZES, seed=1):
    rng = np.random.default_rng(seed)
    t = np.full(len(sizes), trials)
    return sizes, rng.binomial(t, _curve(sizes, a, b, c)), t


def _inverse(target, a, b, c, chance=CHANCE):
    """The N at which the true curve reaches target."""
    return math.exp(b + c * logit((target - chance) / (a - chance)))


TRUE = dict(a=0.85, b=math.log(400), c=0.8)


def test_fit_recovers_known_curve():
    n, k, t = _draw(**TRUE, trials=20_000)
    curve = fit_accuracy_curve(n, k, t, n_models=4, n_boot=200)
    assert curve.a == pytest.approx(TRUE["a"], abs=0.01)
    assert curve.b == pytest.approx(TRUE["b"], abs=0.05)
    assert curve.c == pytest.approx(TRUE["c"], rel=0.05)
    assert curve.chance == CHANCE
    assert curve.params["n_mid"] == pytest.approx(400, rel=0.05)
    low, high = curve.band(SIZES)
    fitted = curve.predict(SIZES)
    assert np.all(low <= fitted) and np.all(fitted <= high)
    lo, hi = curve.plateau_ci()
    assert lo < curve.a < hi and lo < TRUE["a"] < hi
    # the fit does not depend on the order of the sizes
    perm = np.random.default_rng(0).permutation(len(n))
    again = fit_accuracy_curve(n[perm], k[perm], t[perm], n_models=4, n_boot=200)
    assert again.a == pytest.approx(curve.a, abs=1e-9)


def test_n_needed_near_the_analytic_inverse():
    n, k, t = _draw(**TRUE, trials=20_000)
    adv = advise(n, k, t, n_models=4, target=0.7, n_boot=400)
    truth = _inverse(0.7, **TRUE)  # ~963
    assert adv.reachable
    assert adv.n_needed is not None
    # the lower bound reaches the target after the point estimate does, close to the truth
    assert adv.n_needed >= adv.n_point
    assert adv.n_point == pytest.approx(truth, rel=0.05)
    assert truth * 0.97 <= adv.n_needed <= truth * 1.15
    assert not adv.extrapolated
    # smallest integer: the lower bound is below the target one triplet earlier
    assert adv.curve.band(adv.n_needed)[0][0] >= 0.7 > adv.curve.band(adv.n_needed - 1)[0][0]
    assert f"N = {adv.n_needed:,}" in adv.message
    assert adv.plateau == adv.params["a"]
    row = adv.as_dict()
    assert row["n_needed"] == adv.n_needed and row["plateau_ci_low"] == adv.plateau_ci[0]


def test_deterministic_under_the_seed():
    n, k, t = _draw(**TRUE, trials=300)
    a1 = advise(n, k, t, 4, 0.7, n_boot=200, seed=3)
    a2 = advise(n, k, t, 4, 0.7, n_boot=200, seed=3)
    a3 = advise(n, k, t, 4, 0.7, n_boot=200, seed=4)
    assert a1.n_needed == a2.n_needed and a1.plateau_ci == a2.plateau_ci
    assert a1.message == a2.message
    assert a1.plateau == a3.plateau  # the fit itself has no randomness
    assert a1.plateau_ci != a3.plateau_ci


def test_fewer_triplets_per_size_need_more_n():
    n, k, t = _draw(**TRUE, trials=20_000)
    precise = advise(n, k, t, 4, 0.7, n_boot=300)
    n, k, t = _draw(**TRUE, trials=200)
    noisy = advise(n, k, t, 4, 0.7, n_boot=300)
    assert noisy.plateau_ci[1] - noisy.plateau_ci[0] > precise.plateau_ci[1] - precise.plateau_ci[0]
    if noisy.reachable:
        assert noisy.n_needed >= noisy.n_point


def test_saturating_below_target_is_out_of_reach():
    n, k, t = _draw(a=0.6, b=math.log(400), c=0.8, trials=2000)
    adv = advise(n, k, t, 4, target=0.8, n_boot=300)
    assert not adv.reachable
    assert adv.n_needed is None
    assert adv.n_point is None
    assert adv.plateau == pytest.approx(0.6, abs=0.02)
    assert adv.plateau_ci[1] < 0.8
    assert "out of reach" in adv.message and "plateau" in adv.message
    # a target below the plateau is reachable on the same data
    assert advise(n, k, t, 4, target=0.5, n_boot=300).reachable


def test_target_beyond_the_lower_bound_within_n_max():
    # plateau 0.85, target 0.84: the point curve gets there far beyond the data, the bound not
    # within a small search range
    n, k, t = _draw(**TRUE, trials=2000)
    adv = advise(n, k, t, 4, target=0.84, n_max=20_000, n_boot=300)
    assert not adv.reachable
    assert "within N <= 20,000" in adv.message
    wide = advise(n, k, t, 4, target=0.75, n_boot=300)
    assert wide.reachable and wide.n_needed > wide.n_point


def test_extrapolation_and_boundary_are_said():
    # sizes up to 800, the true curve reaches 0.7 at N ~ 963: the answer is an extrapolation
    n, k, t = _draw(**TRUE, trials=20_000, sizes=SIZES[:5])
    adv = advise(n, k, t, 4, target=0.7, n_boot=300)
    assert adv.reachable and adv.n_needed > 800
    assert adv.extrapolated and "extrapolates beyond the largest N studied (800)" in adv.message
    # sizes far below the midpoint say nothing about the plateau: out of reach, not a guess
    n, k, t = _draw(**TRUE, trials=20_000, sizes=np.array([50, 100, 200]))
    low = advise(n, k, t, 4, target=0.7, n_boot=300)
    assert not low.reachable and low.plateau_ci[1] - low.plateau_ci[0] > 0.3
    perfect = advise([50, 200, 800, 3200], [5, 25, 30, 30], [30] * 4, 6, target=0.9, n_boot=200)
    assert perfect.boundary and "understate" in perfect.message


def test_advise_from_summary():
    n, k, t = _draw(**TRUE, trials=600)
    summary = pd.DataFrame(
        {
            "n_train": np.concatenate([n, n]),
            "criterion": ["accuracy"] * len(n) + ["nll"] * len(n),
            "n_correct": np.concatenate([k, t // 2]),
            "n_total": np.concatenate([t, t]),
            "chance": CHANCE,
        }
    ).sample(frac=1.0, random_state=0)
    got = advise_from_summary(summary, target=0.7, n_boot=200)
    ref = advise(n, k, t, 4, 0.7, n_boot=200)
    assert got.n_needed == ref.n_needed and got.plateau == ref.plateau
    with pytest.raises(ValueError, match="no rows for criterion"):
        advise_from_summary(summary, 0.7, criterion="auc")


def test_invalid_inputs():
    n, k, t = _draw(**TRUE, trials=100)
    with pytest.raises(ValueError, match="between 0 and trials"):
        advise(n, t + 1, t, 4, 0.7)
    with pytest.raises(ValueError, match="at least 3 sizes"):
        advise(n[:2], k[:2], t[:2], 4, 0.7)
    with pytest.raises(ValueError, match="same length"):
        advise(n, k[:-1], t, 4, 0.7)
    with pytest.raises(ValueError, match="more than once"):
        advise([50, 50, 100], [1, 2, 3], [10, 10, 10], 4, 0.7)
    with pytest.raises(ValueError, match="whole numbers"):
        advise(n, k + 0.5, t, 4, 0.7)
    with pytest.raises(ValueError, match="target"):
        advise(n, k, t, 4, 0.2)
    with pytest.raises(ValueError, match="target"):
        advise(n, k, t, 4, 1.0)
    with pytest.raises(ValueError, match="n_models"):
        advise(n, k, t, 1, 0.7)
    with pytest.raises(ValueError, match="n_max"):
        advise(n, k, t, 4, 0.7, n_max=100)
    with pytest.raises(ValueError, match="n_boot"):
        advise(n, k, t, 4, 0.7, n_boot=5)
    with pytest.raises(ValueError, match="level"):
        fit_accuracy_curve(n, k, t, 4, level=0)
