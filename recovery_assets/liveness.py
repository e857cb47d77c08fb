"""Runs that died, and partitions that need no run: what `recovery study` checks before it works.

- Every run the ``recovery`` commands launch carries the host and process that executes it
  (``run_tags``). A run still marked in progress whose process is gone (SIGKILL, OOM, a closed
  laptop, a preempted batch job) is marked failed and the concurrency-pool slots it held are
  freed (``free_dead_runs``); otherwise the next fitting step would wait for those slots forever.
  Dagster's own run monitoring cannot tell a dead in-process run from a live one with the default
  run launcher, and needs the daemon besides.
- A partition is skipped when every asset of its step is up to date in Dagster's sense
  (``StaleStatus.FRESH``: materialized after its inputs' current data, with the current code
  version; the assets' code version changes with the study's settings and the package version).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg

from recovery_assets.storage import pid_alive

HOST_TAG = "recovery/host"
PID_TAG = "recovery/pid"
START_TAG = "recovery/pid_start"  # the process's start time (Linux), against pid reuse
IN_PROGRESS = (
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of /proc/<pid>/stat


def run_tags() -> dict[str, str]:
    """Tags naming the process that executes a run."""
    pid = os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    start = _start_time(pid)
    if start is not None:
        tags[START_TAG] = start
    return tags


def _alive(pid: int, start: str | None) -> bool:
    if not pid_alive(pid):
        return False
    return start is None or _start_time(pid) in (None, start)


def free_dead_runs(instance: dg.DagsterInstance, echo: Callable[[str], None] = print) -> list[str]:
    """Mark failed every in-progress run of this host whose process is gone, and free its pool
    slots; returns their run ids. Runs without the tags (launched otherwise) are left alone."""
    host = socket.gethostname()
    dead = []
    for run in instance.get_runs(dg.RunsFilter(statuses=list(IN_PROGRESS))):
        if run.tags.get(HOST_TAG) != host or PID_TAG not in run.tags:
            continue
        if _alive(int(run.tags[PID_TAG]), run.tags.get(START_TAG)):
            continue
        pid = run.tags[PID_TAG]
        instance.report_run_failed(
            run, f"the process that ran it (pid {pid} on {host}) is gone; marked failed"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        echo(f"  run {run.run_id[:8]} ({run.job_name}): its process {pid} is gone; marked failed")
        dead.append(run.run_id)
    return dead


def stop_own_runs(instance: dg.DagsterInstance, why: str) -> list[str]:
    """Mark failed the in-progress runs this process executes (after a signal stopped it) and
    free their pool slots; returns their run ids."""
    mine = run_tags()
    stopped = []
    for run in instance.get_runs(dg.RunsFilter(statuses=list(IN_PROGRESS))):
        if all(run.tags.get(k) == v for k, v in mine.items()):
            instance.report_run_failed(run, why)
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            stopped.append(run.run_id)
    return stopped


class Freshness:
    """Whether a step's assets are up to date, in Dagster's staleness terms."""

    def __init__(self, instance: dg.DagsterInstance, defs: dg.Definitions):
        from dagster._core.asset_graph_view.asset_graph_view import (
            AssetGraphView,
            TemporalContext,
        )
        from dagster._core.definitions.data_version import CachingStaleStatusResolver
        from dagster._time import get_current_datetime

        graph = defs.resolve_asset_graph()
        view = AssetGraphView(
            temporal_context=TemporalContext(
                effective_dt=get_current_datetime(), last_event_id=None
            ),
            instance=instance,
            asset_graph=graph,
        )
        self._resolver = CachingStaleStatusResolver(instance, graph, loading_context=view)

    def fresh(self, keys: Sequence[dg.AssetKey], partition: str | None) -> bool:
        from dagster._core.definitions.data_version import StaleStatus

        return all(self._resolver.get_status(k, partition) == StaleStatus.FRESH for k in keys)
