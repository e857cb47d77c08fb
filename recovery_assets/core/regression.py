"""Regression of misidentification on model properties (docs/method.md §8).

Data. At the largest training size of a recovery experiment, every simulation s and generator g
give each candidate m a score on g's synthetic data (docs/method.md §7). Each (s, g, m) with m != g
is one observation whose outcome is the accuracy difference

    acc_diff_raw = score(g on g's data) - score(m on g's data),

positive when the generator beats the candidate. The outcome is z-scored over all observations
(sample standard deviation, ddof = 1).

Predictors. Each model has five properties (docs/method.md §3, §8): number of parameters
(``n_params``), embedding dimension (``embedding_dim``), alignment-induced geometry shift
(``alignment_shift``) and effective dimensionality before and after the probe (``ed_before``,
``ed_after``; see :mod:`recovery_assets.core.geometry`). Each property is z-scored once across the
models of the study (sample standard deviation, ddof = 1; every model counts once, whatever its
number of rows) and entered twice, for the generator (``gen_<prop>``) and for the candidate
(``cand_<prop>``): 10 predictors plus an intercept.

Estimation and inference. Coefficients are ordinary least squares (statsmodels) on all
observations. Because observations sharing a model are dependent, uncertainty comes from a
model-level bootstrap: each resample draws the K models with replacement (equivalently, model
counts c ~ Multinomial(K, 1/K)); observation (s, g, m) then enters c_g * c_m times and self-pairs
stay excluded (two copies of one model are never paired with each other). Outcome and predictors
keep their full-sample standardisation in every resample. Since the predictors depend only on
(g, m), the replicated regression reduces exactly to weighted least squares on the pair means,
with weight c_g * c_m * (number of simulations of the pair); each resample is therefore one 11 x 11
weighted normal-equation solve, vectorised over resamples. A resample whose weighted design is
rank-deficient (too few distinct models drawn to identify every coefficient) does not identify the
coefficients: it is counted (``n_rank_deficient``) and excluded from the CIs and p-values.

From the B' valid resamples: percentile (1 - alpha) CIs; the two-tailed bootstrap p-value
p = 2 min(#(b* <= 0), #(b* >= 0)) / B', capped at 1 and floored at 1 / B' (the resolution of the
bootstrap: p = 1 / B' reads "p < 1 / B'"); Bonferroni correction over all 11 coefficients,
intercept included (docs/method.md §8: "over all coefficients"), via statsmodels' ``multipletests``;
significant = Bonferroni p <= alpha (statsmodels' rule). Variance inflation factors come from
statsmodels' ``variance_inflation_factor`` on the full design with its constant (NaN for the
intercept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.outliers_influence import variance_inflation_factor

__all__ = [
    "PROPERTIES",
    "SCORE_COLUMNS",
    "build_regression_frame",
    "fit_misidentification_regression",
    "regression_terms",
]

#: Per-model properties used as predictors (docs/method.md §8), in report order.
PROPERTIES: tuple[str, ...] = (
    "n_params",
    "embedding_dim",
    "alignment_shift",
    "ed_before",
    "ed_after",
)
#: Columns required in the long score table.
SCORE_COLUMNS: tuple[str, ...] = ("simulation", "generator", "candidate", "score")

INTERCEPT = "intercept"
_OUTCOME = "acc_diff"
_MIN_MODELS = 3
_GRAM_RTOL = 1e-10  # eigenvalue floor (relative to the largest) of a full-rank weighted Gram
_BOOT_CHUNK = 1000  # resamples per vectorised block (bounds memory at ~chunk x pairs floats)


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name} is missing required column(s) {missing}; it has {list(df.columns)}"
        )


def _zscore(values: np.ndarray, what: str) -> np.ndarray:
    """z-score with the sample standard deviation (ddof = 1)."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(np.std(values, ddof=1))
    if not np.isfinite(sd) or sd <= 1e-12 * max(float(np.max(np.abs(values))), 1e-300):
        raise ValueError(f"{what} has no variance, so it cannot be z-scored")
    return (values - values.mean()) / sd


def regression_terms(predictors: Sequence[str] = PROPERTIES) -> list[str]:
    """Names of the regression's coefficients in report order: intercept, gen_*, cand_*."""
    return [INTERCEPT] + [f"gen_{p}" for p in predictors] + [f"cand_{p}" for p in predictors]


