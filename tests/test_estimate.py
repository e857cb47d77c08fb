"""`recovery estimate`: the counts of a study, the fit-time model and what the command prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from recovery_assets.estimate import FitModel, estimate_study, training_concepts
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent


def constant_model(r: int = 865, seconds: float = 0.01, iterations: float = 100.0) -> FitModel:
    lams = [10.0**e for e in range(-6, 5)]
    return FitModel(
        iterations={(r, 6_400): {lam: iterations for lam in lams}},
        per_iteration={(r, 50): seconds, (r, 4_200_000): seconds},
    )


@pytest.fixture(scope="module")
def things_estimate():
    return estimate_study(load_study("things"), "cpu", calibration=constant_model())


def test_things_counts(things_estimate):
    est = things_estimate
    # 20 generators x 18 sizes x 30 simulations x 20 candidates x 11 lambdas x 3 folds
    assert est["candidate_fits"] == 7_128_000
    assert est["partitions"] == 360 and est["n_concepts"] == 1854
    sizes = load_study("things").sizes
    assert est["synthetic_triplets"] == sum(20 * 30 * 3 * (N + 2 * round(N / 8)) for N in sizes)
    assert est["training_concepts_per_fold"] == training_concepts(1854) == 865
    # a full W with shrinkage fits an r x r problem, r = min(p, training concepts)
    assert est["reduced_sizes"]["ResNet50"] == 865  # p = 2,048


def test_things_fits_on_disk(things_estimate):
    """Everything the main study stores fits in 20 GB (synthetic data are stored as recipes)."""
    assert 0 < things_estimate["disk_gb"] < 20
    assert things_estimate["stages"]["synthetic_datasets"]["disk_gb"] < 1


def test_time_is_iterations_times_seconds(things_estimate):
    est = things_estimate
    fits = est["stages"]["candidate_scores"]["candidate_fits"]
    # every fit 100 iterations x 10 ms (the model is constant in N and r = 865)
    assert est["stages"]["candidate_scores"]["device_hours"] == pytest.approx(
        fits * 100 * 0.01 / 3600, rel=0.05
    )
    assert est["device_hours"] >= est["stages"]["candidate_scores"]["device_hours"]


def test_fit_model_interpolates_in_log_n():
    model = FitModel(
        iterations={(100, 1_000): {1.0: 50.0}},
        per_iteration={(100, 1_000): 0.01, (100, 100_000): 1.0},
    )
    assert model.seconds(100, 1_000, 1.0) == pytest.approx(0.5)
    assert model.seconds(100, 100_000, 1.0) == pytest.approx(50.0)
    assert model.seconds(100, 10_000, 1.0) == pytest.approx(5.0)  # geometric midpoint
    assert model.seconds(200, 10_000, 1.0) == pytest.approx(20.0)  # ~ r^2


def test_a_set_up_time_measured_as_zero_is_interpolated_linearly():
    """``calibrate`` floors a set-up time at 0 when the timings' noise exceeds it; the model
    still answers (a log-log interpolation took the logarithm of 0 and raised)."""
    model = FitModel(
        iterations={(100, 1_000): {1.0: 50.0}},
        per_iteration={(100, 1_000): 0.01, (100, 4_000): 0.04},
        setup={(100, 1_000): 0.0, (100, 4_000): 0.3},
    )
    assert model.seconds(100, 1_000, 1.0) == pytest.approx(0.5)
    assert model.seconds(100, 2_500, 1.0) == pytest.approx(50 * 0.025 + 0.15, rel=0.05)
    assert model.seconds(100, 8_000, 1.0) == pytest.approx(50 * 0.08 + 0.6)  # setup ~ N past it


def test_estimate_command_prints_json():
    res = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "recovery"), "estimate", "--study", "tiny", "--json"],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    est = json.loads(res.stdout)
    assert est["candidate_fits"] == 3 * 2 * 2 * 3 * 2 * 3  # 216
    assert est["device_hours"] > 0 and est["disk_gb"] > 0
    assert set(est["stages"]) >= {"embeddings", "generator_probes", "candidate_scores"}
    assert est["calibration"]["iterations"]  # really timed


def test_estimate_refuses_an_unusable_device():
    res = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "recovery"), "estimate", "--study", "tiny"]
        + ["--device", "cuda:7"],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert res.returncode == 2 and "--device cuda:7" in res.stderr
