"""Materialize a whole study in order into a persistent Dagster instance.

Two ways, both recording every step as a Dagster run (visible in `make ui`):

- ``materialize_study``: one process, partition after partition, the in-process executor (torch
  is imported once). `make demo` and a plain `recovery study` use it.
- ``run_study``: each stage's independent partitions as concurrent runs, each run in its own
  process executing a reconstructable job (``study_job``), up to ``max_concurrent_runs`` at once;
  with ``dask`` the runs' steps execute on a Dask cluster's workers. `recovery study
  --dask-scheduler / --dask-workers / --max-concurrent-runs` uses it.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import dagster as dg

from recovery_assets.defs import build_definitions
from recovery_assets.defs.automation import STAGES, asset_keys, job_name
from recovery_assets.defs.partitions import job_key
from recovery_assets.liveness import Freshness, run_tags
from recovery_assets.storage import Store, data_parent, data_root
from recovery_assets.study import Study, load_study


def materialize_study(
    study: Study,
    instance: dg.DagsterInstance,
    echo: Callable[[str], None] = print,
    storage_root: str | None = None,
    log_level: str = "INFO",
    force: bool = True,
) -> Store:
    """Materialize every asset of ``study`` in order; ``storage_root`` is the parent of the
    studies' data folders (default: $RECOVERY_DATA, else ./data). Without ``force``, a step whose
    assets are all up to date (``liveness.Freshness``) is skipped. Returns the study's store."""
    defs = build_definitions(study)
    assets = list(defs.assets)
    resources = dict(defs.resources)
    if storage_root:
        from recovery_assets.defs.resources import StorageResource

        resources["storage"] = StorageResource(root=str(storage_root))
    t0 = time.perf_counter()

    def step(selection: list[str], partition_key=None) -> None:
        label = ", ".join(selection) + (f" [{partition_key}]" if partition_key else "")
        keys = asset_keys(study, selection)
        if not force and Freshness(instance, defs).fresh(keys, partition_key):
            echo(f"  {label}: up to date, skipped")
            return
        t = time.perf_counter()
        dg.materialize(
            assets,
            selection=keys,
            partition_key=partition_key,
            instance=instance,
            resources=resources,
            tags={"study": study.name, **run_tags()},
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
        echo(f"  {label}: {time.perf_counter() - t:.1f} s (total {time.perf_counter() - t0:.0f} s)")

    echo(
        f"study {study.name}: {len(study.models)} models, sizes {list(study.sizes)}, "
        f"{study.simulations} simulations"
    )
    step(["stimuli"])
    for m in study.model_names:
        step(["embeddings"], m)
    step(["human_judgements"])
    for m in study.model_names:
        step(["generator_probes"], m)
    for n in study.sizes:
        for m in study.model_names:
            step(["synthetic_datasets", "candidate_scores"], str(job_key(m, n)))
        step(["recovery_matrix"], str(n))
    step(next(keys for name, keys, _ in STAGES if name == "summary_job"))
    return Store(data_root(study, storage_root))


# ----------------------------------------------------------------------------- concurrent runs
def study_job(study_path: str, stage: str, dask_json: str | None = None) -> dg.JobDefinition:
    """The job of one stage of a study, rebuilt from its arguments: what a run process and every
    Dask worker reconstruct (they need the study file at the same path, and the data folder)."""
    study = load_study(study_path)
    dask = json.loads(dask_json) if dask_json else None
    return build_definitions(study, dask=dask).resolve_job_def(job_name(study, stage))


def stage_partitions(study: Study) -> list[tuple[str, list[str | None]]]:
    """The study's stages in order, each with the partitions its runs take (None: unpartitioned)."""
    keys = {
        None: [None],
        "model": list(study.model_names),
        "n_train": [str(n) for n in study.sizes],
        "job": [str(job_key(m, n)) for n in study.sizes for m in study.model_names],
    }
    return [(name, keys[part]) for name, _, part in STAGES]


def _execute_run(
    study_path: str,
    stage: str,
    partition: str | None,
    dask_json: str | None,
    storage_root: str,
    log_level: str,
) -> tuple[str, bool, str]:
    """One run, in its own process: (run id, success, the first failure's message)."""
    from recovery_assets.errors import stop_on_signals

    stop_on_signals()  # the parent's SIGTERM stops this run (marked failed by the parent)
    recon = dg.build_reconstructable_job(
        "recovery_assets.run", "study_job", reconstructable_args=(study_path, stage, dask_json)
    )
    job = recon.get_definition()
    study = load_study(study_path)
    tags = {"study": study.name, **run_tags()}
    if partition is not None:
        tags.update(job.get_tags_for_partition_key(partition, selected_asset_keys=None))
    run_config = {
        # the data folder travels with the run (a Dask worker's working directory differs)
        "resources": {"storage": {"config": {"root": storage_root}}},
        "loggers": {"console": {"config": {"log_level": log_level}}},
    }
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            recon, instance, run_config=run_config, tags=tags, raise_on_error=False
        )
        message = ""
        if not result.success:
            for event in result.all_events:
                if event.is_step_failure and event.step_failure_data.error is not None:
                    error = event.step_failure_data.error
                    while error.cause is not None:  # the user's exception, not Dagster's wrapper
                        error = error.cause
                    step = event.step_key.split("__", 1)[-1]
                    message = f"{step}: {error.message.strip()}"
                    break
        return result.run_id, result.success, message


