"""What a win means: the probability of the true model given the winner (docs/analyses.md §1).

A recovery matrix (docs/method.md §7) answers "if g generated the data, how often does m win?":
row g holds the counts of the winners over g's simulations, P(m | g) = counts[g, m] / row total.
The question a study with real (human) data asks is the inverse: "m won, how probable is it that
m, or any other candidate g, generated the data?". Bayes' rule inverts the matrix column by
column:

    P(g | m) = P(m | g) P(g) / sum_g' P(m | g') P(g'),

with a uniform prior P(g) = 1 / number of models unless a prior vector is given. For every winner
m the posteriors over the generators sum to 1.

* **Point estimate.** The plug-in P(m | g) = counts[g, m] / sum_m' counts[g, m'].
* **Interval.** Monte Carlo: each confusion row is drawn from its Bayesian posterior under a flat
  Dirichlet prior, Dirichlet(1 + counts[g]) (``numpy.random.default_rng(seed)``, rows drawn in
  model order, ``n_draws`` draws each); the Bayes inversion is applied to every draw and the
  interval is the equal-tailed percentile interval (2.5 % and 97.5 % for ``level = 0.95``). Every
  Dirichlet draw is strictly inside the simplex, so when a zero count makes the plug-in estimate
  exactly 0 or 1 (e.g. a perfectly diagonal matrix, P(g = m | m) = 1), the percentile interval
  lies strictly inside (0, 1) and misses it; the interval is then extended to the estimate
  (``ci_low = min(ci_low, posterior)``, ``ci_high = max(ci_high, posterior)``), as the exact
  binomial interval of k = n successes reaches 1. The interval therefore always contains the
  estimate.
* **No posterior.** A winner that never won (its column total is 0) has no P(g | m): the
  denominator is 0 and no data say anything about what its win would mean. Its rows are left out,
  never filled with zeros; :func:`never_won` lists such winners, and the result's
  ``attrs["never_won"]`` names them. (With a prior that puts zero mass on every generator whose
  data the model won, the denominator is 0 too; those winners are listed in
  ``attrs["no_posterior"]``, which includes the never-won ones.)
* **Exact duplicates.** If B is an exact copy of A, every score tie goes to the model listed first
  (docs/method.md §7), so B never wins, has no posterior, and a win of A is equally likely to come
  from A or B: P(A | A) = P(B | A) = 1/2 under a uniform prior (when A wins both models' data
  equally often). Recovery cannot separate identical models, and the inversion says so.

A generator row with zero total (no simulations) is an error: P(m | g) is undefined for it and
the prior would assign mass to a model the matrix knows nothing about.

All functions are pure numpy/pandas code and validate their inputs, raising ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recovery_assets.core.recovery import (
    _check_columns,
    _check_model_order,
    _check_names,
    _model_square,
)

__all__ = [
    "POSTERIOR_COLUMNS",
    "TABLE_COLUMNS",
    "HumanWinnerPosterior",
    "human_winner_posterior",
    "identifiability_table",
    "never_won",
    "never_won_table",
    "posterior_given_winner",
]

POSTERIOR_COLUMNS = ("winner", "generator", "n_wins", "posterior", "ci_low", "ci_high")
TABLE_COLUMNS = ("n_train", "criterion", *POSTERIOR_COLUMNS)
CONFUSION_COLUMNS = ("n_train", "criterion", "generator", "winner", "count")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_counts(counts: Any, order: list[str]) -> np.ndarray:
    """A k x k int64 confusion matrix in model order (rows = generator, columns = winner)."""
    arr = _model_square(counts, order, "counts", "generator x winner")
    if not np.all(np.isfinite(arr)):
        raise ValueError("counts has non-finite values")
    if np.any(arr < 0):
        raise ValueError("counts has negative values")
    if np.any(arr != np.round(arr)):
        raise ValueError("counts must be whole numbers")
    arr = arr.astype(np.int64)
    empty = [order[i] for i in np.flatnonzero(arr.sum(axis=1) == 0)]
    if empty:
        raise ValueError(
            f"generator rows with no simulations (row total 0): {empty}; P(winner | generator) "
            "is undefined for them"
        )
    return arr


def _as_prior(prior: Any, order: list[str]) -> np.ndarray:
    """The prior over generators in model order: uniform by default; a vector in model order or a
    mapping / Series model -> probability."""
    k = len(order)
    if prior is None:
        return np.full(k, 1.0 / k)
    if isinstance(prior, Mapping | pd.Series):
        mapping = {str(m): v for m, v in dict(prior).items()}
        if sorted(mapping) != sorted(order):
            raise ValueError(f"prior must name exactly the models {order}, got {sorted(mapping)}")
        prior = [mapping[m] for m in order]
    try:
        p = np.asarray(prior, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prior must be a numeric vector: {exc}") from exc
    if p.shape != (k,):
        raise ValueError(f"prior must have one entry per model ({k}), got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("prior must be finite and non-negative")
    if abs(float(p.sum()) - 1.0) > 1e-9:
        raise ValueError(f"prior must sum to 1 (within 1e-9), sums to {float(p.sum())!r}")
    return p


def _check_mc(n_draws: int, level: float) -> tuple[int, float]:
    if isinstance(n_draws, bool) or int(n_draws) != n_draws or int(n_draws) < 2:
        raise ValueError(f"n_draws must be an integer >= 2, got {n_draws!r}")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return int(n_draws), level


# --------------------------------------------------------------------------------------------
# One confusion matrix
# --------------------------------------------------------------------------------------------


def _invert(likelihood: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(g | m) from P(m | g) (``likelihood[..., g, m]``): returns (posterior[..., g, m],
    evidence[..., m]); columns with zero evidence are NaN."""
    joint = likelihood * prior[:, None]
    evidence = joint.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        post = joint / evidence[..., None, :]
    return post, evidence


