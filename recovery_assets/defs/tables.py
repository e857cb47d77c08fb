"""Dagster's table metadata for the assets that write a table (a DuckDB view in the study's
``recovery.duckdb``): row counts and the column schema, as the views show them.

Each such asset reports one table, its own (``TABLES``); an asset that writes several (the human
judgements' per-file summary and canonical triplets, the recovery matrix's summary, confusion and
per-model tables ...) reports the one it is named for, or its main one. The counts and the schema
are read with DuckDB from the table's Parquet files, exactly as the view reads them (the database
file itself is not opened: a user's DuckDB session may hold it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import duckdb

from recovery_assets.storage import Store

# asset -> the table (DuckDB view) that holds its rows
TABLES = {
    "stimuli": "stimuli",
    "embeddings": "embeddings",
    "human_judgements": "human_judgements",
    "generator_probes": "generator_probes",
    "synthetic_datasets": "synthetic_datasets",
    "candidate_scores": "candidate_fits",
    "recovery_matrix": "recovery_confusion",
    "model_properties": "model_properties",
    "misidentification_regression": "misidentification_regression",
    "identifiability": "identifiability",
    "open_set_recovery": "open_set_recovery",
}

# how recovery.duckdb's views read a table (Store.rebuild_views)
_SOURCE = "read_parquet(?, union_by_name = true, hive_partitioning = false)"


def table_metadata(
    store: Store, asset: str, partition: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``dagster/row_count`` (the whole table: every partition materialized so far),
    ``dagster/partition_row_count`` (a partitioned asset: this partition's rows),
    ``dagster/column_schema``, and which view of ``recovery.duckdb`` it is (``duckdb_view``)."""
    table = TABLES[asset]
    every = (store.path("tables", table) / "**" / "part.parquet").as_posix()
    con = duckdb.connect()  # in memory: only the Parquet files are read
    try:
        (rows,) = con.execute(f"SELECT count(*) FROM {_SOURCE}", [every]).fetchall()[0]
        described = con.execute(f"DESCRIBE SELECT * FROM {_SOURCE}", [every]).fetchall()
        part_rows = None
        if partition is not None:
            one = store.table_path(table, partition).as_posix()
            (part_rows,) = con.execute(f"SELECT count(*) FROM {_SOURCE}", [one]).fetchall()[0]
    finally:
        con.close()
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name=str(name), type=str(kind)) for name, kind, *_ in described]
    )
    # Dagster's table metadata keys (its TableMetadataSet, not exported by dagster 1.13)
    meta = {
        "dagster/row_count": dg.MetadataValue.int(int(rows)),
        "dagster/column_schema": dg.MetadataValue.table_schema(schema),
        "duckdb_view": dg.MetadataValue.text(f"{table} in {store.db_path}"),
    }
    if part_rows is not None:
        meta["dagster/partition_row_count"] = dg.MetadataValue.int(int(part_rows))
    return meta