def build_regression_frame(
    scores: pd.DataFrame,
    properties: pd.DataFrame,
    predictors: Sequence[str] = PROPERTIES,
) -> pd.DataFrame:
    """Assemble the observation table of the misidentification regression (docs/method.md §8).

    Parameters
    ----------
    scores : DataFrame
        Long table with columns ``simulation, generator, candidate, score``: ``score`` is the
        candidate's score on the generator's synthetic data of that simulation (at the largest
        training size). Every (simulation, generator) must include the generator's own row
        (candidate == generator); (simulation, generator, candidate) must be unique.
    properties : DataFrame
        One row per model, indexed by model name, with a column per predictor (by default
        ``n_params, embedding_dim, alignment_shift, ed_before, ed_after``). Models absent from
        ``scores`` are ignored; z-scoring uses exactly the models that appear in ``scores``.
    predictors : sequence of str
        Property columns to use (default :data:`PROPERTIES`). A study in which a property is
        constant across models (e.g. ``embedding_dim`` under PCA-k) must leave it out.

    Returns
    -------
    DataFrame
        One row per (simulation, generator g, candidate m != g), sorted by those keys, with
        ``acc_diff_raw`` (score of g minus score of m on g's data), ``acc_diff`` (its z-score,
        ddof = 1), and ``gen_<prop>`` / ``cand_<prop>`` (the z-scored properties of g and m).

    Raises
    ------
    ValueError
        On missing columns, NaN or infinite values, duplicate rows, missing self-scores, models
        missing from ``properties``, fewer than three models, or a predictor or outcome without
        variance.
    """
    predictors = list(predictors)
    if not predictors:
        raise ValueError("predictors must name at least one property column")
    if len(set(predictors)) != len(predictors):
        raise ValueError(f"predictors contains duplicates: {predictors}")
    _require_columns(scores, SCORE_COLUMNS, "scores")
    _require_columns(properties, predictors, "properties")

    df = scores.loc[:, list(SCORE_COLUMNS)].copy()
    for col in SCORE_COLUMNS:
        n_na = int(df[col].isna().sum())
        if n_na:
            raise ValueError(f"scores column {col!r} contains {n_na} missing value(s) (NaN)")
    try:
        df["score"] = df["score"].astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores column 'score' must be numeric: {exc}") from exc
    if not np.all(np.isfinite(df["score"].to_numpy())):
        raise ValueError("scores column 'score' contains infinite values")
    keys = ["simulation", "generator", "candidate"]
    dup = df.duplicated(keys)
    if dup.any():
        example = df.loc[dup, keys].iloc[0].tolist()
        raise ValueError(
            f"scores has {int(dup.sum())} duplicate (simulation, generator, candidate) row(s), "
            f"e.g. {example}"
        )

    models = pd.unique(pd.concat([df["generator"], df["candidate"]], ignore_index=True))
    if len(models) < _MIN_MODELS:
        raise ValueError(
            f"the regression needs at least {_MIN_MODELS} models, scores has {len(models)}: "
            f"{list(models)}"
        )
    if properties.index.has_duplicates:
        dups = properties.index[properties.index.duplicated()].unique().tolist()
        raise ValueError(f"properties index has duplicate model name(s): {dups}")
    absent = [m for m in models if m not in properties.index]
    if absent:
        raise ValueError(f"model(s) {absent} appear in scores but not in the properties index")

    props = properties.loc[list(models), predictors]
    try:
        props = props.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"properties columns {predictors} must be numeric: {exc}") from exc
    bad = ~np.isfinite(props.to_numpy())
    if bad.any():
        rows, cols = np.nonzero(bad)
        where = [(props.index[r], predictors[c]) for r, c in zip(rows, cols, strict=True)]
        raise ValueError(f"properties has NaN or infinite values at (model, column) {where[:5]}")
    zprops = pd.DataFrame(
        {p: _zscore(props[p].to_numpy(), f"property {p!r} across models") for p in predictors},
        index=props.index,
    )

    is_self = df["generator"] == df["candidate"]
    own = df.loc[is_self].set_index(["simulation", "generator"])["score"]
    others = df.loc[~is_self]
    if others.empty:
        raise ValueError("scores has no rows with candidate != generator")
    gen_keys = pd.MultiIndex.from_frame(others[["simulation", "generator"]])
    own_score = own.reindex(gen_keys).to_numpy()
    if np.isnan(own_score).any():
        missing = gen_keys[np.isnan(own_score)].unique().tolist()
        raise ValueError(
            "scores lacks the generator's own score (candidate == generator) for "
            f"(simulation, generator) {missing[:5]}"
        )

    frame = others[["simulation", "generator", "candidate"]].reset_index(drop=True)
    frame["acc_diff_raw"] = own_score - others["score"].to_numpy()
    frame[_OUTCOME] = _zscore(frame["acc_diff_raw"].to_numpy(), "the accuracy difference")
    gen_vals = zprops.loc[frame["generator"]].to_numpy()
    cand_vals = zprops.loc[frame["candidate"]].to_numpy()
    for j, p in enumerate(predictors):
        frame[f"gen_{p}"] = gen_vals[:, j]
    for j, p in enumerate(predictors):
        frame[f"cand_{p}"] = cand_vals[:, j]
    frame = frame.sort_values(["simulation", "generator", "candidate"], kind="stable")
    return frame.reset_index(drop=True)


