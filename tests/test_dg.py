"""Dagster's conventions: the `dg` command line loads the project (``[tool.dg]`` in
pyproject.toml, the ``@dg.definitions`` entry point), and the table assets report Dagster's table
metadata (row counts, column schema)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DG = BIN / "dg"


@pytest.fixture(scope="module")
def dg_env(tmp_path_factory) -> dict[str, str]:
    """The environment of `dg` run from the repository root with the venv active: a fresh
    DAGSTER_HOME without telemetry, the shipped demo study, nothing downloaded."""
    home = tmp_path_factory.mktemp("dg_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERY_")}
    env.update(
        DAGSTER_HOME=str(home),
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(BIN.parent),
        RECOVERY_DATA=str(tmp_path_factory.mktemp("dg_data")),
    )
    return env


def _dg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    if not DG.exists():
        pytest.fail(f"{DG} is missing: install the dev extras (pip install -e '.[dev]')")
    return subprocess.run(
        [str(DG), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_dg_check_defs_loads_the_project(dg_env):
    res = _dg(dg_env, "check", "defs")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "All definitions loaded successfully" in res.stdout + res.stderr


def test_dg_list_defs_lists_the_studys_assets_and_jobs(dg_env):
    res = _dg(dg_env, "list", "defs", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    listed = json.loads(res.stdout)
    keys = {a["asset_key"] for a in listed["assets"]}
    assert {"demo/stimuli", "demo/embeddings", "demo/recovery_matrix"} <= keys
    assert "demo__stimuli_job" in {j["name"] for j in listed["jobs"]}
    assert {"device", "storage"} <= {r["name"] for r in listed["resources"]}


def test_importing_the_entry_point_builds_nothing():
    """The loaders call the ``@dg.definitions`` function; the module itself builds nothing."""
    from recovery_assets import definitions

    loaded = definitions.defs()
    assert isinstance(loaded, dg.Definitions)
    assert not any(isinstance(v, dg.Definitions) for v in vars(definitions).values())


# ----------------------------------------------------------------------------- table metadata
def _sql(data: Path, query: str) -> list[tuple]:
    con = duckdb.connect(str(data / "recovery.duckdb"), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def _latest(tiny_run, asset: str, partition: str | None = None) -> dict:
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", asset]))
        if partition is not None:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey(["tiny", asset]), asset_partitions=[partition]
                ),
                limit=1,
            ).records
            event = records[0].event_log_entry
    assert event is not None and event.asset_materialization is not None, asset
    return event.asset_materialization.metadata


@pytest.mark.parametrize(
    "asset, table", [("stimuli", "stimuli"), ("model_properties", "model_properties")]
)
def test_a_table_assets_materialization_has_its_row_count_and_columns(tiny_run, asset, table):
    meta = _latest(tiny_run, asset)
    rows = _sql(tiny_run.data, f"SELECT count(*) FROM {table}")[0][0]
    assert rows > 0 and meta["dagster/row_count"].value == rows
    assert "dagster/partition_row_count" not in meta
    columns = [(c[0], c[1]) for c in _sql(tiny_run.data, f"DESCRIBE {table}")]
    schema = meta["dagster/column_schema"].value
    assert [(c.name, c.type) for c in schema.columns] == columns
    assert table in meta["duckdb_view"].value


def test_a_partitioned_table_asset_counts_its_partition_and_the_table(tiny_run, study_models):
    model, n_train = study_models[0], 50
    key = f"{model}|{n_train}"
    meta = _latest(tiny_run, "candidate_scores", key)
    where = f"WHERE generator = '{model}' AND n_train = {n_train}"
    part = _sql(tiny_run.data, f"SELECT count(*) FROM candidate_fits {where}")[0][0]
    total = _sql(tiny_run.data, "SELECT count(*) FROM candidate_fits")[0][0]
    assert part > 0 and meta["dagster/partition_row_count"].value == part
    # the table as it was when the partition was written: the partitions done by then
    assert part <= meta["dagster/row_count"].value <= total
    columns = [c[0] for c in _sql(tiny_run.data, "DESCRIBE candidate_fits")]
    assert [c.name for c in meta["dagster/column_schema"].value.columns] == columns


@pytest.fixture(scope="module")
def study_models(tiny_run) -> list[str]:
    from recovery_assets.study import load_study

    return load_study(tiny_run.study_path).model_names
