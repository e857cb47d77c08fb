"""Human odd-one-out judgements: fast validated reading, convention detection, metadata.

THINGS odd-one-out files (study.md §2) hold one judgement per row, three 0-based concept indices
(the row order of ``things_concepts.tsv``), either as text (whitespace-separated integers, no
header, ``trainset.txt`` ...) or as ``.npy`` integer arrays of shape ``(m, 3)``. The THINGS
convention is ``[pair, pair, odd]``: columns 0 and 1 were judged most similar and column 2 is the
odd one out. Some public copies use ``[odd, pair, pair]`` and some old files are in a wrong
concept order, so the convention is *detected from the data* instead of assumed:

- :func:`read_triplet_file` parses one file (``numpy.loadtxt``'s C parser: about a second for
  THINGS' 4.7M rows) and validates it. Every problem raises :class:`HumanDataError` naming the
  file and, for text files, the 1-based line (for ``.npy`` the 1-based row). Line numbers come
  from a vectorised byte scan done in bounded chunks, only when a problem was found.
- :func:`detect_convention` scores the rows with a reference similarity (e.g. zero-shot dot
  products of a reference model's features) and tests which column is predicted to be the odd
  one out significantly more often than 1/3.
- :func:`load_human_judgements` reads a THINGS-shaped folder, records sha256 and row counts,
  detects the convention, converts every file to canonical ``[pair, pair, odd]`` rows and computes
  the leave-one-out noise ceiling of the test sets.

Pure numpy (no dagster); the triplet conventions and the ceiling come from
:mod:`recovery_assets.core.triplets`.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recovery_assets.core.triplets import (
    NoiseCeiling,
    human_rows_to_positions,
    noise_ceiling,
    positions_to_human_rows,
)

__all__ = [
    "CONVENTION_FILES",
    "REQUIRED_FILES",
    "ConventionResult",
    "HumanData",
    "HumanDataError",
    "SimilarityFn",
    "detect_convention",
    "find_judgement_file",
    "load_human_judgements",
    "read_triplet_file",
]

#: The THINGS judgement files, in their usual order.
CONVENTION_FILES = ("trainset", "validationset", "testset1", "testset2", "testset3")
#: Files that must be present: training data (convention, probes) and test set 2 (noise ceiling).
REQUIRED_FILES = ("trainset", "testset2")
#: Maps an (m, 3) triplet array to (m, 3) logits ``[s_jk, s_ik, s_ij]``.
SimilarityFn = Callable[[np.ndarray], np.ndarray]

_AMBIGUOUS = "ambiguous"
_DECISION_BY_COLUMN = {0: "odd_pair_pair", 2: "pair_pair_odd"}
# Bytes read per step by the diagnostic scan of text files (bounded memory on the error path).
_SCAN_CHUNK = 1 << 22
# Longest digit run accepted as an index (anything longer cannot be a concept index).
_MAX_DIGITS = 18
_WHITESPACE = b" \t\r\n\x0b\x0c"
_NAN_TOKENS = {"nan", "-nan", "+nan", "na", "n/a", "null", "none", "<na>"}


class HumanDataError(ValueError):
    """A human judgement file or folder is missing, malformed or in an unknown convention."""


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------


def _text_chunks(path: Path) -> Iterator[tuple[bytes, int]]:
    """Yield ``(chunk, first_line_index)``; every chunk but the last ends with a newline."""
    line0 = 0
    rest = b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_SCAN_CHUNK)
            if not block:
                if rest:
                    yield rest, line0
                return
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            chunk, rest = data[:cut], data[cut:]
            yield chunk, line0
            line0 += chunk.count(b"\n")


@dataclass
class _ChunkScan:
    data: bytes
    newlines: np.ndarray  # byte offsets of the newlines
    counts: np.ndarray  # tokens per line of the chunk
    starts: np.ndarray  # token byte offsets
    ends: np.ndarray
    token_line: np.ndarray  # line (within the chunk) of every token
    token_ok: np.ndarray  # token is an optionally signed run of at most _MAX_DIGITS digits

    def line_text(self, line: int) -> str:
        lo = 0 if line == 0 else int(self.newlines[line - 1]) + 1
        hi = int(self.newlines[line]) if line < self.newlines.size else len(self.data)
        text = self.data[lo:hi].decode("latin-1").rstrip("\r")
        return text if len(text) <= 80 else text[:77] + "..."

    def token(self, index: int) -> str:
        return self.data[int(self.starts[index]) : int(self.ends[index])].decode("latin-1")


def _scan_chunk(data: bytes) -> _ChunkScan:
    """Tokenise a chunk of a text file with vectorised byte operations."""
    b = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(b == 10)
    n_lines = newlines.size + (0 if data.endswith(b"\n") else 1)
    is_token = ~np.isin(b, np.frombuffer(_WHITESPACE, dtype=np.uint8))
    edge = np.diff(is_token.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edge == 1)
    ends = np.flatnonzero(edge == -1)
    token_line = np.searchsorted(newlines, starts)
    counts = np.bincount(token_line, minlength=n_lines)
    if starts.size:
        non_digit = (is_token & ((b < 48) | (b > 57))).astype(np.int32)
        n_bad = np.add.reduceat(non_digit, starts)  # whitespace between tokens counts 0
        length = ends - starts
        signed = np.isin(b[starts], np.frombuffer(b"+-", dtype=np.uint8))
        n_digits = length - signed
        token_ok = (n_bad == signed) & (n_digits >= 1) & (n_digits <= _MAX_DIGITS)
    else:
        token_ok = np.ones(0, dtype=bool)
    return _ChunkScan(data, newlines, counts, starts, ends, token_line, token_ok)


def _token_problem(token: str, n_concepts: int) -> str:
    if token.lower() in _NAN_TOKENS:
        return f"missing value {token!r} (NaN)"
    body = token[1:] if token[:1] in "+-" else token
    if body.isascii() and body.isdigit():
        return f"concept index {token} out of range [0, {n_concepts})"
    return f"non-integer token {token!r}"


def _diagnose_text(path: Path, n_concepts: int) -> str | None:
    """The first format problem of a text file as ``", line L: ..."`` / ``": ..."``, or None."""
    n_tokens = 0
    for data, line0 in _text_chunks(path):
        scan = _scan_chunk(data)
        n_tokens += scan.starts.size
        bad_token = np.flatnonzero(~scan.token_ok)
        bad_count = np.flatnonzero((scan.counts != 0) & (scan.counts != 3))
        token_line = int(scan.token_line[bad_token[0]]) if bad_token.size else None
        count_line = int(bad_count[0]) if bad_count.size else None
        if token_line is not None and (count_line is None or token_line <= count_line):
            problem = _token_problem(scan.token(int(bad_token[0])), n_concepts)
            return f", line {line0 + token_line + 1}: {problem}"
        if count_line is not None:
            n = int(scan.counts[count_line])
            return (
                f", line {line0 + count_line + 1}: expected 3 integers per row, found {n} "
                f"({scan.line_text(count_line)!r})"
            )
    if n_tokens == 0:
        return ": empty file (no triplets)"
    return None


def _line_of_row(path: Path, row: int) -> int:
    """1-based line of the 0-based data row ``row`` of a text file (blank lines are skipped)."""
    rows_before = 0
    for data, line0 in _text_chunks(path):
        nonblank = np.flatnonzero(_scan_chunk(data).counts > 0)
        if row < rows_before + nonblank.size:
            return line0 + int(nonblank[row - rows_before]) + 1
        rows_before += nonblank.size
    raise AssertionError(f"row {row} not found in {path}")  # pragma: no cover


def _read_text(path: Path, n_concepts: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": diagnosed below
            rows = np.loadtxt(path, dtype=np.int64, comments=None, ndmin=2)
    except (ValueError, OverflowError) as exc:  # includes UnicodeDecodeError
        problem = _diagnose_text(path, n_concepts)
        raise HumanDataError(f"{path}{problem or f': cannot be parsed ({exc})'}") from None
    if rows.size == 0 or rows.shape[1] != 3:
        problem = _diagnose_text(path, n_concepts)
        detail = problem or f": expected 3 integers per row, found {rows.shape[1]}"
        raise HumanDataError(f"{path}{detail}")
    return rows


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise HumanDataError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise HumanDataError(f"{path}: expected one array, got {type(arr).__name__}")
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise HumanDataError(
            f"{path}: expected an (m, 3) array (3 integers per row), got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise HumanDataError(f"{path}: empty file (no triplets)")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
            row = int(np.flatnonzero((arr > np.iinfo(np.int64).max).any(axis=1))[0])
            raise HumanDataError(f"{path}, row {row + 1}: concept index out of range")
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        nan = np.isnan(arr).any(axis=1)
        if nan.any():
            row = int(np.flatnonzero(nan)[0])
            raise HumanDataError(f"{path}, row {row + 1}: missing value (NaN)")
        bad = (~np.isfinite(arr) | (arr != np.round(arr))).any(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise HumanDataError(f"{path}, row {row + 1}: non-integer value {arr[row].tolist()}")
        return arr.astype(np.int64)
    raise HumanDataError(f"{path}: expected an integer array, got dtype {arr.dtype}")


def read_triplet_file(path: str | os.PathLike[str], n_concepts: int) -> np.ndarray:
    """Read and validate one THINGS odd-one-out file (study.md §2).

    Parameters
    ----------
    path : a text file (whitespace-separated 0-based integers, 3 per row, no header; blank lines
        are ignored) or a ``.npy`` file holding an integer array of shape ``(m, 3)`` (a float
        array is accepted only when every value is a finite integer).
    n_concepts : number of concepts; every index must lie in ``[0, n_concepts)``.

    Returns
    -------
    (m, 3) int64 array, the rows exactly as stored (no convention applied).

    Raises
    ------
    HumanDataError
        The message names the file and, where it applies, the 1-based line (text) or row
        (``.npy``): a row without exactly 3 numbers, a non-integer token, a missing value (NaN),
        a negative index or one ``>= n_concepts``, a row repeating a concept, an empty file, or a
        missing / unreadable file. Nothing is returned when any check fails.

    Text files are parsed by ``numpy.loadtxt``'s C reader (about 0.7 s and ~260 MB extra peak for
    THINGS' 4.7M rows); values are validated with vectorised checks. Line numbers for messages are
    found by a chunked byte scan that runs only when a problem was detected.
    """
    n = _check_n_concepts(n_concepts)
    p = Path(path)
    if not p.is_file():
        raise HumanDataError(f"{p}: no such file")
    is_npy = p.suffix.lower() == ".npy"
    rows = _read_npy(p) if is_npy else _read_text(p, n)

    def where(row: int) -> str:
        return f"row {row + 1}" if is_npy else f"line {_line_of_row(p, row)}"

    low = rows.min(axis=1) < 0
    high = rows.max(axis=1) >= n
    bad = low | high
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = int(rows[row].min()) if low[row] else int(rows[row].max())
        kind = "negative concept index" if low[row] else "concept index"
        raise HumanDataError(
            f"{p}, {where(row)}: {kind} {value} out of range [0, {n}) (row {rows[row].tolist()})"
        )
    repeated = (rows[:, 0] == rows[:, 1]) | (rows[:, 1] == rows[:, 2]) | (rows[:, 0] == rows[:, 2])
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise HumanDataError(
            f"{p}, {where(row)}: row {rows[row].tolist()} repeats a concept "
            f"(a triplet needs 3 distinct concepts)"
        )
    return rows


def _check_n_concepts(n_concepts: int) -> int:
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, int | np.integer):
        raise ValueError(f"n_concepts must be an integer, got {n_concepts!r}")
    if n_concepts < 3:
        raise ValueError(f"n_concepts must be at least 3, got {n_concepts}")
    return int(n_concepts)


# --------------------------------------------------------------------------------------------
# Convention detection
# --------------------------------------------------------------------------------------------


def _normal_sf(z: float) -> float:
    """One-sided upper tail of the standard normal."""
    if math.isnan(z):
        return math.nan
    return 0.5 * math.erfc(z / math.sqrt(2.0))


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
    """Detect the column of the odd one out from a reference similarity (study.md §2).

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
        p_values=tuple(_normal_sf(float(v)) for v in z),  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def find_judgement_file(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The file holding judgement set ``name`` in a THINGS-shaped folder, or None.

    Looked up in this order: ``folder/name.npy``, ``folder/name.txt``,
    ``folder/triplets/name.npy``, ``folder/triplets/name.txt`` (the first that exists wins).
    """
    root = Path(folder)
    for sub in (root, root / "triplets"):
        for suffix in (".npy", ".txt"):
            candidate = sub / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


@dataclass
class HumanData:
    """Validated human judgements in canonical ``[pair, pair, odd]`` rows (study.md §2).

    Attributes
    ----------
    rows : name -> (m, 3) int64 canonical rows (column 2 is the odd one out).
    convention : the convention of the source files (detected on the training file).
    detection : name -> :class:`ConventionResult` of that file.
    sha256 : name -> hex digest of the file as stored.
    n_rows : name -> number of rows.
    noise_ceiling : name -> :class:`~recovery_assets.core.triplets.NoiseCeiling` for every test set
        with repeated triplets (always ``testset2``).
    paths : name -> the file read.
    n_concepts : number of concepts the indices refer to.
    """

    rows: dict[str, np.ndarray]
    convention: str
    detection: dict[str, ConventionResult]
    sha256: dict[str, str]
    n_rows: dict[str, int]
    noise_ceiling: dict[str, NoiseCeiling]
    paths: dict[str, Path] = field(default_factory=dict)
    n_concepts: int = 0

    def positions(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(triplets, answer positions)`` of set ``name`` (the answer is always position 2)."""
        return human_rows_to_positions(self.rows[name], "pair_pair_odd")

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable provenance: convention, per-file hash / rows / detection, ceilings."""
        return {
            "convention": self.convention,
            "canonical_convention": "pair_pair_odd",
            "n_concepts": int(self.n_concepts),
            "files": {
                name: {
                    "path": str(self.paths.get(name, "")),
                    "sha256": self.sha256[name],
                    "n_rows": int(self.n_rows[name]),
                    "detection": self.detection[name].to_dict(),
                }
                for name in self.rows
            },
            "noise_ceiling": {
                name: {"ceiling": float(nc.ceiling), "n_triplets": int(nc.n_triplets)}
                for name, nc in self.noise_ceiling.items()
            },
        }


def _resolve_files(
    folder_or_files: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    files: Sequence[str],
) -> dict[str, Path]:
    missing_required = [r for r in REQUIRED_FILES if r not in files]
    if missing_required:
        raise ValueError(f"files must include the required sets {REQUIRED_FILES}")
    if isinstance(folder_or_files, Mapping):
        given = {str(k): Path(v) for k, v in folder_or_files.items()}
        unknown = sorted(set(given) - set(files))
        if unknown:
            raise ValueError(f"unknown judgement sets {unknown}; expected names from {files}")
        for name in REQUIRED_FILES:
            if name not in given:
                raise HumanDataError(f"the given files lack the required set {name!r}")
        for name, path in given.items():
            if not path.is_file():
                raise HumanDataError(f"{path}: no such file (judgement set {name!r})")
        return {name: given[name] for name in files if name in given}
    root = Path(folder_or_files)
    if not root.is_dir():
        raise HumanDataError(f"{root}: no such folder of human judgements")
    found: dict[str, Path] = {}
    for name in files:
        path = find_judgement_file(root, name)
        if path is None:
            if name in REQUIRED_FILES:
                raise HumanDataError(
                    f"{root}: required file {name}.txt or {name}.npy not found "
                    f"(looked in {root} and {root / 'triplets'})"
                )
            continue
        found[name] = path
    return found


def load_human_judgements(
    folder_or_files: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    n_concepts: int,
    similarity_fn: SimilarityFn,
    *,
    files: Sequence[str] = CONVENTION_FILES,
    min_margin: float = 0.02,
    z_threshold: float = 5.0,
    max_rows: int = 200_000,
    seed: int = 0,
) -> HumanData:
    """Read, validate and canonicalise the THINGS human judgements (study.md §2).

    Parameters
    ----------
    folder_or_files : a THINGS-shaped folder (each set ``name`` is looked up as
        :func:`find_judgement_file` describes) or a mapping ``name -> path``.
    n_concepts : number of concepts (rows of ``things_concepts.tsv``).
    similarity_fn : reference similarity for :func:`detect_convention`.
    files : the sets to load; ``trainset`` and ``testset2`` are required, others optional.
    min_margin, z_threshold, max_rows, seed : passed to :func:`detect_convention`.

    Steps: every file is read with :func:`read_triplet_file` (sha256 and row counts recorded);
    the convention is detected on every file and the training file's decides. The load fails when
    the training file is ambiguous (concept order may be wrong) or another file is unambiguously
    in the other convention. Every file is converted to (triplets, answers) with
    :func:`~recovery_assets.core.triplets.human_rows_to_positions` and back to canonical
    ``[pair, pair, odd]`` rows. The noise ceiling is computed on the canonical rows of every test
    set present (``testset2`` must contain repeated triplets; for the others it is recorded when
    they do).

    Raises
    ------
    HumanDataError
        Missing folder or required file (named), malformed file, ambiguous or mixed convention,
        or a test set 2 without repeated triplets.
    """
    n = _check_n_concepts(n_concepts)
    paths = _resolve_files(folder_or_files, files)

    raw: dict[str, np.ndarray] = {}
    sha: dict[str, str] = {}
    for name, path in paths.items():
        raw[name] = read_triplet_file(path, n)
        sha[name] = _sha256(path)

    options = {"min_margin": min_margin, "z_threshold": z_threshold, "max_rows": max_rows}
    detection = {
        name: detect_convention(rows, similarity_fn, seed=seed, **options)
        for name, rows in raw.items()
    }
    train = detection["trainset"]
    if not train.unambiguous:
        raise HumanDataError(
            f"{paths['trainset']}: cannot tell which column is the odd one out: "
            f"{train.diagnosis}. The concept order may be wrong (the file's indices must follow "
            f"the row order of things_concepts.tsv) or the reference similarity uninformative."
        )
    convention = train.decision
    for name, result in detection.items():
        if result.unambiguous and result.decision != convention:
            raise HumanDataError(
                f"{paths[name]}: detected convention {result.decision}, but the training file "
                f"{paths['trainset']} is {convention}: the files mix conventions"
            )

    canonical: dict[str, np.ndarray] = {}
    for name in list(raw):
        triplets, answers = human_rows_to_positions(raw.pop(name), convention)
        canonical[name] = positions_to_human_rows(triplets, answers, "pair_pair_odd")
        del triplets, answers

    ceilings: dict[str, NoiseCeiling] = {}
    for name, rows in canonical.items():
        if not name.startswith("testset"):
            continue
        try:
            ceilings[name] = noise_ceiling(rows)
        except ValueError as exc:
            if name == "testset2":
                raise HumanDataError(
                    f"{paths[name]}: no noise ceiling ({exc}); test set 2 must hold repeated "
                    f"triplets"
                ) from None
    return HumanData(
        rows=canonical,
        convention=convention,
        detection=detection,
        sha256=sha,
        n_rows={name: int(rows.shape[0]) for name, rows in canonical.items()},
        noise_ceiling=ceilings,
        paths=dict(paths),
        n_concepts=n,
    )
