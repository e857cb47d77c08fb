"""Declarative automation of the recovery assets: a partition whose inputs are all present is
requested once (not again on the next evaluation), and the recovery matrix of a size follows when
the candidate scores of every generator at that size exist. Also the retry policy, blocking
checks and the warning check that the definitions declare."""

from __future__ import annotations

import dagster as dg

from recovery_assets.defs import build_definitions
from recovery_assets.defs.partitions import job_key
from recovery_assets.study import load_study


def _report(instance, study, asset: str, partitions=(None,)) -> None:
    for p in partitions:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=[study.name, asset], partition=p)
        )


def _requested(result, study, asset: str) -> set:
    key = dg.AssetKey([study.name, asset])
    return {
        str(p)
        for r in result.results
        if r.key == key
        for p in (r.true_subset.expensively_compute_partition_keys() if r.true_subset else [])
    }


def test_partitions_are_requested_once_when_their_inputs_are_ready(tiny_run):
    study = load_study(tiny_run.study_path)
    defs = build_definitions(study)
    m = study.model_names[1]
    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert result.total_requested == 0  # nothing is ready

        _report(instance, study, "human_judgements")
        _report(instance, study, "embeddings", study.model_names)
        _report(instance, study, "generator_probes", [m])
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=result.cursor
        )
        jobs_of_m = {str(job_key(m, n)) for n in study.sizes}
        assert _requested(result, study, "synthetic_datasets") == jobs_of_m
        # requested with their synthetic data (one run each: the recovery job)
        assert _requested(result, study, "candidate_scores") == jobs_of_m
        assert _requested(result, study, "recovery_matrix") == set()  # other generators missing

        # the next evaluation does not request them again (they are in flight or handled)
        again = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=result.cursor
        )
        assert _requested(again, study, "synthetic_datasets") == set()

        # every generator's candidate scores at the smallest size: its recovery matrix follows
        n = study.sizes[0]
        keys = [str(job_key(g, n)) for g in study.model_names]
        _report(instance, study, "synthetic_datasets", keys)
        _report(instance, study, "candidate_scores", keys)
        later = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=again.cursor)
        assert _requested(later, study, "recovery_matrix") == {str(n)}


def test_fitting_steps_retry_and_checks_block(tiny_run):
    study = load_study(tiny_run.study_path)
    defs = build_definitions(study)
    graph = defs.resolve_asset_graph()
    job = defs.resolve_job_def("tiny__recovery_jobs_job")
    policies = {node.name: node.retry_policy for node in job.graph.node_defs}
    assert policies["tiny__candidate_scores"].max_retries == 2
    assert policies["tiny__synthetic_datasets"] is None  # not a fitting step
    specs = {
        (s.asset_key.path[-1], s.name): s
        for a in defs.assets
        for s in a.check_specs
    }  # fmt: skip
    assert specs[("human_judgements", "convention_unambiguous")].blocking
    assert specs[("generator_probes", "calibrated_to_noise_ceiling")].blocking
    assert specs[("synthetic_datasets", "self_agreement_in_99_interval")].blocking
    assert not specs[("candidate_scores", "fits_converged")].blocking
    for name in ("synthetic_datasets", "candidate_scores", "recovery_matrix"):
        assert graph.get(dg.AssetKey(["tiny", name])).automation_condition is not None
    assert graph.get(dg.AssetKey(["tiny", "stimuli"])).automation_condition is None


def test_the_tiny_run_recorded_the_warning_check(tiny_run):
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(["tiny", "candidate_scores"]), "fits_converged"),
            limit=100,
        )
    assert len(records) == 6  # one per (model, N) partition
    for rec in records:
        evaluation = rec.event.dagster_event.event_specific_data
        assert evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.passed == (evaluation.metadata["not_converged"].value == 0)
