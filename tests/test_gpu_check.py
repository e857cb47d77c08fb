"""The prepared device check (bench/gpu_check.py) runs end to end, here on the CPU with tiny
problems, so that a run on a GPU machine does not spend its time on a broken script.

On the CPU the "device" fits and the CPU fits are the same code, so their agreement proves
nothing; what can fail here is the comparison with the script's independent reference (the plain
unreduced float64 objective of docs/method.md §4, minimised by torch's L-BFGS or a plain FISTA)
and with its plain float64 evaluation of the objective."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_bench

from recovery_assets.core.probe import ProbeSpec, fit_probes

ROOT = Path(__file__).resolve().parents[1]
SPECS = [
    "full/shrinkage",
    "full/frobenius",
    "pca:8/shrinkage",
    "diagonal/shrinkage",
    "rank:4/shrinkage",
    "full/l1",
]


def _gpu_check():
    """bench/gpu_check.py as a module (it puts bench/ on sys.path for its own imports)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_runs_and_takes_both_data_paths(tmp_path):
    run_bench("gpu_check.py", "--device", "cpu", "--small", "--skip-bench", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["device"] == "cpu" and summary["all_correct"] is True
    assert [row["spec"] for row in summary["correctness"]] == SPECS
    for row in summary["correctness"]:
        assert row["sparse_used"] == [False, True], row  # each data path really ran
        assert row["device_minus_cpu"] <= 1e-4 and row["sparse_vs_dense"] <= 1e-4, row
        # the independent comparison: the fit is no worse than the plain reference fit, and the
        # library's float64 objective is the plain formula's
        assert row["device_minus_reference"] <= 1e-4, row
        assert row["evaluator_gap"] <= 1e-9, row
        obj = row["objectives"]
        assert set(obj) == {"cpu", "dense", "sparse", "reference"}
        # the reference is a real fit, not a copy of the device's W: at lambda = 1e-4 (the first)
        # it does not reproduce the fitter's objective to the last digit, yet agrees within 1e-4
        assert all(np.isfinite(v).all() and len(v) == 3 for v in obj.values()), obj
        assert np.allclose(obj["reference"], obj["dense"], rtol=0, atol=1e-4), obj
    assert any(
        row["objectives"]["reference"][0] != row["objectives"]["dense"][0]
        for row in summary["correctness"]
    )
    speed = summary["data_term_speed"]
    assert [speed[k]["sparse_used"] for k in ("dense", "sparse", "dense_again")] == [
        False,
        True,
        False,
    ]
    assert all(speed[k]["iterations"] > 0 and speed[k]["seconds"] > 0 for k in speed)
    assert "bench" not in summary  # --skip-bench


@pytest.mark.usefixtures("single_thread")
def test_gpu_check_fails_a_fitter_that_stops_short(monkeypatch):
    """A fitter that stops after 2 iterations agrees with itself (device = CPU: the old check's
    only comparison) but not with the reference, so the check reports it."""
    gpu_check = _gpu_check()

    def short(problems, spec, **kw):
        return fit_probes(problems, spec, max_iter=2, **kw)

    monkeypatch.setattr(gpu_check, "fit_probes", short)
    (row,) = gpu_check.correctness("cpu", small=True, specs=[("full", "frobenius", "small")])
    assert row["device_minus_cpu"] == 0.0  # blind: the same code twice
    assert row["device_minus_reference"] > 1e-4, row
    assert row["ok"] is False


def test_plain_objective_is_the_formula_of_method_4():
    """The script's plain evaluator on a one-triplet case computed by hand."""
    gpu_check = _gpu_check()
    X = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    trip = np.array([[0, 1, 2]])
    W = np.array([[2.0, 0.0], [0.0, 1.0]])
    Z = X @ W.T  # z0 = (2, 0), z1 = (0, 2), z2 = (2, 1)
    logits = np.array([Z[1] @ Z[2], Z[0] @ Z[2], Z[0] @ Z[1]])  # [2, 4, 0]
    ce = -(logits[1] - np.log(np.exp(logits).sum()))
    full = ProbeSpec.parse("full", "shrinkage")  # W - (tr W / 2) I = diag(0.5, -0.5)
    assert gpu_check.plain_objective(W, X, trip, [1], 0.1, full) == pytest.approx(ce + 0.1 * 0.5)
    frob = ProbeSpec.parse("full", "frobenius")
    assert gpu_check.plain_objective(W, X, trip, [1], 0.1, frob) == pytest.approx(ce + 0.1 * 5)
    l1 = ProbeSpec.parse("full", "l1")
    assert gpu_check.plain_objective(W, X, trip, [1], 0.1, l1) == pytest.approx(ce + 0.1 * 3)