def never_won(counts: Any, models) -> list[str]:
    """The winners that never won (column total 0), in model order: they have no posterior.

    Parameters
    ----------
    counts : generator x winner confusion counts, a k x k array in ``models`` order or a DataFrame
        with the models as index (generator) and columns (winner), e.g.
        ``RecoveryMetrics.confusion``.
    models : the study's model order.
    """
    order = _check_model_order(models)
    arr = _as_counts(counts, order)
    return [order[j] for j in np.flatnonzero(arr.sum(axis=0) == 0)]


def posterior_given_winner(
    counts: Any,
    models,
    prior: Any = None,
    n_draws: int = 4000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """P(generator | winner) from one recovery matrix, with Monte Carlo intervals.

    Parameters
    ----------
    counts : generator x winner confusion counts (rows = generator g, columns = winner m, both in
        ``models`` order): a k x k array or a DataFrame with the models as index and columns
        (``RecoveryMetrics.confusion``). Non-negative whole numbers; every row total > 0.
    models : the study's model order.
    prior : prior P(g) over the generators: None (uniform), a vector in model order, or a mapping /
        Series model -> probability; non-negative and summing to 1 within 1e-9.
    n_draws : Monte Carlo draws of each confusion row from Dirichlet(1 + counts[g]).
    seed : seed of ``numpy.random.default_rng``; the same inputs and seed give the same intervals.
    level : coverage of the equal-tailed percentile interval.

    Returns
    -------
    DataFrame with columns ``winner, generator, n_wins, posterior, ci_low, ci_high``: one row per
    (winner, generator) for every winner that won at least once (``n_wins`` = its column total),
    winners then generators in model order. Winners without a posterior have no rows; they are
    listed in ``attrs["never_won"]`` (column total 0) and ``attrs["no_posterior"]`` (also those
    whose wins all come from generators with prior 0).

    Raises
    ------
    ValueError
        For a malformed or negative matrix, a generator row with total 0, an invalid prior,
        ``n_draws < 2`` or ``level`` outside (0, 1).
    """
    order = _check_model_order(models)
    arr = _as_counts(counts, order)
    p = _as_prior(prior, order)
    n_draws, level = _check_mc(n_draws, level)
    k = len(order)

    row_total = arr.sum(axis=1, keepdims=True)
    post, evidence = _invert(arr / row_total, p)
    n_wins = arr.sum(axis=0)
    has_post = evidence > 0

    rng = np.random.default_rng(seed)
    draws = np.stack([rng.dirichlet(1.0 + arr[g], size=n_draws) for g in range(k)], axis=1)
    post_draws, _ = _invert(draws, p)  # (n_draws, g, m)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(post_draws, [alpha, 1.0 - alpha], axis=0)

    rows = []
    for m in np.flatnonzero(has_post):
        for g in range(k):
            est = float(post[g, m])
            rows.append(
                (
                    order[m],
                    order[g],
                    int(n_wins[m]),
                    est,
                    min(float(low[g, m]), est),
                    max(float(high[g, m]), est),
                )
            )
    out = pd.DataFrame(rows, columns=list(POSTERIOR_COLUMNS))
    out = out.astype({"n_wins": np.int64, "posterior": float, "ci_low": float, "ci_high": float})
    out.attrs["never_won"] = [order[j] for j in np.flatnonzero(n_wins == 0)]
    out.attrs["no_posterior"] = [order[j] for j in np.flatnonzero(~has_post)]
    return out


# --------------------------------------------------------------------------------------------
# The long confusion table (recovery_confusion)
# --------------------------------------------------------------------------------------------


def _confusion_groups(confusion_long: pd.DataFrame, order: list[str]):
    """Yield ((n_train, criterion), k x k count matrix) per group of a long confusion table."""
    _check_columns(confusion_long, CONFUSION_COLUMNS, "confusion_long")
    if confusion_long.empty:
        raise ValueError("confusion_long is empty")
    _check_names(confusion_long, ("generator", "winner"), order, "confusion_long")
    df = confusion_long.loc[:, list(CONFUSION_COLUMNS)].copy()
    df["generator"] = df["generator"].astype(str)
    df["winner"] = df["winner"].astype(str)
    dup = df.duplicated(["n_train", "criterion", "generator", "winner"])
    if dup.any():
        first = df.loc[dup, ["n_train", "criterion", "generator", "winner"]].iloc[0]
        raise ValueError(
            f"confusion_long has {int(dup.sum())} duplicated (n_train, criterion, generator, "
            f"winner) rows, e.g. {first.to_dict()}"
        )
    for key, rows in df.groupby(["n_train", "criterion"], sort=True):
        # missing cells are zero counts (sql/confusion.sql keeps only count > 0)
        mat = rows.pivot(index="generator", columns="winner", values="count")
        mat = mat.reindex(index=order, columns=order).fillna(0)
        try:
            yield key, _as_counts(mat, order)
        except ValueError as exc:
            raise ValueError(f"n_train={key[0]}, criterion={key[1]!r}: {exc}") from exc


def identifiability_table(
    confusion_long: pd.DataFrame,
    models,
    prior: Any = None,
    n_draws: int = 4000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """:func:`posterior_given_winner` for every (n_train, criterion) of a long confusion table.

    Parameters
    ----------
    confusion_long : columns ``n_train, criterion, generator, winner, count`` (the
        ``recovery_confusion`` table); one row per cell, missing cells count as 0.
    models, prior, n_draws, level : as in :func:`posterior_given_winner`.
    seed : every (n_train, criterion) is computed with this same seed, so its intervals do not
        depend on which other sizes or criteria the table holds.

    Returns
    -------
    DataFrame with columns ``n_train, criterion, winner, generator, n_wins, posterior, ci_low,
    ci_high``, sorted by n_train, criterion, then winner and generator in model order. Winners
    that never won at an (n_train, criterion) have no rows there (:func:`never_won_table` lists
    them).
    """
    order = _check_model_order(models)
    parts = []
    for (n_train, criterion), arr in _confusion_groups(confusion_long, order):
        res = posterior_given_winner(arr, order, prior, n_draws=n_draws, seed=seed, level=level)
        parts.append(res.assign(n_train=n_train, criterion=criterion))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    out.attrs = {}
    return out.loc[:, list(TABLE_COLUMNS)].reset_index(drop=True)


def never_won_table(confusion_long: pd.DataFrame, models) -> pd.DataFrame:
    """The winners without a posterior per (n_train, criterion) of a long confusion table.

    Returns
    -------
    DataFrame with columns ``n_train, criterion, winner`` (winners in model order), one row per
    model that never won at that training size and criterion.
    """
    order = _check_model_order(models)
    rows = [
        (n_train, criterion, order[j])
        for (n_train, criterion), arr in _confusion_groups(confusion_long, order)
        for j in np.flatnonzero(arr.sum(axis=0) == 0)
    ]
    return pd.DataFrame(rows, columns=["n_train", "criterion", "winner"])


# --------------------------------------------------------------------------------------------
# The winner on human data
# --------------------------------------------------------------------------------------------


@dataclass
class HumanWinnerPosterior:
    """What the human winner's win means, per training size.

    Attributes
    ----------
    winner : the model that wins on the human data.
    criterion : the criterion the rows are for (None: all criteria of the table).
    per_n : the identifiability rows of ``winner`` (columns of :data:`TABLE_COLUMNS`) at every
        training size where it won at least once, sorted by n_train, criterion, generator.
    largest_n : the largest training size in the table.
    at_largest : the rows of ``per_n`` at ``largest_n`` (empty if it never won there).
    never_won_at : training sizes of the table at which ``winner`` never won under the kept
        criteria (it has no posterior there).
    """

    winner: str
    criterion: str | None
    per_n: pd.DataFrame = field(repr=False)
    largest_n: int
    at_largest: pd.DataFrame = field(repr=False)
    never_won_at: list[int]

    def true_model_posterior(self) -> pd.DataFrame:
        """P(winner | winner) per training size: the rows whose generator is the winner."""
        return self.per_n[self.per_n["generator"] == self.winner].reset_index(drop=True)


def human_winner_posterior(
    table: pd.DataFrame, human_winner: str, criterion: str | None = "accuracy"
) -> HumanWinnerPosterior:
    """The identifiability rows of the model that wins on human data, per N and at the largest N.

    Parameters
    ----------
    table : the output of :func:`identifiability_table`.
    human_winner : the winning model on the human data.
    criterion : keep only this criterion (default ``"accuracy"``); None keeps all.

    Returns
    -------
    :class:`HumanWinnerPosterior`.

    Raises
    ------
    ValueError
        For missing columns, an empty table (after the criterion filter) or a ``human_winner``
        that is none of the table's generators.
    """
    _check_columns(table, TABLE_COLUMNS, "table")
    df = table
    if criterion is not None:
        df = df[df["criterion"] == criterion]
    if df.empty:
        raise ValueError(
            "table has no rows" + ("" if criterion is None else f" for criterion {criterion!r}")
        )
    human_winner = str(human_winner)
    if human_winner not in set(df["generator"].astype(str)):
        raise ValueError(
            f"human_winner {human_winner!r} is none of the table's models "
            f"{sorted(set(df['generator'].astype(str)))}"
        )
    sizes = sorted({int(n) for n in df["n_train"]})
    per_n = df[df["winner"].astype(str) == human_winner]
    won_at = {int(n) for n in per_n["n_train"]}
    # keep the table's own generator order (model order) within each (n_train, criterion)
    per_n = per_n.sort_values(["n_train", "criterion"], kind="stable").reset_index(drop=True)
    largest = sizes[-1]
    return HumanWinnerPosterior(
        winner=human_winner,
        criterion=criterion,
        per_n=per_n,
        largest_n=largest,
        at_largest=per_n[per_n["n_train"] == largest].reset_index(drop=True),
        never_won_at=[n for n in sizes if n not in won_at],
    )
