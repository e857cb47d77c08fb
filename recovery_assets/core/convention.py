"""Which column of a judgement row is the odd one out, tested from the data (docs/method.md §2).

THINGS odd-one-out rows ``(i, j, k)`` are ``[pair, pair, odd]`` (column 2 the odd one out); some
public copies are ``[odd, pair, pair]``, and some old files are in a wrong concept order. Instead
of assuming a convention, :func:`detect_convention` scores the rows with a reference similarity
(e.g. zero-shot dot products of a reference model's features, or
:func:`~recovery_assets.core.pixels.pixel_reference`) and tests which column is predicted to be
the odd one out significantly more often than chance (1/3).

Pure numpy / scipy on arrays; reading the files is :mod:`recovery_assets.sources.human`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

__all__ = ["ConventionResult", "SimilarityFn", "detect_convention"]

#: Maps an (m, 3) triplet array to (m, 3) logits ``[s_jk, s_ik, s_ij]``.
SimilarityFn = Callable[[np.ndarray], np.ndarray]

_AMBIGUOUS = "ambiguous"
_DECISION_BY_COLUMN = {0: "odd_pair_pair", 2: "pair_pair_odd"}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class ConventionResult:
    """Outcome of :func:`detect_convention`.

    Attributes
    ----------
    decision : ``"pair_pair_odd"``, ``"odd_pair_pair"`` or ``"ambiguous"``.
    unambiguous : True when ``decision`` is a convention.
    convention : the convention, or None when ambiguous.
    fractions : fraction of scored rows whose predicted odd one out is in column 0, 1, 2.
    z : z-scores of the three fractions against 1/3 (normal approximation of the binomial).
    p_values : one-sided p-values of ``z``.
    best, second : the columns with the highest and second-highest fraction.
    margin, z_margin : ``fractions[best] - fractions[second]`` and its z-score (the
        multinomial variance of a difference of two cell proportions).
    n : rows scored (subsampled rows without a tie for the largest logit).
    n_ties : subsampled rows dropped because several logits tied for the maximum.
    n_rows : rows given; ``subsampled`` tells whether a subsample was scored.
    z_threshold, min_margin : the decision thresholds used.
    diagnosis : a sentence explaining the decision.
    """

    decision: str
    unambiguous: bool
    convention: str | None
    fractions: tuple[float, float, float]
    z: tuple[float, float, float]
    p_values: tuple[float, float, float]
    best: int
    second: int
    margin: float
    z_margin: float
    n: int
    n_ties: int
    n_rows: int
    subsampled: bool
    z_threshold: float
    min_margin: float
    diagnosis: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (non-finite numbers become None)."""
        return {
            "decision": self.decision,
            "unambiguous": self.unambiguous,
            "convention": self.convention,
            "fractions": [_finite_or_none(f) for f in self.fractions],
            "z": [_finite_or_none(z) for z in self.z],
            "p_values": [_finite_or_none(p) for p in self.p_values],
            "best": self.best,
            "second": self.second,
            "margin": _finite_or_none(self.margin),
            "z_margin": _finite_or_none(self.z_margin),
            "n": self.n,
            "n_ties": self.n_ties,
            "n_rows": self.n_rows,
            "subsampled": self.subsampled,
            "z_threshold": self.z_threshold,
            "min_margin": self.min_margin,
            "diagnosis": self.diagnosis,
        }


