"""The prepared device check (bench/gpu_check.py) runs end to end, here on the CPU with tiny
problems, so that a run on a GPU machine does not spend its time on a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_and_takes_both_data_paths(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--small"]
    cmd += ["--skip-bench", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["device"] == "cpu" and summary["all_correct"] is True
    specs = [row["spec"] for row in summary["correctness"]]
    assert specs == [
        "full/shrinkage",
        "full/frobenius",
        "pca:8/shrinkage",
        "diagonal/shrinkage",
        "rank:4/shrinkage",
        "full/l1",
    ]
    for row in summary["correctness"]:
        assert row["sparse_used"] == [False, True], row  # each data path really ran
        assert abs(row["device_minus_cpu"]) <= 1e-4 and row["sparse_vs_dense"] <= 1e-4, row
    speed = summary["data_term_speed"]
    assert [speed[k]["sparse_used"] for k in ("dense", "sparse", "dense_again")] == [
        False,
        True,
        False,
    ]
    assert all(speed[k]["iterations"] > 0 and speed[k]["seconds"] > 0 for k in speed)
    assert "bench" not in summary  # --skip-bench
