"""Jobs (one per partitioning of the graph, in study order) and their executor.

What is requested on its own is declared on the assets themselves (``defs.assets.AUTOMATION``:
Dagster's declarative automation, evaluated by the daemon's automation sensor), not here.
"""

import dagster as dg

from recovery_assets.study import Study

# (job name, asset keys, partitioning) in the order the study runs them. The human judgements come
# after the embeddings: a model's zero-shot features may be the convention reference.
STAGES = (
    ("stimuli_job", ["stimuli"], None),
    ("embeddings_job", ["embeddings"], "model"),
    ("human_job", ["human_judgements"], None),
    ("generators_job", ["generator_probes"], "model"),
    ("recovery_jobs_job", ["synthetic_datasets", "candidate_scores"], "job"),
    ("recovery_matrix_job", ["recovery_matrix"], "n_train"),
    (
        "summary_job",
        [
            "model_properties",
            "recovery_curve",
            "misidentification_regression",
            "identifiability",
            "open_set_recovery",
        ],
        None,
    ),
)


def job_name(study: Study, stage: str) -> str:
    """A stage's job name in a code location that may hold several studies."""
    return f"{study.slug}__{stage}"


def asset_keys(study: Study, names: list[str]) -> list[dg.AssetKey]:
    return [dg.AssetKey([study.key_prefix, n]) for n in names]


def build_executor(study: Study, dask: dict | None = None) -> dg.ExecutorDefinition:
    """The executor of the study's runs: in one process, or dagster-dask's with ``dask`` (its
    config: ``{"cluster": {"existing": {"address": ...}}}``, ``{"cluster": {"local": {...}}}``
    ...), by default the study's own (``Study.dask_config``)."""
    config = dask or study.dask_config()
    if config is None:
        return dg.in_process_executor
    from recovery_assets.defs.dask import run_scoped_dask_executor

    return run_scoped_dask_executor.configured(config, name="dask")


def build_jobs(study: Study, executor: dg.ExecutorDefinition | None = None) -> dict:
    """The study's stage jobs, by stage name (the job itself is named ``<study>__<stage>``)."""
    jobs = {}
    for name, keys, _ in STAGES:
        jobs[name] = dg.define_asset_job(
            job_name(study, name),
            selection=dg.AssetSelection.assets(*asset_keys(study, keys)),
            executor_def=executor or dg.in_process_executor,
            tags={"study": study.name},
            description=f"study {study.name}: materialize {', '.join(keys)}",
        )
    return jobs