def _frame_predictors(frame: pd.DataFrame) -> list[str]:
    """Property names p with both gen_p and cand_p columns, in column order."""
    cols = set(frame.columns)
    return [c[4:] for c in frame.columns if c.startswith("gen_") and f"cand_{c[4:]}" in cols]


def _pair_design(
    frame: pd.DataFrame, terms: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Collapse observations to (generator, candidate) pairs.

    Returns the pair design rows x_p (with intercept), the number of observations n_p and the
    outcome sum per pair, the generator and candidate model indices of each pair, and the model
    list. Predictors are functions of (g, m), so x_p is shared by all observations of the pair.
    """
    models = list(pd.unique(pd.concat([frame["generator"], frame["candidate"]], ignore_index=True)))
    index = {m: i for i, m in enumerate(models)}
    cols = [t for t in terms if t != INTERCEPT]
    grouped = frame.groupby(["generator", "candidate"], sort=False)
    firsts = grouped[cols].first()
    spread = (grouped[cols].max() - grouped[cols].min()).to_numpy()
    if spread.size and np.nanmax(spread) > 1e-9:
        raise ValueError("predictors must be constant within each (generator, candidate) pair")
    n_p = grouped.size().to_numpy().astype(np.float64)
    ysum = grouped[_OUTCOME].sum().to_numpy()
    x = np.column_stack([np.ones(len(firsts)), firsts.to_numpy(dtype=np.float64)])
    g_idx = np.array([index[g] for g, _ in firsts.index], dtype=np.intp)
    m_idx = np.array([index[m] for _, m in firsts.index], dtype=np.intp)
    return x, n_p, ysum, g_idx, m_idx, models


def _weighted_pair_fits(
    x: np.ndarray,
    n_p: np.ndarray,
    ysum: np.ndarray,
    g_idx: np.ndarray,
    m_idx: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients for a batch of model-count vectors.

    For counts c (B x K), observation rows of pair (g, m) are replicated c_g c_m times. The
    replicated normal equations are sum_p w_p n_p x_p x_p^T b = sum_p w_p x_p ysum_p with
    w_p = c_g c_m. Returns coefficients (B x k; NaN where rank-deficient) and a boolean
    rank-deficiency flag per resample (fewer than k eigenvalues of the weighted Gram above
    ``_GRAM_RTOL`` times the largest).
    """
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    k = x.shape[1]
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), k * k)
    w = counts[:, g_idx] * counts[:, m_idx]  # (B, P)
    gram = ((w * n_p) @ outer).reshape(-1, k, k)
    rhs = (w * ysum) @ x  # (B, k)
    evals, evecs = np.linalg.eigh(gram)
    top = evals[:, -1:]
    deficient = ~np.all(evals > _GRAM_RTOL * np.maximum(top, 1e-300), axis=1)
    coefs = np.full((len(counts), k), np.nan)
    ok = ~deficient
    if ok.any():
        proj = np.einsum("bji,bj->bi", evecs[ok], rhs[ok]) / evals[ok]
        coefs[ok] = np.einsum("bij,bj->bi", evecs[ok], proj)
    return coefs, deficient


