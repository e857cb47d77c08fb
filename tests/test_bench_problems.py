"""The benchmark's realistic probe problems (bench/problems.py) look like the real workload:
features with a power-law spectrum over many dimensions, rectified and scaled like pooled ReLU
features, a candidate that shares 80 % of its variance with the generator, answers drawn from
the generator calibrated to the human noise ceiling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from problems import (  # noqa: E402
    NOISE_CEILING,
    make_generator,
    mix_codes,
    powerlaw_code,
    realistic_problem,
    similarity_logits,
    spectrum_slopes,
)

from recovery_assets.core.calibration import mean_max_probability  # noqa: E402
from recovery_assets.core.triplets import sample_unique_triplets  # noqa: E402

N = 400


@pytest.mark.parametrize("exponent", [-0.5, -1.0])
def test_features_fall_as_a_power_law_over_many_dimensions(exponent):
    gen = make_generator(N, 256, exponent, seed=1)
    X = gen.features
    assert X.dtype == np.float32 and X.shape == (N, 256) and (X >= 0).all()
    assert np.isclose((X.astype(np.float64) ** 2).sum(1).mean(), 4.0, rtol=1e-5)
    slopes = spectrum_slopes(X, ((1, 10), (10, 100)))
    # rectification flattens the nominal exponent a little; the fall-off stays a power law
    for slope in slopes.values():
        assert exponent - 0.1 <= slope <= 0.75 * exponent, slopes


def test_the_generator_is_calibrated_to_the_noise_ceiling():
    gen = make_generator(N, 128, -0.75, seed=2)
    cal = sample_unique_triplets(np.arange(N), 10_000, 2)
    assert mean_max_probability(similarity_logits(gen.features, cal), gen.temperature) == (
        pytest.approx(NOISE_CEILING, abs=1e-9)
    )
    trip = sample_unique_triplets(np.arange(N), 3000, 3)
    answers = gen.answers(trip, 3)
    assert set(np.unique(answers)) == {0, 1, 2}
    np.testing.assert_array_equal(answers, gen.answers(trip, 3))  # seeded
    # near the ceiling the sampled answers agree with the generator's own choice about 2/3 of
    # the time
    agree = (similarity_logits(gen.features, trip).argmax(1) == answers).mean()
    assert 0.6 < agree < 0.75


def test_the_candidate_shares_80_percent_of_its_variance():
    G = powerlaw_code(N, 128, -0.75, seed=4)
    own = powerlaw_code(N, 128, -0.75, seed=5)
    code, theta = mix_codes(G, own, 0.8)
    assert theta == pytest.approx(np.arctan(0.5), rel=1e-9)  # equal spectra
    shared = np.cos(theta) ** 2 * (G**2).sum()
    # 0.8 in expectation; the cross term of two random codes is small but not zero
    assert shared / (code**2).sum() == pytest.approx(0.8, abs=0.05)


def test_a_realistic_problem_is_a_training_fold_of_unique_triplets():
    pr = realistic_problem(128, -0.75, n_concepts=300, n_train=2000, seed=0)
    assert pr.features.shape == (300, 128) and pr.triplets.shape == (2000, 3)
    assert len({tuple(sorted(t)) for t in pr.triplets.tolist()}) == 2000
    assert len(np.unique(pr.triplets)) < 300  # only the fold's training concepts
    assert pr.answers.shape == (2000,) and pr.temperature > 0
