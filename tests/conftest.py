"""Shared fixtures: the tiny study materialized once per session into a temporary instance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "studies" / "tiny.yaml"


@dataclass
class TinyRun:
    study_path: Path
    parent: Path  # $RECOVERY_DATA: the parent of the studies' data folders
    home: Path  # DAGSTER_HOME of the persistent instance that recorded the runs

    @property
    def data(self) -> Path:
        """The study's data folder (arrays, tables, recovery.duckdb): <parent>/tiny."""
        return self.parent / "tiny"

    def env(self, home: Path | None = None, parent: Path | None = None) -> dict[str, str]:
        """The environment of a subprocess (CLI, webserver) that sees this study and instance."""
        return dict(
            os.environ,
            DAGSTER_HOME=str(home or self.home),
            RECOVERY_STUDY=str(self.study_path),
            RECOVERY_DATA=str(parent or self.parent),
            HF_HUB_OFFLINE="1",
        )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """Materialize the whole tiny study (every asset, every partition) into a persistent
    instance under a temporary DAGSTER_HOME, as `make demo` does for the demo study."""
    import dagster as dg

    from recovery_assets.run import materialize_study
    from recovery_assets.study import load_study

    base = tmp_path_factory.mktemp("tiny")
    home, data = base / "dagster_home", base / "data"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    study = load_study(TINY)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        materialize_study(
            study, instance, echo=lambda s: None, storage_root=str(data), log_level="WARNING"
        )
    return TinyRun(study_path=TINY, parent=data, home=home)


@pytest.fixture(scope="module")
def study(tiny_run):
    """The tiny study, loaded from its file."""
    from recovery_assets.study import load_study

    return load_study(tiny_run.study_path)


def query(db: Path, sql: str, rows: bool = False):
    """One read-only query of a study's DuckDB file, as a DataFrame (``rows``: a list of tuples)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        result = con.execute(sql)
        return result.fetchall() if rows else result.fetchdf()
    finally:
        con.close()


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for the module (small fits; no oversubscription of 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_bench(script: str, *args: str) -> str:
    """Run ``bench/<script>`` with ``args`` on one torch thread (tiny problems: several threads on
    shared cores only contend); assert it succeeded and return its standard output."""
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a program in its own process group (so it can be killed whole), output to ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def assert_same_rows(name: str, ours, theirs, rtol: float = 1e-9) -> None:
    """Two frames of one table hold the same rows (in any order): the same columns and row count,
    equal non-float columns, float columns within ``rtol``."""
    import numpy as np

    assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs), name
    key = [c for c in theirs.columns if not np.issubdtype(theirs[c].dtype, np.floating)]
    ours = ours.sort_values(key).reset_index(drop=True)
    theirs = theirs.sort_values(key).reset_index(drop=True)
    for col in theirs.columns:
        x, y = ours[col].to_numpy(), theirs[col].to_numpy()
        if np.issubdtype(y.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=rtol, err_msg=f"{name}.{col}")
        else:
            assert (x == y).all(), f"{name}.{col}"