def fit_misidentification_regression(
    frame: pd.DataFrame,
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """OLS of the z-scored accuracy difference with model-level bootstrap inference
    (docs/method.md §8).

    Parameters
    ----------
    frame : DataFrame
        Output of :func:`build_regression_frame` (needs ``generator``, ``candidate``,
        ``acc_diff`` and matching ``gen_<prop>`` / ``cand_<prop>`` columns).
    n_boot : int
        Number of model-level bootstrap resamples (the method: 10,000).
    seed : int
        Seed of the ``numpy.random.Generator`` that draws the resamples; the same seed gives
        identical results.
    alpha : float
        Level of the percentile CIs (1 - alpha) and of the Bonferroni-corrected tests.

    Returns
    -------
    (DataFrame, dict)
        One row per coefficient (intercept, gen_*, cand_*) with ``term, coef, ci_low, ci_high,
        p_boot, p_bonferroni, significant, vif``, and metadata ``n_rows, n_models, n_pairs,
        n_boot, n_boot_valid, n_rank_deficient, seed, alpha, r_squared``.

    Raises
    ------
    ValueError
        On missing columns, non-finite values, fewer than three models, invalid ``n_boot`` or
        ``alpha``, a rank-deficient full-sample design, or when no bootstrap resample identifies
        the coefficients.
    """
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    _require_columns(frame, ["generator", "candidate", _OUTCOME], "frame")
    predictors = _frame_predictors(frame)
    if not predictors:
        raise ValueError(
            "frame has no predictor columns (pairs gen_<prop>, cand_<prop>); "
            "build it with build_regression_frame"
        )
    terms = regression_terms(predictors)
    cols = [_OUTCOME] + terms[1:]
    values = frame[cols].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = [c for c in cols if not np.all(np.isfinite(frame[c].to_numpy(dtype=np.float64)))]
        raise ValueError(f"frame has NaN or infinite values in column(s) {bad}")
    if frame[["generator", "candidate"]].isna().any().any():
        raise ValueError("frame has missing generator or candidate names")
    if (frame["generator"] == frame["candidate"]).any():
        raise ValueError("frame must not contain self-pairs (candidate == generator)")

    x, n_p, ysum, g_idx, m_idx, models = _pair_design(frame, terms)
    n_models = len(models)
    if n_models < _MIN_MODELS:
        raise ValueError(f"the regression needs at least {_MIN_MODELS} models, got {n_models}")

    y = values[:, 0]
    exog = np.column_stack([np.ones(len(frame)), values[:, 1:]])
    if np.linalg.matrix_rank(exog) < exog.shape[1]:
        raise ValueError(
            f"the design matrix is rank-deficient (rank {np.linalg.matrix_rank(exog)} < "
            f"{exog.shape[1]} terms): a predictor is constant or collinear with others"
        )
    ols = sm.OLS(y, exog).fit()
    coef = np.asarray(ols.params, dtype=np.float64)
    vif = np.array([np.nan] + [variance_inflation_factor(exog, j) for j in range(1, exog.shape[1])])

    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, len(terms)))
    deficient = np.zeros(n_boot, dtype=bool)
    for start in range(0, n_boot, _BOOT_CHUNK):
        stop = min(start + _BOOT_CHUNK, n_boot)
        counts = rng.multinomial(n_models, np.full(n_models, 1.0 / n_models), size=stop - start)
        boot[start:stop], deficient[start:stop] = _weighted_pair_fits(
            x, n_p, ysum, g_idx, m_idx, counts
        )
    valid = boot[~deficient]
    n_valid = len(valid)
    if n_valid == 0:
        raise ValueError(
            f"all {n_boot} bootstrap resamples were rank-deficient; with {n_models} models the "
            "coefficients cannot be bootstrapped"
        )

    ci_low, ci_high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    tail = np.minimum((valid <= 0.0).sum(axis=0), (valid >= 0.0).sum(axis=0))
    p_boot = np.clip(2.0 * tail / n_valid, 1.0 / n_valid, 1.0)
    reject, p_bonf, _, _ = multipletests(p_boot, alpha=alpha, method="bonferroni")

    table = pd.DataFrame(
        {
            "term": terms,
            "coef": coef,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "p_boot": p_boot,
            "p_bonferroni": p_bonf,
            "significant": np.asarray(reject, dtype=bool),
            "vif": vif,
        }
    )
    meta: dict[str, Any] = {
        "n_rows": int(len(frame)),
        "n_models": int(n_models),
        "n_pairs": int(len(x)),
        "n_boot": int(n_boot),
        "n_boot_valid": int(n_valid),
        "n_rank_deficient": int(deficient.sum()),
        "seed": int(seed),
        "alpha": float(alpha),
        "r_squared": float(ols.rsquared),
    }
    return table, meta
