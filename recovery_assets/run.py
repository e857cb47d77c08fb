"""Materialize a whole study in order, in-process, into a persistent Dagster instance.

`make demo` uses this: every step is a recorded Dagster run (visible in `make ui`), partition by
partition, with the in-process executor (one Python process: torch is imported once).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import dagster as dg

from recovery_assets.defs import build_definitions
from recovery_assets.defs.partitions import job_key
from recovery_assets.storage import Store, data_root
from recovery_assets.study import Study


def materialize_study(
    study: Study,
    instance: dg.DagsterInstance,
    echo: Callable[[str], None] = print,
    storage_root: str | None = None,
    log_level: str = "INFO",
) -> Store:
    defs = build_definitions(study)
    assets = list(defs.assets)
    resources = dict(defs.resources)
    if storage_root:
        from recovery_assets.defs.resources import StorageResource

        resources["storage"] = StorageResource(root=storage_root)
    t0 = time.perf_counter()

    def step(selection: list[str], partition_key=None) -> None:
        label = ", ".join(selection) + (f" [{partition_key}]" if partition_key else "")
        t = time.perf_counter()
        dg.materialize(
            assets,
            selection=selection,
            partition_key=partition_key,
            instance=instance,
            resources=resources,
            tags={"study": study.name},
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
    step(["model_properties", "recovery_curve", "misidentification_regression"])
    return Store(storage_root or data_root(study))
