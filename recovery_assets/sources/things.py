"""A THINGS folder on disk: the concept table, the images, and a dry-run check of the whole folder.

THINGS (docs/method.md §2) has 1,854 object concepts. Their order is the row order of
``things_concepts.tsv`` (tab-separated, header, 25 columns, one of them ``uniqueID``); it is never
sorted (sorted order differs: ``camera_lens, camera1, camera2``). Each concept has one image,
either ``<images>/<uniqueID>/<uniqueID>_NNb.jpg`` (the THINGS layout: the image with the
trailing ``b`` is the one shown in the odd-one-out task) or one image per ``uniqueID`` (a flat
layout). The odd-one-out judgements are read by :mod:`recovery_assets.sources.human`.

- :func:`read_concepts` reads and validates the concept table.
- :func:`find_images` / :func:`require_images` locate one image per concept;
  :func:`load_thumbnails` reads them as small square RGB arrays.
- :func:`pixel_reference` is the zero-shot similarity of standardised 8 x 8 downsampled pixels,
  the reference that decides the convention of the judgement files when no model features are
  given.
- :func:`validate_things` checks a whole folder without running anything heavy and reports every
  problem it finds in one JSON-serialisable dict.

Every problem raises (or, in :func:`validate_things`, records) a :class:`ThingsDataError` message
that starts with the offending file or folder and names the line or concept where it applies.
Pure numpy / pandas / PIL (no dagster).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recovery_assets.core.generator import triplet_logits
from recovery_assets.core.triplets import (
    human_rows_to_positions,
    noise_ceiling,
    positions_to_human_rows,
)
from recovery_assets.sources.checksums import file_sha256
from recovery_assets.sources.human import (
    CONVENTION_FILES,
    RELEASE_SETS,
    REQUIRED_FILES,
    HumanDataError,
    detect_choice_encoding,
    detect_convention,
    find_judgement_file,
    find_release_table,
    judgements_not_found,
    read_release_table,
    read_triplet_file,
)

__all__ = [
    "CONCEPTS_FILE",
    "IMAGE_DIRS",
    "IMAGE_LAYOUTS",
    "ThingsDataError",
    "find_images",
    "load_thumbnails",
    "pixel_features",
    "pixel_reference",
    "read_concepts",
    "require_images",
    "validate_things",
]

#: The concept table of a THINGS folder.
CONCEPTS_FILE = "things_concepts.tsv"
#: Image folders looked for (in this order) when none is given.
IMAGE_DIRS = ("images", "object_images", "Images")
#: Image layouts of :func:`find_images`.
IMAGE_LAYOUTS = ("auto", "things", "flat")

# Image file suffixes, in order of preference when one concept has several candidates.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Concepts whose folders are inspected by layout="auto".
_AUTO_PROBE = 10
# Ids listed in info["missing"] and in messages.
_LIST_INFO = 20
_LIST_MESSAGE = 10


class ThingsDataError(ValueError):
    """A THINGS concept table, image folder or image is missing or malformed.

    The message starts with the offending file or folder.
    """


# --------------------------------------------------------------------------------------------
# The concept table
# --------------------------------------------------------------------------------------------


def _listing(items: Sequence[str], limit: int = _LIST_MESSAGE) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ThingsDataError(f"{path}, line {line}: not UTF-8 text ({exc.reason})") from None


def _trim(record: list[str]) -> list[str]:
    """``record`` without trailing empty fields (a trailing tab)."""
    end = len(record)
    while end > 0 and record[end - 1] == "":
        end -= 1
    return record[:end]


def _count_problem(path: Path, n: int, expected: int) -> str:
    return f"{path}: has {n} concepts, the study expects {expected}"


def read_concepts(path: str | os.PathLike[str], *, n_concepts: int | None = None) -> pd.DataFrame:
    """Read and validate ``things_concepts.tsv`` (docs/method.md §2).

    Parameters
    ----------
    path : the table, or a folder holding ``things_concepts.tsv``. UTF-8 (a byte-order mark is
        ignored), tab-separated, one header line, ``"``-quoted fields as written by
        ``pandas.DataFrame.to_csv(sep="\\t")``; blank lines and empty fields beyond the header's
        width (trailing tabs) are ignored.
    n_concepts : the number of concepts the study expects (1,854 for THINGS); None: any.

    Returns
    -------
    DataFrame with a leading int64 column ``concept`` (0 .. n-1, the concept index) followed by
    every column of the file in file order, all as strings exactly as stored (no NA conversion:
    ``"NA"`` stays ``"NA"``, an empty cell is ``""``). Row order is the file's; never sorted.

    Raises
    ------
    ThingsDataError
        The message starts with the file and names the 1-based file line (the header is line 1)
        or the ids: missing file, not UTF-8, no header, no ``uniqueID`` column (the columns found
        are listed; a comma-separated file is recognised), duplicate column names, rows with a
        wrong number of fields, an empty ``uniqueID``, duplicate ``uniqueID`` values (with their
        lines), no concept rows, or a row count different from ``n_concepts``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CONCEPTS_FILE
    if not p.is_file():
        raise ThingsDataError(f"{p}: no such file (the THINGS concept table {CONCEPTS_FILE})")
    text = _decode(p, p.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")

    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1  # file line where the current record starts
    try:
        for record in reader:
            if any(field.strip() for field in record):  # blank lines are skipped
                if header is None:
                    header, header_line = _trim(record), start
                else:
                    rows.append(record)
                    lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ThingsDataError(f"{p}, line {reader.line_num}: cannot be parsed ({exc})") from None

    if header is None:
        raise ThingsDataError(f"{p}: empty file (no header)")
    header = [c.strip() for c in header]
    if "uniqueID" not in header:
        found = _listing([repr(c) for c in header])
        hint = ""
        if len(header) == 1 and "," in header[0]:
            hint = " The file is not tab-separated (the header looks comma-separated)."
        elif any(c.lower() == "uniqueid" for c in header):
            hint = " Column names are case-sensitive."
        raise ThingsDataError(
            f"{p}, line {header_line}: no 'uniqueID' column; found {len(header)} column(s): "
            f"{found}.{hint}"
        )
    counts = pd.Series(header).value_counts()
    repeated = [str(c) for c in counts.index[counts.to_numpy() > 1]]
    if repeated:
        raise ThingsDataError(
            f"{p}, line {header_line}: duplicate column names {_listing(repeated)}"
        )
    if "concept" in header:
        raise ThingsDataError(
            f"{p}, line {header_line}: the column name 'concept' is reserved for the index"
        )
    if not rows:
        raise ThingsDataError(f"{p}: no concept rows below the header")

    width = len(header)
    rows = [r[:width] if len(r) > width and not any(r[width:]) else r for r in rows]
    bad = [(line, len(r)) for line, r in zip(lines, rows, strict=True) if len(r) != width]
    if bad:
        shown = _listing([f"line {line} has {k}" for line, k in bad], limit=5)
        raise ThingsDataError(
            f"{p}, line {bad[0][0]}: wrong number of fields; the header (line {header_line}) has "
            f"{width}: {shown} ({len(bad)} row(s) in all; is every field tab-separated?)"
        )

    table = pd.DataFrame(rows, columns=header, dtype=str)
    ids = table["uniqueID"]
    empty = np.flatnonzero(ids.str.strip().eq("").to_numpy())
    if empty.size:
        where = _listing([str(lines[i]) for i in empty], limit=5)
        raise ThingsDataError(f"{p}, line {lines[empty[0]]}: empty uniqueID (line(s) {where})")
    dup_mask = ids.duplicated(keep=False).to_numpy()
    if dup_mask.any():
        groups: dict[str, list[int]] = {}
        for i in np.flatnonzero(dup_mask):  # in file order: the first group is met first
            groups.setdefault(ids.iat[i], []).append(lines[i])
        described = [
            f"{uid!r} (lines {', '.join(map(str, found))})" for uid, found in groups.items()
        ]
        first_repeat = next(iter(groups.values()))[1]
        raise ThingsDataError(
            f"{p}, line {first_repeat}: duplicate uniqueID values: {_listing(described, limit=5)}"
        )
    if n_concepts is not None and len(table) != int(n_concepts):
        raise ThingsDataError(_count_problem(p, len(table), int(n_concepts)))
    table.insert(0, "concept", np.arange(len(table), dtype=np.int64))
    return table


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _things_pattern(uid: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(uid)}_(\d+)b(\.jpe?g|\.png)$", re.IGNORECASE)


def _suffix_rank(name: str) -> int:
    suffix = os.path.splitext(name)[1].lower()
    return _IMAGE_SUFFIXES.index(suffix) if suffix in _IMAGE_SUFFIXES else len(_IMAGE_SUFFIXES)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """Files of ``folder`` (empty when it does not exist or is no folder)."""
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _things_image(folder: Path, uid: str) -> Path | None:
    """``folder/<id>/<id>_NNb.<jpg|jpeg|png>`` with the lowest NN, or None."""
    pattern = _things_pattern(uid)
    best: tuple[int, int, str] | None = None
    best_path: str | None = None
    for entry in _entries(folder / uid):
        match = pattern.match(entry.name)
        if match:
            key = (int(match.group(1)), _suffix_rank(entry.name), entry.name)
            if best is None or key < best:
                best, best_path = key, entry.path
    return Path(best_path) if best_path is not None else None


def _image_files(entries: list[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    return [e for e in entries if os.path.splitext(e.name)[1].lower() in _IMAGE_SUFFIXES]


def _resolve_image_dir(root: Path, images: str | os.PathLike[str] | None) -> Path:
    if images is not None:
        folder = root / images
        if not folder.is_dir():
            raise ThingsDataError(f"{folder}: no such image folder")
        return folder
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise ThingsDataError(f"{root}: no image folder (looked for {', '.join(IMAGE_DIRS)})")


def find_images(
    root: str | os.PathLike[str],
    ids: Sequence[str],
    *,
    images: str | os.PathLike[str] | None = None,
    layout: str = "auto",
) -> tuple[list[Path | None], dict[str, Any]]:
    """Locate one image per concept (docs/method.md §2).

    Parameters
    ----------
    root : the THINGS folder.
    ids : the ``uniqueID`` of every concept, in concept order.
    images : the image folder relative to ``root`` (an absolute path is used as is); None: the
        first existing of ``images``, ``object_images``, ``Images``.
    layout : ``"things"``: ``<dir>/<id>/<id>_NNb.<jpg|jpeg|png>`` (the image shown in the task;
        with several, the lowest ``NN``); ``"flat"``: ``<dir>/<id>.<jpg|jpeg|png>`` or a folder
        ``<dir>/<id>/`` holding exactly one image; ``"auto"``: ``"things"`` when such a ``b``
        image exists for any of the first few ids, else ``"flat"``. File suffixes are matched
        case-insensitively; with several suffixes ``.jpg`` wins over ``.jpeg`` over ``.png``.

    Returns
    -------
    paths : per concept the image path, or None when missing.
    info : ``{"dir", "layout" (the one used), "n_found", "n_missing", "missing" (the first 20
        missing ids), "ambiguous" (flat layout: the first 20 ids whose folder holds several
        images; they count as missing)}``.

    Raises
    ------
    ThingsDataError
        No image folder; ValueError for an unknown ``layout``.
    """
    if layout not in IMAGE_LAYOUTS:
        raise ValueError(f"unknown image layout {layout!r}; expected one of {IMAGE_LAYOUTS}")
    folder = _resolve_image_dir(Path(root), images)
    ids = [str(u) for u in ids]

    if layout == "auto":
        probe = ids[:_AUTO_PROBE]
        layout = "things" if any(_things_image(folder, u) for u in probe) else "flat"

    paths: list[Path | None] = []
    ambiguous: list[str] = []
    if layout == "things":
        paths = [_things_image(folder, u) for u in ids]
    else:
        top: dict[str, tuple[int, str]] = {}
        for entry in _image_files(_entries(folder)):
            stem = os.path.splitext(entry.name)[0]
            key = (_suffix_rank(entry.name), entry.path)
            if stem not in top or key < top[stem]:
                top[stem] = key
        for uid in ids:
            if uid in top:
                paths.append(Path(top[uid][1]))
                continue
            inside = _image_files(_entries(folder / uid))
            if len(inside) == 1:
                paths.append(Path(inside[0].path))
            else:
                if len(inside) > 1:
                    ambiguous.append(uid)
                paths.append(None)
    missing = [u for u, path in zip(ids, paths, strict=True) if path is None]
    info = {
        "dir": str(folder),
        "layout": layout,
        "n_found": len(ids) - len(missing),
        "n_missing": len(missing),
        "missing": missing[:_LIST_INFO],
        "ambiguous": ambiguous[:_LIST_INFO],
    }
    return paths, info


def _missing_message(image_dir: str | os.PathLike[str], missing: list[str], n: int) -> str:
    return f"{image_dir}: no image for {len(missing)} of {n} concepts: {_listing(missing)}"


def require_images(
    paths: Sequence[Path | None], ids: Sequence[str], image_dir: str | os.PathLike[str]
) -> list[Path]:
    """The image paths of :func:`find_images`, or an error when any concept has none.

    Raises
    ------
    ThingsDataError
        ``"<image_dir>: no image for k of n concepts: id, id, ... (and m more)"`` (10 ids shown).
    """
    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} paths for {len(ids)} ids")
    missing = [str(u) for u, path in zip(ids, paths, strict=True) if path is None]
    if missing:
        raise ThingsDataError(_missing_message(image_dir, missing, len(ids)))
    return [Path(path) for path in paths if path is not None]


def _thumbnail(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """One image as a (size, size, 3) uint8 square: shorter side to ``size``, centre crop."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (size, size))  # decode at a reduced scale, >= size
            rgb = image.convert("RGB")
            width, height = rgb.size
            side = min(width, height)
            left, top = (width - side) / 2.0, (height - side) / 2.0
            square = rgb.resize(
                (size, size),
                resample=Image.Resampling.BILINEAR,
                box=(left, top, left + side, top + side),
                reducing_gap=2.0,
            )
            return np.asarray(square, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ThingsDataError(f"{path}: cannot read image ({exc})") from None


def load_thumbnails(paths: Sequence[str | os.PathLike[str]], size: int = 64) -> np.ndarray:
    """Read images as small squares: RGB, shorter side resized to ``size``, centre-cropped.

    JPEGs are decoded at a reduced scale (``PIL.Image.draft``) before resizing, which makes
    reading the 1,854 THINGS images take seconds.

    Returns
    -------
    (n, size, size, 3) uint8 array, row ``i`` = ``paths[i]``.

    Raises
    ------
    ThingsDataError
        ``"<file>: cannot read image (...)"`` for the first unreadable image.
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    out = np.empty((len(paths), int(size), int(size), 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _thumbnail(path, int(size))
    return out


# --------------------------------------------------------------------------------------------
# The pixel reference
# --------------------------------------------------------------------------------------------


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Standardised 8 x 8 downsampled pixels: the features of :func:`pixel_reference`.

    Each image (``(n, H, W, 3)``, ``H, W >= 8``) is block-averaged to 8 x 8 x 3 (when ``H`` or
    ``W`` is not a multiple of 8 the last ``H % 8`` rows / ``W % 8`` columns are dropped), and
    each of the 192 features is standardised across images.

    Returns
    -------
    (n, 192) float64 array.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[1] < 8 or arr.shape[2] < 8:
        raise ValueError(f"images must be an (n, H, W, 3) array with H, W >= 8, got {arr.shape}")
    n, h, w, _ = arr.shape
    h8, w8 = h - h % 8, w - w % 8
    arr = arr[:, :h8, :w8].astype(np.float64)
    small = arr.reshape(n, 8, h8 // 8, 8, w8 // 8, 3).mean((2, 4)).reshape(n, -1)
    return (small - small.mean(0)) / (small.std(0) + 1e-9)


def pixel_reference(images: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Zero-shot similarity of standardised 8 x 8 downsampled pixels (the demo's reference).

    Returns ``similarity_fn(triplets) -> triplet_logits(pixel_features(images), triplets)``, the
    ``[s_jk, s_ik, s_ij]`` logits :func:`~recovery_assets.sources.human.detect_convention` needs.
    """
    small = pixel_features(images)
    return lambda trip: triplet_logits(small, trip)


# --------------------------------------------------------------------------------------------
# Checking a whole folder
# --------------------------------------------------------------------------------------------


def _features_reference(
    reference: Any, n: int | None
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str | None]:
    """The similarity of a features array, or (None, problem)."""
    try:
        X = np.asarray(reference, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return None, f"reference: not a numeric (n, p) features array ({exc})"
    if X.ndim != 2 or X.shape[1] < 1:
        return None, f"reference: expected an (n, p) features array, got shape {X.shape}"
    if n is not None and X.shape[0] != n:
        return None, f"reference: features have {X.shape[0]} rows, the concept table has {n}"
    if not np.isfinite(X).all():
        return None, "reference: features contain non-finite values"
    return (lambda trip: triplet_logits(X, trip)), None


def _check_text_files(
    report: dict[str, Any],
    present: dict[str, Path | None],
    n: int | None,
    similarity: Callable[[np.ndarray], np.ndarray] | None,
) -> None:
    """validate_things for the text / .npy judgement files (fills ``report``)."""
    problems: list[str] = report["problems"]
    test_rows: dict[str, np.ndarray] = {}
    detections: dict[str, Any] = {}
    file_paths: dict[str, Path] = {}
    for name in CONVENTION_FILES:
        path = present[name]
        if path is None:
            continue
        file_paths[name] = path
        entry: dict[str, Any] = {
            "path": str(path),
            "rows": None,
            "sha256": file_sha256(path),
            "convention": None,
            "detection": None,
        }
        report["files"][name] = entry
        if n is None:
            continue
        try:
            rows = read_triplet_file(path, n)
        except HumanDataError as exc:
            problems.append(str(exc))
            continue
        entry["rows"] = int(rows.shape[0])
        if similarity is not None:
            result = detect_convention(rows, similarity)
            detections[name] = result
            entry["convention"] = result.decision
            entry["detection"] = result.to_dict()
        if name.startswith("testset"):
            test_rows[name] = rows
        del rows

    # The convention, decided by the training file.
    train = detections.get("trainset")
    convention: str | None = None
    if train is not None:
        if train.unambiguous:
            convention = train.decision
        else:
            problems.append(
                f"{file_paths['trainset']}: cannot tell which column is the odd one out: "
                f"{train.diagnosis}. The concept order may be wrong (the file's indices must "
                f"follow the row order of {CONCEPTS_FILE}) or the reference uninformative."
            )
    if convention is not None:
        for name, result in detections.items():
            if result.unambiguous and result.decision != convention:
                problems.append(
                    f"{file_paths[name]}: detected convention {result.decision}, but the training "
                    f"file {file_paths['trainset']} is {convention}: the files mix conventions"
                )
    report["convention"] = convention

    # Noise ceilings on canonical rows.
    if convention is not None:
        for name, rows in test_rows.items():
            canonical = positions_to_human_rows(
                *human_rows_to_positions(rows, convention), "pair_pair_odd"
            )
            try:
                report["noise_ceiling"][name] = float(noise_ceiling(canonical).ceiling)
            except ValueError as exc:
                if name == "testset2":
                    problems.append(
                        f"{file_paths[name]}: no noise ceiling ({exc}); test set 2 must hold "
                        f"repeated triplets"
                    )


def _check_release_table(
    report: dict[str, Any],
    path: Path,
    n: int | None,
    similarity: Callable[[np.ndarray], np.ndarray] | None,
) -> None:
    """validate_things for the release table (fills ``report``)."""
    problems: list[str] = report["problems"]
    entry: dict[str, Any] = {
        "path": str(path),
        "read": True,
        "sha256": file_sha256(path),
        "rows": None,
        "group_rows": None,
        "choice_fits": None,
        "choice": None,
    }
    report["release_table"] = entry
    if n is None:
        return
    try:
        table = read_release_table(path, n)
    except HumanDataError as exc:
        problems.append(str(exc))
        return
    entry["rows"] = table.n_rows
    entry["group_rows"] = table.group_rows()
    entry["choice_fits"] = list(table.fits)
    by_set = table.set_rows()
    value = {name: v for v, name in RELEASE_SETS.items()}
    for name in REQUIRED_FILES:
        if name not in by_set:
            problems.append(
                f"{path}: no rows with noise_ceiling {value[name]} ({name}); {name} is required"
            )
    for name, rows in by_set.items():
        report["files"][name] = {
            "path": str(path),
            "rows": int(rows.size),
            "sha256": table.sha256,
            "n_subjects": int(pd.unique(table.subjects[rows]).size),
            "choice_encoding": None,
            "convention": None,
            "detection": None,
        }
    if similarity is None or "trainset" not in by_set:
        return
    choice = detect_choice_encoding(table, similarity)
    entry["choice"] = choice.to_dict()
    report["choice_detection"] = {enc: r.to_dict() for enc, r in choice.detection.items()}
    if choice.encoding is None:
        problems.append(
            f"{path}: cannot tell how 'choice' names the odd one out: {choice.diagnosis}"
        )
        return
    encoding = choice.encoding
    report["choice_encoding"] = encoding
    report["convention"] = "pair_pair_odd"  # the encoding check is the convention check
    for name, rows in by_set.items():
        canonical = table.canonical(encoding, rows)
        if name == "trainset":
            result = choice.detection[encoding]
        else:
            result = detect_convention(canonical, similarity)
        report["files"][name].update(
            choice_encoding=encoding, convention=result.decision, detection=result.to_dict()
        )
        if result.unambiguous and result.decision != "pair_pair_odd":
            problems.append(
                f"{path}: the canonical rows of {name} are detected as {result.decision}, but "
                f"the training rows as pair_pair_odd: the sets do not agree on the encoding of "
                f"'choice'"
            )
        if name.startswith("testset"):
            try:
                report["noise_ceiling"][name] = float(noise_ceiling(canonical).ceiling)
            except ValueError as exc:
                if name == "testset2":
                    problems.append(
                        f"{path}: no noise ceiling of testset2 ({exc}); test set 2 must hold "
                        f"repeated triplets"
                    )
        del canonical


def validate_things(
    root: str | os.PathLike[str],
    *,
    n_concepts: int | None = None,
    images: str | os.PathLike[str] | None = None,
    layout: str = "auto",
    reference: Any = None,
) -> dict[str, Any]:
    """Check a THINGS folder without running anything heavy; report every problem found.

    Parameters
    ----------
    root : the folder: ``things_concepts.tsv``, an image folder (see :func:`find_images`) and the
        judgements, either as files (``trainset``, ``validationset``, ``testset1-3`` as ``.txt`` /
        ``.npy``, in ``root``, ``root/triplets`` or ``root/triplet_dataset``; see
        :func:`~recovery_assets.sources.human.find_judgement_file`) or as the THINGS-data release
        table (:func:`~recovery_assets.sources.human.find_release_table`), which is checked when
        ``trainset`` or ``testset2`` is missing as a file.
    n_concepts : the number of concepts the study expects (None: any).
    images, layout : passed to :func:`find_images`.
    reference : how the convention of the judgement files is checked. None: the
        :func:`pixel_reference` of 64 px thumbnails of the images (needs every image); an
        ``(n_concepts, p)`` features array: zero-shot ``triplet_logits(features, t)``.

    Steps: the concept table is read (:func:`read_concepts`; a row count different from
    ``n_concepts`` is a problem, but the table is still used); images are located (missing ones
    are a problem) and, for the pixel reference, read; every judgement file is read with
    :func:`~recovery_assets.sources.human.read_triplet_file` (its error is a problem; trainset
    and testset2 are required), hashed, and its convention detected with
    :func:`~recovery_assets.sources.human.detect_convention`. As in
    :func:`~recovery_assets.sources.human.load_human_judgements`, the training file decides the
    convention: ambiguous is a problem (the concept order may be wrong), another file
    unambiguously in the other convention is a problem (the files mix conventions). When the
    convention is decided, the leave-one-out noise ceiling of each test set is computed on its
    canonical ``[pair, pair, odd]`` rows (test set 2 without repeated triplets is a problem).

    The release table instead is read with
    :func:`~recovery_assets.sources.human.read_release_table` (its error is a problem); its sets
    are the rows with ``noise_ceiling`` 0 (``trainset``, required), 1, 2 (``testset2``,
    required), 3; the encoding of ``choice`` is established with
    :func:`~recovery_assets.sources.human.detect_choice_encoding` (not established is a problem;
    established means the convention is ``pair_pair_odd``), each set's canonical rows are
    checked with ``detect_convention`` and the test sets' noise ceilings computed on them.

    Returns
    -------
    JSON-serialisable dict::

        {"root", "usable" (no problems), "n_concepts", "concepts_file",
         "images": {"dir", "layout", "n_found", "n_missing", "missing"} or None,
         "files": {name: {"path", "rows", "sha256", "convention", "detection"}},
         "convention", "noise_ceiling": {"testset1", "testset2", "testset3"},
         "reference": "pixels" | "features" | None,
         "source": "files" | "release_table" | None, "choice_encoding", "choice_detection",
         "release_table", "unread", "problems": [str, ...], "notes": [str, ...]}

    With features as the reference, a folder without an image folder is usable (a note says so):
    a study whose models all come from precomputed features reads no image.

    ``files[name]["convention"]`` is the detected decision (``"pair_pair_odd"``,
    ``"odd_pair_pair"`` or ``"ambiguous"``) or None when not checked; ``"detection"`` is the
    :class:`~recovery_assets.sources.human.ConventionResult` as a dict. ``"convention"`` is the
    decided convention or None; a noise ceiling is None when it could not be computed.

    With the release table, ``files[name]`` (one per set with rows) holds ``path`` (the table),
    ``rows``, ``sha256`` (the table's), ``n_subjects``, ``choice_encoding``, ``convention`` and
    ``detection`` (of the set's canonical rows); ``"choice_encoding"`` is ``"position"`` /
    ``"concept"`` or None, ``"choice_detection"`` maps each structurally fitting encoding to the
    detection dict of the training rows made canonical under it; ``"release_table"`` is
    ``{"path", "read": True, "sha256", "rows", "group_rows" (set -> rows), "choice_fits",
    "choice"}``. With the files, ``"release_table"`` is None, or ``{"path", "read": False,
    "reason"}`` when a table is present too. ``"unread"`` lists judgement files found but not read.
    """
    base = Path(root)
    problems: list[str] = []
    report: dict[str, Any] = {
        "root": str(base),
        "usable": False,
        "n_concepts": None,
        "concepts_file": str(base / CONCEPTS_FILE),
        "images": None,
        "files": {},
        "convention": None,
        "noise_ceiling": {name: None for name in CONVENTION_FILES if name.startswith("testset")},
        "reference": None,
        "source": None,
        "choice_encoding": None,
        "choice_detection": {},
        "release_table": None,
        "unread": [],
        "problems": problems,
        "notes": [],
    }
    if not base.is_dir():
        problems.append(f"{base}: no such folder")
        return report

    # The concept table.
    table: pd.DataFrame | None = None
    try:
        table = read_concepts(base / CONCEPTS_FILE)
    except ThingsDataError as exc:
        problems.append(str(exc))
    n: int | None = None
    if table is not None:
        n = len(table)
        report["n_concepts"] = n
        if n_concepts is not None and n != int(n_concepts):
            problems.append(_count_problem(base / CONCEPTS_FILE, n, int(n_concepts)))
    elif n_concepts is not None:
        n = int(n_concepts)  # the judgement files can still be checked against the study's count

    # Images.
    paths: list[Path | None] | None = None
    if table is not None:
        ids = table["uniqueID"].tolist()
        with_features = reference is not None and not isinstance(reference, str)
        try:
            paths, info = find_images(base, ids, images=images, layout=layout)
        except ThingsDataError as exc:
            if with_features and images is None:
                # features decide the convention: a folder without the (licensed) images can
                # still run a study whose models all come from precomputed features
                report["notes"].append(
                    f"{exc}: fine for a study whose models all have precomputed features; "
                    "timm models and the pixel reference need the images"
                )
            else:
                problems.append(str(exc))
        else:
            report["images"] = {k: info[k] for k in ("dir", "layout", "n_found", "n_missing")}
            report["images"]["missing"] = info["missing"]
            if info["n_missing"]:
                missing = [u for u, path in zip(ids, paths, strict=True) if path is None]
                message = _missing_message(info["dir"], missing, n or 0)
                if info["ambiguous"]:
                    message += f" (several images in the folder of {_listing(info['ambiguous'])})"
                problems.append(message)

    # The reference similarity.
    similarity: Callable[[np.ndarray], np.ndarray] | None = None
    if reference is None or (isinstance(reference, str) and reference == "pixels"):
        if paths is None:
            problems.append(
                "convention not checked: no images (the concept table or the image "
                "folder is missing); pass features as the reference"
            )
        elif any(path is None for path in paths):
            k = sum(path is None for path in paths)
            problems.append(
                f"convention not checked: the pixel reference needs every image and {k} are "
                f"missing; pass features as the reference"
            )
        else:
            thumbs = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)
            unreadable: list[str] = []
            for i, path in enumerate(paths):
                try:
                    thumbs[i] = _thumbnail(path, 64)
                except ThingsDataError as exc:
                    unreadable.append(str(exc))
            if unreadable:
                problems.extend(unreadable[:5])
                if len(unreadable) > 5:
                    problems.append(f"... and {len(unreadable) - 5} more unreadable images")
                problems.append("convention not checked: unreadable images")
            else:
                similarity = pixel_reference(thumbs)
                report["reference"] = "pixels"
    else:
        similarity, problem = _features_reference(reference, n)
        if problem is not None:
            problems.append(f"{problem}; convention not checked")
        else:
            report["reference"] = "features"

    # The judgement files, or the release table when the required files are absent.
    present = {name: find_judgement_file(base, name) for name in CONVENTION_FILES}
    table_path = find_release_table(base)
    missing = [name for name in REQUIRED_FILES if present[name] is None]
    if table_path is not None and missing:
        report["source"] = "release_table"
        report["unread"] = [str(path) for path in present.values() if path is not None]
        _check_release_table(report, table_path, n, similarity)
    else:
        report["source"] = "files"
        for name in missing:
            problems.append(judgements_not_found(base, [name]))
        if table_path is not None:
            report["release_table"] = {
                "path": str(table_path),
                "read": False,
                "reason": "the text / .npy judgement files were read instead",
            }
            report["unread"] = [str(table_path)]
        _check_text_files(report, present, n, similarity)
    report["usable"] = not problems
    return report
