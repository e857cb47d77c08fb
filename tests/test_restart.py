"""`recovery study` stopped and started again, as a user's runs are (SLURM preemption, OOM, a
closed laptop): SIGTERM stops it within seconds with its run marked failed; after a SIGKILL in
the middle of a recovery job, the next start marks the dead run failed, frees what it held,
skips what is already done and ends with the same tables as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
from conftest import assert_same_rows, spawn

ROOT = Path(__file__).resolve().parent.parent
RECOVERY = str(ROOT / ".venv" / "bin" / "recovery")


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def _table(data: Path, name: str, order: str) -> pd.DataFrame:
    con = duckdb.connect(str(data / "recovery.duckdb"), read_only=True)
    try:
        return con.execute(f"SELECT * FROM {name} ORDER BY {order}").fetchdf()
    finally:
        con.close()


def _runs(home: Path) -> list:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs())


@pytest.fixture
def env(tiny_run, tmp_path):
    return tiny_run.env(home=tmp_path / "home", parent=tmp_path / "data")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_within_seconds_and_marks_the_run_failed(env, tmp_path, sig):
    """Even inside a fitting step, whose retry policy Dagster applies to a KeyboardInterrupt:
    the stop is not turned into a retry."""
    log = tmp_path / "run.log"
    proc = spawn([RECOVERY, "study", "--study", "tiny"], env, log)
    _wait_for(log, "cross-validating", proc)  # inside a fitting step, which has retries
    t = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - t < 30
    out = log.read_text()
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out and "recovery study: stopped by" in out, out[-3000:]
    runs = _runs(Path(env["DAGSTER_HOME"]))
    assert runs[0].status == dg.DagsterRunStatus.FAILURE  # the run it was in
    assert all(r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE) for r in runs)


def test_sigkill_then_restart_resumes_to_the_same_tables(tiny_run, env, tmp_path):
    log = tmp_path / "killed.log"
    proc = spawn([RECOVERY, "study", "--study", "tiny"], env, log)
    # the first recovery job's fitting has started: its run is in progress for a while yet
    # (fitting, scoring, writing), so the kill lands inside it
    _wait_for(log, "fitting 3 candidates x", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    home = Path(env["DAGSTER_HOME"])
    assert any(r.status == dg.DagsterRunStatus.STARTED for r in _runs(home))  # left behind

    res = subprocess.run(
        [RECOVERY, "study", "--study", "tiny"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is gone; marked failed" in res.stdout
    assert "stimuli: up to date, skipped" in res.stdout
    assert "generator_probes [resnet18]: up to date, skipped" in res.stdout
    runs = _runs(home)
    assert not any(r.status == dg.DagsterRunStatus.STARTED for r in runs)
    assert sum(r.status == dg.DagsterRunStatus.FAILURE for r in runs) == 1
    # the same tables as the uninterrupted run
    data = Path(env["RECOVERY_DATA"]) / "tiny"
    for name, order in (
        ("candidate_selection", "criterion, generator, n_train, simulation, candidate"),
        ("recovery_confusion", "criterion, n_train, generator, winner"),
        ("generator_probes", "model"),
    ):
        ours, reference = _table(data, name, order), _table(tiny_run.data, name, order)
        assert_same_rows(name, ours, reference)
    # a third start has nothing left to do
    again = subprocess.run(
        [RECOVERY, "study", "--study", "tiny"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 17
    assert len(_runs(home)) == len(runs)  # no new run
