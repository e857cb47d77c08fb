"""The study as software-defined assets. Each asset calls one step of ``recovery_assets.pipeline``
(which calls the core), writes files and tables through the store, and reports metadata/checks."""

import json
import os
import sys
import warnings
from contextlib import contextmanager

import dagster as dg
import numpy as np
from dagster._core.errors import DagsterExecutionInterruptedError

from recovery_assets import pipeline, plots
from recovery_assets.defs.partitions import (
    job_partitions,
    model_partitions,
    size_partitions,
    split_job_key,
)
from recovery_assets.defs.resources import DeviceResource, StorageResource
from recovery_assets.defs.tables import table_metadata
from recovery_assets.defs.versions import code_version
from recovery_assets.errors import StopSignal, input_errors, note_stop
from recovery_assets.study import Study

GPU_POOL = "gpu"
# dagster-dask reads a step's Dask resource requirements from this op tag (a JSON object).
DASK_RESOURCES = "dagster-dask/resource_requirements"
with warnings.catch_warnings():  # the mapping is marked beta in 1.13; it is what we need here
    warnings.simplefilter("ignore", dg.BetaWarning)
    BY_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
    BY_SIZE = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="n_train")


def _plain(value):
    """Metadata values as plain Python (numpy scalars and arrays are not serialisable)."""
    if isinstance(value, dg.MetadataValue):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _finish(
    store, metadata: dict, check_results=None, table: str | None = None, partition=None
) -> dg.MaterializeResult:
    """The step's result; with ``table`` (the asset's name) its table's row counts and columns
    (``defs.tables``), read after the views are rebuilt."""
    store.rebuild_views()
    metadata = _plain(metadata)
    if table is not None:
        metadata = {**metadata, **table_metadata(store, table, partition)}
    return dg.MaterializeResult(metadata=metadata, check_results=check_results or [])


# Set by `recovery study`: the steps' own log lines (what they do, progress with rate and time
# left) also go to its terminal, one readable line each, while Dagster's event log keeps them all.
TERMINAL_ENV = "RECOVERY_TERMINAL_LOG"


def _log(context: dg.AssetExecutionContext):
    """The step's log: the run's event log, and the terminal of `recovery study`."""
    if not os.environ.get(TERMINAL_ENV):
        return context.log.info

    def log(message: str) -> None:
        context.log.info(message)
        print(f"    {message}", file=sys.stdout, flush=True)

    return log


@contextmanager
def _fails_at_once():
    """Bad input and a stop are no transient failures: fail the step at once, without the retry
    policy's retries (the original error stays the cause, for `recovery study`'s one-line report).

    A stop (SIGTERM, SIGINT, a run terminated from the UI) reaches the step as Dagster's
    interrupt, which Dagster would turn into a retry 10 s later: it is recorded
    (``errors.stop_requested``) and fails the step instead."""
    try:
        yield
    except input_errors() as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except (KeyboardInterrupt, DagsterExecutionInterruptedError, StopSignal) as exc:
        note_stop()
        raise dg.Failure(description="stopped by a signal", allow_retries=False) from exc


def _md(df, empty: str) -> dg.MetadataValue:
    """A table as Markdown metadata, or ``empty`` when it has no rows."""
    return dg.MetadataValue.md(df.to_markdown(index=False) if len(df) else empty)


def _check(name: str, passed, metadata: dict, warn: bool = False) -> dg.AssetCheckResult:
    severity = dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(
        check_name=name, passed=bool(passed), metadata=_plain(metadata), severity=severity
    )


# Transient failures of the steps that run networks or fit probes (a killed worker, a device out
# of memory) are retried a bounded number of times.
FIT_RETRIES = dg.RetryPolicy(max_retries=2, delay=10)
# The recovery assets are requested by Dagster's declarative automation (the daemon's automation
# sensor): a partition whose inputs are all present is requested once, not again while it runs
# or after it fails (the retry policy bounds the retries), and again when an input is updated;
# the recovery matrices follow their candidate scores.
AUTOMATION = dg.AutomationCondition.eager()


def gpu_step(study: Study, on_dask: bool) -> dict:
    """How a step that needs the accelerator (feature extraction, probe fitting) is bounded.

    In one process: the instance's ``gpu`` pool (its limit is the number of GPUs). On Dask: the
    workers' resources instead (a pool would serialize the cluster): with ``gpu_resource`` the
    step asks its worker for one ``GPU``, so each GPU runs one such step at a time while CPU-only
    steps go to any worker.
    """
    if not on_dask:
        return {"pool": GPU_POOL}
    if study.gpu_resource:
        return {"op_tags": {DASK_RESOURCES: json.dumps({"GPU": 1})}}
    return {}


