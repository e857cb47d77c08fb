"""Human odd-one-out judgements: fast validated reading, convention detection, metadata.

THINGS odd-one-out files (docs/method.md §2) hold one judgement per row, three 0-based concept
indices (the row order of ``things_concepts.tsv``), either as text (whitespace-separated integers,
no header, ``trainset.txt`` ...) or as ``.npy`` integer arrays of shape ``(m, 3)``. The THINGS
convention is ``[pair, pair, odd]``: columns 0 and 1 were judged most similar and column 2 is the
odd one out. Some public copies use ``[odd, pair, pair]`` and some old files are in a wrong
concept order, so the convention is *detected from the data* instead of assumed:

- :func:`read_triplet_file` parses one file (``numpy.loadtxt``'s C parser: about a second for
  THINGS' 4.7M rows) and validates it. Every problem raises :class:`HumanDataError` naming the
  file and, for text files, the 1-based line (for ``.npy`` the 1-based row). Line numbers come
  from a vectorised byte scan done in bounded chunks, only when a problem was found.
- :func:`~recovery_assets.core.convention.detect_convention` (the statistics, in core) scores the
  rows with a reference similarity (e.g. zero-shot dot products of a reference model's features)
  and tests which column is predicted to be the odd one out significantly more often than 1/3.
- :func:`load_human_judgements` reads a THINGS-shaped folder, records sha256 and row counts,
  detects the convention, converts every file to canonical ``[pair, pair, odd]`` rows and computes
  the leave-one-out noise ceiling of the test sets.

The THINGS-data release also publishes the raw table
``triplets_large_final_correctednc_correctedorder.csv`` (tab-separated, header, 1-based
``image1, image2, image3``, ``choice``, ``subject_id``, ``noise_ceiling`` = 0 for training, 1-3
for test sets 1-3). :func:`read_release_table` parses and validates it (pandas' C parser,
vectorised checks); whether ``choice`` is a position (1-3) or a concept index is established from
the data by :func:`detect_choice_encoding`; :func:`load_human_judgements` reads it when the
text files are absent.

Pure numpy (no dagster); the triplet conventions and the ceiling come from
:mod:`recovery_assets.core.triplets`, the convention test from
:mod:`recovery_assets.core.convention`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recovery_assets.core.convention import ConventionResult, SimilarityFn, detect_convention
from recovery_assets.core.triplets import (
    NoiseCeiling,
    human_rows_to_positions,
    noise_ceiling,
    positions_to_human_rows,
)
from recovery_assets.sources.checksums import file_sha256

__all__ = [
    "CHOICE_ENCODINGS",
    "CONVENTION_FILES",
    "JUDGEMENT_DIRS",
    "RELEASE_COLUMNS",
    "RELEASE_SETS",
    "RELEASE_TABLE",
    "RELEASE_TABLE_DIRS",
    "REQUIRED_FILES",
    "ChoiceEncoding",
    "HumanData",
    "HumanDataError",
    "ReleaseTable",
    "detect_choice_encoding",
    "find_judgement_file",
    "find_release_table",
    "judgements_not_found",
    "load_human_judgements",
    "read_release_table",
    "read_triplet_file",
]

#: The THINGS judgement files, in their usual order.
CONVENTION_FILES = ("trainset", "validationset", "testset1", "testset2", "testset3")
#: Files that must be present: training data (convention, probes) and test set 2 (noise ceiling).
REQUIRED_FILES = ("trainset", "testset2")
#: Folders (relative to a THINGS folder, "" is the folder itself) searched for the text / .npy
#: judgement files, in this order.
JUDGEMENT_DIRS = ("", "triplets", "triplet_dataset")
#: The raw judgement table of the THINGS-data release.
RELEASE_TABLE = "triplets_large_final_correctednc_correctedorder.csv"
#: Folders searched for :data:`RELEASE_TABLE`, in this order.
RELEASE_TABLE_DIRS = ("", "triplet_dataset", "triplets")
#: Required columns of :data:`RELEASE_TABLE` (any order; other columns are ignored).
RELEASE_COLUMNS = ("image1", "image2", "image3", "choice", "subject_id", "noise_ceiling")
#: ``noise_ceiling`` value of a release-table row -> the judgement set it belongs to.
RELEASE_SETS = {0: "trainset", 1: "testset1", 2: "testset2", 3: "testset3"}
#: How ``choice`` may identify the odd one out: a 1-based position in the row or a 1-based
#: concept index (one of ``image1..image3``).
CHOICE_ENCODINGS = ("position", "concept")

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
    """Read and validate one THINGS odd-one-out file (docs/method.md §2).

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
# Loading a folder
# --------------------------------------------------------------------------------------------


