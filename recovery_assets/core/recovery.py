"""Model selection and recovery metrics (docs/method.md §7).

Input is a long table of fits, one row per (simulation, generator, candidate, lambda, fold) with the
candidate's validation and test accuracy and NLL on that fold's synthetic data. Per (simulation,
generator, candidate):

- ``lambda*`` is the lambda with the highest validation accuracy averaged over the folds (ties: the
  smallest lambda). With ``criterion="nll"`` it is the lowest mean validation NLL instead.
- The candidate's score is the mean over folds of the test accuracy (resp. test NLL) at
  ``lambda*``; there is no refit on train + validation.
- Candidates are ranked within (simulation, generator), rank 1 = best, average ranks for ties
  (``scipy.stats.rankdata``). The winner has the best score; ties go to the candidate listed first
  in the study's model order.

Over simulations, the recovery matrix (rows = generator, columns = winner) gives the recovery
accuracy ``trace / total`` with an exact (Clopper-Pearson) binomial 95 % CI, chance
``1 / number of models``, the mean rank of the true model, the mean reciprocal rank and per-model
precision and recall.

Ties are decided with an absolute tolerance (default ``1e-12``): means over folds of equal
accuracies can differ in the last bit depending on summation order, and a genuine accuracy
difference is at least ``1 / (n_folds * n_test)``, many orders of magnitude larger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy.stats import binomtest, rankdata

__all__ = [
    "FIT_COLUMNS",
    "RecoveryMetrics",
    "lambda_table",
    "recovery_metrics",
    "select_and_score",
]

KEYS = ("simulation", "generator", "candidate")
METRICS = ("val_acc", "test_acc", "val_nll", "test_nll")
FIT_COLUMNS = (*KEYS, "lam", "fold", *METRICS)
# criterion -> (validation column, test column, higher is better)
_CRITERIA = {"accuracy": ("val_acc", "test_acc", True), "nll": ("val_nll", "test_nll", False)}
DEFAULT_TOL = 1e-12


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_model_order(model_order) -> list[str]:
    order = list(model_order)
    if not order:
        raise ValueError("model_order is empty")
    if len(set(order)) != len(order):
        dup = sorted({m for m in order if order.count(m) > 1})
        raise ValueError(f"model_order lists models more than once: {dup}")
    return order


def _model_square(a, order: list[str], what: str, axes: str) -> np.ndarray:
    """A k x k float64 matrix over the models in ``order``: a DataFrame with the models as index
    and columns (in any order; reordered by name), or an array already in model order. ``what``
    names the argument in errors and ``axes`` says what its rows and columns are."""
    k = len(order)
    if isinstance(a, pd.DataFrame):
        rows, cols = [str(r) for r in a.index], [str(c) for c in a.columns]
        if sorted(rows) != sorted(order) or sorted(cols) != sorted(order):
            raise ValueError(
                f"{what} must have the models as index and columns ({axes}); got index "
                f"{rows} and columns {cols} for models {order}"
            )
        frame = a.copy()
        frame.index, frame.columns = rows, cols
        a = frame.loc[order, order].to_numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric matrix: {exc}") from exc
    if arr.shape != (k, k):
        raise ValueError(f"{what} must be a {k} x {k} matrix ({axes}), got shape {arr.shape}")
    return arr


def _check_columns(df: pd.DataFrame, columns, what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; expected {list(columns)}")
    nan = {c: int(n) for c in columns if (n := df[c].isna().sum())}
    if nan:
        raise ValueError(f"{what} has NaN values (column: count): {nan}")


def _check_names(df: pd.DataFrame, columns, order: list[str], what: str) -> None:
    known = set(order)
    for col in columns:
        unknown = sorted(set(df[col].astype(str)) - known, key=str)
        if unknown:
            raise ValueError(f"{what} column {col!r} has models not in model_order: {unknown}")


def _validate_fits(fits: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    _check_columns(fits, FIT_COLUMNS, "fits")
    if fits.empty:
        raise ValueError("fits is empty")
    _check_names(fits, ("generator", "candidate"), order, "fits")
    df = fits.loc[:, list(FIT_COLUMNS)].copy()
    df["generator"] = df["generator"].astype(str)
    df["candidate"] = df["candidate"].astype(str)
    for col in ("lam", *METRICS):
        df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
        if not np.all(np.isfinite(df[col].to_numpy())):
            raise ValueError(f"fits column {col!r} has non-finite values")

    dup = df.duplicated(["simulation", "generator", "candidate", "lam", "fold"])
    if dup.any():
        first = df.loc[dup, ["simulation", "generator", "candidate", "lam", "fold"]].iloc[0]
        raise ValueError(
            f"fits has {int(dup.sum())} duplicated (simulation, generator, candidate, lam, fold) "
            f"rows, e.g. {first.to_dict()}"
        )
    # Every (simulation, generator, candidate, lam) must be evaluated on the same folds as the
    # rest of its (simulation, generator) job, and all jobs must have the same number of folds.
    fold_sets = df.groupby(["simulation", "generator", "candidate", "lam"], sort=False)["fold"].agg(
        lambda s: tuple(sorted(s.tolist()))
    )
    counts = fold_sets.map(len)
    if counts.nunique() != 1:
        bad = counts[counts != counts.mode().iloc[0]]
        raise ValueError(
            f"inconsistent fold counts: most fits have {int(counts.mode().iloc[0])} folds but "
            f"{len(bad)} (simulation, generator, candidate, lam) groups differ, e.g. "
            f"{bad.index[0]} has {int(bad.iloc[0])}"
        )
    per_job = fold_sets.groupby(level=["simulation", "generator"], sort=False).nunique()
    if (per_job > 1).any():
        raise ValueError(
            f"inconsistent folds: job {per_job[per_job > 1].index[0]} mixes different fold sets"
        )
    # Every job must compare the same candidates, the generator among them.
    cands = df.groupby(["simulation", "generator"], sort=False)["candidate"].agg(
        lambda s: frozenset(s)
    )
    if cands.nunique() != 1:
        ref = cands.mode().iloc[0]
        bad = cands[cands != ref]
        raise ValueError(
            f"jobs compare different candidate sets: job {bad.index[0]} has "
            f"{sorted(bad.iloc[0])}, most have {sorted(ref)}"
        )
    missing_self = [job for job, c in cands.items() if job[1] not in c]
    if missing_self:
        raise ValueError(f"the generator is not among the candidates of job {missing_self[0]}")
    return df


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def lambda_table(fits: pd.DataFrame, model_order) -> pd.DataFrame:
    """Per-lambda table: fold means of every metric per (simulation, generator, candidate, lam).

    Columns: ``simulation, generator, candidate, lam, n_folds, val_acc, test_acc, val_nll,
    test_nll``, sorted by simulation, generator and candidate in model order, then lambda.
    """
    order = _check_model_order(model_order)
    df = _validate_fits(fits, order)
    return _lambda_table(df, order)


def _lambda_table(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(order)}
    df = df.sort_values("fold", kind="stable")  # summation order independent of row order
    table = (
        df.groupby(["simulation", "generator", "candidate", "lam"], sort=False)
        .agg(n_folds=("fold", "size"), **{m: (m, "mean") for m in METRICS})
        .reset_index()
    )
    table["_g"] = table["generator"].map(rank)
    table["_c"] = table["candidate"].map(rank)
    table = table.sort_values(["simulation", "_g", "_c", "lam"], kind="stable")
    return table.drop(columns=["_g", "_c"]).reset_index(drop=True)


def _tie_ranks(goodness: np.ndarray, tol: float) -> np.ndarray:
    """Average ranks (1 = best) of ``goodness`` (higher = better); values within ``tol`` of their
    neighbour in sorted order form one tie group."""
    order = np.argsort(-goodness, kind="stable")
    sorted_good = goodness[order]
    group = np.concatenate([[0], np.cumsum(np.diff(-sorted_good) > tol)])
    tie_group = np.empty_like(group)
    tie_group[order] = group
    return rankdata(tie_group, method="average")


def select_and_score(
    fits: pd.DataFrame,
    model_order,
    criterion: Literal["accuracy", "nll"] = "accuracy",
    tol: float = DEFAULT_TOL,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Select lambda*, score, rank and pick the winner of every job (docs/method.md §7).

    Parameters
    ----------
    fits : long table with columns ``simulation, generator, candidate, lam, fold, val_acc,
        test_acc, val_nll, test_nll`` (one row per fold of every fit).
    model_order : the study's model order (decides score ties; orders the output).
    criterion : ``"accuracy"`` (the study's: lambda* maximises mean validation accuracy, score =
        mean test accuracy, higher is better) or ``"nll"`` (lambda* minimises mean validation NLL,
        score = mean test NLL, lower is better).
    tol : absolute tolerance under which two means count as tied.

    Returns
    -------
    candidates : one row per (simulation, generator, candidate) with ``lam_star``, ``n_folds``, the
        fold means ``val_acc, test_acc, val_nll, test_nll`` at lambda*, ``score``, ``rank``
        (1 = best, average ranks for ties), ``is_winner`` and ``is_generator``.
    winners : one row per (simulation, generator) with ``winner``, ``true_rank`` (the generator's
        own rank), ``true_score``, ``winner_score``, ``n_candidates`` and ``recovered``.

    Raises
    ------
    ValueError
        For missing columns, NaN values, models not in ``model_order``, duplicated rows,
        inconsistent fold counts, jobs with different candidate sets or without the generator
        among the candidates, or an unknown criterion.
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {list(_CRITERIA)}")
    val_col, test_col, higher = _CRITERIA[criterion]
    order = _check_model_order(model_order)
    table = _lambda_table(_validate_fits(fits, order), order)

    # lambda*: best mean validation metric, ties (within tol) -> smallest lambda. ``table`` is
    # sorted by lambda within each candidate, so the first tied row has the smallest lambda.
    group = table.groupby(["simulation", "generator", "candidate"], sort=False)[val_col]
    if higher:
        tied = table[val_col] >= group.transform("max") - tol
    else:
        tied = table[val_col] <= group.transform("min") + tol
    cand = (
        table[tied]
        .groupby(["simulation", "generator", "candidate"], sort=False)
        .head(1)
        .rename(columns={"lam": "lam_star"})
        .reset_index(drop=True)
    )
    cand["score"] = cand[test_col]

    model_index = {m: i for i, m in enumerate(order)}
    cand["rank"] = np.nan
    cand["is_winner"] = False
    cand["is_generator"] = cand["candidate"] == cand["generator"]
    jobs = []
    for (sim, gen), rows in cand.groupby(["simulation", "generator"], sort=False):
        score = rows["score"].to_numpy()
        goodness = score if higher else -score
        ranks = _tie_ranks(goodness, tol)
        cand.loc[rows.index, "rank"] = ranks
        best = rows.index[ranks == ranks.min()]
        winner_idx = min(best, key=lambda i: model_index[cand.at[i, "candidate"]])
        cand.at[winner_idx, "is_winner"] = True
        self_idx = rows.index[rows["candidate"].to_numpy() == gen][0]
        jobs.append(
            {
                "simulation": sim,
                "generator": gen,
                "winner": cand.at[winner_idx, "candidate"],
                "true_rank": float(cand.at[self_idx, "rank"]),
                "true_score": float(cand.at[self_idx, "score"]),
                "winner_score": float(cand.at[winner_idx, "score"]),
                "n_candidates": len(rows),
            }
        )
    winners = pd.DataFrame(jobs)
    winners["recovered"] = winners["winner"] == winners["generator"]
    columns = [
        *KEYS,
        "lam_star",
        "n_folds",
        *METRICS,
        "score",
        "rank",
        "is_winner",
        "is_generator",
    ]
    return cand[columns].reset_index(drop=True), winners


# --------------------------------------------------------------------------------------------
# Recovery metrics
# --------------------------------------------------------------------------------------------


@dataclass
class RecoveryMetrics:
    """Recovery summary over jobs (docs/method.md §7).

    Attributes
    ----------
    confusion : counts, rows = generator, columns = winner, both in model order.
    n_total, n_correct : number of jobs and of jobs whose winner is the generator (the trace).
    accuracy : ``n_correct / n_total``.
    ci_low, ci_high : exact Clopper-Pearson 95 % CI of the accuracy.
    chance : ``1 / number of models``.
    p_value : two-sided exact binomial test of the accuracy against chance.
    mean_true_rank : mean rank of the true model (1 = best, average ranks for ties).
    mrr : mean reciprocal rank, mean of ``1 / true_rank``.
    per_model : per model (index, model order): ``n_generated`` (row sum), ``n_won`` (column sum),
        ``n_correct`` (diagonal), ``precision = n_correct / n_won`` (NaN when the model never won)
        and ``recall = n_correct / n_generated`` (NaN when it never generated data).
    """

    confusion: pd.DataFrame
    n_total: int
    n_correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    chance: float
    p_value: float
    mean_true_rank: float
    mrr: float
    per_model: pd.DataFrame = field(repr=False)

    def as_dict(self) -> dict[str, float | int]:
        """The scalar metrics as a plain dict."""
        return {
            "n_total": self.n_total,
            "n_correct": self.n_correct,
            "accuracy": self.accuracy,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "chance": self.chance,
            "p_value": self.p_value,
            "mean_true_rank": self.mean_true_rank,
            "mrr": self.mrr,
        }


def recovery_metrics(
    winners: pd.DataFrame, model_order, n_total: int | None = None
) -> RecoveryMetrics:
    """Recovery matrix and summary metrics from the per-job winners (docs/method.md §7).

    Parameters
    ----------
    winners : one row per (simulation, generator) job with columns ``generator``, ``winner`` and
        ``true_rank`` (as returned by :func:`select_and_score`, typically for one N).
    model_order : the study's models; the confusion matrix uses this order and ``chance = 1 /
        len(model_order)``.
    n_total : optional expected number of jobs (e.g. 20 generators x 30 simulations); a
        ValueError is raised if ``winners`` has a different number of rows, so that missing jobs
        are not silently left out of the accuracy.

    Returns
    -------
    :class:`RecoveryMetrics`.
    """
    order = _check_model_order(model_order)
    _check_columns(winners, ("generator", "winner", "true_rank"), "winners")
    if winners.empty:
        raise ValueError("winners is empty")
    _check_names(winners, ("generator", "winner"), order, "winners")
    if n_total is not None and len(winners) != int(n_total):
        raise ValueError(f"expected {int(n_total)} jobs, winners has {len(winners)} rows")
    true_rank = pd.to_numeric(winners["true_rank"], errors="raise").to_numpy(dtype=float)
    if np.any(true_rank < 1):
        raise ValueError("true_rank must be >= 1 (rank 1 = best)")

    gen = pd.Categorical(winners["generator"].astype(str), categories=order)
    win = pd.Categorical(winners["winner"].astype(str), categories=order)
    confusion = pd.crosstab(gen, win, dropna=False).reindex(
        index=order, columns=order, fill_value=0
    )
    confusion = confusion.astype(np.int64)
    confusion.index.name = "generator"
    confusion.columns.name = "winner"

    total = int(confusion.to_numpy().sum())
    correct = int(np.trace(confusion.to_numpy()))
    chance = 1.0 / len(order)
    test = binomtest(correct, total, p=chance)
    ci = test.proportion_ci(confidence_level=0.95, method="exact")

    n_generated = confusion.sum(axis=1)
    n_won = confusion.sum(axis=0)
    n_diag = pd.Series(np.diag(confusion.to_numpy()), index=order)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = n_diag / n_won.where(n_won > 0)
        recall = n_diag / n_generated.where(n_generated > 0)
    per_model = pd.DataFrame(
        {
            "n_generated": n_generated.to_numpy(),
            "n_won": n_won.to_numpy(),
            "n_correct": n_diag.to_numpy(),
            "precision": precision.to_numpy(dtype=float),
            "recall": recall.to_numpy(dtype=float),
        },
        index=pd.Index(order, name="model"),
    )
    return RecoveryMetrics(
        confusion=confusion,
        n_total=total,
        n_correct=correct,
        accuracy=correct / total,
        ci_low=float(ci.low),
        ci_high=float(ci.high),
        chance=chance,
        p_value=float(test.pvalue),
        mean_true_rank=float(true_rank.mean()),
        mrr=float(np.mean(1.0 / true_rank)),
        per_model=per_model,
    )
