"""Validation of one probe problem's arrays (features, triplets, answers): shapes, dtypes, ranges
and finiteness, each error naming the array and the place (``check_probe_inputs``).

Pure numpy, so that a caller that only validates and fits (``recovery fit-probe``) does not import
scikit-learn; the estimator (``core.estimator.TripletProbe``) uses the same checks.
"""

from __future__ import annotations

import numpy as np


class ProbeInputError(ValueError):
    """A probe problem's arrays are malformed; the message names the array and the place."""


def check_probe_inputs(
    X: np.ndarray,
    triplets: np.ndarray,
    answers: np.ndarray | None = None,
    names: tuple[str, str, str] = ("X", "triplets", "answers"),
) -> None:
    """Shapes, dtypes, ranges and finiteness of a probe problem: features (n >= 3, p) finite
    floats; triplets (m, 3) integers in [0, n) with three distinct concepts per row; answers
    (m,) in {0, 1, 2}. ``names`` label the three arrays in the messages (the CLI passes its
    options and files)."""
    fx, ft, fa = names
    X, T = np.asarray(X), np.asarray(triplets)
    if X.ndim != 2 or X.shape[0] < 3 or X.shape[1] < 1:
        raise ProbeInputError(f"{fx}: expected a 2-D array (n >= 3, p), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise ProbeInputError(f"{fx}: expected a float array, got dtype {X.dtype}")
    bad = ~np.isfinite(X)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ProbeInputError(
            f"{fx}: {int(bad.sum())} NaN or inf values (first at row {row}, column {col})"
        )
    if T.ndim != 2 or T.shape[1] != 3 or T.shape[0] < 1:
        raise ProbeInputError(f"{ft}: expected an int array of shape (m, 3), got {T.shape}")
    if not np.issubdtype(T.dtype, np.integer):
        raise ProbeInputError(f"{ft}: expected an integer array, got dtype {T.dtype}")
    n = X.shape[0]
    out = (T < 0) | (T >= n)
    if out.any():
        row = int(np.argwhere(out.any(1))[0, 0])
        raise ProbeInputError(
            f"{ft}: concept index out of range [0, {n}) in row {row}: {T[row].tolist()} "
            f"({int(out.any(1).sum())} rows in all)"
        )
    rep = (T[:, 0] == T[:, 1]) | (T[:, 0] == T[:, 2]) | (T[:, 1] == T[:, 2])
    if rep.any():
        row = int(np.argmax(rep))
        raise ProbeInputError(f"{ft}: row {row} repeats a concept: {T[row].tolist()}")
    if answers is None:
        return
    A = np.asarray(answers)
    if A.ndim != 1 or A.shape[0] != T.shape[0]:
        raise ProbeInputError(
            f"{fa}: expected a 1-D array with one answer per triplet ({T.shape[0]}), got shape "
            f"{A.shape}"
        )
    if not np.issubdtype(A.dtype, np.integer):
        raise ProbeInputError(f"{fa}: expected an integer array, got dtype {A.dtype}")
    bad_a = (A < 0) | (A > 2)
    if bad_a.any():
        row = int(np.argmax(bad_a))
        raise ProbeInputError(
            f"{fa}: answers must be 0, 1 or 2 (the odd one's position); row {row} is {int(A[row])}"
        )
