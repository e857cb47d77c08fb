"""The Dagster layer: definitions built from the study file ($RECOVERY_STUDY)."""

from __future__ import annotations

import dagster as dg

from recovery_assets.defs.assets import build_assets
from recovery_assets.defs.automation import build_jobs, build_schedule
from recovery_assets.defs.resources import DeviceResource, StorageResource, StudyResource
from recovery_assets.study import Study, load_study


def build_definitions(study: Study | None = None) -> dg.Definitions:
    study = study or load_study()
    jobs = build_jobs(study)
    return dg.Definitions(
        assets=build_assets(study),
        jobs=list(jobs.values()),
        schedules=[build_schedule(study, jobs["recovery_jobs_job"])],
        resources={
            "study": StudyResource(path=str(study.path)),
            "device": DeviceResource(device=study.device),
            "storage": StorageResource(),
        },
    )
