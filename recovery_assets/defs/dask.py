"""dagster-dask's executor, with task keys that are unique per run.

dagster-dask submits each step as a Dask task keyed ``<job name>.<step key>``. Dask treats tasks
with equal keys as the same computation, so two concurrent runs of one job (two partitions of the
recovery jobs, say) would share one task: the second run would silently receive the first run's
events and never execute its own step. This executor keys each task by run as well
(``<job name>.<run id>.<step key>``); everything else (the cluster kinds and their config, the
``dagster-dask/resource_requirements`` op tag, the worker-side execution) is dagster-dask's own.
"""

from __future__ import annotations

import importlib

import dask.distributed
from dagster import multiple_process_executor_requirements
from dagster._core.definitions.executor_definition import executor
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent
from dagster._utils import iterate_with_context
from dagster_dask.executor import (
    DaskExecutor,
    dask_executor,
    get_dask_resource_requirements,
    query_on_dask_worker,
)

# cluster kind -> the class that starts it (dask-jobqueue for the batch schedulers)
_CLUSTERS = {
    "local": "distributed.LocalCluster",
    "slurm": "dask_jobqueue.SLURMCluster",
    "pbs": "dask_jobqueue.PBSCluster",
    "sge": "dask_jobqueue.SGECluster",
    "lsf": "dask_jobqueue.LSFCluster",
}


class RunScopedDaskExecutor(DaskExecutor):
    def _cluster(self, job_name: str):
        if self.cluster_type == "existing":
            return self.cluster_configuration["address"]
        if self.cluster_type not in _CLUSTERS:
            raise ValueError(
                f"Dask cluster kind {self.cluster_type!r} is not supported here; use one of "
                f"{['existing', *_CLUSTERS]}"
            )
        module, name = _CLUSTERS[self.cluster_type].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**self.build_dict(job_name))

    def execute(self, plan_context, execution_plan):
        if not plan_context.instance.is_persistent:
            raise ValueError("Dask execution needs a persistent Dagster instance ($DAGSTER_HOME)")
        job_name, run_id = plan_context.job_name, plan_context.run_id
        cluster = self._cluster(job_name)
        with dask.distributed.Client(cluster) as client:
            futures, by_step = [], {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    dependencies = [
                        by_step[key] for inp in step.step_inputs for key in inp.dependency_keys
                    ]
                    future = client.submit(
                        query_on_dask_worker,
                        dependencies,
                        plan_context.reconstructable_job,
                        plan_context.dagster_run,
                        plan_context.run_config,
                        [step.key],
                        plan_context.instance.get_ref(),
                        execution_plan.known_state,
                        key=f"{job_name}.{run_id}.{step.key}",
                        resources=get_dask_resource_requirements(step.tags),
                    )
                    futures.append(future)
                    by_step[step.key] = future
            done = dask.distributed.as_completed(futures, with_results=True)
            for _, events in iterate_with_context(raise_execution_interrupts, done):
                for event in events:
                    if not isinstance(event, DagsterEvent):
                        raise TypeError(f"a Dask worker returned {type(event).__name__}")
                    yield event


@executor(
    name="dask",
    config_schema=dask_executor.config_schema,
    requirements=multiple_process_executor_requirements(),
)
def run_scoped_dask_executor(init_context):
    """dagster-dask's executor (same config), with task keys unique per run."""
    ((kind, config),) = init_context.executor_config["cluster"].items()
    return RunScopedDaskExecutor(kind, config)
