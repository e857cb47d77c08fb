"""Precomputed feature files: validated loading in THINGS concept order (docs/method.md §3).

A model may be given as a precomputed ``n x p`` feature matrix instead of a timm network: one file
per model, one row per THINGS concept. The concept order is the row order of
``things_concepts.tsv`` (its ``uniqueID`` column, never sorted: sorted order differs, e.g.
``camera_lens, camera1, camera2``). The format is chosen by the file suffix (case-insensitive):

``.npy``
    One 2-D numeric array, rows in concept order. Read with ``allow_pickle=False``: object arrays
    are rejected.
``.npz``
    The array ``features`` (or the array named by ``key``; or, when there is neither, the only 2-D
    numeric array in the file) plus optional ids: a 1-D string array ``uniqueID`` or ``ids``.
``.pt`` / ``.pth``
    ``torch.load(..., weights_only=True)`` of either a bare 2-D tensor (concept order) or a dict
    holding a ``features`` tensor (or ``key``; or the only 2-D numeric tensor) and optional ids:
    a list of str under ``uniqueID`` or ``ids``.
``.parquet``
    A table of numeric feature columns (any names; used in file order), optionally with a
    ``uniqueID`` column of strings (a ``uniqueID`` index is accepted too). Any other non-numeric
    column is an error.

Files without ids must hold exactly one row per concept, in concept order. Files with ids are
matched by id: every concept must appear exactly once and no other id may appear, in any order.
Every problem raises :class:`FeatureFileError` whose message starts with the file path and names
the problem (row counts, offending ids, the first non-finite row ...); nothing is ever dropped,
padded or reordered silently.

:func:`load_feature_file` returns a C-contiguous float32 matrix in concept order and provenance
(sha256, format, how the rows were ordered, shape). :func:`write_feature_file` writes the same
four formats (tests, documentation, converting a matrix for the platform).

Pure numpy / pandas; torch is imported only for ``.pt`` files (no dagster).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recovery_assets.sources.checksums import file_sha256

__all__ = [
    "FORMATS",
    "ID_KEYS",
    "FeatureFileError",
    "load_feature_file",
    "write_feature_file",
]

#: Supported suffixes -> the format name recorded in the info dict.
FORMATS = {".npy": "npy", ".npz": "npz", ".pt": "pt", ".pth": "pt", ".parquet": "parquet"}
#: Names under which ``.npz`` / ``.pt`` files may carry the row ids (in this order of preference).
ID_KEYS = ("uniqueID", "ids")
#: The array / tensor holding the features when no ``key`` is given.
FEATURES_KEY = "features"
#: The id column of parquet files.
ID_COLUMN = "uniqueID"

CONCEPT_ORDER = "concept order"
REORDERED = "reordered by uniqueID"
_TABLE = "things_concepts.tsv"
_N_EXAMPLES = 5


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or does not match the concept table.

    The message starts with the file path and names the problem.
    """


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _examples(values: Sequence[Any], total: int | None = None) -> str:
    """``['a', 'b', ...]``: at most :data:`_N_EXAMPLES` entries, ``...`` when there are more."""
    total = len(values) if total is None else total
    shown = ", ".join(repr(v) for v in list(values[:_N_EXAMPLES]))
    return f"[{shown}{', ...' if total > _N_EXAMPLES else ''}]"


