"""Feature files written by thingsvision: rows mapped to THINGS concepts by image file name.

`thingsvision <https://github.com/ViCCo-Group/thingsvision>`_ extracts one feature vector per
*image*. Its ``ImageDataset(root, out_path, ...)`` writes ``file_names.txt`` into ``out_path``:
one image path per line, in the row order of the extracted features, as the dataset saw them
(``<root>/<class>/<file>`` for a folder per class, e.g. ``images/aardvark/aardvark_01b.jpg``,
relative or absolute as ``root`` was given; the bare file name for a flat folder). Its
``save_features(features, out_path, file_format)`` writes the ``(m, p)`` matrix next to it:

``features.npy``
    ``file_format="npy"``: one 2-D numeric array (read with ``allow_pickle=False``).
``features.hdf5`` (or ``.h5``)
    ``file_format="hdf5"``: an HDF5 file holding the dataset ``features``. When there is no
    ``features`` dataset, the only 2-D numeric dataset of the file is used.

(``extractor.extract_features(..., output_dir=..., save_in_one_file=True)`` writes
``<output_dir>/<module>/features.npy`` instead, away from ``file_names.txt``: pass the list's
path as ``file_names``.) Other thingsvision formats (``pt``, ``mat``, ``txt``) are not read:
save with ``file_format="npy"`` or ``"hdf5"``.

Mapping rows to concepts
------------------------
The concepts are the ``uniqueID`` column of ``things_concepts.tsv`` in its row order. Each line
of ``file_names.txt`` (``/`` or ``\\`` separators; surrounding white space and blank trailing
lines are ignored) is mapped to a concept by the first rule that gives a known uniqueID:

1. the image's parent folder (``images/camera_lens/camera_lens_01b.jpg`` -> ``camera_lens``);
2. the file name without its extension (the flat layout: ``images/camera1.jpg`` -> ``camera1``);
3. that name without a trailing THINGS suffix ``_<digits><letters>``
   (``aardvark_01b.jpg`` -> ``aardvark``).

Names are only ever compared with the known uniqueIDs (which may contain underscores and digits,
e.g. ``camera_lens``, ``camera1``, ``camera10``); nothing is split at the first underscore. A
line that maps to no concept is an error, as is a line repeated in the list.

A concept may have several images. ``concept_image="task"`` (the default) takes its task image,
the one shown in the THINGS odd-one-out task: the image whose name ends in ``_NNb`` (with several,
the lowest ``NN``); a concept with a single image uses it whatever its name, and a concept with
several images but no ``_NNb`` image is an error (use ``concept_image="mean"``).
``concept_image="mean"`` averages all images of a concept (in float64, stored as float32). Every
concept needs at least one image; images of concepts outside the table are an error (rule 1-3
finds no uniqueID for them).

Validation is that of :mod:`recovery_assets.sources.features`: the matrix is 2-D and numeric
with as many rows as ``file_names.txt`` has lines, every row (used or not) is finite and fits
float32. Every problem raises :class:`~recovery_assets.sources.features.FeatureFileError` whose
message starts with the offending file (the feature file, or ``file_names.txt`` with the 1-based
line) and names the row, image, line or concepts concerned.

:func:`load_thingsvision_features` returns a C-contiguous float32 ``(n_concepts, p)`` matrix in
concept order and provenance; :func:`write_thingsvision_features` writes the same layout as
thingsvision (tests, documentation). Pure numpy; h5py is imported only for HDF5 files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recovery_assets.sources.checksums import file_sha256
from recovery_assets.sources.features import (
    FEATURES_KEY,
    FeatureFileError,
    _check_concept_ids,
    _examples,
    _numeric_matrix,
    _read_npy,
    _short,
)

__all__ = [
    "CONCEPT_IMAGES",
    "FILE_NAMES",
    "FORMATS",
    "load_thingsvision_features",
    "write_thingsvision_features",
]

#: Supported suffixes of the feature file -> the format name recorded in the info dict.
FORMATS = {".npy": "thingsvision-npy", ".hdf5": "thingsvision-hdf5", ".h5": "thingsvision-hdf5"}
#: The image list thingsvision writes next to the features.
FILE_NAMES = "file_names.txt"
#: Values of ``concept_image``.
CONCEPT_IMAGES = ("task", "mean")

ORDER = "mapped by image file name"
_TABLE = "things_concepts.tsv"
_OTHER_THINGSVISION = {".pt", ".pth", ".mat", ".txt"}
_SEPARATORS = re.compile(r"[\\/]+")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,5}$")
_THINGS_SUFFIX = re.compile(r"_\d+[A-Za-z]*$")
_TASK_IMAGE = re.compile(r"_(\d+)b$", re.IGNORECASE)
_SPLIT_NAME = re.compile(r"^features_\d+$")
_LIST_DATASETS = 20


# --------------------------------------------------------------------------------------------
# The feature matrix
# --------------------------------------------------------------------------------------------


def _read_features_npy(path: Path) -> np.ndarray:
    try:
        matrix, _, _ = _read_npy(path, None)
    except FeatureFileError as exc:
        if "is not 2-D" in str(exc):
            raise FeatureFileError(
                f"{exc} (thingsvision: extract with flatten_acts=True)"
            ) from None
        raise
    return matrix


def _read_features_hdf5(path: Path) -> np.ndarray:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: corrupt or not an HDF5 file ({_short(exc)})") from None
    with handle:
        datasets: dict[str, Any] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj

        handle.visititems(visit)
        if FEATURES_KEY in datasets:
            name = FEATURES_KEY
        else:
            candidates = [n for n, d in datasets.items() if d.ndim == 2 and d.dtype.kind in "iuf"]
            if len(candidates) != 1:
                raise FeatureFileError(_no_features_dataset(path, datasets, candidates))
            name = candidates[0]
        dataset = datasets[name]
        what = f"dataset {name!r}"
        _numeric_matrix(path, dataset, what)  # checks dtype and shape before reading
        try:
            matrix = dataset[()]
        except (OSError, ValueError, TypeError) as exc:
            raise FeatureFileError(f"{path}: {what} is unreadable ({_short(exc)})") from None
    return _numeric_matrix(path, np.asarray(matrix), what)


def _no_features_dataset(path: Path, datasets: dict[str, Any], candidates: list[str]) -> str:
    listed = [f"{n} {tuple(d.shape)} {d.dtype}" for n, d in datasets.items()]
    shown = ", ".join(listed[:_LIST_DATASETS])
    if len(listed) > _LIST_DATASETS:
        shown += f", ... ({len(listed)} in all)"
    found = "none" if not candidates else f"several: {_examples(candidates, len(candidates))}"
    message = (
        f"{path}: no {FEATURES_KEY!r} dataset and not exactly one 2-D numeric dataset ({found}); "
        f"datasets: [{shown or 'none'}]"
    )
    if candidates and all(_SPLIT_NAME.match(n.rsplit("/", 1)[-1]) for n in candidates):
        message += (
            "; thingsvision split the matrix into features_01, features_02, ...: stack them in "
            "that order into one 'features' dataset"
        )
    return message


# --------------------------------------------------------------------------------------------
# file_names.txt
# --------------------------------------------------------------------------------------------


def _read_file_names(path: Path) -> list[str]:
    """The image paths of ``file_names.txt``, one per line (blank trailing lines dropped)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeatureFileError(f"{path}: cannot be read ({_short(exc)})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FeatureFileError(f"{path}, line {line}: not UTF-8 text ({exc.reason})") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise FeatureFileError(f"{path}: lists no images (the file is empty)")
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            raise FeatureFileError(
                f"{path}, line {number}: is empty (one image path per line, one line per row "
                f"of the features)"
            )
        if line in first_line:
            raise FeatureFileError(
                f"{path}, line {number}: repeats line {first_line[line]} ({line!r}); every "
                f"image must be listed once"
            )
        first_line[line] = number
    return lines


def _parts(line: str) -> tuple[str, str]:
    """(parent folder, file name without extension) of an image path."""
    parts = [p for p in _SEPARATORS.split(line) if p]
    name = parts[-1] if parts else ""
    parent = parts[-2] if len(parts) > 1 else ""
    stem = _EXTENSION.sub("", name) or name
    return parent, stem


def _concept_of(line: str, known: dict[str, int]) -> tuple[int | None, str]:
    """(concept index or None, the image stem) for one line of ``file_names.txt``."""
    parent, stem = _parts(line)
    for candidate in (parent, stem, _THINGS_SUFFIX.sub("", stem)):
        if candidate in known:
            return known[candidate], stem
    return None, stem


def _map_rows(
    list_path: Path, lines: list[str], concepts: list[str]
) -> tuple[np.ndarray, list[str]]:
    """Concept index of every row and the image stems; raises on an unmapped row."""
    known = {uid: i for i, uid in enumerate(concepts)}
    index = np.empty(len(lines), dtype=np.int64)
    stems: list[str] = []
    unmapped: list[int] = []
    for row, line in enumerate(lines):
        concept, stem = _concept_of(line, known)
        stems.append(stem)
        if concept is None:
            unmapped.append(row)
        else:
            index[row] = concept
    if unmapped:
        row = unmapped[0]
        parent, stem = _parts(lines[row])
        others = ""
        if len(unmapped) > 1:
            others = f"; {len(unmapped)} of {len(lines)} lines map to no concept"
        raise FeatureFileError(
            f"{list_path}, line {row + 1}: image {lines[row]!r} maps to no concept of {_TABLE} "
            f"(neither its folder {parent!r}, its name {stem!r} nor that name without a "
            f"_NN<letters> suffix is a uniqueID){others}"
        )
    return index, stems


def _concept_rows(
    list_path: Path,
    index: np.ndarray,
    stems: list[str],
    concepts: list[str],
    concept_image: str,
) -> list[np.ndarray]:
    """The rows used for every concept, in concept order (one row each for ``"task"``)."""
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(len(concepts) + 1))
    groups = [order[bounds[i] : bounds[i + 1]] for i in range(len(concepts))]
    missing = [concepts[i] for i, rows in enumerate(groups) if rows.size == 0]
    if missing:
        raise FeatureFileError(
            f"{list_path}: {len(missing)} of the {len(concepts)} concepts of {_TABLE} have no "
            f"image: {_examples(missing)}"
        )
    if concept_image == "mean":
        return groups
    chosen: list[np.ndarray] = []
    no_task: list[int] = []
    for i, rows in enumerate(groups):
        if rows.size == 1:
            chosen.append(rows)
            continue
        numbered = []
        for row in rows.tolist():
            match = _TASK_IMAGE.search(stems[row])
            if match:
                numbered.append((int(match.group(1)), row))
        if numbered:
            chosen.append(np.array([min(numbered)[1]], dtype=np.int64))
        else:
            no_task.append(i)
    if no_task:
        first = no_task[0]
        lines = ", ".join(str(r + 1) for r in groups[first][:_LIST_DATASETS].tolist())
        others = (
            f"; {len(no_task)} concepts have several images and no task image: "
            f"{_examples([concepts[i] for i in no_task])}"
            if len(no_task) > 1
            else ""
        )
        raise FeatureFileError(
            f"{list_path}: concept {concepts[first]!r} has {groups[first].size} images (lines "
            f"{lines}) and none is its task image (<uniqueID>_NNb){others}; set "
            f"concept_image: mean to average the images of each concept, or list one image per "
            f"concept"
        )
    return chosen


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _row_label(row: int, lines: list[str], list_path: Path) -> str:
    return f"row {row} (image {lines[row]!r}, line {row + 1} of {list_path.name})"