def build_assets(study: Study, on_dask: bool = False) -> list[dg.AssetsDefinition]:
    models, sizes, jobs = model_partitions(study), size_partitions(study), job_partitions(study)
    gpu = gpu_step(study, on_dask)
    prefix = study.key_prefix

    def placed(group: str, name: str) -> dict:
        """Where an asset belongs: its study's key prefix and group; its code version (the code
        and the study settings it depends on: ``defs.versions``)."""
        return {
            "group_name": f"{study.slug}_{group}",
            "key_prefix": prefix,
            "code_version": code_version(study, name),
        }

    def key(name: str) -> dg.AssetKey:
        return dg.AssetKey([prefix, name])

    @dg.asset(
        **placed("inputs", "stimuli"),
        kinds={"numpy", "parquet"},
    )
    def stimuli(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        """The concept table in index order and the stimulus images (demo crops or THINGS)."""
        store = storage.store(study)
        return _finish(store, pipeline.build_stimuli(study, store, _log(context)), table="stimuli")

    @dg.asset(
        **placed("inputs", "embeddings"),
        partitions_def=models,
        deps=[stimuli],
        **gpu,
        retry_policy=FIT_RETRIES,
        kinds={"torch"},
    )
    def embeddings(
        context: dg.AssetExecutionContext,
        storage: StorageResource,
        device: DeviceResource,
    ) -> dg.MaterializeResult:
        """n x p features of one model (timm network or precomputed file), parameters and p."""
        store = storage.store(study)
        with _fails_at_once():
            row = pipeline.build_embeddings(
                study, store, context.partition_key, device.torch_device(study), _log(context)
            )
        return _finish(store, row, table="embeddings", partition={"model": context.partition_key})

    # the convention is detected with a reference similarity: pixels, or a model's features
    human_deps = [stimuli] if study.convention_reference == "pixels" else [stimuli, embeddings]

    @dg.asset(
        **placed("inputs", "human_judgements"),
        deps=human_deps,
        check_specs=[
            dg.AssetCheckSpec(
                "convention_unambiguous", asset=key("human_judgements"), blocking=True
            )
        ],
    )
    def human_judgements(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Triplets, answers, splits, noise ceiling, detected convention and checksums."""
        store = storage.store(study)
        info = pipeline.build_human(study, store, _log(context))
        check = _check(
            "convention_unambiguous", info["unambiguous"], {"detection": info["detection"]}
        )
        keys = (
            "source",
            "choice_encoding",
            "convention",
            "noise_ceiling",
            "rows",
            "observer_temperature",
        )
        meta = {k: info[k] for k in keys if k in info}
        return _finish(store, meta, [check], table="human_judgements")

    @dg.asset(
        **placed("generators", "generator_probes"),
        partitions_def=models,
        deps=[embeddings, human_judgements],
        **gpu,
        retry_policy=FIT_RETRIES,
        check_specs=[
            dg.AssetCheckSpec(
                "calibrated_to_noise_ceiling", asset=key("generator_probes"), blocking=True
            )
        ],
    )
    def generator_probes(
        context: dg.AssetExecutionContext,
        storage: StorageResource,
        device: DeviceResource,
    ) -> dg.MaterializeResult:
        """W (CV-chosen lambda), calibrated T, human test accuracy and NLL of one model."""
        store = storage.store(study)
        with _fails_at_once():
            row = pipeline.build_generator(
                study, store, context.partition_key, device.torch_device(study), _log(context)
            )
        gap = abs(row["calibrated_mean_max_probability"] - row["target"])
        check = _check(
            "calibrated_to_noise_ceiling",
            bool(gap <= 1e-4),
            {"abs_gap": gap, "target": row["target"]},
        )
        return _finish(
            store,
            row,
            [check],
            table="generator_probes",
            partition={"model": context.partition_key},
        )

    @dg.asset(
        **placed("recovery", "synthetic_datasets"),
        partitions_def=jobs,
        deps=[
            dg.AssetDep(generator_probes, partition_mapping=BY_MODEL),
            dg.AssetDep(embeddings, partition_mapping=BY_MODEL),
            human_judgements,
        ],
        check_specs=[
            dg.AssetCheckSpec(
                "self_agreement_in_99_interval", asset=key("synthetic_datasets"), blocking=True
            )
        ],
        automation_condition=AUTOMATION,
    )
    def synthetic_datasets(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        """The recipe of generator `model`'s synthetic data at N = `n_train` (all simulations x 3
        folds x train/val/test): concept folds, per split the row count and the SHA-256 of its
        triplets and answers, and the checksums of the generator probe, features and human
        exclusion set it was drawn from. The rows themselves are not stored: candidate_scores
        regenerates them from the seeds and verifies them against these checksums."""
        store = storage.store(study)
        model, n_train = split_job_key(context.partition_key)
        info = pipeline.build_synthetic(study, store, model, n_train, _log(context))
        check = _check("self_agreement_in_99_interval", bool(abs(info["z"]) <= 2.576), info)
        meta = {**info, "recipe": dg.MetadataValue.path(str(store.synthetic_path(model, n_train)))}
        part = {"model": model, "n_train": n_train}
        return _finish(store, meta, [check], table="synthetic_datasets", partition=part)

    @dg.asset(
        **placed("recovery", "candidate_scores"),
        partitions_def=jobs,
        deps=[
            synthetic_datasets,
            dg.AssetDep(embeddings, partition_mapping=dg.AllPartitionMapping()),
        ],
        **gpu,
        retry_policy=FIT_RETRIES,
        automation_condition=AUTOMATION,
        check_specs=[dg.AssetCheckSpec("fits_converged", asset=key("candidate_scores"))],
    )
    def candidate_scores(
        context: dg.AssetExecutionContext,
        storage: StorageResource,
        device: DeviceResource,
    ) -> dg.MaterializeResult:
        """Every candidate x lambda x fold x simulation; selected lambda, score, rank, winner."""
        store = storage.store(study)
        model, n_train = split_job_key(context.partition_key)
        with _fails_at_once():
            info = pipeline.build_scores(
                study, store, model, n_train, device.torch_device(study), _log(context)
            )
        check = _check(  # a warning: fits stopped at max_iter are flagged, not fatal
            "fits_converged",
            info["not_converged"] == 0,
            {"not_converged": info["not_converged"], "fits": info["n_fits"]},
            warn=True,
        )
        part = {"model": model, "n_train": n_train}
        return _finish(store, info, [check], table="candidate_scores", partition=part)

    @dg.asset(
        **placed("recovery", "recovery_matrix"),
        partitions_def=sizes,
        deps=[dg.AssetDep(candidate_scores, partition_mapping=BY_SIZE)],
        automation_condition=AUTOMATION,
        check_specs=[dg.AssetCheckSpec("rows_sum_to_simulations", asset=key("recovery_matrix"))],
    )
    def recovery_matrix(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Confusion counts, recovery accuracy with 95% CI, ranks, MRR, precision/recall."""
        s = study
        store = storage.store(s)
        n_train = int(context.partition_key)
        res = pipeline.build_recovery(s, store, n_train)
        m = res["accuracy"]
        rows = m.confusion.sum(axis=1)
        png = plots.confusion_heatmap(
            m.confusion.stack().rename("count").reset_index(),
            s.model_names,
            f"N = {n_train}: recovery {m.accuracy:.2f} [{m.ci_low:.2f}, {m.ci_high:.2f}]",
            store.plot_path(f"confusion_n{n_train}.png"),
        )
        check = _check(
            "rows_sum_to_simulations",
            bool((rows == s.simulations).all()),
            {"row_sums": {k: int(v) for k, v in rows.items()}},
        )
        meta = {
            "recovery_accuracy": m.accuracy,
            "ci_95": [m.ci_low, m.ci_high],
            "recovery_accuracy_by_nll": res["nll"].accuracy,
            "mrr": m.mrr,
            "plot": dg.MetadataValue.path(str(png)),
            "confusion": dg.MetadataValue.md(plots.markdown_image(png, "confusion matrix")),
        }
        return _finish(
            store, meta, [check], table="recovery_matrix", partition={"n_train": n_train}
        )

    @dg.asset(
        **placed("summary", "model_properties"),
        deps=[embeddings, generator_probes],
    )
    def model_properties(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Params, dimension, effective dimensionality before/after, alignment-induced shift."""
        store = storage.store(study)
        df = pipeline.build_properties(study, store, _log(context))
        meta = {"table": dg.MetadataValue.md(df.to_markdown(index=False))}
        return _finish(store, meta, table="model_properties")

    @dg.asset(
        **placed("summary", "recovery_curve"),
        deps=[recovery_matrix, generator_probes],
    )
    def recovery_curve(storage: StorageResource) -> dg.MaterializeResult:
        """Recovery accuracy vs training size (plot and table); human accuracy vs recovery."""
        s = study
        store = storage.store(s)
        summary = store.read_table("recovery_summary")
        curve = plots.recovery_curve(summary, store.plot_path("recovery_curve.png"))
        per = store.read_table("recovery_per_model", {"n_train": s.largest_size})
        per = per[per["criterion"] == "accuracy"]
        gen = store.read_table("generator_probes")[["model", "human_test_accuracy"]]
        scatter = plots.human_vs_recovery(
            per.merge(gen, on="model"), store.plot_path("human_vs_recovery.png")
        )
        acc = summary[summary["criterion"] == "accuracy"].sort_values("n_train")
        meta = {
            "curve": dg.MetadataValue.md(
                acc[["n_train", "accuracy", "ci_low", "ci_high"]].to_markdown(index=False)
            ),
            "recovery_curve": dg.MetadataValue.md(plots.markdown_image(curve, "recovery curve")),
            "human_vs_recovery": dg.MetadataValue.md(
                plots.markdown_image(scatter, "human accuracy vs recovery")
            ),
        }
        return _finish(store, meta)

    @dg.asset(
        **placed("summary", "misidentification_regression"),
        deps=[candidate_scores, model_properties],
    )
    def misidentification_regression(storage: StorageResource) -> dg.MaterializeResult:
        """§8 coefficients, bootstrap CIs, Bonferroni p values and VIFs at the largest N."""
        store = storage.store(study)
        coefs, meta = pipeline.build_regression(study, store)
        cols = ["term", "coef", "ci_low", "ci_high", "p_bonferroni", "vif"]
        return _finish(
            store,
            {
                "coefficients": dg.MetadataValue.md(coefs[cols].to_markdown(index=False)),
                **{k: (float(v) if isinstance(v, np.floating) else v) for k, v in meta.items()},
            },
            table="misidentification_regression",
        )

    @dg.asset(
        **placed("summary", "identifiability"),
        deps=[recovery_matrix, generator_probes],
        kinds={"parquet"},
    )
    def identifiability(storage: StorageResource) -> dg.MaterializeResult:
        """What a win means (docs/analyses.md §1): P(true model | winner) with 95% intervals at
        every N; applied to the winner on the human data (best generator probe)."""
        store = storage.store(study)
        res = pipeline.build_identifiability(study, store)
        human, n, table = res["human"], study.largest_size, res["table"]
        png = plots.identifiability_heatmap(
            table[(table["n_train"] == n) & (table["criterion"] == "accuracy")],
            study.model_names,
            f"N = {n}, selected by accuracy: P(generator | winner)",
            store.plot_path("identifiability.png"),
            human=human.winner,
        )
        per_n = human.true_model_posterior()[["n_train", "posterior", "ci_low", "ci_high"]]
        largest = human.at_largest[["generator", "n_wins", "posterior", "ci_low", "ci_high"]]
        meta = {
            **res["summary"],
            "p_true_given_human_win_per_n": _md(per_n, "(it never won: no posterior)"),
            "posterior_at_largest_n": _md(largest, "(it never won at this N: no posterior)"),
            "heatmap": dg.MetadataValue.md(plots.markdown_image(png, "P(generator | winner)")),
        }
        return _finish(store, meta, table="identifiability")

    @dg.asset(
        **placed("summary", "open_set_recovery"),
        deps=[candidate_scores, embeddings, generator_probes],
        kinds={"parquet"},
    )
    def open_set_recovery(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Open-set recovery (docs/analyses.md §2): who wins each generator's data when it is not
        a candidate, and is that its nearest neighbour in the human-fitted geometry?"""
        store = storage.store(study)
        res = pipeline.build_open_set(study, store, _log(context))
        n, nearest = study.largest_size, res["nearest"]
        w, summary = res["winners"], res["summary"]
        w = w[(w["n_train"] == n) & (w["criterion"] == "accuracy")]
        png = plots.open_set_heatmap(
            w,
            study.model_names,
            dict(zip(nearest["model"], nearest["nearest"], strict=True)),
            f"N = {n}, selected by accuracy: open-set winners",
            store.plot_path("open_set.png"),
        )
        at = summary[(summary["n_train"] == n) & (summary["criterion"] == "accuracy")]
        meta = {
            "largest_n": n,
            "frac_to_nearest_at_largest_n": float(at["n_to_nearest"].sum() / at["n_jobs"].sum()),
            "nearest_neighbours": dg.MetadataValue.md(nearest.to_markdown(index=False)),
            "summary_at_largest_n": dg.MetadataValue.md(
                at.drop(columns=["n_train", "criterion"]).to_markdown(index=False)
            ),
            "heatmap": dg.MetadataValue.md(plots.markdown_image(png, "open-set winners")),
        }
        return _finish(store, meta, table="open_set_recovery")

    return [
        stimuli,
        embeddings,
        human_judgements,
        generator_probes,
        synthetic_datasets,
        candidate_scores,
        recovery_matrix,
        model_properties,
        recovery_curve,
        misidentification_regression,
        identifiability,
        open_set_recovery,
    ]
