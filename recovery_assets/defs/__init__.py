"""The Dagster layer: definitions built from one or several study files ($RECOVERY_STUDY).

Every study's assets carry its name as their key prefix (``demo/stimuli``, ``things/stimuli``),
its jobs its name as a prefix, and its runs a ``study`` tag, so any number of studies
share one instance (and one UI) without sharing materialization state. A study's runs execute in
one process or on Dask (the study's ``execution`` settings, or ``$RECOVERY_DASK_SCHEDULER`` for
the whole instance), the same for the UI, backfills, automation and ``recovery study``.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from recovery_assets.defs.assets import build_assets
from recovery_assets.defs.automation import build_executor, build_jobs
from recovery_assets.defs.resources import DeviceResource, StorageResource
from recovery_assets.study import Study, StudyError, load_study, study_paths


def build_definitions(
    studies: Study | Sequence[Study] | None = None, dask: dict | None = None
) -> dg.Definitions:
    """Definitions of every study; ``dask`` (dagster-dask's executor config) puts them all on
    Dask whatever their own settings."""
    if studies is None:
        studies = [load_study(p) for p in study_paths()]
    elif isinstance(studies, Study):
        studies = [studies]
    names = [s.name for s in studies]
    slugs = [s.slug for s in studies]
    if len(set(slugs)) != len(slugs):
        raise StudyError(f"studies in one code location need distinct names, got {names}")
    assets, jobs, executors = [], [], []
    for study in studies:
        executor = build_executor(study, dask)
        executors.append((dask or study.dask_config(), executor))
        study_jobs = build_jobs(study, executor)
        assets += build_assets(study, on_dask=executor is not dg.in_process_executor)
        jobs += list(study_jobs.values())
    # runs launched from the asset graph (not a study job) use the studies' executor when they
    # all agree, else one process
    configs = {repr(c) for c, _ in executors}
    default = executors[0][1] if len(configs) == 1 else dg.in_process_executor
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        resources={"device": DeviceResource(), "storage": StorageResource()},
        executor=default,
    )