def _short(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception message, shortened (torch's messages span pages)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torch_problem(exc: BaseException) -> str:
    """The informative part of a ``torch.load`` error (its messages span many lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    if match:
        return _short(" ".join(match.group(1).split()))
    return _short(exc)


def _check_concept_ids(concept_ids: Sequence[str]) -> list[str]:
    """The concept ids as a list of str; ValueError when they cannot define a concept order."""
    if isinstance(concept_ids, str | bytes):
        raise ValueError("concept_ids must be a sequence of uniqueIDs, not a single string")
    ids = list(concept_ids)
    if not ids:
        raise ValueError("concept_ids is empty (things_concepts.tsv has no concepts?)")
    bad = [v for v in ids if not isinstance(v, str)]
    if bad:
        raise ValueError(f"concept_ids must be strings; got {_examples(bad)}")
    index = pd.Index(ids)
    if index.has_duplicates:
        dup = index[index.duplicated()].unique().tolist()
        raise ValueError(f"concept_ids has {len(dup)} duplicated uniqueIDs: {_examples(dup)}")
    return ids


def _numeric_matrix(path: Path, arr: np.ndarray, what: str) -> np.ndarray:
    """Check that ``arr`` is a 2-D integer or floating-point array with at least one column."""
    if arr.dtype.kind not in "iuf":
        raise FeatureFileError(
            f"{path}: {what} has non-numeric dtype {arr.dtype} (expected integer or "
            f"floating-point numbers)"
        )
    if arr.ndim != 2:
        raise FeatureFileError(
            f"{path}: {what} is not 2-D (shape {tuple(arr.shape)}); expected an "
            f"(n_concepts, p) matrix"
        )
    if arr.shape[1] == 0:
        raise FeatureFileError(f"{path}: {what} has zero columns (shape {tuple(arr.shape)})")
    return arr


def _is_matrix(arr: Any) -> bool:
    return isinstance(arr, np.ndarray) and arr.ndim == 2 and arr.dtype.kind in "iuf"


def _id_list(path: Path, values: Any, where: str) -> list[str]:
    """Ids from a 1-D string array or a list/tuple of str."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise FeatureFileError(
                f"{path}: ids in {where} must be 1-D, got shape {tuple(values.shape)}"
            )
        if values.dtype.kind == "S":
            try:
                return [v.decode("utf-8") for v in values.tolist()]
            except UnicodeDecodeError:
                raise FeatureFileError(f"{path}: ids in {where} are not valid UTF-8") from None
        if values.dtype.kind != "U":
            raise FeatureFileError(
                f"{path}: ids in {where} must be strings, got dtype {values.dtype}"
            )
        return values.tolist()
    if isinstance(values, list | tuple):
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise FeatureFileError(
                f"{path}: ids in {where} must all be str; found {len(bad)} other values, e.g. "
                f"{_examples(bad)}"
            )
        return list(values)
    raise FeatureFileError(
        f"{path}: ids in {where} must be a list of str, got {type(values).__name__}"
    )


def _pick_ids(
    path: Path, found: Mapping[str, list[str]], kind: str
) -> tuple[list[str] | None, str]:
    """The ids of a file that may store them under several :data:`ID_KEYS`."""
    if not found:
        return None, ""
    names = list(found)
    first = found[names[0]]
    for other in names[1:]:
        if found[other] != first:
            raise FeatureFileError(
                f"{path}: holds both {names[0]!r} and {other!r} ids and they differ; keep one"
            )
    return first, f"{kind} {names[0]!r}"


# --------------------------------------------------------------------------------------------
# Readers: each returns (matrix as stored, ids or None, description of the ids)
# --------------------------------------------------------------------------------------------

_Read = tuple[np.ndarray, list[str] | None, str]


def _no_key(path: Path, key: str | None, what: str) -> None:
    if key is not None:
        raise FeatureFileError(f"{path}: key={key!r} was given but {what} has no named arrays")


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"  # local file header or an empty archive


def _magic(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(6)


def _read_npy(path: Path, key: str | None) -> _Read:
    _no_key(path, key, "a .npy file")
    head = _magic(path)
    if head.startswith(_ZIP_MAGIC):
        raise FeatureFileError(f"{path}: is an .npz (zip) archive, not a .npy array; rename it")
    if head != _NPY_MAGIC:
        raise FeatureFileError(f"{path}: corrupt or not a .npy file (no NumPy header)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise FeatureFileError(
                f"{path}: holds an object array, which is not supported (loaded with "
                f"allow_pickle=False); save a numeric array"
            ) from None
        raise FeatureFileError(f"{path}: corrupt .npy file ({_short(exc)})") from None
    except (OSError, EOFError) as exc:
        raise FeatureFileError(f"{path}: corrupt .npy file ({_short(exc)})") from None
    return _numeric_matrix(path, arr, "the array"), None, ""


def _read_npz(path: Path, key: str | None) -> _Read:
    import zipfile

    head = _magic(path)
    if head == _NPY_MAGIC:
        raise FeatureFileError(f"{path}: is a single .npy array, not an .npz archive; rename it")
    if not head.startswith(_ZIP_MAGIC):
        raise FeatureFileError(f"{path}: corrupt or not an .npz file (not a zip archive)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FeatureFileError(f"{path}: corrupt .npz file ({_short(exc)})") from None

    def get(name: str) -> np.ndarray:
        try:
            return archive[name]
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise FeatureFileError(
                    f"{path}: array {name!r} is an object (pickled) array, which is not "
                    f"supported; store numbers (features) or a unicode string array (ids)"
                ) from None
            raise FeatureFileError(
                f"{path}: array {name!r} is unreadable ({_short(exc)})"
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise FeatureFileError(
                f"{path}: array {name!r} is unreadable ({_short(exc)})"
            ) from None

    with archive:
        names = list(archive.files)

        def is_matrix(other: str) -> bool:
            try:
                return _is_matrix(get(other))
            except FeatureFileError:
                return False  # an object array cannot be the feature matrix

        name = _choose(path, names, key, is_matrix, ("array", "arrays", "array"))
        matrix = _numeric_matrix(path, get(name), f"array {name!r}")
        found_ids = {k: _id_list(path, get(k), f"array {k!r}") for k in ID_KEYS if k in names}
    ids, where = _pick_ids(path, found_ids, "array")
    return matrix, ids, where


def _choose(
    path: Path,
    names: list[str],
    key: str | None,
    is_matrix: Callable[[str], bool],
    words: tuple[str, str, str],
) -> str:
    """The name of the feature matrix: ``key``, else ``features``, else the only 2-D numeric one.

    ``words``: (what one item is called, what the listing is called, what a matrix is), e.g.
    ``("array", "arrays", "array")`` for ``.npz`` and ``("entry", "keys", "tensor")`` for ``.pt``.
    """
    item, listing, matrix = words
    if key is not None:
        if key not in names:
            raise FeatureFileError(f"{path}: has no {item} {key!r} ({listing}: {names})")
        return key
    if FEATURES_KEY in names:
        return FEATURES_KEY
    candidates = [n for n in names if n not in ID_KEYS and is_matrix(n)]
    if len(candidates) != 1:
        found = "none" if not candidates else f"several: {candidates}"
        raise FeatureFileError(
            f"{path}: no {FEATURES_KEY!r} {item} and not exactly one 2-D numeric {matrix} "
            f"({found}; {listing}: {names}); pass key= to choose one"
        )
    return candidates[0]


def _tensor_to_numpy(path: Path, value: Any, what: str) -> np.ndarray:
    import torch

    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, torch.Tensor):
        raise FeatureFileError(f"{path}: {what} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise FeatureFileError(
            f"{path}: {what} is a {value.layout} tensor; save a dense tensor (.to_dense())"
        )
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.to(torch.float32)
    try:
        return value.numpy()
    except (TypeError, RuntimeError) as exc:
        raise FeatureFileError(
            f"{path}: {what} has unsupported dtype {value.dtype} ({_short(exc)})"
        ) from None


def _read_pt(path: Path, key: str | None) -> _Read:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types (pickle, zip, RuntimeError ...)
        raise FeatureFileError(
            f"{path}: cannot be read by torch.load(weights_only=True) ({_torch_problem(exc)}); "
            f"expected a torch.save of a tensor or of a dict of tensors and lists of str"
        ) from None
    if isinstance(obj, torch.Tensor):
        _no_key(path, key, "a file holding a bare tensor")
        return (
            _numeric_matrix(path, _tensor_to_numpy(path, obj, "the tensor"), "the tensor"),
            None,
            "",
        )
    if not isinstance(obj, Mapping):
        raise FeatureFileError(
            f"{path}: holds a {type(obj).__name__}; expected a 2-D tensor or a dict with a "
            f"{FEATURES_KEY!r} tensor"
        )

    def is_matrix(k: str) -> bool:
        v = obj[k]
        return (
            isinstance(v, torch.Tensor)
            and v.ndim == 2
            and v.dtype != torch.bool
            and not v.is_complex()
        )

    name = _choose(path, list(obj), key, is_matrix, ("entry", "keys", "tensor"))
    what = f"entry {name!r}"
    matrix = _numeric_matrix(path, _tensor_to_numpy(path, obj[name], what), what)
    found_ids = {k: _id_list(path, obj[k], f"entry {k!r}") for k in ID_KEYS if k in obj}
    ids, where = _pick_ids(path, found_ids, "entry")
    return matrix, ids, where


def _read_parquet(path: Path, key: str | None) -> _Read:
    _no_key(path, key, "a .parquet file")
    try:
        table = pd.read_parquet(path)
    except MemoryError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise FeatureFileError(f"{path}: not a readable parquet file ({_short(exc)})") from None
    if table.index.name == ID_COLUMN and ID_COLUMN not in table.columns:
        table = table.reset_index()
    elif table.index.dtype.kind not in "iu":
        raise FeatureFileError(
            f"{path}: has a non-integer index {table.index.name!r}; store the concept ids in a "
            f"{ID_COLUMN!r} column"
        )
    columns = list(table.columns)
    if len(set(columns)) != len(columns):
        dup = pd.Index(columns)
        raise FeatureFileError(
            f"{path}: duplicated column names {_examples(dup[dup.duplicated()].tolist())}"
        )
    ids = None
    if ID_COLUMN in table.columns:
        column = table[ID_COLUMN]
        missing = column.isna().to_numpy()
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise FeatureFileError(
                f"{path}: column {ID_COLUMN!r} has {int(missing.sum())} missing values "
                f"(first at row {row})"
            )
        values = column.tolist()
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise FeatureFileError(
                f"{path}: column {ID_COLUMN!r} must hold strings; found {_examples(bad)}"
            )
        ids = values
        table = table.drop(columns=ID_COLUMN)
    dtypes = table.dtypes
    numeric = np.array(
        [pd.api.types.is_numeric_dtype(d) and not pd.api.types.is_bool_dtype(d) for d in dtypes],
        dtype=bool,
    )
    if not numeric.all():
        bad_columns = [str(c) for c in table.columns[~numeric]]
        raise FeatureFileError(
            f"{path}: {len(bad_columns)} non-numeric columns {_examples(bad_columns)} "
            f"(dtypes {_examples([str(d) for d in dtypes[~numeric]])}); feature columns must be "
            f"numeric and the only id column allowed is {ID_COLUMN!r}"
        )
    if table.shape[1] == 0:
        raise FeatureFileError(
            f"{path}: has zero feature columns (columns: {columns}); expected numeric columns"
        )
    if any(isinstance(d, pd.api.extensions.ExtensionDtype) for d in dtypes):
        matrix = table.to_numpy(dtype=np.float64, na_value=np.nan)  # nullable Int64 / Float64
    else:
        matrix = table.to_numpy()
    return _numeric_matrix(path, matrix, "the table"), ids, f"column {ID_COLUMN!r}"


_READERS = {"npy": _read_npy, "npz": _read_npz, "pt": _read_pt, "parquet": _read_parquet}


# --------------------------------------------------------------------------------------------
# Matching rows to concepts
# --------------------------------------------------------------------------------------------


def _row_order(path: Path, file_ids: list[str], where: str, concept_ids: list[str]) -> np.ndarray:
    """Row of the file for every concept (in concept order); raises on any mismatch."""
    index = pd.Index(file_ids, dtype=object)
    if index.has_duplicates:
        dup = index[index.duplicated()].unique().tolist()
        raise FeatureFileError(
            f"{path}: {len(dup)} duplicated ids in {where}: {_examples(dup)} (each concept must "
            f"appear once)"
        )
    rows = index.get_indexer(pd.Index(concept_ids, dtype=object))
    missing_mask = rows < 0
    extra_mask = ~index.isin(concept_ids)
    if not missing_mask.any() and not extra_mask.any():
        return rows
    n, n_file = len(concept_ids), len(file_ids)
    parts = []
    if n_file != n:
        parts.append(f"has {n_file} rows but {_TABLE} has {n} concepts")
    if missing_mask.any():
        missing = [concept_ids[i] for i in np.flatnonzero(missing_mask)[:_N_EXAMPLES]]
        count = int(missing_mask.sum())
        parts.append(
            f"{count} of the {n} concept ids of {_TABLE} are missing from {where}: "
            f"{_examples(missing, count)}"
        )
    if extra_mask.any():
        extra = index[extra_mask].tolist()
        verb = "id in the file is" if len(extra) == 1 else "ids in the file are"
        parts.append(f"{len(extra)} {verb} not in {_TABLE}: {_examples(extra)}")
    raise FeatureFileError(f"{path}: " + "; ".join(parts))


def _check_finite(path: Path, matrix: np.ndarray, file_ids: list[str] | None) -> None:
    if matrix.dtype.kind != "f":
        return
    finite = np.isfinite(matrix).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    row = int(bad[0])
    has_nan = bool(np.isnan(matrix[row]).any())
    has_inf = bool(np.isinf(matrix[row]).any())
    kind = " and ".join(k for k, flag in (("NaN", has_nan), ("inf", has_inf)) if flag)
    label = f"row {row}" + (f" (uniqueID {file_ids[row]!r})" if file_ids is not None else "")
    raise FeatureFileError(
        f"{path}: non-finite features: {label} contains {kind}; {bad.size} of "
        f"{matrix.shape[0]} rows contain NaN or inf"
    )


def _to_float32(path: Path, matrix: np.ndarray, file_ids: list[str] | None) -> np.ndarray:
    if matrix.dtype == np.float32:
        return matrix
    with np.errstate(over="ignore", invalid="ignore"):
        out = matrix.astype(np.float32)
    if matrix.dtype.kind == "f" and matrix.dtype.itemsize > 4:
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            row = int(bad[0])
            label = f"row {row}" + (
                f" (uniqueID {file_ids[row]!r})" if file_ids is not None else ""
            )
            raise FeatureFileError(
                f"{path}: {label} has values beyond the float32 range (|x| > 3.4e38); "
                f"{bad.size} of {matrix.shape[0]} rows overflow when cast to float32"
            )
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_feature_file(
    path: str | os.PathLike[str],
    concept_ids: Sequence[str],
    *,
    key: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Load a precomputed feature matrix in concept order (docs/method.md §3).

    Parameters
    ----------
    path : a ``.npy``, ``.npz``, ``.pt`` / ``.pth`` or ``.parquet`` file (see the module
        docstring for what each must hold).
    concept_ids : the ``uniqueID`` column of ``things_concepts.tsv`` in its row order (the
        concept index order; it is never sorted).
    key : the array (``.npz``) or dict entry (``.pt``) holding the features, instead of
        ``features``. An error for formats without named arrays (``.npy``, ``.parquet``, a bare
        tensor).

    Returns
    -------
    features : float32 array of shape ``(len(concept_ids), p)``, C-contiguous, row ``i`` being
        concept ``concept_ids[i]``. Values are used as stored (integers and float64 are cast).
    info : ``{"path", "sha256", "format", "order", "n", "p"}``: the path as a string, the hex
        sha256 of the file, ``"npy" | "npz" | "pt" | "parquet"``, ``"concept order"`` (no ids:
        rows taken as stored) or ``"reordered by uniqueID"`` (the file carries ids and rows were
        matched to the concepts by id, whatever their stored order), and the shape.

    Raises
    ------
    FeatureFileError
        The message starts with the file path and names the problem: unsupported suffix (the
        supported ones are listed), missing or unreadable file, object / pickled arrays, a
        missing ``key``, an ambiguous choice of array, a matrix that is not 2-D, has zero columns
        or a non-numeric dtype (for parquet: the non-numeric columns), a row count differing from
        the number of concepts (file without ids), NaN or inf (the first offending row, its
        uniqueID when known, and the number of bad rows), values that overflow float32, and for
        files with ids: ids that are not strings, an id list whose length differs from the row
        count, duplicated ids, concept ids missing from the file and ids not in the concept
        table (counts and up to 5 examples each).
    ValueError
        ``concept_ids`` is empty, not a sequence of str, or has duplicates.
    """
    concepts = _check_concept_ids(concept_ids)
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        supported = ", ".join(FORMATS)
        raise FeatureFileError(
            f"{p}: unsupported file type {p.suffix or '(no suffix)'!r}; supported suffixes: "
            f"{supported}"
        )
    if not p.exists():
        raise FeatureFileError(f"{p}: no such file")
    if not p.is_file():
        raise FeatureFileError(f"{p}: not a regular file")
    try:
        matrix, file_ids, where = _READERS[fmt](p, key)
    except PermissionError as exc:
        raise FeatureFileError(f"{p}: cannot be read ({_short(exc)})") from None

    n_rows, n = matrix.shape[0], len(concepts)
    if file_ids is None:
        if n_rows != n:
            raise FeatureFileError(
                f"{p}: has {n_rows} rows but {_TABLE} has {n} concepts (the file has no "
                f"uniqueID/ids to match rows by, so it must hold one row per concept in concept "
                f"order)"
            )
        rows = None
    else:
        if len(file_ids) != n_rows:
            raise FeatureFileError(
                f"{p}: the id list in {where} has {len(file_ids)} entries but the feature matrix "
                f"has {n_rows} rows"
            )
        rows = _row_order(p, file_ids, where, concepts)

    _check_finite(p, matrix, file_ids)
    matrix = _to_float32(p, matrix, file_ids)
    features = np.ascontiguousarray(matrix if rows is None else matrix[rows])
    info = {
        "path": str(p),
        "sha256": file_sha256(p),
        "format": fmt,
        "order": CONCEPT_ORDER if rows is None else REORDERED,
        "n": int(features.shape[0]),
        "p": int(features.shape[1]),
    }
    return features, info


def write_feature_file(
    path: str | os.PathLike[str],
    features: Any,
    ids: Sequence[str] | None = None,
) -> Path:
    """Write a feature matrix in the format given by the suffix of ``path``.

    Parameters
    ----------
    path : ``.npy``, ``.npz``, ``.pt`` / ``.pth`` or ``.parquet``.
    features : a 2-D array or tensor, written with its dtype (no cast).
    ids : optional row ids (uniqueIDs), one per row: stored as the ``uniqueID`` array (``.npz``),
        the ``uniqueID`` list of a ``{"features", "uniqueID"}`` dict (``.pt``; without ids a bare
        tensor is written) or the first column ``uniqueID`` (``.parquet``, whose feature columns
        are named ``f0 .. f{p-1}``). ``.npy`` cannot hold ids.

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        Unsupported suffix, ``features`` not 2-D, ids for ``.npy``, or ids whose length is not
        the number of rows.
    """
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{p}: unsupported file type {p.suffix!r}; supported suffixes: {', '.join(FORMATS)}"
        )
    if hasattr(features, "detach"):  # a torch tensor
        features = features.detach().cpu().numpy()
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{p}: features must be 2-D, got shape {arr.shape}")
    id_list = None
    if ids is not None:
        if isinstance(ids, str | bytes):
            raise ValueError(f"{p}: ids must be a sequence of str, not a single string")
        id_list = [str(v) for v in ids]
        if len(id_list) != arr.shape[0]:
            raise ValueError(f"{p}: {len(id_list)} ids for {arr.shape[0]} rows")
        if fmt == "npy":
            raise ValueError(f"{p}: a .npy file cannot hold ids; use .npz, .pt or .parquet")

    if fmt == "npy":
        np.save(p, arr, allow_pickle=False)
    elif fmt == "npz":
        extra = {} if id_list is None else {ID_COLUMN: np.array(id_list, dtype=str)}
        with open(p, "wb") as handle:  # np.savez would append ".npz" to other spellings
            np.savez(handle, **{FEATURES_KEY: arr}, **extra)
    elif fmt == "pt":
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        obj: Any = tensor if id_list is None else {FEATURES_KEY: tensor, ID_COLUMN: id_list}
        torch.save(obj, p)
    else:
        table = pd.DataFrame(arr, columns=[f"f{j}" for j in range(arr.shape[1])])
        if id_list is not None:
            table.insert(0, ID_COLUMN, id_list)
        table.to_parquet(p, index=False)
    return p