def _check_values(path: Path, matrix: np.ndarray, lines: list[str], list_path: Path) -> None:
    """Every row finite and within the float32 range (rows named by their image)."""
    if matrix.dtype.kind != "f":
        return
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        row = int(bad[0])
        kinds = (("NaN", np.isnan(matrix[row]).any()), ("inf", np.isinf(matrix[row]).any()))
        kind = " and ".join(k for k, flag in kinds if flag)
        raise FeatureFileError(
            f"{path}: non-finite features: {_row_label(row, lines, list_path)} contains {kind}; "
            f"{bad.size} of {matrix.shape[0]} rows contain NaN or inf"
        )
    if matrix.dtype.itemsize > 4:
        with np.errstate(over="ignore"):
            rows_ok = np.isfinite(matrix.astype(np.float32)).all(axis=1)
        if not rows_ok.all():
            bad = np.flatnonzero(~rows_ok)
            raise FeatureFileError(
                f"{path}: {_row_label(int(bad[0]), lines, list_path)} has values beyond the "
                f"float32 range (|x| > 3.4e38); {bad.size} of {matrix.shape[0]} rows overflow "
                f"when cast to float32"
            )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_thingsvision_features(
    path: str | os.PathLike[str],
    concept_ids: Sequence[str],
    *,
    file_names: str | os.PathLike[str] | None = None,
    concept_image: str = "task",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Load thingsvision features (one row per image) as one row per THINGS concept.

    Parameters
    ----------
    path : ``features.npy`` or ``features.hdf5`` / ``.h5`` as written by thingsvision's
        ``save_features`` (see the module docstring).
    concept_ids : the ``uniqueID`` column of ``things_concepts.tsv`` in its row order (never
        sorted).
    file_names : thingsvision's ``file_names.txt`` listing the image of every row; None:
        ``file_names.txt`` in the folder of ``path``.
    concept_image : ``"task"`` (the ``_NNb`` image of each concept, the one shown in the task) or
        ``"mean"`` (the average over all images of the concept).

    Returns
    -------
    features : float32 array of shape ``(len(concept_ids), p)``, C-contiguous, row ``i`` being
        concept ``concept_ids[i]``.
    info : ``{"path", "sha256", "format", "order", "file_names", "file_names_sha256",
        "concept_image", "n", "p", "n_images"}``: the feature file and its hex sha256,
        ``"thingsvision-npy" | "thingsvision-hdf5"``, ``"mapped by image file name"``, the image
        list and its sha256, ``concept_image``, the output shape and the number of rows (images)
        in the file.

    Raises
    ------
    FeatureFileError
        The message starts with the offending file: the feature file (unsupported suffix, missing,
        unreadable, not 2-D / numeric, no ``features`` dataset and no single 2-D numeric one
        (the datasets are listed), a row count differing from the number of listed images, NaN or
        inf, float32 overflow: the row, its image and line) or ``file_names.txt`` (missing: both
        paths named; not UTF-8, empty, an empty or repeated line, an image that maps to no
        concept: the 1-based line; concepts without an image: count and up to 5 ids; a concept
        with several images and no task image under ``concept_image="task"``).
    ValueError
        ``concept_ids`` is empty, not a sequence of str or has duplicates; ``concept_image`` is
        neither ``"task"`` nor ``"mean"``.
    """
    concepts = _check_concept_ids(concept_ids)
    if concept_image not in CONCEPT_IMAGES:
        raise ValueError(
            f"concept_image must be one of {list(CONCEPT_IMAGES)}, got {concept_image!r}"
        )
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        hint = (
            '; save with file_format="npy" or "hdf5"'
            if p.suffix.lower() in _OTHER_THINGSVISION
            else ""
        )
        raise FeatureFileError(
            f"{p}: unsupported file type {p.suffix or '(no suffix)'!r} for thingsvision features; "
            f"supported suffixes: {', '.join(FORMATS)}{hint}"
        )
    if not p.exists():
        raise FeatureFileError(f"{p}: no such file")
    if not p.is_file():
        raise FeatureFileError(f"{p}: not a regular file")
    list_path = p.parent / FILE_NAMES if file_names is None else Path(file_names)
    if not list_path.is_file():
        what = "no such file" if not list_path.exists() else "not a regular file"
        raise FeatureFileError(
            f"{list_path}: {what}; it must list the image of every row of the thingsvision "
            f"features {p} (pass file_names= to give its path)"
        )

    try:
        if fmt == "thingsvision-npy":
            matrix = _read_features_npy(p)
        else:
            matrix = _read_features_hdf5(p)
    except PermissionError as exc:
        raise FeatureFileError(f"{p}: cannot be read ({_short(exc)})") from None
    lines = _read_file_names(list_path)
    if matrix.shape[0] != len(lines):
        raise FeatureFileError(
            f"{p}: has {matrix.shape[0]} rows but {list_path} lists {len(lines)} images (one "
            f"line per row, in row order)"
        )

    index, stems = _map_rows(list_path, lines, concepts)
    groups = _concept_rows(list_path, index, stems, concepts, concept_image)
    _check_values(p, matrix, lines, list_path)

    if concept_image == "task":
        features = np.ascontiguousarray(matrix[np.concatenate(groups)], dtype=np.float32)
    else:
        features = np.empty((len(concepts), matrix.shape[1]), dtype=np.float32)
        for i, rows in enumerate(groups):
            features[i] = matrix[rows].mean(axis=0, dtype=np.float64)
    info = {
        "path": str(p),
        "sha256": file_sha256(p),
        "format": fmt,
        "order": ORDER,
        "file_names": str(list_path),
        "file_names_sha256": file_sha256(list_path),
        "concept_image": concept_image,
        "n": int(features.shape[0]),
        "p": int(features.shape[1]),
        "n_images": int(matrix.shape[0]),
    }
    return features, info


def write_thingsvision_features(
    folder: str | os.PathLike[str],
    features: Any,
    file_names: Sequence[str],
    file_format: str = "npy",
) -> Path:
    """Write features the way thingsvision does: ``features.<npy|hdf5>`` + ``file_names.txt``.

    Parameters
    ----------
    folder : the output folder (created when missing), thingsvision's ``out_path``.
    features : a 2-D array or tensor, one row per image, written with its dtype (no cast).
    file_names : the image path of every row, in row order (e.g.
        ``images/aardvark/aardvark_01b.jpg``), written one per line.
    file_format : ``"npy"`` (``features.npy``) or ``"hdf5"`` (``features.hdf5`` holding the
        dataset ``features``).

    Returns
    -------
    The path of the feature file.

    Raises
    ------
    ValueError
        Unknown ``file_format``, ``features`` not 2-D, ``file_names`` a single string, an entry
        that is not a one-line non-empty str, or a count that differs from the number of rows.
    """
    if file_format not in ("npy", "hdf5"):
        raise ValueError(f"file_format must be 'npy' or 'hdf5', got {file_format!r}")
    if hasattr(features, "detach"):  # a torch tensor
        features = features.detach().cpu().numpy()
    arr = np.asarray(features)
    out = Path(folder)
    if arr.ndim != 2:
        raise ValueError(f"{out}: features must be 2-D, got shape {arr.shape}")
    if isinstance(file_names, str | bytes):
        raise ValueError(f"{out}: file_names must be a sequence of str, not a single string")
    names = list(file_names)
    bad = [v for v in names if not isinstance(v, str) or not v.strip() or "\n" in v or "\r" in v]
    if bad:
        raise ValueError(f"{out}: file_names must be non-empty one-line str; got {_examples(bad)}")
    if len(names) != arr.shape[0]:
        raise ValueError(f"{out}: {len(names)} file names for {arr.shape[0]} rows")

    out.mkdir(parents=True, exist_ok=True)
    (out / FILE_NAMES).write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    if file_format == "npy":
        path = out / "features.npy"
        with open(path, "wb") as handle:
            np.save(handle, arr, allow_pickle=False)
    else:
        import h5py

        path = out / "features.hdf5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset(FEATURES_KEY, data=arr)
    return path