def _dir(root: Path, sub: str) -> Path:
    return root / sub if sub else root


def _places(root: Path, dirs: Sequence[str]) -> str:
    """``"A, B and C"`` for the folders ``dirs`` of ``root``."""
    shown = [str(_dir(root, d)) for d in dirs]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" and {shown[-1]}"


def find_judgement_file(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The file holding judgement set ``name`` in a THINGS-shaped folder, or None.

    Looked up in the folders :data:`JUDGEMENT_DIRS` (``folder``, ``folder/triplets``,
    ``folder/triplet_dataset``, in this order), in each ``name.npy`` before ``name.txt``; the
    first that exists wins.
    """
    root = Path(folder)
    for sub in JUDGEMENT_DIRS:
        for suffix in (".npy", ".txt"):
            candidate = _dir(root, sub) / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def find_release_table(folder: str | os.PathLike[str]) -> Path | None:
    """The release table :data:`RELEASE_TABLE` of a THINGS folder, or None.

    Looked up in :data:`RELEASE_TABLE_DIRS` (``folder``, ``folder/triplet_dataset``,
    ``folder/triplets``, in this order).
    """
    root = Path(folder)
    for sub in RELEASE_TABLE_DIRS:
        candidate = _dir(root, sub) / RELEASE_TABLE
        if candidate.is_file():
            return candidate
    return None


def judgements_not_found(folder: str | os.PathLike[str], names: Sequence[str]) -> str:
    """The message for required judgement sets ``names`` found in neither form in ``folder``.

    Names every place looked in: the text / .npy files in :data:`JUDGEMENT_DIRS` and the release
    table in :data:`RELEASE_TABLE_DIRS`.
    """
    root = Path(folder)
    wanted = " and ".join(f"{name}.txt or {name}.npy" for name in names)
    plural = "s" if len(names) > 1 else ""
    return (
        f"{root}: required file{plural} {wanted} not found (looked in "
        f"{_places(root, JUDGEMENT_DIRS)}), and no release table {RELEASE_TABLE} (looked in "
        f"{_places(root, RELEASE_TABLE_DIRS)})"
    )


# --------------------------------------------------------------------------------------------
# The release table
# --------------------------------------------------------------------------------------------

_IMAGE_COLUMNS = ("image1", "image2", "image3")
_INT_COLUMNS = (*_IMAGE_COLUMNS, "choice", "noise_ceiling")
# What pandas' C parser reads as an int64 (an integral "2.0" included); longer digit runs overflow.
_INT_CELL = r"\s*[+-]?\d{1,18}(?:\.0*)?\s*"
_LONG_INT_CELL = r"\s*[+-]?\d+(?:\.0*)?\s*"
_PD_NA = {"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan"}
_PD_NA |= {"<na>", "n/a", "na", "null", "nan", "none"}
_SPACE_CR_LF = np.frombuffer(b" \r\n", dtype=np.uint8)


def _nonblank_lines(path: Path) -> Iterator[np.ndarray]:
    """Per chunk, the 1-based numbers of the lines pandas reads (lines of only spaces are blank)."""
    for data, line0 in _text_chunks(path):
        b = np.frombuffer(data, dtype=np.uint8)
        newlines = np.flatnonzero(b == 10)
        n_lines = newlines.size + (0 if data.endswith(b"\n") else 1)
        significant = np.concatenate([[0], np.cumsum(~np.isin(b, _SPACE_CR_LF))])
        ends = np.append(newlines, b.size)[:n_lines]
        starts = np.concatenate([[0], newlines + 1])[:n_lines]
        yield line0 + np.flatnonzero(significant[ends] - significant[starts] > 0) + 1


def _table_line(path: Path, row: int) -> int:
    """1-based file line of 0-based data row ``row`` (-1: the header), counting blank lines."""
    target = row + 1  # the header is the first non-blank line
    seen = 0
    for lines in _nonblank_lines(path):
        if target < seen + lines.size:
            return int(lines[target - seen])
        seen += lines.size
    raise AssertionError(f"row {row} not found in {path}")  # pragma: no cover


def _first(mask: np.ndarray) -> int | None:
    hit = np.flatnonzero(mask)
    return int(hit[0]) if hit.size else None


def _read_header(path: Path) -> list[str]:
    try:
        head = pd.read_csv(
            path,
            sep="\t",
            header=None,
            nrows=1,
            dtype=str,
            na_filter=False,
            index_col=False,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise HumanDataError(f"{path}: empty file (no header)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ParserError is a ValueError
        raise HumanDataError(f"{path}: cannot be parsed ({exc})") from None
    return [str(v) for v in head.iloc[0].tolist()]


def _cell_problem(token: str) -> str:
    if token.strip() == "":
        return "missing value (empty cell)"
    if token.strip().lower() in _PD_NA:
        return f"missing value {token!r} (NaN)"
    if re.fullmatch(_LONG_INT_CELL, token):
        return f"integer {token.strip()} out of range"
    return f"non-integer value {token!r}"


def _diagnose_cells(path: Path, raw_of: dict[str, str]) -> str | None:
    """The first cell of an integer column pandas cannot read as int64, as a message, or None."""
    columns = [raw_of[c] for c in _INT_COLUMNS]
    text = pd.read_csv(
        path,
        sep="\t",
        header=0,
        usecols=columns,
        dtype=str,
        na_filter=False,
        index_col=False,
        engine="c",
    )
    best: tuple[int, int] | None = None  # (row, column position in the file)
    order = {raw: i for i, raw in enumerate(text.columns)}
    for name in _INT_COLUMNS:
        raw = raw_of[name]
        bad = _first(~text[raw].str.fullmatch(_INT_CELL).to_numpy(dtype=bool))
        if bad is not None and (best is None or (bad, order[raw]) < best):
            best = (bad, order[raw])
    if best is None:
        return None
    row, position = best
    raw = text.columns[position]
    name = raw.strip()
    token = str(text[raw].iat[row])
    return f"{path}, line {_table_line(path, row)}, column {name!r}: {_cell_problem(token)}"


def _read_columns(path: Path, raw_of: dict[str, str], subject_dtype: type) -> pd.DataFrame:
    """The required columns: the integer ones as int64, ``subject_id`` as ``subject_dtype``."""
    dtype: dict[str, Any] = {raw_of[c]: np.int64 for c in _INT_COLUMNS}
    dtype[raw_of["subject_id"]] = subject_dtype
    return pd.read_csv(
        path,
        sep="\t",
        header=0,
        usecols=list(raw_of.values()),
        dtype=dtype,
        index_col=False,
        engine="c",
    )


@dataclass
class ReleaseTable:
    """The THINGS-data release table, parsed and validated (:func:`read_release_table`).

    Attributes
    ----------
    path : the file read.
    images : (m, 3) int64 concept indices, 0-based (the file's ``image1..image3`` minus 1).
    choice : (m,) int64, ``choice`` as stored.
    group : (m,) int64, ``noise_ceiling`` (0 training, 1-3 test sets; see :data:`RELEASE_SETS`).
    subjects : (m,) ``subject_id``: int64 when every value is an integer, else an object array
        of the strings as stored.
    fits : the :data:`CHOICE_ENCODINGS` that every row satisfies (at least one).
    sha256 : hex digest of the file.
    n_concepts : number of concepts the indices were checked against.
    """

    path: Path
    images: np.ndarray
    choice: np.ndarray
    group: np.ndarray
    subjects: np.ndarray
    fits: tuple[str, ...]
    sha256: str
    n_concepts: int

    @property
    def n_rows(self) -> int:
        return int(self.images.shape[0])

    def answers(self, encoding: str, rows: np.ndarray | None = None) -> np.ndarray:
        """0-based position of the odd one out in each row (of ``rows``, indices; None: all)."""
        if encoding not in self.fits:
            raise ValueError(f"choice encoding {encoding!r} does not fit; fits: {self.fits}")
        choice = self.choice if rows is None else self.choice[rows]
        if encoding == "position":
            return choice - 1
        images = self.images if rows is None else self.images[rows]
        return np.argmax(images + 1 == choice[:, None], axis=1).astype(np.int64)

    def canonical(self, encoding: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Canonical 0-based ``[pair, pair, odd]`` rows under ``encoding`` (row order kept)."""
        images = self.images if rows is None else self.images[rows]
        return positions_to_human_rows(images, self.answers(encoding, rows), "pair_pair_odd")

    def set_rows(self) -> dict[str, np.ndarray]:
        """Set name -> indices of its rows in file order, for every set with rows."""
        out = {}
        for value, name in RELEASE_SETS.items():
            rows = np.flatnonzero(self.group == value)
            if rows.size:
                out[name] = rows
        return out

    def group_rows(self) -> dict[str, int]:
        """Set name -> number of rows (0 for a set without rows)."""
        counts = np.bincount(self.group, minlength=len(RELEASE_SETS))
        return {name: int(counts[value]) for value, name in RELEASE_SETS.items()}


def read_release_table(path: str | os.PathLike[str], n_concepts: int) -> ReleaseTable:
    """Read and validate the THINGS-data release table (:data:`RELEASE_TABLE`).

    The file is tab-separated with one header line; the columns :data:`RELEASE_COLUMNS` must be
    present (any order, names matched exactly after stripping whitespace; other columns are
    ignored). ``image1..image3`` are 1-based concept indices in ``[1, n_concepts]``;
    ``noise_ceiling`` is 0 (training) or 1, 2, 3 (test sets 1-3); ``choice`` identifies the odd
    one out either as a 1-based position (1, 2, 3) or as one of the row's concept indices: the
    encodings every row satisfies are recorded in ``fits`` (which one is meant is decided by
    :func:`detect_choice_encoding`). Blank lines are skipped.

    Parsing is pandas' C reader with explicit int64 dtypes; checks are vectorised and line
    numbers (1-based, the header is line 1, blank lines counted) are found only when a check
    fails.

    Raises
    ------
    HumanDataError
        The message starts with the file and names the line (and column where it applies):
        missing file, empty file, a missing or duplicate required column (a comma-separated file
        is recognised), no rows, a missing, non-integer or too large value, a concept index
        outside ``[1, n_concepts]``, a row repeating a concept, a ``noise_ceiling`` other than
        0-3, a missing ``subject_id``, or a ``choice`` that fits no encoding on every row (the
        first offending line and its values are named).
    """
    n = _check_n_concepts(n_concepts)
    p = Path(path)
    if not p.is_file():
        raise HumanDataError(f"{p}: no such file (the release table {RELEASE_TABLE})")
    header = _read_header(p)
    names = [c.strip() for c in header]
    missing = [c for c in RELEASE_COLUMNS if c not in names]
    repeated = [c for c in RELEASE_COLUMNS if names.count(c) > 1]
    if missing or repeated:
        line = _table_line(p, -1)
        if repeated:
            raise HumanDataError(
                f"{p}, line {line}: duplicate column name(s) {', '.join(map(repr, repeated))}"
            )
        shown = ", ".join(repr(c) for c in names[:10]) + (" ..." if len(names) > 10 else "")
        hint = ""
        if len(names) == 1 and "," in names[0]:
            hint = " The file is not tab-separated (the header looks comma-separated)."
        elif any(c.lower() in {m.lower() for m in missing} for c in names):
            hint = " Column names are case-sensitive."
        raise HumanDataError(
            f"{p}, line {line}: missing required column(s) {', '.join(map(repr, missing))}; "
            f"found {len(names)} column(s): {shown}.{hint}"
        )
    raw_of = {c: header[names.index(c)] for c in RELEASE_COLUMNS}
    # subject_id: int64 when every value is an integer (the fast path), else the text as stored.
    try:
        table = _read_columns(p, raw_of, np.int64)
    except (ValueError, OverflowError):  # ParserError is a ValueError
        try:
            table = _read_columns(p, raw_of, str)
        except (ValueError, OverflowError) as exc:  # includes UnicodeDecodeError
            try:
                problem = _diagnose_cells(p, raw_of)
            except (ValueError, OverflowError):  # unparseable as text too: pandas' message
                problem = None
            raise HumanDataError(problem or f"{p}: cannot be parsed ({exc})") from None
    if len(table) == 0:
        raise HumanDataError(f"{p}, line {_table_line(p, -1)}: no judgement rows below the header")
    images = table[[raw_of[c] for c in _IMAGE_COLUMNS]].to_numpy(dtype=np.int64)
    choice = table[raw_of["choice"]].to_numpy(dtype=np.int64)
    group = table[raw_of["noise_ceiling"]].to_numpy(dtype=np.int64)
    subject_column = table[raw_of["subject_id"]]
    del table

    def where(row: int) -> str:
        return f"{p}, line {_table_line(p, row)}"

    # The first row with a problem in the integer columns; the checks are vectorised.
    outside = (images < 1) | (images > n)
    bad_group = ~np.isin(group, np.array(list(RELEASE_SETS)))
    repeats = (
        (images[:, 0] == images[:, 1])
        | (images[:, 1] == images[:, 2])
        | (images[:, 0] == images[:, 2])
    )
    firsts = [_first(outside.any(axis=1)), _first(repeats), _first(bad_group)]
    found = [r for r in firsts if r is not None]
    if found:
        row = min(found)
        if row == firsts[0]:
            col = int(np.flatnonzero(outside[row])[0])
            raise HumanDataError(
                f"{where(row)}, column {_IMAGE_COLUMNS[col]!r}: concept index "
                f"{int(images[row, col])} out of range [1, {n}] (1-based)"
            )
        if row == firsts[1]:
            raise HumanDataError(
                f"{where(row)}: row repeats a concept (image1..image3 = "
                f"{', '.join(map(str, images[row].tolist()))}; a triplet needs 3 distinct concepts)"
            )
        raise HumanDataError(
            f"{where(row)}, column 'noise_ceiling': value {int(group[row])} is not 0 (training) "
            f"or 1, 2, 3 (test sets)"
        )
    missing_subject = _first(subject_column.isna().to_numpy())
    if missing_subject is not None:
        raise HumanDataError(f"{where(missing_subject)}, column 'subject_id': missing value")
    if subject_column.dtype == np.int64:
        subjects = subject_column.to_numpy(dtype=np.int64)
    else:
        subjects = subject_column.to_numpy(dtype=object)
    del subject_column

    # Which encodings of choice every row satisfies.
    as_position = (choice >= 1) & (choice <= 3)
    as_concept = (images == choice[:, None]).any(axis=1)
    fits = tuple(
        enc for enc, ok in zip(CHOICE_ENCODINGS, (as_position, as_concept), strict=True) if ok.all()
    )
    if not fits:

        def values(row: int) -> str:
            shown = ", ".join(map(str, images[row].tolist()))
            return f"choice {int(choice[row])}, image1..image3 = {shown}"

        neither = _first(~as_position & ~as_concept)
        if neither is not None:
            raise HumanDataError(
                f"{where(neither)}, column 'choice': {values(neither)}: choice is neither a "
                f"position in the row (1, 2, 3) nor one of the row's concepts"
            )
        by_position = _first(~as_position)
        by_concept = _first(~as_concept)
        assert by_position is not None and by_concept is not None
        first = min(by_position, by_concept)
        raise HumanDataError(
            f"{where(first)}, column 'choice': no encoding of choice fits every row: as a "
            f"position (1, 2, 3) it fails on line {_table_line(p, by_position)} "
            f"({values(by_position)}); as a concept index (one of image1..image3) it fails on "
            f"line {_table_line(p, by_concept)} ({values(by_concept)})"
        )
    images -= 1
    return ReleaseTable(
        path=p,
        images=images,
        choice=choice,
        group=group,
        subjects=subjects,
        fits=fits,
        sha256=file_sha256(p),
        n_concepts=n,
    )


@dataclass(frozen=True)
class ChoiceEncoding:
    """Outcome of :func:`detect_choice_encoding`.

    Attributes
    ----------
    encoding : ``"position"`` or ``"concept"``, or None when it cannot be established.
    fits : the encodings every row satisfies structurally.
    detection : encoding -> :class:`ConventionResult` of the training rows made canonical under
        that encoding (one per fitting encoding).
    diagnosis : a sentence explaining the decision.
    """

    encoding: str | None
    fits: tuple[str, ...]
    detection: dict[str, ConventionResult]
    diagnosis: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {
            "encoding": self.encoding,
            "fits": list(self.fits),
            "detection": {enc: result.to_dict() for enc, result in self.detection.items()},
            "diagnosis": self.diagnosis,
        }


def detect_choice_encoding(
    table: ReleaseTable,
    similarity_fn: SimilarityFn,
    *,
    min_margin: float = 0.02,
    z_threshold: float = 5.0,
    max_rows: int = 200_000,
    seed: int = 0,
) -> ChoiceEncoding:
    """Establish from the data how ``choice`` of the release table names the odd one out.

    For every encoding in ``table.fits`` the training rows (``noise_ceiling == 0``) are made
    canonical ``[pair, pair, odd]`` under that encoding and :func:`detect_convention` is run on
    them (options as there). The encoding is accepted when exactly one fitting encoding gives rows
    detected unambiguously as ``pair_pair_odd``; otherwise ``encoding`` is None (no encoding
    passes: the concept order may be wrong or the reference uninformative; both pass: cannot
    tell).

    Raises
    ------
    HumanDataError
        The table has no training rows.
    """
    train = np.flatnonzero(table.group == 0)
    if train.size == 0:
        raise HumanDataError(
            f"{table.path}: no training judgements (no row with noise_ceiling 0); the choice "
            f"encoding is established on them"
        )
    options = {"min_margin": min_margin, "z_threshold": z_threshold, "max_rows": max_rows}
    detection = {
        enc: detect_convention(table.canonical(enc, train), similarity_fn, seed=seed, **options)
        for enc in table.fits
    }
    passed = [enc for enc, result in detection.items() if result.decision == "pair_pair_odd"]
    described = "; ".join(
        f"as a {enc} the training rows are {result.decision} ({result.diagnosis})"
        for enc, result in detection.items()
    )
    encoding: str | None = None
    if len(passed) == 1:
        encoding = passed[0]
        diagnosis = f"choice is a 1-based {encoding}: {described}"
    elif not passed:
        fitting = " and ".join(table.fits)
        diagnosis = (
            f"choice fits every row as a {fitting}, but no encoding gives pair_pair_odd training "
            f"rows: {described}. The concept order may be wrong (image1..image3 must follow the "
            f"row order of things_concepts.tsv) or the reference similarity uninformative"
        )
    else:
        diagnosis = (
            f"choice fits every row both as a position and as a concept index and both give "
            f"pair_pair_odd training rows: cannot tell which is meant ({described})"
        )
    return ChoiceEncoding(
        encoding=encoding, fits=table.fits, detection=detection, diagnosis=diagnosis
    )


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------


@dataclass
class HumanData:
    """Validated human judgements in canonical ``[pair, pair, odd]`` rows (docs/method.md §2).

    Attributes
    ----------
    rows : name -> (m, 3) int64 canonical rows (column 2 is the odd one out), in the row order
        of the source.
    convention : the convention of the source (detected on the training rows; for the release
        table always ``pair_pair_odd``: the choice-encoding check is the convention check).
    detection : name -> :class:`ConventionResult` of that set (for the release table: of its
        canonical rows).
    sha256 : name -> hex digest of the file as stored (the release table's for each of its sets).
    n_rows : name -> number of rows.
    noise_ceiling : name -> :class:`~recovery_assets.core.triplets.NoiseCeiling` for every test set
        with repeated triplets (always ``testset2``).
    paths : name -> the file read.
    n_concepts : number of concepts the indices refer to.
    subjects : name -> the ``subject_id`` of each canonical row (release table only; int64 or an
        object array of strings, as stored); empty for the text / .npy files.
    source : ``"files"`` (text / .npy files) or ``"release_table"``.
    choice_encoding : ``"position"`` or ``"concept"`` for the release table, None for files.
    choice : the :class:`ChoiceEncoding` decision (release table only).
    release_table : path of the release table when one was found (read or not).
    group_rows : release table only: set name -> rows with its ``noise_ceiling`` value.
    unread : judgement files found but not read (the release table when the text files were
        read; partial text files when the table was read): the two forms are never mixed.
    """

    rows: dict[str, np.ndarray]
    convention: str
    detection: dict[str, ConventionResult]
    sha256: dict[str, str]
    n_rows: dict[str, int]
    noise_ceiling: dict[str, NoiseCeiling]
    paths: dict[str, Path] = field(default_factory=dict)
    n_concepts: int = 0
    subjects: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "files"
    choice_encoding: str | None = None
    choice: ChoiceEncoding | None = None
    release_table: Path | None = None
    group_rows: dict[str, int] = field(default_factory=dict)
    unread: list[Path] = field(default_factory=list)

    def positions(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(triplets, answer positions)`` of set ``name`` (the answer is always position 2)."""
        return human_rows_to_positions(self.rows[name], "pair_pair_odd")

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable provenance.

        Keys: ``source``, ``choice_encoding``, ``convention``, ``canonical_convention``,
        ``n_concepts``, ``files`` (name -> ``path``, ``sha256``, ``n_rows``, ``detection``, and
        for the table ``n_subjects``), ``noise_ceiling`` (name -> ``ceiling``, ``n_triplets``),
        ``release_table`` (None when no table was found; else ``path``, ``read`` and, when read,
        ``sha256``, ``n_rows``, ``group_rows``, ``choice`` (:meth:`ChoiceEncoding.to_dict`)), and
        ``unread`` (paths found but not read).
        """
        files: dict[str, Any] = {}
        for name in self.rows:
            entry: dict[str, Any] = {
                "path": str(self.paths.get(name, "")),
                "sha256": self.sha256[name],
                "n_rows": int(self.n_rows[name]),
                "detection": self.detection[name].to_dict(),
            }
            if name in self.subjects:
                entry["n_subjects"] = int(pd.unique(self.subjects[name]).size)
            files[name] = entry
        table: dict[str, Any] | None = None
        if self.release_table is not None:
            table = {"path": str(self.release_table), "read": self.source == "release_table"}
            if self.source == "release_table":
                table["sha256"] = next(iter(self.sha256.values()))
                table["n_rows"] = int(sum(self.group_rows.values()))
                table["group_rows"] = dict(self.group_rows)
                table["choice"] = self.choice.to_dict() if self.choice is not None else None
            else:
                table["reason"] = "the text / .npy judgement files were read instead"
        return {
            "source": self.source,
            "choice_encoding": self.choice_encoding,
            "convention": self.convention,
            "canonical_convention": "pair_pair_odd",
            "n_concepts": int(self.n_concepts),
            "files": files,
            "noise_ceiling": {
                name: {"ceiling": float(nc.ceiling), "n_triplets": int(nc.n_triplets)}
                for name, nc in self.noise_ceiling.items()
            },
            "release_table": table,
            "unread": [str(path) for path in self.unread],
        }


def _check_files(files: Sequence[str]) -> None:
    missing_required = [r for r in REQUIRED_FILES if r not in files]
    if missing_required:
        raise ValueError(f"files must include the required sets {REQUIRED_FILES}")


def _resolve_files(
    folder_or_files: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    files: Sequence[str],
) -> dict[str, Path]:
    _check_files(files)
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
        if path is not None:
            found[name] = path
    missing = [name for name in REQUIRED_FILES if name not in found]
    if missing:
        raise HumanDataError(judgements_not_found(root, missing))
    return found


def _ceilings(canonical: Mapping[str, np.ndarray], paths: Mapping[str, Path]) -> dict:
    """Noise ceilings of the test sets (test set 2 must have repeated triplets)."""
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
    return ceilings


def _load_release_table(
    path: Path,
    n: int,
    similarity_fn: SimilarityFn,
    files: Sequence[str],
    options: dict[str, Any],
    unread: list[Path],
) -> HumanData:
    table = read_release_table(path, n)
    choice = detect_choice_encoding(table, similarity_fn, **options)
    if choice.encoding is None:
        raise HumanDataError(
            f"{path}: cannot tell how 'choice' names the odd one out: {choice.diagnosis}"
        )
    by_set = table.set_rows()
    missing = [name for name in REQUIRED_FILES if name not in by_set]
    if missing:
        value = {name: v for v, name in RELEASE_SETS.items()}
        shown = " or ".join(f"noise_ceiling {value[name]} ({name})" for name in missing)
        raise HumanDataError(f"{path}: no rows with {shown}; {' and '.join(missing)} required")
    canonical: dict[str, np.ndarray] = {}
    subjects: dict[str, np.ndarray] = {}
    for name, rows in by_set.items():
        if name in files:
            canonical[name] = table.canonical(choice.encoding, rows)
            subjects[name] = table.subjects[rows]
    group_rows = table.group_rows()
    detection: dict[str, ConventionResult] = {}
    for name, rows in canonical.items():
        if name == "trainset":
            detection[name] = choice.detection[choice.encoding]
        else:
            detection[name] = detect_convention(rows, similarity_fn, **options)
        result = detection[name]
        if result.unambiguous and result.decision != "pair_pair_odd":
            raise HumanDataError(
                f"{path}: the canonical rows of {name} are detected as {result.decision}, but "
                f"the training rows as pair_pair_odd: the sets do not agree on the encoding of "
                f"'choice'"
            )
    paths = {name: path for name in canonical}
    return HumanData(
        rows=canonical,
        convention="pair_pair_odd",
        detection=detection,
        sha256={name: table.sha256 for name in canonical},
        n_rows={name: int(rows.shape[0]) for name, rows in canonical.items()},
        noise_ceiling=_ceilings(canonical, paths),
        paths=paths,
        n_concepts=n,
        subjects=subjects,
        source="release_table",
        choice_encoding=choice.encoding,
        choice=choice,
        release_table=path,
        group_rows=group_rows,
        unread=unread,
    )


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
    """Read, validate and canonicalise the THINGS human judgements (docs/method.md §2).

    Parameters
    ----------
    folder_or_files : a THINGS-shaped folder or a mapping ``name -> path`` of text / .npy files.
        A folder holds either form of the judgements: the text / .npy files (each set ``name``
        looked up as :func:`find_judgement_file` describes) or the release table
        (:func:`find_release_table`). The files are read when ``trainset`` and ``testset2`` are
        among them, else the release table; when both forms are present the files are read and
        the table is recorded as present but unread (``HumanData.unread``, metadata
        ``release_table.read = False``).
    n_concepts : number of concepts (rows of ``things_concepts.tsv``).
    similarity_fn : reference similarity for :func:`detect_convention`.
    files : the sets to load; ``trainset`` and ``testset2`` are required, others optional.
    min_margin, z_threshold, max_rows, seed : passed to :func:`detect_convention`.

    Files: every file is read with :func:`read_triplet_file` (sha256 and row counts recorded);
    the convention is detected on every file and the training file's decides. The load fails when
    the training file is ambiguous (concept order may be wrong) or another file is unambiguously
    in the other convention. Every file is converted to (triplets, answers) with
    :func:`~recovery_assets.core.triplets.human_rows_to_positions` and back to canonical
    ``[pair, pair, odd]`` rows.

    Release table: read with :func:`read_release_table`; the encoding of ``choice`` is
    established by :func:`detect_choice_encoding` (that check is the convention check); rows with
    ``noise_ceiling`` 0 become ``trainset`` (the release's training and validation judgements),
    1-3 ``testset1-3``, each in file order, with its ``subject_id`` values in ``subjects``.

    In both forms the noise ceiling is computed on the canonical rows of every test set present
    (``testset2`` must contain repeated triplets; for the others it is recorded when they do).

    Raises
    ------
    HumanDataError
        Missing folder, or neither form present (every place looked in is named); malformed file
        or table (file and line named); ambiguous or mixed convention; a choice encoding that
        cannot be established; a test set 2 without repeated triplets.
    """
    n = _check_n_concepts(n_concepts)
    _check_files(files)
    options = {
        "min_margin": min_margin,
        "z_threshold": z_threshold,
        "max_rows": max_rows,
        "seed": seed,
    }
    table_path: Path | None = None
    unread: list[Path] = []
    if not isinstance(folder_or_files, Mapping):
        root = Path(folder_or_files)
        if not root.is_dir():
            raise HumanDataError(f"{root}: no such folder of human judgements")
        table_path = find_release_table(root)
        if table_path is not None:
            present = {name: find_judgement_file(root, name) for name in CONVENTION_FILES}
            if any(present[name] is None for name in REQUIRED_FILES):
                unread = [path for path in present.values() if path is not None]
                return _load_release_table(table_path, n, similarity_fn, files, options, unread)
            unread = [table_path]
    paths = _resolve_files(folder_or_files, files)

    raw: dict[str, np.ndarray] = {}
    sha: dict[str, str] = {}
    for name, path in paths.items():
        raw[name] = read_triplet_file(path, n)
        sha[name] = file_sha256(path)

    detection = {
        name: detect_convention(rows, similarity_fn, **options) for name, rows in raw.items()
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

    return HumanData(
        rows=canonical,
        convention=convention,
        detection=detection,
        sha256=sha,
        n_rows={name: int(rows.shape[0]) for name, rows in canonical.items()},
        noise_ceiling=_ceilings(canonical, paths),
        paths=dict(paths),
        n_concepts=n,
        release_table=table_path,
        unread=unread,
    )
