"""Static partitions built from the study file."""

from __future__ import annotations

import dagster as dg

from recovery_assets.study import Study


def model_partitions(study: Study) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(study.model_names)


def size_partitions(study: Study) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(n) for n in study.sizes])


def job_partitions(study: Study) -> dg.MultiPartitionsDefinition:
    """(generator model) x (training size). Key strings list the dimensions in alphabetical order
    of dimension name ("model", "n_train"): 'resnet18|400'. Build them with ``job_key``."""
    return dg.MultiPartitionsDefinition(
        {"model": model_partitions(study), "n_train": size_partitions(study)}
    )


def job_key(model: str, n_train: int) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"model": model, "n_train": str(n_train)})


def split_job_key(key) -> tuple[str, int]:
    dims = key.keys_by_dimension
    return dims["model"], int(dims["n_train"])