def detect_convention(
    rows: np.ndarray,
    similarity_fn: SimilarityFn,
    *,
    min_margin: float = 0.02,
    z_threshold: float = 5.0,
    max_rows: int = 200_000,
    seed: int = 0,
) -> ConventionResult:
    """Detect the column of the odd one out from a reference similarity (docs/method.md §2).

    ``similarity_fn(t)`` maps an ``(m, 3)`` array of rows ``(i, j, k)`` to ``(m, 3)`` logits
    ``[s_jk, s_ik, s_ij]`` (e.g. zero-shot dot products of a reference model's features); the
    predicted odd one out of a row is the argmax position. Over a seeded subsample of at most
    ``max_rows`` rows (rows whose largest logit is tied are dropped), the fraction ``f_c`` of rows
    predicted to have the odd one out in column ``c`` is compared with chance, 1/3, by the normal
    approximation of the binomial test, ``z_c = (f_c - 1/3) / sqrt((2/9) / n)``.

    Decision, with ``best`` / ``second`` the columns with the largest two fractions:

    - unambiguous when ``z_best > z_threshold`` (default 5, one-sided p < 3e-7), the best column
      beats the second one significantly (``z_margin > z_threshold``, with the multinomial variance
      ``(f_b + f_s - (f_b - f_s)^2) / n`` of the difference) and by at least ``min_margin``;
      then column 2 -> ``"pair_pair_odd"`` (THINGS), column 0 -> ``"odd_pair_pair"``;
    - otherwise ``"ambiguous"``: no column significantly above chance means the concept order is
      wrong or the reference is uninformative; column 1 highest is no known convention.

    Raises
    ------
    ValueError
        On malformed rows or logits (wrong shape, non-finite values).
    """
    t = np.asarray(rows)
    if t.ndim != 2 or t.shape[1] != 3 or (t.size and not np.issubdtype(t.dtype, np.integer)):
        raise ValueError(f"rows must be an (m, 3) integer array, got {t.shape} {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError("convention detection needs at least one row")
    if not (z_threshold > 0 and min_margin >= 0):
        raise ValueError("z_threshold must be positive and min_margin non-negative")
    if max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    n_rows = int(t.shape[0])
    subsampled = n_rows > max_rows
    if subsampled:
        pick = np.sort(np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False))
        t = t[pick]
    logits = np.asarray(similarity_fn(t.astype(np.int64, copy=False)), dtype=np.float64)
    if logits.shape != t.shape:
        raise ValueError(f"similarity_fn must return shape {t.shape}, got {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("similarity_fn returned non-finite logits")
    top = logits.max(axis=1, keepdims=True)
    tied = (logits == top).sum(axis=1) > 1
    predicted = np.argmax(logits[~tied], axis=1)
    n = int(predicted.size)
    counts = np.bincount(predicted, minlength=3).astype(np.float64)

    if n == 0:
        nan3 = (math.nan, math.nan, math.nan)
        return ConventionResult(
            decision=_AMBIGUOUS,
            unambiguous=False,
            convention=None,
            fractions=nan3,
            z=nan3,
            p_values=nan3,
            best=-1,
            second=-1,
            margin=math.nan,
            z_margin=math.nan,
            n=0,
            n_ties=int(tied.sum()),
            n_rows=n_rows,
            subsampled=subsampled,
            z_threshold=float(z_threshold),
            min_margin=float(min_margin),
            diagnosis="the reference similarity ties the largest logit on every row: "
            "concept order wrong or reference uninformative",
        )

    fractions = counts / n
    z = (fractions - 1.0 / 3.0) / math.sqrt(2.0 / 9.0 / n)
    order = np.argsort(-fractions, kind="stable")
    best, second = int(order[0]), int(order[1])
    margin = float(fractions[best] - fractions[second])
    var = (fractions[best] + fractions[second] - margin**2) / n
    z_margin = margin / math.sqrt(var) if var > 0 else (math.inf if margin > 0 else 0.0)
    z_best = float(z[best])
    shown = ", ".join(f"{f:.3f}" for f in fractions)

    above = z_best > z_threshold
    separated = z_margin > z_threshold and margin >= min_margin
    decision = _AMBIGUOUS
    if not above:
        diagnosis = (
            f"no column is predicted as the odd one out above chance (fractions {shown}, "
            f"max z = {z_best:.1f} <= {z_threshold}): concept order wrong or reference "
            f"uninformative"
        )
    elif not separated:
        diagnosis = (
            f"columns {best} and {second} are not separated (fractions {shown}, margin "
            f"{margin:.3f}, z = {z_margin:.1f}; need z > {z_threshold} and margin >= "
            f"{min_margin}): convention unclear"
        )
    elif best not in _DECISION_BY_COLUMN:
        diagnosis = (
            f"column {best} is predicted as the odd one out most often (fractions {shown}): "
            f"not a known convention (columns permuted?)"
        )
    else:
        decision = _DECISION_BY_COLUMN[best]
        diagnosis = (
            f"column {best} is predicted as the odd one out in {fractions[best]:.3f} of {n} rows "
            f"(z = {z_best:.1f}; margin over column {second} {margin:.3f}, z = {z_margin:.1f}): "
            f"{decision}"
        )
    unambiguous = decision != _AMBIGUOUS
    return ConventionResult(
        decision=decision,
        unambiguous=unambiguous,
        convention=decision if unambiguous else None,
        fractions=tuple(float(f) for f in fractions),  # type: ignore[arg-type]
        z=tuple(float(v) for v in z),  # type: ignore[arg-type]
        p_values=tuple(float(p) for p in norm.sf(z)),  # type: ignore[arg-type]
        best=best,
        second=second,
        margin=margin,
        z_margin=float(z_margin),
        n=n,
        n_ties=int(tied.sum()),
        n_rows=n_rows,
        subsampled=subsampled,
        z_threshold=float(z_threshold),
        min_margin=float(min_margin),
        diagnosis=diagnosis,
    )
