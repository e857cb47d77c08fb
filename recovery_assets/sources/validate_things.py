"""The dry-run check of a whole THINGS folder: ``validate_things`` reads the concept table, finds
the images, reads and hashes every judgement file (or the release table), decides the convention
and computes the test sets' noise ceilings, without running anything heavy, and reports every
problem it finds in one JSON-serialisable dict (`recovery validate-things`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recovery_assets.core.convention import detect_convention
from recovery_assets.core.generator import triplet_logits
from recovery_assets.core.pixels import pixel_reference
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
    find_judgement_file,
    find_release_table,
    judgements_not_found,
    read_release_table,
    read_triplet_file,
)
from recovery_assets.sources.things import (
    CONCEPTS_FILE,
    ThingsDataError,
    _count_problem,
    _listing,
    _missing_message,
    _thumbnail,
    find_images,
    read_concepts,
)

__all__ = ["validate_things"]


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
        :func:`~recovery_assets.core.pixels.pixel_reference` of 64 px thumbnails of the images
        (needs every image); an ``(n_concepts, p)`` features array: zero-shot
        ``triplet_logits(features, t)``.

    Steps: the concept table is read (:func:`read_concepts`; a row count different from
    ``n_concepts`` is a problem, but the table is still used); images are located (missing ones
    are a problem) and, for the pixel reference, read; every judgement file is read with
    :func:`~recovery_assets.sources.human.read_triplet_file` (its error is a problem; trainset
    and testset2 are required), hashed, and its convention detected with
    :func:`~recovery_assets.core.convention.detect_convention`. As in
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
    :class:`~recovery_assets.core.convention.ConventionResult` as a dict. ``"convention"`` is the
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
