"""A THINGS folder on disk: the concept table, the images, and a dry-run check of the whole folder.

THINGS (docs/method.md §2) has 1,854 object concepts. Their order is the row order of
``things_concepts.tsv`` (tab-separated, header, 25 columns, one of them ``uniqueID``); it is never
sorted (sorted order differs: ``camera_lens, camera1, camera2``). Each concept has one image,
either ``<images>/<uniqueID>/<uniqueID>_NNb.jpg`` (the THINGS layout: the image with the
trailing ``b`` is the one shown in the odd-one-out task) or one image per ``uniqueID`` (a flat
layout). The odd-one-out judgements are read by :mod:`recovery_assets.sources.human`.

- :func:`read_concepts` reads and validates the concept table.
- :func:`find_images` / :func:`require_images` locate one image per concept;
  :func:`load_thumbnails` reads them as small square RGB arrays, e.g. for
  :func:`~recovery_assets.core.pixels.pixel_reference` (the zero-shot similarity of standardised
  8 x 8 downsampled pixels, the reference that decides the convention of the judgement files when
  no model features are given).

The dry-run check of a whole folder is in :mod:`recovery_assets.sources.validate_things`.

Every problem raises a :class:`ThingsDataError` message
that starts with the offending file or folder and names the line or concept where it applies.
Pure numpy / pandas / PIL (no dagster).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CONCEPTS_FILE",
    "IMAGE_DIRS",
    "IMAGE_LAYOUTS",
    "ThingsDataError",
    "find_images",
    "load_thumbnails",
    "read_concepts",
    "require_images",
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