class RunFailed(RuntimeError):
    """A run of ``run_study`` failed; the message names the step and its error."""


def run_study(
    study: Study,
    echo: Callable[[str], None] = print,
    storage_root: str | None = None,
    dask: dict | None = None,
    max_concurrent_runs: int = 4,
    log_level: str = "WARNING",
    force: bool = True,
) -> Store:
    """Materialize every stage of ``study`` in order; within a stage, up to
    ``max_concurrent_runs`` partitions run at once, each in its own process (spawned: torch and
    CUDA are never forked). ``dask``: dagster-dask's executor config for the runs' steps (None:
    the study's own execution settings). Stops at the first failed run of a stage (the runs
    already started finish) and raises ``RunFailed``. Without ``force``, partitions whose assets
    are all up to date are skipped. The instance is $DAGSTER_HOME."""
    if max_concurrent_runs < 1:
        raise ValueError(f"max_concurrent_runs must be >= 1, got {max_concurrent_runs}")
    parent = str(data_parent(storage_root))
    dask_json = json.dumps(dask) if dask else None
    t0 = time.perf_counter()
    where = "on Dask" if (dask or study.dask_config()) else "in their own processes"
    echo(
        f"study {study.name}: {len(study.models)} models, sizes {list(study.sizes)}, "
        f"{study.simulations} simulations; up to {max_concurrent_runs} runs at once, steps {where}"
    )
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=max_concurrent_runs, mp_context=context)
    try:
        return _run_stages(study, pool, echo, parent, dask_json, log_level, force, t0)
    except BaseException:  # a signal or a failure: stop the run processes, then propagate
        processes = list(getattr(pool, "_processes", {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=30)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run_stages(study, pool, echo, parent, dask_json, log_level, force, t0) -> Store:
    """Each stage's partitions as runs on ``pool``, stage after stage (see ``run_study``)."""
    for stage, partitions in stage_partitions(study):
        t = time.perf_counter()
        if not force:
            partitions = _stale(study, stage, partitions, echo)
            if not partitions:
                continue
        args = (str(study.path), stage)
        pending = {
            pool.submit(_execute_run, *args, key, dask_json, parent, log_level): key
            for key in partitions
        }
        failures = []
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                if future.cancelled():
                    continue
                run_id, ok, message = future.result()
                label = f"{stage}" + (f" [{key}]" if key else "")
                echo(f"  {label}: {'ok' if ok else 'FAILED'} (run {run_id[:8]})")
                if not ok:
                    failures.append(f"{label}: {message}")
                    for other in pending:  # runs not yet started are dropped
                        other.cancel()
        echo(
            f"  {stage}: {len(partitions)} run(s), {time.perf_counter() - t:.1f} s "
            f"(total {time.perf_counter() - t0:.0f} s)"
        )
        if failures:
            raise RunFailed("; ".join(failures))
    return Store(data_root(study, Path(parent)))


def _stale(study: Study, stage: str, partitions: list, echo: Callable[[str], None]) -> list:
    """The partitions of a stage that are not up to date (the others are reported skipped)."""
    keys = asset_keys(study, next(k for name, k, _ in STAGES if name == stage))
    with dg.DagsterInstance.get() as instance:
        freshness = Freshness(instance, build_definitions(study))
        todo = [p for p in partitions if not freshness.fresh(keys, p)]
    skipped = len(partitions) - len(todo)
    if skipped:
        echo(f"  {stage}: {skipped} of {len(partitions)} partition(s) up to date, skipped")
    return todo
