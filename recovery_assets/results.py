"""A finished study's results as its DuckDB file holds them (read-only, no Dagster): what
``recovery advise`` and ``recovery compare`` read (docs/analyses.md), and the winner on the human
data, which the ``identifiability`` asset reads too."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from recovery_assets.core.advise import Advice, advise_from_summary
from recovery_assets.core.recovery import DEFAULT_TOL
from recovery_assets.study import Study

# the criterion whose recovery accuracy `compare` reports: the study's selection rule (§7)
COMPARE_CRITERION = "accuracy"


class NoResults(ValueError):
    """The study has no results of the kind asked for yet: no database, no such table, no rows."""


def read_table(db: Path, table: str, what: str) -> pd.DataFrame:
    """Every row of one view of a study's ``recovery.duckdb``, opened read-only; ``what`` says
    which asset writes it (for the message when it is missing)."""
    if not db.is_file():
        raise NoResults(f"no results yet: no DuckDB database at {db}; materialize the study first")
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as exc:
        raise NoResults(f"{db}: not a readable DuckDB database ({exc})") from None
    try:
        tables = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        views = {r[0] for r in tables}
        if table not in views:
            raise NoResults(f"no results yet: {db} has no {table} table; materialize {what} first")
        df = con.execute(f'SELECT * FROM "{table}"').fetchdf()
    except duckdb.Error as exc:
        raise NoResults(f"{db}: table {table} cannot be read ({exc})") from None
    finally:
        con.close()
    if df.empty:
        raise NoResults(f"no results yet: {db}: {table} has no rows; materialize {what} first")
    return df


def recovery_summary(study: Study, db: Path) -> pd.DataFrame:
    """The ``recovery_summary`` rows of the study's sizes (one per N and criterion)."""
    summary = read_table(db, "recovery_summary", "the recovery matrices (recovery study)")
    summary = summary[summary["n_train"].isin(study.sizes)]
    if summary.empty:
        raise NoResults(
            f"{db}: recovery_summary has no rows for the study's sizes {list(study.sizes)}"
        )
    return summary.sort_values(["criterion", "n_train"]).reset_index(drop=True)


def study_advice(study: Study, db: Path, target: float, criterion: str) -> Advice:
    """How many training triplets reach ``target`` (docs/analyses.md §3), from the recovery
    summary at every size of the study materialized so far."""
    summary = recovery_summary(study, db)
    sizes = sorted(int(n) for n in summary.loc[summary["criterion"] == criterion, "n_train"])
    if len(sizes) < 3:
        raise NoResults(
            f"{db}: recovery results (criterion {criterion}) at {len(sizes)} size(s) "
            f"{sizes}; the recovery curve has 3 parameters and needs at least 3 sizes"
        )
    return advise_from_summary(summary, target, criterion=criterion)


def human_winner(generators: pd.DataFrame, order: list[str]) -> str:
    """The model that wins on the human data: its generator probe has the highest human test
    accuracy (``generator_probes.human_test_accuracy``: test set 2); accuracies within 1e-12 are
    tied and the tie goes to the model listed first in the study (the rule of method.md §7)."""
    acc = generators.assign(model=generators["model"].astype(str)).set_index("model")
    missing = [m for m in order if m not in acc.index]
    if missing:
        raise NoResults(f"generator_probes has no row for {missing}; materialize them first")
    values = acc["human_test_accuracy"].reindex(order).to_numpy(dtype=np.float64)
    return order[int(np.flatnonzero(values >= values.max() - DEFAULT_TOL)[0])]


def tradeoff_point(study: Study, db: Path) -> dict:
    """One study's point of the trade-off (``recovery compare``): its probe, the human test
    accuracy of its winner on the human data (the best of its generator probes on test set 2), and
    its recovery accuracy (selected by accuracy) at its largest N, with the exact 95% interval."""
    generators = read_table(db, "generator_probes", "the generator probes")
    winner = human_winner(generators, study.model_names)
    summary = recovery_summary(study, db)
    n = study.largest_size
    row = summary[(summary["criterion"] == COMPARE_CRITERION) & (summary["n_train"] == n)]
    if row.empty:
        raise NoResults(f"{db}: no recovery results at the study's largest N ({n}) yet")
    row = row.iloc[0]
    human = generators.set_index(generators["model"].astype(str)).loc[winner]
    spec = study.spec
    return {
        "study": study.name,
        "family": spec.name,
        "penalty": spec.penalty,
        "human_winner": winner,
        "human_test_accuracy": float(human["human_test_accuracy"]),
        "n_train": int(n),
        "recovery_accuracy": float(row["accuracy"]),
        "ci_low": float(row["ci_low"]),
        "ci_high": float(row["ci_high"]),
        "chance": float(row["chance"]),
        "database": str(db),
    }
