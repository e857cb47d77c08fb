"""The tiny study on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
localhost, both offering one GPU resource (so the fitting steps' resource annotation is exercised
with the CPU device), driven by `recovery study --dask-scheduler` with concurrent runs. One worker
is killed in the middle of a fitting step: Dask retries the step on the other worker, and the
tables equal those of the in-process run (`tiny_run`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import spawn

from recovery_assets.defs import build_definitions
from recovery_assets.defs.assets import DASK_RESOURCES
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def cluster(tiny_run, tmp_path_factory):
    """A scheduler and two single-threaded workers named w0 and w1, each with GPU=1."""
    from distributed import Client

    base = tmp_path_factory.mktemp("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = tiny_run.env()  # the thread counts of the in-process run (same rounding)
    procs = {
        "scheduler": spawn(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
            + ["--no-dashboard"],
            env,
            base / "scheduler.log",
        )
    }
    for name in ("w0", "w1"):
        procs[name] = spawn(
            [str(BIN / "dask"), "worker", address, "--name", name, "--nthreads", "1"]
            # no nanny: it would set OMP_NUM_THREADS=1 for the worker, and torch's thread count
            # changes how the fits are batched and rounded
            + ["--no-nanny", "--resources", "GPU=1", "--no-dashboard"],
            env,
            base / f"{name}.log",
        )
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield {"address": address, "procs": procs, "base": base}
    finally:
        for proc in procs.values():
            _stop(proc)


def _tables(data: Path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect(str(data / "recovery.duckdb"), read_only=True)
    try:
        order = {
            "candidate_selection": "criterion, generator, n_train, simulation, candidate",
            "recovery_confusion": "criterion, n_train, generator, winner",
            "recovery_summary": "criterion, n_train",
            "generator_probes": "model",
        }
        return {
            t: con.execute(f"SELECT * FROM {t} ORDER BY {o}").fetchdf() for t, o in order.items()
        }
    finally:
        con.close()


def _assert_same(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b), name
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-12, err_msg=f"{name}.{col}")
        else:
            assert (x == y).all(), f"{name}.{col} differs"


def _kill_during_fitting(address: str, procs: dict, killed: list[str], stop: threading.Event):
    """Kill the worker that runs a candidate_scores step, once, as soon as one is seen running."""
    from distributed import Client

    with Client(address, timeout=60) as client:
        while not stop.is_set() and not killed:
            for worker, keys in client.processing().items():
                if any("candidate_scores" in str(k) for k in keys):
                    name = client.scheduler_info()["workers"][worker]["name"]
                    time.sleep(0.5)  # well inside the step
                    os.killpg(procs[name].pid, signal.SIGKILL)
                    killed.append(name)
                    break
            time.sleep(0.1)


def test_fitting_steps_ask_for_a_gpu_on_dask(tiny_run, tmp_path):
    study = load_study(tiny_run.study_path)
    defs = build_definitions(study, dask={"cluster": {"existing": {"address": "tcp://x:1"}}})
    job = defs.resolve_job_def("tiny__recovery_jobs_job")
    assert job.executor_def.name == "dask"
    tags = {node.name: node.tags for node in job.graph.node_defs}
    assert DASK_RESOURCES not in tags["tiny__synthetic_datasets"]  # CPU-only: any worker
    # tiny is a CPU study: no GPU asked for by default
    assert DASK_RESOURCES not in tags["tiny__candidate_scores"]
    gpu = tmp_study(tiny_run, tmp_path)
    job = build_definitions(load_study(gpu), dask={"cluster": {"existing": {"address": "x"}}})
    tags = {n.name: n.tags for n in job.resolve_job_def("tiny__generators_job").graph.node_defs}
    assert tags["tiny__generator_probes"][DASK_RESOURCES] == '{"GPU": 1}'


def tmp_study(tiny_run, folder: Path) -> Path:
    """The tiny study with its fitting steps asking Dask workers for a GPU."""
    doc = {
        "base": str(tiny_run.study_path),
        "name": "tiny",
        "execution": {"executor": "dask", "dask": {"gpu_resource": True}},
    }
    path = folder / "tiny_gpu.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_tiny_study_on_dask_survives_a_killed_worker(tiny_run, cluster, tmp_path):
    study_path = tmp_study(tiny_run, tmp_path)
    home, parent = tmp_path / "home", tmp_path / "data"
    env = tiny_run.env(home=home, parent=parent)
    env["RECOVERY_STUDY"] = str(study_path)
    log = tmp_path / "study.log"
    cmd = [str(BIN / "recovery"), "study", "--dask-scheduler", cluster["address"]]
    cmd += ["--max-concurrent-runs", "2"]
    killed: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_during_fitting, args=(cluster["address"], cluster["procs"], killed, stop)
    )
    watcher.start()
    proc = spawn(cmd, env, log)
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    finally:
        stop.set()
        watcher.join(timeout=30)
        _stop(proc)
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    assert len(killed) == 1, "no worker was seen running a fitting step"
    # the other worker finished everything: same tables as the in-process run
    ours, reference = _tables(parent / "tiny"), _tables(tiny_run.data)
    for name in ours:
        _assert_same(ours[name], reference[name], name)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert all(r.tags.get("study") == "tiny" for r in runs)
        parts = instance.get_materialized_partitions(dg.AssetKey(["tiny", "candidate_scores"]))
    assert len(parts) == 6
