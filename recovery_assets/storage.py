"""Where a study's results live: arrays in files, tables in Parquet, DuckDB views over them.

Every study has its own data folder: ``<parent>/<study name>``, the parent being ``$RECOVERY_DATA``
or else ``data/`` under the working directory (a study's ``data_dir`` names its folder itself).
So several studies share a parent without touching each other's files. Layout of one folder::

    stimuli/images.npy                       the stimulus images (n, H, W, 3) uint8
    embeddings/<model>.npz                   features (n x p)
    human/judgements.npz, human/files/       canonical rows per file; the THINGS-shaped files
    generator_probes/<model>.npz             W, T, lambda
    synthetic/<model>/n<N>.npz               one job's recipe: folds and checksums (no rows)
    tables/<table>/<key=value>/part.parquet  long tables, one file per partition
    plots/*.png
    recovery.duckdb                          views over tables/<table>/**/*.parquet

Every file is written to a temporary name and renamed into place, so a reader sees a whole file or
none, and re-materializing a partition replaces its file (never duplicates rows). Parallel runs
write different files; the DuckDB database holds only views (globs read at query time) and is
rebuilt by writing a fresh file and renaming it over the old one, so no run ever holds a DuckDB
write lock that another run could fight over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from recovery_assets.atomic import (  # noqa: F401 - re-exported: storage is where callers look
    DiskFullError,
    atomic_write,
    pid_alive,
    remove_dead_writers_files,
)
from recovery_assets.study import Study

DATA_ENV = "RECOVERY_DATA"


def data_parent(parent: str | os.PathLike | None = None) -> Path:
    """The folder holding one data folder per study: ``parent``, else ``$RECOVERY_DATA``, else
    ``data/`` under the working directory."""
    raw = parent or os.environ.get(DATA_ENV) or "data"
    return Path(os.path.expanduser(str(raw))).resolve()


def data_root(study: Study, parent: str | os.PathLike | None = None) -> Path:
    """The study's data folder: its ``data_dir`` when it sets one (relative to the study file),
    else ``<parent>/<study name>`` (see ``data_parent``)."""
    if study.data_dir:
        p = Path(os.path.expanduser(study.data_dir))
        return (p if p.is_absolute() else study.path.parent / p).resolve()
    return data_parent(parent) / study.name


def _part_dir(partition: Mapping[str, Any]) -> str:
    return "/".join(f"{k}={v}" for k, v in partition.items()) or "all"


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def embedding_path(self, model: str) -> Path:
        return self.path("embeddings", f"{model}.npz")

    def generator_path(self, model: str) -> Path:
        return self.path("generator_probes", f"{model}.npz")

    def synthetic_path(self, model: str, n_train: int) -> Path:
        return self.path("synthetic", model, f"n{n_train}.npz")

    def plot_path(self, name: str) -> Path:
        return self.path("plots", name)

    @property
    def db_path(self) -> Path:
        return self.path("recovery.duckdb")

    # ------------------------------------------------------------------ arrays
    def save_arrays(
        self, target: Path, arrays: Mapping[str, Any], meta: dict | None = None
    ) -> Path:
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        if meta is not None:
            payload["__meta__"] = np.asarray(json.dumps(meta, default=_jsonable))

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, **payload)

        return atomic_write(target, write)

    def load_arrays(self, target: Path, what: str) -> tuple[dict[str, np.ndarray], dict]:
        if not target.is_file():
            raise FileNotFoundError(f"{what}: {target} does not exist; materialize it first")
        with np.load(target, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(str(z["__meta__"])) if "__meta__" in z.files else {}
        return arrays, meta

    def save_npy(self, target: Path, array: np.ndarray) -> Path:
        def write(tmp):
            with open(tmp, "wb") as fh:
                np.save(fh, array)

        return atomic_write(target, write)

    # ------------------------------------------------------------------ tables
    def table_path(self, table: str, partition: Mapping[str, Any] | None = None) -> Path:
        return self.path("tables", table, _part_dir(partition or {}), "part.parquet")

    def write_table(
        self, table: str, df: pd.DataFrame, partition: Mapping[str, Any] | None = None
    ) -> Path:
        """Replace one partition's rows of a long table (atomically)."""
        return atomic_write(
            self.table_path(table, partition), lambda tmp: df.to_parquet(tmp, index=False)
        )

    def read_table(self, table: str, partition: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """One partition, or (partition=None) every partition of a table concatenated."""
        if partition is not None:
            p = self.table_path(table, partition)
            if not p.is_file():
                raise FileNotFoundError(f"table {table} {dict(partition)}: {p} does not exist")
            return pd.read_parquet(p)
        files = sorted(self.path("tables", table).rglob("part.parquet"))
        if not files:
            raise FileNotFoundError(f"table {table}: nothing materialized under {self.root}")
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def tables(self) -> list[str]:
        base = self.path("tables")
        if not base.is_dir():
            return []
        return sorted(d.name for d in base.iterdir() if any(d.rglob("part.parquet")))

    def rebuild_views(self) -> Path:
        """Write a fresh DuckDB file with one view per table and rename it into place."""
        tables = self.tables()

        def write(tmp):
            Path(tmp).unlink(missing_ok=True)
            con = duckdb.connect(tmp)
            try:
                for t in tables:
                    glob = (self.path("tables", t) / "**" / "part.parquet").as_posix()
                    glob = glob.replace("'", "''")
                    name = '"' + t.replace('"', '""') + '"'
                    con.execute(
                        f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{glob}', "
                        "union_by_name = true, hive_partitioning = false)"
                    )
            finally:
                con.close()

        return atomic_write(self.db_path, write)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
