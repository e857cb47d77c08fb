"""SIGKILL in the middle of each heavy step, then `recovery study` again, as a preempted batch job
is restarted.

The processes are started with ``tests/faults`` on PYTHONPATH: its ``sitecustomize`` makes the
first rename into place of a chosen file hang (``RECOVERY_TEST_HANG_AT``), so the step is killed at
its most delicate moment: the new file fully written under its temporary name, the step's other
files and its materialization not yet recorded. One chain of starts kills each heavy step in turn
(embeddings, generator probes, synthetic data, candidate scores, recovery matrix); every next start
finds the dead run, marks it failed, frees its pool slots, skips what is done and goes on to the
next kill; the last start finishes with the same tables as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from conftest import assert_same_rows, spawn

ROOT = Path(__file__).resolve().parent.parent
RECOVERY = str(ROOT / ".venv" / "bin" / "recovery")

# (step, the target path text whose rename hangs, a step already done that the start must skip)
KILLS = [
    ("embeddings", "embeddings/resnet18_seed1.npz", "stimuli: up to date, skipped"),
    (
        "generator_probes",  # its npz is in place, its tables are not
        "tables/generator_probes/model=resnet18/",
        "embeddings [resnet18]: up to date, skipped",
    ),
    (
        "synthetic_datasets",
        "synthetic/resnet18/n100.npz",
        "embeddings [mobilenetv3_small]: up to date, skipped",
    ),
    (
        "candidate_scores",  # candidate_fits in place, candidate_selection not
        "tables/candidate_selection/model=resnet18_seed1/n_train=100/",
        "synthetic_datasets, candidate_scores [resnet18|50]: up to date, skipped",
    ),
    (
        "recovery_matrix",  # recovery_summary in place, recovery_confusion not
        "tables/recovery_confusion/n_train=100/",
        "synthetic_datasets, candidate_scores [resnet18|100]: up to date, skipped",
    ),
]


def _runs(home: Path) -> list:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs())


def _started_steps(home: Path, run_id: str) -> list[str]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return [
            e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        ]


def _slots_held(home: Path) -> int:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        return sum(
            storage.get_concurrency_info(key).active_slot_count
            for key in storage.get_concurrency_keys()
        )


def _views_answer(db: Path) -> dict[str, int]:
    """Every view of the study's DuckDB file answers; its row counts."""
    if not db.exists():
        return {}
    con = duckdb.connect(str(db), read_only=True)
    try:
        views = [
            r[0]
            for r in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        ]
        return {v: con.execute(f'SELECT count(*) FROM "{v}"').fetchone()[0] for v in views}
    finally:
        con.close()


def _kill_at(at: str, env: dict, tmp_path: Path, i: int) -> tuple[str, Path, Path]:
    """Start `recovery study`, wait until it hangs before renaming ``at`` into place, SIGKILL its
    process group; returns its output and the (temporary, target) paths."""
    marker, log = tmp_path / f"marker{i}", tmp_path / f"start{i}.log"
    env = dict(env, RECOVERY_TEST_HANG_AT=at, RECOVERY_TEST_MARKER=str(marker))
    proc = spawn([RECOVERY, "study", "--study", "tiny"], env, log)
    end = time.monotonic() + 600
    try:
        while not (marker.exists() and marker.read_text().count("\n") == 2):
            if proc.poll() is not None:
                pytest.fail(f"exited ({proc.returncode}) before {at!r}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > end:
                pytest.fail(f"never reached {at!r}:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    tmp, target = (Path(p) for p in marker.read_text().split())
    return log.read_text(), tmp, target


def test_sigkill_in_each_heavy_step_then_restart(tiny_run, tmp_path):
    env = tiny_run.env(home=tmp_path / "home", parent=tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests" / "faults")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    home, data = Path(env["DAGSTER_HOME"]), tmp_path / "data" / "tiny"
    previous_tmp = None
    for i, (step, at, skipped) in enumerate(KILLS):
        out, tmp, target = _kill_at(at, env, tmp_path, i)
        if i:
            assert "is gone; marked failed" in out, out[-3000:]  # the previous start's run
            assert skipped in out, out[-3000:]
            assert not previous_tmp.exists()  # what the killed writer left was cleaned up
        # the killed step's new file is whole under its temporary name and invisible
        assert tmp.exists() and tmp.name.startswith(".") and tmp.suffix == ".tmp"
        assert not target.exists(), f"{step}: {target} visible after the kill"
        assert not list(data.rglob("part.parquet.*"))
        _views_answer(data / "recovery.duckdb")  # every query still answers
        runs = _runs(home)
        assert runs[0].status == dg.DagsterRunStatus.STARTED, step  # the dead run, left behind
        assert any(step in key for key in _started_steps(home, runs[0].run_id)), step
        previous_tmp = tmp

    res = subprocess.run(
        [RECOVERY, "study", "--study", "tiny"], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is gone; marked failed" in res.stdout
    runs = _runs(home)
    assert not any(r.status == dg.DagsterRunStatus.STARTED for r in runs)
    assert sum(r.status == dg.DagsterRunStatus.FAILURE for r in runs) == len(KILLS)
    assert _slots_held(home) == 0
    assert not list(data.rglob("*.tmp"))  # every killed writer's temporary file is gone

    # the same tables as the uninterrupted run
    con = duckdb.connect(str(data / "recovery.duckdb"), read_only=True)
    ref = duckdb.connect(str(tiny_run.data / "recovery.duckdb"), read_only=True)
    try:
        names = [
            r[0]
            for r in ref.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        ]
        assert sorted(names) == sorted(_views_answer(data / "recovery.duckdb"))
        for name in (
            "embeddings",
            "generator_probes",
            "candidate_fits",
            "candidate_selection",
            "recovery_summary",
            "recovery_confusion",
            "recovery_per_model",
        ):
            ours, theirs = (c.execute(f"SELECT * FROM {name}").fetchdf() for c in (con, ref))
            assert_same_rows(name, ours, theirs)
    finally:
        con.close()
        ref.close()
