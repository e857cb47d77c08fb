"""The whole study graph on the tiny study: materialization, checks, tables, reproducibility,
re-materialization and concurrent runs (each test asserts something that can fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from recovery_assets.defs import build_definitions
from recovery_assets.defs.partitions import job_key
from recovery_assets.defs.resources import StorageResource
from recovery_assets.storage import Store
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
ASSETS = [
    "stimuli",
    "embeddings",
    "human_judgements",
    "generator_probes",
    "synthetic_datasets",
    "candidate_scores",
    "recovery_matrix",
    "model_properties",
    "recovery_curve",
    "misidentification_regression",
]
CHECKS = {
    "human_judgements": ["convention_unambiguous"],
    "generator_probes": ["calibrated_to_noise_ceiling"],
    "synthetic_datasets": ["self_agreement_in_99_interval"],
    "recovery_matrix": ["rows_sum_to_simulations"],
}


@pytest.fixture(scope="module")
def study(tiny_run):
    return load_study(tiny_run.study_path)


def _sql(data: Path, query: str) -> pd.DataFrame:
    con = duckdb.connect(str(data / "recovery.duckdb"), read_only=True)
    try:
        return con.execute(query).fetchdf()
    finally:
        con.close()


def test_every_asset_and_partition_materialized(tiny_run, study):
    expected = {
        "embeddings": set(study.model_names),
        "generator_probes": set(study.model_names),
        "recovery_matrix": {str(n) for n in study.sizes},
        "synthetic_datasets": {str(job_key(m, n)) for m in study.model_names for n in study.sizes},
    }
    expected["candidate_scores"] = expected["synthetic_datasets"]
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        for key in ASSETS:
            assert (
                instance.get_latest_materialization_event(dg.AssetKey(["tiny", key])) is not None
            ), key
            if key in expected:
                got = instance.get_materialized_partitions(dg.AssetKey(["tiny", key]))
                assert got == expected[key], key


def test_every_check_ran_and_passed(tiny_run):
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        )
        seen: dict[tuple[str, str], list[bool]] = {}
        for rec in records:
            ev = rec.event_log_entry.dagster_event.event_specific_data
            seen.setdefault((ev.asset_key.path[-1], ev.check_name), []).append(bool(ev.passed))
    for asset, names in CHECKS.items():
        for name in names:
            assert (asset, name) in seen, (asset, name)
            assert all(seen[(asset, name)]), (asset, name, seen[(asset, name)])


def test_duckdb_tables_have_the_expected_rows(tiny_run, study):
    M, S, L = len(study.models), len(study.sizes), len(study.candidate_lambdas)
    sims = study.simulations
    counts = {
        "stimuli": 36,
        "embeddings": M,
        "generator_probes": M,
        "synthetic_datasets": M * S * sims * 3 * 3,
        "candidate_fits": M * S * sims * M * L * 3,
        "candidate_selection": M * S * sims * M * 2,
        "recovery_summary": S * 2,
        "recovery_confusion": S * 2 * M * M,
        "model_properties": M,
    }
    for table, n in counts.items():
        got = int(_sql(tiny_run.data, f"SELECT count(*) AS n FROM {table}")["n"][0])
        assert got == n, (table, got, n)


def test_confusion_rows_sum_to_simulations(tiny_run, study):
    df = _sql(
        tiny_run.data,
        "SELECT n_train, criterion, generator, sum(count) AS n FROM recovery_confusion "
        "GROUP BY ALL",
    )
    assert len(df) == len(study.sizes) * 2 * len(study.models)
    assert (df["n"] == study.simulations).all()


def test_generators_are_calibrated_and_human_data_detected(tiny_run):
    gen = _sql(tiny_run.data, "SELECT * FROM generator_probes")
    assert np.allclose(gen["calibrated_mean_max_probability"], gen["target"], atol=1e-6)
    human = _sql(tiny_run.data, "SELECT * FROM human_judgements")
    assert set(human["file"]) == {"trainset", "validationset", "testset1", "testset2", "testset3"}
    assert (human["convention"] == "pair_pair_odd").all()
    assert human.loc[human["file"] == "trainset", "detected"].item() == "pair_pair_odd"


def test_sql_recipes_run(tiny_run):
    for sql in sorted((ROOT / "sql").glob("*.sql")):
        df = _sql(tiny_run.data, sql.read_text())
        assert len(df.columns) > 0, sql.name
    curve = _sql(tiny_run.data, (ROOT / "sql" / "recovery_curve.sql").read_text())
    assert curve["n_train"].tolist() == [50, 100]
    assert ((curve["ci_low"] <= curve["accuracy"]) & (curve["accuracy"] <= curve["ci_high"])).all()


def test_plots_written(tiny_run, study):
    plots = tiny_run.data / "plots"
    names = {p.name for p in plots.glob("*.png")}
    want = {"recovery_curve.png", "human_vs_recovery.png"}
    want |= {f"confusion_n{n}.png" for n in study.sizes}
    assert want <= names
    for name in want:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rematerialize(study, data: Path, selection: list[str], partition: str) -> None:
    defs = build_definitions(study)
    resources = {**defs.resources, "storage": StorageResource(root=str(data.parent))}
    with dg.instance_for_test() as instance:
        dg.materialize(
            list(defs.assets),
            selection=[dg.AssetKey([study.name, s]) for s in selection],
            partition_key=partition,
            instance=instance,
            resources=resources,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )


def test_rematerializing_reproduces_and_replaces(tiny_run, study):
    store = Store(tiny_run.data)
    m, n = study.model_names[1], study.sizes[0]
    before_arrays, _ = store.load_arrays(store.synthetic_path(m, n), "synthetic")
    part = {"model": m, "n_train": n}
    before_fits = store.read_table("candidate_fits", part)
    before_conf = store.read_table("recovery_confusion", {"n_train": n})
    total = int(_sql(tiny_run.data, "SELECT count(*) AS n FROM candidate_fits")["n"][0])

    _rematerialize(
        study, tiny_run.data, ["synthetic_datasets", "candidate_scores"], str(job_key(m, n))
    )
    _rematerialize(study, tiny_run.data, ["recovery_matrix"], str(n))

    after_arrays, _ = store.load_arrays(store.synthetic_path(m, n), "synthetic")
    assert before_arrays.keys() == after_arrays.keys()
    for k in before_arrays:
        assert np.array_equal(before_arrays[k], after_arrays[k]), k
    pd.testing.assert_frame_equal(before_fits, store.read_table("candidate_fits", part))
    pd.testing.assert_frame_equal(
        before_conf, store.read_table("recovery_confusion", {"n_train": n})
    )
    # the partition's rows were replaced, not appended
    assert int(_sql(tiny_run.data, "SELECT count(*) AS n FROM candidate_fits")["n"][0]) == total


def test_two_concurrent_partition_runs_both_land(tiny_run, study):
    """Two `dagster asset materialize` processes on different partitions at the same time."""
    keys = [
        str(job_key(study.model_names[0], study.sizes[1])),
        str(job_key(study.model_names[2], study.sizes[1])),
    ]
    env = tiny_run.env()
    total = int(_sql(tiny_run.data, "SELECT count(*) AS n FROM candidate_fits")["n"][0])
    dagster = Path(sys.executable).parent / "dagster"
    procs = [
        subprocess.Popen(
            [
                str(dagster),
                "asset",
                "materialize",
                "-m",
                "recovery_assets.definitions",
                "--select",
                "tiny/synthetic_datasets,tiny/candidate_scores",
                "--partition",
                key,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key in keys
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    df = _sql(
        tiny_run.data,
        "SELECT generator, n_train, count(*) AS n FROM candidate_fits GROUP BY ALL",
    )
    per = len(study.models) * len(study.candidate_lambdas) * 3 * study.simulations
    assert (df["n"] == per).all()
    assert len(df) == len(study.models) * len(study.sizes)
    assert int(df["n"].sum()) == total
