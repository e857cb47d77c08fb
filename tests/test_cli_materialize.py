"""Smoke test of the `dagster` CLI on the code location: re-materialize one candidate_scores job.

It runs on a copy of the tiny instance and data folder, so the session's `tiny_run` stays as the
fixture left it for the other tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import dagster as dg
import pytest
from conftest import spawn

from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
DAGSTER = ROOT / ".venv" / "bin" / "dagster"
TIMEOUT_S = 600


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:]


def test_cli_materialize_candidate_scores_partition(tiny_run, tmp_path):
    assert DAGSTER.is_file(), f"{DAGSTER} is missing: install the project with its dev extras"
    study = load_study(tiny_run.study_path)
    model, n_train = study.model_names[0], min(study.sizes)
    key = dg.MultiPartitionKey({"model": model, "n_train": str(n_train)})
    # dimensions sorted by name: "model" before "n_train"
    assert str(key) == f"{model}|{n_train}"

    home, data = tmp_path / "dagster_home", tmp_path / "data"
    shutil.copytree(tiny_run.home, home)
    shutil.copytree(tiny_run.parent, data)
    table = data / "tiny" / "tables" / "candidate_fits" / f"model={model}" / f"n_train={n_train}"
    part = table / "part.parquet"
    assert part.is_file(), f"tiny_run did not write {part}"
    before = part.stat().st_mtime_ns
    os.utime(part, ns=(before - 10**9, before - 10**9))  # a rewrite shows even on coarse clocks
    before = part.stat().st_mtime_ns

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs_before = {r.run_id for r in instance.get_runs()}

    env = tiny_run.env(home=home, parent=data)
    cmd = [
        str(DAGSTER),
        "asset",
        "materialize",
        "-m",
        "recovery_assets.definitions",
        "--select",
        "tiny/candidate_scores",
        "--partition",
        str(key),
    ]
    log = tmp_path / "materialize.log"
    proc = spawn(cmd, env, log)
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        pytest.fail(f"`dagster asset materialize` ran past {TIMEOUT_S} s:\n{_tail(log)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert rc == 0, f"`{' '.join(cmd)}` exited with {rc}:\n{_tail(log)}"

    assert part.is_file(), f"{part} vanished"
    assert part.stat().st_mtime_ns > before, f"{part} was not rewritten"

    with dg.DagsterInstance.from_config(str(home)) as instance:
        new_runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
        assert len(new_runs) == 1, [r.run_id for r in new_runs]
        run = new_runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
        assert run.tags.get("dagster/partition") == str(key), run.tags
        event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "candidate_scores"]))
        assert event is not None and event.run_id == run.run_id
        assert event.dagster_event.partition == str(key)
