"""The catch-up schedule requests exactly the (model, N) partitions that are missing and ready."""

from __future__ import annotations

import dagster as dg

from recovery_assets.defs import build_definitions
from recovery_assets.defs.partitions import job_key
from recovery_assets.study import load_study


def _evaluate(defs, instance):
    repo = defs.get_repository_def()
    schedule = repo.get_schedule_def("tiny__catch_up_recovery_jobs")
    context = dg.build_schedule_context(instance=instance, repository_def=repo)
    return schedule, schedule.evaluate_tick(context)


def test_schedule_requests_missing_partitions_whose_generator_is_ready(tiny_run):
    study = load_study(tiny_run.study_path)
    defs = build_definitions(study)
    with dg.instance_for_test() as instance:
        # nothing materialized: nothing is ready, so the schedule skips
        _, result = _evaluate(defs, instance)
        assert not result.run_requests and result.skip_message
        # one generator probe exists, and one of its jobs is already done
        m = study.model_names[1]
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=["tiny", "generator_probes"], partition=m)
        )
        done = str(job_key(m, study.sizes[0]))
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=["tiny", "candidate_scores"], partition=done)
        )
        schedule, result = _evaluate(defs, instance)
        keys = sorted(r.partition_key for r in result.run_requests)
        assert keys == sorted(str(job_key(m, n)) for n in study.sizes[1:])
        assert schedule.job_name == "tiny__recovery_jobs_job"


def test_schedule_skips_when_everything_is_materialized(tiny_run):
    study = load_study(tiny_run.study_path)
    defs = build_definitions(study)
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        _, result = _evaluate(defs, instance)
    assert not result.run_requests
    assert "done" in result.skip_message
